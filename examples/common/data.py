"""Data sets for the AALIG examples and benchmarks, as in-memory numpy arrays.

Every loader returns plain numpy arrays (or a small dataclass of them): the
position of an example in its training array is its dataset index, the integer
AALIG keys its approximate optimal value (AOV) on. Batches are drawn with
:func:`epoch_batches`, which shuffles positions, not data, so an example's
index is the same in every epoch whatever the shuffling or augmentation.

Files are looked for in a loader's ``data_dir`` and ``$AALIG_DATA_DIR``
first (files you provide, used as they are; an offline copy of the data
sets goes there), then in :func:`cache_dir`; otherwise they are downloaded
into the cache with :mod:`examples.common.download` (pooch), which verifies
every file before it is used. A file that cannot be found or verified raises
:class:`DataUnavailableError`, one sentence saying how to provide it. Image
sets are loaded by :mod:`examples.common.images`, texts by
:mod:`examples.common.text`, LIBSVM files and RBF kernels by
:mod:`examples.common.libsvm`.

References:
  Paren, Poudel, Kumar, "Faking Interpolation Until You Make It", Sec. 5;
  Vaswani et al., "Painless Stochastic Gradient" (2019), the matrix
  factorisation and RBF-kernel problems; Schneider et al., "DeepOBS" (2019),
  the Tolstoi task.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Iterator, Optional

import numpy as np
from sklearn import model_selection

from examples.common.download import DataUnavailableError

__all__ = [
    "ArrayDataset",
    "DataUnavailableError",
    "cache_dir",
    "epoch_batches",
    "find_file",
    "load_matrix_factorisation",
    "random_matrix_factorisation",
    "steps_per_epoch",
    "train_test_split",
    "user_dirs",
]

@dataclasses.dataclass
class ArrayDataset:
  """A supervised data set held in memory.

  Attributes:
    x_train, y_train: training inputs and targets; row i has dataset index i.
    x_test, y_test: held-out inputs and targets.
    num_classes: number of classes, or None for regression.
    name: a short name for logs and plots.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: Optional[int] = None
  name: str = ""

  @property
  def num_train(self) -> int:
    return int(self.x_train.shape[0])


def cache_dir() -> pathlib.Path:
  """Where downloads go: ``$AALIG_CACHE_DIR`` or ``~/.cache/aalig_optax``."""
  return pathlib.Path(os.environ.get(
      "AALIG_CACHE_DIR", pathlib.Path.home() / ".cache" / "aalig_optax"))


def user_dirs(data_dir=None) -> list[pathlib.Path]:
  """Folders of files the user provides: `data_dir`, ``$AALIG_DATA_DIR``."""
  env = os.environ.get("AALIG_DATA_DIR")
  return [pathlib.Path(d) for d in (data_dir, env) if d]


def find_file(names, data_dir=None) -> Optional[pathlib.Path]:
  """The first of `names` in the user's folders (:func:`user_dirs`), or None.

  A user's file is used as it is (their choice, e.g. a variant of the data;
  :data:`examples.common.download.KNOWN_SHA256` lists the digests of the
  offline copies, to check one by hand).
  """
  for folder in user_dirs(data_dir):
    for name in names:
      if (folder / name).is_file():
        return folder / name
  return None


