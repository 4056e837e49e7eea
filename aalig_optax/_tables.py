"""Per-example tables: batch reads and writes, on one device or a mesh."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp


def write(table, write_idx, values, lowest=False):
  """`table` with `values` written at `write_idx`; out-of-range rows dropped.

  With `lowest`, an index that several rows write keeps their lowest value:
  a scatter-set (which keeps one of them, XLA does not say which) followed
  by a scatter-min of the same rows, O(B) and branch-free. The values must
  not be NaN (a recorded loss never is), and -0 is written as +0, so that
  the bits kept do not depend on the rows' order. Rows that write one index
  the same value (the AOV rows of a repeated example) need no `lowest`.

  On a mesh with Explicit axes (the table's, else the batch's), the
  batch-sized `write_idx` and `values` are first replicated on that mesh,
  wherever they were placed; on a mesh of Auto axes they are constrained to
  be replicated, so that XLA writes a split batch into a replicated table
  without a table-sized collective.
  """
  values = values.astype(table.dtype)
  if lowest:
    values = jnp.where(values == 0, jnp.zeros_like(values), values)
  meshes = [_explicit_mesh(a) for a in (table, write_idx, values)]
  mesh = next((m for m in meshes if m is not None), None)
  write_idx = _replicate_on(write_idx, mesh)
  values = _replicate_on(values, mesh)
  if mesh is None:
    write_idx, values = _replicated_on_auto_mesh(table, write_idx, values)
  written = _scatter(table, write_idx, values, "set")
  return _scatter(written, write_idx, values, "min") if lowest else written


def _scatter(table, idx, values, how):
  """``table.at[idx].<how>(values)``, out-of-range rows dropped, with the
  options this JAX takes: no wrapping of negative indices (none is: one
  kernel fewer), and the table's sharding on a mesh with Explicit axes
  (older JAX takes it for ``set`` only, and then infers the rest)."""
  method = getattr(table.at[idx], how)
  options = inspect.signature(method).parameters
  sharding = _explicit_out_sharding(table)
  if how == "min" and sharding and "out_sharding" not in options:
    # An older JAX's scatter-min cannot be told its output sharding: each
    # row takes its index's lowest value in the batch (all pairs of rows,
    # only here), and a scatter-set writes it.
    same = idx[:, None] == idx[None, :]
    lowest = jnp.min(jnp.where(same, values[None, :],
                               jnp.asarray(jnp.inf, values.dtype)), axis=1)
    return _scatter(table, idx, lowest, "set")
  kwargs = {k: v for k, v in dict(wrap_negative_indices=False,
                                  **sharding).items() if k in options}
  return method(values, mode="drop", **kwargs)


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
