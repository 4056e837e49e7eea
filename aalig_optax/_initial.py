"""AOVs that start from somewhere else: a teacher's losses or an earlier run."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from aalig_optax import _checks


def _check_shape(values, num_examples: int) -> None:
  if values.shape not in ((), (num_examples,)):
    raise ValueError(
        f"initial_aov must be a scalar or have shape ({num_examples},) "
        f"(num_examples), got shape {tuple(values.shape)}.")
  if not (jnp.issubdtype(values.dtype, jnp.floating)
          or jnp.issubdtype(values.dtype, jnp.integer)):
    raise ValueError(
        f"initial_aov must hold real numbers, got dtype {values.dtype}.")


def _check_values(values, lower_bound, table_max: float) -> None:
  """Raises naming `initial_aov` where a known value is not finite, lies
  below `lower_bound` or beyond the table dtype's range."""
  if _checks.is_traced(values):
    return
  v = np.asarray(values, np.float64).reshape(-1)
  bad = ~np.isfinite(v) | (np.abs(v) > table_max)
  what = f"finite and within +-{table_max:g} (the table dtype's range)"
  if not _checks.is_traced(lower_bound):
    bad |= v < np.min(np.asarray(lower_bound, np.float64))
    what = f"finite, >= lower_bound={lower_bound!r} and <= {table_max:g}"
  if bad.any():
    first = int(np.argmax(bad))
    raise ValueError(
        f"initial_aov must be {what}: {int(bad.sum())} of {v.size} values "
        f"are not, the first at index {first} ({float(v[first])!r}).")


def check_initial_aov(initial_aov, num_examples: int, lower_bound,
                      table_max: float) -> None:
  """Construction-time checks of a table given as an array."""
  if initial_aov is None or callable(initial_aov):
    return
  values = initial_aov if isinstance(initial_aov, jax.Array) else np.asarray(
      initial_aov)
  _check_shape(values, num_examples)
  _check_values(values, lower_bound, table_max)


def initial_table(initial_aov, params, num_examples: int, lower_bound,
                  table_max: float, dtype) -> jax.Array:
  """The AOV table at init: `lower_bound` everywhere unless given."""
  if initial_aov is None:
    return jnp.full((num_examples,), lower_bound, dtype)
  if callable(initial_aov):
    values = initial_aov(params)
    try:
      values = jnp.asarray(values)
    except (TypeError, ValueError) as e:
      raise ValueError(
          "initial_aov, a callable, must return the AOV table (an array of "
          f"shape ({num_examples},) or a scalar), got {values!r}.") from e
    _check_shape(values, num_examples)
    _check_values(values, lower_bound, table_max)
  elif isinstance(initial_aov, jax.Array):
    values = initial_aov
  else:  # Through float64, so that no wide integer wraps into int32.
    values = np.asarray(initial_aov, np.float64)
  # Traced values cannot be checked: kept within [lower_bound, table max],
  # NaN read as the lower bound (an AOV that is never above the truth).
  bound = jnp.asarray(lower_bound, jnp.float32)
  values = values.astype(jnp.float32)
  values = jnp.where(jnp.isnan(values), bound,
                     jnp.clip(values, bound, jnp.float32(table_max)))
  return jnp.broadcast_to(values, (num_examples,)).astype(dtype)


