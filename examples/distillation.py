"""AOVs from a teacher: AALIG's approximate optimal values by distillation.

AALIG (Paren et al., Sec. 4) keeps one approximate optimal value (AOV) per
training example, the loss it believes that example can reach, and takes
Polyak steps towards the batch's AOVs; by default every AOV starts at the
lower bound 0 and is corrected at the end of each section. The paper's
future work (Sec. 6) suggests starting them from a teacher instead: a larger
model's per-example losses are an informed guess of what is reachable, and
unlike 0 they say which examples are hard. This script tests that idea on
the matrix factorisation data of Sec. 5.1
(:func:`examples.common.data.load_matrix_factorisation`), where each rank's
loss floor is known exactly (Eckart-Young), so a student's distance from the
best it can do is measured, not guessed.

For each seed:

1. a teacher, a linear factorisation of rank ``--teacher-rank`` (default 5,
   floor 0.0021), is trained with Adam (lr 0.01, the MF example's tuned step
   size) to its floor, and :func:`aalig_optax.loss_table` records its loss
   on each of the 800 training examples (why not a full-rank teacher: it
   fits this noiseless data exactly, so its losses, ~1e-15, are the
   default's zero AOVs; ``--teacher-rank 0`` runs it all the same);
2. the student, of rank ``--student-rank`` (default 4, floor 0.0093: it
   cannot match the teacher), is trained with AALIG in each variant:

   - ``zero``: AOVs from 0, the paper's rule (the library's default);
   - ``teacher``: AOVs from the teacher's losses (``initial_aov=table``);
   - ``reflect``: AOVs from 0, ``aov_rule="reflect"`` (the rule that cannot
     freeze: context for the size of the teacher's effect);
   - ``teacher_reflect``: both (not in the default list).

Everything else is the MF example's setting (PyTorch's init, MSE, batch 100
with drop_last, 50 epochs, K = 10 sections of 5 epochs, no momentum), with
the student's AALIG at maximal step size ``--lr aalig=1`` (the step size
at which the paper's rule freezes above the rank-4 floor, see
``aalig_optax.update_aovs_reflect``; ``--lr aalig=10`` is the MF example's
tuned value).

Run (about 100 s on 2 shared CPU cores: 3 seeds x (teacher + 3 students))::

    python -m examples.distillation

It prints, per variant, the final training loss (the full training set,
mean ± sample std over ``--seeds``, default 3) and its ratio to the student's
floor, the test loss, the first epoch within 1% of the floor, the run's
share of zero-step batches and the mean initial AOV, and writes
``runs/distillation/distillation.png`` (training loss and mean AOV per
epoch per variant, seed mean), ``students_seed<S>.png`` (the 2x2 plot of
the other examples, first seed), ``results.md`` and ``results.json``.
``--optimisers aalig,alig,adam`` adds plain ALI-G/Adam students as
baselines (the MF example's step sizes).

What it showed (``examples/RESULTS.md``): on this data the teacher's AOVs
do not help. They start AALIG at 22% of the student's floor instead of 0,
the paper's rule raises them past the losses all the same, and one seed in
three still freezes at 1.27x the floor (1.23x from zero AOVs); the reflect
rule, not the starting point, is what reaches the floor on every seed.

References:
  Paren, Poudel, Kumar, "Faking Interpolation Until You Make It", TMLR
  2022, Sec. 5.1 and Sec. 6 (AOVs from a teacher); Hinton, Vinyals, Dean,
  "Distilling the Knowledge in a Neural Network", 2015.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import aalig_optax
from examples import matrix_factorisation as mf
from examples.common import cli
from examples.common import data as data_lib
from examples.common import loop
from examples.common import optimizers
from examples.common import plots
from examples.common import report

# Variant -> (AOVs from the teacher?, aov_rule).
VARIANTS = {
    "zero": (False, "paper"),
    "teacher": (True, "paper"),
    "reflect": (False, "reflect"),
    "teacher_reflect": (True, "reflect"),
}
# The teacher's optimiser: Adam at the MF example's tuned step size, which
# reaches every rank's floor within 50 epochs (matrix_factorisation.py).
TEACHER_OPT = optimizers.OptConfig("adam", 0.01)
# Within this factor of the floor counts as "there" (epochs_to_1pct).
NEAR_FLOOR = 1.01


@dataclasses.dataclass(frozen=True)
class Preset:
  epochs: int = 50
  batch_size: int = 100
  optimisers: str = "aalig"  # Students; AALIG runs once per variant.
  seeds: int = 3  # Seeds averaged over.
  variants: str = "zero,teacher,reflect"


CPU = Preset()
PRESETS = {"CPU": CPU}


def per_example_losses(problem, graphdef, params, rest, x, y):
  """The model's loss on each row of (x, y): [B]. Pure, jit-able."""
  model = nnx.merge(graphdef, params, rest, copy=True)
  return problem.per_example_loss(model(x, train=False), y)


