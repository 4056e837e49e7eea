"""The examples' training loop: a jitted step, an evaluator, checkpoints.

One run trains one model with one optimiser:

- the run's shape (N, batch size, steps per epoch, epochs, AALIG's
  sections) is one :class:`~examples.common.optimizers.RunContext`, given
  to the optimiser and to :func:`fit` alike;
- the train step is ``jax.jit``-compiled once, with the training state
  donated (its buffers are reused in place) and the training arrays passed as
  non-donated device arguments, gathered by index inside the step;
- batches come from :func:`examples.common.data.epoch_batches`, keyed on
  (seed, epoch), and carry each example's dataset index (AALIG's AOV key);
- after each epoch the state and the metrics so far are saved with Orbax, and
  ``resume=True`` continues from the latest checkpoint bit for bit;
- a tqdm bar shows the live loss and step size on a terminal; elsewhere
  (a log file, CI) a progress line is printed every few seconds and when a
  run ends; per-epoch metrics go to ``metrics.json``.
"""

from __future__ import annotations

import json
import pathlib
import time
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import aalig_optax
from examples.common import cli
from examples.common import checkpoint
from examples.common import data as data_lib
from examples.common import optimizers
from examples.common import plots
from examples.common.checkpoint import Checkpointer
from examples.common.checkpoint import Run
from examples.common.checkpoint import RunExistsError
from examples.common.checkpoint import RunMismatchError
from examples.common.optimizers import OptConfig
from examples.common.optimizers import RunContext
from examples.common.problems import Problem

__all__ = ["RecompileWarning", "Run", "compare_classifiers", "fit",
           "make_evaluator", "train_supervised"]

LOG_EVERY = 10  # Steps between progress-bar refreshes (each forces a sync).
TRACE_POINTS = 20  # Chunk means of the batch loss and step size per epoch.
EVAL_BATCH = 1000
# Without a terminal (no bar): at most one progress line per this many
# seconds, across runs, so a long script shows it is alive in a log.
PROGRESS_SECONDS = 10.0
_last_progress = [-float("inf")]


class RecompileWarning(UserWarning):
  """The jitted train step was traced more than once in a run."""


def _floats(d: Mapping[str, Any]) -> dict:
  return {k: float(np.asarray(v)) for k, v in d.items()}


def _epoch_record(epoch: int, step_metrics: list) -> dict:
  """An epoch's mean loss, step-size statistics and within-epoch traces."""
  stacked = jax.device_get(jax.tree.map(lambda *x: jnp.stack(x),
                                        *step_metrics))
  n = np.asarray(stacked.get("count", np.ones(len(step_metrics))))
  record = dict(
      epoch=epoch + 1,
      loss=float(np.sum(stacked["loss"] * n) / np.sum(n)),
      # The epoch's mean step size and its share of zero steps (AALIG skips
      # a batch whose losses are all at their AOVs).
      step_size=float(np.mean(stacked["step_size"])),
      zero_step_share=float(np.mean(stacked["step_size"] == 0)),
      step_size_min=float(np.min(stacked["step_size"])),
      step_size_max=float(np.max(stacked["step_size"])),
  )
  # A coarse within-epoch trace (up to TRACE_POINTS chunk means) for the
  # Figure 4 panel, small enough to keep in the JSON history.
  chunks = np.array_split(np.arange(len(step_metrics)),
                          min(TRACE_POINTS, len(step_metrics)))
  record["trace_loss"] = [float(np.sum(stacked["loss"][c] * n[c])
                                / max(np.sum(n[c]), 1.0)) for c in chunks]
  record["trace_step_size"] = [float(np.mean(stacked["step_size"][c]))
                               for c in chunks]
  return record


