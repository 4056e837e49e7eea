"""The paper's problems: their losses, metrics and shared settings.

Every per-example loss and metric of the examples and benchmarks is written
here once: ``(outputs [B, ...], targets [B, ...]) -> [B]``. The paper's
problems (Sec. 5) are built from these, the models of
:mod:`examples.common.models` and the data of :mod:`examples.common.data`:
the examples as a :class:`Problem` each, the quality benchmark as its tasks
(with a validation split held out of the training set).

References:
  Paren, Poudel, Kumar, "Faking Interpolation Until You Make It", Sec. 5;
  Vaswani et al., "Painless Stochastic Gradient", NeurIPS 2019 (matrix
  factorisation, RBF kernels).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from examples.common import data as data_lib

__all__ = ["DEEP_LRS", "Problem", "RBF_SIGMAS", "accuracy", "binary_accuracy",
           "channel_stats", "cross_entropy", "logistic_loss", "rbf_centres",
           "sequence_accuracy", "sequence_loss", "squared_error"]


# --------------------------------------------------------------------------
# Losses and metrics, per example.


def squared_error(out, y):
  """Mean squared error over the outputs (MSELoss, as SLS): [B, D] -> [B]."""
  return jnp.mean((out - y) ** 2, axis=-1)


def logistic_loss(logits, y):
  """Logistic loss; labels in {0, 1}."""
  return optax.sigmoid_binary_cross_entropy(logits, y)


def binary_accuracy(logits, y):
  return ((logits > 0).astype(jnp.float32) == y).astype(jnp.float32)


def cross_entropy(logits, labels):
  """Softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def accuracy(logits, labels):
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def sequence_loss(logits, targets):
  """A sequence's mean cross-entropy over its characters: [B, T] -> [B]."""
  return jnp.mean(cross_entropy(logits, targets), axis=-1)


def sequence_accuracy(logits, targets):
  return jnp.mean(accuracy(logits, targets), axis=-1)


# --------------------------------------------------------------------------
# Shared settings of the paper's problems.

# The paper's step sizes for the deep-learning problems: maximal step size
# 0.1 for AALIG (its Figure 4), ALI-G and SPS; SGD 0.1 with the step
# schedule; Adam's default 1e-3.
DEEP_LRS = {"aalig": 0.1, "alig": 0.1, "sps": 0.1, "adam": 1e-3, "sgd": 0.1}

# RBF kernel widths (Vaswani et al. 2019; the AALIG paper Sec. 5.1).
RBF_SIGMAS = {"mushrooms": 0.5, "ijcnn1": 0.05}


def rbf_centres(x: np.ndarray, num_centres: Optional[int], seed: int
                ) -> np.ndarray:
  """`num_centres` random rows of `x` (in order); None or >= len(x): all."""
  if num_centres is None or num_centres >= len(x):
    return x
  pick = np.random.default_rng(seed).choice(len(x), num_centres,
                                            replace=False)
  return x[np.sort(pick)]


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std (+1e-6) of uint8 images [N, H, W, C] / 255."""
  x = images.astype(np.float32) / 255.0
  return x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2)) + 1e-6


@dataclasses.dataclass
class Problem:
  """A supervised learning problem: data, model and losses.

  Attributes:
    data: the data set (row position = dataset index).
    make_model: ``rngs -> nnx.Module``; the module is called as
      ``model(x, train=bool)``.
    per_example_loss: ``(outputs [B, ...], targets [B, ...]) -> [B]``.
    accuracy: optional ``(outputs, targets) -> [B]`` of 0/1 (or a per-example
      accuracy in [0, 1]).
    preprocess: in-jit ``x -> x`` (e.g. uint8 images to normalised floats).
    augment: optional in-jit ``(key, x [B, ...]) -> x`` for training batches.
    name: for logs.
  """

  data: data_lib.ArrayDataset
  make_model: Callable[[nnx.Rngs], nnx.Module]
  per_example_loss: Callable
  accuracy: Optional[Callable] = None
  preprocess: Callable = lambda x: x
  augment: Optional[Callable] = None
  name: str = ""
