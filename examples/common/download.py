"""Verified downloads of the examples' data files, through pooch.

`pooch <https://www.fatiando.org/pooch>`_ does the downloading: it fetches a
file into a temporary name in its target folder, checks its SHA-256 against
the known one, renames it into place only when the check passes (so the
cache never holds a partial or altered file under the real name), retries a
failed attempt, and shows a progress bar. This module adds what is ours:

- the digests (:data:`KNOWN_SHA256`); where the digest of what a URL serves
  is not known, the caller's ``check`` of the content runs on the temporary
  file instead, and the file's digest is then recorded next to it, in
  ``<name>.sha256``, so that later changes to the cached copy are caught;
- a cached file is checked again before each use: a mismatch is reported
  (file, digest, expected) and the file deleted, then downloaded again;
- any failure raises :class:`DataUnavailableError`: one sentence naming the
  file, its URL, and how to provide it by hand (``$AALIG_DATA_DIR``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import pathlib
import sys
from typing import Callable, Optional

import pooch
import requests

__all__ = ["DataUnavailableError", "KNOWN_SHA256", "RETRIES", "download",
           "fetch", "sha256_file"]

# Further attempts after a failed download or a rejected file (pooch's
# retry_if_failed; it waits 1 s, 2 s, ... between them).
RETRIES = 2

# SHA-256 of the data files, by file name. None: no digest can be pinned for
# what the URL serves (see each comment); the content is checked instead.
KNOWN_SHA256: dict[str, Optional[str]] = {
    # The offline copies the project's CI reads through AALIG_DATA_DIR,
    # under these names. They come from other repositories (LIBSVM's sets
    # re-compressed, mushrooms with CRLF line ends), so only
    # tinyshakespeare.txt is known to be the file its URL serves (TFDS's
    # checksum of that URL is the same); a copy under one of these names
    # can be checked with `sha256sum` against these.
    "mushrooms.txt":
        "eb26424a54203ca9e8956ff3e5b10e613dfc3587f65d21bdbdbc28020fd995e0",
    "ijcnn1.trn.bz2":
        "b38a4198ce142d43e96fb86d17b87211feec1f909ac344fa057455c69de29de3",
    "ijcnn1.tst.bz2":
        "acd1db430684fdd3f0c768ecc49aa8e749d0004fc117611220c2aa576a7b6a24",
    "war-and-peace.txt":
        "3ed0f41cfdf660846878943bad5b9d575bcae1e4a92ee9a7f43d3c9dba2af344",
    "tinyshakespeare.txt":
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    # The LIBSVM site's files: the offline copies above are re-compressed /
    # re-line-ended copies from elsewhere, and no digest of the site's own
    # bytes is known offline; their svmlight shapes are checked instead.
    "mushrooms": None,
    "ijcnn1.bz2": None,
    "ijcnn1.t.bz2": None,
    # Project Gutenberg regenerates pg2600.txt (headers, line ends), so no
    # digest can be pinned; its length and title are checked instead.
    "pg2600.txt": None,
    # Zalando's Fashion-MNIST release files as its S3 bucket serves them:
    # TFDS 4.9's url_checksums/fashion_mnist.txt. (Debian's package holds
    # re-compressed copies with other digests: those are checked by their
    # decoded arrays, see images.load_fashion_mnist.)
    "train-images-idx3-ubyte.gz":
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz":
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz":
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz":
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}


class DataUnavailableError(RuntimeError):
  """A data file is missing, cannot be downloaded, or fails verification.

  The message is one sentence that says which file and how to provide it.

  Attributes:
    reason: the failure alone, without the advice (for callers that give
      their own), e.g. the network error or the digest mismatch.
  """

  def __init__(self, message: str, reason: Optional[str] = None):
    super().__init__(message)
    self.reason = reason or message


def _by_hand(name: str, url: str) -> str:
  return (f"download {url} by hand and put it, named {name}, in the folder "
          "named by the environment variable AALIG_DATA_DIR "
          "(export AALIG_DATA_DIR=/path/to/folder)")


def sha256_file(path) -> str:
  """The hex SHA-256 of the file at `path`, read in 1 MiB blocks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def fetch(url: str, path) -> None:
  """Writes the bytes at `url` to `path`: pooch's HTTP(S) downloader.

  The network, which the tests replace; a progress bar on a terminal when
  tqdm is installed.
  """
  progress = (importlib.util.find_spec("tqdm") is not None
              and sys.stderr.isatty())
  pooch.HTTPDownloader(progressbar=progress, timeout=60)(url, str(path),
                                                         None)


