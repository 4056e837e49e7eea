"""AALIG's state: its static configuration, its fields, and how to find it."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

I32_MAX = int(np.iinfo(np.int32).max)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class AaligConfig:
  """What a :class:`ScaleByAaligState` was built for.

  Static: it has no leaves and is part of the state's tree structure, so that
  ``update`` can refuse a state of another transform at trace time and
  :func:`current_aovs` knows the rule of the AOV updates still due. It holds
  no hyperparameter that ``optax.inject_hyperparams`` may inject, so that a
  plain and an injected optimiser have states of the same structure.

  Attributes:
    num_examples: N, the number of rows of each table.
    steps_per_epoch: optimiser steps in an epoch.
    epochs_per_section: epochs between AOV updates.
    loss_estimate: ``"last"`` or ``"best_epoch"``.
    table_dtype: the tables' dtype, by name.
    aov_rule: the AOV rule, by name (``"paper"``, ``"reflect"``) or the
      callable itself.
  """

  num_examples: int
  steps_per_epoch: int
  epochs_per_section: int
  loss_estimate: str
  table_dtype: str
  aov_rule: Any = "paper"

  @property
  def steps_per_section(self) -> int:
    return self.steps_per_epoch * self.epochs_per_section


class ScaleByAaligState(NamedTuple):
  """State of :func:`scale_by_aalig`. N is `num_examples`, T the `table_dtype`.

  Every quantity is a field of its own, so that
  ``optax.tree_utils.tree_get(state, name)`` finds it inside any chain.

  Attributes:
    count: int32 [], steps taken (skipped batches excluded), modulo the
      largest multiple of the section length below 2**31, so that sections
      keep ending however long training runs.
    step_size: float32 [], the step size gamma of the last step taken.
    aov: T [N], approximate optimal value (AOV) of each example's loss. An
      AOV update still due (see ``loss_section``) is applied when the
      example is next read; :func:`current_aovs` applies every one.
    aov_step: T [N], the last increase applied to each AOV.
    last_loss: T [N], the loss last recorded per example; NaN if never seen.
    loss_section: int32 [N], the section in which ``last_loss`` was
      recorded (modulo the count's period); 0 if never seen.
    lower_bound: float32 [], the loss lower bound B given at init, or the
      injected one of the last step: the bound :func:`current_aovs` applies
      the AOV updates still due with.
    num_sections: int32 [], section ends passed; saturates at 2**31 - 1.
    num_invalid: int32 [], rows dropped so far because their index was
      outside [0, num_examples) (see :func:`check_indices`); saturates.
    num_skipped: int32 [], batches skipped because a loss or the gradient was
      not finite; a skipped batch changes nothing else; saturates.
    num_overflows: int32 [], steps whose ||g||^2 + eps overflowed float32
      for a finite gradient: a zero step, the losses recorded; saturates.
    num_clipped: int32 [], steps at which an injected hyperparameter lay
      outside its valid range and was clipped into it (see
      :func:`check_hyperparams`); saturates.
    best_loss: T [N] with ``loss_estimate="best_epoch"``, else None: each
      example's loss in the section's best epoch so far.
    epoch_loss_mean: float32 [] (best_epoch only, else None), mean of the
      losses recorded in the current epoch (a running mean: it cannot
      overflow where a sum of large losses would).
    epoch_loss_count: float32 [] (best_epoch only), their number.
    best_epoch_mean: float32 [] (best_epoch only), lowest epoch mean loss in
      the current section; inf at a section's start.
    config: :class:`AaligConfig`, static (no leaves).
  """

  count: chex.Array
  step_size: chex.Array
  aov: chex.Array
  aov_step: chex.Array
  last_loss: chex.Array
  loss_section: chex.Array
  lower_bound: chex.Array
  num_sections: chex.Array
  num_invalid: chex.Array
  num_skipped: chex.Array
  num_overflows: chex.Array
  num_clipped: chex.Array
  best_loss: Optional[chex.Array]
  epoch_loss_mean: Optional[chex.Array]
  epoch_loss_count: Optional[chex.Array]
  best_epoch_mean: Optional[chex.Array]
  config: Optional[AaligConfig]


# The per-example tables of ScaleByAaligState, each of shape [num_examples]
# (best_loss only with loss_estimate="best_epoch").
TABLE_FIELDS = ("aov", "aov_step", "last_loss", "loss_section", "best_loss")
COUNTER_FIELDS = ("num_sections", "num_invalid", "num_skipped",
                  "num_overflows", "num_clipped")


def new_state(*, aov, config: AaligConfig, lower_bound) -> ScaleByAaligState:
  """The state at init: the AOV table given, every other table and scalar at
  its starting value."""
  n, dtype = config.num_examples, jnp.dtype(config.table_dtype)
  table = lambda v: jnp.full((n,), v, dtype)
  i32 = lambda: jnp.zeros([], jnp.int32)
  best = config.loss_estimate == "best_epoch"
  f32 = lambda v: jnp.asarray(v, jnp.float32) if best else None
  return ScaleByAaligState(
      count=i32(), step_size=jnp.zeros([], jnp.float32), aov=aov,
      aov_step=table(0.0), last_loss=table(jnp.nan),
      loss_section=jnp.zeros((n,), jnp.int32),
      lower_bound=jnp.asarray(lower_bound, jnp.float32),
      **{name: i32() for name in COUNTER_FIELDS},
      best_loss=table(jnp.nan) if best else None,
      epoch_loss_mean=f32(0.0), epoch_loss_count=f32(0.0),
      best_epoch_mean=f32(jnp.inf), config=config)


def saturating_add(count: chex.Array, increment: chex.Array) -> chex.Array:
  """int32 `count + increment` (increment >= 0), stopping at 2**31 - 1."""
  increment = jnp.asarray(increment).astype(jnp.int32)
  return jnp.where(count > I32_MAX - increment, I32_MAX, count + increment)


def find_aalig_states(state) -> list[ScaleByAaligState]:
  return [
      s for s in jax.tree.leaves(
          state, is_leaf=lambda x: isinstance(x, ScaleByAaligState))
      if isinstance(s, ScaleByAaligState)
  ]


def the_aalig_state(state) -> ScaleByAaligState:
  found = find_aalig_states(state)
  if len(found) != 1:
    raise ValueError(
        f"Expected exactly one ScaleByAaligState in the optimiser state, found "
        f"{len(found)}.")
  return found[0]


def the_aalig_arrays(state) -> ScaleByAaligState:
  """:func:`the_aalig_state` with its leaves as arrays (a Flax
  ``nnx.Optimizer`` keeps them wrapped in variables)."""
  s = the_aalig_state(state)
  return s._replace(**{name: jnp.asarray(value)
                       for name, value in s._asdict().items()
                       if name != "config" and value is not None})


def check_state_fits(state, config: AaligConfig, axis_name) -> None:
  """Raises at trace time when `state` was not built by this transform."""
  if not isinstance(state, ScaleByAaligState):
    raise TypeError(
        "AALIG's update needs the ScaleByAaligState its init returned, got "
        f"{type(state).__name__}.")
  rows = tuple(state.aov.shape)
  n = config.num_examples
  if rows != (n,):
    msg = (f"The state's tables hold {rows[0] if len(rows) == 1 else rows} "
           f"rows but this transform was built with num_examples={n}: the "
           "state belongs to another transform or data set.")
    if axis_name is not None and len(rows) == 1 and n % rows[0] == 0:
      msg += (" Under shard_map or pmap each replica sees only its own block "
              "of a split table: pass the optimiser state replicated (in_specs"
              " P() for it), or split the tables under jit with "
              "state_shardings.")
    raise ValueError(msg)
  if state.aov.dtype != jnp.dtype(config.table_dtype):
    raise ValueError(
        f"The state's tables are {state.aov.dtype}, but this transform was "
        f"built with table_dtype={config.table_dtype}: the state belongs to "
        "another transform.")
  has_best = state.best_loss is not None
  if has_best != (config.loss_estimate == "best_epoch"):
    raise ValueError(
        "The state was built with loss_estimate="
        f"{'best_epoch' if has_best else 'last'!r}, but this transform has "
        f"loss_estimate={config.loss_estimate!r}.")
  old = state.config
  if old is None:
    return
  diffs = [f"{f}={getattr(old, f)!r} (state) vs {getattr(config, f)!r} "
           "(transform)"
           for f in ("steps_per_epoch", "epochs_per_section")
           if getattr(old, f) != getattr(config, f)]
  if diffs:
    raise ValueError(
        "The state was built for another AALIG schedule; its counters and "
        "AOVs would be read against the wrong sections. Differing: "
        + "; ".join(diffs) + ".")
