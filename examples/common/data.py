"""Data sets for the AALIG examples and benchmarks, as in-memory numpy arrays.

Every loader returns plain numpy arrays (or a small dataclass of them): the
position of an example in its training array is its dataset index, the integer
AALIG keys its approximate optimal value (AOV) on. Batches are drawn with
:func:`epoch_batches`, which shuffles positions, not data, so an example's
index is the same in every epoch whatever the shuffling or augmentation.

Files are looked for in ``$AALIG_DATA_DIR`` first (files you provide, used
as they are), then in ``../shared/data/`` relative to the project root (the
offline copies, checked against their SHA-256), then in :func:`cache_dir`;
otherwise they are downloaded into the cache with
:mod:`examples.common.download`, which verifies every file before it is
used. Fashion-MNIST is also read from Debian's ``dataset-fashion-mnist``
package; other image sets come from tensorflow-datasets
(``tfds.data_source``, no TensorFlow needed). A file that cannot be found or
verified raises :class:`DataUnavailableError`, one sentence saying how to
provide it.

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
    "TextData",
    "cache_dir",
    "epoch_batches",
    "load_fashion_mnist",
    "load_libsvm",
    "load_matrix_factorisation",
    "load_svmlight",
    "load_text",
    "load_tfds_images",
    "load_image_dataset",
    "rbf_features",
    "shared_data_dir",
    "train_test_split",
]

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]
# The offline copies (read-only, never copied into the project).
SHARED_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"
FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
# Zalando's release files, the URL torchvision and TFDS download them from
# (the digests in download.KNOWN_SHA256 are TFDS's for this URL).
FASHION_MNIST_URL = ("http://fashion-mnist.s3-website.eu-central-1"
                     ".amazonaws.com/")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz",
                       "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz",
                       "t10k-labels-idx1-ubyte.gz")
# Images per split of the real data set, checked on the default path.
FASHION_MNIST_SIZES = {"train": 60_000, "t10k": 10_000}
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


def _user_dirs(data_dir=None) -> list[pathlib.Path]:
  """Folders of files the user provides: `data_dir`, ``$AALIG_DATA_DIR``."""
  env = os.environ.get("AALIG_DATA_DIR")
  return [pathlib.Path(d) for d in (data_dir, env) if d]


def _find(names, data_dir=None) -> Optional[pathlib.Path]:
  """The first of `names` in the user's folders, else in the shared folder.

  A user's file is used as it is (their choice, e.g. a variant of the data);
  a shared offline copy must have its known digest.
  """
  for folder in _user_dirs(data_dir):
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
  """A seeded random split of ``range(n)`` into sorted train and test positions."""
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


def load_matrix_factorisation(seed: int = 0, num_examples: int = 1000,
                              in_dim: int = 6, out_dim: int = 10,
                              condition: float = 1e-10,
                              num_train: int = 800) -> ArrayDataset:
  """The synthetic matrix factorisation problem of Vaswani et al. (2019).

  x ~ N(0, I) in R^6 and y = A x with A in R^{10x6}: the rows of a uniform
  random matrix (``rand(10, 6)``) scaled by ``linspace(1, 1e-10, 10)``, so
  that A is very ill-conditioned and low-rank factorisations cannot fit it
  exactly (no interpolation for ranks 1 and 4).

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


