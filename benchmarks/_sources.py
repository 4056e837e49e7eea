"""The models of the step-overhead benchmark, from the examples' harness.

``examples/common`` (models, data, problems, optimisers) is the project's
one definition of the paper's models and data sets; the benchmarks import it
and add only what a vmapped, CPU-sized benchmark needs (validation splits,
subsets: see tasks.py).
"""

from __future__ import annotations

from flax import nnx

from examples.common import models as models_lib

__all__ = ["inputs", "make_model", "model_source"]

_DESC = {
    "linear": "examples.common.models.MLP(hidden=()), a linear model",
    "resnet": "examples.common.models.ResNet8 (width 16)",
    "mlp": "examples.common.models.MLP(hidden=(512, 512))",
    "char_rnn": "examples.common.models.CharRNN(hidden=128, num_layers=2)",
    "resnet18": "examples.common.models.ResNet18 (width 64) on 64x64x3 "
                "batches, 200 classes (Tiny ImageNet's sizes)",
}

# Input shape and classes of each model's synthetic batches, where they are
# not CIFAR's (32, 32, 3) and 10: ResNet-18 on Tiny ImageNet's sizes, a step
# of several ms on a GPU.
INPUTS = {"resnet18": ((64, 64, 3), 200)}


def inputs(name: str) -> tuple[tuple[int, int, int], int]:
  """(input shape, classes) of the model's synthetic batches."""
  return INPUTS.get(name, ((32, 32, 3), 10))


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
  if name == "resnet18":
    return models_lib.ResNet18(num_classes, in_shape[-1], 64, rngs=rngs)
  raise ValueError(f"unknown model {name!r}")


def model_source(name: str) -> str:
  return _DESC[name]
