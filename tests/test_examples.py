"""Tiny runs of every example: the loss falls, outputs land, resume is exact.

Data: the matrix factorisation data are synthetic; the LIBSVM and text
examples read small files written here (through ``AALIG_DATA_DIR`` /
``--data-dir``), so the suite needs neither offline copies nor a network;
the image examples read TFDS data mocked by ``tfds.testing.mock_data`` (no
TensorFlow needed), skipped if tensorflow-datasets is not installed.
"""

from __future__ import annotations

import bz2
import gzip
import json
import pathlib

import jax
import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("orbax.checkpoint")

from examples.common import data as data_lib  # noqa: E402
from examples.common import libsvm  # noqa: E402
from examples.common import images  # noqa: E402
from examples.common import loop  # noqa: E402
from examples.common import models  # noqa: E402
from examples.common import optimizers  # noqa: E402

# Every example's train step must compile once per run.
pytestmark = pytest.mark.filterwarnings(
    "error::examples.common.loop.RecompileWarning")


def _falls(history, key):
  return history[-1][key] < history[0][key]


def _tfds():
  return pytest.importorskip("tensorflow_datasets")


# --------------------------------------------------------------------------
# Data helpers.


def test_epoch_batches_cover_each_index_once_and_pad():
  seen = []
  for idx, mask in data_lib.epoch_batches(10, 4, seed=0, epoch=0):
    assert idx.shape == mask.shape == (4,)
    seen.extend(idx[mask].tolist())
  assert sorted(seen) == list(range(10))
  again = [i for i, m in data_lib.epoch_batches(10, 4, 0, 0)]
  other = [i for i, m in data_lib.epoch_batches(10, 4, 0, 1)]
  assert all((a == b).all() for a, b in zip(again, [
      i for i, m in data_lib.epoch_batches(10, 4, 0, 0)]))
  assert any((a != b).any() for a, b in zip(again, other))


def test_load_svmlight_plain_and_bz2(tmp_path):
  text = b"+1 1:0.5 3:2 # comment\n-1 2:1\n\n+1 3:-1\n"
  (tmp_path / "a.txt").write_bytes(text)
  (tmp_path / "a.bz2").write_bytes(bz2.compress(text))
  for name in ("a.txt", "a.bz2"):
    x, y = libsvm.load_svmlight(tmp_path / name)
    np.testing.assert_array_equal(y, [1, -1, 1])
    np.testing.assert_array_equal(
        x, [[0.5, 0, 2], [0, 1, 0], [0, 0, -1]])
  x, _ = libsvm.load_svmlight(text, num_features=5)
  assert x.shape == (3, 5)


