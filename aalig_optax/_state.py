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


# The scalars of ScaleByAaligState, packed into two small arrays: each leaf
# of an optimiser state costs the train step a buffer to pass in and out at
# every call (about 1 us on a CPU, more than the kernels of a small model's
# step), and one kernel writes all of them.
COUNTER_FIELDS = ("count", "num_sections", "num_invalid", "num_skipped",
                  "num_clipped")
STAT_FIELDS = ("step_size", "reached_fraction", "epoch_loss_mean",
               "epoch_loss_count", "best_epoch_mean")
NUM_STATS = {"last": 2, "best_epoch": 5}


def _entry(leaf, i):
  """Entry i of a packed leaf, along its last axis (a state stacked over
  devices by pmap, or over runs by vmap, gives one value per replica): an
  array's entries; for a shape-only leaf (``jax.ShapeDtypeStruct``) their
  shape, dtype and sharding; any other leaf (a sharding, a PartitionSpec,
  None) as it is, for all its entries."""
  if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
    return leaf
  if i >= leaf.shape[-1]:
    return None  # A best_epoch field of a state that has none.
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[:-1], leaf.dtype,
                                sharding=leaf.sharding)
  return leaf[..., i]


def _packed(leaf, names, values, dtype, what):
  """`leaf` with the entries named in `values` replaced, in one kernel.

  A value may be a function of the old entry, applied to the whole leaf and
  kept at the entry's position: the leaf is then read element-wise only, and
  XLA writes a donated leaf in place (a read of one entry, e.g.
  ``leaf[0] + 1``, makes it copy the leaf at every step).
  """
  size = leaf.shape[-1]
  unknown = [n for n in values if names.index(n) >= size]
  if unknown:
    raise ValueError(
        f"This state has no {', '.join(unknown)} (only loss_estimate="
        f"'best_epoch' keeps them); its {what} hold {names[:size]}.")
  position = jnp.arange(size)
  new = leaf
  for n, v in values.items():
    v = v(leaf) if callable(v) else v
    new = jnp.where(position == names.index(n), jnp.asarray(v, dtype), new)
  return new


class _StateFields(NamedTuple):
  counters: chex.Array
  aov: chex.Array
  aov_step: chex.Array
  last_loss: chex.Array
  best_loss: Optional[chex.Array]
  stats: chex.Array
  config: AaligConfig