def fit(state, train_step: Callable, train_data, ctx: RunContext, run: Run,
        *, evaluate: Optional[Callable] = None,
        epoch_metrics: Optional[Callable] = None, desc: str = ""):
  """Trains for ``ctx.epochs`` epochs of ``ctx.steps_per_epoch`` steps.

  Args:
    state: the initial training state (a pytree; donated to the step).
    train_step: ``(state, train_data, indices [B], mask [B]) -> (state,
      metrics)``, pure; `metrics` holds scalars, at least ``loss`` (the
      masked batch mean) and ``step_size``. Jitted here once, state donated.
    train_data: a pytree of device arrays indexed by the batch indices.
    ctx: the run's shape (the same the optimiser was built with).
    run: its folder, seed, and what to do with a previous run.
    evaluate: ``state -> dict`` of host metrics, run after each epoch.
    epoch_metrics: ``state -> dict`` of scalars (e.g. ``aalig_metrics``).
    desc: progress-bar label.

  Returns:
    ``(state, history)``; `history` is a list of one dict per epoch.
  """
  workdir = pathlib.Path(run.workdir)
  if (not run.resume and not run.overwrite
      and (workdir / "metrics.json").exists()):
    # Metrics without checkpoints (deleted to save space) are work too.
    raise RunExistsError(
        f"{workdir} holds a previous run's metrics.json: pass resume=True "
        "(--resume) to continue it, overwrite=True (--overwrite) to replace "
        "it, or use another workdir.")
  if run.resume and (workdir / "metrics.json").exists() and not any(
      p.name[len("epoch_"):].isdigit()
      for p in (workdir / "ckpt").glob("epoch_*")):
    # Starting over would replace the history with a shorter one.
    raise RunMismatchError(
        f"{workdir} holds a previous run's metrics.json but no checkpoint "
        f"to resume from ({workdir / 'ckpt'} is empty or gone): pass "
        "--overwrite (overwrite=True) to train it again from scratch and "
        "replace its metrics, or put its checkpoints back.")
  workdir.mkdir(parents=True, exist_ok=True)
  ckpt = Checkpointer(workdir / "ckpt", fresh=not run.resume,
                      overwrite=run.overwrite)
  try:
    return _fit(state, train_step, train_data, ctx, run, ckpt,
                evaluate=evaluate, epoch_metrics=epoch_metrics, desc=desc)
  finally:
    ckpt.close()


def _resumed(state, ckpt: Checkpointer, run: Run, desc: str):
  """(state, history) of the run's latest checkpoint, or (state, []) for a
  fresh run; refuses a run checkpointed with other flags."""
  workdir = pathlib.Path(run.workdir)
  latest = ckpt.latest() if run.resume else None
  if latest is None:
    return state, []
  flags = None if run.flags is None else json.loads(json.dumps(
      dict(run.flags)))
  saved = ckpt.flags(latest)
  if flags is not None and saved is not None and saved != flags:
    raise RunMismatchError(
        f"--resume would continue the run in {workdir} with other flags ("
        + "; ".join(checkpoint.flag_mismatches(saved, flags))
        + "): pass the run's flags to continue it, --overwrite to replace "
        "it, or another --workdir.")
  state, history = ckpt.restore(latest, state)
  print(f"[{desc}] resumed from {workdir / 'ckpt'} after epoch "
        f"{latest + 1}")
  return state, history


def _fit(state, train_step, train_data, ctx: RunContext, run: Run,
         ckpt: Checkpointer, *, evaluate, epoch_metrics, desc):
  from tqdm.auto import tqdm  # Optional dependency of the examples.

  workdir = pathlib.Path(run.workdir)
  state, history = _resumed(state, ckpt, run, desc)
  start_epoch = len(history)

  traces = []

  def traced_step(*args):
    traces.append(None)  # Runs once per trace, i.e. per compilation.
    return train_step(*args)

  step_fn = jax.jit(traced_step, donate_argnums=0)
  spe = ctx.steps_per_epoch
  bar = tqdm(total=spe * (ctx.epochs - start_epoch), desc=desc,
             leave=False, dynamic_ncols=True, mininterval=0.5,
             disable=None)  # None: no bar when not a terminal.
  for epoch in range(start_epoch, ctx.epochs):
    t0 = time.time()
    step_metrics = []
    batches = data_lib.epoch_batches(ctx.num_examples, ctx.batch_size,
                                     run.seed, epoch)
    for i, (idx, mask) in enumerate(batches):
      if i >= spe:
        break
      state, metrics = step_fn(state, train_data, idx, mask)
      step_metrics.append(metrics)
      bar.update(1)
      if i % LOG_EVERY == 0:
        bar.set_postfix(epoch=epoch, loss=f"{float(metrics['loss']):.4g}",
                        step=f"{float(metrics['step_size']):.3g}")
    record = _epoch_record(epoch, step_metrics)
    if epoch_metrics is not None:
      # State read-outs (e.g. AALIG's last step size) never replace the
      # epoch's statistics: a clashing key is stored as last_<key>.
      record.update({(f"last_{k}" if k in record else k): v
                     for k, v in _floats(epoch_metrics(state)).items()})
    if evaluate is not None:
      record.update(evaluate(state))
    record["seconds"] = time.time() - t0
    history.append(record)
    ckpt.save(epoch, state, history, run.flags)
    (workdir / "metrics.json").write_text(json.dumps(history, indent=1))
    if bar.disable and not run.verbose:
      now = time.time()
      if now - _last_progress[0] >= PROGRESS_SECONDS:
        _last_progress[0] = now
        print(f"[{desc}] epoch {epoch + 1}/{ctx.epochs} "
              f"loss={record['loss']:.4g} ({record['seconds']:.1f} s)",
              flush=True)
    if run.verbose:
      shown = {k: v for k, v in record.items() if k not in (
          "epoch", "step_size_min", "step_size_max", "sections_done",
          "last_step_size",
          "num_invalid", "trace_loss", "trace_step_size")}
      bar.write(f"[{desc}] epoch {epoch + 1}/{ctx.epochs} " + " ".join(
          f"{k}={v:.4g}" for k, v in shown.items()))
  bar.close()
  if bar.disable and not run.verbose and history:
    print(f"[{desc}] done: {len(history)} epochs, "
          f"loss={history[-1]['loss']:.4g}", flush=True)
  compiles = len(traces)
  if compiles > 1:
    warnings.warn(f"[{desc}] the train step was compiled {compiles} times; "
                  "batch shapes or dtypes changed between steps.",
                  RecompileWarning)
  return state, history


