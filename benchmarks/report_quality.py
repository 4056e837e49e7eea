"""The quality part of the benchmark report: tables and plots of results.json.

Every number comes from the results the runner wrote (see report.py).
"""

from __future__ import annotations

import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from examples.common import plots

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


def _scored(t: dict) -> str:
  """The result a task is judged on: the test metric, or the training loss
  for an optimisation task (selected on it, as the paper's Figure 2)."""
  return "train_loss" if t.get("select_on") == "train_loss" else "test_metric"


def _vs_floor(v: float, floor) -> str:
  """`v` against the task's loss floor: a ratio, or the gap to a 0 floor."""
  if floor is None or not math.isfinite(v):
    return ""
  return f"x{v / floor:.4f}" if floor > 1e-12 else f"+{v - floor:.2e}"


def _epochs_to_floor(t: dict, o: str, b: dict) -> str:
  """First epoch whose full training loss is within 1% of the floor, per
  seed of the chosen configuration: median [min-max], or how many never."""
  floor = t.get("loss_floor")
  runs = [r for r in t.get("runs", {}).get(o, [])
          if r["lr"] == (b["lr"] if b["tuned"] else r["lr"])
          and r["wd"] == b["wd"]]
  if not floor or floor <= 1e-12 or not runs:
    return ""
  firsts = [next((i + 1 for i, v in enumerate(r["train_loss"])
                  if v <= 1.01 * floor), None) for r in runs]
  hit = sorted(f for f in firsts if f is not None)
  if not hit:
    return "never"
  out = f"{hit[len(hit) // 2]} [{hit[0]}-{hit[-1]}]"
  missed = len(firsts) - len(hit)
  return out + (f", {missed} never" if missed else "")


def _fmt_scored(v: float, t: dict) -> str:
  if _scored(t) == "train_loss":
    floor = t.get("loss_floor")
    if floor is not None and floor > 1e-12:
      return _vs_floor(v, floor)
    return _loss(v)
  return _fmt_metric(v, t["metric"])


def _fmt_spread(std: float, t: dict) -> str:
  """A standard deviation in the units :func:`_fmt_scored` prints."""
  floor = t.get("loss_floor")
  if _scored(t) == "train_loss" and floor is not None and floor > 1e-12:
    return f"{std / floor:.4f}"
  return _fmt_scored(std, t)


def _lower_is_better(t: dict) -> bool:
  return _scored(t) == "train_loss" or not t["higher_is_better"]


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
      "is reported (on the matrix-factorisation tasks, an optimisation "
      "result, the best final training loss instead, as the paper's "
      "Figure 2): validation and test metric and final training loss "
      "(full training set), mean ± standard deviation over seeds. "
      "*edge* marks a chosen step size at the end of its grid. AALIG: "
      "`epochs_per_section = max(1, epochs // 10)`; AALIG, ALI-G and SGD "
      "use the task's Nesterov momentum (stated per task).", ""]
  for tname, t in res["tasks"].items():
    metric = t["metric"]
    mlabel = "accuracy (%)" if metric == "accuracy" else "MSE"
    interp = "interpolating" if t["interpolating"] else "not interpolating"
    lines += [f"### {t['label']} ({interp})", "",
              f"{t['notes']} Seeds: {t['seeds']}. Momentum "
              f"{t.get('momentum', 0.9):g}. Selected on the final "
              + ("training loss" if _scored(t) == "train_loss" else
                 "validation metric")
              + f". Wall time {t['wall_s']:.0f} s.", ""]
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
    floor = t.get("loss_floor")
    if floor is not None:
      lines.append(f"Loss floor (the lowest training loss of the model "
                   f"class, Eckart-Young on the training set): {floor:.6g}; "
                   f"*vs floor*: the seed-mean final training loss over "
                   f"it (xR), or above it (+G) where it is 0, and in "
                   f"brackets the worst seed's; *epoch within 1%*: the "
                   f"first epoch whose training loss is within 1% of a "
                   f"positive floor, median [range] over seeds.")
    lines += ["", f"| optimiser | step size | wd | val {mlabel} | "
              f"test {mlabel} | final train loss |"
              + (" vs floor | epoch within 1% |" if floor is not None
                 else ""),
              "| --- | ---: | ---: | ---: | ---: | ---: |"
              + (" ---: | ---: |" if floor is not None else "")]
    for o, b in t["best"].items():
      edge = " (edge)" if b["lr_at_grid_edge"] else ""
      tl = b["train_loss"]
      row = (f"| {labels.get(o, o)} | {_lr(b['lr'])}{edge} | {b['wd']:g} | "
             f"{_pm(b['val_metric'], metric)} | "
             f"{_pm(b['test_metric'], metric)} "
             f"| {_loss(tl['mean'])} ± {_loss(tl['std'])} |")
      if floor is not None:
        row += (f" {_vs_floor(tl['mean'], floor)} "
                f"({_vs_floor(max(tl['values']), floor)}) | "
                f"{_epochs_to_floor(t, o, b) or '-'} |")
      lines.append(row)
    lines.append("")
  lines += [f"![training curves]({CURVES_PNG})", "",
            f"![step-size sensitivity]({SENS_PNG})", ""]
  return lines