def train_test_split(n: int, test_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """A seeded random split of ``range(n)`` into sorted train/test positions.

  Our own split (numpy's ``default_rng``), not scikit-learn's: the seeded
  LIBSVM loader (:func:`examples.common.libsvm.load_libsvm`) and the
  benchmark tasks use it, and their recorded results depend on it. The
  paper's set-ups use scikit-learn's ``train_test_split`` itself.
  """
  perm = np.random.default_rng(seed).permutation(n)
  n_test = int(round(n * test_fraction))
  return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int,
                  shuffle: bool = True
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields one epoch of (indices, mask) batches of a fixed shape.

  Every example appears exactly once per epoch. The last batch is padded to
  `batch_size` with index 0 and ``mask=False`` (AALIG ignores masked rows),
  so a jitted step sees a single shape. The order depends only on
  (seed, epoch), which makes a resumed run draw the same batches.

  Args:
    num_examples: N, the size of the data set.
    batch_size: B.
    seed: the run's data seed.
    epoch: the epoch number (0-based).
    shuffle: permute the order (training) or not (evaluation).

  Yields:
    ``(indices int32 [B], mask bool [B])``.
  """
  if shuffle:
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  else:
    order = np.arange(num_examples)
  for start in range(0, num_examples, batch_size):
    idx = order[start:start + batch_size]
    mask = np.ones(batch_size, bool)
    if len(idx) < batch_size:
      mask[len(idx):] = False
      idx = np.concatenate([idx, np.zeros(batch_size - len(idx), idx.dtype)])
    yield idx.astype(np.int32), mask


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Batches in an epoch of :func:`epoch_batches` (the last one padded)."""
  return -(-num_examples // batch_size)


# --------------------------------------------------------------------------
# Matrix factorisation (Vaswani et al. 2019; AALIG paper Sec. 5.1).


def load_matrix_factorisation(data_seed: int = 42,
                              split_seed: int = 9513451) -> ArrayDataset:
  """The matrix factorisation data of Vaswani et al. (2019), exactly.

  The AALIG paper (Sec. 5.1) reuses their code (github.com/IssamLaradji/sls)
  and its data, which are the same for every run (a run's seed changes only
  the initialisation and the batch order)::

      np.random.seed(42)
      A = np.linspace(1, 1e-10, 10)[:, None] * np.random.rand(10, 6)
      X = np.random.randn(6, 1000)
      Y = A @ X                        # no noise
      train_test_split(X.T, Y.T, test_size=0.2, random_state=9513451)

  so that A is very ill-conditioned and factorisations of rank 1 and 4
  cannot fit it (no interpolation), rank 10 and the full map can. The
  examples are the 1000 columns, split by that very scikit-learn call
  (800 train, 200 test).

  Args:
    data_seed: the global numpy seed of A and X (42).
    split_seed: the split's ``random_state`` (9513451).

  Returns:
    An :class:`ArrayDataset` of float32 arrays (x [800, 6], y [800, 10],
    x_test [200, 6], y_test [200, 10]), computed in float64 first.
  """
  rng = np.random.RandomState(data_seed)  # The global state np.random.seed
  a = np.linspace(1, 1e-10, 10)[:, None] * rng.rand(10, 6)  # would set.
  x = rng.randn(6, 1000)
  y = a @ x
  tr, te = model_selection.train_test_split(
      np.arange(1000), test_size=0.2, random_state=split_seed)
  f = lambda v: np.asarray(v, np.float32)
  return ArrayDataset(f(x.T[tr]), f(y.T[tr]), f(x.T[te]), f(y.T[te]), None,
                      "matrix_factorisation")


def random_matrix_factorisation(seed: int = 0, num_examples: int = 1000,
                                in_dim: int = 6, out_dim: int = 10,
                                condition: float = 1e-10,
                                num_train: int = 800) -> ArrayDataset:
  """A seeded variant of the matrix factorisation data (the benchmarks').

  Drawn like :func:`load_matrix_factorisation` but from
  ``np.random.default_rng(seed)`` (A, X and the split all depend on `seed`),
  so not the paper's data; the benchmark suite keeps it so that its recorded
  results stay comparable.

  Args:
    seed: seed of A, X and the split.
    num_examples: size of X (1000).
    in_dim, out_dim: 6 and 10.
    condition: the last row's scale (1e-10).
    num_train: the first `num_train` of a random permutation train, the rest
      test (800/200).

  Returns:
    An :class:`ArrayDataset` of float32 arrays (x [n, 6], y [n, 10]).
  """
  rng = np.random.default_rng(seed)
  a = np.linspace(1.0, condition, out_dim)[:, None] * rng.random(
      (out_dim, in_dim))
  x = rng.standard_normal((num_examples, in_dim))
  y = x @ a.T
  perm = rng.permutation(num_examples)
  tr, te = perm[:num_train], perm[num_train:]
  f = lambda v: np.asarray(v, np.float32)
  return ArrayDataset(f(x[tr]), f(y[tr]), f(x[te]), f(y[te]), None,
                      "matrix_factorisation")
