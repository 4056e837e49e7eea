"""Per-example table primitives: batch reads and writes, on one device or a mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def record(table, write_idx, values):
  """Writes `values` at `write_idx`; out-of-range entries are dropped.

  Duplicated indices keep their lowest value: a deterministic choice, unlike a
  plain scatter-set whose winner XLA leaves unspecified. The rows are sorted by
  (index, value) and every row writes its index's lowest value, so one plain
  scatter-set suffices whoever wins. (A scatter-min would do, but XLA
  partitions one into a replicated table from a sharded batch as an
  all-reduce-min of the whole table, O(N) per step, which also turns the NaN
  of never-seen examples into inf.)
  """
  values = values.astype(table.dtype)
  write_idx, values = _unshard_explicit(write_idx), _unshard_explicit(values)
  idx, values = jax.lax.sort((write_idx, values), num_keys=2)
  rows = jnp.arange(idx.shape[0])
  first = (rows == 0) | (idx != jnp.roll(idx, 1))
  lowest = values[jax.lax.cummax(jnp.where(first, rows, 0))]
  return table.at[idx].set(lowest, mode="drop",
                           **_explicit_out_sharding(table))


def take(table, idx):
  """table[idx], placed like `idx` when on a mesh with Explicit axes."""
  return table.at[idx].get(**_explicit_out_sharding(idx))


def _unshard_explicit(x):
  """x replicated (it is batch-sized) when on a mesh with Explicit axes."""
  kw = _explicit_out_sharding(x)
  if not kw:
    return x
  replicated = jax.sharding.NamedSharding(kw["out_sharding"].mesh,
                                          jax.sharding.PartitionSpec())
  return jax.sharding.reshard(x, replicated)


def _explicit_out_sharding(x):
  """{"out_sharding": x's sharding} on a mesh with Explicit axes, else {}.

  With `jax.make_mesh`'s default (Explicit) axes, JAX asks gathers and
  scatters whose operand and indices are sharded for their output sharding;
  elsewhere nothing is passed and the program is unchanged.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  explicit = getattr(jax.sharding.AxisType, "Explicit", None)
  if explicit is None or explicit not in getattr(mesh, "axis_types", ()):
    return {}
  return {"out_sharding": sharding}


def gather(x, axis_name):
  """Every replica's `x`, concatenated in replica order.

  A psum of each replica's rows placed in a zero block (exact, and small: the
  batch) rather than an all_gather, whose result shard_map types as varying:
  the tables written from it must stay replicated under `check_vma=True`.
  """
  if axis_name is None:
    return x
  n = jax.lax.axis_size(axis_name)
  placed = jnp.zeros((n,) + x.shape, x.dtype).at[
      jax.lax.axis_index(axis_name)].set(x)
  return jax.lax.psum(placed, axis_name).reshape((-1,) + x.shape[1:])


def psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)
