"""AALIG's AOV rules side by side: the evaluation suite of ``aov_rule=``.

Every rule runs with the same protocol: each task in the paper's settings
(:mod:`benchmarks.tasks`), Nesterov momentum 0 and 0.9, every maximal step
size of the task's power-of-ten grid and several seeds, all configurations
of one (rule, momentum) in one vmapped program. Per rule it reports the final
training loss (against the floor where known) at the step size chosen on the
mean final training loss, the share of grid points whose every seed ends
within 5% of the floor (or, where the floor is 0 or unknown, within 5% of
the best loss any rule reached), the share of batches with a zero step size
(over the run, and over its last section: a frozen run steps 0 in every
batch) and the validation metric.

Run (results in ``benchmarks/results/aov_rules.{json,md,png}``)::

    python -m benchmarks.aov_rules                 # Sec. 5.1's MF + mushrooms
    python -m benchmarks.aov_rules --tasks regime_fmnist_mlp --seeds 2
    python -m benchmarks.aov_rules --smoke         # a minute, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import aalig_optax
from benchmarks import engine
from benchmarks import regime_tasks
from benchmarks import tasks as tasks_lib

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")
DEFAULT_TASKS = ("mf_rank1", "mf_rank4", "mf_rank10", "mf_full",
                 "rbf_mushrooms")
MOMENTA = (0.0, 0.9)
RULES = ("paper", "reflect", "fixed")  # the default comparison
WITHIN = 0.05  # "within 5% of the floor"
ZERO_FLOOR_TARGET = 1e-6  # where the floor is 0: "near it" means below this


def _f32(aov, d, lo, bound):
  return (aov.astype(jnp.float32), d.astype(jnp.float32),
          jnp.asarray(lo, jnp.float32), jnp.asarray(bound, jnp.float32))


def _not_reached(a, d, lo):
  """The paper's not-reached half, shared by every candidate below."""
  up = (lo > a) | (jnp.isnan(a) & ~jnp.isnan(lo))
  return up, jnp.where(up, lo / 2 - a / 2, d), a / 2 + lo / 2


def _candidate(down_fn):
  """A rule that differs from the paper's only where an AOV was reached:
  ``down_fn(a, d_new, lo, bound) -> (new aov, new step)`` there."""
  def rule(aov, aov_step, lo, bound):
    a, d, lo, bound = _f32(aov, aov_step, lo, bound)
    _, new_d, up_a = _not_reached(a, d, lo)
    down_a, down_d = down_fn(a, new_d, lo, bound)
    reached = lo <= a
    new_a = jnp.where(reached, down_a, jnp.where(jnp.isnan(lo), a, up_a))
    return new_a, jnp.where(reached, down_d, new_d)
  return rule


# Rules tried and dropped (kept here so that their numbers can be rerun;
# benchmarks/results/aov_rules.md has them). Each changes only the reached
# case of the paper's rule. "fixed" is a reference, not a rule: AOVs stay at
# the lower bound, i.e. ALI-G's step size run through AALIG's code.
CANDIDATES: dict[str, Callable] = {
    "fixed": lambda aov, aov_step, lo, bound: (aov, aov_step),
    # Down from min(AOV, loss) rather than from the AOV, by the paper's d/2.
    "min_step": _candidate(lambda a, d, lo, b: (
        jnp.maximum(jnp.minimum(a, lo) - d / 2, b), d)),
    # As min_step, with d doubled at each reach (consecutive reaches
    # accelerate; the variant of the authors' unreleased code, from min).
    "min_double": _candidate(lambda a, d, lo, b: (
        jnp.maximum(jnp.minimum(a, lo) - d, b), 2 * d)),
    # Halfway from the loss reached to the bound (bisection downwards).
    "bisect": _candidate(lambda a, d, lo, b: (b + (lo - b) / 2, d)),
    # Back to the bound: ALI-G until the AOV is not reached again.
    "reset": _candidate(lambda a, d, lo, b: (b + 0 * a, d)),
}


