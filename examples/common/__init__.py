"""Shared helpers of the examples and benchmarks.

- :mod:`examples.common.data`: data loaders (matrix factorisation, LIBSVM,
  Fashion-MNIST, TFDS images, text) and the index-carrying batch sampler.
- :mod:`examples.common.models`: the paper's models in Flax NNX.
- :mod:`examples.common.train`: the generic training loop (jitted, donated
  step; progress bar; Orbax checkpoints with exact resume; metrics; plots).
"""
