"""Per-example tables: batch reads and writes, on one device or a mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp


# Where a batch repeats an index with different values, batches of up to
# this many rows (after gathering over `axis_name`) find each index's lowest
# value by comparing every row with every other, larger ones by a sort (a
# sort anywhere in the step, even in a branch it does not take, cost about
# 5 us a step on XLA:CPU; all pairs of 256 rows about 150 us when run).
PAIRWISE_MAX_ROWS = 256


def record(table, write_idx, values):
  """Writes `values` at `write_idx`; out-of-range entries are dropped.

  Duplicated indices keep their lowest value: a deterministic choice, unlike a
  plain scatter-set whose winner XLA leaves unspecified. Values are compared
  as `lax.sort` compares them (-0 equal to +0, NaNs equal and last, ties to
  the earlier row). :func:`write_rows`, then its rewrite where needed, in a
  cond of its own.
  """
  written, unresolved, keep_lowest = write_rows(table, write_idx, values)
  if unresolved is False:
    return written
  return jax.lax.cond(unresolved, keep_lowest, lambda t: t, written)


def write_rows(table, write_idx, values):
  """The first pass of :func:`record`: `(written, unresolved, keep_lowest)`.

  One plain scatter-set writes every row, then each row reads its entry back.
  Only where rows of one index hold different bits can the scatter have kept
  the wrong one: then `unresolved` is True, and ``keep_lowest(written)``
  writes each index's lowest value again (found by comparing all pairs of
  rows, or, above PAIRWISE_MAX_ROWS rows or on a mesh with Explicit axes, by
  sorting them by (index, value)); on a table without such rows it writes
  the same bits. The caller runs it in a rarely taken branch, best one of a
  cond it has anyway (a cond of its own cost the step more than its kernels
  on XLA:CPU). Whether any row reads back other bits than its own does not
  depend on which row the scatter kept, so every device of a mesh takes the
  same branch. The usual path is O(B): a scatter and a read-back. (Comparing
  all pairs of rows at every step cost 0.6x a sort's time at 64 rows but 3x
  at 256; a scatter-min would do in one pass, but XLA partitions one into a
  replicated table from a sharded batch as an all-reduce-min of the whole
  table, O(N) per step, which also turns the NaN of never-seen examples into
  inf.)

  On a mesh with Explicit axes (the table's, else the batch's), the batch-sized
  `write_idx` and `values` are first replicated on that mesh, wherever they
  were placed (split, replicated, or not placed at all); on a mesh of Auto
  axes they are constrained to be replicated, so that every device reads
  every row of the batch back from its own copy of a replicated table. A batch
  of one row gives `unresolved` False (the Python bool).
  """
  values = values.astype(table.dtype)
  meshes = [_explicit_mesh(a) for a in (table, write_idx, values)]
  mesh = next((m for m in meshes if m is not None), None)
  write_idx = _replicate_on(write_idx, mesh)
  values = _replicate_on(values, mesh)
  if mesh is None:
    write_idx, values = _replicated_on_auto_mesh(table, write_idx, values)
  # Variadic reductions have no sharding rule on a mesh with Explicit axes.
  variadic = mesh is None
  if variadic:
    write_idx, values = _in_one_kernel(write_idx, values)
  written = _scatter_set(table, write_idx, values)
  if write_idx.shape[0] <= 1:
    return written, False, lambda t: t
  uint = jnp.dtype(f"uint{jnp.dtype(table.dtype).itemsize * 8}")
  bits = lambda x: jax.lax.bitcast_convert_type(x, uint)
  differs = (write_idx < table.shape[0]) & (
      bits(take(written, write_idx, mode="clip")) != bits(values))
  if variadic:
    # With the lowest index as a second output: one kernel on XLA:CPU (a
    # lone reduction is split over threads, see batch_sums). A negative
    # index, which no step writes, is also unresolved: the rewrite drops it
    # as the scatter does.
    num_differ, lowest = jax.lax.reduce(
        (differs.astype(jnp.int32), write_idx),
        (jnp.int32(0), jnp.asarray(jnp.iinfo(write_idx.dtype).max,
                                   write_idx.dtype)),
        lambda x, y: (x[0] + y[0], jnp.minimum(x[1], y[1])), (0,))
    unresolved = (num_differ > 0) | (lowest < 0)
  else:
    unresolved = jnp.any(differs)

  def keep_lowest(table):
    rows = write_idx.shape[0]
    if rows <= PAIRWISE_MAX_ROWS and variadic:
      idx, vals = _first_of_each_index(write_idx, values, table.shape[0])
    else:
      idx, vals = jax.lax.sort((write_idx, values), num_keys=2)
      first = jnp.concatenate([jnp.ones((1,), jnp.bool_),
                               idx[1:] != idx[:-1]])
      idx = jnp.where(first, idx, table.shape[0])
    return _scatter_set(table, idx, vals)

  return written, unresolved, keep_lowest


def _replicated_on_auto_mesh(table, *rows):
  """`rows` constrained to be replicated, on a mesh of Auto axes only.

  Under jit with such a mesh, XLA partitions the read-back of a split batch
  into a device's own rows only: with a replicated table (one copy per
  device, each written by its own scatter), copies that kept different rows
  of a repeated index would go unseen. Replicated rows are read back whole
  on every device; the scatter gathers them anyway. Arrays on no mesh, or
  on a mesh with any Manual axis (shard_map, whose rows `gather` has
  already collected, or a partly manual one): `rows` unchanged. (On a
  one-device mesh the constraint does nothing.)
  """
  auto = getattr(jax.sharding.AxisType, "Auto", None)
  for x in (table,) + rows:
    mesh = _mesh_of(x)
    types = tuple(getattr(mesh, "axis_types", ()))
    if (mesh is not None and not getattr(mesh, "empty", True) and types
        and all(t == auto for t in types)):
      replicated = jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec())
      return tuple(jax.lax.with_sharding_constraint(r, replicated)
                   for r in rows)
  return rows


def _in_one_kernel(idx, values):
  """(idx, values) as computed, by one kernel instead of one each: a
  two-output reduction over a pair whose second member is the identity
  (XLA:CPU fuses no multi-output loops)."""
  lowest = jnp.asarray(jnp.iinfo(idx.dtype).min, idx.dtype)
  inf = jnp.asarray(jnp.inf, values.dtype)
  pair = lambda x, fill: jnp.stack([x, jnp.full_like(x, fill)], axis=1)
  return jax.lax.reduce(
      (pair(idx, lowest), pair(values, inf)), (lowest, inf),
      lambda x, y: (jnp.maximum(x[0], y[0]), jnp.minimum(x[1], y[1])), (1,))


def _scatter_set(table, idx, values):
  """table.at[idx].set(values), out-of-range indices dropped."""
  kwargs = dict(mode="drop", **_explicit_out_sharding(table))
  try:
    # No index is negative: nothing to wrap (one kernel fewer).
    return table.at[idx].set(values, wrap_negative_indices=False, **kwargs)
  except TypeError:  # A JAX without the option.
    return table.at[idx].set(values, **kwargs)


def _first_of_each_index(idx, values, dropped):
  """(idx, values) with `dropped` at each row that another row of its index
  comes before in (value, position) order, values compared as `lax.sort`
  compares them (-0 equal to +0, NaNs equal and last).

  One variadic reduction over all pairs of rows, the comparisons fused into
  it (nothing [B, B] in memory): for row i, the largest of idx[i] and
  `dropped` where another row comes first, and values[i] (the minimum of
  values[i] and +inf), so that the values come out of the same kernel. A
  lone reduction XLA:CPU would split into partial reductions over threads
  and write the [B, B] comparisons to memory (see batch_sums).
  """
  # As lax.sort compares floats: -0 equal to +0, every NaN equal and last.
  canonical = jnp.where(values == 0, jnp.zeros_like(values), values)
  canonical = jnp.where(jnp.isnan(values), jnp.nan, canonical).astype(
      values.dtype)
  bits = jnp.dtype(values.dtype).itemsize * 8
  signed = jax.lax.bitcast_convert_type(canonical, jnp.dtype(f"int{bits}"))
  # The total order of floats as integers: negatives' magnitude bits flipped.
  key = jnp.where(signed < 0, signed ^ jnp.iinfo(signed.dtype).max, signed)
  pos = jnp.arange(idx.shape[0])
  # [i, j]: row j comes before row i in row i's index.
  ahead = (idx[None, :] == idx[:, None]) & (
      (key[None, :] < key[:, None])
      | ((key[None, :] == key[:, None]) & (pos[None, :] < pos[:, None])))
  own = pos[None, :] == pos[:, None]
  inf = jnp.asarray(jnp.inf, values.dtype)
  idx_ij = jnp.where(ahead, dropped,
                     jnp.broadcast_to(idx[:, None], ahead.shape))
  val_ij = jnp.where(own, values[:, None], inf)
  lowest = jnp.asarray(jnp.iinfo(idx.dtype).min, idx.dtype)
  return jax.lax.reduce(
      (idx_ij, val_ij), (lowest, inf),
      lambda x, y: (jnp.maximum(x[0], y[0]), jnp.minimum(x[1], y[1])), (1,))


def take(table, idx, mode=None):
  """table[idx], placed like `idx` when on a mesh with Explicit axes.

  When the table is on a mesh with Explicit axes and `idx` is not on that
  mesh (a batch left unplaced, e.g. numpy or a default-device array), `idx`
  is first replicated on the table's mesh: the gather then has a definite
  output sharding (replicated) instead of a `ShardingTypeError`.
  """
  mesh = _explicit_mesh(table)
  if mesh is not None and _mesh_of(idx) != mesh:
    idx = _replicate_on(idx, mesh)
  return table.at[idx].get(mode=mode, **_explicit_out_sharding(idx))


def _mesh_of(x):
  """The (abstract) mesh of x's type, or None."""
  return getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)