# What each rule does where an AOV was reached (l <= a; d its last increase,
# B the lower bound), for the report.
RULE_NOTES = {
    "paper": "a <- max(a - d/2, B): the paper's Algorithm 2 (default)",
    "reflect": "a <- max(l - max(a - l + d/2, (l - B)/4), B): the library's "
               "aov_rule=\"reflect\"",
    "fixed": "reference: AOVs never move from B (ALI-G's step size)",
    "min_step": "a <- max(min(a, l) - d/2, B): from the loss, by the "
                "paper's step (dropped: freezes at small and large steps)",
    "min_double": "a <- max(min(a, l) - d, B), d doubled at each reach "
                  "(dropped: freezes at the grid's ends)",
    "bisect": "a <- B + (l - B)/2 (dropped: ALI-G-like, less annealing, "
              "worse than reflect on the grid and on rank 10)",
    "reset": "a <- B until not reached again (dropped: as good as reflect "
             "on the interpolating problems, worse at large steps on ranks "
             "1 and 4)",
}


def resolve(rule: str):
  """A rule by name: the library's (``aov_rule=``) or a candidate."""
  if rule in CANDIDATES:
    return CANDIDATES[rule]
  try:
    aalig_optax.scale_by_aalig(1.0, 1, 1, 1, aov_rule=rule)
  except ValueError as e:
    raise ValueError(f"{e} Or a candidate of benchmarks.aov_rules: "
                     f"{tuple(CANDIDATES)}.") from None
  return rule


def _build(rule, lr, momentum, ctx):
  return aalig_optax.aalig(lr, ctx.num_examples, ctx.steps_per_epoch,
                           ctx.epochs_per_section, momentum=momentum,
                           aov_rule=rule)


class Runner:
  """One task's programs: a vmapped epoch per (rule, momentum)."""

  def __init__(self, task: tasks_lib.Task):
    self.task = task
    self.progs = engine.Programs(task)
    self._epochs: dict[Any, Callable] = {}

  def _epoch_fn(self, rule, momentum):
    key = (rule, momentum)
    rule = resolve(rule)
    if key in self._epochs:
      return self._epochs[key]
    ctx, progs = self.task.ctx, self.progs

    def one(params, rest, opt_state, lr, idx, x_all, y_all):
      tx = _build(rule, lr, momentum, ctx)

      def body(carry, ib):
        p, r, s = carry
        (loss, (losses, r)), g = jax.value_and_grad(
            progs._loss_fn, has_aux=True)(p, r, x_all[ib], y_all[ib])
        u, s = tx.update(g, s, p, losses=losses, indices=ib)
        return (optax.apply_updates(p, u), r, s), s[0].step_size == 0

      (params, rest, opt_state), zero = jax.lax.scan(
          body, (params, rest, opt_state), idx)
      return params, rest, opt_state, jnp.mean(zero.astype(jnp.float32))

    fn = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, 0, None, None)),
                 donate_argnums=(0, 1, 2))
    self._epochs[key] = fn
    return fn

  def run(self, rule, momentum: float, lrs, seeds) -> list[dict]:
    """Trains every (lr, seed); one record each, with curves."""
    task, ctx = self.task, self.task.ctx
    epoch_fn = self._epoch_fn(rule, momentum)
    rule = resolve(rule)
    configs = [(lr, seed) for lr in lrs for seed in seeds]
    lr_arr = jnp.asarray([c[0] for c in configs], jnp.float32)
    models = [engine._split(task.make_model(c[1])) for c in configs]
    params = engine._stack([m[1] for m in models])
    rest = engine._stack([m[2] for m in models])
    init = jax.jit(jax.vmap(lambda p, lr: _build(rule, lr, momentum,
                                                 ctx).init(p)))
    opt_state = jax.tree.map(jnp.array, init(params, lr_arr))
    d = self.data
    s_e, b = ctx.steps_per_epoch, ctx.batch_size
    train_curve, zero_curve = [], []
    for epoch in range(task.epochs):
      idx = np.stack([
          np.random.default_rng([c[1], epoch]).permutation(task.num_train)
          [:s_e * b].reshape(s_e, b) for c in configs]).astype(np.int32)
      params, rest, opt_state, zero = epoch_fn(
          params, rest, opt_state, lr_arr, jnp.asarray(idx), d["x_train"],
          d["y_train"])
      zero_curve.append(np.asarray(zero))
      if task.eval_every_epoch or epoch == task.epochs - 1:
        tl, _ = self.progs.evaluate(params, rest, d["x_train"], d["y_train"])
        train_curve.append(np.asarray(tl))
    _, vm = self.progs.evaluate(params, rest, d["x_val"], d["y_val"])
    vm = np.asarray(vm)
    zero_curve = np.stack(zero_curve)  # [epochs, configs]
    last = max(1, ctx.epochs_per_section)
    core = opt_state[0]
    return [{
        "lr": float(lr), "seed": int(seed),
        "train_loss": [float(t[i]) for t in train_curve],
        "final_train_loss": float(train_curve[-1][i]),
        "val_metric": float(vm[i]),
        "zero_share": float(zero_curve[:, i].mean()),
        "zero_share_last": float(zero_curve[-last:, i].mean()),
        "reached_fraction": float(core.reached_fraction[i]),
    } for i, (lr, seed) in enumerate(configs)]

  @property
  def data(self):
    if not hasattr(self, "_data"):
      self._data = {k: jnp.asarray(v) for k, v in self.task.data.items()}
    return self._data


