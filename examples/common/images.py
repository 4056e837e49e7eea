"""Image data sets: Fashion-MNIST from its IDX files, others through TFDS.

Fashion-MNIST's four IDX files come from ``$AALIG_DATA_DIR``, Debian's
``dataset-fashion-mnist`` package, the cache, else a verified download;
any other image set is read with ``tfds.data_source`` (ArrayRecord, no
TensorFlow needed). The position of an image in its split is its dataset
index (see :mod:`examples.common.data`).
"""

from __future__ import annotations

import gzip
import pathlib
from typing import Optional

import numpy as np

from examples.common import download
from examples.common.data import ArrayDataset
from examples.common.data import cache_dir
from examples.common.data import user_dirs
from examples.common.download import DataUnavailableError

__all__ = ["FASHION_MNIST_DIR", "FASHION_MNIST_FILES", "FASHION_MNIST_URL",
           "load_fashion_mnist", "load_image_dataset", "load_tfds_images"]

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
  user = user_dirs()
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
