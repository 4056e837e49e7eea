"""Optimisation quality: the paper's protocol (Sec. 5) at CPU scale.

For each task and optimiser, the single step-size hyperparameter (the maximal
step size of AALIG, ALI-G and SPS; the learning rate of Adam and of SGD with
its step schedule) is cross-validated over powers of ten, weight decay over
{0, 1e-4} where the paper does it (the image task); every configuration gets
the same epoch budget and several seeds (initialisation and batch order).
The learning-rate-free optimisers of ``optax.contrib`` run once per seed at
their defaults. A configuration's score is its validation metric at the end
of the budget, averaged over seeds; the best configuration of each optimiser
is reported with its validation and test metrics and its final training loss
(mean and standard deviation over seeds).

The tasks are in :mod:`benchmarks.tasks`, the engine that trains a grid of
configurations in one compiled program in :mod:`benchmarks.engine`; this
module is the search.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from benchmarks import engine
from benchmarks import tasks
from benchmarks.tasks import Task
from examples.common import optimizers


def _configs(task: Task, opt: str):
  seeds = list(range(task.seeds))
  if optimizers.SPECS[opt].tuned:
    grid = task.grids[opt]
    return [(lr, wd, s) for lr, wd, s in itertools.product(
        grid, task.weight_decays, seeds)]
  return [(1.0, 0.0, s) for s in seeds]


def _selection_seeds(task: Task) -> int:
  return task.sweep_seeds or task.seeds


def _best_key(task: Task, records: list[dict]):
  """(lr, wd) with the best mean final score on the sweep seeds.

  The score is the validation metric, or the training loss for tasks whose
  result is an optimisation one (``task.select_on``).
  """
  groups = {}
  for r in records:
    if r["seed"] < _selection_seeds(task):
      groups.setdefault((r["lr"], r["wd"]), []).append(
          r[task.select_on][-1])
  higher = task.higher_is_better and task.select_on == "val_metric"
  scores = {k: _nan_to_worst(float(np.mean(v)), higher)
            for k, v in groups.items()}
  return (max if higher else min)(scores, key=scores.get)


def run_optimiser(task: Task, progs: engine.Programs, opt: str, data_dev: dict,
                  log=print) -> dict[str, Any]:
  """Cross-validates `opt` on `task`; returns every configuration's record.

  With ``task.sweep_seeds == 0`` the full grid (learning rates x weight
  decays x seeds) runs. Otherwise (the heavy tasks) the search is staged:
  learning rates at the first weight decay on the first `sweep_seeds` seeds,
  then the other weight decays at the best learning rate, then the best
  pair on the remaining seeds.
  """
  t0 = time.perf_counter()
  seeds = list(range(task.seeds))
  if not optimizers.SPECS[opt].tuned:
    records = engine.train(task, progs, opt, [(1.0, 0.0, s) for s in seeds],
                     data_dev)
  elif not task.sweep_seeds or task.sweep_seeds >= task.seeds:
    records = engine.train(task, progs, opt, _configs(task, opt), data_dev)
  else:
    sweep = seeds[:task.sweep_seeds]
    wds = task.weight_decays
    records = engine.train(task, progs, opt, [
        (lr, wds[0], s) for lr in task.grids[opt] for s in sweep], data_dev)
    if len(wds) > 1:
      lr = _best_key(task, records)[0]
      records += engine.train(task, progs, opt, [
          (lr, wd, s) for wd in wds[1:] for s in sweep], data_dev)
    lr, wd = _best_key(task, records)
    records += engine.train(task, progs, opt, [
        (lr, wd, s) for s in seeds[task.sweep_seeds:]], data_dev)
  wall = time.perf_counter() - t0
  log(f"    {opt:9s} {len(records):3d} runs  {wall:7.1f} s")
  return {"configs": records, "wall_s": wall}


def _nan_to_worst(v, higher):
  return v if math.isfinite(v) else (-math.inf if higher else math.inf)


def select_best(task: Task, opt: str, records: list[dict]) -> dict[str, Any]:
  """The configuration with the best seed-mean final validation metric."""
  groups = {}
  for r in records:
    groups.setdefault((r["lr"], r["wd"]), []).append(r)
  best = _best_key(task, records)
  rs = groups[best]

  def stat(field):
    v = np.asarray([r[field] if not isinstance(r[field], list)
                    else r[field][-1] for r in rs], np.float64)
    return {"mean": float(np.mean(v)), "std": float(np.std(v)),
            "values": [float(x) for x in v]}

  sel = _selection_seeds(task)
  sweep = [{"lr": k[0], "wd": k[1], "val_metric_mean": float(
      np.mean([r["val_metric"][-1] for r in groups[k] if r["seed"] < sel])),
            "train_loss_mean": float(np.mean(
                [r["train_loss"][-1] for r in groups[k] if r["seed"] < sel]))}
           for k in sorted(groups)]
  curve = np.mean(np.asarray([r["epoch_loss"] for r in rs]), axis=0)
  return {
      "optimizer": opt,
      "label": optimizers.SPECS[opt].label,
      "tuned": optimizers.SPECS[opt].tuned,
      "lr": best[0] if optimizers.SPECS[opt].tuned else None,
      "wd": best[1],
      "lr_at_grid_edge": bool(optimizers.SPECS[opt].tuned and best[0] in (
          min(task.grids[opt]), max(task.grids[opt]))),
      "val_metric": stat("val_metric"),
      "test_metric": stat("test_metric"),
      "train_loss": stat("train_loss"),
      "train_metric": stat("train_metric"),
      "epoch_loss_curve": [float(x) for x in curve],
      "sweep": sweep,
      "num_seeds": len(rs),
  }


def run_task(task: Task, optimizers, log=print) -> dict[str, Any]:
  log(f"  task {task.name}: {task.num_train} train, {task.epochs} epochs, "
      f"{task.steps_per_epoch} steps/epoch, {task.seeds} seeds")
  t0 = time.perf_counter()
  progs = engine.Programs(task)
  data_dev = {k: jnp.asarray(v) for k, v in task.data.items()}
  results, best = {}, {}
  for opt in optimizers:
    res = run_optimiser(task, progs, opt, data_dev, log=log)
    results[opt] = res
    best[opt] = select_best(task, opt, res["configs"])
    best[opt]["wall_s"] = res["wall_s"]
  wall = time.perf_counter() - t0
  return {
      "name": task.name, "label": task.label,
      "interpolating": task.interpolating, "metric": task.metric,
      "higher_is_better": task.higher_is_better,
      "epochs": task.epochs, "batch_size": task.batch_size,
      "num_train": task.num_train, "steps_per_epoch": task.steps_per_epoch,
      "seeds": task.seeds, "weight_decays": list(task.weight_decays),
      "grids": {k: list(v) for k, v in task.grids.items()
                if k in optimizers},
      "notes": task.notes, "wall_s": wall, "momentum": task.momentum,
      "select_on": task.select_on, "loss_floor": task.loss_floor,
      "sweep_note": (
          f"Staged search (CPU budget): step sizes at weight decay "
          f"{task.weight_decays[0]:g} on seed 0, then the other weight "
          f"decays at the best step size, then the chosen pair on seeds "
          f"1..{task.seeds - 1}; selection on seed 0's validation metric."
          if task.sweep_seeds and task.sweep_seeds < task.seeds else ""),
      "best": best,
      "runs": {k: v["configs"] for k, v in results.items()},
  }


def run(cfg: dict, log=print) -> dict[str, Any]:
  out = {"config": cfg, "tasks": {}}
  for name in cfg["tasks"]:
    t0 = time.perf_counter()
    task = tasks.make_task(name, cfg["scale"], cfg["seeds"],
                           cfg["heavy_seeds"])
    if cfg.get("tiny"):
      task = tasks.tiny(task)
    log(f"quality: {name} (data ready in {time.perf_counter() - t0:.1f} s)")
    out["tasks"][task.name] = run_task(task, cfg["optimizers"], log=log)
  return out
