"""The quality part of the benchmark report: tables and plots of results.json.

Every number comes from the results the runner wrote (see report.py).
"""

from __future__ import annotations

import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

__all__ = ["CURVES_PNG", "SENS_PNG", "aalig_losses", "curves_png",
           "quality_md", "sens_png", "summary_table"]

CURVES_PNG = "quality_curves.png"
SENS_PNG = "quality_sensitivity.png"


def _fmt_metric(v: float, metric: str) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "nan"
  if metric == "accuracy":
    return f"{100 * v:.2f}"
  return f"{v:.3g}"


def _pm(stat: dict, metric: str) -> str:
  return (f"{_fmt_metric(stat['mean'], metric)} ± "
          f"{_fmt_metric(stat['std'], metric)}")


def _loss(v: float) -> str:
  return f"{v:.3g}" if math.isfinite(v) else "nan"


def _lr(v) -> str:
  if v is None:
    return "default"
  return f"{v:g}"


def quality_md(res: dict, labels: dict) -> list[str]:
  lines = ["## 2. Optimisation quality", ""]
  lines += [
      "The paper's protocol at CPU scale. Each tuned optimiser's step-size "
      "hyperparameter (AALIG, ALI-G, SPS: the maximal step size; Adam, "
      "SGD: the learning rate) is cross-validated over the powers of ten "
      "listed per task; SGD uses the paper's step schedule (x0.1 at 50% "
      "and 75% of the budget). The learning-rate-free optimisers run at "
      "their defaults. Every run gets the same epochs. The configuration "
      "with the best seed-mean validation metric at the end of the budget "
      "is reported: validation and test metric and final training loss "
      "(full training set), mean ± standard deviation over seeds. "
      "*edge* marks a chosen step size at the end of its grid. AALIG: "
      "momentum 0.9, `epochs_per_section = max(1, epochs // 10)`.", ""]
  for tname, t in res["tasks"].items():
    metric = t["metric"]
    mlabel = "accuracy (%)" if metric == "accuracy" else "MSE"
    interp = "interpolating" if t["interpolating"] else "not interpolating"
    lines += [f"### {t['label']} ({interp})", "",
              f"{t['notes']} Seeds: {t['seeds']}. Wall time "
              f"{t['wall_s']:.0f} s.", ""]
    tuned = {k: v for k, v in t["grids"].items() if t["best"][k]["tuned"]}
    grids = sorted({tuple(v) for v in tuned.values()})
    names = lambda g: ", ".join(labels.get(k, k) for k, v in tuned.items()
                                if tuple(v) == g)
    values = lambda xs: "{" + ", ".join(f"{x:g}" for x in xs) + "}"
    lines.append("Grids: " + "; ".join(f"{names(g)}: {values(g)}"
                                       for g in grids)
                 + f"; weight decay {values(t['weight_decays'])}.")
    if t.get("sweep_note"):
      lines.append(t["sweep_note"])
    lines += ["", f"| optimiser | step size | wd | val {mlabel} | "
              f"test {mlabel} | final train loss |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for o, b in t["best"].items():
      edge = " (edge)" if b["lr_at_grid_edge"] else ""
      lines.append(
          f"| {labels.get(o, o)} | {_lr(b['lr'])}{edge} | {b['wd']:g} | "
          f"{_pm(b['val_metric'], metric)} | {_pm(b['test_metric'], metric)} "
          f"| {_loss(b['train_loss']['mean'])} ± "
          f"{_loss(b['train_loss']['std'])} |")
    lines.append("")
  lines += [f"![training curves]({CURVES_PNG})", "",
            f"![step-size sensitivity]({SENS_PNG})", ""]
  return lines


def summary_table(res: dict, labels: dict) -> list[str]:
  tasks = res["tasks"]
  opts = list(next(iter(tasks.values()))["best"])
  lines = ["### Summary: test metric of the chosen configuration "
           "(accuracy %, or MSE; mean over seeds)", "",
           "| task | " + " | ".join(labels.get(o, o) for o in opts) + " |",
           "| --- |" + " ---: |" * len(opts)]
  for t in tasks.values():
    vals = {o: t["best"][o]["test_metric"]["mean"] for o in opts}
    finite = {o: v for o, v in vals.items() if math.isfinite(v)}
    best = (max if t["higher_is_better"] else min)(
        finite, key=finite.get) if finite else None
    cells = []
    for o in opts:
      s = _fmt_metric(vals[o], t["metric"])
      cells.append(f"**{s}**" if o == best else s)
    lines.append(f"| {t['name']} | " + " | ".join(cells) + " |")
  lines.append("")
  return lines


def aalig_losses(res: dict, labels: dict) -> list[str]:
  """Tasks where another optimiser's test metric beats AALIG's."""
  out = []
  for t in res["tasks"].values():
    if "aalig" not in t["best"]:
      continue
    a = t["best"]["aalig"]["test_metric"]
    hib = t["higher_is_better"]
    better_clear, better_noise = [], []
    for o, b in t["best"].items():
      if o == "aalig":
        continue
      m = b["test_metric"]
      if not math.isfinite(m["mean"]):
        continue
      diff = (m["mean"] - a["mean"]) if hib else (a["mean"] - m["mean"])
      if not math.isfinite(a["mean"]) or diff > 0:
        spread = max(m["std"], a["std"])
        entry = (f"{labels.get(o, o)} {_fmt_metric(m['mean'], t['metric'])}")
        (better_clear if (not math.isfinite(a["mean"]) or diff > spread)
         else better_noise).append(entry)
    if better_clear or better_noise:
      s = (f"- **{t['label']}** (AALIG "
           f"{_fmt_metric(a['mean'], t['metric'])} ± "
           f"{_fmt_metric(a['std'], t['metric'])}): ")
      if better_clear:
        s += "beaten by more than the seed spread by " + ", ".join(
            better_clear)
      if better_noise:
        s += ("; " if better_clear else "") + (
            "ahead of AALIG within the seed spread: " + ", ".join(
                better_noise))
      out.append(s + ".")
  return out


def _task_grid(res: dict):
  """The tasks, and a figure with one panel per task (4 columns at most)."""
  tasks = list(res["tasks"].values())
  cols = min(4, len(tasks))
  rows = -(-len(tasks) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows),
                           squeeze=False)
  return tasks, fig, axes


