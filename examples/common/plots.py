"""The examples' figures: training loss, validation metric, step size, AALIG.

References:
  Paren, Poudel, Kumar, "Faking Interpolation Until You Make It", Figure 4
  (step size and mean AOV against the mean loss).
"""

from __future__ import annotations

import pathlib
from typing import Mapping, Optional

import numpy as np

__all__ = ["MARKERS", "distillation", "integer_epochs", "kernel_sweep",
           "plot_runs", "style"]

# One marker per run, drawn at a few points only, so that curves that
# coincide (e.g. ALI-G and SPS at the same step size) stay visible.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def style(i: int, num_points: int) -> dict:
  """Plot keywords of the `i`-th run: its marker, drawn about 8 times.

  Each run's markers start at a different point, so runs whose curves
  coincide show all their markers side by side.
  """
  every = max(1, num_points // 8)
  return dict(marker=MARKERS[i % len(MARKERS)], markersize=4,
              markevery=(i % every, every),
              # Later runs thinner, so an earlier one beneath shows.
              lw=max(0.8, 2.0 - 0.25 * i), alpha=0.9)


def integer_epochs(ax) -> None:
  """Ticks at whole epochs on `ax`'s x axis."""
  from matplotlib.ticker import MaxNLocator
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _traces(hist):
  """(fractional epochs, batch-loss trace, step-size trace) of a history."""
  xs, losses, steps = [], [], []
  for r in hist:
    tl = r.get("trace_loss", [r["loss"]])
    ts = r.get("trace_step_size", [r["step_size"]])
    k = len(tl)
    xs += [r["epoch"] - 1 + (i + 1) / k for i in range(k)]
    losses += tl
    steps += ts
  return xs, losses, steps


def _linthresh(histories):
  positive = [v for h in histories.values() for r in h
              for v in r.get("trace_step_size", [r["step_size"]]) if v > 0]
  return float(min(positive)) if positive else 1e-3


def plot_runs(histories: Mapping[str, list], path, *,
              train_key: str = "loss", val_key: Optional[str] = None,
              val_label: str = "validation", title: str = "",
              log_train: bool = True, log_val: Optional[bool] = None,
              floor: Optional[float] = None) -> None:
  """Writes a 2x2 PNG: training loss, validation metric, step size, AALIG.

  The step-size panel and the fourth panel use the within-epoch traces.
  The fourth is the paper's Figure 4 for the AALIG run (the first run whose
  history has ``mean_aov``): its batch loss, its mean AOV (a step function:
  the AOVs move at section ends) and its step size on a second axis.

  Args:
    histories: label -> per-epoch records (from :func:`fit`).
    path: the PNG to write.
    train_key: the record key plotted as training loss.
    val_key: the record key of the validation metric (None: no panel).
    val_label: its axis label.
    title: figure title.
    log_train: log-scale training loss.
    log_val: log-scale the validation metric; None: when `val_key` is a
      loss.
    floor: the training loss's lower bound, drawn dashed if positive.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if log_val is None:
    log_val = val_key is not None and "loss" in val_key
  fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
  ax_tr, ax_val, ax_step, ax_aov = axes.ravel()
  for i, (label, hist) in enumerate(histories.items()):
    ep = [r["epoch"] for r in hist]
    ax_tr.plot(ep, [r[train_key] for r in hist], label=label,
               **style(i, len(ep)))
    if val_key is not None:
      ax_val.plot(ep, [r.get(val_key, np.nan) for r in hist], label=label,
                  **style(i, len(ep)))
    tx, _, ts = _traces(hist)
    ax_step.plot(tx, ts, label=label, **style(i, len(tx)))
  if floor is not None and floor > 0:
    ax_tr.axhline(floor, color="k", ls="--", lw=0.8, label="loss floor")
  if log_train:
    ax_tr.set_yscale("log")
  if log_val:
    ax_val.set_yscale("log")
  ax_tr.set(xlabel="epoch", ylabel=f"training loss ({train_key})")
  ax_val.set(xlabel="epoch", ylabel=val_label)
  k = max((len(r.get("trace_step_size", [0])) for h in histories.values()
           for r in h), default=1)
  ax_step.set(xlabel="epoch",
              ylabel=f"step size (mean of each 1/{k} epoch)"
              if k > 1 else "step size (epoch mean)")
  ax_step.set_yscale("symlog", linthresh=_linthresh(histories))
  ax_step.set_ylim(bottom=0)
  for ax in (ax_tr, ax_val, ax_step, ax_aov):
    ax.grid(alpha=0.3)
    integer_epochs(ax)
  if val_key is None:
    ax_val.axis("off")
  handles, labels = ax_tr.get_legend_handles_labels()
  # One legend for the three panels, below them, clear of the data.
  fig.legend(handles, labels, loc="lower center", fontsize=8,
             ncol=min(len(labels), 4), frameon=False)
  aalig_runs = [(k, h) for k, h in histories.items()
                if h and "mean_aov" in h[0]]
  if aalig_runs:
    label, hist = aalig_runs[0]
    tx, tl, ts = _traces(hist)
    ax_aov.plot(tx, tl, label="batch loss")
    # The AOVs only move at section ends, which are epoch ends.
    ax_aov.step([0] + [r["epoch"] for r in hist],
                [0.0] + [r["mean_aov"] for r in hist], where="post",
                label="mean AOV")
    ax_aov.set(xlabel="epoch", ylabel="loss (symlog)",
               title=f"{label}: Figure 4")
    positive = [v for v in tl + [r["mean_aov"] for r in hist] if v > 0]
    ax_aov.set_yscale("symlog", linthresh=min(positive) if positive else 1)
    twin = ax_aov.twinx()
    twin.plot(tx, ts, "g:", label="step size")
    twin.set_ylabel("mean step size")
    lines = ax_aov.get_legend_handles_labels()
    lines2 = twin.get_legend_handles_labels()
    ax_aov.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7,
                  loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3,
                  frameon=False)
  else:
    ax_aov.axis("off")
  fig.suptitle(title)
  rows = -(-len(labels) // 4)
  fig.tight_layout(rect=(0, 0.01 + 0.025 * rows, 1, 1))
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def kernel_sweep(name: str, grids: dict, chosen: dict, path,
                 title: str = "step sizes chosen by validation accuracy"
                 ) -> None:
  """Training loss (log) and validation accuracy of the chosen step sizes.

  `grids`: optimiser -> ``rbf_kernel.train_grid``'s output (or the same
  layout);
  `chosen`: optimiser -> index of its step size.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 3.8))
  markers = "os^Dvx*"
  for i, (opt, grid) in enumerate(grids.items()):
    j = chosen[opt]
    ep = np.asarray(grid["epoch"])
    from examples.common import optimizers  # (It imports no figure code.)
    label = f"{optimizers.SPECS[opt].label} (lr={grid['lr'][j]:g})"
    # Validation accuracy from epoch 1: the initialisation's (near chance)
    # would squash the curves that matter.
    first_val = 1 if ep[0] == 0 else 0
    for ax, key, first in ((ax_l, "train_loss", 0),
                           (ax_a, "val_acc", first_val)):
      v = np.asarray(grid[key])[first:, :, j]
      line, = ax.plot(ep[first:], v.mean(1),
                      marker=markers[i % len(markers)],
                      markevery=(i % 5, 5), ms=5, lw=1.2, label=label,
                      mfc="none")
      if v.shape[1] > 1:
        ax.fill_between(ep[first:], v.min(1), v.max(1),
                        color=line.get_color(), alpha=0.15, lw=0)
  seeds = len(next(iter(grids.values()))["seed"])
  ax_l.set(yscale="log", xlabel="epoch", ylabel="training loss (full set)")
  ax_a.set(xlabel="epoch", ylabel="validation accuracy")
  for ax in (ax_l, ax_a):
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
  ax_a.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
  fig.suptitle(f"RBF kernel, {name}: mean over {seeds} seed(s) (band: "
               f"min-max), {title}", fontsize=10)
  fig.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def distillation(hists, initial, teacher_hists, floor, t_floor, args, path):
  """Training loss and mean AOV per epoch, per variant (seed mean, with
  the seeds' range shaded), beside the student's and teacher's floors.

  The AOV panel starts at epoch 0 with the initial table's mean (0 or the
  teacher's) and is symlog, so that the zero start stays on the axis."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_aov) = plt.subplots(1, 2, figsize=(11, 4.2))
  for i, (label, runs) in enumerate(hists.items()):
    curves = np.array([[r["train_loss"] for r in h] for h in runs])
    ep = np.arange(1, curves.shape[1] + 1)
    line, = ax_loss.plot(ep, curves.mean(0), label=label,
                         **style(i, len(ep)))
    if len(runs) > 1:
      ax_loss.fill_between(ep, curves.min(0), curves.max(0),
                           color=line.get_color(), alpha=0.15)
    if initial[label]:
      aov = np.array([[r["mean_aov"] for r in h] for h in runs]).mean(0)
      aov0 = np.mean([np.mean(a) for a in initial[label]])
      # The AOVs move at section ends only: a step function.
      ax_aov.step(np.arange(0, len(ep) + 1), np.concatenate([[aov0], aov]),
                  where="post", label=label, **style(i, len(ep)))
  t_curve = np.array([[r["train_loss"] for r in h]
                      for h in teacher_hists]).mean(0)
  ax_loss.plot(np.arange(1, len(t_curve) + 1), t_curve, "k:", lw=1,
               label="teacher (Adam)")
  for ax in (ax_loss, ax_aov):
    ax.axhline(floor, color="k", ls="--", lw=0.8, label="student's floor")
    if t_floor > 1e-12:
      ax.axhline(t_floor, color="grey", ls="-.", lw=0.8,
                 label="teacher's floor")
    ax.set(xlabel="epoch")
    ax.grid(alpha=0.3)
    integer_epochs(ax)
  ax_loss.set_yscale("log")
  ax_aov.set_yscale("symlog", linthresh=min(floor, t_floor)
                    if t_floor > 1e-12 else floor / 10)
  ax_aov.set_ylim(bottom=0)
  ax_loss.set_ylabel("training loss (full training set)")
  ax_aov.set_ylabel("mean AOV (after the epoch)")
  ax_loss.legend(fontsize=7)
  ax_aov.legend(fontsize=7)
  fig.suptitle(f"Distillation on matrix factorisation: rank-"
               f"{args.student_rank} students, mean of {args.seeds} seed(s)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
