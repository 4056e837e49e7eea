"""The RBF-kernel problems in the sls code's exact settings (AALIG Sec. 5.1).

Offline and fast: small svmlight files written here, plus the real LIBSVM
files where ``$AALIG_DATA_DIR`` has them (skipped otherwise; CI sets it).
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import pathlib

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("orbax.checkpoint")

from examples.common import download  # noqa: E402
from examples.common import libsvm  # noqa: E402
from examples.common import loop  # noqa: E402
from examples.common import optimizers  # noqa: E402
from examples.common import rbf  # noqa: E402

# The offline copies of the real files, if any (CI's .ci/run sets it).
REAL = pathlib.Path(os.environ.get("AALIG_DATA_DIR") or "/nonexistent")


def _svmlight_lines(x, y):
  return [f"{y[i]:g} " + " ".join(f"{j + 1}:{x[i, j]:.6g}"
                                  for j in np.flatnonzero(x[i]))
          for i in range(len(y))]


def _write(folder, name, x, y):
  text = ("\n".join(_svmlight_lines(x, y)) + "\n").encode()
  path = folder / name
  path.write_bytes(bz2.compress(text) if name.endswith(".bz2") else text)
  return path


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
  folder = tmp_path / "data"
  folder.mkdir()
  monkeypatch.setenv("AALIG_DATA_DIR", str(folder))
  monkeypatch.setenv("AALIG_CACHE_DIR", str(tmp_path / "cache"))

  def no_network(url, path):
    raise AssertionError(f"tried to download {url}")

  monkeypatch.setattr(download, "fetch", no_network)
  return folder


def _mushroom_like(n=240, d=12, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 2, (n, d)).astype(float)
  w = rng.standard_normal(d)
  y = np.where(x @ w > np.median(x @ w), 2, 1)  # Labels 1/2, as mushrooms.
  return x, y


# --------------------------------------------------------------------------
# The split, the labels, the files.


@pytest.mark.parametrize("n,n_train", [(8124, 6499), (35_000, 28_000),
                                       (10, 8), (11, 8)])
def test_unshuffled_split_is_sklearns(n, n_train):
  # The call load_libsvm_sls makes, as the sls code: n_test = ceil(0.2 n),
  # the first n - n_test rows train, the rest test, in order.
  from sklearn import model_selection
  tr, te = model_selection.train_test_split(
      np.arange(n), test_size=0.2, shuffle=False, random_state=42)
  assert len(tr) == n_train and len(te) == n - n_train
  np.testing.assert_array_equal(tr, np.arange(n_train))
  np.testing.assert_array_equal(te, np.arange(n_train, n))


def test_sls_labels():
  np.testing.assert_array_equal(libsvm.sls_labels(np.array([1., 2, 2, 1])),
                                [0, 1, 1, 0])
  np.testing.assert_array_equal(libsvm.sls_labels(np.array([1., -1, -1])),
                                [1, 0, 0])
  with pytest.raises(ValueError):
    libsvm.sls_labels(np.array([0., 1, 2]))


def test_load_libsvm_sls_keeps_file_order(data_dir):
  x, y = _mushroom_like(n=20)
  _write(data_dir, "mushrooms.txt", x, y)
  d = libsvm.load_libsvm_sls("mushrooms")
  assert d.x_train.dtype == np.float64
  assert len(d.y_train) == 16 and len(d.y_test) == 4
  np.testing.assert_array_equal(d.x_train, x[:16, :d.x_train.shape[1]])
  np.testing.assert_array_equal(d.x_test, x[16:, :d.x_train.shape[1]])
  np.testing.assert_array_equal(d.y_train, (y[:16] == 2))
  np.testing.assert_array_equal(d.y_test, (y[16:] == 2))


def test_ijcnn1_tr_is_the_first_rows_of_the_combined_file(data_dir,
                                                          monkeypatch):
  monkeypatch.setattr(libsvm, "IJCNN1_TR_ROWS", 15)
  rng = np.random.default_rng(1)
  x = np.round(rng.uniform(-1, 1, (25, 5)), 4)
  y = np.where(rng.random(25) < 0.3, 1, -1)
  _write(data_dir, "ijcnn1.bz2", x, y)
  d = libsvm.load_libsvm_sls("ijcnn1")
  assert len(d.y_train) == 12 and len(d.y_test) == 3  # 15 rows: 12 / 3.
  np.testing.assert_allclose(d.x_train, x[:12], rtol=1e-6)
  np.testing.assert_allclose(d.x_test, x[12:15], rtol=1e-6)
  np.testing.assert_array_equal(d.y_train, y[:12] == 1)
  # LIBSVM's own ijcnn1.tr, when given, is used whole.
  _write(data_dir, "ijcnn1.tr.bz2", x[5:], y[5:])
  d = libsvm.load_libsvm_sls("ijcnn1")
  assert len(d.y_train) + len(d.y_test) == 20
  np.testing.assert_allclose(d.x_train[0], x[5], rtol=1e-6)


def _fingerprint(d):
  h = hashlib.sha256()
  for a in (d.x_train, d.y_train, d.x_test, d.y_test):
    a = np.ascontiguousarray(a)
    h.update(str((a.dtype, a.shape)).encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


# Every array of the loaded data sets, as the hand-written svmlight parser
# and copy of scikit-learn's split (replaced by scikit-learn's own
# load_svmlight_file and train_test_split) gave them from the offline copies
# (mushrooms.txt, ijcnn1.trn.bz2): the replacement changed no value.
FINGERPRINTS = {
    ("sls", "mushrooms"): "bda841ecf61c3d89",
    ("sls", "ijcnn1"): "7dd1e6656ef6aefc",
    ("seeded", "mushrooms"): "53384aa6a08ed1e5",
    ("seeded", "ijcnn1"): "1f330f4d5cb463d1",
}


@pytest.mark.skipif(not (REAL / "ijcnn1.trn.bz2").exists() or
                    not (REAL / "mushrooms.txt").exists(),
                    reason="no offline LIBSVM files in $AALIG_DATA_DIR")
def test_real_files_give_the_papers_sizes(monkeypatch):
  monkeypatch.setenv("AALIG_DATA_DIR", str(REAL))
  for name in ("mushrooms", "ijcnn1"):
    assert _fingerprint(libsvm.load_libsvm_sls(name)) == FINGERPRINTS[
        "sls", name], name
    assert _fingerprint(libsvm.load_libsvm(name)) == FINGERPRINTS[
        "seeded", name], name
  m = libsvm.load_libsvm_sls("mushrooms")
  assert (len(m.y_train), len(m.y_test)) == (6499, 1625)
  assert m.x_train.shape[1] == 112
  i = libsvm.load_libsvm_sls("ijcnn1")
  assert (len(i.y_train), len(i.y_test)) == (28_000, 7_000)
  assert i.x_train.shape[1] == 22
  for d in (m, i):
    assert set(np.unique(d.y_train)) == {0.0, 1.0}
  # ijcnn1's positives (+1) are the minority (about 10%).
  assert 0.05 < i.y_train.mean() < 0.15


# --------------------------------------------------------------------------
# The kernel and the model.


def test_rbf_kernel_is_the_formula():
  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, (7, 4))
  b = rng.uniform(-1, 1, (5, 4))
  for sigma in (0.5, 0.05, 2.0):
    direct = np.exp(-((a[:, None] - b[None]) ** 2).sum(-1)
                    / (2 * sigma ** 2))
    got = libsvm.rbf_kernel(a, b, sigma, chunk=3)
    assert got.dtype == np.float32 and got.shape == (7, 5)
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-30)
  k = libsvm.rbf_kernel(a, a, 0.05, same=True, chunk=2)
  np.testing.assert_array_equal(np.diag(k), 1.0)
  direct = np.exp(-((a[:, None] - a[None]) ** 2).sum(-1) / (2 * 0.05 ** 2))
  np.testing.assert_allclose(k, direct, rtol=1e-5, atol=1e-30)


def test_model_has_torch_init_and_no_bias():
  from flax import nnx
  n = 400
  m = rbf.make_model(n, nnx.Rngs(3))
  params = nnx.state(m, nnx.Param)
  leaves = [np.asarray(v) for v in __import__("jax").tree.leaves(params)]
  assert len(leaves) == 1  # The kernel only: no bias.
  w = leaves[0]
  assert w.shape == (n, 1)
  bound = 1 / np.sqrt(n)  # PyTorch: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  assert np.abs(w).max() <= bound
  assert np.abs(w).max() > 0.95 * bound
  assert abs(w.std() - bound / np.sqrt(3)) < 0.1 * bound / np.sqrt(3)
  np.testing.assert_array_equal(rbf.initial_weights(n, 3), w[:, 0])
  assert not np.array_equal(rbf.initial_weights(n, 4), w[:, 0])


# --------------------------------------------------------------------------
# The example.


def _tiny_data():
  x, y = _mushroom_like(n=250)
  y = (y == 2).astype(np.float32)
  k = libsvm.rbf_kernel(x[:200], x[:200], 1.0, same=True)
  kv = libsvm.rbf_kernel(x[200:], x[:200], 1.0)
  return rbf.KernelData("tiny", k, y[:200], kv, y[200:])


@pytest.mark.parametrize("opt,lr", [("aalig", 10.0), ("sps", 10.0)])
def test_sweep_trainer_matches_the_loop(tmp_path, opt, lr):
  from examples import rbf_kernel
  data = _tiny_data()
  ctx = rbf.run_context(data.num_train, 4, 32)
  assert ctx.steps_per_epoch == 6  # drop_last: 200 // 32.
  grid = rbf_kernel.train_grid(data, opt, [lr / 10, lr], [0, 1], ctx)
  for j_seed, seed in [(1, 1)]:  # The loop's run of the grid's 2nd seed.
    cfg = optimizers.OptConfig(opt, lr)
    run = loop.Run(tmp_path / f"{opt}{seed}", seed, verbose=False)
    _, hist = loop.train_supervised(rbf.make_problem(data), cfg, ctx,
                                    run, eval_train=True)
    np.testing.assert_allclose(
        grid["train_loss"][1:, j_seed, 1], [r["train_loss"] for r in hist],
        rtol=2e-4)
    np.testing.assert_allclose(
        grid["val_acc"][1:, j_seed, 1], [r["val_acc"] for r in hist])
  assert grid["train_loss"].shape == (5, 2, 2)


def test_choose_picks_best_mean_val_acc_then_lower_loss():
  from examples import rbf_kernel
  acc = np.array([[0.9, 0.95, 0.95], [0.9, 0.93, 0.95]])  # [seeds, lrs]
  loss = np.array([[0.1, 0.3, 0.2], [0.1, 0.3, 0.2]])
  grid = {"lr": [1.0, 10.0, 100.0], "val_acc": acc[None],
          "train_loss": loss[None]}
  assert rbf_kernel.choose(grid) == 2
  grid["val_acc"] = np.array([[[0.9, 0.95, 0.95], [0.9, 0.95, 0.95]]])
  grid["train_loss"] = np.array([[[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]]])
  assert rbf_kernel.choose(grid) == 1
  grid["val_acc"] = np.array([[[np.nan, 0.5, 0.4], [np.nan, 0.5, 0.4]]])
  assert rbf_kernel.choose(grid) == 1


def test_example_runs_and_sweeps(data_dir, tmp_path):
  from examples import rbf_kernel
  x, y = _mushroom_like()
  _write(data_dir, "mushrooms.txt", x, y)
  out = tmp_path / "runs"
  rows = rbf_kernel.main([
      "--datasets", "mushrooms", "--optimisers", "aalig", "--epochs",
      "3", "--batch-size", "32", "--seeds", "2", "--lr", "aalig=10",
      "--workdir", str(out), "--quiet"])
  assert [r["seeds"] for r in rows] == [2]
  results = json.loads((out / "results.json").read_text())
  assert len(results["histories"]) == 2
  for hist in results["histories"].values():
    assert len(hist) == 3 and hist[-1]["train_loss"] < hist[0]["train_loss"]
  sweep = tmp_path / "sweep"
  rows = rbf_kernel.main([
      "--sweep", "--datasets", "mushrooms", "--optimisers", "aalig,adam",
      "--epochs", "2", "--batch-size", "32", "--seeds", "2",
      "--lr", "aalig=1:10", "--lr", "adam=0.001:0.1", "--workdir",
      str(sweep), "--quiet"])
  saved = json.loads((sweep / "sweep_mushrooms.json").read_text())
  assert saved["chosen"]["aalig"] in (1.0, 10.0)
  assert saved["settings"]["steps_per_epoch"] == 192 // 32
  assert np.asarray(saved["grids"]["adam"]["val_acc"]).shape == (3, 2, 2)
  assert {r["optimiser"] for r in rows} == {"aalig", "adam"}
  assert all(r["val_acc"] > 0.6 for r in rows)
  assert (sweep / "mushrooms_sweep.png").stat().st_size > 0


def test_benchmark_task_uses_the_exact_data(data_dir):
  from benchmarks import tasks
  x, y = _mushroom_like(n=100)
  _write(data_dir, "mushrooms.txt", x, y)
  task = tasks.rbf_task("mushrooms", "cpu", 2)
  assert task.data["x_train"].shape == (80, 80)
  assert len(task.data["y_val"]) == 10 and len(task.data["y_test"]) == 10
  np.testing.assert_array_equal(task.data["y_train"], y[:80] == 2)
  np.testing.assert_array_equal(task.data["y_test"], y[90:] == 2)
  np.testing.assert_array_equal(np.diag(task.data["x_train"]), 1.0)
  from flax import nnx
  w = np.asarray(task.make_model(5).linear.kernel[...])
  ref = rbf.make_model(80, nnx.Rngs(5)).linear.kernel[...]
  np.testing.assert_array_equal(w, np.asarray(ref))
  assert task.epochs == 35
