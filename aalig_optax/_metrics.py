"""Reading AALIG's state on the host: metrics for logging, and checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from aalig_optax._state import I32_MAX
from aalig_optax._aov import current_aovs
from aalig_optax._state import the_aalig_arrays
from aalig_optax._state import the_aalig_state


def aalig_metrics(state) -> dict[str, jax.Array]:
  """The quantities the paper plots, read from an optimiser state for logging.

  O(num_examples): it reads the whole tables (:func:`current_aovs`), so call
  it once an epoch or so, not in the train step.

  Args:
    state: any optimiser state holding one :class:`ScaleByAaligState`
      (inside ``optax.chain``, ``apply_if_finite``, ``inject_hyperparams``...).

  Returns:
    A dict of scalar arrays: ``step_size`` (gamma of the last step),
    ``mean_aov`` (over all examples, with every AOV update due applied),
    ``mean_gap`` (mean of last recorded loss minus AOV over the examples
    seen, NaN before any), ``reached_fraction`` (share of the seen examples
    whose last recorded loss is at or below the AOV it is compared with at
    the end of its section: the share their AOV updates find reached, NaN
    before any example is seen), ``sections_done``, and the counters
    ``num_invalid``, ``num_skipped``, ``num_overflows``, ``num_clipped``. A
    negative ``mean_gap`` with ``step_size`` 0 means the AOVs overshot the
    losses and training has stopped (the paper's rule can freeze so;
    ``aov_rule="reflect"`` cannot).

  Example:
    >>> import jax.numpy as jnp
    >>> from aalig_optax import aalig, aalig_metrics
    >>> state = aalig(0.1, 10, 1, 1).init(jnp.zeros(2))
    >>> {k: float(v) for k, v in aalig_metrics(state).items()}["mean_aov"]
    0.0
  """
  s = the_aalig_arrays(state)
  aov, _ = current_aovs(s)
  last = s.last_loss.astype(jnp.float32)
  seen = ~jnp.isnan(last)
  num_seen = jnp.where(seen.any(), jnp.sum(seen), jnp.nan)
  gap = jnp.where(seen, last - aov.astype(jnp.float32), 0.0)
  # The AOV each loss is compared with at its section's end: the stored one
  # (an update due has not been applied to it yet).
  reached = seen & (last <= s.aov.astype(jnp.float32))
  return dict(
      step_size=s.step_size,
      mean_aov=jnp.mean(aov.astype(jnp.float32)),
      mean_gap=jnp.sum(gap) / num_seen,
      reached_fraction=jnp.sum(reached) / num_seen,
      sections_done=s.num_sections,
      num_invalid=s.num_invalid,
      num_skipped=s.num_skipped,
      num_overflows=s.num_overflows,
      num_clipped=s.num_clipped,
  )


def check_indices(state) -> None:
  """Raises on the host if any step dropped rows for an out-of-range index.

  Under `jit` AALIG cannot raise on values, so it drops such rows (they are
  neither used nor recorded) and counts them in ``num_invalid``. Call this
  after a step, or once an epoch, to turn the count into an error.

  Args:
    state: any optimiser state holding one :class:`ScaleByAaligState`.

  Raises:
    ValueError: stating how many rows were dropped.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from aalig_optax import scale_by_aalig, check_indices
    >>> tx = scale_by_aalig(0.1, 4, 1, 1)
    >>> step = jax.jit(lambda s: tx.update(jnp.ones(2), s,
    ...     losses=jnp.ones(2), indices=jnp.array([0, 7]))[1])
    >>> state = step(tx.init(None))
    >>> try:
    ...   check_indices(state)
    ... except ValueError as e:
    ...   print(str(e).split(":")[0])
    1 batch row(s) had an index outside [0, num_examples=4) and were dropped
  """
  s = the_aalig_state(state)
  _raise_if_counted(
      s.num_invalid,
      "batch row(s) had an index outside [0, num_examples="
      f"{s.aov.shape[-1]}) and were dropped: neither their loss nor their AOV "
      "entered a step size, and nothing was recorded for them. Check the data "
      "pipeline's example indices.")


def check_hyperparams(state) -> None:
  """Raises on the host if injected hyperparameters had to be clipped.

  Values set at run time (``optax.inject_hyperparams``) cannot raise under
  `jit`; outside their range they are clipped into it: ``max_learning_rate``
  and ``weight_decay`` to [0, inf) (NaN to 0), ``momentum`` to [0, 1) (NaN
  to 0), ``eps`` to [0, float32 max] (NaN to the max, a zero step), and
  ``lower_bound`` to the table dtype's range (NaN to its lowest value). Each
  such step is counted in ``num_clipped``; call this once an epoch to turn
  the count into an error.

  Args:
    state: any optimiser state holding one :class:`ScaleByAaligState`.

  Raises:
    ValueError: stating how many steps used a clipped value.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from aalig_optax import aalig, check_hyperparams
    >>> tx = optax.inject_hyperparams(aalig, static_args=(
    ...     "num_examples", "steps_per_epoch", "epochs_per_section"))(
    ...     0.1, num_examples=4, steps_per_epoch=1, epochs_per_section=1)
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> state.hyperparams["momentum"] = jnp.asarray(1.5)
    >>> _, state = jax.jit(lambda s: tx.update(params, s, params,
    ...     losses=jnp.ones(2), indices=jnp.arange(2)))(state)
    >>> try:
    ...   check_hyperparams(state)
    ... except ValueError as e:
    ...   print(str(e).split(":")[0])
    1 step(s) used an injected hyperparameter outside its valid range
  """
  _raise_if_counted(
      the_aalig_state(state).num_clipped,
      "step(s) used an injected hyperparameter outside its valid range: it was"
      " clipped into the range (see check_hyperparams's docstring). Check the "
      "values written into the optimiser state's hyperparams.")


def _raise_if_counted(counter, what: str) -> None:
  """Raises "<n> <what>" if the (saturating) counter is above zero."""
  n = int(np.asarray(jax.device_get(counter)).max())
  if n:
    raise ValueError(f"{'at least ' if n == I32_MAX else ''}{n} {what}")
