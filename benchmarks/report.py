"""Turns ``results.json`` into ``README.md`` and PNG plots (no new numbers).

Every number in the report is read from the results the runner wrote.
"""

from __future__ import annotations

import math
import pathlib
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from examples.common import report as report_lib  # pylint: disable=g-import-not-at-top

OVERHEAD_PNG = "overhead.png"
CURVES_PNG = "quality_curves.png"
SENS_PNG = "quality_sensitivity.png"
TARGET_RATIO = 1.03


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


# --------------------------------------------------------------------------
# Overhead.


def _overhead_md(res: dict, labels: dict) -> list[str]:
  lines = ["## 1. Step overhead", ""]
  cfg = res["config"]
  lines += [
      "The same jitted train step (forward, per-example cross-entropy, "
      "gradient of the mean, `tx.update(..., value=, losses=, indices=)`, "
      "`optax.apply_updates`; params, BatchNorm statistics and optimiser "
      f"state donated) on random 32x32x3 batches of {cfg['batch']}, AALIG's "
      f"tables sized for N = {cfg['num_examples']:,} examples "
      "(200 epochs in 10 sections). The optimisers run interleaved, the "
      "order rotated every round, each turn a few steps closed by "
      "`block_until_ready`. *ratio* is the median step time over SGD's "
      "(`optax.sgd(0.1, momentum=0.9, nesterov=True)`); *paired* is the "
      "median of the per-round ratios (same round, same machine load), with "
      "its interquartile range; *fastest 10%* the ratio of the two optimisers' fastest-decile turns (the turns least disturbed by other load on a shared machine). *opt part* is `tx.update` + "
      "`apply_updates` alone, jitted and donated, timed the same way; "
      "*kernels* counts the top-level operations of its compiled HLO, "
      "*copies* the `copy` ops among them (and the bytes they write), *MB* XLA's estimate "
      "of the bytes it reads and writes.", ""]
  for name, m in res["models"].items():
    lines += [f"### {name}: `{m['model_source']}`, "
              f"{m['num_params']:,} parameters", ""]
    lines += ["| optimiser | step (ms) | ratio | paired [IQR] | fastest 10% "
              "| opt part (µs) | opt part − SGD's (µs) | kernels | copies | MB |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
              "| ---: |"]
    for n, st in m["step"].items():
      p = m["opt_part"][n]
      h = m["hlo_opt_part"][n]
      lines.append(
          f"| {labels.get(n, n)} | {1e3 * st['median_s']:.2f} | "
          f"{st['ratio_to_sgd']:.3f} | {st['paired_ratio_median']:.3f} "
          f"[{st['paired_ratio_q25']:.3f}, {st['paired_ratio_q75']:.3f}] | "
          f"{st.get('p10_ratio', float('nan')):.3f} | "
          f"{1e6 * p['median_s']:.0f} | {p['extra_over_sgd_us']:+.0f} | "
          f"{h['num_kernels']} | {_copies(h)} | "
          f"{h.get('bytes_accessed', float('nan')) / 1e6:.1f} |")
    if "aalig_bigN" in m["opt_part"]:
      p = m["opt_part"]["aalig_bigN"]
      h = m["hlo_opt_part"]["aalig_bigN"]
      lines.append(
          f"| AALIG, N = {m['big_num_examples']:,} | | | | | "
          f"{1e6 * p['median_s']:.0f} | {p['extra_over_sgd_us']:+.0f} | "
          f"{h['num_kernels']} | {_copies(h)} | "
          f"{h.get('bytes_accessed', float('nan')) / 1e6:.1f} |")
    lines.append("")
  lines += _where_time_goes(res, labels)
  lines += [f"![step overhead]({OVERHEAD_PNG})", ""]
  return lines


def _copies(h: dict) -> str:
  n = h["entry_ops"].get("copy", 0)
  return f"{n} ({h.get('copy_bytes', 0) / 1e6:.2f} MB)" if n else "0"


def _copy_sources(h: dict) -> str:
  big = sorted(h.get("copies", []), key=lambda c: -c["bytes"])
  big = [c for c in big if c["bytes"] >= 1024]
  if not big:
    return ""
  names = ", ".join(f"`{c['operand']}` {c['shape']}" for c in big[:3])
  more = f" and {len(big) - 3} more" if len(big) > 3 else ""
  return (f" Its {len(big)} copies of 1 KB or more move "
          f"{sum(c['bytes'] for c in big) / 1e6:.2f} MB a step: {names}{more}.")


