"""The examples' figures: training loss, validation metric, step size, AALIG.

References:
  Paren, Poudel, Kumar, "Faking Interpolation Until You Make It", Figure 4
  (step size and mean AOV against the mean loss).
"""

from __future__ import annotations

import pathlib
from typing import Mapping, Optional

import numpy as np

__all__ = ["plot_runs"]


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
              log_train: bool = True) -> None:
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
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  ax_tr, ax_val, ax_step, ax_aov = axes.ravel()
  for label, hist in histories.items():
    ep = [r["epoch"] for r in hist]
    ax_tr.plot(ep, [r[train_key] for r in hist], label=label)
    if val_key is not None:
      ax_val.plot(ep, [r.get(val_key, np.nan) for r in hist], label=label)
    tx, _, ts = _traces(hist)
    ax_step.plot(tx, ts, label=label)
  if log_train:
    ax_tr.set_yscale("log")
  ax_tr.set(xlabel="epoch", ylabel=f"training loss ({train_key})")
  ax_val.set(xlabel="epoch", ylabel=val_label)
  ax_step.set(xlabel="epoch", ylabel="step size (chunk means)",
              yscale="symlog", ylim=(0, None))
  ax_step.set_yscale("symlog", linthresh=_linthresh(histories))
  for ax in (ax_tr, ax_val, ax_step):
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
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
    ax_aov.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7)
  else:
    ax_aov.axis("off")
  fig.suptitle(title)
  fig.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