def teacher_table(problem, graphdef, params, rest,
                  batch_size: int = 100) -> jax.Array:
  """Each training example's loss under the teacher, as a float32 [N] table.

  Why :func:`aalig_optax.loss_table` rather than a plain forward pass: it
  writes each loss at its dataset index (the AOV table's key), drops padded
  rows by their mask and raises if an example is missed or a loss is not
  finite, so a wrong table fails here rather than silently misguiding AALIG.
  """
  data = problem.data
  x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  loss_fn = lambda p, batch: per_example_losses(problem, graphdef, p, rest,
                                                *batch)
  batches = ((((x[idx], y[idx])), idx, mask) for idx, mask in
             data_lib.epoch_batches(data.num_train, batch_size, 0, 0,
                                    shuffle=False))
  return aalig_optax.loss_table(loss_fn, params, batches, data.num_train)


def student_optimizer(variant: str, lr: float, ctx: optimizers.RunContext,
                      table=None) -> optax.GradientTransformationExtraArgs:
  """AALIG for `variant` (see :data:`VARIANTS`), as the examples build it.

  The same call as ``optimizers.build("aalig", ...)`` with momentum 0 (Sec.
  5.1), plus the two knobs this script varies: where the AOVs start
  (``initial_aov``: the teacher's `table`, or None for the lower bound 0)
  and the section-end rule (``aov_rule``).
  """
  from_teacher, rule = VARIANTS[variant]
  if from_teacher and table is None:
    raise ValueError(f"variant {variant!r} needs the teacher's table")
  tx = aalig_optax.aalig(
      lr, ctx.num_examples, ctx.steps_per_epoch, ctx.epochs_per_section,
      momentum=0.0, aov_rule=rule,
      initial_aov=table if from_teacher else None)
  return optax.with_extra_args_support(tx)


