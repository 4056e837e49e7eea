"""AALIG's AOV rules side by side: the evaluation suite of ``aov_rule=``.

Every rule runs with the same protocol: each task in the paper's settings
(:mod:`benchmarks.tasks`) or one of the noisy convex problems with a known
optimum (:mod:`benchmarks.convex_tasks`), Nesterov momentum 0 and 0.9, every
maximal step size of the task's power-of-ten grid and several seeds, all
configurations of one (rule, momentum) in one vmapped program; SGD with the
paper's step schedule and with exponential decays runs on the task's SGD
grid as the annealing reference. Per rule it reports the final training
loss (against the floor where known, and its excess over the floor) at the
step size chosen on the mean final training loss, the share of grid points
whose every seed ends within 5% of the floor (or, where the floor is 0 or
unknown, within 5% of the best loss any rule reached), the share of batches
with a zero step size (over the run, and over its last section: a frozen run
steps 0 in every batch) and the validation metric.

Run (results in ``benchmarks/results/aov_rules.{json,md,png}``)::

    python -m benchmarks.aov_rules                 # Sec. 5.1 + convex tasks
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
from benchmarks import convex_tasks
from benchmarks import engine
from benchmarks import report_aov_rules as report
from benchmarks import regime_tasks
from benchmarks import tasks as tasks_lib
from examples.common import optimizers

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")
DEFAULT_TASKS = ("mf_rank1", "mf_rank4", "mf_rank10", "mf_full",
                 "rbf_mushrooms") + convex_tasks.CONVEX_TASK_NAMES
SMOKE_TASKS = ("mf_rank4", "ls_noisy")  # --smoke: about a minute
MOMENTA = (0.0, 0.9)
RULES = report.RULES  # the default comparison


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
    # Tried for issue 27 (docs/algorithm.md, "Choosing an AOV rule"): how far
    # above its loss a reached AOV may stay, and how fast it comes down.
    # Never above the loss after a section end: just below it, at it, or at
    # most d/2 above it.
    "track": _candidate(lambda a, d, lo, b: (
        jnp.maximum(jnp.minimum(a - d / 2, lo - d / 2), b), d)),
    "pin": _candidate(lambda a, d, lo, b: (
        jnp.maximum(jnp.minimum(a - d / 2, lo), b), d)),
    "cap": _candidate(lambda a, d, lo, b: (
        jnp.maximum(jnp.minimum(a - d / 2, lo + d / 2), b), d)),
    # Halfway (or a quarter of the way) down to the loss, at least d/2: the
    # overshoot shrinks geometrically; "anneal" adds a doubling step.
    "halve": _candidate(lambda a, d, lo, b: (
        jnp.maximum(jnp.minimum(a - d / 2, a / 2 + lo / 2), b), d)),
    "quarter": _candidate(lambda a, d, lo, b: (
        jnp.maximum(jnp.minimum(a - d / 2, lo + (a - lo) / 4), b), d)),
    # As halve, the step doubled only while the overshoot exceeds it, or
    # raised to the overshoot.
    "halve_grow": _candidate(lambda a, d, lo, b: (
        jnp.maximum(jnp.minimum(a - d / 2, a / 2 + lo / 2), b),
        jnp.where(a - lo > d, 2 * d, d))),
    "hmax": _candidate(lambda a, d, lo, b: (
        jnp.maximum(jnp.minimum(a - d / 2, a / 2 + lo / 2), b),
        jnp.maximum(d, a - lo))),
    "anneal_max": _candidate(lambda a, d, lo, b: (
        jnp.maximum(jnp.minimum(a - d / 2, a / 2 + lo / 2), b),
        jnp.maximum(2 * d, a - lo))),
    # The paper's step, doubled at each consecutive reach.
    "paper_double": _candidate(lambda a, d, lo, b: (
        jnp.maximum(a - d / 2, b), 2 * d)),
    # As anneal, but a loss that fell below half the AOV's height above the
    # bound sends the AOV halfway from the loss to the bound.
    "jump": _candidate(lambda a, d, lo, b: (
        jnp.where(a - lo > lo - b, b + (lo - b) / 2,
                  jnp.maximum(jnp.minimum(a - d / 2, a / 2 + lo / 2), b)),
        2 * d)),
}


def resolve(rule: str):
  """A rule by name: the library's (``aov_rule=``) or a candidate."""
  if rule in CANDIDATES:
    return CANDIDATES[rule]
  if rule in REFERENCES:
    return rule
  try:
    aalig_optax.scale_by_aalig(1.0, 1, 1, 1, aov_rule=rule)
  except ValueError as e:
    raise ValueError(f"{e} Or a candidate of benchmarks.aov_rules: "
                     f"{tuple(CANDIDATES)}.") from None
  return rule


# The annealing references: not AOV rules but SGD (Nesterov momentum as the
# suite's) with a schedule, on the task's SGD grid. "sgd_step" is the paper's
# step schedule (x0.1 at 50% and 75% of the steps); "sgd_expK" decays the
# step size exponentially to 10^-K of its start over the run (the report
# takes the best K: a tuned exponential decay).
REFERENCES = ("sgd_step", "sgd_exp1", "sgd_exp2", "sgd_exp3")


def _reference(name, lr, momentum, ctx):
  if name == "sgd_step":
    sched = optimizers.learning_rate(lr, ctx, "step")
  else:
    sched = optax.exponential_decay(
        lr, ctx.total_steps, 10.0 ** -int(name[len("sgd_exp"):]))
  return optax.sgd(sched, momentum=momentum or None, nesterov=bool(momentum))


