"""The experiment harness of the examples and the benchmarks.

- :mod:`examples.common.data`: data loaders (matrix factorisation, LIBSVM,
  Fashion-MNIST, TFDS images, text) and the index-carrying batch sampler.
- :mod:`examples.common.models`: the paper's models in Flax NNX.
- :mod:`examples.common.problems`: the paper's losses and metrics (each
  written once) and the :class:`~examples.common.problems.Problem` record.
- :mod:`examples.common.optimizers`: the one optimiser registry
  (``build(name, lr, wd, ctx)``) and the run context.
- :mod:`examples.common.loop`: the training loop (jitted, donated step;
  progress bar; metrics) and the evaluator.
- :mod:`examples.common.checkpoint`: Orbax checkpoints with exact resume,
  and the guard that keeps a previous run.
- :mod:`examples.common.plots`, :mod:`examples.common.report`: figures,
  tables, and the one writer of results files.
- :mod:`examples.common.cli`: the examples' command-line pieces.
"""
