"""The RBF-kernel problems of Vaswani et al.'s code, as the paper runs them.

A LIBSVM set's exact RBF kernel features (every training point a centre) or
a random subset of centres, a bias-free linear model with PyTorch's
initialisation, the binary cross-entropy problem over them, and the run
context of the paper's K = 10 AALIG sections with the last partial batch
dropped. Used by ``examples/rbf_kernel.py``; the data themselves come from
:mod:`examples.common.libsvm`.

References:
  Paren, Poudel, Kumar, "Faking Interpolation Until You Make It", Sec. 5.1,
  Figure 3; Vaswani et al., "Painless Stochastic Gradient", NeurIPS 2019
  (github.com/IssamLaradji/sls).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from flax import nnx

from examples.common import data as data_lib
from examples.common import libsvm
from examples.common import models
from examples.common import optimizers
from examples.common import problems

__all__ = ["KernelData", "SECTIONS", "SIGMAS", "load_kernel_data",
           "initial_weights", "make_model", "make_problem", "run_context"]

SIGMAS = problems.RBF_SIGMAS
SECTIONS = 10  # AALIG's K: 35 // 10 = 3 epochs per section.


@dataclasses.dataclass
class KernelData:
  """A dataset's kernel features: the sls code's tensors."""
  name: str
  x_train: np.ndarray  # [N, M] float32: kernel against the M centres.
  y_train: np.ndarray  # [N] float32 in {0, 1}.
  x_val: np.ndarray  # [N_val, M].
  y_val: np.ndarray

  @property
  def num_train(self) -> int:
    return int(self.x_train.shape[0])


def load_kernel_data(name: str, num_centres: int = 0, seed: int = 0,
                     max_train: Optional[int] = None) -> KernelData:
  """The RBF features of LIBSVM set `name` in the sls code's settings.

  Args:
    name: ``mushrooms`` or ``ijcnn1``.
    num_centres: 0 for the exact kernel (every training point a centre);
      else this many random training points (not the paper's setting).
    seed: seed of that subset.
    max_train: keep the first this many training points (quick runs; the
      kernel is then against them only).
  """
  raw = libsvm.load_libsvm_sls(name)
  x_tr, y_tr = raw.x_train[:max_train], raw.y_train[:max_train]
  sigma = SIGMAS[name]
  if num_centres:
    centres = problems.rbf_centres(x_tr, num_centres, seed)
    k_tr = libsvm.rbf_kernel(x_tr, centres, sigma)
  else:
    centres = x_tr
    k_tr = libsvm.rbf_kernel(x_tr, x_tr, sigma, same=True)
  k_va = libsvm.rbf_kernel(raw.x_test, centres, sigma)
  return KernelData(name, k_tr, y_tr, k_va, raw.y_test)


def make_model(num_features: int, rngs: nnx.Rngs) -> nnx.Module:
  """``nn.Linear(num_features, 1, bias=False)`` with PyTorch's init."""
  return models.LinearModel(num_features, use_bias=False, rngs=rngs,
                            kernel_init=models.torch_linear_init)


def make_problem(data: KernelData) -> problems.Problem:
  feats = data_lib.ArrayDataset(data.x_train, data.y_train, data.x_val,
                                data.y_val, 2, data.name)
  return problems.Problem(
      data=feats,
      make_model=lambda rngs: make_model(data.x_train.shape[1], rngs),
      per_example_loss=problems.logistic_loss,
      accuracy=problems.binary_accuracy, name=data.name)


def run_context(num_train: int, epochs: int, batch_size: int,
                steps_per_epoch: Optional[int] = None
                ) -> optimizers.RunContext:
  """drop_last batches, K = 10 AALIG sections."""
  return optimizers.RunContext.create(
      num_train, batch_size, epochs, sections=SECTIONS,
      max_steps_per_epoch=steps_per_epoch, drop_remainder=True)


def initial_weights(num_features: int, seed: int) -> np.ndarray:
  """The weights [M] the model of `seed` starts from (as the loop's runs)."""
  model = make_model(num_features, nnx.Rngs(seed))
  return np.asarray(model.linear.kernel[...])[:, 0]
