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


def sq_norm_or_nan(grads32) -> jax.Array:
  """||g||^2 over all leaves, NaN if any entry of g is not finite.

  Each term is g*g + (g - g): the same bits as g*g where g is finite (the
  sum equals ``optax.tree.norm(g, squared=True)``), NaN where g is inf or
  NaN. So one pass over each leaf tells a non-finite gradient (NaN) from a
  finite one whose squared norm overflows (inf). (g*0 would do as well, but
  XLA:CPU then writes a gradient-sized array of zeros.)
  """
  return optax.tree.sum(jax.tree.map(lambda g: g * g + (g - g), grads32))


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
