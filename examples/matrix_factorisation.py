"""Matrix factorisation: AALIG against ALI-G, SPS, Adam and SGD (Figure 2).

The synthetic problem of Vaswani et al. (2019), AALIG paper Sec. 5.1, with
the settings of their code (github.com/IssamLaradji/sls), which the paper
reuses: A = linspace(1, 1e-10, 10)[:, None] * rand(10, 6) and X = randn(6,
1000) from ``np.random.seed(42)``, Y = A X without noise, the 1000 columns
split 800 train / 200 test by sklearn's ``train_test_split(test_size=0.2,
random_state=9513451)`` (:func:`examples.common.data.load_matrix_factorisation`;
the same data for every seed, which changes only the initialisation and the
batch order). Models W1 W2 x without bias, of rank 1 and 4 (cannot fit A: no
interpolation), 10 and the full linear map ("true model"; both can),
initialised as PyTorch's nn.Linear; the mean squared error over the 10
outputs and the batch; batch 100, shuffled every epoch, the last partial
batch dropped (8 steps per epoch); 50 epochs; AALIG's K = 10 sections of 5
epochs. The training loss over the full training set after every epoch,
plotted on a log scale beside each rank's loss floor (:func:`loss_floor`).

Run (about 2.5 minutes on 2 shared CPU cores)::

    python -m examples.matrix_factorisation

It prints each rank's loss floor and a table of final training and test
losses per problem and optimiser, with how far each ended from the floor
(``vs_floor``: train_loss / floor, or train_loss - 0 where the floor is 0),
the last epoch's mean step size and the run's share of zero-step batches,
and writes ``runs/matrix_factorisation/figure2.png`` (training loss per
epoch, log scale, one panel per problem) and one 2x2 plot per problem
(training loss, test loss, step size, AALIG's mean AOV; Figure 4's layout).
``--paper`` averages over 5 seeds as well (the paper's settings are
otherwise the defaults).

References:
  Paren, Poudel, Kumar, "Faking Interpolation Until You Make It", Sec. 5.1,
  Figure 2; Vaswani et al., "Painless Stochastic Gradient: Interpolation,
  Line-Search, and Convergence Rates", NeurIPS 2019.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import numpy as np

from examples.common import cli
from examples.common import data as data_lib
from examples.common import loop
from examples.common import models
from examples.common import optimizers
from examples.common import plots
from examples.common import problems
from examples.common import report

# (Maximal) step sizes cross-validated over powers of ten, by the final
# training loss of seed 0 in these exact settings (50 epochs, 2026-11-23;
# ties go to the smaller step). Final training losses of the grid:
#
#   rank1   aalig  0.1:1.330e-01  1:1.318e-01  10:1.318e-01  100:1.319e-01
#           alig   0.1:1.318e-01  1:1.318e-01  10:1.783e-01  100:1.744e-01
#           sps    0.1:1.318e-01  1:1.318e-01  10:1.521e-01  100:1.675e-01
#           adam   1e-3:2.188e-01 0.01:1.318e-01 0.1:1.319e-01 1:1.324e-01
#           sgd    0.01:2.355e-01 0.1:1.318e-01  1:1.318e-01  10:nan
#   rank4   aalig  0.1:6.229e-02  1:1.150e-02  10:9.351e-03  100:9.358e-03
#           alig   0.1:2.890e-02  1:9.356e-03  10:2.276e-02  100:3.313e-02
#           sps    0.1:2.890e-02  1:9.356e-03  10:1.033e-02  100:9.881e-03
#           adam   1e-3:7.734e-02 0.01:9.358e-03 0.1:9.557e-03 1:9.408e-03
#           sgd    0.01:1.606e-01 0.1:2.890e-02  1:9.356e-03  10:nan
#   rank10  aalig  0.1:3.587e-02  1:3.401e-04  10:7.828e-06  100:7.828e-06
#           alig   0.1:6.251e-04  1:3.376e-07  10:3.169e-07  100:3.169e-07
#           sps    0.1:6.251e-04  1:4.480e-10  10:3.515e-10  100:3.515e-10
#           adam   1e-3:9.004e-03 0.01:4.747e-15 0.1:6.186e-06 1:1.091e-11
#           sgd    0.01:1.010e-01 0.1:6.251e-04  1:7.165e-15  10:nan
#   full    aalig  0.1:8.510e-02  1:1.264e-06  10:6.309e-07  100:6.309e-07
#           alig   0.1:5.168e-07  1:7.671e-08  10:7.399e-08  100:7.399e-08
#           sps    0.1:3.876e-07  1:9.787e-11  10:9.237e-11  100:9.237e-11
#           adam   1e-3:2.569e-01 0.01:1.993e-08 0.1:3.775e-15 1:4.178e-12
#           sgd    0.01:2.128e-01 0.1:3.876e-07  1:6.426e-15  10:1.033e+07
#
# (rank1 alig/sps 0.1 beat 1 in the 6th digit: 0.1317865 vs 0.1317924.)
# Reproduce: --lr aalig=X --lr alig=X ... for each grid point.
# aalig_anneal (aov_rule="anneal", opt-in: --optimisers aalig,aalig_anneal)
# takes the step sizes the AOV-rule suite chose for it on these tasks
# (benchmarks/results/aov_rules.md, momentum 0, 5 seeds).
TUNED_LRS = {
    "rank1": {"aalig": 1.0, "aalig_anneal": 1.0, "alig": 0.1, "sps": 0.1,
              "adam": 0.01, "sgd": 0.1},
    "rank4": {"aalig": 10.0, "aalig_anneal": 1.0, "alig": 1.0, "sps": 1.0,
              "adam": 0.01, "sgd": 1.0},
    "rank10": {"aalig": 10.0, "aalig_anneal": 10.0, "alig": 10.0,
               "sps": 10.0, "adam": 0.01, "sgd": 1.0},
    "full": {"aalig": 10.0, "aalig_anneal": 10.0, "alig": 10.0, "sps": 10.0,
             "adam": 0.1, "sgd": 1.0},
}
PROBLEMS = {"rank1": 1, "rank4": 4, "rank10": 10, "full": None}


@dataclasses.dataclass(frozen=True)
class Preset:
  epochs: int = 50
  batch_size: int = 100
  optimisers: str = ",".join(optimizers.OPTIMISERS)
  seeds: int = 1  # Seeds averaged over.


CPU = Preset()
PAPER = Preset(seeds=5)  # The paper's settings: 50 epochs, batch 100.
PRESETS = {"CPU": CPU, "PAPER": PAPER}


def loss_floor(x, y, rank) -> float:
  """The lowest training MSE of x -> W x over W of rank <= `rank`.

  With the examples as rows (x [n, d], y [n, m]) the loss is
  ||x W^T - y||_F^2 / (n m). Let x = Q R with Q [n, d] orthonormal (x has
  full column rank). x W^T = Q (R W^T) stays in the column space of Q, so
  by Pythagoras the loss is ||Q (R W^T - Q^T y)||^2 + ||y - Q Q^T y||^2,
  and R W^T ranges over all [d, m] matrices of rank <= `rank` as W does
  (R is invertible). By Eckart-Young the first term's minimum is the sum of
  the squared singular values of Q^T y beyond the `rank`-th. (Q^T y has the
  singular values of y^T x (x^T x)^{-1/2}, the whitened least-squares fit.)
  The second term, what no linear map fits, is 0 up to rounding here
  (y = x A^T). Computed in float64 on the arrays the optimisers see.

  Args:
    x, y: the training inputs and targets, examples as rows.
    rank: r, or None for the full linear map (the least-squares fit).

  Returns:
    The minimal training loss; for rank >= min(d, m) (rank 10, the full
    model) only the unfittable residual, 0 up to rounding on this data.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  q, _ = np.linalg.qr(x)
  proj = q.T @ y
  s = np.linalg.svd(proj, compute_uv=False)
  tail = 0.0 if rank is None else float(np.sum(s[rank:] ** 2))
  residual = float(np.sum((y - q @ proj) ** 2))
  return (tail + residual) / y.size