def _floor(task) -> float | None:
  """The task's loss floor; 0 where it is 0 up to rounding."""
  f = task.loss_floor
  if f is None:
    return 0.0 if task.name == "mf_full" else None
  return 0.0 if f < 1e-10 else float(f)


def _near(loss: float, floor: float | None, best: float) -> bool:
  """Whether a final training loss counts as "at the floor" (see module)."""
  if floor is None:
    return loss <= (1 + WITHIN) * best
  if floor == 0:
    return loss <= ZERO_FLOOR_TARGET
  return loss <= (1 + WITHIN) * floor


def summarise(task_res: dict) -> list[dict]:
  """One row per (momentum, rule): the tuned point and the grid's shares."""
  floor = task_res["floor"]
  recs = task_res["records"]
  best = min(r["final_train_loss"] for rs in recs.values() for r in rs
             if np.isfinite(r["final_train_loss"]))
  rows = []
  for key, rs in recs.items():
    momentum, rule = key.split("|")
    lrs = sorted({r["lr"] for r in rs})
    by_lr = {lr: [r for r in rs if r["lr"] == lr] for lr in lrs}

    def mean_loss(lr):
      v = [r["final_train_loss"] for r in by_lr[lr]]
      return np.mean(v) if np.all(np.isfinite(v)) else np.inf

    tuned = min(lrs, key=mean_loss)
    at = by_lr[tuned]
    losses = np.array([r["final_train_loss"] for r in at])
    near = [all(_near(r["final_train_loss"], floor, best) for r in by_lr[lr])
            for lr in lrs]
    rows.append({
        "momentum": float(momentum), "rule": rule, "tuned_lr": tuned,
        "loss_mean": float(losses.mean()), "loss_std": float(losses.std()),
        "loss_worst": float(losses.max()),
        "vs_floor": (float(losses.mean() / floor) if floor else None),
        "worst_vs_floor": (float(losses.max() / floor) if floor else None),
        "seeds_near": int(sum(_near(x, floor, best) for x in losses)),
        "num_seeds": len(losses),
        "grid_near": float(np.mean(near)), "grid_points": len(lrs),
        "zero_share": float(np.mean([r["zero_share"] for r in at])),
        "zero_share_last": float(np.mean([r["zero_share_last"] for r in at])),
        "grid_zero_share_last": float(np.mean(
            [r["zero_share_last"] for r in rs])),
        "val_metric": float(np.mean([r["val_metric"] for r in at])),
        "val_metric_std": float(np.std([r["val_metric"] for r in at])),
    })
  return rows


def _fmt_loss(row, floor):
  if floor:
    return (f"x{row['vs_floor']:.4f} (worst x{row['worst_vs_floor']:.4f})")
  return f"{row['loss_mean']:.2e} ± {row['loss_std']:.1e}"


def _ordered(rules) -> list[str]:
  """The default rules first, in RULES' order, then the others by name."""
  return sorted(rules, key=lambda r: (RULES.index(r) if r in RULES
                                      else len(RULES), r))


def _at(task_res: dict, momentum: float, rule: str, lr: float) -> list:
  return [r for r in task_res["records"].get(f"{momentum:g}|{rule}", [])
          if r["lr"] == lr]


