"""ALI-G: the Polyak step size for interpolating models, and its L2 ball."""

from __future__ import annotations

from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from aalig_optax import _checks


def pow2(e):
  """2.0**e in float32 for an int32 e in [-126, 127], built from its exponent
  bits: exact, and a few integer ops (`jnp.ldexp` traces some eighty)."""
  return jax.lax.bitcast_convert_type(
      jax.lax.shift_left(e + 127, jnp.int32(23)), jnp.float32)


F32_MAX = float(jnp.finfo(jnp.float32).max)


def cap_max_learning_rate(max_learning_rate):
  """The step size's upper bound, at most float32's largest value.

  A step size is a float32: uncapped (inf), gap / (||g||^2 + eps) can
  overflow to inf, and inf * g is NaN where g is 0. A Python or NumPy
  number is capped here (a constant of the program); an injected one in
  the program.
  """
  if isinstance(max_learning_rate, jax.Array):
    return jnp.minimum(max_learning_rate.astype(jnp.float32), F32_MAX)
  return min(float(max_learning_rate), F32_MAX)


# Where ||g||^2 + eps overflows float32, the step is computed from
# ||2^-NORM_SHIFT g||^2, which stays finite for any finite g of up to 2^71
# entries (each term is at most 2^56). The terms it flushes to zero
# (< 2^-126 each) are then below float32's rounding of it for up to 2^30
# entries.
NORM_SHIFT = 100


def scaled_sq_norm(grads32):
  """||2^-NORM_SHIFT g||^2 of a float32 gradient (a power of two: exact)."""
  # Behind a barrier: as a constant, XLA rewrites (s g)^2 as g^2 s^2, whose
  # g^2 overflows and s^2 is 0.
  scale = jax.lax.optimization_barrier(pow2(jnp.int32(-NORM_SHIFT)))
  return optax.tree.norm(optax.tree.scale(scale, grads32), squared=True)


def scaled_sq_norm_if_needed(denom, grads32):
  """:func:`scaled_sq_norm` where ||g||^2 + eps (`denom`) is not finite,
  else 0: the gradient is read again only in that rare case (a branch)."""
  return jax.lax.cond(jnp.isfinite(denom), lambda g: jnp.float32(0),
                      scaled_sq_norm, grads32)


def step_coefficients(gap, sq_norm, scaled_sq_norm, max_learning_rate, eps):
  """(c, s, finite): the update gamma g of the Polyak step size
  gamma = clip(gap / (||g||^2 + eps), 0, max_learning_rate), as c (s g).

  Usually s = 1 and c = gamma (zero where ||g||^2 + eps is at or below
  float32's machine epsilon, as in optax's SPS+). When ||g||^2 + eps
  overflows float32 though g is finite, gamma is computed for s g with
  s = 2^-e, e = NORM_SHIFT + floor(log2 ||2^-NORM_SHIFT g||^2) / 2 (so
  ||s g||^2 lies in [1, 4) unless e is clipped): c = gamma / s. Then
  gap s, and so c, is at least the update's largest entry, so c stays
  normal wherever the update is. Where gamma itself is a normal number the
  result is (gamma, 1) again, so that entries of g far below its norm are
  not scaled out of float32's range. Both cases share their ops (one
  division), with no branch. `finite` says whether g is finite (a finite
  ||g||^2 + eps means it is; otherwise the scaled sum says).

  Args:
    gap: the loss gap (finite, or the caller discards c).
    sq_norm: ||g||^2.
    scaled_sq_norm: ||2^-NORM_SHIFT g||^2 (:func:`scaled_sq_norm`), used
      only where `sq_norm` + `eps` is not finite.
    max_learning_rate: the step size's upper bound.
    eps: added to ||g||^2 (at most float32's largest value).
  """
  usual_denom = sq_norm + eps
  overflow = ~jnp.isfinite(usual_denom)
  # floor(log2 r) from r's exponent bits (r >= 0), then e such that
  # r 2^(2 NORM_SHIFT - 2e) = ||s g||^2 lies in [1, 4); at least 64 where
  # ||g||^2 overflows, and clipped so that both powers of two stay normal.
  log_r = jax.lax.shift_right_arithmetic(
      jax.lax.bitcast_convert_type(scaled_sq_norm, jnp.int32),
      jnp.int32(23)) - 127
  e = jnp.clip(NORM_SHIFT + jax.lax.shift_right_arithmetic(
      log_r, jnp.int32(1)), 64, 126)
  s = jnp.where(overflow, pow2(-e), 1.0)
  denom = jnp.where(overflow,
                    scaled_sq_norm * pow2(2 * NORM_SHIFT - 2 * e)
                    + (eps * s) * s, usual_denom)
  c = jnp.minimum(jnp.maximum(gap, 0.0) * s / denom,
                  max_learning_rate * jnp.where(overflow, pow2(e), 1.0))
  c = jnp.where(denom > jnp.finfo(jnp.float32).eps, c, 0.0)
  gamma = c * s
  normal = gamma >= jnp.finfo(jnp.float32).tiny
  return (jnp.where(normal, gamma, c), jnp.where(normal, 1.0, s),
          ~overflow | jnp.isfinite(scaled_sq_norm))