def vs_floor(loss: float, floor: float) -> str:
  """How far `loss` ended from `floor`: a ratio, or the gap when it is 0."""
  if floor > 1e-12:
    return f"x{loss / floor:.4f}"
  return f"+{loss - floor:.2e}"


def make_problem(rank, seed: int = 0) -> problems.Problem:
  """The rank-`rank` factorisation problem (None: full linear model).

  The data are the same for every `seed` (see the module docstring); the
  run's seed draws the initialisation and the batch order.
  """
  del seed
  data = data_lib.load_matrix_factorisation()
  name = "full" if rank is None else f"rank{rank}"
  return problems.Problem(
      data=data,
      make_model=lambda rngs: models.LinearFactorisation(6, 10, rank,
                                                         rngs=rngs),
      per_example_loss=problems.squared_error, name=name)


def main(argv=None):
  parser = cli.make_parser(
      __doc__, presets=PRESETS, workdir="runs/matrix_factorisation",
      quiet=True)
  parser.add_argument("--problems", default=",".join(PROBLEMS),
                      type=cli.comma_list(PROBLEMS),
                      help=f"comma-separated, from {list(PROBLEMS)}")
  parser.add_argument("--momentum", type=float, default=0.0,
                      help="momentum of aalig/alig/sgd (the convex problems "
                      "of Sec. 5.1 use none)")
  cli.preset_arg(parser, "--seeds", PRESETS, type=cli.positive_int,
                 help="number of seeds to average over")
  args = cli.parse(parser, argv, PRESETS)
  cli.check_workdir(args)
  workdir = pathlib.Path(args.workdir)
  rows, histories = [], {}
  t_start = time.time()
  data = data_lib.load_matrix_factorisation()
  floors = {p: loss_floor(data.x_train, data.y_train, PROBLEMS[p])
            for p in args.problems.split(",")}
  print("Loss floors (minimal training MSE of each rank, Eckart-Young): "
        + ", ".join(f"{p} {f:.6g}" for p, f in floors.items()))
  for pname in args.problems.split(","):
    rank = PROBLEMS[pname]
    configs = cli.optimiser_configs(args, TUNED_LRS[pname],
                                    common=dict(momentum=args.momentum),
                                    adam={"momentum": 0.0})
    floor = floors[pname]
    per_opt = {}
    for cfg in configs:
      finals = []
      for s in range(args.seeds):
        seed = args.seed + s
        problem = make_problem(rank, seed)
        # K = 10 sections (5 epochs each of 50); drop_last as the sls code.
        ctx = cli.run_context(args, problem.data.num_train, sections=10,
                              drop_remainder=True)
        run = cli.run_of(args, workdir / pname / f"{cfg.name}_seed{seed}",
                         seed)
        with cli.clear_errors():
          _, hist = loop.train_supervised(problem, cfg, ctx, run,
                                          eval_train=True)
        histories[f"{pname}/{cfg.name}/seed{seed}"] = hist
        finals.append(hist[-1])
        if s == 0:
          per_opt[cfg.label] = hist
      seed_losses = [f["train_loss"] for f in finals]
      train_loss = float(np.mean(seed_losses))
      runs = [histories[f"{pname}/{cfg.name}/seed{args.seed + s}"]
              for s in range(args.seeds)]
      rows.append(dict(
          problem=pname, optimiser=cfg.label, loss_floor=floor,
          train_loss=train_loss, vs_floor=vs_floor(train_loss, floor),
          # The seeds' spread: the worst seed's distance from the floor.
          worst_seed=vs_floor(max(seed_losses), floor),
          test_loss=float(np.mean([f["val_loss"] for f in finals])),
          best_train_loss=float(np.mean([
              min(r["train_loss"] for r in histories[
                  f"{pname}/{cfg.name}/seed{args.seed + s}"])
              for s in range(args.seeds)])),
          # The last epoch's mean step size; the run's share of batches
          # with a zero step (AALIG: every loss of the batch at its AOV).
          mean_step_size=float(np.mean([f["step_size"] for f in finals])),
          zero_step_share=float(np.mean([[r["zero_step_share"] for r in h]
                                         for h in runs]))))
    plots.plot_runs(per_opt, workdir / f"{pname}.png",
                    train_key="train_loss", val_key="val_loss",
                    val_label="test loss", floor=floor,
                    title=f"Matrix factorisation, {pname}")
  _figure2(histories, args, floors, workdir / "figure2.png")
  report.summarise(
      workdir, f"Matrix factorisation, {args.epochs} epochs, batch "
      f"{args.batch_size}, {args.seeds} seed(s), "
      f"{time.time() - t_start:.0f} s", rows,
      ["problem", "optimiser", "loss_floor", "train_loss", "vs_floor"]
      + (["worst_seed"] if args.seeds > 1 else [])
      + ["best_train_loss", "test_loss", "mean_step_size", "zero_step_share"],
      histories,
      f"Plots: {workdir / 'figure2.png'} and {workdir}/<problem>.png")
  print(floor_summary(rows))
  return rows