def train_student(problem, tx, cfg: optimizers.OptConfig,
                  ctx: optimizers.RunContext, run: loop.Run, desc: str):
  """Trains `problem`'s model with the optimiser `tx`; see ``loop.fit``.

  ``loop.train_supervised`` builds its optimiser from `cfg` alone; AALIG's
  ``initial_aov`` and ``aov_rule`` are not part of an ``OptConfig``, so the
  step is spelled out here (the README's pattern: per-example losses,
  their dataset indices and the padding mask go to ``tx.update``).

  Returns:
    ``(state, history, initial_aov)``: as ``loop.fit``, and the AOV table
    of the optimiser's initial state (what AALIG actually started from).
  """
  data = problem.data
  model = problem.make_model(nnx.Rngs(run.seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(params)
  initial_aov = np.asarray(optimizers.aalig_state(opt_state).aov)
  state = dict(params=params, rest=rest, opt=opt_state)
  train_data = dict(x=jnp.asarray(data.x_train), y=jnp.asarray(data.y_train))

  def loss_fn(params, rest, x, y, mask):
    losses = per_example_losses(problem, graphdef, params, rest, x, y)
    m = mask.astype(losses.dtype)
    return jnp.sum(losses * m) / jnp.maximum(jnp.sum(m), 1.0), losses

  def train_step(state, train_data, idx, mask):
    x, y = train_data["x"][idx], train_data["y"][idx]
    (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["rest"], x, y, mask)
    updates, opt_state = tx.update(grads, state["opt"], state["params"],
                                   losses=jax.lax.stop_gradient(losses),
                                   indices=idx, mask=mask, value=loss)
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(loss=loss, count=jnp.sum(mask, dtype=jnp.float32),
                   step_size=optimizers.logged_step_size(
                       cfg, opt_state, grads, loss, ctx))
    return dict(params=params, rest=state["rest"], opt=opt_state), metrics

  evaluator = loop.make_evaluator(problem, graphdef)

  def evaluate(state):
    out = {f"val_{k}": v for k, v in evaluator(
        state, data.x_test, data.y_test).items()}
    out.update({f"train_{k}": v for k, v in evaluator(
        state, data.x_train, data.y_train).items()})
    return out

  state, hist = loop.fit(
      state, train_step, train_data, ctx, run, evaluate=evaluate,
      epoch_metrics=lambda s: aalig_optax.aalig_metrics(s["opt"]),
      desc=desc)
  return state, hist, initial_aov


def train_teacher(args, rank, seed: int, workdir: pathlib.Path):
  """The seed's teacher (Adam, :data:`TEACHER_OPT`) and its loss table.

  Returns:
    ``(table, history)``: each training example's loss under the trained
    teacher (float32 [N]) and the teacher run's per-epoch history.
  """
  problem = mf.make_problem(rank, seed)
  ctx = optimizers.RunContext.create(
      problem.data.num_train, args.batch_size, args.teacher_epochs,
      max_steps_per_epoch=args.steps_per_epoch, drop_remainder=True)
  run = cli.run_of(args, workdir / f"teacher_seed{seed}", seed)
  with cli.clear_errors():
    state, hist = loop.train_supervised(problem, TEACHER_OPT, ctx, run,
                                        eval_train=True)
  graphdef = nnx.split(problem.make_model(nnx.Rngs(0)), nnx.Param, ...)[0]
  table = teacher_table(problem, graphdef, state["params"], state["rest"],
                        args.batch_size)
  return table, hist


def mean_std(values) -> str:
  """``mean ± std`` over seeds (the sample std; one seed: the value)."""
  v = np.asarray(values, np.float64)
  if v.size == 1:
    return f"{v[0]:.5g}"
  return f"{v.mean():.5g} ± {v.std(ddof=1):.2g}"


def epochs_to_floor(hist, floor: float) -> float:
  """The first epoch whose training loss is within 1% of `floor` (else
  NaN): how fast a variant gets there, which final losses cannot show."""
  for r in hist:
    if r["train_loss"] <= NEAR_FLOOR * floor:
      return float(r["epoch"])
  return float("nan")


def reach_summary(reach) -> str:
  """`epochs_to_floor` over seeds: the mean of the seeds that got there,
  and how many never did (a mean over those alone would flatter)."""
  got = [e for e in reach if not np.isnan(e)]
  if not got:
    return "never"
  never = len(reach) - len(got)
  return mean_std(got) + (f" ({never}/{len(reach)} never)" if never else "")


def summary_row(name, hists, floor, initial_aovs=None) -> dict:
  """One table row from one variant's runs (one history per seed)."""
  train = [h[-1]["train_loss"] for h in hists]
  test = [h[-1]["val_loss"] for h in hists]
  ratios = [t / floor for t in train]
  reach = [epochs_to_floor(h, floor) for h in hists]
  zero = [np.mean([r["zero_step_share"] for r in h]) for h in hists]
  row = dict(
      variant=name, train_loss=mean_std(train), vs_floor=mean_std(ratios),
      test_loss=mean_std(test),
      epochs_to_1pct=reach_summary(reach),
      zero_step_share=mean_std(zero),
      # Numbers for results.json and the tests.
      train_loss_mean=float(np.mean(train)),
      train_loss_std=float(np.std(train, ddof=min(1, len(train) - 1))),
      test_loss_mean=float(np.mean(test)),
      test_loss_std=float(np.std(test, ddof=min(1, len(test) - 1))),
      vs_floor_mean=float(np.mean(ratios)),
      zero_step_share_mean=float(np.mean(zero)),
      epochs_to_1pct_per_seed=reach)
  if initial_aovs is not None:
    aov = [float(np.mean(a)) for a in initial_aovs]
    row["initial_mean_aov"] = mean_std(aov)
    row["initial_mean_aov_per_seed"] = aov
  return row


def main(argv=None):
  parser = cli.make_parser(__doc__, presets=PRESETS,
                           workdir="runs/distillation", quiet=True)
  cli.preset_arg(parser, "--seeds", PRESETS, type=cli.positive_int,
                 help="number of seeds to average over")
  cli.preset_arg(parser, "--variants", PRESETS,
                 help=f"AALIG students, comma-separated, from "
                 f"{list(VARIANTS)}")
  parser.add_argument("--student-rank", type=int, default=4)
  parser.add_argument("--teacher-rank", type=int, default=5,
                      help="the teacher's rank (0: the full linear map)")
  parser.add_argument("--teacher-epochs", type=int, default=None,
                      help="the teacher's epochs (default: --epochs)")
  args = cli.parse(parser, argv, PRESETS)
  cli.check_workdir(args)
  args.teacher_epochs = args.teacher_epochs or args.epochs
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  for v in variants:
    if v not in VARIANTS:
      raise SystemExit(f"unknown variant {v!r}; one of {list(VARIANTS)}")
  if args.teacher_rank and args.teacher_rank <= args.student_rank:
    raise SystemExit("the teacher must be larger than the student: "
                     f"--teacher-rank {args.teacher_rank} <= --student-rank "
                     f"{args.student_rank}")
  workdir = pathlib.Path(args.workdir)
  t_start = time.time()
  s_rank, t_rank = args.student_rank, args.teacher_rank or None
  data = data_lib.load_matrix_factorisation()
  floor = mf.loss_floor(data.x_train, data.y_train, s_rank)
  t_floor = mf.loss_floor(data.x_train, data.y_train, t_rank)
  print(f"Student rank {s_rank} (floor {floor:.6g}), teacher "
        f"{'rank ' + str(t_rank) if t_rank else 'full'} (floor "
        f"{t_floor:.3g}), {args.seeds} seed(s)")
  tuned = mf.TUNED_LRS.get(f"rank{s_rank}", mf.TUNED_LRS["rank4"])
  default_lrs = dict(tuned, aalig=1.0)
  configs = cli.optimiser_configs(args, default_lrs,
                                  adam={"momentum": 0.0})
  aalig_lr = next((c.lr for c in configs if c.name == "aalig"), None)
  labels = ([f"{v} (lr={aalig_lr:g})" for v in variants]
            if aalig_lr is not None else [])
  labels += [c.label for c in configs if c.name != "aalig"]
  hists = {label: [] for label in labels}
  initial = {label: [] for label in labels}
  teacher_hists, teacher_losses = [], []
  for s in range(args.seeds):
    seed = args.seed + s
    table, t_hist = train_teacher(args, t_rank, seed, workdir)
    teacher_hists.append(t_hist)
    teacher_losses.append(float(np.mean(table)))
    np.save(workdir / f"teacher_seed{seed}" / "aov_table.npy",
            np.asarray(table))
    problem = mf.make_problem(s_rank, seed)
    # As the MF example: K = 10 sections, drop_last as the sls code.
    ctx = cli.run_context(args, problem.data.num_train, sections=10,
                          drop_remainder=True)
    for v, label in zip(variants, labels):
      cfg = optimizers.OptConfig("aalig", aalig_lr)
      tx = student_optimizer(v, aalig_lr, ctx, table)
      run = cli.run_of(args, workdir / f"student_{v}_seed{seed}", seed)
      with cli.clear_errors():
        _, hist, aov0 = train_student(problem, tx, cfg, ctx, run,
                                      desc=f"rank{s_rank} {label}")
      hists[label].append(hist)
      initial[label].append(aov0)
    for cfg in configs:
      if cfg.name == "aalig":
        continue
      run = cli.run_of(args, workdir / f"student_{cfg.name}_seed{seed}", seed)
      with cli.clear_errors():
        _, hist = loop.train_supervised(problem, cfg, ctx, run,
                                        eval_train=True)
      hists[cfg.label].append(hist)
  rows = [summary_row(label, hists[label], floor, initial[label] or None)
          for label in labels]
  teacher_row = summary_row(
      f"teacher: {TEACHER_OPT.label}", teacher_hists, t_floor)
  # The teacher's own row: its training loss against its floor is the
  # mean of its table (a check on loss_table), not an AOV of its own.
  teacher_row.update(vs_floor="", epochs_to_1pct="", zero_step_share="",
                     initial_mean_aov="table: " + mean_std(teacher_losses))
  teacher_row["table_mean_per_seed"] = teacher_losses
  rows.append(teacher_row)
  plots.distillation(hists, initial, teacher_hists, floor, t_floor, args,
        workdir / "distillation.png")
  first = {label: h[0] for label, h in hists.items()}
  plots.plot_runs(first, workdir / f"students_seed{args.seed}.png",
                  train_key="train_loss", val_key="val_loss",
                  val_label="test loss", floor=floor,
                  title=f"Rank-{s_rank} students, seed {args.seed}")
  histories = {f"{label}/seed{args.seed + s}": h
               for label, hs in hists.items() for s, h in enumerate(hs)}
  histories.update({f"teacher/seed{args.seed + s}": h
                    for s, h in enumerate(teacher_hists)})
  report.summarise(
      workdir, f"Distillation: rank-{s_rank} students (floor {floor:.6g}) "
      f"with AOVs from a {'rank-' + str(t_rank) if t_rank else 'full'} "
      f"teacher, {args.epochs} epochs, batch {args.batch_size}, "
      f"{args.seeds} seed(s) (mean ± std), {time.time() - t_start:.0f} s",
      rows, ["variant", "train_loss", "vs_floor", "test_loss",
             "epochs_to_1pct", "zero_step_share", "initial_mean_aov"],
      histories, f"Plots: {workdir / 'distillation.png'} and "
      f"{workdir / f'students_seed{args.seed}.png'}")
  return rows


if __name__ == "__main__":
  main()
