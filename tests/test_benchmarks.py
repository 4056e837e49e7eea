"""Smoke test of the benchmark runner: a tiny end-to-end run and its outputs."""

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

run = pytest.importorskip("benchmarks.run")


def test_runner_end_to_end_tiny(tmp_path: pathlib.Path):
  results = run.main(["--tiny", "--tasks", "mf_rank1", "--optimizers",
                      "aalig,sgd_step,prodigy", "--seeds", "2",
                      "--out", str(tmp_path), "--hlo-dir",
                      str(tmp_path / "hlo")])
  for name in ("results.json", "README.md", "overhead.png",
               "quality_curves.png", "quality_sensitivity.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  # HLO text is a run's output, kept apart from the results.
  assert (tmp_path / "hlo" / "mlp_aalig_opt_part.txt").stat().st_size > 0
  assert not (tmp_path / "hlo_text").exists()

  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["overhead"]["tiny"] and saved["quality"]["tiny"]
  assert set(saved) >= {"overhead", "quality", "last_run", "optimizers"}

  mlp = saved["overhead"]["models"]["mlp"]
  assert mlp["step"]["sgd"]["ratio_to_sgd"] == pytest.approx(1.0)
  for opt in ("aalig", "alig"):
    assert mlp["step"][opt]["median_s"] > 0
    assert mlp["hlo_opt_part"][opt]["num_kernels"] > 0

  task = saved["quality"]["tasks"]["mf_rank1"]
  assert set(task["best"]) == {"aalig", "sgd_step", "prodigy"}
  best = task["best"]["aalig"]
  assert best["lr"] in task["grids"]["aalig"]
  assert best["num_seeds"] == 2 and len(best["val_metric"]["values"]) == 2
  # Every (lr, wd, seed) of the grid ran: 2 step sizes x 1 wd x 2 seeds.
  assert len(task["runs"]["aalig"]) == 4
  assert len(task["runs"]["prodigy"]) == 2

  # Sec. 5.1's settings: no momentum, chosen on the training loss, which
  # the report gives against the rank's Eckart-Young floor.
  assert task["momentum"] == 0.0 and task["select_on"] == "train_loss"
  assert task["loss_floor"] == pytest.approx(0.131786, rel=1e-5)
  scores = {}
  for r in task["runs"]["aalig"]:
    scores.setdefault(r["lr"], []).append(r["train_loss"][-1])
  assert best["lr"] == min(scores, key=lambda k: sum(scores[k]))

  text = (tmp_path / "README.md").read_text()
  assert "python -m benchmarks.run --tiny" in text
  assert "vs floor | epoch within 1% |" in text
  assert "Where AALIG loses" in text and "| AALIG |" in text
  assert results["last_run"]["parts"] == ["overhead", "quality"]

  # A run of one part keeps the other part's results.
  run.main(["--tiny", "--only", "overhead", "--out", str(tmp_path),
            "--hlo-dir", str(tmp_path / "hlo")])
  again = json.loads((tmp_path / "results.json").read_text())
  assert "mf_rank1" in again["quality"]["tasks"]


# --------------------------------------------------------------------------
# The regime tasks and the optimisers added for them (benchmarks/regime.py).


engine = pytest.importorskip("benchmarks.engine")
tasks = pytest.importorskip("benchmarks.tasks")
regime_tasks = pytest.importorskip("benchmarks.regime_tasks")
regime = pytest.importorskip("benchmarks.regime")
optimizers = pytest.importorskip("examples.common.optimizers")


@functools.lru_cache(maxsize=None)  # Loading Fashion-MNIST takes seconds.
def _regime_task(name):
  try:
    return tasks.make_task(name, "cpu", 3, 3)
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ == "DataUnavailableError":
      pytest.skip(str(e))
    raise


def _tiny_regime(name, epochs=2):
  return dataclasses.replace(tasks.tiny(_regime_task(name)), epochs=epochs)


def _data(task):
  return {k: jnp.asarray(v) for k, v in task.data.items()}


@pytest.fixture(scope="module")
def tiny_mlp():
  return _tiny_regime("regime_fmnist_mlp")


def test_regime_tasks_are_the_regime():
  """Full-size tasks: K = 10 sections of 5 epochs, the paper's wd grid, all
  of Fashion-MNIST, models far too small to interpolate."""
  for name in regime_tasks.REGIME_TASK_NAMES:
    task = _regime_task(name)
    assert task.epochs >= 50 and task.ctx.epochs_per_section == 5
    assert task.weight_decays == (0.0, 1e-5, 1e-4, 1e-3)
    assert not task.interpolating and task.sweep_seeds == 1
    assert all(o in task.grids for o in regime_tasks.REGIME_OPTS)
    assert task.configs_per_call == 0 and not task.loop_steps  # vmapped
    n_params = sum(x.size for x in jax.tree.leaves(
        engine._split(task.make_model(0))[1]))
    targets = task.data["y_train"].size  # labels, or characters
    assert n_params < targets / 4, (name, n_params, targets)
  mlp = _regime_task("regime_fmnist_mlp")
  assert mlp.num_train + len(mlp.data["y_val"]) == 60_000
  assert len(mlp.data["y_test"]) == 10_000


@pytest.mark.parametrize("name", ["regime_fmnist_mlp", "regime_tolstoi_lstm"])
def test_regime_task_trains_tiny(name):
  task = _tiny_regime(name)
  progs = engine.Programs(task)
  recs = engine.train(task, progs, "aalig", [(0.1, 1e-4, 0), (1.0, 0.0, 1)],
                      _data(task))
  assert len(recs) == 2
  for r in recs:
    assert len(r["epoch_loss"]) == 2 and np.all(np.isfinite(r["epoch_loss"]))
    assert 0.0 <= r["train_metric"][-1] <= 1.0
    assert 0.0 <= r["test_metric"] <= 1.0


def test_momo_gets_the_loss_value():
  ctx = optimizers.RunContext.create(10, 5, 2)
  tx = optimizers.build("momo", 0.1, 0.0, ctx)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones(3)}, state, params,
                       value=2.5, losses=jnp.ones(5),
                       indices=jnp.arange(5))
  # The first step's loss average is the value itself (beta is 0 at step 0).
  momo_state = optimizers.aalig_state(state, (optax.contrib.MomoState,))
  assert float(momo_state.barf) == pytest.approx(2.5)
  with pytest.raises((ValueError, TypeError)):  # No value: no MoMo step.
    tx.update({"w": jnp.ones(3)}, tx.init(params), params)


