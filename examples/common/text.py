"""Text for character-level language modelling: War and Peace, Tiny Shakespeare.

The vocabulary is the whole text's; the last 20% is the test set (DeepOBS's
split); sequences of ``seq_len + 1`` characters are the examples.

References:
  Schneider et al., "DeepOBS" (2019), the Tolstoi task.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional

import numpy as np

from examples.common import download
from examples.common.data import cache_dir
from examples.common.data import find_file

__all__ = ["TextData", "load_text"]



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
    # file differs from the offline copy war-and-peace.txt (no pinned
    # digest), so it is cached under its own name; karpathy's file is the
    # offline copy tinyshakespeare.txt, same digest.
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
  found = find_file((local, remote), data_dir)
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
      ``tinyshakespeare.txt``; then ``$AALIG_DATA_DIR``,
      :func:`cache_dir`, then the text is downloaded (Project
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
