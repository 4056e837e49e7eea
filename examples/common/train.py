"""The examples' training loop: optimisers, a jitted step, checkpoints, plots.

One run trains one model with one optimiser:

- the train step is ``jax.jit``-compiled once, with the training state
  donated (its buffers are reused in place) and the training arrays passed as
  non-donated device arguments, gathered by index inside the step;
- batches come from :func:`examples.common.data.epoch_batches`, keyed on
  (seed, epoch), and carry each example's dataset index (AALIG's AOV key);
- after each epoch the state and the metrics so far are saved with Orbax, and
  ``resume=True`` continues from the latest checkpoint bit for bit;
- a tqdm bar shows the live loss and step size; per-epoch metrics go to
  ``metrics.json``; :func:`plot_runs` draws the paper's figures.

References:
  Paren, Poudel, Kumar, "Faking Interpolation Until You Make It", Sec. 5 and
  Figure 4 (step size and mean AOV against the mean loss).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil
import time
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import aalig_optax
from examples.common import data as data_lib

__all__ = [
    "OPTIMISERS",
    "OptConfig",
    "Problem",
    "fit",
    "format_table",
    "logged_step_size",
    "make_optimizer",
    "plot_runs",
    "previous_run_files",
    "RunExistsError",
    "train_supervised",
]

OPTIMISERS = ("aalig", "alig", "sps", "adam", "sgd")


# --------------------------------------------------------------------------
# Optimisers.


@dataclasses.dataclass
class OptConfig:
  """An optimiser and its hyperparameters.

  Attributes:
    name: one of :data:`OPTIMISERS`: ``aalig`` (this package), ``alig``
      (this package), ``sps`` (``optax.polyak_sgd``), ``adam``, ``sgd``.
    lr: the step size, or maximal step size for the Polyak methods.
    momentum: Nesterov momentum of aalig, alig and sgd (0 for none).
    weight_decay: L2 weight decay (aalig's own; added to the gradient for
      sgd and adam).
    schedule: for sgd, ``"constant"`` or ``"step"`` (divide by 10 at half and
      three quarters of training, the paper's SGD baseline).
    sections: AALIG's number of AOV sections K over the run (the paper: 10).
  """

  name: str
  lr: float
  momentum: float = 0.0
  weight_decay: float = 0.0
  schedule: str = "constant"
  sections: int = 10

  @property
  def label(self) -> str:
    return f"{self.name} (lr={self.lr:g})"


def _lr_schedule(cfg: OptConfig, total_steps: int):
  if cfg.schedule == "step":
    return optax.piecewise_constant_schedule(
        cfg.lr, {total_steps // 2: 0.1, (3 * total_steps) // 4: 0.1})
  return optax.constant_schedule(cfg.lr)


def make_optimizer(cfg: OptConfig, *, num_examples: int,
                   steps_per_epoch: int, num_epochs: int
                   ) -> optax.GradientTransformationExtraArgs:
  """Builds the optimiser of `cfg`; its ``update`` accepts every extra arg.

  All returned optimisers take ``update(grads, state, params, losses=...,
  indices=..., mask=..., value=...)`` and use what they need: AALIG the
  per-example ``losses``/``indices``/``mask``, ALI-G and SPS the scalar
  ``value``, Adam and SGD nothing.

  Args:
    cfg: the optimiser's configuration.
    num_examples: N, the training set size (AALIG's tables).
    steps_per_epoch: optimiser steps per epoch.
    num_epochs: the run's epoch budget (AALIG's sections, SGD's schedule).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  total = steps_per_epoch * num_epochs
  if cfg.name == "aalig":
    # K = cfg.sections sections over the budget (the paper: K = 10), each a
    # whole number of epochs, so a budget under K epochs updates the AOVs
    # after every epoch.
    tx = aalig_optax.aalig(
        cfg.lr, num_examples, steps_per_epoch,
        max(1, num_epochs // cfg.sections), momentum=cfg.momentum,
        weight_decay=cfg.weight_decay)
  elif cfg.name == "alig":
    tx = aalig_optax.alig(cfg.lr, momentum=cfg.momentum)
  elif cfg.name == "sps":
    tx = optax.polyak_sgd(cfg.lr, eps=1e-8)
  elif cfg.name in ("adam", "sgd"):
    parts = []
    if cfg.weight_decay:
      parts.append(optax.add_decayed_weights(cfg.weight_decay))
    if cfg.name == "adam":
      parts.append(optax.adam(_lr_schedule(cfg, total)))
    else:
      parts.append(optax.sgd(_lr_schedule(cfg, total),
                             momentum=cfg.momentum or None,
                             nesterov=bool(cfg.momentum)))
    tx = optax.chain(*parts)
  else:
    raise ValueError(f"unknown optimiser {cfg.name!r}; one of {OPTIMISERS}")
  return optax.with_extra_args_support(tx)


def logged_step_size(cfg: OptConfig, opt_state, grads, loss, total_steps):
  """The step size the optimiser just used, for logging (traceable).

  AALIG and ALI-G report it in their state; for SPS it is recomputed from
  its formula; for Adam and SGD it is the learning rate.
  """
  is_polyak = lambda s: isinstance(
      s, (aalig_optax.ScaleByAaligState, aalig_optax.ScaleByAligState))
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_polyak)
           if is_polyak(s)]
  if found:
    return found[0].step_size
  if cfg.name == "sps":
    sq = optax.tree.norm(grads, squared=True)
    return jnp.minimum(jnp.maximum(loss, 0.0) / (sq + 1e-8), cfg.lr)
  # NamedTuple states with a `count` field (not tuple.count, a method).
  has_count = lambda s: "count" in getattr(s, "_fields", ())
  counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=has_count)
            if has_count(s)]
  # The state's count is already incremented: the step just taken used
  # the schedule at count - 1.
  count = counts[0] - 1 if counts else 0
  return jnp.asarray(_lr_schedule(cfg, total_steps)(count), jnp.float32)