def test_fashion_mnist_idx_reader(tmp_path):
  rng = np.random.default_rng(0)
  def write(name, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(tmp_path / name, "wb") as f:
      f.write(header + arr.astype(np.uint8).tobytes())
  imgs = rng.integers(0, 256, (7, 28, 28))
  labels = rng.integers(0, 10, (7,))
  for split in ("train", "t10k"):
    write(f"{split}-images-idx3-ubyte.gz", imgs)
    write(f"{split}-labels-idx1-ubyte.gz", labels)
  d = images.load_fashion_mnist(tmp_path)
  assert d.x_train.shape == (7, 28, 28, 1)
  np.testing.assert_array_equal(d.x_train[..., 0], imgs)
  np.testing.assert_array_equal(d.y_test, labels)


def test_sklearn_split_matches_sklearn():
  # The split load_matrix_factorisation takes from scikit-learn, as recorded
  # with scikit-learn 1.9.1 (and by the copy of it this project used to
  # carry): a scikit-learn whose split differed would change the data.
  from sklearn import model_selection
  tr, te = model_selection.train_test_split(
      np.arange(1000), test_size=0.2, random_state=9513451)
  assert len(tr) == 800 and len(te) == 200
  assert tr[:8].tolist() == [249, 9, 752, 955, 297, 803, 190, 998]
  assert te[:8].tolist() == [416, 874, 772, 454, 77, 275, 289, 761]
  assert sorted(np.concatenate([tr, te]).tolist()) == list(range(1000))


def test_matrix_factorisation_data():
  d = data_lib.load_matrix_factorisation()
  assert d.x_train.shape == (800, 6) and d.y_train.shape == (800, 10)
  assert d.x_test.shape == (200, 6) and d.y_test.shape == (200, 10)
  # np.random.seed(42): A = linspace(1, 1e-10, 10)[:, None] * rand(10, 6),
  # X = randn(6, 1000); train example 0 is column 249 of X (values printed
  # from the sls recipe with numpy and sklearn).
  np.testing.assert_allclose(
      d.x_train[0], [0.8496021, 0.8384908, -0.80826575, 0.33802348,
                     -0.20846821, -0.9182122], rtol=1e-6)
  np.testing.assert_allclose(d.y_train[0, :3],
                             [0.55032927, -0.32512096, 0.19837919],
                             rtol=1e-6)
  # y = A x with A's last row scaled by 1e-10.
  assert np.abs(d.y_train[:, -1]).max() < 1e-8
  assert np.abs(d.y_train[:, 0]).max() > 0.1


def test_matrix_factorisation_data_is_the_same_for_every_seed():
  from examples import matrix_factorisation
  a = matrix_factorisation.make_problem(4, 0).data
  b = matrix_factorisation.make_problem(4, 1).data
  for k in ("x_train", "y_train", "x_test", "y_test"):
    np.testing.assert_array_equal(getattr(a, k), getattr(b, k))


def test_linear_factorisation_has_torch_init():
  from flax import nnx
  m = models.LinearFactorisation(6, 10, 4, rngs=nnx.Rngs(0))
  w1, w2 = (np.asarray(layer.kernel[...]) for layer in m.layers)
  assert w1.shape == (6, 4) and w2.shape == (4, 10)
  for w, fan_in in ((w1, 6), (w2, 4)):
    assert np.abs(w).max() <= 1 / np.sqrt(fan_in)
  big = models.LinearFactorisation(400, 300, None, rngs=nnx.Rngs(1))
  w = np.asarray(big.layers[0].kernel[...])
  assert abs(np.abs(w).max() - 0.05) < 1e-3  # U(-1/20, 1/20) fills out.
  assert abs(w.var() - 0.05 ** 2 / 3) < 1e-5


def _brute_force_floor(x, y, rank, iters=500):
  """Alternating least squares over W = B C, B [m, r], C [r, d]."""
  c = np.random.default_rng(0).standard_normal((rank, x.shape[1]))
  for _ in range(iters):
    b = np.linalg.lstsq(x @ c.T, y, rcond=None)[0].T
    c = np.linalg.lstsq(np.kron(b, x), y.T.reshape(-1), rcond=None)[0]
    c = c.reshape(rank, x.shape[1])
  return np.mean((x @ (b @ c).T - y) ** 2)


def test_loss_floor_against_a_brute_force_fit():
  from examples import matrix_factorisation
  rng = np.random.default_rng(0)
  x = rng.standard_normal((30, 4))
  # Noise: part of y no linear map fits, which the floor must count.
  y = x @ rng.standard_normal((4, 5)) + 0.3 * rng.standard_normal((30, 5))
  for rank in (1, 2, 3):
    np.testing.assert_allclose(matrix_factorisation.loss_floor(x, y, rank),
                               _brute_force_floor(x, y, rank), rtol=1e-8)
  lstsq = np.mean((x @ np.linalg.lstsq(x, y, rcond=None)[0] - y) ** 2)
  for rank in (4, 5, None):
    np.testing.assert_allclose(matrix_factorisation.loss_floor(x, y, rank),
                               lstsq, rtol=1e-10)
  # The paper's data: rank 1 and 4 cannot interpolate, rank 10 can.
  d = data_lib.load_matrix_factorisation()
  f1, f4, f10 = (matrix_factorisation.loss_floor(d.x_train, d.y_train, r)
                 for r in (1, 4, 10))
  assert f1 > f4 > 1e-3 and f10 < 1e-14


def test_resnet8_is_the_papers_small_resnet():
  from flax import nnx
  n = models.count_params(
      nnx.eval_shape(lambda: models.ResNet8(10, 3, rngs=nnx.Rngs(0))))
  assert 70_000 < n < 95_000


# --------------------------------------------------------------------------
# The training loop.


def test_fit_compiles_once_and_donates_the_state(tmp_path):
  import warnings
  import jax.numpy as jnp
  state = {"w": jnp.zeros(3), "n": jnp.zeros([], jnp.int32)}
  first = state["w"]

  def step(state, data, idx, mask):
    g = jnp.mean(data["x"][idx] * mask[:, None], axis=0)
    new = {"w": state["w"] - 0.1 * (state["w"] - g), "n": state["n"] + 1}
    return new, dict(loss=jnp.sum(new["w"] ** 2), step_size=jnp.float32(0.1),
                     count=jnp.sum(mask, dtype=jnp.float32))

  data = {"x": jnp.ones((10, 3))}
  with warnings.catch_warnings():
    warnings.simplefilter("error", loop.RecompileWarning)
    # 10 examples in batches of 4: the last batch is padded, same shape.
    ctx = optimizers.RunContext.create(10, 4, 2)
    out, hist = loop.fit(state, step, data, ctx,
                         loop.Run(tmp_path, seed=0, verbose=False))
  assert first.is_deleted()  # Donated to the first step.
  assert int(out["n"]) == 6 and len(hist) == 2
  assert len(hist[0]["trace_loss"]) == 3


# --------------------------------------------------------------------------
# The examples.


def test_matrix_factorisation_example(tmp_path):
  from examples import matrix_factorisation
  rows = matrix_factorisation.main([
      "--problems", "rank4", "--optimisers", "aalig,alig,sps,adam,sgd",
      "--epochs", "4", "--workdir", str(tmp_path), "--quiet"])
  assert len(rows) == 5
  results = json.loads((tmp_path / "results.json").read_text())
  for key, hist in results["histories"].items():
    assert len(hist) == 4
    assert _falls(hist, "train_loss"), key
  for f in ("figure2.png", "rank4.png", "results.md"):
    assert (tmp_path / f).stat().st_size > 0
  run = tmp_path / "rank4" / "aalig_seed0"
  assert (run / "metrics.json").exists() and (run / "ckpt").is_dir()
  assert "mean_aov" in results["histories"]["rank4/aalig/seed0"][-1]
  # The epoch's step size is its mean over the 8 steps (drop_last: 800 /
  # 100), not AALIG's last step, which is kept apart as last_step_size.
  for rec in results["histories"]["rank4/aalig/seed0"]:
    assert len(rec["trace_step_size"]) == 8
    np.testing.assert_allclose(rec["step_size"],
                               np.mean(rec["trace_step_size"]), rtol=1e-5)
    zeros = np.mean(np.asarray(rec["trace_step_size"]) == 0)
    assert rec["zero_step_share"] == pytest.approx(zeros)
    assert "last_step_size" in rec
  assert {r["problem"] for r in rows} == {"rank4"}
  assert all(r["vs_floor"].startswith("x") for r in rows)


def test_matrix_factorisation_run_shape():
  # 800 examples, batch 100, drop_last, 50 epochs in K = 10 sections.
  ctx = optimizers.RunContext.create(800, 100, 50, drop_remainder=True)
  assert (ctx.steps_per_epoch, ctx.epochs_per_section) == (8, 5)
  assert optimizers.RunContext.create(
      850, 100, 50, drop_remainder=True).steps_per_epoch == 8


@pytest.mark.parametrize("opt", ["aalig", "alig"])
def test_resume_is_exact(tmp_path, opt):
  import shutil
  from examples import matrix_factorisation
  problem = matrix_factorisation.make_problem(4, 0)
  # Two AOV sections of 2 epochs: the resumed epoch ends a section.
  cfg = optimizers.OptConfig(opt, 1.0, momentum=0.9)
  ctx = optimizers.RunContext.create(problem.data.num_train, 100, 4,
                                     sections=2)
  assert ctx.epochs_per_section == 2
  train = lambda workdir, resume=False: loop.train_supervised(
      problem, cfg, ctx, loop.Run(workdir, seed=0, resume=resume,
                                  verbose=False), eval_train=True)
  full, hist_full = train(tmp_path / "full")
  # A run "killed" after epoch 3: drop its last checkpoint (epoch index 3).
  run = tmp_path / "killed"
  _, hist_killed = train(run)
  assert sorted(p.name for p in (run / "ckpt").iterdir()) == [
      "epoch_00002", "epoch_00003"]
  shutil.rmtree(run / "ckpt" / "epoch_00003")
  resumed, hist_res = train(run, resume=True)
  # Epochs 1-3 came from the checkpoint (same timings), epoch 4 was rerun.
  assert [r["seconds"] for r in hist_res[:3]] == [
      r["seconds"] for r in hist_killed[:3]]
  leaves_a, leaves_b = jax.tree.leaves(full), jax.tree.leaves(resumed)
  assert len(leaves_a) == len(leaves_b)
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"}
                     for r in h]
  # JSON text, so that NaN (no AOV section ended yet) compares equal.
  assert json.dumps(strip(hist_full)) == json.dumps(strip(hist_res))


