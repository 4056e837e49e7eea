"""ALI-G: the Polyak step size for interpolating models, and its L2 ball."""

from __future__ import annotations

from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from aalig_optax import _checks
from aalig_optax import _numerics


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
  non-finite `value` or gradient gives a zero step size, and so does a
  finite gradient whose squared norm overflows float32 (the exact step is
  then below float32's resolution of any parameter).

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
    sq_norm, finite = _numerics.sq_norm_and_finite(
        optax.tree.cast(updates, jnp.float32))
    # A non-finite loss or gradient gives a zero step.
    step_size = jnp.where(
        jnp.isfinite(gap) & finite,
        _numerics.polyak_step_size(
            gap, sq_norm, _numerics.cap_max_learning_rate(max_learning_rate),
            eps), 0.0)
    updates = jax.tree.map(
        lambda g: jnp.where(step_size > 0, g * step_size, 0).astype(g.dtype),
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