def test_momo_trains_in_the_engine(tiny_mlp):
  task = tiny_mlp
  recs = engine.train(task, engine.Programs(task), "momo",
                      [(1.0, 0.0, 0)], _data(task))
  losses = recs[0]["epoch_loss"]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize("opt", ["sf_sgd", "sf_adamw"])
def test_schedule_free_is_evaluated_at_its_eval_params(tiny_mlp, opt):
  task = tiny_mlp
  progs = engine.Programs(task)
  data = _data(task)
  final = {}
  recs = engine.train(task, progs, opt, [(0.1 if opt == "sf_sgd" else 1e-2,
                                          1e-4, 0)], data, final)
  p, r, s = final["params"], final["rest"], final["opt_state"]
  state0 = jax.tree.map(lambda x: x[0], s)
  x_params = jax.tree.map(
      lambda x: x[None], optax.contrib.schedule_free_eval_params(
          state0, jax.tree.map(lambda x: x[0], p)))
  at_x = progs.evaluate(x_params, r, data["x_test"], data["y_test"])
  at_y = progs.evaluate(p, r, data["x_test"], data["y_test"])
  assert recs[0]["test_loss"] == pytest.approx(float(at_x[0][0]), rel=1e-5)
  # The check can fail: the gradient point y is another model.
  assert abs(float(at_y[0][0]) - float(at_x[0][0])) > 1e-4
  # The registry helper finds the state inside wrappers too.
  chained = (optax.EmptyState(), state0)
  got = optimizers.eval_params(opt, chained, jax.tree.map(lambda x: x[0], p))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b[0]), got,
               x_params)
  # Every other optimiser is evaluated at its parameters.
  assert optimizers.eval_params("aalig", state0, p) is p


