"""LIBSVM data for the RBF-kernel examples: files, loaders, exact kernels.

The LIBSVM binary sets (mushrooms, ijcnn1) as a
`data.ArrayDataset`, read either with a seeded shuffle split
(:func:`load_libsvm`) or exactly as Vaswani et al.'s code reads them
(:func:`load_libsvm_sls`), and the RBF kernel matrices built from them.
Files are found as :mod:`examples.common.data` finds them.

References:
  Vaswani et al., "Painless Stochastic Gradient" (2019), the RBF-kernel
  problems; Paren, Poudel, Kumar, "Faking Interpolation Until You Make It",
  Sec. 5.1.
"""

from __future__ import annotations

import bz2
import io
import pathlib
from typing import Optional

import numpy as np
from sklearn import datasets
from sklearn import model_selection

from examples.common import data
from examples.common import download

__all__ = [
    "IJCNN1_TR_ROWS",
    "load_libsvm",
    "load_libsvm_sls",
    "load_svmlight",
    "rbf_features",
    "rbf_kernel",
    "sls_labels",
]

LIBSVM_URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/"


def load_svmlight(source, num_features: Optional[int] = None,
                  dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
  """An svmlight/LIBSVM file as dense arrays: scikit-learn's reader.

  ``sklearn.datasets.load_svmlight_file``, densified (the LIBSVM binary sets
  used here have at most a few hundred features).

  Args:
    source: a path (``.bz2`` and ``.gz`` are decompressed) or bytes.
    num_features: width of the dense matrix (at least the largest feature
      id); default the largest feature id.
    dtype: of `x` (float64 is scikit-learn's default, which the exact RBF
      kernels are computed from).

  Returns:
    ``(x [n, d], y float32 [n])``; feature ids are 1-based in the file and
    column ``id - 1`` in `x`.
  """
  if isinstance(source, (bytes, bytearray)):
    source = io.BytesIO(bytes(source))
  else:
    source = str(source)
  x, y = datasets.load_svmlight_file(source, n_features=num_features,
                                     dtype=dtype)
  return x.toarray(), np.asarray(y, np.float32)


_LIBSVM_FILES = {
    # name: (name of the offline copy, LIBSVM download name,
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
  found = data.find_file((local, remote), data_dir)
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

  return download.download(LIBSVM_URL + remote, data.cache_dir() / remote,
                           check=check)


def load_libsvm(name: str, data_dir=None, test_fraction: float = 0.2,
                seed: int = 9513451) -> data.ArrayDataset:
  """A LIBSVM binary classification set with labels in {0, 1}.

  As in Vaswani et al. (2019), the examples of the LIBSVM training file are
  split 80/20 into train and test at random.

  Args:
    name: ``"mushrooms"`` (8124 x 112, interpolating with an RBF kernel) or
      ``"ijcnn1"`` (49,990 x 22, not interpolating).
    data_dir: a folder to look in first; then ``$AALIG_DATA_DIR``,
      `data.cache_dir`, then the LIBSVM site is downloaded from
      (verified, see :mod:`examples.common.download`).
    test_fraction: share of the examples held out.
    seed: seed of the split.

  Returns:
    A `data.ArrayDataset` with float32 x and float32 y in {0, 1}.

  Raises:
    DataUnavailableError: the file is absent and cannot be downloaded, or
      fails verification.
  """
  if name not in ("mushrooms", "ijcnn1"):
    raise ValueError(f"unknown LIBSVM set {name!r}; use mushrooms or ijcnn1")
  x, y = load_svmlight(_libsvm_path(name, data_dir))
  y = (y == y.max()).astype(np.float32)  # {1,2} or {-1,1} -> {0,1}
  tr, te = data.train_test_split(len(y), test_fraction, seed)
  return data.ArrayDataset(x[tr], y[tr], x[te], y[te], 2, name)


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

  In order: ``ijcnn1.tr.bz2`` (or ``ijcnn1.tr``) in the user's folders,
  used whole; else the combined file (``ijcnn1.trn.bz2``
  or ``ijcnn1.bz2``, 49,990 rows) there, whose first 35,000 rows are taken;
  else LIBSVM's ``ijcnn1.tr.bz2`` is downloaded (its 35,000 x 22 shape is
  checked; no digest of the site's bytes is known offline).
  """
  found = data.find_file(("ijcnn1.tr.bz2", "ijcnn1.tr"), data_dir)
  if found is not None:
    return found, None
  found = data.find_file(("ijcnn1.trn.bz2", "ijcnn1.bz2"), data_dir)
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


def load_libsvm_sls(name: str, data_dir=None) -> data.ArrayDataset:
  """A LIBSVM set as the sls code reads and splits it (unshuffled 80/20).

  Vaswani et al.'s code (github.com/IssamLaradji/sls, ``src/datasets.py``),
  which the AALIG paper reuses for its Sec. 5.1, does::

      X, y = load_svmlight_file("mushrooms" | "ijcnn1.tr.bz2")
      labels = np.unique(y); y[y == labels[0]] = 0; y[y == labels[1]] = 1
      X_train, X_val, y_train, y_val = data.train_test_split(
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
    A `data.ArrayDataset`: float64 x (``load_svmlight_file``'s dtype; the
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
  tr, va = model_selection.train_test_split(
      np.arange(len(y)), test_size=0.2, shuffle=False, random_state=42)
  return data.ArrayDataset(x[tr], y[tr], x[va], y[va], 2, name)


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