def _write_mushroom_like(folder: pathlib.Path, n=240, d=12, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 2, (n, d))
  w = rng.standard_normal(d)
  y = np.where(x @ w > np.median(x @ w), 2, 1)  # Labels 1/2, as mushrooms.
  lines = [f"{y[i]} " + " ".join(f"{j + 1}:1" for j in np.flatnonzero(x[i]))
           for i in range(n)]
  (folder / "mushrooms.txt").write_text("\r\n".join(lines) + "\r\n")


def test_rbf_kernel_example(tmp_path, monkeypatch):
  from examples import rbf_kernel
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  _write_mushroom_like(data_dir)
  monkeypatch.setenv("AALIG_DATA_DIR", str(data_dir))
  monkeypatch.setenv("AALIG_CACHE_DIR", str(tmp_path / "cache"))
  out = tmp_path / "runs"
  rows = rbf_kernel.main([
      "--datasets", "mushrooms", "--optimisers", "aalig,sps",
      "--epochs", "3", "--batch-size", "32", "--num-centres", "100",
      "--workdir", str(out), "--quiet"])
  results = json.loads((out / "results.json").read_text())
  for key, hist in results["histories"].items():
    assert _falls(hist, "train_loss"), key
  assert all(r["val_acc"] > 0.6 for r in rows)
  assert (out / "mushrooms.png").stat().st_size > 0