def curves_png(res: dict, labels: dict, path: pathlib.Path) -> None:
  tasks, fig, axes = _task_grid(res)
  for ax, t in zip(axes.flat, tasks):
    for o, b in t["best"].items():
      c = b["epoch_loss_curve"]
      ax.plot(range(1, len(c) + 1), c, label=labels.get(o, o),
              lw=2.2 if o == "aalig" else 1.2)
    ax.set_yscale("log")
    ax.set_title(t["name"], fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean minibatch loss")
  for ax in list(axes.flat)[len(tasks):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=7)
  fig.suptitle("Training loss of each optimiser's chosen configuration "
               "(mean over seeds)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def sens_png(res: dict, labels: dict, path: pathlib.Path) -> None:
  tasks, fig, axes = _task_grid(res)
  for ax, t in zip(axes.flat, tasks):
    for o, b in t["best"].items():
      if not b["tuned"]:
        continue
      pts = sorted((s["lr"], s["val_metric_mean"]) for s in b["sweep"]
                   if s["wd"] == t["weight_decays"][0])
      if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                label=labels.get(o, o), lw=2.2 if o == "aalig" else 1.2)
    ax.set_xscale("log")
    if t["metric"] == "mse":
      ax.set_yscale("log")
    ax.set_title(t["name"], fontsize=9)
    ax.set_xlabel("step size (max step size for Polyak methods)")
    ax.set_ylabel(f"validation {t['metric']}")
  for ax in list(axes.flat)[len(tasks):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=7)
  fig.suptitle(f"Validation metric against the step-size hyperparameter "
               f"(weight decay {tasks[0]['weight_decays'][0]:g})")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