# --------------------------------------------------------------------------
# Checkpoints.


def _to_saveable(state):
  leaves = jax.tree.leaves(state)
  out = {}
  for i, leaf in enumerate(leaves):
    if jnp.issubdtype(jnp.asarray(leaf).dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    out[f"{i:05d}"] = np.asarray(jax.device_get(leaf))
  return out


def _from_saveable(template, saved):
  leaves, treedef = jax.tree.flatten(template)
  new = []
  for i, leaf in enumerate(leaves):
    value = saved[f"{i:05d}"]
    if jnp.issubdtype(jnp.asarray(leaf).dtype, jax.dtypes.prng_key):
      value = jax.random.wrap_key_data(value)
    new.append(jnp.asarray(value, dtype=None if jnp.issubdtype(
        jnp.asarray(leaf).dtype, jax.dtypes.prng_key) else leaf.dtype))
  return jax.tree.unflatten(treedef, new)


def previous_run_files(directory) -> list[pathlib.Path]:
  """What a previous run left in `directory`: checkpoints and metrics.

  Looks at `directory` and two levels of run folders below it (the
  examples' layouts: ``<workdir>/<run>/`` and ``<workdir>/<set>/<run>/``),
  not deeper, so that a mistaken ``--workdir ~`` stays quick.

  Args:
    directory: a run folder or an example's workdir.

  Returns:
    The non-empty ``ckpt`` folders and ``metrics.json`` files found, sorted.
  """
  directory = pathlib.Path(directory)
  found = []
  for pattern in ("", "*/", "*/*/"):
    for path in directory.glob(pattern + "ckpt"):
      if path.is_dir() and any(path.iterdir()):
        found.append(path)
    found.extend(p for p in directory.glob(pattern + "metrics.json")
                 if p.is_file())
  return sorted(found)


class RunExistsError(FileExistsError):
  """A fresh run would replace a previous run's checkpoints."""


class Checkpointer:
  """Orbax checkpoints of (state, history), one per epoch, the last 2 kept.

  The state is saved as its flat list of leaves, so any pytree (NNX states,
  optax NamedTuples with None fields) round-trips exactly into the structure
  of a freshly initialised template.
  """

  def __init__(self, directory: pathlib.Path, fresh: bool,
               overwrite: bool = False):
    """Opens (or, for a fresh run, creates) the checkpoint folder.

    Args:
      directory: the run's ``ckpt`` folder.
      fresh: the run starts from scratch (no ``resume``).
      overwrite: a fresh run may delete the checkpoints already in
        `directory`; without it, existing checkpoints raise.

    Raises:
      RunExistsError: if `fresh`, `directory` holds checkpoints and not
        `overwrite`; nothing is deleted.
    """
    import orbax.checkpoint as ocp  # Imported late: slow to import.
    self._ocp = ocp
    directory = pathlib.Path(directory).resolve()
    if fresh and directory.is_dir() and any(directory.iterdir()):
      if not overwrite:
        raise RunExistsError(
            f"{directory} holds a previous run's checkpoints: pass "
            "resume=True (--resume) to continue it, overwrite=True "
            "(--overwrite) to replace it, or use another workdir.")
      shutil.rmtree(directory)
    self.manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=2, enable_async_checkpointing=False))

  def save(self, epoch: int, state, history: list) -> None:
    ocp = self._ocp
    self.manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_saveable(state)),
        history=ocp.args.JsonSave(history)))
    self.manager.wait_until_finished()

  def latest(self) -> Optional[int]:
    return self.manager.latest_step()

  def restore(self, epoch: int, template):
    ocp = self._ocp
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
        _to_saveable(template))
    out = self.manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        history=ocp.args.JsonRestore()))
    return _from_saveable(template, out["state"]), list(out["history"])