def floor_summary(rows) -> str:
  """One line per optimiser: how far it ended from each problem's floor."""
  lines = ["How far each optimiser ended from the floor (xR: R times the "
           "floor; +G: G above a floor of 0):"]
  by_opt = {}
  for r in rows:
    by_opt.setdefault(r["optimiser"].split(" ")[0], []).append(
        f"{r['problem']} {r['vs_floor']}")
  for name, parts in by_opt.items():
    lines.append(f"  {name:6s} " + "  ".join(parts))
  return "\n".join(lines)


def _figure2(histories, args, floors, path):
  """Training loss per epoch, log scale, one panel per problem (Figure 2)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  problems = args.problems.split(",")
  fig, axes = plt.subplots(1, len(problems), figsize=(4 * len(problems), 4.0),
                           squeeze=False)
  for ax, pname in zip(axes[0], problems):
    for i, cfg in enumerate(cli.optimiser_configs(args, TUNED_LRS[pname])):
      runs = [histories[f"{pname}/{cfg.name}/seed{args.seed + s}"]
              for s in range(args.seeds)]
      curve = np.mean([[r["train_loss"] for r in h] for h in runs], axis=0)
      # The step sizes differ per panel: the legend names the optimisers.
      ax.plot(np.arange(1, len(curve) + 1), curve, label=cfg.name,
              **plots.style(i, len(curve)))
    floor = floors[pname]
    if floor > 1e-12:
      ax.axhline(floor, color="k", ls="--", lw=0.8, label="loss floor")
      ax.set_title(f"{pname} (floor {floor:.4g})")
    else:  # Ranks 10 and full: 0 up to float32 rounding, off a log axis.
      ax.set_title(f"{pname} (floor 0)")
    ax.set(yscale="log", xlabel="epoch")
    ax.grid(alpha=0.3)
    plots.integer_epochs(ax)
  axes[0][0].set_ylabel("training loss (mean over the training set)")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(labels),
             fontsize=8, frameon=False)
  seeds = f", mean of {args.seeds} seeds" if args.seeds > 1 else ""
  fig.suptitle(f"Matrix factorisation (Figure 2): training loss per epoch"
               f"{seeds}, each optimiser at its step size tuned per rank")
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
