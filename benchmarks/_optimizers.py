"""The optimisers compared, built from one step-size hyperparameter.

Every optimiser is wrapped so that one call serves them all:
``tx.update(grads, state, params, value=mean_loss, losses=per_example_losses,
indices=dataset_indices)``; each takes the keywords it needs and ignores the
others. Hyperparameters may be traced (the quality benchmark vmaps over them).

Weight decay: AALIG takes it as its own argument (kept out of the Polyak
denominator and of the momentum buffer, see SPEC.md); the other tuned
optimisers get the usual coupled L2 term, ``optax.add_decayed_weights`` in
front of them (PyTorch's ``weight_decay=`` for SGD, Adam, and the papers'
ALI-G/SPS runs). The learning-rate-free optimisers of ``optax.contrib`` run at
their defaults (learning_rate=1, weight_decay=0): that is how a user picks them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import optax
import optax.contrib

import aalig_optax


@dataclasses.dataclass(frozen=True)
class Context:
  """What an optimiser may need to know about the training run."""
  num_examples: int
  steps_per_epoch: int
  num_epochs: int

  @property
  def total_steps(self) -> int:
    return self.steps_per_epoch * self.num_epochs


@dataclasses.dataclass(frozen=True)
class OptSpec:
  name: str
  label: str
  build: Callable  # (lr, wd, ctx) -> GradientTransformationExtraArgs
  tuned: bool  # True: one step-size hyperparameter cross-validated.
  description: str


def _wd(wd, tx):
  return optax.chain(optax.add_decayed_weights(wd), tx)


def _aalig(lr, wd, ctx):
  return aalig_optax.aalig(
      lr, ctx.num_examples, ctx.steps_per_epoch,
      max(1, ctx.num_epochs // 10), momentum=0.9, weight_decay=wd)


def _aalig_chain(lr, wd, ctx):
  # The same maths from the public parts (weight decay 0 only), without the
  # alias's momentum guard for skipped batches: a diagnostic of its cost.
  del wd
  return optax.chain(
      aalig_optax.scale_by_aalig(lr, ctx.num_examples, ctx.steps_per_epoch,
                                 max(1, ctx.num_epochs // 10)),
      optax.trace(0.9, nesterov=True), optax.scale(-1.0))


def _alig(lr, wd, ctx):
  return _wd(wd, aalig_optax.alig(lr, momentum=0.9))


def _sps(lr, wd, ctx):
  # eps keeps 0/0 out when an interpolating task reaches zero loss.
  return _wd(wd, optax.polyak_sgd(max_learning_rate=lr, eps=1e-8))


def _adam(lr, wd, ctx):
  return _wd(wd, optax.adam(lr))


def _sgd_const(lr, wd, ctx):
  return _wd(wd, optax.sgd(lr, momentum=0.9, nesterov=True))


def _sgd_step(lr, wd, ctx):
  t = ctx.total_steps
  sched = optax.piecewise_constant_schedule(
      lr, {max(1, t // 2): 0.1, max(2, (3 * t) // 4): 0.1})
  return _wd(wd, optax.sgd(sched, momentum=0.9, nesterov=True))


def _prodigy(lr, wd, ctx):
  return optax.contrib.prodigy()


def _dog(lr, wd, ctx):
  return optax.contrib.dog()


def _dadapt(lr, wd, ctx):
  return optax.contrib.dadapt_adamw()


SPECS = {
    s.name: s for s in [
        OptSpec("aalig", "AALIG", _aalig, True,
                "aalig(max_lr, N, steps/epoch, epochs//10), momentum 0.9"),
        OptSpec("aalig_chain", "AALIG (chain)", _aalig_chain, True,
                "chain(scale_by_aalig, trace(0.9, nesterov), scale(-1)); "
                "diagnostic, overhead only"),
        OptSpec("alig", "ALI-G", _alig, True, "alig(max_lr, momentum=0.9)"),
        OptSpec("sps", "SPS", _sps, True,
                "optax.polyak_sgd(max_lr, f_min=0, eps=1e-8)"),
        OptSpec("adam", "Adam", _adam, True, "optax.adam(lr)"),
        OptSpec("sgd", "SGD", _sgd_const, True,
                "optax.sgd(lr, momentum=0.9, nesterov=True), constant lr"),
        OptSpec("sgd_step", "SGD+step", _sgd_step, True,
                "optax.sgd, Nesterov 0.9, lr x0.1 at 50% and 75% of steps"),
        OptSpec("prodigy", "Prodigy", _prodigy, False,
                "optax.contrib.prodigy() defaults"),
        OptSpec("dog", "DoG", _dog, False, "optax.contrib.dog() defaults"),
        OptSpec("dadapt", "D-Adapt AdamW", _dadapt, False,
                "optax.contrib.dadapt_adamw() defaults"),
    ]
}


def build(name: str, lr, wd, ctx: Context):
  """The optimiser `name`, accepting value=/losses=/indices= in update."""
  return optax.with_extra_args_support(SPECS[name].build(lr, wd, ctx))
