"""Data sets for the AALIG examples and benchmarks, as in-memory numpy arrays.

Every loader returns plain numpy arrays (or a small dataclass of them): the
position of an example in its training array is its dataset index, the integer
AALIG keys its approximate optimal value (AOV) on. Batches are drawn with
:func:`epoch_batches`, which shuffles positions, not data, so an example's
index is the same in every epoch whatever the shuffling or augmentation.

Files are looked for in ``$AALIG_DATA_DIR`` first (files you provide, used
as they are), then in the developers' offline mirror (``../shared/data/``
beside the project, if present; checked against their SHA-256; users need
none), then in :func:`cache_dir`;
otherwise they are downloaded into the cache with
:mod:`examples.common.download`, which verifies every file before it is
used. A file that cannot be found or verified raises
:class:`DataUnavailableError`, one sentence saying how to provide it. Image
sets are loaded by :mod:`examples.common.images`, texts by
:mod:`examples.common.text`.

References:
  Paren, Poudel, Kumar, "Faking Interpolation Until You Make It", Sec. 5;
  Vaswani et al., "Painless Stochastic Gradient" (2019), the matrix
  factorisation and RBF-kernel problems; Schneider et al., "DeepOBS" (2019),
  the Tolstoi task.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import io
import os
import pathlib
from typing import Iterator, Optional

import numpy as np

from examples.common import download
from examples.common.download import DataUnavailableError

__all__ = [
    "ArrayDataset",
    "DataUnavailableError",
    "cache_dir",
    "epoch_batches",
    "find_file",
    "load_libsvm",
    "load_libsvm_sls",
    "load_matrix_factorisation",
    "load_svmlight",
    "random_matrix_factorisation",
    "rbf_features",
    "rbf_kernel",
    "shared_data_dir",
    "sklearn_split",
    "steps_per_epoch",
    "train_test_split",
    "user_dirs",
]

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]
# The offline copies (read-only, never copied into the project).
SHARED_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"
LIBSVM_URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/"


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


def shared_data_dir() -> pathlib.Path:
  """The folder of offline data files.

  Returns:
    ``$AALIG_DATA_DIR`` if set, else ``<project root>/../shared/data``. The
    folder may not exist (a user's machine); loaders then download.
  """
  env = os.environ.get("AALIG_DATA_DIR")
  if env:
    return pathlib.Path(env)
  return SHARED_DATA_DIR


def cache_dir() -> pathlib.Path:
  """Where downloads go: ``$AALIG_CACHE_DIR`` or ``~/.cache/aalig_optax``."""
  return pathlib.Path(os.environ.get(
      "AALIG_CACHE_DIR", pathlib.Path.home() / ".cache" / "aalig_optax"))


def user_dirs(data_dir=None) -> list[pathlib.Path]:
  """Folders of files the user provides: `data_dir`, ``$AALIG_DATA_DIR``."""
  env = os.environ.get("AALIG_DATA_DIR")
  return [pathlib.Path(d) for d in (data_dir, env) if d]


def find_file(names, data_dir=None) -> Optional[pathlib.Path]:
  """The first of `names` in the user's folders, else in the shared folder.

  A user's file is used as it is (their choice, e.g. a variant of the data);
  a shared offline copy must have its known digest.
  """
  for folder in user_dirs(data_dir):
    for name in names:
      if (folder / name).is_file():
        return folder / name
  for name in names:
    if (SHARED_DATA_DIR / name).is_file():
      download.verify_file(SHARED_DATA_DIR / name)
      return SHARED_DATA_DIR / name
  return None


def train_test_split(n: int, test_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """A seeded random split of ``range(n)`` into sorted train/test positions."""
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


def sklearn_split(n: int, test_size: float, random_state: Optional[int],
                  shuffle: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """The (train, test) positions of sklearn's ``train_test_split``.

  The same positions, in the same order, as
  ``sklearn.model_selection.train_test_split(..., test_size=test_size,
  random_state=random_state)`` without stratification, i.e. its
  ``ShuffleSplit``: ``n_test = ceil(test_size * n)``, ``n_train = n -
  n_test``, and one ``RandomState(random_state).permutation(n)`` whose first
  `n_test` entries are the test set and the next `n_train` the training set.
  (Checked against scikit-learn 1.x in tests/test_examples.py; scikit-learn
  is not a dependency.) With ``shuffle=False`` (the sls code's RBF-kernel
  split) `random_state` is unused: the first `n_train` positions are the
  training set and the last `n_test` the test set, in order.
  """
  n_test = int(np.ceil(test_size * n))
  n_train = n - n_test
  if not shuffle:
    return np.arange(n_train), np.arange(n_train, n)
  perm = np.random.RandomState(random_state).permutation(n)
  return perm[n_test:n_test + n_train], perm[:n_test]


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
  examples are the 1000 columns; the split is :func:`sklearn_split`'s
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
  tr, te = sklearn_split(1000, 0.2, split_seed)
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


# --------------------------------------------------------------------------
# LIBSVM / svmlight files.


def load_svmlight(source, num_features: Optional[int] = None,
                  dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
  """Parses an svmlight/LIBSVM text file into dense arrays.

  A small dense parser (the LIBSVM binary sets used here have at most a few
  hundred features), so the examples need no scikit-learn.

  Args:
    source: a path (``.bz2`` and ``.gz`` are decompressed) or bytes.
    num_features: width of the dense matrix; default the largest feature id.
    dtype: of `x` (float64 is what scikit-learn's ``load_svmlight_file``
      gives, which the exact RBF kernels are computed from).

  Returns:
    ``(x [n, d], y float32 [n])``; feature ids are 1-based in the file and
    column ``id - 1`` in `x`.
  """
  if isinstance(source, (bytes, bytearray)):
    raw = bytes(source)
  else:
    path = str(source)
    opener = bz2.open if path.endswith(".bz2") else (
        gzip.open if path.endswith(".gz") else open)
    with opener(path, "rb") as f:
      raw = f.read()
  labels, rows, cols, vals = [], [], [], []
  for line in io.BytesIO(raw):
    line = line.split(b"#", 1)[0].strip()
    if not line:
      continue
    parts = line.split()
    r = len(labels)
    labels.append(float(parts[0]))
    for item in parts[1:]:
      k, v = item.split(b":")
      if k == b"qid":
        continue
      rows.append(r)
      cols.append(int(k) - 1)
      vals.append(float(v))
  cols = np.asarray(cols, np.int64)
  d = num_features if num_features is not None else (
      int(cols.max()) + 1 if cols.size else 0)
  x = np.zeros((len(labels), d), dtype)
  keep = cols < d
  x[np.asarray(rows, np.int64)[keep], cols[keep]] = np.asarray(
      vals, np.float64)[keep]
  return x, np.asarray(labels, np.float32)


_LIBSVM_FILES = {
    # name: (offline file in the shared folder, LIBSVM download name,
    #        (rows, features) of the file, checked where no digest is known)
    "mushrooms": ("mushrooms.txt", "mushrooms", (8124, 112)),
    "ijcnn1": ("ijcnn1.trn.bz2", "ijcnn1.bz2", (49_990, 22)),
    "ijcnn1_test": ("ijcnn1.tst.bz2", "ijcnn1.t.bz2", (91_701, 22)),
    # LIBSVM's ijcnn1.tr, the 35,000 rows the sls code (and so the AALIG
    # paper) trains on; see load_libsvm_sls for the offline fallback.
    "ijcnn1_tr": ("ijcnn1.tr.bz2", "ijcnn1.tr.bz2", (35_000, 22)),
}


def _libsvm_path(name: str, data_dir=None) -> pathlib.Path:
  local, remote, shape = _LIBSVM_FILES[name]
  found = find_file((local, remote), data_dir)
  if found is not None:
    return found

  def check(path):
    # `path` is a temporary name: decompress by the real name's suffix.
    opener = bz2.open if remote.endswith(".bz2") else open
    with opener(path, "rb") as f:
      x, _ = load_svmlight(f.read())
    if x.shape != shape:
      raise ValueError(f"{x.shape[0]} x {x.shape[1]} svmlight data, "
                       f"expected {shape[0]} x {shape[1]}")

  return download.download(LIBSVM_URL + remote, cache_dir() / remote,
                           check=check)


def load_libsvm(name: str, data_dir=None, test_fraction: float = 0.2,
                seed: int = 9513451) -> ArrayDataset:
  """A LIBSVM binary classification set with labels in {0, 1}.

  As in Vaswani et al. (2019), the examples of the LIBSVM training file are
  split 80/20 into train and test at random.

  Args:
    name: ``"mushrooms"`` (8124 x 112, interpolating with an RBF kernel) or
      ``"ijcnn1"`` (49,990 x 22, not interpolating).
    data_dir: a folder to look in first; then ``$AALIG_DATA_DIR``, the
      shared offline copies, :func:`cache_dir`, then the LIBSVM site is
      downloaded from (verified, see :mod:`examples.common.download`).
    test_fraction: share of the examples held out.
    seed: seed of the split.

  Returns:
    An :class:`ArrayDataset` with float32 x and float32 y in {0, 1}.

  Raises:
    DataUnavailableError: the file is absent and cannot be downloaded, or
      fails verification.
  """
  if name not in ("mushrooms", "ijcnn1"):
    raise ValueError(f"unknown LIBSVM set {name!r}; use mushrooms or ijcnn1")
  x, y = load_svmlight(_libsvm_path(name, data_dir))
  y = (y == y.max()).astype(np.float32)  # {1,2} or {-1,1} -> {0,1}
  tr, te = train_test_split(len(y), test_fraction, seed)
  return ArrayDataset(x[tr], y[tr], x[te], y[te], 2, name)


def rbf_features(x: np.ndarray, centres: np.ndarray, sigma: float,
                 chunk: int = 4096) -> np.ndarray:
  """RBF kernel features exp(-||x - c||^2 / (2 sigma^2)) against `centres`.

  With every training point as a centre this is the kernel matrix of
  Vaswani et al. (2019); with a random subset of centres it is the Nystrom-
  style approximation that fits a small machine.

  Args:
    x: inputs [n, d].
    centres: [m, d].
    sigma: kernel width (0.5 for mushrooms, 0.05 for ijcnn1 in the paper).
    chunk: rows computed at a time, to bound memory.

  Returns:
    float32 [n, m].
  """
  x = np.asarray(x, np.float32)
  c = np.asarray(centres, np.float32)
  c_sq = np.sum(c * c, axis=1)
  out = np.empty((x.shape[0], c.shape[0]), np.float32)
  for s in range(0, x.shape[0], chunk):
    xb = x[s:s + chunk]
    d2 = np.sum(xb * xb, axis=1)[:, None] + c_sq[None, :] - 2.0 * xb @ c.T
    out[s:s + chunk] = np.exp(-np.maximum(d2, 0.0) / (2.0 * sigma ** 2))
  return out


# --------------------------------------------------------------------------
# The RBF-kernel problems exactly as the sls code builds them (AALIG Sec. 5.1).

# The rows of LIBSVM's ijcnn1.tr (the first part of the combined ijcnn1 file,
# see load_libsvm_sls).
IJCNN1_TR_ROWS = 35_000


def _ijcnn1_tr_path(data_dir=None) -> tuple[pathlib.Path, Optional[int]]:
  """ijcnn1.tr: (the file, how many of its first rows to keep or None).

  In order: ``ijcnn1.tr.bz2`` (or ``ijcnn1.tr``) in the user's folders or
  the offline copies, used whole; else the combined file (``ijcnn1.trn.bz2``
  or ``ijcnn1.bz2``, 49,990 rows) there, whose first 35,000 rows are taken;
  else LIBSVM's ``ijcnn1.tr.bz2`` is downloaded (its 35,000 x 22 shape is
  checked; no digest of the site's bytes is known offline).
  """
  found = find_file(("ijcnn1.tr.bz2", "ijcnn1.tr"), data_dir)
  if found is not None:
    return found, None
  found = find_file(("ijcnn1.trn.bz2", "ijcnn1.bz2"), data_dir)
  if found is not None:
    return found, IJCNN1_TR_ROWS
  return _libsvm_path("ijcnn1_tr", data_dir), None


def sls_labels(y: np.ndarray) -> np.ndarray:
  """The sls code's labels: the smaller of the two values 0, the larger 1.

  ``labels = np.unique(y); y[y == labels[0]] = 0; y[y == labels[1]] = 1``
  (mushrooms: 1/2, ijcnn1: -1/+1). Returns float32.
  """
  labels = np.unique(y)
  if len(labels) != 2:
    raise ValueError(f"expected two label values, got {labels.tolist()}")
  return (np.asarray(y) == labels[1]).astype(np.float32)


def load_libsvm_sls(name: str, data_dir=None) -> ArrayDataset:
  """A LIBSVM set as the sls code reads and splits it (unshuffled 80/20).

  Vaswani et al.'s code (github.com/IssamLaradji/sls, ``src/datasets.py``),
  which the AALIG paper reuses for its Sec. 5.1, does::

      X, y = load_svmlight_file("mushrooms" | "ijcnn1.tr.bz2")
      labels = np.unique(y); y[y == labels[0]] = 0; y[y == labels[1]] = 1
      X_train, X_val, y_train, y_val = train_test_split(
          X, y, test_size=0.2, shuffle=False, random_state=42)

  so the training set is the file's first 80% and the validation set its
  last 20%, in file order (``n_val = ceil(0.2 n)``): mushrooms 6,499 /
  1,625, ijcnn1.tr 28,000 / 7,000. The same data for every run.

  ijcnn1: the sls code reads LIBSVM's ``ijcnn1.tr`` (35,000 rows). Offline
  only the combined ``ijcnn1`` file (49,990 rows: ijcnn1.tr and then, we
  assume, ijcnn1.val's 14,990) may be at hand; its first 35,000 rows are
  then taken as ijcnn1.tr. That is an assumption (it matches the published
  sizes), not checked offline. With a network, and no local copy, LIBSVM's
  own ``ijcnn1.tr.bz2`` is downloaded.

  Args:
    name: ``"mushrooms"`` or ``"ijcnn1"``.
    data_dir: a folder to look in first (then as :func:`load_libsvm`).

  Returns:
    An :class:`ArrayDataset`: float64 x (``load_svmlight_file``'s dtype; the
    kernels are computed from it), float32 y in {0, 1}; ``x_test``/``y_test``
    are the validation set.
  """
  if name == "mushrooms":
    path, rows = _libsvm_path("mushrooms", data_dir), None
  elif name == "ijcnn1":
    path, rows = _ijcnn1_tr_path(data_dir)
  else:
    raise ValueError(f"unknown LIBSVM set {name!r}; use mushrooms or ijcnn1")
  x, y = load_svmlight(path, dtype=np.float64)
  if rows is not None:
    x, y = x[:rows], y[:rows]
  y = sls_labels(y)
  tr, va = sklearn_split(len(y), 0.2, 42, shuffle=False)
  return ArrayDataset(x[tr], y[tr], x[va], y[va], 2, name)


def rbf_kernel(a: np.ndarray, b: np.ndarray, sigma: float, *,
               same: bool = False, chunk: int = 1024) -> np.ndarray:
  """The exact RBF kernel exp(-||a_i - b_j||^2 / (2 sigma^2)), float32.

  As the sls code's ``rbf_kernel`` (scikit-learn's ``pairwise_distances``,
  squared): the squared distances ``|a|^2 + |b|^2 - 2 a.b`` in float64,
  clipped at 0, with an exact 0 on the diagonal when `a` is `b` (`same`),
  then the exponential, stored as float32 (``torch.FloatTensor``).

  Args:
    a: [n, d] rows (training or validation points).
    b: [m, d] the training points (every one a kernel centre).
    sigma: kernel width (mushrooms 0.5, ijcnn1 0.05).
    same: `a` and `b` are the same points (the training kernel).
    chunk: rows of `a` at a time (a chunk's float64 temporaries are about
      ``3 * chunk * m * 8`` bytes).

  Returns:
    float32 [n, m].
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if same and a.shape != b.shape:
    raise ValueError("same=True needs a and b of one shape")
  b_sq = np.einsum("ij,ij->i", b, b)
  out = np.empty((a.shape[0], b.shape[0]), np.float32)
  scale = -1.0 / (2.0 * sigma ** 2)
  for s in range(0, a.shape[0], chunk):
    ab = a[s:s + chunk]
    d2 = ab @ b.T
    d2 *= -2.0
    d2 += np.einsum("ij,ij->i", ab, ab)[:, None]
    d2 += b_sq[None, :]
    np.maximum(d2, 0.0, out=d2)
    if same:
      rows = np.arange(len(ab))
      d2[rows, s + rows] = 0.0
    d2 *= scale
    np.exp(d2, out=d2)
    out[s:s + chunk] = d2
  return out
