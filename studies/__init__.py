"""Development studies of aalig-optax: investigations, not user benchmarks.

``step_cost/`` is the investigation of what an AALIG step costs (issue 13):
its scripts, its write-up and the result files that write-up cites.
``hlo.py`` reads compiled HLO text; the overhead benchmark, the study and
the tests of the compiled step all count kernels with it. Run from the
project root, e.g. ``python -m studies.step_cost.lean_step --help``.
"""
