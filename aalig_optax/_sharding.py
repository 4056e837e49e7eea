"""Placing AALIG's state on a device mesh, and splitting examples over hosts."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aalig_optax._state import ScaleByAaligState
from aalig_optax._state import TABLE_FIELDS



def _is_aalig_state(x) -> bool:
  return isinstance(x, ScaleByAaligState)


def state_shardings(
    state: Any,
    mesh: Union[Mesh, jax.sharding.AbstractMesh],
    table_axis: Optional[Union[str, Sequence[str]]] = None,
) -> Any:
  """The `NamedSharding` of every leaf of an optimiser state holding AALIG's.

  The per-example tables (``aov``, ``aov_step``, ``last_loss`` and, with
  ``loss_estimate="best_epoch"``, ``best_loss``) are split along the example
  axis over the mesh axis (or axes) `table_axis`, or replicated when it is
  None. Every other leaf (scalars, the momentum buffer) is replicated. Use
  the result as ``out_shardings`` of a jitted ``init`` and ``update``, or with
  ``jax.device_put``. Steps and section ends then run on the shards: no
  device ever holds, or gathers, a whole table.

  Args:
    state: an optimiser state, or its abstract form (``jax.eval_shape`` of
      ``tx.init``), holding any number of :class:`ScaleByAaligState`.
    mesh: the device mesh (``jax.make_mesh``).
    table_axis: None to replicate the tables on every device; a mesh axis
      name (or a tuple of names) to split them along the example axis, so
      that each device holds ``num_examples / mesh.shape[table_axis]``.

  Returns:
    A pytree with the structure of `state`, a `NamedSharding` at each leaf.

  Raises:
    ValueError: if `table_axis` names no axis of `mesh`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from aalig_optax import aalig, state_shardings
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> tx = aalig(0.1, num_examples=8_000, steps_per_epoch=10,
    ...            epochs_per_section=1)
    >>> params = jnp.zeros(3)
    >>> shardings = state_shardings(jax.eval_shape(tx.init, params), mesh,
    ...                             table_axis="data")
    >>> state = jax.jit(tx.init, out_shardings=shardings)(params)
    >>> state[0].aov.sharding.spec, state[1].trace.sharding.spec
    (P('data',), P())
  """
  if table_axis is not None:
    axes = (table_axis,) if isinstance(table_axis, str) else tuple(table_axis)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if not axes or unknown:
      raise ValueError(
          f"table_axis must name axes of the mesh {tuple(mesh.axis_names)}, "
          f"got table_axis={table_axis!r}.")
    table_spec = PartitionSpec(axes[0] if len(axes) == 1 else axes)
  else:
    table_spec = PartitionSpec()
  replicated = NamedSharding(mesh, PartitionSpec())
  tables = NamedSharding(mesh, table_spec)

  def place(node):
    if _is_aalig_state(node):
      return ScaleByAaligState(**{
          name: jax.tree.map(
              lambda _, s=(tables if name in TABLE_FIELDS else replicated): s,
              value)
          for name, value in node._asdict().items()})
    return replicated

  return jax.tree.map(place, state, is_leaf=_is_aalig_state)


def process_example_range(
    num_examples: int,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> range:
  """The dataset indices one process (host) loads: a contiguous block.

  With P processes, process p owns ``[p * N // P, (p + 1) * N // P)``: the
  blocks are disjoint, cover ``[0, N)`` and differ in size by at most one.
  Each process feeds its local devices batches of *global* indices from its
  block (with ``jax.make_array_from_process_local_data``); AALIG's tables are
  indexed by these global indices whatever their layout, so the split only
  says who reads which examples, not where their table rows live.

  Args:
    num_examples: N, the size of the training set.
    process_index: the process; defaults to ``jax.process_index()``.
    process_count: the number of processes; defaults to
      ``jax.process_count()``.

  Returns:
    A ``range`` of the global example indices this process owns.

  Example:
    >>> from aalig_optax import process_example_range
    >>> [process_example_range(10, p, 4) for p in range(4)]
    [range(0, 2), range(2, 5), range(5, 7), range(7, 10)]
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(
        f"Need 0 <= process_index < process_count, got process_index="
        f"{process_index}, process_count={process_count}.")
  if num_examples < 0:
    raise ValueError(f"num_examples must be >= 0, got {num_examples}.")
  start = process_index * num_examples // process_count
  stop = (process_index + 1) * num_examples // process_count
  return range(start, stop)
