"""The AOV-rule suite's report: tables, the targets, and the plot.

Reads the raw results of :func:`benchmarks.aov_rules.run` (one record per
task, momentum, rule, step size and seed) and writes what
``benchmarks/results/aov_rules*.md`` and ``.png`` show.
"""

from __future__ import annotations

import numpy as np

RULES = ("paper", "anneal", "reflect", "fixed")  # the default, in order
RECOMMENDED = "anneal"  # the rule the targets are checked for
# The annealing references (benchmarks.aov_rules.REFERENCES): SGD with a
# schedule; "sgd_exp" in the tables is the best of the sgd_exp* decays.
REFERENCES = ("sgd_step", "sgd_exp1", "sgd_exp2", "sgd_exp3")
TARGET_RATIO = 1.1  # "within 1.1x of the better of paper and ALI-G"
STRETCH_RATIO = 2.0  # "within 2x of tuned SGD with a schedule"
WITHIN = 0.05  # "within 5% of the floor"
ZERO_FLOOR_TARGET = 1e-6  # where the floor is 0: "near it" means below this

# What each rule does where an AOV was reached (l <= a; d its last increase,
# B the lower bound), for the report.
RULE_NOTES = {
    "paper": "a <- max(a - d/2, B): the paper's Algorithm 2 (default)",
    "reflect": "a <- max(l - max(a - l + d/2, (l - B)/4), B): the library's "
               "aov_rule=\"reflect\"",
    "anneal": "a <- max(B, min(a - d/2, (a + l)/2)), d <- 2d: the library's "
              "aov_rule=\"anneal\"",
    "fixed": "reference: AOVs never move from B (ALI-G's step size)",
    "sgd_step": "reference: SGD (Nesterov momentum as the row's), step size "
                "x0.1 at 50% and 75% of the steps (the paper's schedule)",
    "sgd_exp1": "reference: SGD, step size decayed exponentially to 1/10 of "
                "its start",
    "sgd_exp2": "reference: SGD, exponential decay to 1/100",
    "sgd_exp3": "reference: SGD, exponential decay to 1/1000",
    "min_step": "a <- max(min(a, l) - d/2, B): from the loss, by the "
                "paper's step (dropped: freezes at small and large steps)",
    "min_double": "a <- max(min(a, l) - d, B), d doubled at each reach "
                  "(dropped: freezes at the grid's ends)",
    "bisect": "a <- B + (l - B)/2 (dropped: ALI-G-like, less annealing, "
              "worse than reflect on the grid and on rank 10)",
    "reset": "a <- B until not reached again (dropped: as good as reflect "
             "on the interpolating problems, worse at large steps on ranks "
             "1 and 4)",
    "track": "a <- max(min(a - d/2, l - d/2), B) (issue 27: no freeze, "
             "little annealing)",
    "pin": "a <- max(min(a - d/2, l), B) (issue 27: little annealing)",
    "cap": "a <- max(min(a - d/2, l + d/2), B) (issue 27: little annealing)",
    "halve": "a <- max(min(a - d/2, (a + l)/2), B) (issue 27: anneals "
             "better than anneal, freezes 1/5 seeds of the stall case)",
    "quarter": "a <- max(min(a - d/2, l + (a - l)/4), B) (issue 27)",
    "halve_grow": "halve, d <- 2d while a - l > d (issue 27)",
    "hmax": "halve, d <- max(d, a - l) (issue 27)",
    "anneal_max": "anneal, d <- max(2d, a - l) (issue 27)",
    "paper_double": "a <- max(a - d/2, B), d <- 2d (issue 27)",
    "jump": "anneal, but a <- B + (l - B)/2 where a - l > l - B (issue 27)",
}


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
  """The default rules first, in RULES' order, then the others by name, the
  references last."""
  return sorted(rules, key=lambda r: (RULES.index(r) if r in RULES
                                      else len(RULES) + (r in REFERENCES), r))


def _excess_rows(task_res: dict) -> dict:
  """(momentum, rule) -> (mean, std, tuned step) of the final training loss
  minus the floor (the loss itself where the floor is unknown), at the
  rule's tuned step size; the sgd_exp* decays merged into "sgd_exp" (the
  best one: a tuned decay)."""
  floor = task_res["floor"] or 0.0
  out = {}
  for row in summarise(task_res):
    key = (row["momentum"], "sgd_exp" if row["rule"].startswith("sgd_exp")
           else row["rule"])
    val = (row["loss_mean"] - floor, row["loss_std"], row["tuned_lr"])
    if key not in out or val[0] < out[key][0]:
      out[key] = val
  return out


def _verdict(mine, ref, ratio) -> str:
  """'met' when `mine` (mean, std) is within `ratio` of `ref` or of it
  within the two seeds' spreads."""
  if mine[0] <= ratio * ref[0] or mine[0] - ref[0] <= mine[1] + ref[1]:
    return "met"
  return f"not met ({mine[0] / max(ref[0], 1e-300):.2g}x)"


def excess_table(results: dict) -> list[str]:
  """Every rule's excess over the floor, per task and momentum, and the
  issue's targets for RECOMMENDED."""
  tasks = results["tasks"]
  rules = _ordered({("sgd_exp" if k.split("|")[1].startswith("sgd_exp")
                     else k.split("|")[1])
                    for t in tasks.values() for k in t["records"]})
  if not rules:
    return []
  out = ["### Excess over the optimum: every rule, per task and momentum", "",
         "Final full-batch training loss minus the floor (the loss itself "
         "where the floor is unknown: `rbf_*`), mean ± std over the seeds, "
         "at each rule's tuned step size. `sgd_exp` is the best of the "
         "exponential decays (a tuned decay). Target: "
         f"`{RECOMMENDED}` within {TARGET_RATIO:g}x of the better of "
         f"`paper` and `fixed` (ALI-G), or within the seeds' spread; "
         f"stretch: within {STRETCH_RATIO:g}x of the better SGD schedule "
         "(non-interpolating tasks, momentum 0.9).", "",
         "| task | momentum | " + " | ".join(f"`{r}`" for r in rules)
         + " | target | stretch |",
         "| --- | --- |" + " --- |" * (len(rules) + 2)]
  for name, t in tasks.items():
    ex = _excess_rows(t)
    for m in sorted({k[0] for k in ex}):
      cells = []
      for r in rules:
        v = ex.get((m, r))
        cells.append("" if v is None else f"{v[0]:.2e} ± {v[1]:.0e} "
                     f"({v[2]:g})")
      mine = ex.get((m, RECOMMENDED))
      refs = [ex[(m, r)] for r in ("paper", "fixed") if (m, r) in ex]
      target = (_verdict(mine, min(refs), TARGET_RATIO)
                if mine and refs else "")
      sgd = [ex[(m, r)] for r in ("sgd_step", "sgd_exp") if (m, r) in ex]
      stretch = (_verdict(mine, min(sgd), STRETCH_RATIO)
                 if mine and sgd and m > 0 and t["floor"] else "")
      out.append(f"| `{name}` | {m:g} | " + " | ".join(cells)
                 + f" | {target} | {stretch} |")
  return out + ["", "(In brackets: the tuned step size.)", ""]


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
      if row["rule"] == "paper" or row["rule"] in REFERENCES:
        continue  # the references are compared in the excess table
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
  lines += ["", "## Summary", ""] + excess_table(results) + targets(results)
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