def _build(rule, lr, momentum, ctx):
  if isinstance(rule, str) and rule in REFERENCES:
    return _reference(rule, lr, momentum, ctx)
  return aalig_optax.aalig(lr, ctx.num_examples, ctx.steps_per_epoch,
                           ctx.epochs_per_section, momentum=momentum,
                           aov_rule=rule)


class Runner:
  """One task's programs: a vmapped epoch per (rule, momentum)."""

  def __init__(self, task: tasks_lib.Task):
    self.task = task
    self.progs = engine.Programs(task)
    self.data = {k: jnp.asarray(v) for k, v in task.data.items()}
    self._epochs: dict[Any, Callable] = {}

  def _epoch_fn(self, rule, momentum):
    key = (rule, momentum)
    reference = rule in REFERENCES
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
        if reference:
          u, s = tx.update(g, s, p)
          zero = jnp.zeros([], bool)
        else:
          u, s = tx.update(g, s, p, losses=losses, indices=ib)
          zero = s[0].step_size == 0
        return (optax.apply_updates(p, u), r, s), zero

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
    reached = (np.full(len(configs), np.nan) if rule in REFERENCES
               else np.asarray(jax.vmap(
                   lambda s: aalig_optax.aalig_metrics(s)["reached_fraction"])(
                       opt_state[0])))
    return [{
        "lr": float(lr), "seed": int(seed),
        "train_loss": [float(t[i]) for t in train_curve],
        "final_train_loss": float(train_curve[-1][i]),
        "val_metric": float(vm[i]),
        "zero_share": float(zero_curve[:, i].mean()),
        "zero_share_last": float(zero_curve[-last:, i].mean()),
        "reached_fraction": float(reached[i]),
    } for i, (lr, seed) in enumerate(configs)]



def make_task(name: str, seeds: int) -> tasks_lib.Task:
  """A task of :mod:`benchmarks.tasks` or :mod:`benchmarks.convex_tasks`."""
  if name in convex_tasks.CONVEX_TASK_NAMES:
    return convex_tasks.make_convex_task(name, seeds)
  return tasks_lib.make_task(name, "cpu", seeds, seeds)


def _floor(task) -> float | None:
  """The task's loss floor; 0 where it is 0 up to rounding."""
  f = task.loss_floor
  if f is None:
    return 0.0 if task.name == "mf_full" else None
  return 0.0 if f < 1e-10 else float(f)


def run(task_names, rules, seeds: int, smoke: bool = False,
        log=print) -> dict:
  """Every (task, momentum, rule) of the suite; the raw results."""
  out = {"tasks": {}}
  for name in task_names:
    task = make_task(name, seeds)
    if smoke:
      task = tasks_lib.tiny(task)
    grid = tuple(task.grids["aalig"])
    sgd_grid = tuple(task.grids.get("sgd", task.grids.get("sgd_step", grid)))
    runner = Runner(task)
    recs = {}
    for momentum in MOMENTA:
      for rule in rules:
        t0 = time.time()
        recs[f"{momentum:g}|{rule}"] = runner.run(
            rule, momentum, sgd_grid if rule in REFERENCES else grid,
            range(task.seeds))
        log(f"{name} momentum {momentum:g} {rule}: {time.time() - t0:.0f} s",
            flush=True)
    out["tasks"][name] = {
        "label": task.label, "notes": task.notes, "floor": _floor(task),
        "grid": list(grid), "sgd_grid": list(sgd_grid), "seeds": task.seeds,
        "metric": task.metric,
        "records": recs}
  return out


def rewrite(stem: str) -> None:
  """Regenerates the report and plot of an existing results file."""
  with open(stem + ".json", encoding="utf-8") as f:
    res = json.load(f)
  with open(stem + ".md", "w", encoding="utf-8") as f:
    f.write(report.markdown(res))
  report.plot(res, stem + ".png")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0] + " Rules: the library's "
      f"{tuple(r for r in RULES if r != 'fixed')}, the references 'fixed' "
      f"and {REFERENCES}, candidates "
      f"{tuple(c for c in CANDIDATES if c != 'fixed')}.")
  parser.add_argument(
      "--tasks", default=None,
      help="comma-separated task names of benchmarks.tasks or "
      f"benchmarks.convex_tasks (default: {','.join(DEFAULT_TASKS)}; with "
      f"--smoke {','.join(SMOKE_TASKS)}; also rbf_ijcnn1, "
      "regime_fmnist_mlp, regime_tolstoi_lstm)")
  parser.add_argument("--rules", default=",".join(RULES + REFERENCES),
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
  if args.tasks is None:
    args.tasks = ",".join(SMOKE_TASKS if args.smoke else DEFAULT_TASKS)
  rules = args.rules.split(",")
  for r in rules:
    try:
      resolve(r)
    except ValueError as e:
      parser.error(str(e))
  known = (tasks_lib.TASK_NAMES + tasks_lib.SHORT_TASK_NAMES
           + regime_tasks.REGIME_TASK_NAMES + convex_tasks.CONVEX_TASK_NAMES)
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
    f.write(report.markdown(res))
  report.plot(res, stem + ".png")
  print(report.markdown(res))
  print(f"Wrote {stem}.json, .md and .png")


if __name__ == "__main__":
  main()