class ScaleByAaligState(_StateFields):
  """State of :func:`scale_by_aalig`. N is `num_examples`, T the `table_dtype`.

  A NamedTuple of six array leaves (five without ``best_loss``) and a static
  config. Its scalars are packed into two small arrays, ``counters`` and
  ``stats``, and read by name through properties (``state.count``,
  ``state.step_size``, ...); ``state._replace(count=...)`` writes them by
  name too.

  Attributes:
    counters: int32 [5], the integer scalars below in the order of
      COUNTER_FIELDS: count, num_sections, num_invalid, num_skipped,
      num_clipped.
    aov: T [N], approximate optimal value (AOV) of each example's loss.
    aov_step: T [N], the last increase applied to each AOV.
    last_loss: T [N], the loss last recorded per example; NaN if never seen.
    best_loss: T [N] with ``loss_estimate="best_epoch"``, else None: each
      example's loss in the section's best epoch so far.
    stats: float32 [2] (``loss_estimate="last"``) or [5] (``"best_epoch"``),
      the float scalars below in the order of STAT_FIELDS: step_size,
      reached_fraction, then epoch_loss_mean, epoch_loss_count,
      best_epoch_mean.
    config: :class:`AaligConfig`, static (no leaves): what the state was
      built for.

  Each scalar is a property that reads its entry (None for a best_epoch
  field of a state that has none).

  Read by name:
    count: int32, steps taken (skipped batches excluded), modulo the
      largest multiple of the section length below 2**31, so that sections
      keep ending however long training runs.
    num_sections: int32, section ends passed.
    num_invalid: int32, rows dropped so far because their index was outside
      [0, num_examples) (see :func:`check_indices`); saturates at 2**31 - 1.
    num_skipped: int32, batches skipped because a loss or the gradient was
      not finite; a skipped batch changes nothing else in the state;
      saturates at 2**31 - 1.
    num_clipped: int32, steps at which an injected hyperparameter lay
      outside its valid range and was clipped into it (see
      :func:`check_hyperparams`); saturates at 2**31 - 1.
    step_size: float32, the step size gamma of the last step.
    reached_fraction: float32, share of seen examples whose AOV was reached
      at the last section end; NaN before the first section end.
    epoch_loss_mean: float32 (best_epoch only), mean of the losses recorded
      in the current epoch (a running mean: it cannot overflow where a sum of
      large losses would).
    epoch_loss_count: float32 (best_epoch only), their number.
    best_epoch_mean: float32 (best_epoch only), lowest epoch mean loss in the
      current section; inf at a section's start.
  """

  __slots__ = ()

  @classmethod
  def from_fields(cls, *, aov, aov_step, last_loss, config, best_loss=None,
                  **scalars) -> "ScaleByAaligState":
    """A state from its tables, config and scalars by name.

    Every name of COUNTER_FIELDS, and the STAT_FIELDS of the config's loss
    estimate (the first two, or all five for ``"best_epoch"``), must be
    given. It rebuilds, e.g., a state saved with one leaf per scalar (the
    layout of aalig-optax 0.1.0).

    Example:
      >>> import jax.numpy as jnp, aalig_optax as ao
      >>> old = ao.aalig(0.1, 4, 2, 1).init(jnp.zeros(2))[0]
      >>> scalars = {n: getattr(old, n) for n in
      ...            ("count", "num_sections", "num_invalid", "num_skipped",
      ...             "num_clipped", "step_size", "reached_fraction")}
      >>> new = ao.ScaleByAaligState.from_fields(
      ...     aov=old.aov, aov_step=old.aov_step, last_loss=old.last_loss,
      ...     config=old.config, **scalars)
      >>> new.counters.tolist(), new.stats.shape
      ([0, 0, 0, 0, 0], (2,))
    """
    return new_state(aov=aov, aov_step=aov_step, last_loss=last_loss,
                     best_loss=best_loss, config=config, **scalars)

  def _replace(self, **kwargs):
    """A copy with the given fields replaced, packed scalars included (one
    kernel for each of `counters` and `stats` that changes). A packed
    scalar's new value may be given as a function of its old value (see
    `_packed`)."""
    counters = {n: kwargs.pop(n) for n in COUNTER_FIELDS if n in kwargs}
    stats = {n: kwargs.pop(n) for n in STAT_FIELDS if n in kwargs}
    new = super()._replace(**kwargs)
    if counters:
      new = super(ScaleByAaligState, new)._replace(counters=_packed(
          new.counters, COUNTER_FIELDS, counters, jnp.int32, "counters"))
    if stats:
      new = super(ScaleByAaligState, new)._replace(stats=_packed(
          new.stats, STAT_FIELDS, stats, jnp.float32, "stats"))
    return new


def _field(leaf_name, names, name):
  i = names.index(name)
  return property(lambda self: _entry(getattr(self, leaf_name), i),
                  doc=f"Entry {i} of `{leaf_name}`.")


for _name in COUNTER_FIELDS:
  setattr(ScaleByAaligState, _name, _field("counters", COUNTER_FIELDS, _name))
for _name in STAT_FIELDS:
  setattr(ScaleByAaligState, _name, _field("stats", STAT_FIELDS, _name))
del _name


def new_state(*, aov, aov_step, last_loss, best_loss, config, **scalars):
  """A ScaleByAaligState from its tables and its scalars by name (every
  counter, and the stats of the state's loss estimate)."""
  num_stats = NUM_STATS[config.loss_estimate]
  missing = [n for n in COUNTER_FIELDS + STAT_FIELDS[:num_stats]
             if n not in scalars]
  extra = set(scalars) - set(COUNTER_FIELDS + STAT_FIELDS[:num_stats])
  if missing or extra:
    raise ValueError(
        f"A state with loss_estimate={config.loss_estimate!r} needs the "
        f"scalars {COUNTER_FIELDS + STAT_FIELDS[:num_stats]}; missing "
        f"{missing}, unexpected {sorted(extra)}.")
  return ScaleByAaligState(
      counters=jnp.stack([jnp.asarray(scalars[n], jnp.int32)
                          for n in COUNTER_FIELDS]),
      aov=aov, aov_step=aov_step, last_loss=last_loss, best_loss=best_loss,
      stats=jnp.stack([jnp.asarray(scalars[n], jnp.float32)
                       for n in STAT_FIELDS[:num_stats]]),
      config=config)


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