def targets(results: dict) -> list[str]:
  """The issue's targets, where the run covers them: the stall case, the
  interpolating problems, and where a rule does worse than the paper's."""
  out = []
  t = results["tasks"].get("mf_rank4")
  if t and 1.0 in t["grid"]:
    out += ["### The stall case: rank 4, momentum 0, maximal step size 1", "",
            "| rule | final loss / floor, mean [worst] | seeds within 1% | "
            "zero steps, last section |", "| --- | --- | --- | --- |"]
    for rule in _ordered({k.split("|")[1] for k in t["records"]}):
      rs = _at(t, 0.0, rule, 1.0)
      if not rs:
        continue
      v = np.array([r["final_train_loss"] for r in rs]) / t["floor"]
      z = np.mean([r["zero_share_last"] for r in rs])
      out.append(f"| {rule} | x{v.mean():.4f} [x{v.max():.4f}] | "
                 f"{int((v <= 1.01).sum())}/{len(v)} | {z:.0%} |")
    out.append("")
  inter = [n for n in ("mf_rank10", "mf_full") if n in results["tasks"]]
  if inter:
    out += ["### Interpolating problems: lowest tuned loss (either momentum)",
            "", "| rule | " + " | ".join(inter) + " |",
            "| --- |" + " --- |" * len(inter)]
    rules = _ordered({row["rule"] for n in inter
                      for row in summarise(results["tasks"][n])})
    for rule in rules:
      cells = []
      for n in inter:
        rows = [r for r in summarise(results["tasks"][n])
                if r["rule"] == rule]
        best = min(rows, key=lambda r: r["loss_mean"])
        cells.append(f"{best['loss_mean']:.2e} (worst {best['loss_worst']:.1e};"
                     f" momentum {best['momentum']:g}, step "
                     f"{best['tuned_lr']:g})")
      out.append(f"| {rule} | " + " | ".join(cells) + " |")
    out.append("")
  all_rows = [r for t in results["tasks"].values() for r in summarise(t)]
  out += ["### Robustness over the grid (every task and momentum of this run)",
          "", "| rule | grid points at the floor | zero steps in the last "
          "section, whole grid |", "| --- | --- | --- |"]
  for rule in _ordered({r["rule"] for r in all_rows}):
    rows = [r for r in all_rows if r["rule"] == rule]
    hits = sum(round(r["grid_near"] * r["grid_points"]) for r in rows)
    points = sum(r["grid_points"] for r in rows)
    zero = np.mean([r["grid_zero_share_last"] for r in rows])
    out.append(f"| {rule} | {hits}/{points} | {zero:.0%} |")
  out.append("")
  worse = []
  for name, t in results["tasks"].items():
    rows = summarise(t)
    for row in rows:
      if row["rule"] == "paper":
        continue
      ref = [r for r in rows if r["rule"] == "paper"
             and r["momentum"] == row["momentum"]]
      if not ref:
        continue
      ref = ref[0]
      if (row["loss_mean"] - ref["loss_mean"]
          > row["loss_std"] + ref["loss_std"]):
        worse.append(f"{row['rule']} on {name}, momentum "
                     f"{row['momentum']:g}, training loss: "
                     f"{row['loss_mean']:.4g} ± {row['loss_std']:.2g} "
                     f"against the paper's {ref['loss_mean']:.4g} ± "
                     f"{ref['loss_std']:.2g}")
      sign = 1 if "accuracy" in t["metric"] else -1
      if (sign * (ref["val_metric"] - row["val_metric"])
          > row["val_metric_std"] + ref["val_metric_std"]):
        worse.append(f"{row['rule']} on {name}, momentum "
                     f"{row['momentum']:g}, validation {t['metric']}: "
                     f"{row['val_metric']:.4g} ± {row['val_metric_std']:.2g}"
                     f" against the paper's {ref['val_metric']:.4g} ± "
                     f"{ref['val_metric_std']:.2g}")
  out += ["### Where a rule ends worse than the paper's beyond the seeds' "
          "spread (at each rule's tuned step size: final training loss, and "
          "validation metric; mean difference above the sum of the two "
          "standard deviations)", ""]
  out += [f"- {w}" for w in worse] or ["- nowhere."]
  return out + [""]