def test_char_rnn_example(tmp_path):
  from examples import char_rnn
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  (data_dir / "tinyshakespeare.txt").write_text(
      "to be or not to be, that is the question.\n" * 60)
  out = tmp_path / "runs"
  char_rnn.main([
      "--dataset", "tiny_shakespeare", "--data-dir", str(data_dir),
      "--optimisers", "aalig", "--epochs", "3", "--batch-size", "16",
      "--seq-len", "20", "--hidden", "32", "--lr", "aalig=1",
      "--workdir", str(out), "--quiet"])
  results = json.loads((out / "results.json").read_text())
  (hist,) = results["histories"].values()
  assert _falls(hist, "loss") and _falls(hist, "val_loss")
  assert (out / "tiny_shakespeare.png").stat().st_size > 0


def test_tfds_pipeline_indices_unique_and_stable():
  tfds = _tfds()
  with tfds.testing.mock_data(num_examples=50):
    d = images.load_tfds_images("cifar10")
    source = tfds.data_source("cifar10", split="train")
    assert d.num_train == len(source) == 50
    # Position i of the arrays is record i of the TFDS split.
    for i in (0, 17, 49):
      np.testing.assert_array_equal(d.x_train[i], source[i]["image"])
  by_epoch = []
  for epoch in range(3):
    seen = {}
    for idx, mask in data_lib.epoch_batches(d.num_train, 16, 0, epoch):
      for i, image in zip(idx[mask], d.x_train[idx[mask]]):
        assert int(i) not in seen  # Unique within an epoch.
        seen[int(i)] = image
    assert sorted(seen) == list(range(50))
    by_epoch.append(seen)
  orders = [[int(i) for b, m in data_lib.epoch_batches(50, 16, 0, e)
             for i in b[m]] for e in range(3)]
  assert orders[0] != orders[1]  # Shuffled...
  for i in range(50):  # ...but each index names the same example.
    np.testing.assert_array_equal(by_epoch[0][i], by_epoch[2][i])


