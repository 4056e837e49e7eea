"""The one optimiser registry of the examples and benchmarks; the run context.

A run's shape (N, batch size, steps per epoch, epochs, AALIG's epochs per
section) is computed once, by :meth:`RunContext.create`, and that one object
is handed to the optimiser (AALIG's tables and sections, SGD's step
schedule) and to the training loop (how many steps an epoch has), so the two
cannot disagree.

Every optimiser is built by :func:`build` from a name, a step size, a weight
decay and the run context, and is wrapped so that one call serves them all:
``tx.update(grads, state, params, value=mean_loss, losses=per_example_losses,
indices=dataset_indices, mask=mask)``; each takes the keywords it needs and
ignores the others. Hyperparameters may be traced (the quality benchmark
vmaps over them). Evaluate a model at :func:`eval_params` of the optimiser
state and the parameters: the parameters themselves, except for the
schedule-free optimisers, whose gradients are taken at an interpolation of
the averaged iterate (the model to evaluate) and the SGD/Adam iterate.

Weight decay: AALIG takes it as its own argument (kept out of the Polyak
denominator and of the momentum buffer, see docs/algorithm.md); the other tuned
optimisers get the usual coupled L2 term, ``optax.add_decayed_weights`` in
front of them (PyTorch's ``weight_decay=`` for SGD, Adam, and the papers'
ALI-G/SPS runs), except MoMo and the schedule-free optimisers, which take it
as their own argument as their papers do. ``wd=None`` adds no term at all.
The learning-rate-free optimisers of ``optax.contrib`` run at their
defaults (learning_rate=1, weight_decay=0): that is how a user picks them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
import optax.contrib

import aalig_optax
from examples.common import data as data_lib

__all__ = ["OPTIMISERS", "OptConfig", "OptSpec", "RunContext", "SPECS",
           "aalig_state", "build", "CHOICES", "eval_params", "learning_rate",
           "logged_step_size", "make_optimizer"]

# The optimisers an example may pick with --optimisers.
OPTIMISERS = ("aalig", "alig", "sps", "adam", "sgd")
# What --optimisers accepts: the defaults, and AALIG with aov_rule="anneal"
# (the rule to use with momentum on problems the model cannot interpolate).
CHOICES = OPTIMISERS + ("aalig_anneal",)


@dataclasses.dataclass(frozen=True)
class RunContext:
  """The shape of one training run, computed once (see :meth:`create`).

  Attributes:
    num_examples: N, the training-set size (AALIG's tables).
    batch_size: B.
    steps_per_epoch: optimiser steps per epoch.
    epochs: the epoch budget.
    epochs_per_section: AALIG's section length in epochs.
  """

  num_examples: int
  batch_size: int
  steps_per_epoch: int
  epochs: int
  epochs_per_section: int

  @classmethod
  def create(cls, num_examples: int, batch_size: int, epochs: int, *,
             sections: int = 10, max_steps_per_epoch: Optional[int] = None,
             drop_remainder: bool = False) -> "RunContext":
    """The context of `epochs` epochs over `num_examples` in batches.

    Args:
      num_examples: N.
      batch_size: B.
      epochs: the epoch budget.
      sections: AALIG's number of AOV sections K over the run (the paper:
        10); each is a whole number of epochs, so a budget under K epochs
        updates the AOVs after every epoch.
      max_steps_per_epoch: cut epochs short (quick runs and tests).
      drop_remainder: an epoch is ``N // B`` full batches (the benchmarks'
        sampler) rather than ``ceil(N / B)`` with the last one padded and
        masked (:func:`examples.common.data.epoch_batches`).
    """
    if drop_remainder:
      spe = num_examples // batch_size
    else:
      spe = data_lib.steps_per_epoch(num_examples, batch_size)
    if max_steps_per_epoch:
      spe = min(spe, max_steps_per_epoch)
    return cls(num_examples, batch_size, spe, epochs,
               max(1, epochs // sections))

  @property
  def total_steps(self) -> int:
    return self.steps_per_epoch * self.epochs


def learning_rate(lr, ctx: RunContext, schedule: str = "constant"):
  """`lr`, or for ``"step"`` the paper's SGD schedule: x0.1 at 50% and 75%.

  The boundaries are kept at steps 1 and 2 at least, so that on a budget of
  one or two steps they stay two distinct boundaries after the first step.
  """
  if schedule == "constant":
    return lr
  if schedule != "step":
    raise ValueError(f"unknown schedule {schedule!r}; constant or step")
  t = ctx.total_steps
  return optax.piecewise_constant_schedule(
      lr, {max(1, t // 2): 0.1, max(2, (3 * t) // 4): 0.1})


def _wd(wd, tx):
  return tx if wd is None else optax.chain(optax.add_decayed_weights(wd), tx)


def _aalig(lr, wd, ctx, momentum, schedule):
  del schedule
  return aalig_optax.aalig(
      lr, ctx.num_examples, ctx.steps_per_epoch, ctx.epochs_per_section,
      momentum=momentum, weight_decay=0.0 if wd is None else wd)


def _aalig_anneal(lr, wd, ctx, momentum, schedule):
  del schedule
  return aalig_optax.aalig(
      lr, ctx.num_examples, ctx.steps_per_epoch, ctx.epochs_per_section,
      momentum=momentum, weight_decay=0.0 if wd is None else wd,
      aov_rule="anneal")


def _aalig_chain(lr, wd, ctx, momentum, schedule):
  # The same maths from the public parts (weight decay 0 only), without the
  # alias's momentum guard for skipped batches: a diagnostic of its cost.
  del wd, schedule
  return optax.chain(
      aalig_optax.scale_by_aalig(lr, ctx.num_examples, ctx.steps_per_epoch,
                                 ctx.epochs_per_section),
      optax.trace(momentum, nesterov=True), optax.scale(-1.0))


def _alig(lr, wd, ctx, momentum, schedule):
  del ctx, schedule
  return _wd(wd, aalig_optax.alig(lr, momentum=momentum))


def _sps(lr, wd, ctx, momentum, schedule):
  # eps keeps 0/0 out when an interpolating task reaches zero loss.
  del ctx, momentum, schedule
  return _wd(wd, optax.polyak_sgd(max_learning_rate=lr, eps=1e-8))


def _adam(lr, wd, ctx, momentum, schedule):
  del momentum
  return _wd(wd, optax.adam(learning_rate(lr, ctx, schedule)))


def _sgd(lr, wd, ctx, momentum, schedule):
  return _wd(wd, optax.sgd(learning_rate(lr, ctx, schedule),
                           momentum=momentum or None,
                           nesterov=bool(momentum)))


def _sgd_step(lr, wd, ctx, momentum, schedule):
  del schedule
  return _sgd(lr, wd, ctx, momentum, "step")


def _contrib(make):
  return lambda lr, wd, ctx, momentum, schedule: make()


def _momo(lr, wd, ctx, momentum, schedule):
  # MoMo (Schaipp et al. 2023): SGD with momentum 0.9 and a Polyak-type
  # step min(lr, (f_bar - lower bound + ...) / ||d||^2) from the minibatch
  # loss `value=` (lower bound 0); its own weight decay, as in its paper.
  # optax 0.2.6 (the floor) calls value.astype: a Python float would fail.
  del ctx, momentum, schedule
  tx = optax.contrib.momo(lr, weight_decay=0.0 if wd is None else wd)

  def update(updates, state, params=None, *, value=None, **extra):
    value = None if value is None else jnp.asarray(value)
    return tx.update(updates, state, params, value=value, **extra)

  return optax.GradientTransformationExtraArgs(tx.init, update)


def schedule_free_warmup(ctx: RunContext) -> int:
  """The schedule-free optimisers' linear warm-up: 5% of the run's steps.

  Defazio et al. (2024) warm up every run; optax's default is none.
  """
  return max(1, ctx.total_steps // 20)


def _sf_sgd(lr, wd, ctx, momentum, schedule):
  del momentum, schedule
  return optax.contrib.schedule_free_sgd(
      lr, warmup_steps=schedule_free_warmup(ctx), weight_decay=wd)


def _sf_adamw(lr, wd, ctx, momentum, schedule):
  del momentum, schedule
  return optax.contrib.schedule_free_adamw(
      lr, warmup_steps=schedule_free_warmup(ctx),
      weight_decay=0.0 if wd is None else wd)


def _schedule_free_eval(opt_state, params):
  # The ScheduleFreeState wherever it sits in the state (a bare
  # schedule_free_* state, or one inside a chain or extra-args wrapper).
  kind = optax.contrib.ScheduleFreeState
  state = next(s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda s: isinstance(s, kind)) if isinstance(s, kind))
  return optax.contrib.schedule_free_eval_params(state, params)


@dataclasses.dataclass(frozen=True)
class OptSpec:
  name: str
  label: str
  # (lr, wd, ctx, momentum, schedule) -> GradientTransformation
  build: Callable
  tuned: bool  # True: one step-size hyperparameter cross-validated.
  description: str
  # (opt_state, params) -> the parameters to evaluate; None: params.
  eval_params: Optional[Callable] = None


SPECS = {
    s.name: s for s in [
        OptSpec("aalig", "AALIG", _aalig, True,
                "aalig(max_lr, N, steps/epoch, epochs//10), momentum 0.9"),
        OptSpec("aalig_anneal", "AALIG (anneal)", _aalig_anneal, True,
                "aalig(..., aov_rule='anneal'): the AOV rule for momentum "
                "on problems the model cannot interpolate"),
        OptSpec("aalig_chain", "AALIG (chain)", _aalig_chain, True,
                "chain(scale_by_aalig, trace(0.9, nesterov), scale(-1)); "
                "diagnostic, overhead only"),
        OptSpec("alig", "ALI-G", _alig, True, "alig(max_lr, momentum=0.9)"),
        OptSpec("sps", "SPS", _sps, True,
                "optax.polyak_sgd(max_lr, f_min=0, eps=1e-8)"),
        OptSpec("adam", "Adam", _adam, True, "optax.adam(lr)"),
        OptSpec("sgd", "SGD", _sgd, True,
                "optax.sgd(lr, momentum=0.9, nesterov=True), constant lr"),
        OptSpec("sgd_step", "SGD+step", _sgd_step, True,
                "optax.sgd, Nesterov 0.9, lr x0.1 at 50% and 75% of steps"),
        OptSpec("prodigy", "Prodigy", _contrib(optax.contrib.prodigy), False,
                "optax.contrib.prodigy() defaults"),
        OptSpec("dog", "DoG", _contrib(optax.contrib.dog), False,
                "optax.contrib.dog() defaults"),
        OptSpec("dadapt", "D-Adapt AdamW", _contrib(optax.contrib.dadapt_adamw),
                False, "optax.contrib.dadapt_adamw() defaults"),
        OptSpec("momo", "MoMo", _momo, True,
                "optax.contrib.momo(max_lr, beta=0.9, lower_bound=0, "
                "weight_decay=wd); update gets value= (minibatch loss)"),
        OptSpec("sf_sgd", "SF-SGD", _sf_sgd, True,
                "optax.contrib.schedule_free_sgd(lr, b1=0.9, warmup 5% of "
                "steps, weight_decay=wd); evaluated at "
                "schedule_free_eval_params", _schedule_free_eval),
        OptSpec("sf_adamw", "SF-AdamW", _sf_adamw, True,
                "optax.contrib.schedule_free_adamw(lr, warmup 5% of steps, "
                "weight_decay=wd); evaluated at schedule_free_eval_params",
                _schedule_free_eval),
    ]
}


def build(name: str, lr, wd, ctx: RunContext, *, momentum: float = 0.9,
          schedule: str = "constant"
          ) -> optax.GradientTransformationExtraArgs:
  """The optimiser `name`, accepting value=/losses=/indices=/mask= in update.

  Args:
    name: a key of :data:`SPECS`.
    lr: the step size, or maximal step size of the Polyak methods.
    wd: weight decay (see the module docstring); None for no term at all.
    ctx: the run (AALIG's tables and sections, SGD's schedule).
    momentum: Nesterov momentum of aalig, alig and sgd (0: none).
    schedule: ``"constant"`` or ``"step"`` (see :func:`learning_rate`), for
      adam and sgd.
  """
  if name not in SPECS:
    raise ValueError(f"unknown optimiser {name!r}; one of {tuple(SPECS)}")
  return optax.with_extra_args_support(
      SPECS[name].build(lr, wd, ctx, momentum, schedule))


def eval_params(name: str, opt_state, params):
  """The parameters to evaluate a model at, after training with `name`.

  `params` itself, except for the schedule-free optimisers:
  ``optax.contrib.schedule_free_eval_params`` of their state (the averaged
  iterate x, not the point y their gradients were taken at). Traceable.
  """
  fn = SPECS[name].eval_params
  return params if fn is None else fn(opt_state, params)


@dataclasses.dataclass(frozen=True)
class OptConfig:
  """An example's optimiser and its hyperparameters.

  Attributes:
    name: one of :data:`OPTIMISERS`: ``aalig`` (this package), ``alig``
      (this package), ``sps`` (``optax.polyak_sgd``), ``adam``, ``sgd``.
    lr: the step size, or maximal step size for the Polyak methods.
    momentum: Nesterov momentum of aalig, alig and sgd (0 for none).
    weight_decay: weight decay (0: none).
    schedule: for sgd and adam, ``"constant"`` or ``"step"`` (the paper's
      SGD baseline).
  """

  name: str
  lr: float
  momentum: float = 0.0
  weight_decay: float = 0.0
  schedule: str = "constant"

  @property
  def label(self) -> str:
    return f"{self.name} (lr={self.lr:g})"


def make_optimizer(cfg: OptConfig, ctx: RunContext
                   ) -> optax.GradientTransformationExtraArgs:
  """:func:`build` for an example's `cfg`."""
  return build(cfg.name, cfg.lr, cfg.weight_decay or None, ctx,
               momentum=cfg.momentum, schedule=cfg.schedule)