def momentum_or_identity(momentum):
  if isinstance(momentum, (int, float)) and momentum == 0:
    return optax.identity()
  return optax.trace(decay=momentum, nesterov=True)


class ScaleByAligState(NamedTuple):
  """State of :func:`scale_by_alig`.

  Attributes:
    count: int32 [], steps taken.
    step_size: float32 [], the step size gamma of the last step.
  """

  count: chex.Array
  step_size: chex.Array


def scale_by_alig(
    max_learning_rate: chex.Numeric,
    *,
    lower_bound: chex.Numeric = 0.0,
    eps: chex.Numeric = 1e-5,
) -> optax.GradientTransformationExtraArgs:
  r"""Scales updates by ALI-G's step size.

  .. math::
    \gamma = \mathrm{clip}\left(\frac{f - B}{\|g\|^2 + \epsilon}, 0,
    \eta\right), \qquad u = \gamma g,

  with :math:`f` the batch loss given as the keyword ``value`` (optax's
  convention, as in ``optax.polyak_sgd``) and :math:`B` its lower bound. A
  non-finite `value` or gradient gives a zero step size; a finite gradient
  whose squared norm overflows float32 gets the step the finite maths gives.

  Args:
    max_learning_rate: the maximal step size :math:`\eta` (> 0; ``inf``
      for none, in effect float32's largest value).
    lower_bound: B, the optimal value assumed for every loss (interpolation).
    eps: :math:`\epsilon` (>= 0), 1e-5 in ALI-G's practice.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``value=`` (the scalar batch loss) and ignores other extra args.

  Example:
    >>> import jax.numpy as jnp
    >>> from aalig_optax import scale_by_alig
    >>> tx = scale_by_alig(1.0, eps=0.0)
    >>> u, s = tx.update(jnp.array([3.0, 4.0]), tx.init(None), value=5.0)
    >>> round(float(s.step_size), 6)
    0.2

  References:
    Berrada, Zisserman, Kumar, "Training Neural Networks for and by
    Interpolation", ICML 2020 (oval-group/ali-g).
  """
  _checks.check_positive("max_learning_rate", max_learning_rate)
  _checks.check_non_negative("eps", eps)
  _checks.check_finite("lower_bound", lower_bound)

  def init_fn(params):
    del params
    return ScaleByAligState(count=jnp.zeros([], jnp.int32),
                            step_size=jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    del params, extra_args
    if value is None:
      raise TypeError(
          "ALI-G's update needs the batch loss as a keyword argument: "
          "update(grads, state, params, value=<scalar loss>).")
    value = jnp.asarray(value)
    if value.shape != ():
      raise ValueError(
          f"value must be the scalar batch loss, got shape {value.shape}; "
          "pass the mean of the per-example losses.")
    gap = value.astype(jnp.float32) - jnp.asarray(lower_bound, jnp.float32)
    grads32 = optax.tree.cast(updates, jnp.float32)
    sq_norm = optax.tree.norm(grads32, squared=True)
    coef, scale, finite = step_coefficients(
        gap, sq_norm, scaled_sq_norm_if_needed(sq_norm + eps, grads32),
        cap_max_learning_rate(max_learning_rate), eps)
    # A non-finite loss or gradient gives a zero step.
    coef = jnp.where(finite & jnp.isfinite(gap), coef, 0.0)
    step_size = coef * scale
    updates = jax.tree.map(
        lambda g: jnp.where(coef > 0, (g * scale) * coef, 0).astype(g.dtype),
        updates)
    return updates, ScaleByAligState(
        count=optax.safe_int32_increment(state.count), step_size=step_size)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def project_l2_ball(max_norm: chex.Numeric) -> optax.GradientTransformation:
  r"""Turns updates into ones that land in the L2 ball of radius `max_norm`.

  With :math:`w' = w + u`, the new update is
  :math:`w' \min(1, r / \|w'\|) - w`, the global L2 norm taken over all leaves.
  Chain it last, after the sign flip.

  Args:
    max_norm: r > 0, the radius of the ball.

  Returns:
    An ``optax.GradientTransformation`` (stateless) that needs ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from aalig_optax import project_l2_ball
    >>> tx = project_l2_ball(1.0)
    >>> u, _ = tx.update(jnp.array([3.0, 4.0]), tx.init(None), jnp.zeros(2))
    >>> [round(x, 6) for x in u.tolist()]
    [0.6, 0.8]

  References:
    Berrada, Zisserman, Kumar, "Training Neural Networks for and by
    Interpolation", ICML 2020, Sec. on constraint-based regularisation.
  """
  _checks.check_positive("max_norm", max_norm)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("project_l2_ball needs params in update.")
    new_params = optax.apply_updates(params, updates)
    projected = optax.projections.projection_l2_ball(
        optax.tree.cast(new_params, jnp.float32), max_norm)
    return optax.tree.cast_like(optax.tree.sub(projected, params),
                                updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def alig(
    max_learning_rate: chex.Numeric,
    *,
    momentum: chex.Numeric = 0.9,
    max_norm: Optional[chex.Numeric] = None,
    lower_bound: chex.Numeric = 0.0,
    eps: chex.Numeric = 1e-5,
) -> optax.GradientTransformationExtraArgs:
  r"""The ALI-G optimiser: its step size, Nesterov momentum, an L2 ball.

  .. math::
    v \leftarrow \mu v - \gamma g, \qquad
    w \leftarrow \Pi_{\|w\| \le r}\left(w - \gamma g + \mu v\right),

  with :math:`\gamma` from :func:`scale_by_alig`. With :math:`\mu = 0` and no
  projection the step equals ``optax.polyak_sgd(max_learning_rate, eps=eps,
  variant="sps+")``.

  Args:
    max_learning_rate: the maximal step size :math:`\eta` (> 0; ``inf``
      for none, in effect float32's largest value).
    momentum: :math:`\mu` in [0, 1).
    max_norm: radius r of the L2 ball the params are projected onto after each
      step; None for no constraint.
    lower_bound: the optimal value assumed for the batch loss.
    eps: :math:`\epsilon` (>= 0) in the step size's denominator.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``value=`` (the scalar batch loss).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from aalig_optax import alig
    >>> f = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> opt = alig(1.0, momentum=0.0)
    >>> w = jnp.zeros(2); state = opt.init(w)
    >>> for _ in range(30):
    ...   value, grads = jax.value_and_grad(f)(w)
    ...   updates, state = opt.update(grads, state, w, value=value)
    ...   w = optax.apply_updates(w, updates)
    >>> bool(f(w) < 1e-3)
    True

  References:
    Berrada, Zisserman, Kumar, "Training Neural Networks for and by
    Interpolation", ICML 2020 (oval-group/ali-g, alig/th/alig.py).
  """
  _checks.check_momentum(momentum)
  parts = [scale_by_alig(max_learning_rate, lower_bound=lower_bound, eps=eps),
           momentum_or_identity(momentum), optax.scale(-1.0)]
  if max_norm is not None:
    parts.append(project_l2_ball(max_norm))
  return optax.chain(*parts)