def summary_table(res: dict, labels: dict) -> list[str]:
  tasks = res["tasks"]
  opts = list(next(iter(tasks.values()))["best"])
  lines = ["### Summary: test metric of the chosen configuration "
           "(accuracy %, or MSE; mean over seeds); on the matrix-"
           "factorisation tasks the final training loss (xR: R times the "
           "loss floor)", "",
           "| task | " + " | ".join(labels.get(o, o) for o in opts) + " |",
           "| --- |" + " ---: |" * len(opts)]
  for t in tasks.values():
    vals = {o: t["best"][o][_scored(t)]["mean"] for o in opts}
    finite = {o: v for o, v in vals.items() if math.isfinite(v)}
    best = (min if _lower_is_better(t) else max)(
        finite, key=finite.get) if finite else None
    cells = []
    for o in opts:
      s = _fmt_scored(vals[o], t)
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
    a = t["best"]["aalig"][_scored(t)]
    hib = not _lower_is_better(t)
    better_clear, better_noise = [], []
    for o, b in t["best"].items():
      if o == "aalig":
        continue
      m = b[_scored(t)]
      if not math.isfinite(m["mean"]):
        continue
      diff = (m["mean"] - a["mean"]) if hib else (a["mean"] - m["mean"])
      if not math.isfinite(a["mean"]) or diff > 0:
        spread = max(m["std"], a["std"])
        entry = f"{labels.get(o, o)} {_fmt_scored(m['mean'], t)}"
        (better_clear if (not math.isfinite(a["mean"]) or diff > spread)
         else better_noise).append(entry)
    if better_clear or better_noise:
      s = (f"- **{t['label']}** (AALIG "
           f"{_fmt_scored(a['mean'], t)} ± {_fmt_spread(a['std'], t)}): ")
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


def _legend_below(fig, ax) -> None:
  handles, labels = ax.get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8),
             fontsize=8, frameon=False)


def curves_png(res: dict, labels: dict, path: pathlib.Path) -> None:
  tasks, fig, axes = _task_grid(res)
  for ax, t in zip(axes.flat, tasks):
    for i, (o, b) in enumerate(t["best"].items()):
      c = b["epoch_loss_curve"]
      ax.plot(range(1, len(c) + 1), c, label=labels.get(o, o),
              **plots.style(i, len(c)))
    ax.set_yscale("log")
    ax.set_title(t["name"], fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean minibatch loss of the epoch")
    ax.grid(alpha=0.3)
    plots.integer_epochs(ax)
  for ax in list(axes.flat)[len(tasks):]:
    ax.axis("off")
  _legend_below(fig, axes.flat[0])
  fig.suptitle("Training loss of each optimiser's chosen configuration "
               "(mean over seeds)")
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)


def sens_png(res: dict, labels: dict, path: pathlib.Path) -> None:
  tasks, fig, axes = _task_grid(res)
  for ax, t in zip(axes.flat, tasks):
    for i, (o, b) in enumerate(t["best"].items()):
      if not b["tuned"]:
        continue
      key = ("train_loss_mean" if _scored(t) == "train_loss"
             else "val_metric_mean")
      pts = sorted((s["lr"], s[key]) for s in b["sweep"]
                   if s["wd"] == t["weight_decays"][0])
      if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts],
                label=labels.get(o, o), **plots.style(i, 1))
    ax.set_xscale("log")
    if t["metric"] == "mse" or _scored(t) == "train_loss":
      ax.set_yscale("log")
    ax.set_title(t["name"], fontsize=9)
    ax.set_xlabel("step size (max step size for Polyak methods)")
    ax.set_ylabel("final training loss" if _scored(t) == "train_loss"
                  else f"validation {t['metric']}")
  for ax in list(axes.flat)[len(tasks):]:
    ax.axis("off")
  _legend_below(fig, axes.flat[0])
  fig.suptitle(f"Validation metric (matrix factorisation: training loss) "
               f"against the step-size hyperparameter "
               f"(weight decay {tasks[0]['weight_decays'][0]:g})")
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)