def test_image_classification_example_on_mock_tfds(tmp_path):
  tfds = _tfds()
  from examples import image_classification
  out = tmp_path / "runs"
  with tfds.testing.mock_data(num_examples=64):
    rows = image_classification.main([
        "--dataset", "cifar10", "--optimisers", "aalig", "--epochs", "3",
        "--batch-size", "32", "--max-train", "64", "--max-test", "32",
        "--augment", "--width", "8", "--lr", "aalig=0.1",
        "--workdir", str(out), "--quiet"])
  results = json.loads((out / "results.json").read_text())
  (hist,) = results["histories"].values()
  assert _falls(hist, "loss")
  assert 0.0 <= rows[0]["test_acc"] <= 1.0
  assert (out / "cifar10.png").stat().st_size > 0
  assert (out / "cifar10_aalig" / "ckpt").is_dir()


def test_linen_example_on_mock_tfds(tmp_path):
  tfds = _tfds()
  from examples import linen_mlp
  out = tmp_path / "runs"
  with tfds.testing.mock_data(num_examples=64):
    linen_mlp.main([
        "--dataset", "cifar10", "--optimisers", "aalig,alig", "--epochs",
        "4", "--batch-size", "16", "--max-train", "64", "--max-test", "32",
        "--workdir", str(out), "--quiet"])
  results = json.loads((out / "results.json").read_text())
  for key, hist in results["histories"].items():
    assert _falls(hist, "loss"), key
    assert hist[-1]["step_size"] >= 0
  assert (out / "cifar10.png").stat().st_size > 0


@pytest.mark.parametrize("name,schedule", [("sgd", "step"), ("adam", "step"),
                                           ("sgd", "constant")])
def test_logged_step_size_follows_the_schedule(name, schedule):
  import jax.numpy as jnp
  cfg = optimizers.OptConfig(name, 0.1,
                             momentum=0.9 if name == "sgd" else 0,
                             schedule=schedule)
  ctx = optimizers.RunContext.create(8, 4, 4)
  assert ctx.total_steps == 8
  tx = optimizers.make_optimizer(cfg, ctx)
  params = jnp.ones(3)
  state = tx.init(params)
  sizes = []
  for _ in range(8):
    _, state = tx.update(jnp.ones(3), state, params)
    sizes.append(float(optimizers.logged_step_size(cfg, state, None, 0.0,
                                                   ctx)))
  # Divided by 10 at half and three quarters of the 8 steps.
  want = [0.1] * 8 if schedule == "constant" else (
      [0.1] * 4 + [0.01] * 2 + [0.001] * 2)
  np.testing.assert_allclose(sizes, want, rtol=1e-6)


def _toy_fit(tmp_path, epochs=3):
  import jax.numpy as jnp
  state = {"w": jnp.zeros(3)}

  def step(state, data, idx, mask):
    new = {"w": state["w"] + 0.1}
    return new, dict(loss=jnp.sum(new["w"]), step_size=jnp.float32(0.1),
                     count=jnp.sum(mask, dtype=jnp.float32))

  ctx = optimizers.RunContext.create(8, 4, epochs)
  return loop.fit(state, step, {"x": jnp.ones((8, 3))}, ctx,
                  loop.Run(tmp_path, seed=0, verbose=False), desc="toy")


def test_fit_prints_progress_lines_when_not_on_a_terminal(tmp_path, capsys,
                                                          monkeypatch):
  # pytest's captured stdout is not a TTY, as in a log file or CI: no bar,
  # so a line at most every PROGRESS_SECONDS and one when the run ends.
  monkeypatch.setattr(loop, "PROGRESS_SECONDS", 0.0)
  _toy_fit(tmp_path)
  lines = [l for l in capsys.readouterr().out.splitlines()
           if l.startswith("[toy]")]
  assert [l.split()[2] for l in lines[:3]] == ["1/3", "2/3", "3/3"]
  assert "loss=" in lines[0] and "done" in lines[-1]