def aalig_state(opt_state, types=(aalig_optax.ScaleByAaligState,)):
  """The first state of one of `types` (AALIG's by default) in `opt_state`."""
  return next(s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda s: isinstance(s, types))
              if isinstance(s, types))


def logged_step_size(cfg: OptConfig, opt_state, grads, loss,
                     ctx: RunContext):
  """The step size the optimiser just used, for logging (traceable).

  AALIG and ALI-G report it in their state; for SPS it is recomputed from
  its formula; for Adam and SGD it is the learning rate.
  """
  if cfg.name in ("aalig", "aalig_anneal", "alig"):
    return aalig_state(opt_state, (aalig_optax.ScaleByAaligState,
                                   aalig_optax.ScaleByAligState)).step_size
  if cfg.name == "sps":
    sq = optax.tree.norm(grads, squared=True)
    return jnp.minimum(jnp.maximum(loss, 0.0) / (sq + 1e-8), cfg.lr)
  lr = learning_rate(cfg.lr, ctx, cfg.schedule)
  if not callable(lr):
    return jnp.asarray(lr, jnp.float32)
  # NamedTuple states with a `count` field (not tuple.count, a method).
  has_count = lambda s: "count" in getattr(s, "_fields", ())
  counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=has_count)
            if has_count(s)]
  # The state's count is already incremented: the step just taken used
  # the schedule at count - 1.
  return jnp.asarray(lr(counts[0] - 1), jnp.float32)
