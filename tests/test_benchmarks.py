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


def test_gpu_probe_smoke(tmp_path: pathlib.Path):
  """The probe's variants compile and time; the no-cond one has no cond."""
  probe = pytest.importorskip("benchmarks.gpu_probe")
  out = probe.main(["--models", "linear", "--rounds", "1", "--variants",
                    "sgd,aalig,aalig_noswitch,aalig_nocond",
                    "--json", str(tmp_path / "p.json"),
                    "--hlo-dir", str(tmp_path / "hlo")])
  res = out["models"]["linear"]
  assert res["aalig"]["conditionals"] == 2
  assert res["aalig_noswitch"]["conditionals"] == 1
  assert res["aalig_nocond"]["conditionals"] == 0
  assert all(r["median_s"] > 0 for r in res.values())
  assert (tmp_path / "p.json").exists()
  text = (tmp_path / "hlo" / "linear_aalig_nocond_step.txt").read_text()
  assert "ENTRY" in text and " conditional(" not in text


def test_lean_step_smoke(tmp_path: pathlib.Path):
  """Issue 13's step benchmark end to end, in a few steps: every optimiser
  (the baseline tree included) is compiled, counted and timed, and the
  record says how the indices were drawn."""
  from benchmarks import lean_step
  root = pathlib.Path(__file__).resolve().parents[1]
  out = tmp_path / "lean.json"
  lean_step.main(["--rounds", "2", "--steps", "2", "--compile-reps", "1",
                  "--n-big", "5000", "--indices", "random", "--baseline",
                  str(root), "--floors", "--json", str(out)])
  res = json.loads(out.read_text())
  names = {"sgd", "polyak_sgd", "polyak_nesterov", "aalig_N1e+03",
           "aalig_N5e+03", "base_aalig_N1e+03", "base_aalig_N5e+03",
           "floor_tables", "floor_tables_cond", "floor_tables_late_cond"}
  assert set(res["hlo_opt_part"]) == names
  assert set(res["step"]["vs_polyak_nesterov"]) == names
  hlo = res["hlo_opt_part"]
  # The tables' size changes no temporary buffer, and nothing is copied.
  assert hlo["aalig_N1e+03"]["temp_bytes"] == hlo["aalig_N5e+03"]["temp_bytes"]
  assert hlo["aalig_N1e+03"]["copies"] == 0
  assert hlo["aalig_N1e+03"] == hlo["base_aalig_N1e+03"]
  assert hlo["polyak_nesterov"]["kernels"] > hlo["polyak_sgd"]["kernels"]
  assert res["environment"]["indices"] == "random"
  assert all(r["median_us"] > 0 for r in res["opt_part"]["vs_sgd"].values())


@pytest.mark.parametrize("section_cond,steps_per_section",
                         [(None, 1), ("early", 1), ("late", 1),
                          ("early", 10**9), ("late", 10**9)])
def test_lean_step_floor_does_the_work_it_stands_for(section_cond,
                                                     steps_per_section):
  """The floor that bounds issue 13's targets is not a stub: it takes the
  Polyak step of the batch's mean gap with Nesterov momentum, writes the
  batch's losses into its table, counts the step, and (with a section cond)
  updates the other table in place when the cond is due."""
  from benchmarks import lean_step
  n = 1000
  tx = lean_step.table_floor(n, section_cond, steps_per_section)
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  # ||g||^2 = 42: the step is below its cap, so the gap, the gathered AOVs
  # and the norm all show in the update.
  grads = {"w": jnp.full((3, 2), 2.0), "b": jnp.full(2, -3.0)}
  state = tx.init(params)
  aov = jnp.linspace(0.0, 0.5, n)
  state = ((aov, state[0][1], state[0][2]),) + tuple(state[1:])
  idx = jnp.array([3, 700, 42, 999], jnp.int32)
  losses = jnp.array([2.0, 1.5, 0.25, 3.0])
  update = jax.jit(functools.partial(tx.update, losses=losses, indices=idx))
  updates, new_state = update(grads, state, params)
  gap = float(np.mean(np.asarray(losses) - np.asarray(aov)[np.asarray(idx)]))
  lr = gap / (6 * 4.0 + 2 * 9.0 + 1e-5)
  assert 0 < lr < 0.05
  # Nesterov from a zero trace: (1 + 0.9) times the step.
  expected = jax.tree.map(lambda g: -1.9 * lr * g, grads)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  (new_aov, last, count), _ = new_state
  np.testing.assert_array_equal(np.asarray(last)[np.asarray(idx)], losses)
  assert int(count) == 1
  if section_cond is not None and steps_per_section == 1:  # A section end.
    np.testing.assert_array_equal(new_aov, np.minimum(last, aov))
  else:
    np.testing.assert_array_equal(new_aov, aov)
  compiled = lean_step.opt_part(tx).lower(
      params, state, grads, jnp.float32(1.0), losses, idx).compile()
  counts = lean_step.hlo_counts(compiled)
  assert counts["ops"].get("conditional", 0) == (section_cond is not None)
  # Tables are written in place (a scalar copy of the count at most).
  assert "f32[1000]{0} copy(" not in compiled.as_text()