def test_regime_runner_tiny(tmp_path: pathlib.Path, monkeypatch):
  # Only the MLP task and two optimisers (seconds); the staged search runs
  # its three stages (step sizes, weight decays, other seeds).
  monkeypatch.setattr(regime, "make", lambda name, seeds, epochs, tiny:
                      dataclasses.replace(_tiny_regime(name),
                                          weight_decays=(0.0, 1e-4)))
  res = regime.main(["--tiny", "--tasks", "regime_fmnist_mlp",
                     "--optimizers", "aalig,sf_sgd", "--seeds", "2",
                     "--out", str(tmp_path)])
  for name in ("regime.json", "regime.md", "regime_curves.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  t = json.loads((tmp_path / "regime.json").read_text())["tasks"][
      "regime_fmnist_mlp"]
  # 2 step sizes (seed 0) + 1 other weight decay (seed 0) + 1 other seed.
  assert len(t["runs"]["aalig"]) == 4
  best = t["best"]["aalig"]
  assert best["num_seeds"] == 2 and "train_metric" in best
  text = (tmp_path / "regime.md").read_text()
  assert "python -m benchmarks.regime --tiny" in text
  assert "| AALIG |" in text and "| SF-SGD |" in text
  assert "Where AALIG wins and loses" in text
  assert res["tasks"]["regime_fmnist_mlp"]["sections_epochs"] == 1


def test_aov_rules_suite_smoke(tmp_path: pathlib.Path):
  """The AOV-rule suite end to end on a tiny task: every (momentum, rule)
  gets a row, the raw records carry the zero-step shares, and the plot is
  written."""
  from benchmarks import aov_rules
  aov_rules.main(["--smoke", "--tasks", "mf_rank4", "--seeds", "2",
                  "--rules", "paper,reflect,reset", "--out", str(tmp_path)])
  res = json.loads((tmp_path / "aov_rules.json").read_text())
  recs = res["tasks"]["mf_rank4"]["records"]
  assert sorted(recs) == sorted(f"{m}|{r}" for m in ("0", "0.9")
                                for r in ("paper", "reflect", "reset"))
  for rs in recs.values():
    assert len(rs) == 2 * len(res["tasks"]["mf_rank4"]["grid"])
    for r in rs:
      assert 0.0 <= r["zero_share"] <= 1.0 and np.isfinite(
          r["final_train_loss"])
  md = (tmp_path / "aov_rules.md").read_text()
  assert md.count("| 0 | reflect |") == md.count("| 0.9 | reflect |") == 1
  assert "Smoke run" in md and "### The stall case" not in md
  assert (tmp_path / "aov_rules.png").stat().st_size > 10_000
  with pytest.raises(ValueError, match="aov_rule"):
    aov_rules.resolve("nope")


def test_gpu_script_refuses_a_machine_without_a_gpu(tmp_path: pathlib.Path):
  """`bash benchmarks/gpu.sh` on the CPU says what to run instead."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "cpu":
    pytest.skip("a GPU is visible")
  root = pathlib.Path(__file__).resolve().parents[1]
  env = {k: v for k, v in os.environ.items() if k != "ALLOW_CPU"}
  env.update(PYTHON=sys.executable, JAX_PLATFORMS="cpu")
  done = subprocess.run(["bash", str(root / "benchmarks" / "gpu.sh"),
                         str(tmp_path / "out")], cwd=root, env=env,
                        capture_output=True, text=True, timeout=120,
                        check=False)
  assert done.returncode == 2, done.stdout + done.stderr
  assert "benchmarks.run --only overhead" in done.stdout
  assert not (tmp_path / "out" / "results.json").exists()
