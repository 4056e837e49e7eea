"""Float32 helpers shared by AALIG and ALI-G: the Polyak step and its inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

F32_MAX = float(jnp.finfo(jnp.float32).max)
F32_EPS = float(jnp.finfo(jnp.float32).eps)


def pow2(e):
  """2.0**e in float32 for an int32 e in [-126, 127], from its exponent bits
  (exact, and a few integer ops where `jnp.ldexp` traces some eighty)."""
  return jax.lax.bitcast_convert_type(
      jax.lax.shift_left(e + 127, jnp.int32(23)), jnp.float32)


def cap_max_learning_rate(max_learning_rate):
  """The step size's upper bound, at most float32's largest value.

  Uncapped (inf), gap / (||g||^2 + eps) can overflow to inf, and inf * 0 is
  NaN where an entry of g is 0.
  """
  if isinstance(max_learning_rate, jax.Array):
    return jnp.minimum(max_learning_rate.astype(jnp.float32), F32_MAX)
  return min(float(max_learning_rate), F32_MAX)


def sq_norm_and_finite(grads32):
  """(||g||^2 over all leaves, whether g is finite).

  ||g||^2 is inf for a finite g whose norm overflows float32 as well as for
  an infinite entry; the sum of g's entries tells them apart (it is inf or
  NaN for an infinite entry, and finite where the sum of |g| is below
  float32's largest value; above it, entries of 1e36 and more, a partial
  sum may overflow and the batch is skipped too). A second pass
  of its own over each leaf: XLA:CPU runs a plain sum of squares through
  its fastest path, which any other term in it (g*g + (g - g) is NaN for
  an infinite g) made four times slower on a 1.8M-parameter MLP.
  """
  sq_norm = optax.tree.norm(grads32, squared=True)
  # Behind a barrier, so that XLA does not fuse the two reductions into one
  # whose sum of squares rounds otherwise than optax's norm.
  total = optax.tree.sum(jax.lax.optimization_barrier(grads32))
  return sq_norm, jnp.isfinite(sq_norm) | jnp.isfinite(total)


def polyak_step_size(gap, sq_norm, max_learning_rate, eps):
  r"""gamma = clip(gap / (||g||^2 + eps), 0, max_learning_rate), in float32.

  Zero where ||g||^2 + eps is at most float32's machine epsilon (optax's
  SPS+ convention) and where it overflows (gap / inf): a finite gradient
  whose squared norm overflows float32 takes a zero step, since the exact
  update gap g / ||g||^2 is then below 1 / ||g|| < 5.5e-20 times the gap.
  """
  denom = sq_norm + eps
  gamma = jnp.minimum(jnp.maximum(gap, 0.0) / denom, max_learning_rate)
  return jnp.where(denom > F32_EPS, gamma, 0.0)
