"""The paper's image/text regime in miniature: no interpolation, K = 10.

The paper's deep-learning claims (Table 1) are for 200-epoch budgets in 10
sections of 20 epochs, on models that cannot fit their data. This runner
trains that regime at CPU scale (``regime_tasks.REGIME_TASK_NAMES``): models too
small to interpolate, 50 epochs in sections of 5, the paper's weight-decay
grid, every optimiser's step size over powers of ten, SGD with the paper's
step schedule as the reference; the chosen configuration on several seeds.

Run from the project root::

    python -m benchmarks.regime          # both tasks, ~45 min on 2 cores
    python -m benchmarks.regime --tasks regime_fmnist_mlp --seeds 2
    python -m benchmarks.regime --report-only     # regime.md from regime.json

Writes ``regime.json`` (every configuration), ``regime.md`` (tables, where
AALIG wins and loses, the command, machine, versions, wall time) and
``regime_curves.png`` into ``--out`` (default ``benchmarks/results``); the
JSON is rewritten after each task, so an interrupted run keeps the tasks it
finished. Tasks already in ``regime.json`` that this run does not train are
kept (each task records its own command, machine and wall time), so the
tasks may run as separate processes::

    python -m benchmarks.regime --tasks regime_fmnist_mlp &
    python -m benchmarks.regime --tasks regime_tolstoi_lstm
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time

import numpy as np

from benchmarks import quality
from benchmarks import regime_tasks
from benchmarks import tasks
from benchmarks.run import _rounded  # One rounding for both results files.
from examples.common import optimizers
from examples.common import report as report_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
JSON = "regime.json"
MD = "regime.md"
CURVES_PNG = "regime_curves.png"

__all__ = ["main", "write_report"]




def make(name: str, seeds: int, epochs: int, tiny: bool) -> tasks.Task:
  task = tasks.make_task(name, "cpu", seeds, seeds)
  if epochs != task.epochs:
    task = dataclasses.replace(task, epochs=epochs)
  if tiny:
    task = tasks.tiny(task)
    # The staged search still runs all three stages.
    task = dataclasses.replace(task, weight_decays=regime_tasks.PAPER_WDS[:2])
  return task


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(
      description="AALIG in the paper's regime (no interpolation, K = 10), "
      "at CPU scale.")
  parser.add_argument("--tasks",
                      default=",".join(regime_tasks.REGIME_TASK_NAMES),
                      help=f"comma-separated subset of "
                      f"{regime_tasks.REGIME_TASK_NAMES}")
  parser.add_argument("--optimizers",
                      default=",".join(regime_tasks.REGIME_OPTS),
                      help="comma-separated names of "
                      "examples.common.optimizers.SPECS")
  parser.add_argument("--seeds", type=int, default=3,
                      help="seeds of the chosen configuration (the search "
                      "runs on seed 0)")
  parser.add_argument("--epochs", type=int, default=50,
                      help="the budget (AALIG's sections: epochs // 10)")
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  parser.add_argument("--tiny", action="store_true",
                      help="a seconds-long smoke run; numbers mean nothing")
  parser.add_argument("--report-only", action="store_true",
                      help="regenerate regime.md and the plot from "
                      "regime.json")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.report_only:
    results = json.loads((out / JSON).read_text())
    write_report(results, out)
    return results
  if args.seeds < 1:
    parser.error("--seeds must be >= 1")
  opts = args.optimizers.split(",")
  unknown = [o for o in opts if o not in optimizers.SPECS]
  if unknown:
    parser.error(f"unknown optimisers {unknown}")
  command = "python -m benchmarks.regime " + " ".join(
      argv if argv is not None else sys.argv[1:])
  env = report_lib.environment()
  log = lambda msg: print(msg, flush=True)
  log(f"{command.strip()}  [{env['date_utc']}, {env['nproc']} x "
      f"{env['cpu_model']}, {env['backend']}]")
  t_start = time.perf_counter()
  results = {}
  for name in args.tasks.split(","):
    t0 = time.perf_counter()
    task = make(name, args.seeds, args.epochs, args.tiny)
    log(f"regime: {name} (data ready in {time.perf_counter() - t0:.1f} s)")
    res = quality.run_task(task, opts, log=log)
    res.update(sections_epochs=task.ctx.epochs_per_section,
               command=command.strip(), environment=env, tiny=args.tiny,
               run_epochs=args.epochs, run_seeds=args.seeds)
    # Re-read just before writing: another process may have added a task.
    path = out / JSON
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("tasks", {})[task.name] = _rounded(res)
    results.setdefault("optimizers", {}).update({
        k: {"label": v.label, "tuned": v.tuned, "description": v.description}
        for k, v in optimizers.SPECS.items() if k in opts})
    report_lib.write_files(out, {JSON: results}, indent=None)
    write_report(results, out)
  log(f"done in {time.perf_counter() - t_start:.0f} s; results in {out}")
  return results


# --------------------------------------------------------------------------
# The report.


def _pct(v):
  return f"{100 * v:.2f}" if math.isfinite(v) else "nan"


def _pm(stat, fmt):
  return f"{fmt(stat['mean'])} ± {fmt(stat['std'])}"


def _loss(v):
  return f"{v:.4f}" if math.isfinite(v) else "nan"


def _compare(t: dict, labels: dict) -> list[str]:
  """AALIG against each optimiser on test metric, by more than the spread."""
  if "aalig" not in t["best"]:
    return []
  a = t["best"]["aalig"]["test_metric"]
  wins, losses, ties = [], [], []
  for o, b in t["best"].items():
    if o == "aalig":
      continue
    m = b["test_metric"]
    diff = a["mean"] - m["mean"]
    if not t["higher_is_better"]:
      diff = -diff
    spread = max(a["std"], m["std"])
    entry = f"{labels.get(o, o)} ({_pct(m['mean'])}, {100 * diff:+.2f})"
    if not math.isfinite(m["mean"]) or diff > spread:
      wins.append(entry)
    elif not math.isfinite(a["mean"]) or -diff > spread:
      losses.append(entry)
    else:
      ties.append(entry)
  lines = [f"- **{t['label']}**: AALIG's test accuracy {_pm(a, _pct)} %."]
  none = "none"
  lines.append("  AALIG ahead by more than the seed spread of: "
               + (", ".join(wins) or none) + ".")
  lines.append("  AALIG behind by more than the seed spread: "
               + (", ".join(losses) or none) + ".")
  lines.append("  Within the seed spread: " + (", ".join(ties) or none)
               + ".")
  return lines


def write_report(results: dict, out: pathlib.Path) -> None:
  labels = {k: v["label"] for k, v in results["optimizers"].items()}
  lines = [
      "# AALIG in the paper's regime, in miniature", "",
      "Generated by `benchmarks/regime.py` from `regime.json` in this folder;"
      " every number below comes from that file.", ""]
  for t in results["tasks"].values():
    e = t["environment"]
    v = e["versions"]
    dirty = (f" (uncommitted changes in: {', '.join(e['git_dirty_paths'])})"
             if e["git_dirty_paths"] else "")
    lines += [
        f"- **{t['name']}**: `{t['command']}`"
        + (" (**tiny smoke run: numbers mean nothing**)"
           if t["tiny"] else "")
        + f", wall time {t['wall_s']:.0f} s ({t['wall_s'] / 60:.1f} min), "
        f"started {e['date_utc']}. Machine: {e['nproc']} x {e['cpu_model']} "
        f"({e['backend']}, {e['platform']}), shared with other jobs (load "
        f"average at start "
        f"{', '.join(f'{x:.1f}' for x in e['load_average_at_start'])}). "
        f"Python {e['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, optax "
        f"{v['optax']}, flax {v['flax']}, numpy {v['numpy']}, aalig_optax "
        f"{v['aalig_optax']} at commit {e['git_commit']}{dirty}."]
  t0 = next(iter(results["tasks"].values()))
  epochs, seeds = t0["run_epochs"], t0["run_seeds"]
  lines += ["",
      "## The regime", "",
      "The paper's Table 1 (CIFAR, SVHN, Tolstoi) trains models that cannot "
      "fit their data for 200 epochs, AALIG's approximate optimal values "
      "(AOVs) updated at the end of each of K = 10 sections of 20 epochs. "
      f"Here: {epochs} epochs, K = 10 sections of "
      f"{max(1, epochs // 10)} epochs (`RunContext.create(..., "
      "sections=10)`), models sized for 2 CPU cores but, like the paper's, "
      "unable to interpolate (their final training accuracy is in the "
      "tables). Every optimiser's step-size hyperparameter (AALIG, ALI-G, "
      "SPS, MoMo: the maximal step size; SGD, Adam, schedule-free: the "
      "learning rate) is searched over four or five powers of ten (listed per "
      "task), weight decay over "
      "the paper's {0, 1e-5, 1e-4, 1e-3}. The search is staged: step sizes "
      "at weight decay 0 on seed 0, then the three other weight decays at "
      "the best step size on seed 0, then the chosen pair on the remaining "
      "seeds; selection by the final validation accuracy on seed 0. "
      "Reported: the chosen pair's final training loss and accuracy "
      "(full training set, evaluation mode), validation and test accuracy, "
      "mean ± standard deviation over seeds (population std, seeds 0.."
      f"{seeds - 1}: initialisation and batch order). Seed 0 "
      "also chose the configuration, so its validation score is "
      "optimistic; the test set played no part in any choice.", "",
      "Optimisers: " + "; ".join(
          f"**{o['label']}**: {o['description']}"
          for o in results["optimizers"].values()) + ". AALIG, ALI-G and "
      "SGD use Nesterov momentum 0.9; weight decay is AALIG's own argument "
      "(outside the Polyak step), MoMo's and the schedule-free optimisers' "
      "own, and a coupled L2 term (`add_decayed_weights`) for ALI-G, SPS, "
      "SGD and Adam. The schedule-free optimisers are evaluated at "
      "`optax.contrib.schedule_free_eval_params` (their averaged iterate); "
      "their training-curve points below are minibatch losses at the "
      "gradient point y.", "",
      "Wall times (per task here, per optimiser in `regime.json`) are not "
      "step timings: the machine was shared with other jobs, and under the "
      "engine's `vmap` over configurations AALIG's epoch- and section-end "
      "`lax.cond`s become selects that touch its N-entry tables at every "
      "step, which a single unvmapped run does not do. Step cost is "
      "measured in [README.md](README.md), section 1.", ""]
  for tname, t in results["tasks"].items():
    lines += [f"## {t['label']}", "", t["notes"], "",
              f"{t['num_train']} training examples, {t['steps_per_epoch']} "
              f"steps an epoch, AALIG sections of "
              f"{t.get('sections_epochs', '?')} epochs. Task wall time "
              f"{t['wall_s']:.0f} s.", ""]
    grids = "; ".join(
        f"{labels.get(o, o)} {{" + ", ".join(f"{x:g}" for x in g) + "}"
        for o, g in t["grids"].items() if t["best"][o]["tuned"])
    lines += [f"Step-size grids: {grids}.", "",
              "| optimiser | step size | wd | final train loss | train acc "
              "(%) | val acc (%) | test acc (%) | seeds |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    best_test = max(b["test_metric"]["mean"] for b in t["best"].values())
    for o, b in t["best"].items():
      edge = " (edge)" if b["lr_at_grid_edge"] else ""
      lr = "default" if b["lr"] is None else f"{b['lr']:g}"
      test = _pm(b["test_metric"], _pct)
      if b["test_metric"]["mean"] == best_test:
        test = f"**{test}**"
      tm = b.get("train_metric")
      lines.append(
          f"| {labels.get(o, o)} | {lr}{edge} | {b['wd']:g} | "
          f"{_pm(b['train_loss'], _loss)} | "
          f"{_pm(tm, _pct) if tm else 'n/a'} | "
          f"{_pm(b['val_metric'], _pct)} | {test} | {b['num_seeds']} |")
    lines += ["", "<details><summary>The search (seed 0's final validation "
              "accuracy, %, and training loss, per step size and weight "
              "decay)</summary>", "",
              "| optimiser | step size | wd | val acc (%) | train loss |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for o, b in t["best"].items():
      for s in b["sweep"]:
        lines.append(f"| {labels.get(o, o)} | {s['lr']:g} | {s['wd']:g} | "
                     f"{_pct(s['val_metric_mean'])} | "
                     f"{_loss(s['train_loss_mean'])} |")
    lines += ["", "</details>", ""]
  lines += ["## Where AALIG wins and loses (test accuracy)", "",
            "Differences in percentage points (AALIG minus the other); "
            "\"by more than the seed spread\" means by more than the larger "
            "of the two standard deviations over seeds, a rough bar with "
            "three seeds, not a significance test.", ""]
  for t in results["tasks"].values():
    lines += _compare(t, labels)
  lines += ["", "Ranks (1 = best, over the optimisers of the task's run):", ""]
  for t in results["tasks"].values():
    if "aalig" not in t["best"]:
      continue
    bs = t["best"]
    rank = lambda key, hi: 1 + sum(
        (b[key]["mean"] > bs["aalig"][key]["mean"]) == hi
        and b[key]["mean"] != bs["aalig"][key]["mean"] for b in bs.values())
    lines.append(
        f"- **{t['label']}**: AALIG ranks {rank('test_metric', True)} of "
        f"{len(bs)} on test accuracy, {rank('val_metric', True)} on "
        f"validation accuracy and {rank('train_loss', False)} on final "
        f"training loss.")
  lines += ["", f"![training curves]({CURVES_PNG})", "",
            "Training curves: each optimiser's chosen configuration, the "
            "mean minibatch training loss of each epoch (log scale), mean "
            "over seeds with the seeds' range shaded; vertical dotted lines "
            "mark AALIG's section ends (AOV updates).", ""]
  (out / MD).write_text("\n".join(lines))
  curves_png(results, labels, out / CURVES_PNG)


def curves_png(results: dict, labels: dict, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top
  ts = list(results["tasks"].values())
  fig, axes = plt.subplots(1, len(ts), figsize=(6.2 * len(ts), 4.6),
                           squeeze=False)
  markers = "osD^vP*Xh<>"
  # AALIG in black, the others in tab10's ten colours: no colour twice.
  others = list(plt.get_cmap("tab10").colors)
  for ax, t in zip(axes.flat, ts):
    colours = iter(others * 2)
    for i, (o, b) in enumerate(t["best"].items()):
      colour = "k" if o == "aalig" else next(colours)
      runs = [r for r in t["runs"][o]
              if (r["lr"], r["wd"]) == (b["lr"] if b["lr"] is not None
                                        else 1.0, b["wd"])]
      c = np.asarray([r["epoch_loss"] for r in runs])
      ep = np.arange(1, c.shape[1] + 1)
      every = max(1, len(ep) // 10)
      line, = ax.plot(ep, c.mean(0), marker=markers[i % len(markers)],
                      color=colour,
                      markevery=(i % every, every), ms=5,
                      lw=2.4 if o == "aalig" else 1.2,
                      label=labels.get(o, o), zorder=3 if o == "aalig" else 2)
      if len(c) > 1:
        ax.fill_between(ep, c.min(0), c.max(0), color=line.get_color(),
                        alpha=0.15, lw=0)
    sec = t.get("sections_epochs")
    if sec:
      for x in range(sec, t["epochs"] + 1, sec):
        ax.axvline(x, color="grey", ls=":", lw=0.6, zorder=1)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean minibatch training loss (log)")
    ax.set_title(t["label"], fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0)
  fig.suptitle("Chosen configurations: training loss (mean over seeds, "
               "range shaded)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  main()