def _where_time_goes(res: dict, labels: dict) -> list[str]:
  out = ["### Where AALIG's extra time goes", ""]
  for name, m in res["models"].items():
    st, part, hlo = m["step"], m["opt_part"], m["hlo_opt_part"]
    a, s = part["aalig"], part["sgd"]
    ha, hs = hlo["aalig"], hlo["sgd"]
    step_extra_ms = 1e3 * (st["aalig"]["median_s"] - st["sgd"]["median_s"])
    txt = (f"- **{name}**: a step takes {1e3 * st['sgd']['median_s']:.2f} ms "
           f"with SGD and {1e3 * st['aalig']['median_s']:.2f} ms with AALIG "
           f"(ratio {st['aalig']['ratio_to_sgd']:.3f}, paired "
           f"{st['aalig']['paired_ratio_median']:.3f}). The optimiser part "
           f"alone: {1e6 * s['median_s']:.0f} µs for SGD, "
           f"{1e6 * a['median_s']:.0f} µs for AALIG "
           f"({a['extra_over_sgd_us']:+.0f} µs), "
           f"{ha['num_kernels']} kernels against {hs['num_kernels']} "
           f"({', '.join(f'{k} {v}' for k, v in ha['entry_ops'].items())}), "
           f"{ha.get('bytes_accessed', 0) / 1e6:.1f} MB against "
           f"{hs.get('bytes_accessed', 0) / 1e6:.1f} MB."
           + _copy_sources(ha))
    if "aalig_chain" in part:
      c, hc = part["aalig_chain"], hlo["aalig_chain"]
      txt += (f" The same maths as `chain(scale_by_aalig, trace, scale(-1))`, "
              f"without the `aalig` alias's guard that keeps the momentum "
              f"buffer unchanged on a skipped (non-finite) batch, costs "
              f"{1e6 * c['median_s']:.0f} µs ({c['extra_over_sgd_us']:+.0f} "
              f"µs over SGD) with {_copies(hc)} copies against the alias's "
              f"{_copies(ha)}.")
    if "aalig_bigN" in part:
      b = part["aalig_bigN"]
      txt += (f" With an ImageNet-sized table (N = {m['big_num_examples']:,})"
              f" the optimiser part takes {1e6 * b['median_s']:.0f} µs "
              f"against {1e6 * a['median_s']:.0f} µs at N = "
              f"{m['num_examples']:,}.")
    txt += (f" The step-level difference ({step_extra_ms:+.2f} ms) is "
            "measured on a shared machine; the optimiser-part numbers are "
            "the cleaner estimate of AALIG's own cost.")
    out.append(txt)
  out.append("")
  return out


