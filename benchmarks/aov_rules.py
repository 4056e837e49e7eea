"""AALIG's AOV rules side by side: the evaluation suite of ``aov_rule=``.

Every rule runs with the same protocol: each task in the paper's settings
(:mod:`benchmarks.tasks`), Nesterov momentum 0 and 0.9, every maximal step
size of the task's power-of-ten grid and several seeds, all configurations
of one (rule, momentum) in one vmapped program. Per rule it reports the final
training loss (against the floor where known) at the step size chosen on the
mean final training loss, the share of grid points whose every seed ends
within 5% of the floor (or, where the floor is 0 or unknown, within 5% of
the best loss any rule reached), the share of batches with a zero step size
(over the run, and over its last section: a frozen run steps 0 in every
batch) and the validation metric.

Run (results in ``benchmarks/results/aov_rules.{json,md,png}``)::

    python -m benchmarks.aov_rules                 # Sec. 5.1's MF + mushrooms
    python -m benchmarks.aov_rules --tasks regime_fmnist_mlp --seeds 2
    python -m benchmarks.aov_rules --smoke         # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import aalig_optax
from benchmarks import engine
from benchmarks import tasks as tasks_lib
from examples.common import optimizers

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")
DEFAULT_TASKS = ("mf_rank1", "mf_rank4", "mf_rank10", "mf_full",
                 "rbf_mushrooms")
MOMENTA = (0.0, 0.9)
# Rules compared: the library's, by name (see aalig_optax.update_aovs and
# aalig_optax.AOV_RULES).
RULES = ("paper",)
WITHIN = 0.05  # "within 5% of the floor"


def _build(rule, lr, momentum, ctx):
  return aalig_optax.aalig(lr, ctx.num_examples, ctx.steps_per_epoch,
                           ctx.epochs_per_section, momentum=momentum,
                           aov_rule=rule)


class Runner:
  """One task's programs: a vmapped epoch per (rule, momentum)."""

  def __init__(self, task: tasks_lib.Task):
    self.task = task
    self.progs = engine.Programs(task)
    self._epochs: dict[Any, Callable] = {}

  def _epoch_fn(self, rule, momentum):
    key = (rule if isinstance(rule, str) else id(rule), momentum)
    if key in self._epochs:
      return self._epochs[key]
    ctx, progs = self.task.ctx, self.progs

    def one(params, rest, opt_state, lr, idx, x_all, y_all):
      tx = _build(rule, lr, momentum, ctx)

      def body(carry, ib):
        p, r, s = carry
        (loss, (losses, r)), g = jax.value_and_grad(
            progs._loss_fn, has_aux=True)(p, r, x_all[ib], y_all[ib])
        u, s = tx.update(g, s, p, losses=losses, indices=ib)
        return (optax.apply_updates(p, u), r, s), s[0].step_size == 0

      (params, rest, opt_state), zero = jax.lax.scan(
          body, (params, rest, opt_state), idx)
      return params, rest, opt_state, jnp.mean(zero.astype(jnp.float32))

    fn = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, 0, None, None)),
                 donate_argnums=(0, 1, 2))
    self._epochs[key] = fn
    return fn

  def run(self, rule, momentum: float, lrs, seeds) -> list[dict]:
    """Trains every (lr, seed); one record each, with curves."""
    task, ctx = self.task, self.task.ctx
    configs = [(lr, seed) for lr in lrs for seed in seeds]
    lr_arr = jnp.asarray([c[0] for c in configs], jnp.float32)
    models = [engine._split(task.make_model(c[1])) for c in configs]
    params = engine._stack([m[1] for m in models])
    rest = engine._stack([m[2] for m in models])
    init = jax.jit(jax.vmap(lambda p, lr: _build(rule, lr, momentum,
                                                 ctx).init(p)))
    opt_state = jax.tree.map(jnp.array, init(params, lr_arr))
    epoch_fn = self._epoch_fn(rule, momentum)
    d = self.data
    s_e, b = ctx.steps_per_epoch, ctx.batch_size
    train_curve, zero_curve = [], []
    for epoch in range(task.epochs):
      idx = np.stack([
          np.random.default_rng([c[1], epoch]).permutation(task.num_train)
          [:s_e * b].reshape(s_e, b) for c in configs]).astype(np.int32)
      params, rest, opt_state, zero = epoch_fn(
          params, rest, opt_state, lr_arr, jnp.asarray(idx), d["x_train"],
          d["y_train"])
      zero_curve.append(np.asarray(zero))
      if task.eval_every_epoch or epoch == task.epochs - 1:
        tl, _ = self.progs.evaluate(params, rest, d["x_train"], d["y_train"])
        train_curve.append(np.asarray(tl))
    _, vm = self.progs.evaluate(params, rest, d["x_val"], d["y_val"])
    vm = np.asarray(vm)
    zero_curve = np.stack(zero_curve)  # [epochs, configs]
    last = max(1, ctx.epochs_per_section)
    core = opt_state[0]
    return [{
        "lr": float(lr), "seed": int(seed),
        "train_loss": [float(t[i]) for t in train_curve],
        "final_train_loss": float(train_curve[-1][i]),
        "val_metric": float(vm[i]),
        "zero_share": float(zero_curve[:, i].mean()),
        "zero_share_last": float(zero_curve[-last:, i].mean()),
        "reached_fraction": float(core.reached_fraction[i]),
    } for i, (lr, seed) in enumerate(configs)]

  @property
  def data(self):
    if not hasattr(self, "_data"):
      self._data = {k: jnp.asarray(v) for k, v in self.task.data.items()}
    return self._data
