"""Validation of hyperparameters and batch inputs, shared by the transforms."""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(value: Any) -> bool:
  """True when `value` is a JAX tracer, i.e. not known at trace time."""
  return isinstance(value, jax.core.Tracer)


def check_positive(name: str, value: Any) -> None:
  """Raises a ValueError naming `name` unless `value` > 0 (not if traced)."""
  if not is_traced(value) and not np.all(np.asarray(value) > 0):
    raise ValueError(f"{name} must be positive, got {name}={value!r}.")


def check_non_negative(name: str, value: Any) -> None:
  """Raises a ValueError naming `name` unless `value` >= 0 (not if traced)."""
  if not is_traced(value) and not np.all(np.asarray(value) >= 0):
    raise ValueError(f"{name} must be non-negative, got {name}={value!r}.")


def check_momentum(value: Any) -> None:
  """Raises a ValueError unless 0 <= momentum < 1 (skipped if traced)."""
  if not is_traced(value):
    m = np.asarray(value)
    if not np.all((m >= 0) & (m < 1)):
      raise ValueError(f"momentum must lie in [0, 1), got momentum={value!r}.")


def check_finite(name: str, value: Any) -> None:
  """Raises a ValueError naming `name` unless `value` is finite."""
  if not is_traced(value) and not np.all(np.isfinite(np.asarray(value))):
    raise ValueError(f"{name} must be finite, got {name}={value!r}.")


def check_within(name: str, value: Any, limit: float, what: str) -> None:
  """Raises a ValueError naming `name` unless |value| <= limit."""
  if not is_traced(value) and not np.all(
      np.abs(np.asarray(value, np.float64)) <= limit):
    raise ValueError(
        f"{name} must lie within +-{limit:g} ({what}), got {name}={value!r}.")


def static_positive_int(name: str, value: Any) -> int:
  """Returns `value` as a Python int, or raises naming `name`.

  Table sizes and section lengths fix array shapes and the compiled program,
  so they must be known when the transform is built.
  """
  if is_traced(value):
    raise TypeError(
        f"{name} must be a static Python int, not a traced value; with "
        f"optax.inject_hyperparams pass static_args=({name!r}, ...)."
    )
  arr = np.asarray(value)
  if arr.shape != () or not (
      np.issubdtype(arr.dtype, np.integer)
      or (np.issubdtype(arr.dtype, np.floating) and float(arr).is_integer())
  ):
    raise ValueError(
        f"{name} must be a positive integer, got {name}={value!r}.")
  if int(arr) <= 0:
    raise ValueError(
        f"{name} must be a positive integer, got {name}={value!r}.")
  return int(arr)


def check_table_memory(num_bytes: int) -> None:
  """Fails early, in words, when the tables cannot fit in memory.

  The limit is the sum of the local devices' memory where JAX reports it
  (GPU, TPU), else the host's physical memory (CPU).

  Raises:
    MemoryError: stating the bytes needed and the bytes available.
  """
  limit = 0
  for device in jax.local_devices():
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
      limit += int(stats["bytes_limit"])
  if limit == 0:
    try:
      limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
      return
  if num_bytes > limit:
    raise MemoryError(
        f"The per-example tables need {num_bytes:,} bytes but the local "
        f"devices hold at most {limit:,} bytes. Shard the tables over more "
        "devices, use a 16-bit table_dtype, or reduce num_examples."
    )


def check_batch(
    losses: Any,
    indices: Any,
    mask: Optional[Any],
    num_examples: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Checks a batch's `losses`, `indices` and `mask`; returns them as arrays.

  Shapes and dtypes are checked at trace time. Values of `indices` are checked
  only when they are concrete (eager mode): an index outside
  [0, num_examples) then raises. Under `jit` the caller drops such rows.

  Returns:
    (losses, indices, mask) with mask all-True when none was given.
  """
  if losses is None or indices is None:
    missing = [n for n, v in (("losses", losses), ("indices", indices))
               if v is None]
    raise TypeError(
        "AALIG's update needs the batch's per-example losses and dataset "
        "indices as keyword arguments: update(grads, state, params, "
        "losses=<float [B]>, indices=<int [B]>); missing: "
        + ", ".join(missing) + "."
    )
  losses = jnp.asarray(losses)
  # Concrete values are range-checked before the conversion: with x64
  # disabled, jnp.asarray wraps an int64 index >= 2**31 silently into int32.
  raw_indices = indices if is_traced(indices) else np.asarray(indices)
  indices = jnp.asarray(indices)
  if losses.ndim != 1:
    raise ValueError(
        f"losses must be 1-D with one loss per example (shape [B]), got shape "
        f"{losses.shape}. Pass the per-example losses, not their mean."
    )
  if indices.ndim != 1:
    raise ValueError(
        f"indices must be 1-D with one dataset index per example (shape [B]), "
        f"got shape {indices.shape}."
    )
  if losses.shape != indices.shape:
    raise ValueError(
        f"losses and indices must have the same shape [B], got "
        f"losses.shape={losses.shape} and indices.shape={indices.shape}."
    )
  if not jnp.issubdtype(losses.dtype, jnp.floating):
    raise TypeError(f"losses must be floating point, got dtype {losses.dtype}.")
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise TypeError(
        f"indices must be integers (dataset positions in [0, num_examples)), "
        f"got dtype {indices.dtype}."
    )
  if mask is None:
    mask = jnp.ones(losses.shape, jnp.bool_)
  else:
    mask = jnp.asarray(mask)
    if mask.shape != losses.shape or mask.dtype != jnp.bool_:
      raise ValueError(
          f"mask must be a boolean array of shape {losses.shape} (True marks "
          f"a real example, False a padding row), got {mask.dtype}{mask.shape}."
      )
  if not is_traced(raw_indices) and np.issubdtype(raw_indices.dtype,
                                                  np.integer):
    idx = raw_indices
    valid = (np.asarray(mask) if not is_traced(mask)
             else np.ones(idx.shape, bool))
    bad = idx[valid & ((idx < 0) | (idx >= num_examples))]
    if bad.size:
      raise ValueError(
          f"indices must lie in [0, num_examples={num_examples}), got "
          f"{bad[:5].tolist()}{' ...' if bad.size > 5 else ''}."
      )
  return losses, indices, mask


def clip_injected(value, lo, hi, nan_to):
  """(value clipped into [lo, hi], whether it was outside) for a JAX array.

  Python and NumPy numbers were checked at construction and pass unchanged,
  so the compiled program only grows where a value can change at run time
  (``optax.inject_hyperparams``).
  """
  if not isinstance(value, jax.Array):
    return value, False
  v = jnp.asarray(value, jnp.float32)
  ok = (v >= lo) & (v <= hi)  # False for NaN.
  fixed = jnp.where(jnp.isnan(v), nan_to, jnp.clip(v, lo, hi))
  return jnp.where(ok, v, fixed), ~ok
