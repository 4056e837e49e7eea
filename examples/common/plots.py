"""The examples' figures: training loss, validation metric, step size, AALIG.

References:
  Paren, Poudel, Kumar, "Faking Interpolation Until You Make It", Figure 4
  (step size and mean AOV against the mean loss).
"""

from __future__ import annotations

import pathlib
from typing import Mapping, Optional

import numpy as np

__all__ = ["MARKERS", "integer_epochs", "plot_runs", "style"]

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