def _unreachable(name: str, url: str, e: Exception) -> DataUnavailableError:
  reason = getattr(e, "reason", None) or e  # urllib's errors have one.
  return DataUnavailableError(
      f"could not download {name} from {url} ({reason}): connect to the "
      f"internet and rerun, or {_by_hand(name, url)}.",
      reason=f"{name}: {reason}")


class _BadContent(ValueError):
  """The caller's ``check`` rejected a download (pooch retries a ValueError)."""


def _expected(path: pathlib.Path, sha256: Optional[str]) -> Optional[str]:
  """The digest `path` must have: pinned, else the one recorded with it."""
  if sha256 is None:
    sha256 = KNOWN_SHA256.get(path.name)
  if sha256 is None:
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.exists():
      sha256 = sidecar.read_text().split()[0]
  return sha256


def download(url: str, target, *, sha256: Optional[str] = None,
             check: Optional[Callable[[pathlib.Path], None]] = None
             ) -> pathlib.Path:
  """The verified file `target`, downloaded from `url` unless cached.

  Args:
    url: where the file comes from.
    target: its path in the cache; the download goes to a temporary name
      in the same folder and is renamed to `target` once verified.
    sha256: the expected digest; default ``KNOWN_SHA256[target.name]``.
    check: where no digest is known, a function of the downloaded file's
      path that raises ``ValueError`` (or ``OSError``) if its content is
      wrong; its digest is then recorded in ``<target>.sha256``.

  Returns:
    `target`, verified.

  Raises:
    DataUnavailableError: if the download fails or the file is rejected;
      nothing is left in the cache under `target`'s name.
  """
  target = pathlib.Path(target)
  name = target.name
  pinned = sha256 or KNOWN_SHA256.get(name)
  sidecar = target.with_name(name + ".sha256")
  if target.exists():
    expected = _expected(target, sha256)
    got = sha256_file(target)
    if got == expected:
      return target
    # Not ours to trust: a partial or altered file (or an unchecked one from
    # an older version of this code). Say so, drop it, download it again.
    why = (f"SHA-256 {got}, expected {expected}" if expected else
           f"SHA-256 {got} but no digest to check it against")
    print(f"Cached {target} is not the verified download ({why}); deleting "
          "it and downloading it again.", file=sys.stderr)
    target.unlink()
    sidecar.unlink(missing_ok=True)

  def downloader(u, tmp, _):
    # pooch's temporary file: nothing is renamed to `target` unless this
    # returns and the digest (if pinned) matches.
    fetch(u, tmp)  # pooch retries requests' errors, raises any other.
    if pinned is None and check is not None:
      try:
        check(pathlib.Path(tmp))
      except (ValueError, OSError, EOFError) as e:
        raise _BadContent(str(e)) from e

  files = pooch.create(path=target.parent, base_url="",
                       registry={name: pinned}, urls={name: url},
                       retry_if_failed=RETRIES)
  try:
    files.fetch(name, downloader=downloader)
  except _BadContent as e:
    raise DataUnavailableError(
        f"the download of {name} from {url} is not the expected file "
        f"({e}), so it was discarded: rerun to try again, or "
        f"{_by_hand(name, url)}.", reason=f"{name}: {e}") from e
  except ValueError as e:
    if isinstance(e, requests.RequestException):  # e.g. InvalidURL
      raise _unreachable(name, url, e) from e
    # pooch: the digest is not the pinned one.
    raise DataUnavailableError(
        f"the download of {name} from {url} does not have SHA-256 {pinned} "
        f"({e}), an incomplete or altered file, so it was discarded: rerun "
        f"to try again, or {_by_hand(name, url)}.",
        reason=f"{name}: {e}") from e
  except Exception as e:  # The network's, once pooch's retries are spent.
    raise _unreachable(name, url, e) from e
  if pinned is None:
    # Trust on first use: later changes to the cached copy are caught.
    sidecar.write_text(f"{sha256_file(target)}  {name}\n")
  return target