def markdown(results: dict) -> str:
  lines = ["# AOV rules: the evaluation suite", "",
           "Written by `python -m benchmarks.aov_rules` (see its docstring "
           "for the protocol).", "",
           f"Command: `{results['command']}`  ",
           f"Wall time: {results['seconds']:.0f} s; "
           + results["environment_line"], ""]
  if results.get("smoke"):
    lines += ["**Smoke run: numbers mean nothing.**", ""]
  lines += [
      "Per task, momentum and rule, at the maximal step size with the lowest "
      "mean final training loss (*tuned*): the final training loss against "
      "the floor (mean over seeds, worst seed), seeds at the floor, the "
      "share of the grid's step sizes at which every seed ends at the floor, "
      "the share of zero-step batches (whole run / last section; last "
      "section over the whole grid) and the validation metric. \"At the "
      f"floor\": within {WITHIN:.0%} of it; where the floor is 0, below "
      f"{ZERO_FLOOR_TARGET:g}; where it is unknown, within {WITHIN:.0%} of "
      "the lowest final loss any rule reached on the task. `fixed` is not a "
      "rule but the reference of AOVs that stay at the lower bound (ALI-G's "
      "step size).", "", "Rules in this run (what a reached AOV does; "
      "the not-reached and never-seen cases are the paper's for all):", ""]
  rules = _ordered({k.split("|")[1] for t in results["tasks"].values()
                    for k in t["records"]})
  lines += [f"- `{r}`: {RULE_NOTES.get(r, 'a callable')}" for r in rules]
  lines += ["", "## Summary", ""] + targets(results)
  for name, t in results["tasks"].items():
    floor = t["floor"]
    fl = ("unknown" if floor is None else f"{floor:.6g}")
    lines += [f"## {t['label']} (`{name}`)", "",
              f"{t['notes']} The suite runs every rule with Nesterov "
              f"momentum 0 and 0.9. Loss floor: {fl}. Grid: "
              f"{', '.join(f'{x:g}' for x in t['grid'])}; seeds "
              f"{t['seeds']}.", "",
              "| momentum | rule | tuned step | final loss | seeds at floor |"
              " grid at floor | zero steps (run / last; grid last) | "
              f"val {t['metric']} |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in summarise(t):
      lines.append(
          f"| {row['momentum']:g} | {row['rule']} | {row['tuned_lr']:g} | "
          f"{_fmt_loss(row, floor)} | {row['seeds_near']}/{row['num_seeds']}"
          f" | {row['grid_near']:.0%} of {row['grid_points']} | "
          f"{row['zero_share']:.0%} / {row['zero_share_last']:.0%}; "
          f"{row['grid_zero_share_last']:.0%} | "
          f"{row['val_metric']:.4g} ± {row['val_metric_std']:.1g} |")
    lines.append("")
  return "\n".join(lines) + "\n"


def plot(results: dict, path) -> None:
  """Final training loss against the maximal step size, per task: one line
  per rule, solid without momentum and dashed with it (robustness across
  the grid is the point), the floor dotted."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from examples.common import plots
  names = list(results["tasks"])
  cols = min(3, len(names))
  rows_ = -(-len(names) // cols)
  fig, axes = plt.subplots(rows_, cols, figsize=(4.6 * cols, 3.6 * rows_),
                           squeeze=False)
  handles = {}
  for ax, name in zip(axes.flat, names):
    t = results["tasks"][name]
    rules = _ordered({k.split("|")[1] for k in t["records"]})
    for key, rs in t["records"].items():
      momentum, rule = key.split("|")
      lrs = sorted({r["lr"] for r in rs})
      y = [np.mean([r["final_train_loss"] for r in rs if r["lr"] == lr])
           for lr in lrs]
      i = rules.index(rule)
      st = plots.style(i, len(lrs))
      st.update(markevery=1)
      (h,) = ax.plot(lrs, y, ls="-" if float(momentum) == 0 else "--",
                     color=f"C{i}", **st)
      handles.setdefault(f"{rule}, momentum {float(momentum):g}", h)
    if t["floor"]:
      ax.axhline(t["floor"], color="k", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("maximal step size")
    ax.set_ylabel("final training loss (mean over seeds)")
    ax.set_title(t["label"], fontsize=9)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  fig.legend(list(handles.values()), list(handles), loc="lower center",
             ncol=min(4, len(handles)), fontsize=8)
  fig.tight_layout(rect=(0, 0.04 + 0.03 * (len(handles) // 4), 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(task_names, rules, seeds: int, smoke: bool = False,
        log=print) -> dict:
  """Every (task, momentum, rule) of the suite; the raw results."""
  out = {"tasks": {}}
  for name in task_names:
    task = tasks_lib.make_task(name, "cpu", seeds, seeds)
    if smoke:
      task = tasks_lib.tiny(task)
    grid = tuple(task.grids["aalig"])
    runner = Runner(task)
    recs = {}
    for momentum in MOMENTA:
      for rule in rules:
        t0 = time.time()
        recs[f"{momentum:g}|{rule}"] = runner.run(rule, momentum, grid,
                                                  range(task.seeds))
        log(f"{name} momentum {momentum:g} {rule}: {time.time() - t0:.0f} s",
            flush=True)
    out["tasks"][name] = {
        "label": task.label, "notes": task.notes, "floor": _floor(task),
        "grid": list(grid), "seeds": task.seeds, "metric": task.metric,
        "records": recs}
  return out


def rewrite(stem: str) -> None:
  """Regenerates the report and plot of an existing results file."""
  with open(stem + ".json", encoding="utf-8") as f:
    res = json.load(f)
  with open(stem + ".md", "w", encoding="utf-8") as f:
    f.write(markdown(res))
  plot(res, stem + ".png")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0] + " Rules: the library's "
      f"{RULES[:2]}, the reference 'fixed', candidates "
      f"{tuple(c for c in CANDIDATES if c != 'fixed')}.")
  parser.add_argument(
      "--tasks", default=",".join(DEFAULT_TASKS),
      help="comma-separated task names of benchmarks.tasks (default: "
      "%(default)s; also rbf_ijcnn1, regime_fmnist_mlp, regime_tolstoi_lstm)")
  parser.add_argument("--rules", default=",".join(RULES),
                      help="comma-separated rules (default: %(default)s)")
  parser.add_argument("--seeds", type=int, default=5,
                      help="seeds per step size (default: %(default)s)")
  parser.add_argument("--out", default=RESULTS_DIR,
                      help="results folder (default: benchmarks/results)")
  parser.add_argument("--name", default="aov_rules",
                      help="the results files' stem")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny data, 2 epochs, 2 step sizes (about a "
                      "minute); numbers mean nothing")
  args = parser.parse_args(argv)
  rules = args.rules.split(",")
  for r in rules:
    try:
      resolve(r)
    except ValueError as e:
      parser.error(str(e))
  known = (tasks_lib.TASK_NAMES + tasks_lib.SHORT_TASK_NAMES
           + regime_tasks.REGIME_TASK_NAMES)
  unknown = [t for t in args.tasks.split(",") if t not in known]
  if unknown:
    parser.error(f"unknown task(s) {unknown}; choose from {known}")
  if args.seeds < 1:
    parser.error(f"--seeds must be at least 1, got {args.seeds}")
  t0 = time.time()
  res = run(args.tasks.split(","), rules, args.seeds, args.smoke)
  from examples.common import report as report_lib
  env = report_lib.environment()
  res.update(
      command="python -m benchmarks.aov_rules " + " ".join(
          sys.argv[1:] if argv is None else argv),
      seconds=time.time() - t0, smoke=args.smoke, environment=env,
      environment_line=(
          f"{env['nproc']} x {env['cpu_model']}, jax "
          f"{env['versions']['jax']}, optax {env['versions']['optax']}, "
          f"flax {env['versions']['flax']}, {env['date_utc']}, commit "
          f"{env['git_commit']}, load average at start "
          f"{env['load_average_at_start'][0]:.1f}."))
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, args.name)
  with open(stem + ".json", "w", encoding="utf-8") as f:
    json.dump(res, f, indent=1)
  with open(stem + ".md", "w", encoding="utf-8") as f:
    f.write(markdown(res))
  plot(res, stem + ".png")
  print(markdown(res))
  print(f"Wrote {stem}.json, .md and .png")


if __name__ == "__main__":
  main()