def test_fit_progress_lines_are_throttled(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(loop, "PROGRESS_SECONDS", 1e9)
  _toy_fit(tmp_path / "a")
  _toy_fit(tmp_path / "b")
  lines = [l for l in capsys.readouterr().out.splitlines()
           if l.startswith("[toy]")]
  # Only each run's closing line.
  assert len(lines) == 2 and all("done" in l for l in lines)


def test_matrix_factorisation_prints_each_optimisers_distance_from_floor(
    tmp_path, capsys):
  from examples import matrix_factorisation
  rows = matrix_factorisation.main([
      "--problems", "rank1,rank10", "--optimisers", "aalig,sgd",
      "--epochs", "2", "--seeds", "2", "--workdir", str(tmp_path)])
  out = capsys.readouterr().out
  lines = out[out.index("How far each optimiser"):].splitlines()[1:3]
  by_name = {l.split()[0]: l for l in lines}
  assert set(by_name) == {"aalig", "sgd"}
  for r in rows:
    name = r["optimiser"].split(" ")[0]
    assert f"{r['problem']} {r['vs_floor']}" in by_name[name]
    # Two seeds: the worst one is no closer to the floor than their mean.
    worst, mean = r["worst_seed"], r["vs_floor"]
    assert float(worst[1:]) >= float(mean[1:])
  # Progress lines reach a log (pytest's stdout is not a terminal).
  assert "] done: 2 epochs" in out


def test_distillation_student_starts_from_the_teachers_losses():
  # The table is each training example's own loss under the teacher, at its
  # dataset index; the teacher variants' AALIG starts from exactly it, the
  # others from the lower bound 0.
  import jax.numpy as jnp
  from flax import nnx
  from examples import distillation
  from examples import matrix_factorisation
  problem = matrix_factorisation.make_problem(5, 0)
  model = problem.make_model(nnx.Rngs(3))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # Batch 300 over 800 examples: the last batch is padded and masked.
  table = distillation.teacher_table(problem, graphdef, params, rest, 300)
  x, y = problem.data.x_train, problem.data.y_train
  direct = np.mean((np.asarray(model(jnp.asarray(x))) - y) ** 2, axis=-1)
  assert table.shape == (800,) and table.dtype == jnp.float32
  np.testing.assert_allclose(table, direct, rtol=1e-5, atol=1e-8)
  ctx = optimizers.RunContext.create(800, 100, 10, drop_remainder=True)
  student = matrix_factorisation.make_problem(4, 0).make_model(nnx.Rngs(0))
  student_params = nnx.state(student, nnx.Param)
  for variant, (from_teacher, _) in distillation.VARIANTS.items():
    tx = distillation.student_optimizer(variant, 1.0, ctx, table)
    aov = optimizers.aalig_state(tx.init(student_params)).aov
    np.testing.assert_array_equal(aov, table if from_teacher else 0.0)
  with pytest.raises(ValueError, match="teacher's table"):
    distillation.student_optimizer("teacher", 1.0, ctx, None)


def test_distillation_example(tmp_path):
  from examples import distillation
  rows = distillation.main([
      "--epochs", "2", "--seeds", "1", "--variants", "zero,teacher",
      "--workdir", str(tmp_path), "--quiet"])
  zero, teacher, teacher_model = rows
  assert zero["variant"].startswith("zero") and len(rows) == 3
  table = np.load(tmp_path / "teacher_seed0" / "aov_table.npy")
  assert table.shape == (800,) and np.all(table > 0)
  # What the student's AALIG started from: the teacher's table, whose mean
  # is the teacher's training loss as the evaluator measured it.
  assert teacher["initial_mean_aov_per_seed"] == [
      pytest.approx(float(np.mean(table)))]
  assert zero["initial_mean_aov_per_seed"] == [0.0]
  assert teacher_model["table_mean_per_seed"][0] == pytest.approx(
      teacher_model["train_loss_mean"], rel=1e-4)
  for r in (zero, teacher):
    assert 0.0 <= r["zero_step_share_mean"] <= 1.0
    assert r["train_loss_mean"] > 0
  results = json.loads((tmp_path / "results.json").read_text())
  assert len(results["histories"]) == 3
  assert all(len(h) == 2 for h in results["histories"].values())
  for f in ("distillation.png", "students_seed0.png", "results.md"):
    assert (tmp_path / f).stat().st_size > 0
  assert "± " not in (tmp_path / "results.md").read_text()  # One seed.