def loss_table(
    loss_fn: Callable[..., chex.Array],
    params: Any,
    batches: Iterable[tuple],
    num_examples: int,
    *,
    fill_value: Optional[float] = None,
    jit: bool = True,
) -> jax.Array:
  r"""Each example's loss under a model, as a table for ``initial_aov``.

  Runs ``loss_fn(params, batch)`` over `batches` and writes each row's loss at
  its dataset index: with a teacher model's parameters it gives AOVs for
  distillation, with a finished run's parameters AOVs to resume or fine-tune
  from (:func:`aalig`'s ``initial_aov``).

  .. math::
    T_z = \min_{\text{rows } r \text{ with index } z} \ell_r

  (an index met more than once, e.g. under augmentation, keeps its lowest
  loss: an AOV too low only makes steps larger, as ALI-G's zero target does,
  while one too high stops them).

  Args:
    loss_fn: ``(params, batch) -> losses``, float [B], one loss per row.
    params: the model's parameters, passed to `loss_fn`.
    batches: an iterable of ``(batch, indices)`` or ``(batch, indices,
      mask)``: ``indices`` int [B] in [0, num_examples), ``mask`` bool [B]
      False for padding rows (not recorded).
    num_examples: N, the table's length.
    fill_value: the value of examples no batch covered; None (the default)
      raises a ValueError instead, so that no example is silently missed.
    jit: compile `loss_fn` with ``jax.jit`` (once, for a fixed batch shape).

  Returns:
    A float32 array of shape [N].

  Raises:
    ValueError: an index outside [0, N), a non-finite loss, a loss of the
      wrong shape, or (without `fill_value`) an example never covered.

  Example:
    >>> import jax.numpy as jnp
    >>> from aalig_optax import aalig, loss_table
    >>> x = jnp.arange(6.0); y = 2 * x
    >>> loss_fn = lambda w, b: (w * b[0] - b[1]) ** 2
    >>> batches = [((x[i:i + 3], y[i:i + 3]), jnp.arange(i, i + 3))
    ...            for i in (0, 3)]
    >>> table = loss_table(loss_fn, 1.5, batches, num_examples=6)
    >>> table.tolist()
    [0.0, 0.25, 1.0, 2.25, 4.0, 6.25]
    >>> opt = aalig(1.0, num_examples=6, steps_per_epoch=2,
    ...             epochs_per_section=1, initial_aov=table)

  References:
    Paren, Poudel, Kumar, "Faking Interpolation Until You Make It", TMLR
    2022, Sec. 6 (AOVs from a teacher, future work); Hinton, Vinyals, Dean,
    "Distilling the Knowledge in a Neural Network", 2015.
  """
  num_examples = _checks.static_positive_int("num_examples", num_examples)
  if fill_value is not None and not np.isfinite(fill_value):
    raise ValueError(
        f"fill_value must be finite (AOVs are), got fill_value={fill_value!r}.")
  fn = jax.jit(loss_fn) if jit else loss_fn
  table = np.full(num_examples, np.inf, np.float64)
  seen = np.zeros(num_examples, bool)
  for k, item in enumerate(batches):
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
      raise ValueError(
          "batches must yield (batch, indices) or (batch, indices, mask), "
          f"got {type(item).__name__} at batch {k}.")
    batch, indices = item[0], np.asarray(item[1]).reshape(-1)
    if not np.issubdtype(indices.dtype, np.integer):
      raise ValueError(
          f"batch {k}: indices must be integers (dataset positions), got "
          f"dtype {indices.dtype}.")
    mask = (np.ones(indices.shape, bool) if len(item) == 2
            else np.asarray(item[2], bool).reshape(-1))
    losses = np.asarray(fn(params, batch), np.float64)
    if losses.shape != indices.shape or mask.shape != indices.shape:
      raise ValueError(
          f"batch {k}: loss_fn returned shape {losses.shape} for "
          f"{indices.shape[0]} indices (mask {mask.shape}); it must return "
          "one loss per row.")
    idx, vals = indices[mask], losses[mask]
    if idx.size and (idx.min() < 0 or idx.max() >= num_examples):
      raise ValueError(
          f"batch {k}: indices must lie in [0, {num_examples}), got "
          f"{int(idx.min())}..{int(idx.max())}.")
    if not np.all(np.isfinite(vals)):
      row = int(np.argmax(~np.isfinite(vals)))
      raise ValueError(
          f"batch {k}: the loss of example {int(idx[row])} is {vals[row]!r}; "
          "AOVs must be finite.")
    np.minimum.at(table, idx, vals)
    seen[idx] = True
  if not seen.all():
    if fill_value is None:
      missing = np.flatnonzero(~seen)
      raise ValueError(
          f"{missing.size} of {num_examples} examples were in no batch (the "
          f"first: {missing[:5].tolist()}); pass fill_value= to give them a "
          "value.")
    table[~seen] = fill_value
  return jnp.asarray(table, jnp.float32)
