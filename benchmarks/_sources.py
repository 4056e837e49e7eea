"""The models of the step-overhead benchmark, from the examples' harness.

``examples/common`` (models, data, problems, optimisers) is the project's
one definition of the paper's models and data sets; the benchmarks import it
and add only what a vmapped, CPU-sized benchmark needs (validation splits,
subsets: see tasks.py).
"""

from __future__ import annotations

from flax import nnx

from examples.common import models as models_lib

__all__ = ["make_model", "model_source"]

_DESC = {
    "linear": "examples.common.models.MLP(hidden=()), a linear model",
    "resnet": "examples.common.models.ResNet8 (width 16)",
    "mlp": "examples.common.models.MLP(hidden=(512, 512))",
    "char_rnn": "examples.common.models.CharRNN(hidden=128, num_layers=2)",
}


def make_model(name: str, *, num_classes: int = 10, in_shape=(32, 32, 3),
               vocab_size: int = 83, seed: int = 0) -> nnx.Module:
  """A freshly initialised model; call it as ``model(x, train=...)``."""
  rngs = nnx.Rngs(seed)
  if name == "resnet":
    return models_lib.ResNet8(num_classes, in_shape[-1], 16, rngs=rngs)
  if name == "linear":
    n_in = 1
    for d in in_shape:
      n_in *= d
    return models_lib.MLP(n_in, (), num_classes, rngs=rngs)
  if name == "mlp":
    n_in = 1
    for d in in_shape:
      n_in *= d
    return models_lib.MLP(n_in, (512, 512), num_classes, rngs=rngs)
  if name == "char_rnn":
    return models_lib.CharRNN(vocab_size, 128, 2, rngs=rngs)
  raise ValueError(f"unknown model {name!r}")


def model_source(name: str) -> str:
  return _DESC[name]