# --------------------------------------------------------------------------
# The generic loop.


class RecompileWarning(UserWarning):
  """The jitted train step was traced more than once in a run."""


def _floats(d: Mapping[str, Any]) -> dict:
  return {k: float(np.asarray(v)) for k, v in d.items()}


def fit(state, train_step: Callable, train_data, *, num_examples: int,
        batch_size: int, num_epochs: int, seed: int, workdir,
        evaluate: Optional[Callable] = None,
        epoch_metrics: Optional[Callable] = None, resume: bool = False,
        overwrite: bool = False, desc: str = "", verbose: bool = True,
        log_every: int = 10,
        max_steps_per_epoch: Optional[int] = None, trace_points: int = 20):
  """Trains for `num_epochs` epochs, checkpointing after each.

  Args:
    state: the initial training state (a pytree; donated to the step).
    train_step: ``(state, train_data, indices [B], mask [B]) -> (state,
      metrics)``, pure; `metrics` holds scalars, at least ``loss`` (the
      masked batch mean) and ``step_size``. Jitted here once, state donated.
    train_data: a pytree of device arrays indexed by the batch indices.
    num_examples: N.
    batch_size: B.
    num_epochs: epochs to reach (a resumed run continues up to it).
    seed: the data-order seed.
    workdir: run folder: ``ckpt/`` and ``metrics.json`` go there.
    evaluate: ``state -> dict`` of host metrics, run after each epoch.
    epoch_metrics: ``state -> dict`` of scalars (e.g. ``aalig_metrics``).
    resume: continue from the latest checkpoint in `workdir` if any.
    overwrite: without `resume`, replace a previous run's checkpoints and
      metrics in `workdir`; without either, a previous run raises
      :class:`RunExistsError` and nothing is deleted.
    desc: progress-bar label.
    verbose: print one line of metrics per epoch.
    log_every: steps between progress-bar refreshes (each forces a sync).
    max_steps_per_epoch: cut epochs short (quick runs and tests).
    trace_points: per epoch, the number of chunk means of the batch loss and
      step size kept (``trace_loss``, ``trace_step_size``).

  Returns:
    ``(state, history)``; `history` is a list of one dict per epoch.
  """
  from tqdm.auto import tqdm  # Optional dependency of the examples.

  workdir = pathlib.Path(workdir)
  if not resume and not overwrite and (workdir / "metrics.json").exists():
    # Metrics without checkpoints (deleted to save space) are work too.
    raise RunExistsError(
        f"{workdir} holds a previous run's metrics.json: pass resume=True "
        "(--resume) to continue it, overwrite=True (--overwrite) to replace "
        "it, or use another workdir.")
  workdir.mkdir(parents=True, exist_ok=True)
  ckpt = Checkpointer(workdir / "ckpt", fresh=not resume, overwrite=overwrite)
  history: list = []
  start_epoch = 0
  latest = ckpt.latest() if resume else None
  if latest is not None:
    state, history = ckpt.restore(latest, state)
    start_epoch = latest + 1
    print(f"[{desc}] resumed from {workdir / 'ckpt'} after epoch "
          f"{start_epoch}")

  step_fn = jax.jit(train_step, donate_argnums=0)
  spe = data_lib.steps_per_epoch(num_examples, batch_size)
  if max_steps_per_epoch:
    spe = min(spe, max_steps_per_epoch)
  bar = tqdm(total=spe * (num_epochs - start_epoch), desc=desc,
             leave=False, dynamic_ncols=True, mininterval=0.5,
             disable=None)  # None: no bar when not a terminal.
  for epoch in range(start_epoch, num_epochs):
    t0 = time.time()
    step_metrics = []
    batches = data_lib.epoch_batches(num_examples, batch_size, seed, epoch)
    for i, (idx, mask) in enumerate(batches):
      if i >= spe:
        break
      state, metrics = step_fn(state, train_data, idx, mask)
      step_metrics.append(metrics)
      bar.update(1)
      if i % log_every == 0:
        bar.set_postfix(epoch=epoch, loss=f"{float(metrics['loss']):.4g}",
                        step=f"{float(metrics['step_size']):.3g}")
    stacked = jax.device_get(jax.tree.map(lambda *x: jnp.stack(x),
                                          *step_metrics))
    n = np.asarray(stacked.get("count", np.ones(len(step_metrics))))
    record = dict(
        epoch=epoch + 1,
        loss=float(np.sum(stacked["loss"] * n) / np.sum(n)),
        step_size=float(np.mean(stacked["step_size"])),
        step_size_min=float(np.min(stacked["step_size"])),
        step_size_max=float(np.max(stacked["step_size"])),
    )
    # A coarse within-epoch trace (up to `trace_points` chunk means) for the
    # Figure 4 panel, small enough to keep in the JSON history.
    chunks = np.array_split(np.arange(len(step_metrics)),
                            min(trace_points, len(step_metrics)))
    record["trace_loss"] = [float(np.sum(stacked["loss"][c] * n[c])
                                  / max(np.sum(n[c]), 1.0)) for c in chunks]
    record["trace_step_size"] = [float(np.mean(stacked["step_size"][c]))
                                 for c in chunks]
    if epoch_metrics is not None:
      record.update(_floats(epoch_metrics(state)))
    if evaluate is not None:
      record.update(evaluate(state))
    record["seconds"] = time.time() - t0
    history.append(record)
    ckpt.save(epoch, state, history)
    (workdir / "metrics.json").write_text(json.dumps(history, indent=1))
    if verbose:
      shown = {k: v for k, v in record.items() if k not in (
          "epoch", "step_size_min", "step_size_max", "sections_done",
          "num_invalid", "trace_loss", "trace_step_size")}
      bar.write(f"[{desc}] epoch {epoch + 1}/{num_epochs} " + " ".join(
          f"{k}={v:.4g}" for k, v in shown.items()))
  bar.close()
  compiles = getattr(step_fn, "_cache_size", lambda: 1)()
  if compiles > 1:
    warnings.warn(f"[{desc}] the train step was compiled {compiles} times; "
                  "batch shapes or dtypes changed between steps.",
                  RecompileWarning)
  return state, history