def load_svmlight(source, num_features: Optional[int] = None
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Parses an svmlight/LIBSVM text file into dense arrays.

  A small dense parser (the LIBSVM binary sets used here have at most a few
  hundred features), so the examples need no scikit-learn.

  Args:
    source: a path (``.bz2`` and ``.gz`` are decompressed) or bytes.
    num_features: width of the dense matrix; default the largest feature id.

  Returns:
    ``(x float32 [n, d], y float32 [n])``; feature ids are 1-based in the
    file and column ``id - 1`` in `x`.
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
  x = np.zeros((len(labels), d), np.float32)
  keep = cols < d
  x[np.asarray(rows, np.int64)[keep], cols[keep]] = np.asarray(
      vals, np.float32)[keep]
  return x, np.asarray(labels, np.float32)


_LIBSVM_FILES = {
    # name: (offline file in the shared folder, LIBSVM download name,
    #        (rows, features) of the file, checked where no digest is known)
    "mushrooms": ("mushrooms.txt", "mushrooms", (8124, 112)),
    "ijcnn1": ("ijcnn1.trn.bz2", "ijcnn1.bz2", (49_990, 22)),
    "ijcnn1_test": ("ijcnn1.tst.bz2", "ijcnn1.t.bz2", (91_701, 22)),
}


def _libsvm_path(name: str, data_dir=None) -> pathlib.Path:
  local, remote, shape = _LIBSVM_FILES[name]
  found = _find((local, remote), data_dir)
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
# Images.


def _read_idx(path: pathlib.Path) -> np.ndarray:
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(
        tuple(int(d) for d in dims))
  except (OSError, EOFError, ValueError, IndexError) as e:  # Truncated, ...
    raise DataUnavailableError(
        f"{path} is not a complete IDX .gz file ({e}): replace it with the "
        "release file.") from e


def _fashion_mnist_folder() -> pathlib.Path:
  """The folder of the four Fashion-MNIST files, downloading if need be.

  Looks in ``$AALIG_DATA_DIR``, Debian's folder and the cache, in this
  order, for a folder holding all four; else downloads them into
  ``<cache>/fashion_mnist``, each verified against its SHA-256.
  """
  user = _user_dirs()
  for folder in user + [FASHION_MNIST_DIR]:
    if all((folder / f).is_file() for f in FASHION_MNIST_FILES):
      return folder
  folder = cache_dir() / "fashion_mnist"
  try:
    for f in FASHION_MNIST_FILES:
      download.download(FASHION_MNIST_URL + f, folder / f)
  except DataUnavailableError as e:
    where = (f"the folder named by AALIG_DATA_DIR ({user[0]})" if user
             else "a folder named by the environment variable "
             "AALIG_DATA_DIR")
    raise DataUnavailableError(
        "Fashion-MNIST is not on this machine and could not be downloaded "
        f"({e.reason}): install Debian's package (`apt-get install "
        f"dataset-fashion-mnist`, files in {FASHION_MNIST_DIR}), or put "
        f"{', '.join(FASHION_MNIST_FILES)} in {where}, or rerun with a "
        f"network connection to download them from {FASHION_MNIST_URL}"
        ) from e
  return folder


def _check_fashion_mnist(data: ArrayDataset, folder: pathlib.Path,
                         sizes: Optional[dict]) -> None:
  """Rejects arrays that are not Fashion-MNIST's (wrong files, truncation)."""
  for split, x, y in (("train", data.x_train, data.y_train),
                      ("t10k", data.x_test, data.y_test)):
    n = sizes[split] if sizes else len(y)
    if x.shape != (n, 28, 28, 1) or y.shape != (n,):
      raise DataUnavailableError(
          f"the Fashion-MNIST {split} files in {folder} hold images "
          f"{x.shape[:3]} and labels {y.shape}, expected ({n}, 28, 28) and "
          f"({n},): replace them with the release files.")
    if y.size and (y.min() < 0 or y.max() > 9):
      raise DataUnavailableError(
          f"the Fashion-MNIST {split} labels in {folder} range over "
          f"[{y.min()}, {y.max()}], expected [0, 9]: replace them with the "
          "release files.")


def load_fashion_mnist(data_dir=None) -> ArrayDataset:
  """Fashion-MNIST from its four IDX ``.gz`` files.

  Where the files come from, the first that has all four:
  `data_dir` if given (only there); ``$AALIG_DATA_DIR``; Debian's
  ``/usr/share/datasets/fashion-mnist`` (``apt-get install
  dataset-fashion-mnist``); the cache; else Zalando's release files are
  downloaded into the cache, each checked against its SHA-256. Debian's
  files are re-compressed (other digests than the release's), so files
  found in a folder are checked by their decoded arrays instead: 60,000 /
  10,000 images of 28 x 28 with labels in [0, 9].

  Args:
    data_dir: a folder with ``train-images-idx3-ubyte.gz``,
      ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz`` and
      ``t10k-labels-idx1-ubyte.gz`` (any number of images, e.g. a subset).

  Returns:
    An :class:`ArrayDataset`: uint8 images [n, 28, 28, 1], int32 labels;
    60,000 train and 10,000 test.

  Raises:
    FileNotFoundError: if `data_dir` is given and lacks a file.
    DataUnavailableError: if no folder has the files and they cannot be
      downloaded (one sentence naming the fixes), or they are not
      Fashion-MNIST's.
  """
  if data_dir:
    folder = pathlib.Path(data_dir)
    for f in FASHION_MNIST_FILES:
      if not (folder / f).exists():
        raise FileNotFoundError(f"{folder / f} not found")
  else:
    folder = _fashion_mnist_folder()
  arrays = [_read_idx(folder / f) for f in FASHION_MNIST_FILES]
  data = ArrayDataset(arrays[0][..., None], arrays[1].astype(np.int32),
                      arrays[2][..., None], arrays[3].astype(np.int32), 10,
                      "fashion_mnist")
  _check_fashion_mnist(data, folder, None if data_dir else FASHION_MNIST_SIZES)
  return data


def _tfds_split_arrays(source, max_examples=None):
  n = len(source) if max_examples is None else min(len(source), max_examples)
  # Random access by position: the position is the dataset index.
  try:
    records = source.__getitems__(list(range(n)))  # Batched read.
  except (AttributeError, TypeError):  # Mocked sources lack it.
    records = [source[i] for i in range(n)]
  images = np.stack([np.asarray(r["image"]) for r in records])
  labels = np.asarray([int(r["label"]) for r in records], np.int32)
  return images, labels


def load_tfds_images(name: str, train_split: str = "train",
                     test_split: str = "test", data_dir=None,
                     max_train: Optional[int] = None,
                     max_test: Optional[int] = None,
                     download: bool = False) -> ArrayDataset:
  """An image classification set from tensorflow-datasets, without TensorFlow.

  Reads with ``tfds.data_source`` (ArrayRecord random access). The dataset
  index of an example is its position in the split, so it is unique and
  stable whatever order batches are later drawn in.

  Args:
    name: a TFDS name with ``image`` and ``label`` features (``cifar10``,
      ``cifar100``, ``svhn_cropped``, ``fashion_mnist``, ...).
    train_split, test_split: TFDS split names.
    data_dir: TFDS data folder (default TFDS's).
    max_train, max_test: keep only the first examples (for quick runs).
    download: build the data set if it is not prepared (needs a network).

  Returns:
    An :class:`ArrayDataset`: uint8 images [n, h, w, c], int32 labels.

  Raises:
    DataUnavailableError: the data set is not prepared (and `download` is
      off), or preparing it failed; one sentence saying what to run.
  """
  try:
    import tensorflow_datasets as tfds  # Optional dependency.
  except ImportError as e:
    raise DataUnavailableError(
        f"reading {name} needs tensorflow-datasets: `pip install "
        "tensorflow-datasets`.") from e

  builder = tfds.builder(name, data_dir=data_dir,
                         file_format="array_record")
  folder = data_dir or ("the TFDS data folder ($TFDS_DATA_DIR or "
                        "~/tensorflow_datasets)")
  if download:
    try:
      builder.download_and_prepare()
    except Exception as e:  # No TensorFlow, no network, a bad archive, ...
      raise DataUnavailableError(
          f"TFDS could not prepare {name} ({type(e).__name__}: {e}): "
          "preparing needs `pip install tensorflow` and a network "
          f"connection, or run `tfds build {name}` on a machine that has "
          f"them and copy the result into {folder}.") from e
  try:
    train = tfds.data_source(name, split=train_split, data_dir=data_dir,
                             download=download)
    test = tfds.data_source(name, split=test_split, data_dir=data_dir,
                            download=download)
  except Exception as e:
    if builder.is_prepared():
      raise
    # Unprepared, TFDS fails deep inside (KeyError "`splits` is empty",
    # NotImplementedError on a new data_dir, ...): say what to run instead.
    raise DataUnavailableError(
        f"the TFDS data set {name} is not prepared in {folder}: rerun with "
        "--download (download=True), which needs `pip install tensorflow` "
        f"and a network connection, or run `tfds build {name}` on such a "
        "machine and copy the result there.") from e
  x_tr, y_tr = _tfds_split_arrays(train, max_train)
  x_te, y_te = _tfds_split_arrays(test, max_test)
  num_classes = builder.info.features["label"].num_classes
  return ArrayDataset(x_tr, y_tr, x_te, y_te, int(num_classes), name)


def load_image_dataset(name: str, source: str = "auto",
                       **kwargs) -> ArrayDataset:
  """An image classification set: Fashion-MNIST's files, or TFDS.

  Args:
    name: ``"fashion_mnist"`` or any TFDS image classification name.
    source: ``"auto"``: Fashion-MNIST from its IDX files (see
      :func:`load_fashion_mnist`: ``$AALIG_DATA_DIR``, Debian's package, the
      cache, else a verified download; no TensorFlow needed), any other
      name from TFDS; ``"tfds"``: TFDS whatever the name.
    **kwargs: passed to :func:`load_tfds_images` (for Fashion-MNIST's
      files, only ``max_train`` and ``max_test`` apply).

  Returns:
    An :class:`ArrayDataset` of uint8 images and int32 labels.

  Raises:
    DataUnavailableError: the data are not available (one sentence naming
      the fixes).
  """
  if source not in ("auto", "tfds"):
    raise ValueError(f"source must be 'auto' or 'tfds', not {source!r}")
  if name == "fashion_mnist" and source == "auto":
    data = load_fashion_mnist()
    mt, me = kwargs.get("max_train"), kwargs.get("max_test")
    if mt:
      data.x_train, data.y_train = data.x_train[:mt], data.y_train[:mt]
    if me:
      data.x_test, data.y_test = data.x_test[:me], data.y_test[:me]
    return data
  return load_tfds_images(name, **kwargs)


# --------------------------------------------------------------------------
# Text (character-level language modelling).


@dataclasses.dataclass
class TextData:
  """A character-level corpus, encoded.

  Attributes:
    train, test: int32 character ids.
    vocab: the characters, id i is ``vocab[i]``.
    name: a short name.
  """

  train: np.ndarray
  test: np.ndarray
  vocab: list
  name: str = ""

  def sequences(self, split: str, seq_len: int) -> np.ndarray:
    """Non-overlapping windows of ``seq_len + 1`` ids: [num_sequences, L+1].

    Sequence i is example i: inputs ``[:, :-1]`` and targets ``[:, 1:]``.
    """
    ids = self.train if split == "train" else self.test
    n = (len(ids) - 1) // seq_len
    starts = np.arange(n) * seq_len
    return ids[starts[:, None] + np.arange(seq_len + 1)[None, :]]


_TEXT_FILES = {
    # name: (offline file name, download name in the cache, URL). Gutenberg's
    # file differs from the shared copy (no pinned digest), so it is cached
    # under its own name; karpathy's file is the shared copy, same digest.
    "tolstoi": ("war-and-peace.txt", "pg2600.txt",
                "https://www.gutenberg.org/cache/epub/2600/pg2600.txt"),
    "tiny_shakespeare": ("tinyshakespeare.txt", "tinyshakespeare.txt",
                         "https://raw.githubusercontent.com/karpathy/"
                         "char-rnn/master/data/tinyshakespeare/input.txt"),
}


def _check_war_and_peace(path) -> None:
  # Without a digest: the whole novel (~3.2 million characters) or nothing.
  text = pathlib.Path(path).read_text(encoding="utf-8")
  if len(text) < 3_000_000 or "war and peace" not in text[:5000].lower():
    raise ValueError(f"{len(text)} characters, expected the ~3.2 million "
                     "of War and Peace")


def _text_path(name: str, data_dir=None) -> pathlib.Path:
  local, remote, url = _TEXT_FILES[name]
  found = _find((local, remote), data_dir)
  if found is not None:
    return found
  check = _check_war_and_peace if name == "tolstoi" else None
  return download.download(url, cache_dir() / remote, check=check)


def load_text(name: str = "tolstoi", data_dir=None,
              test_fraction: float = 0.2,
              max_chars: Optional[int] = None) -> TextData:
  """War and Peace (DeepOBS's ``tolstoi``) or Tiny Shakespeare, char-encoded.

  As DeepOBS does for Tolstoi, the vocabulary is that of the whole text and
  the last 20% of the characters are the test set. (DeepOBS's own copy of
  the text gives 2,612,948 / 653,237 characters and 83 symbols; the
  Project Gutenberg file shipped offline differs slightly in its header
  and symbols.)

  Args:
    name: ``"tolstoi"`` or ``"tiny_shakespeare"``.
    data_dir: a folder to look in first for ``war-and-peace.txt`` /
      ``tinyshakespeare.txt``; then ``$AALIG_DATA_DIR``, the shared offline
      copies, :func:`cache_dir`, then the text is downloaded (Project
      Gutenberg #2600 as ``pg2600.txt`` / karpathy/char-rnn) into the
      cache, verified (see :mod:`examples.common.download`).
    test_fraction: share of the text at its end held out.
    max_chars: keep only the first characters of the text (quick runs).

  Returns:
    A :class:`TextData`.

  Raises:
    DataUnavailableError: the text is absent and cannot be downloaded, or
      fails verification.
  """
  text = _text_path(name, data_dir).read_text(encoding="utf-8")
  if max_chars:
    text = text[:max_chars]
  vocab = sorted(set(text))
  table = {c: i for i, c in enumerate(vocab)}
  ids = np.fromiter((table[c] for c in text), np.int32, len(text))
  split = int(len(ids) * (1 - test_fraction))
  return TextData(ids[:split], ids[split:], vocab, name)