def test_profile_threads_smoke(tmp_path):
  """The thread profile runs as documented, in a process of its own, and
  finds the kernels of both programs (none would mean the profiler stopped
  recording XLA:CPU's kernels)."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = tmp_path / "threads.json"
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-m", "benchmarks.profile_threads",
                  "--steps", "3", "--json", str(out)],
                 cwd=root, env=env, check=True, capture_output=True,
                 timeout=600)
  res = json.loads(out.read_text())
  for name in ("aalig", "floor_tables_late_cond"):
    assert res[name]["per_step"] >= 10, res
    assert 0 < res[name]["on_busiest_thread"] <= res[name]["per_step"]
    assert 0 <= res[name]["overlap_fraction"] <= 1
  assert res["aalig"]["per_step"] > res["floor_tables_late_cond"]["per_step"]


def test_hlo_conditional_branches_reads_both_forms_and_refuses_a_lost_name():
  """A predicate's conditional is read as cond orders it (false first); a
  branch whose body cannot be found raises instead of reading as empty."""
  from benchmarks import hlo
  def comp(name, body):
    return (f"%{name} (a: f32[3]) -> (f32[3]) {{\n  %a = f32[3]{{0}} "
            f"parameter(0)\n{body}  ROOT %r = (f32[3]{{0}}) tuple(%a)\n}}\n\n")
  cond = ("  %c = (f32[3]{0}) conditional(pred[] %p, f32[3]{0} %x, "
          "f32[3]{0} %x), true_computation=%t.1, false_computation=%f.2\n")
  text = ("HloModule m\n\n"
          + comp("t.1", "  %s = f32[3]{0} sine(f32[3]{0} %a)\n")
          + comp("f.2", "")
          + "ENTRY %main (p: pred[], x: f32[3]) -> (f32[3]) {\n"
          "  %p = pred[] parameter(0)\n  %x = f32[3]{0} parameter(1)\n"
          + cond + "}\n")
  assert hlo.conditional_branches(text) == [("(f32[3]{0})", [{}, {"sine": 1}])]
  with pytest.raises(ValueError, match="no computation %t.1"):
    hlo.conditional_branches(text.replace("%t.1 (", "%t.9 ("))


def test_hlo_parser_counts_kernels_as_its_docstring_says():
  """benchmarks.hlo is shared by the reports and the HLO tests: its example
  runs (benchmarks are outside the doctest paths), and an op with a long
  tuple output is counted."""
  import doctest
  from benchmarks import hlo, profile_threads
  assert doctest.testmod(hlo).failed == 0
  run = doctest.testmod(profile_threads)  # overlap_fraction's example.
  assert run.attempted and not run.failed
  line = ("  %c = (f32[], f32[], f32[], f32[], f32[], /*index=5*/f32[]) "
          "conditional(%p, %a, %b), branch_computations={%x, %y}")
  assert hlo.opcode(line) == "conditional"
  text = "\n".join(["HloModule m", "", "ENTRY %main {", line,
                    "  ROOT %t = () tuple()", "}"])
  assert hlo.entry_kernels(text) == {"conditional": 1}
