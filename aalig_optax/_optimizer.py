"""The AALIG optimiser: the step size of scale_by_aalig, momentum, decay."""

from __future__ import annotations

from typing import Any, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from aalig_optax import _aalig
from aalig_optax import _alig
from aalig_optax import _checks
from aalig_optax._state import saturating_add

#: The arguments of :func:`aalig` (and :func:`scale_by_aalig`) that are not
#: numbers: give them as ``static_args`` to ``optax.inject_hyperparams``,
#: which otherwise calls a callable (``initial_aov``, ``aov_rule``) as a
#: schedule and turns an array into a hyperparameter copied at every step::
#:
#:   optax.inject_hyperparams(aalig, static_args=STATIC_ARGS)(0.1, ...)
STATIC_ARGS = ("num_examples", "steps_per_epoch", "epochs_per_section",
               "loss_estimate", "table_dtype", "axis_name", "aov_rule",
               "initial_aov")

# The largest float32 below 1: an injected momentum is clipped to it.
_MAX_MOMENTUM = float(np.nextafter(np.float32(1), np.float32(0)))


def aalig(
    max_learning_rate: chex.Numeric,
    num_examples: int,
    steps_per_epoch: int,
    epochs_per_section: int,
    *,
    momentum: chex.Numeric = 0.9,
    weight_decay: chex.Numeric = 0.0,
    lower_bound: chex.Numeric = 0.0,
    eps: chex.Numeric = 1e-5,
    loss_estimate: str = "last",
    table_dtype: Any = jnp.float32,
    axis_name: Optional[str] = None,
    aov_rule: Any = "paper",
    initial_aov: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The AALIG optimiser: AALIG's step size with Nesterov momentum.

  With :math:`\gamma` the step size of :func:`scale_by_aalig`, momentum
  :math:`\mu` and weight decay :math:`\lambda` (kept out of the momentum
  buffer and out of :math:`\|g\|`):

  .. math::
    v \leftarrow \mu v - \gamma g, \qquad
    w \leftarrow w - \gamma (g + \lambda w) + \mu v.

  With :math:`\mu = \lambda = 0` this is Algorithm 1 of the paper. The state is
  ``(ScaleByAaligState, optax.TraceState)``, as for
  ``optax.chain(scale_by_aalig(...), optax.trace(mu, nesterov=True),
  optax.scale(-1))``, which this equals when :math:`\lambda = 0`.

  Args:
    max_learning_rate: the maximal step size :math:`\eta` (> 0), the one
      hyperparameter to tune (powers of ten).
    num_examples: N, the size of the training set.
    steps_per_epoch: optimiser steps in an epoch.
    epochs_per_section: epochs between AOV updates (the paper: a tenth of
      the epoch budget).
    momentum: :math:`\mu` in [0, 1).
    weight_decay: :math:`\lambda` >= 0.
    lower_bound: known lower bound of every per-example loss.
    eps: :math:`\epsilon` in the step size's denominator.
    loss_estimate: ``"last"`` or ``"best_epoch"``, see :func:`scale_by_aalig`.
    table_dtype: dtype of the per-example tables.
    axis_name: the batch axis under ``pmap``/``shard_map``.
    aov_rule: ``"paper"`` (default), ``"reflect"``, ``"anneal"`` or a
      callable, see :func:`scale_by_aalig` and "Choosing an AOV rule" in
      docs/algorithm.md.
    initial_aov: starting AOVs (a table, scalar or ``params -> table``), see
      :func:`scale_by_aalig`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` takes
    ``losses=``, ``indices=`` and optionally ``mask=`` as keyword arguments.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from aalig_optax import aalig
    >>> x = jnp.linspace(-1, 1, 8)[:, None]; y = 3 * x[:, 0]
    >>> loss = lambda w, i: (x[i] @ w - y[i]) ** 2
    >>> opt = aalig(1.0, num_examples=8, steps_per_epoch=2,
    ...             epochs_per_section=5)
    >>> w = jnp.zeros(1); state = opt.init(w)
    >>> for step in range(20):
    ...   idx = jnp.arange(4) + 4 * (step % 2)
    ...   losses, vjp = jax.vjp(lambda w: loss(w, idx), w)
    ...   grads, = vjp(jnp.full(4, 0.25))
    ...   updates, state = opt.update(grads, state, w, losses=losses,
    ...                               indices=idx)
    ...   w = optax.apply_updates(w, updates)
    >>> bool(abs(w[0] - 3) < 0.1)
    True

  References:
    Paren, Poudel, Kumar, "Faking Interpolation Until You Make It", TMLR
    2022;
    the authors' PyTorch code, Alasdair-P/alig_plus (momentum form).
  """
  _checks.check_momentum(momentum)
  _checks.check_non_negative("weight_decay", weight_decay)
  settings = _aalig.make_settings(
      max_learning_rate, num_examples, steps_per_epoch, epochs_per_section,
      lower_bound=lower_bound, eps=eps, loss_estimate=loss_estimate,
      table_dtype=table_dtype, axis_name=axis_name, aov_rule=aov_rule,
      initial_aov=initial_aov)
  trace = _alig.momentum_or_identity(momentum)
  has_momentum = not isinstance(trace.init(None), optax.EmptyState)
  has_decay = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)

  def init_fn(params):
    return _aalig.init(settings, params), trace.init(params)

  def update_fn(updates, state, params=None, *, losses=None, indices=None,
                mask=None, **extra_args):
    del extra_args
    core_state, trace_state = state
    out = _aalig.step(settings, updates, core_state, losses, indices, mask)
    skipped, new_core = out.skipped, out.state
    # Injected values outside [0, 1) and [0, inf) are clipped, and counted
    # once a step with the core's own.
    mu, bad_mu = _checks.clip_injected(momentum, 0.0, _MAX_MOMENTUM, 0.0)
    wd, bad_wd = _checks.clip_injected(weight_decay, 0.0, jnp.inf, 0.0)
    bad = bad_mu | bad_wd
    if bad is not False:  # Only where a value was injected.
      if out.clipped is not False:
        bad = bad & ~out.clipped
      new_core = new_core._replace(
          num_clipped=saturating_add(new_core.num_clipped, bad))
    scaled = _aalig.scale_updates(updates, out)
    # A batch the core skipped must move nothing. Its update is then zero,
    # so a decay of 1 keeps the momentum buffer as it was: arithmetic,
    # not a select between old and new buffers, which would make XLA copy
    # the donated buffer at every step.
    if has_momentum:
      decay = jnp.where(skipped, 1.0, mu)
      # optax.trace(momentum, nesterov=True), with that decay.
      new_trace = jax.tree.map(
          lambda g, t: g + decay.astype(t.dtype) * t,
          scaled, trace_state.trace)
      scaled = jax.tree.map(lambda g, t: g + mu * t, scaled, new_trace)
      trace_state = optax.TraceState(trace=new_trace)
    if has_decay:
      if params is None:
        raise ValueError("aalig with weight_decay > 0 needs params in update.")
      scaled = optax.tree.add_scale(scaled, out.step_size * wd, params)
    updates = jax.tree.map(
        lambda u, g: jnp.where(skipped, 0, -u).astype(g.dtype), scaled,
        updates)
    return updates, (new_core, trace_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