def _explicit_mesh(x):
  """The mesh of x's type if it has an Explicit axis, else None."""
  mesh = _mesh_of(x)
  explicit = getattr(jax.sharding.AxisType, "Explicit", None)
  if explicit is None or explicit not in getattr(mesh, "axis_types", ()):
    return None
  return mesh


def _replicate_on(x, mesh):
  """x (batch-sized) replicated on `mesh`; x unchanged when mesh is None."""
  if mesh is None:
    return x
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  own = _mesh_of(x)
  if own is not None and not getattr(own, "empty", False) and own != mesh:
    raise ValueError(
        f"AALIG's tables are on the mesh {_describe(mesh)} but a batch array "
        f"({jax.typeof(x).str_short()}) is on another mesh, {_describe(own)}."
        " Place the batch (losses, indices, mask and the inputs they come "
        "from) on the tables' mesh, the `mesh` given to state_shardings: "
        "split over its batch axis, e.g. jax.device_put(batch, "
        "NamedSharding(mesh, P('data'))), or replicated, "
        "jax.device_put(batch, NamedSharding(mesh, P())); or leave it "
        "unplaced (numpy), and AALIG replicates it on the tables' mesh.")
  return jax.sharding.reshard(x, replicated)


def _describe(mesh):
  return (f"(axes {tuple(mesh.axis_names)}, shape "
          f"{tuple(mesh.axis_sizes)}, types {tuple(mesh.axis_types)})")


def _explicit_out_sharding(x):
  """{"out_sharding": x's sharding} on a mesh with Explicit axes, else {}.

  With `jax.make_mesh`'s default (Explicit) axes, JAX asks gathers and
  scatters whose operand and indices are sharded for their output sharding;
  elsewhere nothing is passed and the program is unchanged.
  """
  if _explicit_mesh(x) is None:
    return {}
  return {"out_sharding": jax.typeof(x).sharding}


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


def batch_sums(*columns):
  """The sums of batch-sized columns, in one pass over the rows.

  One variadic reduction: on XLA:CPU a `jnp.sum` each would be one to three
  kernels each (a reduction is split into partial sums over threads, whose
  operand is first written to memory). On a mesh with Explicit axes, where a
  variadic reduction has no sharding rule, one `jnp.sum` per column.
  """
  if any(_explicit_mesh(c) is not None for c in columns):
    return tuple(jnp.sum(c) for c in columns)
  zeros = tuple(jnp.zeros([], c.dtype) for c in columns)
  return tuple(jax.lax.reduce(
      columns, zeros, lambda x, y: tuple(a + b for a, b in zip(x, y)), (0,)))


def psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)