# --------------------------------------------------------------------------
# Supervised problems.


@dataclasses.dataclass
class Problem:
  """A supervised learning problem: data, model and losses.

  Attributes:
    data: the data set (row position = dataset index).
    make_model: ``rngs -> nnx.Module``; the module is called as
      ``model(x, train=bool)``.
    per_example_loss: ``(outputs [B, ...], targets [B, ...]) -> [B]``.
    accuracy: optional ``(outputs, targets) -> [B]`` of 0/1 (or a per-example
      accuracy in [0, 1]).
    preprocess: in-jit ``x -> x`` (e.g. uint8 images to normalised floats).
    augment: optional in-jit ``(key, x [B, ...]) -> x`` for training batches.
    name: for logs.
  """

  data: data_lib.ArrayDataset
  make_model: Callable[[nnx.Rngs], nnx.Module]
  per_example_loss: Callable
  accuracy: Optional[Callable] = None
  preprocess: Callable = lambda x: x
  augment: Optional[Callable] = None
  name: str = ""


def _masked_mean(values, mask):
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_evaluator(problem: Problem, graphdef, batch_size: int = 1000):
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


def train_supervised(problem: Problem, cfg: OptConfig, *, batch_size: int,
                     num_epochs: int, seed: int, workdir,
                     resume: bool = False, overwrite: bool = False,
                     eval_train: bool = False,
                     eval_batch_size: int = 1000, verbose: bool = True,
                     max_steps_per_epoch: Optional[int] = None,
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
    batch_size: B.
    num_epochs: epoch budget.
    seed: model-initialisation and data-order seed.
    workdir: the run's folder.
    resume: continue from the latest checkpoint.
    overwrite: replace a previous run's checkpoints (see :func:`fit`).
    eval_train: also evaluate the full training set each epoch (the paper's
      training-loss curves for the convex problems); else the epoch's mean
      batch loss is the training loss.
    eval_batch_size: batch size of evaluation passes.
    verbose: print per-epoch metrics.
    max_steps_per_epoch: cut epochs short (quick runs, tests).
    max_eval: evaluate on at most this many examples of each set.

  Returns:
    ``(state, history)`` as :func:`fit`.
  """
  data = problem.data
  model = problem.make_model(nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  num_examples = data.num_train
  spe = data_lib.steps_per_epoch(num_examples, batch_size)
  if max_steps_per_epoch:
    spe = min(spe, max_steps_per_epoch)
  tx = make_optimizer(cfg, num_examples=num_examples, steps_per_epoch=spe,
                      num_epochs=num_epochs)
  state = dict(params=params, rest=rest, opt=tx.init(params),
               rng=jax.random.PRNGKey(seed))
  train_data = dict(x=jnp.asarray(data.x_train), y=jnp.asarray(data.y_train))
  total_steps = spe * num_epochs

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
                   step_size=logged_step_size(cfg, opt_state, grads, loss,
                                              total_steps))
    return dict(params=params, rest=rest, opt=opt_state, rng=rng), metrics

  evaluator = make_evaluator(problem, graphdef, eval_batch_size)
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
  return fit(state, train_step, train_data, num_examples=num_examples,
             batch_size=batch_size, num_epochs=num_epochs, seed=seed,
             workdir=workdir, evaluate=evaluate, epoch_metrics=epoch_metrics,
             resume=resume, overwrite=overwrite,
             desc=f"{problem.name} {cfg.label}",
             verbose=verbose, max_steps_per_epoch=max_steps_per_epoch)


# --------------------------------------------------------------------------
# Reports.


def compare_classifiers(problem: Problem, configs: Sequence[OptConfig], args,
                        name: str, *, val_label: str, title: str):
  """Trains `problem` with each optimiser config and plots the runs.

  Args:
    problem: the task (data, model, per-example loss).
    configs: the optimisers to compare.
    args: the parsed command line (batch_size, epochs, seed, workdir, resume,
      overwrite, quiet, steps_per_epoch).
    name: run name; each optimiser's run goes to ``workdir/<name>_<opt>``.
    val_label: y-axis label of the validation panel.
    title: the plot's title.

  Returns:
    (rows, histories): one row per optimiser (final train/test loss, test
    accuracy, best test accuracy, seconds) and each run's per-epoch history.
    The plot is written to ``workdir/<name>.png``.
  """
  workdir = pathlib.Path(args.workdir)
  rows, histories = [], {}
  for cfg in configs:
    t0 = time.time()
    _, hist = train_supervised(
        problem, cfg, batch_size=args.batch_size, num_epochs=args.epochs,
        seed=args.seed, workdir=workdir / f"{name}_{cfg.name}",
        resume=args.resume, overwrite=args.overwrite,
        verbose=not args.quiet, max_steps_per_epoch=args.steps_per_epoch)
    histories[cfg.label] = hist
    last = hist[-1]
    rows.append(dict(optimiser=cfg.label, train_loss=last["loss"],
                     test_loss=last["val_loss"], test_acc=last["val_acc"],
                     best_test_acc=max(r["val_acc"] for r in hist),
                     seconds=time.time() - t0))
  plot_runs(histories, workdir / f"{name}.png", train_key="loss",
            val_key="val_acc", val_label=val_label, title=title)
  return rows, histories


def format_table(rows: Sequence[Mapping[str, Any]],
                 columns: Sequence[str]) -> str:
  """A Markdown table of `rows` (dicts) with the given columns."""
  def fmt(v):
    if isinstance(v, float):
      if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) or math.isnan(v):
        return f"{v:.3e}"
      return f"{v:.5g}"
    return str(v)
  lines = ["| " + " | ".join(columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
  return "\n".join(lines)


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
