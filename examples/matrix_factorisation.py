"""Matrix factorisation: AALIG against ALI-G, SPS, Adam and SGD (Figure 2).

The synthetic problem of Vaswani et al. (2019), AALIG paper Sec. 5.1:
minimise E_x ||W1 W2 x - A x||^2 over 800 samples x ~ N(0, I_6), with A in
R^{10x6} ill-conditioned (rows scaled from 1 to 1e-10). Factorisations of
rank 1 and 4 cannot fit A (no interpolation); rank 10 and the full linear
model can. Batch 100, 50 epochs, the training loss over the full training
set after every epoch, plotted on a log scale.

Run (a minute or two on 2 CPU cores)::

    python -m examples.matrix_factorisation

It prints a table of final training and test losses per problem and
optimiser and writes ``runs/matrix_factorisation/figure2.png`` (training loss
per epoch, log scale, one panel per problem) and one 2x2 plot per problem
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

# (Maximal) step sizes cross-validated over powers of ten {0.1, 1, 10} (Adam
# {1e-3, 1e-2, 0.1}, SGD {0.01, 0.1, 1}) per problem, by the final training
# loss of seed 0 with 50 epochs, as the paper tunes each method's one
# hyperparameter. SGD with 1 diverges on rank 1.
TUNED_LRS = {
    "rank1": {"aalig": 1.0, "alig": 1.0, "sps": 1.0, "adam": 0.1,
              "sgd": 0.1},
    "rank4": {"aalig": 10.0, "alig": 1.0, "sps": 1.0, "adam": 0.1,
              "sgd": 1.0},
    "rank10": {"aalig": 10.0, "alig": 10.0, "sps": 10.0, "adam": 0.1,
               "sgd": 1.0},
    "full": {"aalig": 10.0, "alig": 10.0, "sps": 10.0, "adam": 0.1,
             "sgd": 1.0},
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


def loss_floor(data: data_lib.ArrayDataset, rank) -> float:
  """The lowest training loss a rank-`rank` factorisation can reach.

  min over rank-k W of mean ||W x - A x||^2 / 10 is the sum of the squared
  singular values of Y = A X beyond the k-th (Eckart-Young), over n * 10.
  """
  if rank is None:
    return 0.0
  s = np.linalg.svd(data.y_train.astype(np.float64), compute_uv=False)
  return float(np.sum(s[rank:] ** 2) / data.y_train.size)


def make_problem(rank, seed: int) -> problems.Problem:
  """The rank-`rank` factorisation problem (None: full linear model)."""
  data = data_lib.load_matrix_factorisation(seed)
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
                      help=f"comma-separated, from {list(PROBLEMS)}")
  parser.add_argument("--momentum", type=float, default=0.0,
                      help="momentum of aalig/alig/sgd (the convex problems "
                      "of Sec. 5.1 use none)")
  cli.preset_arg(parser, "--seeds", PRESETS, type=int,
                 help="number of seeds to average over")
  args = cli.parse(parser, argv, PRESETS)
  cli.check_workdir(args)
  workdir = pathlib.Path(args.workdir)
  rows, histories = [], {}
  t_start = time.time()
  for pname in args.problems.split(","):
    rank = PROBLEMS[pname]
    configs = cli.optimiser_configs(args, TUNED_LRS[pname],
                                    common=dict(momentum=args.momentum),
                                    adam={"momentum": 0.0})
    floor = np.mean([loss_floor(data_lib.load_matrix_factorisation(
        args.seed + s), rank) for s in range(args.seeds)])
    per_opt = {}
    for cfg in configs:
      finals = []
      for s in range(args.seeds):
        seed = args.seed + s
        problem = make_problem(rank, seed)
        ctx = cli.run_context(args, problem.data.num_train)
        run = cli.run_of(args, workdir / pname / f"{cfg.name}_seed{seed}",
                         seed)
        with cli.clear_errors():
          _, hist = loop.train_supervised(problem, cfg, ctx, run,
                                          eval_train=True)
        histories[f"{pname}/{cfg.name}/seed{seed}"] = hist
        finals.append(hist[-1])
        if s == 0:
          per_opt[cfg.label] = hist
      rows.append(dict(
          problem=pname, optimiser=cfg.label, loss_floor=floor,
          train_loss=float(np.mean([f["train_loss"] for f in finals])),
          test_loss=float(np.mean([f["val_loss"] for f in finals])),
          best_train_loss=float(np.mean([
              min(r["train_loss"] for r in histories[
                  f"{pname}/{cfg.name}/seed{args.seed + s}"])
              for s in range(args.seeds)])),
          mean_step_size=float(np.mean([f["step_size"] for f in finals]))))
    plots.plot_runs(per_opt, workdir / f"{pname}.png",
                    train_key="train_loss", val_key="val_loss",
                    val_label="test loss",
                    title=f"Matrix factorisation, {pname}")
  _figure2(histories, args, workdir / "figure2.png")
  report.summarise(
      workdir, f"Matrix factorisation, {args.epochs} epochs, batch "
      f"{args.batch_size}, {args.seeds} seed(s), "
      f"{time.time() - t_start:.0f} s", rows,
      ["problem", "optimiser", "loss_floor", "train_loss", "best_train_loss",
       "test_loss", "mean_step_size"], histories,
      f"Plots: {workdir / 'figure2.png'} and {workdir}/<problem>.png")
  return rows


def _figure2(histories, args, path):
  """Training loss per epoch, log scale, one panel per problem (Figure 2)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  problems = args.problems.split(",")
  fig, axes = plt.subplots(1, len(problems), figsize=(4 * len(problems), 3.6),
                           squeeze=False)
  for ax, pname in zip(axes[0], problems):
    for cfg in cli.optimiser_configs(args, TUNED_LRS[pname]):
      runs = [histories[f"{pname}/{cfg.name}/seed{args.seed + s}"]
              for s in range(args.seeds)]
      curve = np.mean([[r["train_loss"] for r in h] for h in runs], axis=0)
      ax.plot(np.arange(1, len(curve) + 1), curve, label=cfg.label)
    floor = loss_floor(data_lib.load_matrix_factorisation(args.seed),
                       PROBLEMS[pname])
    if floor > 0:
      ax.axhline(floor, color="k", ls="--", lw=0.8, label="loss floor")
    ax.set(yscale="log", xlabel="epoch", title=pname)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  axes[0][0].set_ylabel("training loss")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
