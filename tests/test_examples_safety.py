"""The examples keep a user's work and data safe (reliability items 11, 13, 14).

- A rerun never deletes a previous run: it refuses unless ``--resume`` or
  ``--overwrite`` says what to do.
- Downloads are verified (SHA-256, or the content where no digest is known),
  land in the cache only under a temporary name until verified, and a
  corrupt cached file is caught; every failure names the file, its URL and
  ``AALIG_DATA_DIR``.
- The image examples' default data set (Fashion-MNIST) comes from
  ``AALIG_DATA_DIR``, Debian's package, the cache or a verified download,
  and otherwise fails with one sentence that names the fixes.

Everything runs offline: the network is the monkeypatched
``download.fetch``, or pooch's real downloader against a server on
localhost; ``$AALIG_DATA_DIR``, Debian's folder and the cache are temporary
folders.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import os
import pathlib
import threading
import urllib.error

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("orbax.checkpoint")

from examples.common import libsvm  # noqa: E402
from examples.common import download  # noqa: E402
from examples.common import images  # noqa: E402
from examples.common import loop  # noqa: E402
from examples.common import optimizers  # noqa: E402
from examples.common import text as text_lib  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "error::examples.common.loop.RecompileWarning")

ALL_EXAMPLES = ("matrix_factorisation", "rbf_kernel", "image_classification",
                "char_rnn", "linen_mlp")


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _snapshot(folder: pathlib.Path) -> dict:
  """Every file under `folder` with its bytes."""
  return {str(p.relative_to(folder)): p.read_bytes()
          for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def offline(tmp_path, monkeypatch):
  """No network, no Debian files, no retries; empty data and cache dirs.

  Returns:
    ``(data_dir, cache, calls)``: ``$AALIG_DATA_DIR``, ``$AALIG_CACHE_DIR``
    and the list of URLs the code tried to fetch.
  """
  data_dir, cache = tmp_path / "data", tmp_path / "cache"
  data_dir.mkdir()
  monkeypatch.setenv("AALIG_DATA_DIR", str(data_dir))
  monkeypatch.setenv("AALIG_CACHE_DIR", str(cache))
  monkeypatch.setattr(download, "RETRIES", 0)  # pooch's waits between tries.
  monkeypatch.setattr(images, "FASHION_MNIST_DIR", tmp_path / "no_debian")
  calls = []

  def no_network(url, path):
    calls.append(url)
    raise urllib.error.URLError("[Errno -3] Temporary failure in name "
                                "resolution")

  monkeypatch.setattr(download, "fetch", no_network)
  return data_dir, cache, calls


def _serve(monkeypatch, files: dict, calls: list = None):
  """Makes ``download.fetch`` serve `files` ({url suffix: bytes})."""
  def fetch(url, path):
    if calls is not None:
      calls.append(url)
    for suffix, data in files.items():
      if url.endswith(suffix):
        pathlib.Path(path).write_bytes(data)
        return
    raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
  monkeypatch.setattr(download, "fetch", fetch)


# --------------------------------------------------------------------------
# Item 11: a rerun never deletes a previous run.


def _mf(workdir, *flags):
  from examples import matrix_factorisation
  return matrix_factorisation.main([
      "--problems", "rank4", "--optimisers", "sgd", "--epochs", "2",
      "--workdir", str(workdir), "--quiet", *flags])


def test_rerun_refuses_keeps_files_overwrite_replaces_resume_continues(
    tmp_path):
  out = tmp_path / "runs"
  _mf(out)
  run = out / "rank4" / "sgd_seed0"
  assert sorted(p.name for p in (run / "ckpt").iterdir()) == [
      "epoch_00000", "epoch_00001"]
  before = _snapshot(out)

  with pytest.raises(SystemExit) as err:
    _mf(out)
  msg = str(err.value.code)
  assert "rank4/sgd_seed0/ckpt" in msg
  for hint in ("--resume", "--overwrite", "--workdir"):
    assert hint in msg
  assert msg.count(". ") == 0  # One sentence.
  assert _snapshot(out) == before  # Nothing deleted or rewritten.

  # --resume: the checkpointed run is complete, so its history is restored
  # as it was (same per-epoch timings) and nothing is retrained.
  _mf(out, "--resume")
  assert (run / "metrics.json").read_bytes() == before[
      "rank4/sgd_seed0/metrics.json"]

  # --overwrite: the run is trained afresh and its checkpoints replaced.
  (run / "ckpt" / "stale-marker").write_text("from the previous run")
  _mf(out, "--overwrite")
  assert sorted(p.name for p in (run / "ckpt").iterdir()) == [
      "epoch_00000", "epoch_00001"]
  old = json.loads(before["rank4/sgd_seed0/metrics.json"])
  new = json.loads((run / "metrics.json").read_text())
  assert [r["seconds"] for r in new] != [r["seconds"] for r in old]


def test_resume_and_overwrite_are_exclusive(tmp_path):
  with pytest.raises(SystemExit):
    _mf(tmp_path, "--resume", "--overwrite")


@pytest.mark.parametrize("example", ALL_EXAMPLES)
def test_every_example_refuses_before_loading_data(example, tmp_path,
                                                   offline, capsys):
  import importlib
  module = importlib.import_module(f"examples.{example}")
  previous = tmp_path / "runs" / "some_run" / "ckpt" / "3"
  previous.mkdir(parents=True)
  (previous / "state").write_text("a checkpoint")
  with pytest.raises(SystemExit) as err:
    module.main(["--workdir", str(tmp_path / "runs")])
  assert "--overwrite" in str(err.value.code)
  assert (previous / "state").read_text() == "a checkpoint"
  _, _, calls = offline
  assert not calls  # Refused before any data was looked for.
  with pytest.raises(SystemExit):
    module.main(["--help"])
  assert "--overwrite" in capsys.readouterr().out


def test_fit_refuses_to_replace_checkpoints_unless_overwrite(tmp_path):
  import jax.numpy as jnp

  def step(state, data, idx, mask):
    new = {"w": state["w"] + jnp.mean(data["x"][idx])}
    return new, dict(loss=jnp.sum(new["w"]), step_size=jnp.float32(0.1),
                     count=jnp.sum(mask, dtype=jnp.float32))

  ctx = optimizers.RunContext.create(8, 4, 1)
  run = loop.Run(tmp_path, seed=0, verbose=False)
  data = {"x": jnp.ones((8, 2))}
  loop.fit({"w": jnp.zeros(2)}, step, data, ctx, run)
  before = _snapshot(tmp_path)
  with pytest.raises(FileExistsError, match="--overwrite"):
    loop.fit({"w": jnp.zeros(2)}, step, data, ctx, run)
  assert _snapshot(tmp_path) == before
  loop.fit({"w": jnp.zeros(2)}, step, data, ctx,
           loop.Run(tmp_path, seed=0, overwrite=True, verbose=False))


# --------------------------------------------------------------------------
# Item 13: downloads are verified.

FAKE_MUSHROOMS = b"1 1:1 3:1\n2 2:1\n1 1:1 2:1\n2 3:1\n1 1:1\n"


def test_repo_digests_match_the_offline_copies():
  sums = pathlib.Path(os.environ.get("AALIG_DATA_DIR") or "/nonexistent"
                      ) / "SHA256SUMS"
  if not sums.exists():
    pytest.skip("no offline copies (with SHA256SUMS) in $AALIG_DATA_DIR")
  for line in sums.read_text().splitlines():
    digest, name = line.split()
    assert download.KNOWN_SHA256[name] == digest, name


def test_readme_lists_the_offline_copies_digests():
  # examples/README.md tells users the digests of the offline copies; they
  # must be the ones the code knows.
  import re
  readme = (pathlib.Path(__file__).resolve().parents[1] / "examples"
            / "README.md").read_text()
  rows = dict(re.findall(r"\| `([^`]+)` \|[^|]*\| `([0-9a-f]{64})` \|",
                         readme))
  pinned = {name: digest for name, digest in download.KNOWN_SHA256.items()
            if digest and not name.endswith("-ubyte.gz")}
  assert rows == pinned


def test_network_failure_names_file_url_and_data_dir(offline):
  data_dir, cache, calls = offline
  with pytest.raises(download.DataUnavailableError) as err:
    libsvm.load_libsvm("mushrooms")
  msg = str(err.value)
  url = libsvm.LIBSVM_URL + "mushrooms"
  assert calls == [url]
  assert url in msg and "AALIG_DATA_DIR" in msg and "mushrooms" in msg
  assert "Temporary failure in name resolution" in msg
  assert not cache.exists() or not any(cache.iterdir())
  with pytest.raises(download.DataUnavailableError, match="AALIG_DATA_DIR"):
    text_lib.load_text("tiny_shakespeare")


def test_truncated_download_is_rejected_and_nothing_cached(offline,
                                                           monkeypatch):
  _, cache, _ = offline
  monkeypatch.setitem(download.KNOWN_SHA256, "mushrooms",
                      _sha(FAKE_MUSHROOMS))
  _serve(monkeypatch, {"/mushrooms": FAKE_MUSHROOMS[:-7]})  # Truncated.
  with pytest.raises(download.DataUnavailableError) as err:
    libsvm.load_libsvm("mushrooms")
  msg = str(err.value)
  assert _sha(FAKE_MUSHROOMS[:-7]) in msg and _sha(FAKE_MUSHROOMS) in msg
  assert "AALIG_DATA_DIR" in msg
  assert not cache.exists() or list(cache.iterdir()) == []


def test_unpinned_download_is_checked_by_content(offline, monkeypatch):
  _, cache, _ = offline
  # No digest is known for LIBSVM's own file: its shape is checked instead.
  assert download.KNOWN_SHA256.get("mushrooms") is None
  _serve(monkeypatch, {"/mushrooms": FAKE_MUSHROOMS})
  with pytest.raises(download.DataUnavailableError, match="8124"):
    libsvm.load_libsvm("mushrooms")
  assert not cache.exists() or list(cache.iterdir()) == []


def test_good_download_is_verified_renamed_and_reused(offline, monkeypatch):
  _, cache, _ = offline
  monkeypatch.setitem(download.KNOWN_SHA256, "mushrooms",
                      _sha(FAKE_MUSHROOMS))
  calls = []
  _serve(monkeypatch, {"/mushrooms": FAKE_MUSHROOMS}, calls)
  d = libsvm.load_libsvm("mushrooms", test_fraction=0.4)
  assert d.num_train + len(d.y_test) == 5 and d.x_train.shape[1] == 3
  assert [p.name for p in cache.iterdir()] == ["mushrooms"]
  assert (cache / "mushrooms").read_bytes() == FAKE_MUSHROOMS
  libsvm.load_libsvm("mushrooms")  # From the verified cache.
  assert len(calls) == 1


def test_corrupt_cached_file_is_detected(offline, monkeypatch, capsys):
  _, cache, _ = offline
  monkeypatch.setitem(download.KNOWN_SHA256, "mushrooms",
                      _sha(FAKE_MUSHROOMS))
  cache.mkdir()
  bad = b"1 1:1\n2 2"  # A partial download of an earlier version.
  (cache / "mushrooms").write_bytes(bad)
  with pytest.raises(download.DataUnavailableError):
    libsvm.load_libsvm("mushrooms")  # Offline: it cannot be replaced.
  said = capsys.readouterr()
  said = said.out + said.err
  assert str(cache / "mushrooms") in said
  assert _sha(bad) in said and _sha(FAKE_MUSHROOMS) in said
  assert not (cache / "mushrooms").exists()  # Never used, never kept.
  (cache / "mushrooms").write_bytes(bad)
  _serve(monkeypatch, {"/mushrooms": FAKE_MUSHROOMS})
  libsvm.load_libsvm("mushrooms")  # Online: downloaded again.
  assert (cache / "mushrooms").read_bytes() == FAKE_MUSHROOMS


@pytest.fixture
def local_server(tmp_path):
  """An HTTP server on localhost serving `folder`; the first `fail` GETs 500.

  Yields ``(base_url, folder, state)``; ``state["fail"]`` sets how many
  requests fail, ``state["gets"]`` counts them.
  """
  folder = tmp_path / "served"
  folder.mkdir()
  state = {"fail": 0, "gets": 0}

  class Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
      state["gets"] += 1
      if state["fail"] > 0:
        state["fail"] -= 1
        self.send_error(500, "try again")
        return
      super().do_GET()

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}/", folder, state
  finally:
    server.shutdown()
    server.server_close()


def test_real_download_path_against_localhost(tmp_path, monkeypatch,
                                              local_server):
  # pooch's own HTTP downloader (download.fetch not replaced): a verified
  # download, a retry after a server error, a refusal of a wrong digest.
  base, folder, state = local_server
  (folder / "mushrooms").write_bytes(FAKE_MUSHROOMS)
  cache = tmp_path / "cache"
  monkeypatch.setattr(download, "RETRIES", 1)
  state["fail"] = 1
  got = download.download(base + "mushrooms", cache / "mushrooms",
                          sha256=_sha(FAKE_MUSHROOMS))
  assert got.read_bytes() == FAKE_MUSHROOMS and state["gets"] == 2
  assert download.download(base + "mushrooms", cache / "mushrooms",
                           sha256=_sha(FAKE_MUSHROOMS)) == got
  assert state["gets"] == 2  # From the cache.
  monkeypatch.setattr(download, "RETRIES", 0)
  with pytest.raises(download.DataUnavailableError) as err:
    download.download(base + "mushrooms", cache / "other",
                      sha256=_sha(b"something else"))
  assert _sha(FAKE_MUSHROOMS) in str(err.value)
  assert sorted(p.name for p in cache.iterdir()) == ["mushrooms"]
  with pytest.raises(download.DataUnavailableError, match="AALIG_DATA_DIR"):
    download.download(base + "absent", cache / "absent", sha256="0" * 64)
  # Unpinned: the content check runs on pooch's temporary file.
  seen = []
  download.download(base + "mushrooms", cache / "checked",
                    check=lambda p: seen.append(p.read_bytes()))
  assert seen == [FAKE_MUSHROOMS]
  assert (cache / "checked.sha256").read_text().split()[0] == _sha(
      FAKE_MUSHROOMS)


def test_aalig_data_dir_is_looked_in_first(monkeypatch, offline):
  data_dir, cache, calls = offline
  cache.mkdir()
  (cache / "tinyshakespeare.txt").write_text("from the cache")
  monkeypatch.setitem(download.KNOWN_SHA256, "tinyshakespeare.txt",
                      _sha(b"from the cache"))
  assert "".join(text_lib.load_text("tiny_shakespeare").vocab) == "".join(
      sorted(set("from the cache")))
  (data_dir / "tinyshakespeare.txt").write_text("zzz yours")
  assert text_lib.load_text("tiny_shakespeare").vocab == [" ", "o", "r",
                                                          "s", "u", "y",
                                                          "z"]
  assert not calls


# --------------------------------------------------------------------------
# Item 14: the image examples' default data set.

FM_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _idx_gz(arr: np.ndarray) -> bytes:
  header = bytes([0, 0, 8, arr.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in arr.shape)
  return gzip.compress(header + arr.astype(np.uint8).tobytes(), mtime=0)


def _fake_fashion_mnist(n_train=12, n_test=6, top_label=9):
  rng = np.random.default_rng(0)
  return {
      "train-images-idx3-ubyte.gz": _idx_gz(
          rng.integers(0, 256, (n_train, 28, 28))),
      "train-labels-idx1-ubyte.gz": _idx_gz(
          np.arange(n_train) % (top_label + 1)),
      "t10k-images-idx3-ubyte.gz": _idx_gz(
          rng.integers(0, 256, (n_test, 28, 28))),
      "t10k-labels-idx1-ubyte.gz": _idx_gz(np.arange(n_test) % 10),
  }


@pytest.fixture
def small_fashion_mnist(monkeypatch):
  """Fake files of 12/6 images, the expected sizes and digests to match."""
  files = _fake_fashion_mnist()
  monkeypatch.setattr(images, "FASHION_MNIST_SIZES",
                      {"train": 12, "t10k": 6})
  for name, data in files.items():
    monkeypatch.setitem(download.KNOWN_SHA256, name, _sha(data))
  return files


def test_fashion_mnist_offline_is_one_clear_sentence(offline):
  with pytest.raises(download.DataUnavailableError) as err:
    images.load_image_dataset("fashion_mnist")
  msg = str(err.value)
  assert "apt-get install dataset-fashion-mnist" in msg
  assert "AALIG_DATA_DIR" in msg and all(n in msg for n in FM_NAMES)
  assert images.FASHION_MNIST_URL in msg
  assert msg.count(". ") == 0 and "\n" not in msg


@pytest.mark.parametrize("example", ["image_classification", "linen_mlp"])
def test_default_command_offline_exits_with_the_sentence(example, tmp_path,
                                                         offline):
  import importlib
  module = importlib.import_module(f"examples.{example}")
  with pytest.raises(SystemExit) as err:
    module.main(["--workdir", str(tmp_path / "runs")])
  msg = str(err.value.code)
  assert "apt-get install dataset-fashion-mnist" in msg
  assert "AALIG_DATA_DIR" in msg and "KeyError" not in msg


def test_fashion_mnist_is_downloaded_verified_and_cached(
    offline, monkeypatch, small_fashion_mnist):
  _, cache, _ = offline
  calls = []
  _serve(monkeypatch, small_fashion_mnist, calls)
  d = images.load_image_dataset("fashion_mnist")
  assert d.x_train.shape == (12, 28, 28, 1) and d.y_test.shape == (6,)
  assert sorted(calls) == sorted(images.FASHION_MNIST_URL + n
                                 for n in FM_NAMES)
  folder = cache / "fashion_mnist"
  assert sorted(p.name for p in folder.iterdir()) == sorted(FM_NAMES)
  _serve(monkeypatch, {}, calls)  # Any further fetch would fail.
  again = images.load_image_dataset("fashion_mnist", max_train=5)
  assert again.num_train == 5 and len(calls) == 4


def test_fashion_mnist_download_with_wrong_digest_is_rejected(
    offline, monkeypatch, small_fashion_mnist):
  _, cache, _ = offline
  altered = dict(small_fashion_mnist)
  altered["t10k-labels-idx1-ubyte.gz"] = _idx_gz(np.zeros(6))
  _serve(monkeypatch, altered)
  with pytest.raises(download.DataUnavailableError,
                     match="t10k-labels-idx1-ubyte.gz"):
    images.load_image_dataset("fashion_mnist")
  assert not (cache / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz").exists()


def test_fashion_mnist_from_aalig_data_dir_checks_the_arrays(
    offline, small_fashion_mnist):
  data_dir, _, calls = offline
  for name, data in _fake_fashion_mnist(top_label=9).items():
    # Re-compressed, as Debian's are: no digest applies, the arrays do.
    (data_dir / name).write_bytes(gzip.compress(gzip.decompress(data),
                                                mtime=1))
  d = images.load_image_dataset("fashion_mnist")
  assert d.num_train == 12 and not calls
  (data_dir / FM_NAMES[1]).write_bytes(_fake_fashion_mnist(
      top_label=11)[FM_NAMES[1]])
  with pytest.raises(download.DataUnavailableError, match="label"):
    images.load_image_dataset("fashion_mnist")


def test_fashion_mnist_from_debian_folder(tmp_path, monkeypatch, offline,
                                          small_fashion_mnist):
  debian = tmp_path / "debian"
  debian.mkdir()
  for name, data in small_fashion_mnist.items():
    (debian / name).write_bytes(data)
  monkeypatch.setattr(images, "FASHION_MNIST_DIR", debian)
  assert images.load_image_dataset("fashion_mnist").num_train == 12


def test_tfds_not_prepared_is_one_clear_sentence(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(download.DataUnavailableError) as err:
    images.load_tfds_images("fashion_mnist", data_dir=tmp_path / "tfds")
  msg = str(err.value)
  assert "--download" in msg and "tensorflow" in msg
  assert "not prepared" in msg and "\n" not in msg


def test_tfds_fashion_mnist_on_request(tmp_path, offline):
  tfds = pytest.importorskip("tensorflow_datasets")
  from examples import linen_mlp
  out = tmp_path / "runs"
  with tfds.testing.mock_data(num_examples=32):
    linen_mlp.main([
        "--dataset", "fashion_mnist", "--tfds", "--optimisers", "aalig",
        "--epochs", "1", "--batch-size", "16", "--workdir", str(out),
        "--quiet"])
  assert (out / "fashion_mnist_aalig" / "metrics.json").exists()
  _, _, calls = offline
  assert not calls


# --------------------------------------------------------------------------
# Red-team items 5, 6, 7: --resume continues only the same run; a run's
# history is never replaced by a shorter one; bad flags are argparse errors.


@pytest.mark.parametrize("first,second,flag", [
    (("--lr", "sgd=1"), ("--lr", "sgd=0.001"), "--lr"),
    (("--batch-size", "20"), ("--batch-size", "10"), "--batch-size"),
    (("--epochs", "2"), ("--epochs", "3"), "--epochs"),
])
def test_resume_refuses_a_run_made_with_other_flags(tmp_path, first, second,
                                                    flag):
  out = tmp_path / "runs"
  _mf(out, *first)
  before = _snapshot(out)
  with pytest.raises(SystemExit) as err:
    _mf(out, *second, "--resume")
  msg = str(err.value.code)
  assert flag in msg and "--resume" in msg, msg
  assert _snapshot(out) == before
  _mf(out, *first, "--resume")  # the same flags: resumed


def test_resume_without_checkpoints_keeps_the_metrics(tmp_path):
  import shutil
  out = tmp_path / "runs"
  _mf(out, "--epochs", "3")
  run = out / "rank4" / "sgd_seed0"
  shutil.rmtree(run / "ckpt")
  metrics = (run / "metrics.json").read_bytes()
  assert len(json.loads(metrics)) == 3
  with pytest.raises(SystemExit) as err:
    _mf(out, "--epochs", "3", "--resume")
  msg = str(err.value.code)
  assert "metrics.json" in msg and "--overwrite" in msg, msg
  assert (run / "metrics.json").read_bytes() == metrics


def _flag_error(capsys, module, argv):
  with pytest.raises(SystemExit) as err:
    module.main(argv)
  assert err.value.code == 2, err.value.code  # argparse's usage error
  return capsys.readouterr().err


@pytest.mark.parametrize("flags,named", [
    (("--epochs", "0"), "--epochs"),
    (("--batch-size", "0"), "--batch-size"),
    (("--steps-per-epoch", "0"), "--steps-per-epoch"),
    (("--seeds", "0"), "--seeds"),
    (("--lr", "aalig"), "--lr"),
    (("--lr", "aalg=0.1"), "--lr"),
    (("--lr", "aalig=-1"), "--lr"),
    (("--optimisers", "aalig,sgdd"), "--optimisers"),
    (("--problems", "rank7"), "--problems"),
])
def test_bad_flags_are_usage_errors_naming_the_flag(tmp_path, capsys, flags,
                                                    named):
  from examples import matrix_factorisation
  said = _flag_error(capsys, matrix_factorisation,
                     ["--workdir", str(tmp_path / "runs"), *flags])
  assert f"argument {named}" in said, said
  assert not (tmp_path / "runs").exists()


def test_a_file_as_workdir_is_a_usage_error(tmp_path, capsys):
  from examples import matrix_factorisation
  (tmp_path / "notes.txt").write_text("mine")
  said = _flag_error(capsys, matrix_factorisation,
                     ["--workdir", str(tmp_path / "notes.txt")])
  assert "argument --workdir" in said, said
  assert (tmp_path / "notes.txt").read_text() == "mine"