# --------------------------------------------------------------------------
# Supervised problems.


def _masked_mean(values, mask):
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_evaluator(problem: Problem, graphdef, batch_size: int = EVAL_BATCH):
  """Returns ``(state, x, y) -> dict`` of mean loss (and accuracy) on (x, y).

  Jitted once per input shape; runs over padded, masked batches.
  """

  @jax.jit
  def batch_sums(params, rest, x, y, mask):
    model = nnx.merge(graphdef, params, rest, copy=True)
    out = model(problem.preprocess(x), train=False)
    losses = problem.per_example_loss(out, y)
    m = mask.astype(jnp.float32)
    sums = dict(loss=jnp.sum(losses * m), count=jnp.sum(m))
    if problem.accuracy is not None:
      sums["acc"] = jnp.sum(problem.accuracy(out, y) * m)
    return sums

  def evaluate(state, x, y):
    totals: dict = {}
    n = len(y)
    for idx, mask in data_lib.epoch_batches(n, min(batch_size, n), 0, 0,
                                            shuffle=False):
      s = batch_sums(state["params"], state["rest"], x[idx], y[idx], mask)
      for k, v in s.items():
        totals[k] = totals.get(k, 0.0) + v
    totals = jax.device_get(totals)
    out = {"loss": float(totals["loss"] / totals["count"])}
    if "acc" in totals:
      out["acc"] = float(totals["acc"] / totals["count"])
    return out

  return evaluate