def _overhead_png(res: dict, labels: dict, path: pathlib.Path) -> None:
  models = list(res["models"])
  names = [n for n in res["models"][models[0]]["step"]]
  fig, ax = plt.subplots(figsize=(9, 4))
  width = 0.8 / len(models)
  for i, m in enumerate(models):
    st = res["models"][m]["step"]
    ys = [st[n]["paired_ratio_median"] for n in names]
    lo = [st[n]["paired_ratio_median"] - st[n]["paired_ratio_q25"]
          for n in names]
    hi = [st[n]["paired_ratio_q75"] - st[n]["paired_ratio_median"]
          for n in names]
    xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(names))]
    ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=m)
  ax.axhline(1.0, color="k", lw=0.8)
  ax.axhline(TARGET_RATIO, color="r", lw=0.8, ls="--",
             label=f"target {TARGET_RATIO}")
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels([labels.get(n, n) for n in names], rotation=30,
                     ha="right")
  ax.set_ylabel("step time / SGD's (paired median, IQR)")
  ax.set_ylim(bottom=0.8)
  ax.legend()
  ax.set_title("Train-step time relative to optax.sgd (Nesterov 0.9)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# --------------------------------------------------------------------------
# Quality.


def _quality_md(res: dict, labels: dict) -> list[str]:
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
    lines.append("Grids: " + "; ".join(
        f"{', '.join(labels.get(k, k) for k, v in tuned.items() if tuple(v) == g)}"
        f": {{{', '.join(f'{x:g}' for x in g)}}}" for g in grids)
        + f"; weight decay {{{', '.join(f'{w:g}' for w in t['weight_decays'])}}}"
        + ".")
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


def _summary_table(res: dict, labels: dict) -> list[str]:
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


def _curves_png(res: dict, labels: dict, path: pathlib.Path) -> None:
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


def _sens_png(res: dict, labels: dict, path: pathlib.Path) -> None:
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


# --------------------------------------------------------------------------


def _env_md(title: str, part: dict) -> list[str]:
  e = part["environment"]
  v = e["versions"]
  dirty = (f" (uncommitted changes in: {', '.join(e['git_dirty_paths'])})"
           if e["git_dirty_paths"] else "")
  return [
      f"- {title}: `{part['command']}`, {part['wall_s']:.0f} s, "
      f"{e['date_utc']}, scale `{part['scale']}`"
      + (" (**tiny smoke run: numbers mean nothing**)" if part["tiny"] else "")
      + ".",
      f"  Machine: {e['nproc']} x {e['cpu_model']} ({e['backend']}, "
      f"{e['platform']}), load average at start "
      f"{', '.join(f'{x:.1f}' for x in e['load_average_at_start'])}. "
      f"Python {e['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, "
      f"optax {v['optax']}, flax {v['flax']}, numpy {v['numpy']}, "
      f"aalig_optax {v['aalig_optax']} at commit {e['git_commit']}{dirty}.",
  ]


def write(results: dict, out: pathlib.Path) -> None:
  labels = {k: v["label"] for k, v in results.get("optimizers", {}).items()}
  labels["aalig_bigN"] = "AALIG (N large)"
  lines = ["# Benchmark results", "",
           "Generated by `benchmarks/run.py` from `results.json` in this "
           "folder; every number below comes from that file.", ""]
  for part in ("overhead", "quality"):
    if part in results:
      lines += _env_md(part.capitalize(), results[part])
  lines.append("")
  if "overhead" in results:
    lines += _overhead_md(results["overhead"], labels)
    _overhead_png(results["overhead"], labels, out / OVERHEAD_PNG)
  if "quality" in results and results["quality"]["tasks"]:
    q = results["quality"]
    lines += _quality_md(q, labels)
    lines += _summary_table(q, labels)
    losses = aalig_losses(q, labels)
    lines += ["## Where AALIG loses", ""]
    if "overhead" in results:
      for name, m in results["overhead"]["models"].items():
        r = m["step"]["aalig"]["paired_ratio_median"]
        if r > TARGET_RATIO:
          lines.append(f"- **Step time, {name}**: AALIG/SGD paired ratio "
                       f"{r:.3f}, above the {TARGET_RATIO} target.")
    lines += losses or ["- Nowhere in this run: no optimiser's test metric "
                        "beat AALIG's."]
    lines += ["", "### Reading these results", "",
              "- The CPU budgets are far shorter than the paper's (200 "
              "epochs, 20-epoch sections for the image tasks). AALIG keeps "
              "the paper's K = 10 sections, so its sections here last one to "
              "five epochs: each section end raises the AOVs of unreached "
              "examples halfway to losses measured on a model still far from "
              "its optimum, the Polyak step shrinks, and training slows (the "
              "flattening of AALIG's curves in the training-loss plot). "
              "These tables measure that short-budget regime; they neither "
              "confirm nor refute the paper's 200-epoch results, which "
              "`--scale paper` is for.",
              "- On the interpolating matrix factorisation (rank 10) the "
              "paper itself reports that AALIG does not drive the loss to "
              "machine precision as ALI-G and SPS do.",
              "- The ijcnn1 task's notes give the majority-class accuracy: "
              "with this kernel width and a subset of centres, every "
              "optimiser stays close to it.",
              "- Step times: on the MLP, SGD's own compiled train step is "
              "slower than several others' (XLA fuses the whole step "
              "differently per optimiser), so a step ratio below 1 does not "
              "mean AALIG is cheaper than SGD; the optimiser-part timings "
              "and HLO copies above isolate AALIG's own cost.", ""]
    _curves_png(q, labels, out / CURVES_PNG)
    _sens_png(q, labels, out / SENS_PNG)
  lines += ["## Files", "",
            "- `results.json`: every configuration of every run (per-epoch "
            "losses, validation and test metrics), the overhead timings and "
            "HLO summaries, the command, machine and versions.",
            f"- `{OVERHEAD_PNG}`, `{CURVES_PNG}`, `{SENS_PNG}`: the plots.",
            "- `hlo/mlp_<optimiser>_opt_part.txt`: the compiled HLO of "
            "the optimiser part (`update` + `apply_updates`) on the MLP, "
            "for SGD and AALIG.",
            "- `scaling.json`, `scaling.md` (if present) come from "
            "`benchmarks/scaling.py`, not from this runner.",
            ""]
  report_lib.write_files(out, {"README.md": "\n".join(lines)})
