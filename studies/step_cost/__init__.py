"""The step-cost study (issue 13): what an AALIG step costs, and why.

- ``lean_step``: the tiny model's step under SGD, ``polyak_sgd``, AALIG and
  the ``table_floor`` yardstick, HLO counts and paired timings, optionally
  against another checkout's AALIG in the same process;
- ``profile_threads``: on which threads XLA:CPU runs that step's kernels;
- ``gpu_probe``: what a conditional costs in the step on a GPU.

The findings are in ``README.md`` beside this file.
"""