def train_supervised(problem: Problem, cfg: OptConfig, ctx: RunContext,
                     run: Run, *, eval_train: bool = False,
                     max_eval: Optional[int] = None):
  """Trains `problem`'s model with the optimiser `cfg`; see :func:`fit`.

  The step is the pattern to copy: per-example losses from the model, the
  gradient of their masked mean, and an optimiser update that receives the
  losses, their dataset indices and the padding mask (AALIG), or the scalar
  loss (ALI-G, SPS)::

      (loss, (losses, rest)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(params, rest, x, y, mask)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     losses=losses, indices=idx, mask=mask,
                                     value=loss)
      params = optax.apply_updates(params, updates)

  Args:
    problem: data, model and losses.
    cfg: the optimiser.
    ctx: the run's shape; ``ctx.num_examples`` is the problem's train size.
    run: folder, seed, resume/overwrite, verbosity.
    eval_train: also evaluate the full training set each epoch (the paper's
      training-loss curves for the convex problems); else the epoch's mean
      batch loss is the training loss.
    max_eval: evaluate on at most this many examples of each set.

  Returns:
    ``(state, history)`` as :func:`fit`.
  """
  data = problem.data
  if ctx.num_examples != data.num_train:
    raise ValueError(f"the run context is for {ctx.num_examples} examples, "
                     f"the problem has {data.num_train}")
  model = problem.make_model(nnx.Rngs(run.seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optimizers.make_optimizer(cfg, ctx)
  state = dict(params=params, rest=rest, opt=tx.init(params),
               rng=jax.random.PRNGKey(run.seed))
  train_data = dict(x=jnp.asarray(data.x_train), y=jnp.asarray(data.y_train))

  def loss_fn(params, rest, x, y, mask):
    # copy=True: fresh Variables at this trace level, so that batch norm can
    # update its statistics under value_and_grad (flax 0.12 refuses to
    # mutate Variables that wrap arrays from another trace).
    model = nnx.merge(graphdef, params, rest, copy=True)
    losses = problem.per_example_loss(model(x, train=True), y)
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return _masked_mean(losses, mask), (losses, new_rest)

  def train_step(state, train_data, idx, mask):
    x = problem.preprocess(train_data["x"][idx])
    y = train_data["y"][idx]
    rng, aug_key = jax.random.split(state["rng"])
    if problem.augment is not None:
      # A fresh augmentation each step; the AOV stays keyed on `idx`.
      x = problem.augment(aug_key, x)
    (loss, (losses, rest)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state["params"], state["rest"], x, y, mask)
    losses = jax.lax.stop_gradient(losses)
    updates, opt_state = tx.update(grads, state["opt"], state["params"],
                                   losses=losses, indices=idx, mask=mask,
                                   value=loss)
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(loss=loss, count=jnp.sum(mask, dtype=jnp.float32),
                   step_size=optimizers.logged_step_size(
                       cfg, opt_state, grads, loss, ctx))
    return dict(params=params, rest=rest, opt=opt_state, rng=rng), metrics

  evaluator = make_evaluator(problem, graphdef)
  cut = lambda a: a if max_eval is None else a[:max_eval]
  x_te, y_te = cut(data.x_test), cut(data.y_test)
  x_tr, y_tr = cut(data.x_train), cut(data.y_train)

  def evaluate(state):
    out = {f"val_{k}": v for k, v in evaluator(state, x_te, y_te).items()}
    if eval_train:
      out.update({f"train_{k}": v
                  for k, v in evaluator(state, x_tr, y_tr).items()})
    return out

  epoch_metrics = None
  if cfg.name == "aalig":
    epoch_metrics = lambda s: aalig_optax.aalig_metrics(s["opt"])
  return fit(state, train_step, train_data, ctx, run, evaluate=evaluate,
             epoch_metrics=epoch_metrics, desc=f"{problem.name} {cfg.label}")


def compare_classifiers(train_one: Callable, num_examples: int,
                        configs: Sequence[OptConfig], args, name: str, *,
                        val_label: str, title: str):
  """Trains with each optimiser config and plots the runs.

  Args:
    train_one: ``(cfg, ctx, run) -> (state, history)``, e.g.
      ``functools.partial(train_supervised, problem)``.
    num_examples: the training set's size.
    configs: the optimisers to compare.
    args: the parsed command line (batch_size, epochs, seed, workdir, resume,
      overwrite, quiet, steps_per_epoch).
    name: run name; each optimiser's run goes to ``workdir/<name>_<opt>``.
    val_label: y-axis label of the validation panel.
    title: the plot's title.

  Returns:
    (rows, histories): one row per optimiser (final train/test loss, test
    accuracy, best test accuracy, seconds) and each run's per-epoch history.
    The plot is written to ``workdir/<name>.png``. Missing data and an
    existing run end the script with their one-line message.
  """
  workdir = pathlib.Path(args.workdir)
  ctx = cli.run_context(args, num_examples)
  rows, histories = [], {}
  for cfg in configs:
    t0 = time.time()
    with cli.clear_errors():
      _, hist = train_one(cfg, ctx,
                          cli.run_of(args, workdir / f"{name}_{cfg.name}"))
    histories[cfg.label] = hist
    last = hist[-1]
    rows.append(dict(optimiser=cfg.label, train_loss=last["loss"],
                     test_loss=last["val_loss"], test_acc=last["val_acc"],
                     best_test_acc=max(r["val_acc"] for r in hist),
                     seconds=time.time() - t0))
  plots.plot_runs(histories, workdir / f"{name}.png", train_key="loss",
                  val_key="val_acc", val_label=val_label, title=title)
  return rows, histories
