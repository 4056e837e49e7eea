"""AALIG's state: its static configuration, its fields, and how to find it."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

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
  ``update`` can refuse a state of another transform at trace time and a
  checkpoint can record the schedule its tables belong to.

  Attributes:
    num_examples: N, the number of rows of each table.
    steps_per_epoch: optimiser steps in an epoch.
    epochs_per_section: epochs between AOV updates.
    loss_estimate: ``"last"`` or ``"best_epoch"``.
    table_dtype: the tables' dtype, by name.
    lower_bound: the loss lower bound, or None when it was given as a JAX
      array (e.g. injected with ``optax.inject_hyperparams``).
  """

  num_examples: int
  steps_per_epoch: int
  epochs_per_section: int
  loss_estimate: str
  table_dtype: str
  lower_bound: Optional[float]


class ScaleByAaligState(NamedTuple):
  """State of :func:`scale_by_aalig`. N is `num_examples`, T the `table_dtype`.

  Attributes:
    count: int32 [], steps taken (skipped batches excluded), modulo the
      largest multiple of the section length below 2**31, so that sections
      keep ending however long training runs.
    aov: T [N], approximate optimal value (AOV) of each example's loss.
    aov_step: T [N], the last increase applied to each AOV.
    last_loss: T [N], the loss last recorded per example; NaN if never seen.
    best_loss: T [N] with ``loss_estimate="best_epoch"``, else None: each
      example's loss in the section's best epoch so far.
    epoch_loss_mean: float32 [] (best_epoch only, else None), mean of the
      losses recorded in the current epoch (a running mean: it cannot
      overflow where a sum of large losses would).
    epoch_loss_count: float32 [] (best_epoch only, else None), their number.
    best_epoch_mean: float32 [] (best_epoch only, else None), lowest epoch
      mean loss in the current section; inf at a section's start.
    step_size: float32 [], the step size gamma of the last step.
    reached_fraction: float32 [], share of seen examples whose AOV was reached
      at the last section end; NaN before the first section end.
    num_sections: int32 [], section ends passed.
    num_invalid: int32 [], rows dropped so far because their index was outside
      [0, num_examples) (see :func:`check_indices`); saturates at 2**31 - 1.
    num_skipped: int32 [], batches skipped because a loss or the gradient was
      not finite; a skipped batch changes nothing else in the state;
      saturates at 2**31 - 1.
    num_clipped: int32 [], steps at which an injected hyperparameter lay
      outside its valid range and was clipped into it (see
      :func:`check_hyperparams`); saturates at 2**31 - 1.
    config: :class:`AaligConfig`, static (no leaves): what the state was
      built for.
  """

  count: chex.Array
  aov: chex.Array
  aov_step: chex.Array
  last_loss: chex.Array
  best_loss: Optional[chex.Array]
  epoch_loss_mean: Optional[chex.Array]
  epoch_loss_count: Optional[chex.Array]
  best_epoch_mean: Optional[chex.Array]
  step_size: chex.Array
  reached_fraction: chex.Array
  num_sections: chex.Array
  num_invalid: chex.Array
  num_skipped: chex.Array
  num_clipped: chex.Array
  config: AaligConfig


# The per-example tables of ScaleByAaligState, each of shape [num_examples]
# (best_loss only with loss_estimate="best_epoch").
TABLE_FIELDS = ("aov", "aov_step", "last_loss", "best_loss")


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
  if old is None or old == config:
    return
  diffs = [f"{f}={getattr(old, f)!r} (state) vs {getattr(config, f)!r} "
           "(transform)"
           for f in ("steps_per_epoch", "epochs_per_section")
           if getattr(old, f) != getattr(config, f)]
  if (old.lower_bound is not None and config.lower_bound is not None
      and old.lower_bound < config.lower_bound):
    diffs.append(f"lower_bound={old.lower_bound!r} (state) vs "
                 f"{config.lower_bound!r} (transform): the state's AOVs may "
                 "lie below the new bound")
  if diffs:
    raise ValueError(
        "The state was built for another AALIG schedule; its counters and "
        "AOVs would be read against the wrong sections. Differing: "
        + "; ".join(diffs) + ".")
