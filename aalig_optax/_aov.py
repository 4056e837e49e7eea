"""AALIG's AOV rules, the updates still due, and the best-epoch bookkeeping."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from aalig_optax._state import AaligConfig
from aalig_optax._state import ScaleByAaligState
from aalig_optax._state import the_aalig_arrays


def _as_float32(aov, aov_step, loss_estimate, lower_bound=None):
  """A rule's inputs in float32 (the tables may be 16-bit)."""
  f32 = lambda x: jnp.asarray(x).astype(jnp.float32)
  out = (f32(aov), f32(aov_step), f32(loss_estimate))
  return out if lower_bound is None else out + (f32(lower_bound),)


def _new_steps(a, d, lo, dtype):
  """The step table after a section end, for every rule here: half the
  increase where the AOV was not reached (`lo > a`, or a NaN AOV next to a
  seen loss), unchanged elsewhere."""
  up = (lo > a) | (jnp.isnan(a) & ~jnp.isnan(lo))
  return jnp.where(up, lo / 2 - a / 2, d).astype(dtype)


def update_aovs(
    aov: chex.Array,
    aov_step: chex.Array,
    loss_estimate: chex.Array,
    lower_bound: chex.Numeric = 0.0,
) -> tuple[chex.Array, chex.Array]:
  r"""The section-end AOV update of AALIG (Algorithm 2), as a pure function.

  For each example with estimate :math:`l` of its loss at the section's best
  point, AOV :math:`a` and last increase :math:`d`:

  .. math::
    (a, d) \leftarrow \begin{cases}
      (\max(a - d/2, B), d) & l \le a \text{ (reached)} \\
      ((a + l)/2, (l - a)/2) & l > a \text{ (not reached)} \\
      (a, d) & l \text{ is NaN (never seen).}
    \end{cases}

  A reached AOV keeps its step, so each further reach lowers it by the same
  amount again. Element-wise `jnp.where` only: it can run under `jit`,
  `vmap`, `lax.cond` and on sharded tables.

  Args:
    aov: AOV table, shape [N].
    aov_step: last increase of each AOV, shape [N].
    loss_estimate: each example's loss estimate, shape [N]; NaN for examples
      never seen.
    lower_bound: the known lower bound B of every per-example loss.

  Returns:
    The new `(aov, aov_step)`, in the dtypes of the inputs.

  Example:
    >>> import jax.numpy as jnp
    >>> from aalig_optax import update_aovs
    >>> aov, step = update_aovs(jnp.array([0.0, 1.0, 1.0]),
    ...                         jnp.array([0.0, 0.4, 0.0]),
    ...                         jnp.array([2.0, 0.5, jnp.nan]))
    >>> [round(x, 6) for x in aov.tolist()], step.tolist()[::2]
    ([1.0, 0.8, 1.0], [1.0, 0.0])

  References:
    Paren, Poudel, Kumar, "Faking Interpolation Until You Make It", TMLR
    2022, Algorithm 2, and the authors' released code (Alasdair-P/alig_plus).
  """
  dtype = aov.dtype
  a, d, lo = _as_float32(aov, aov_step, loss_estimate)
  # Not reached is `seen & ~(lo <= a)`: `lo > a`, or a NaN AOV next to a seen
  # loss. Each output is written with its own comparisons, so that XLA
  # builds each in one pass without a shared [N] mask in memory.
  # a/2 + lo/2 rounds as (a + lo)/2 does, but cannot overflow to inf.
  # The new step first, then the AOV from it (equal to the old step where
  # reached): each table then reads only itself and tables already written,
  # so that under `jit` XLA updates both in place (no per-step table copy).
  new_d = _new_steps(a, d, lo, aov_step.dtype)
  new_a = jnp.where(
      lo <= a,
      jnp.maximum(a - new_d.astype(jnp.float32) / 2,
                  jnp.asarray(lower_bound, jnp.float32)),
      jnp.where(jnp.isnan(lo), a, a / 2 + lo / 2))
  return new_a.astype(dtype), new_d


def update_aovs_reflect(
    aov: chex.Array,
    aov_step: chex.Array,
    loss_estimate: chex.Array,
    lower_bound: chex.Numeric = 0.0,
) -> tuple[chex.Array, chex.Array]:
  r"""A section-end AOV update that cannot freeze (``aov_rule="reflect"``).

  As :func:`update_aovs`, except for a reached AOV, which goes below the loss
  it reached rather than a shrinking step below itself:

  .. math::
    (a, d) \leftarrow \begin{cases}
      (\max(B,\ l - \max(a - l + d/2,\ (l - B)/4)), d) & l \le a
        \text{ (reached)} \\
      ((a + l)/2, (l - a)/2) & l > a \text{ (not reached)} \\
      (a, d) & l \text{ is NaN (never seen).}
    \end{cases}

  The AOV is reflected about the loss it reached (an overshoot of
  :math:`a - l` above the loss becomes one below it, plus the paper's
  :math:`d/2`) and moves at least a quarter of the way from the loss to the
  lower bound. After any section end every seen AOV lies at or below its
  example's loss, so the step size of the next batches is not zero because
  AOVs overshot; and a loss that falls fast (an interpolating model) pulls
  its AOV down by a fixed share per section, not by a step that halves.

  Why: under the paper's rule a reached AOV steps down by half its last
  increase, which shrinks geometrically. Once the AOVs that chased a slowly
  falling loss end above it, the mean gap is negative, every step is zero,
  the losses stop changing and every later section end is a tiny step down:
  training is over (Sec. 5.1's rank-4 factorisation at step size 1 stops at
  up to 1.2x its loss floor, with 95% zero steps in the last section).

  Args:
    aov: AOV table, shape [N].
    aov_step: last increase of each AOV, shape [N].
    loss_estimate: each example's loss estimate, shape [N]; NaN for examples
      never seen.
    lower_bound: the known lower bound B of every per-example loss.

  Returns:
    The new `(aov, aov_step)`, in the dtypes of the inputs.

  Example:
    >>> import jax.numpy as jnp
    >>> from aalig_optax import update_aovs_reflect
    >>> aov, step = update_aovs_reflect(jnp.array([0.0, 1.0, 1.0]),
    ...                                 jnp.array([0.0, 0.4, 0.0]),
    ...                                 jnp.array([2.0, 0.5, jnp.nan]))
    >>> [round(x, 6) for x in aov.tolist()], step.tolist()[::2]
    ([1.0, 0.0, 1.0], [1.0, 0.0])

  References:
    Paren, Poudel, Kumar, "Faking Interpolation Until You Make It", TMLR
    2022, Algorithm 2 (the not-reached half, kept); this project's
    evaluation, ``benchmarks/results/aov_rules.md``.
  """
  dtype = aov.dtype
  a, d, lo, bound = _as_float32(aov, aov_step, loss_estimate, lower_bound)
  # As in update_aovs: the step table first, then the AOV, each from its own
  # comparisons, so that XLA writes both tables in place.
  new_d = _new_steps(a, d, lo, aov_step.dtype)
  # (l - B)/4 in quarters, finite for any finite l and B; an a - l that
  # overflows is inf, and the AOV is then clamped at B.
  below = jnp.maximum(a - lo + new_d.astype(jnp.float32) / 2,
                      lo / 4 - bound / 4)
  new_a = jnp.where(
      lo <= a, jnp.maximum(lo - below, bound),
      jnp.where(jnp.isnan(lo), a, a / 2 + lo / 2))
  return new_a.astype(dtype), new_d


def update_aovs_anneal(
    aov: chex.Array,
    aov_step: chex.Array,
    loss_estimate: chex.Array,
    lower_bound: chex.Numeric = 0.0,
) -> tuple[chex.Array, chex.Array]:
  r"""A section-end AOV update that anneals and cannot stall for long
  (``aov_rule="anneal"``).

  As :func:`update_aovs`, except for a reached AOV, which moves at least
  halfway down to the loss it reached, and whose step doubles:

  .. math::
    (a, d) \leftarrow \begin{cases}
      (\max(B,\ \min(a - d/2,\ (a + l)/2)),\ 2d) & l \le a
        \text{ (reached)} \\
      ((a + l)/2, (l - a)/2) & l > a \text{ (not reached)} \\
      (a, d) & l \text{ is NaN (never seen).}
    \end{cases}

  Both cases bisect towards the loss: a raised AOV goes halfway up to it (the
  paper's rule), a reached one halfway down, or by the paper's :math:`d/2`
  if that is more. A reached AOV may thus stay above its loss, so that a
  share of the batches steps zero as under the paper's rule (its annealing
  near a noisy optimum), but its overshoot halves every section and its step
  doubles at every consecutive reach: an AOV left above a loss that no
  longer moves (the paper's freeze) is below it after about
  :math:`\log_4` (overshoot / d) section ends rather than overshoot / (d/2).
  The next time the AOV is not reached, its step is reset to half the gap,
  as in the paper.

  Why (``benchmarks/results/aov_rules.md``, ``docs/algorithm.md``): the
  paper's rule anneals because its AOVs sit at or above the losses the model
  reaches and make most steps zero; the same mechanism freezes it when the
  AOVs end far above losses that then stop moving. ``"reflect"`` cannot
  freeze but keeps every AOV a quarter of the loss below it and never
  anneals (it is ALI-G on noisy problems).

  A reached AOV whose step is 0 (only with an `initial_aov` above the
  losses) moves halfway down at each section end and never below its loss.
  A step that doubles past float32's range is inf, and the AOV is then the
  lower bound.

  Args:
    aov: AOV table, shape [N].
    aov_step: last increase of each AOV (doubled at each reach), shape [N].
    loss_estimate: each example's loss estimate, shape [N]; NaN for examples
      never seen.
    lower_bound: the known lower bound B of every per-example loss.

  Returns:
    The new `(aov, aov_step)`, in the dtypes of the inputs.

  Example:
    >>> import jax.numpy as jnp
    >>> from aalig_optax._aov import update_aovs_anneal
    >>> aov, step = update_aovs_anneal(jnp.array([0.0, 1.0, 1.0, 1.0]),
    ...                                jnp.array([0.0, 0.4, 0.1, 0.0]),
    ...                                jnp.array([2.0, 0.9, 0.0, jnp.nan]))
    >>> [round(x, 6) for x in aov.tolist()]
    [1.0, 0.8, 0.5, 1.0]
    >>> [round(x, 6) for x in step.tolist()]
    [1.0, 0.8, 0.2, 0.0]

  References:
    Paren, Poudel, Kumar, "Faking Interpolation Until You Make It", TMLR
    2022, Algorithm 2 (the not-reached half, kept); this project's
    evaluation, ``benchmarks/results/aov_rules.md``.
  """
  dtype = aov.dtype
  a, d, lo, bound = _as_float32(aov, aov_step, loss_estimate, lower_bound)
  # As in update_aovs: the AOV from the old step (d/2), then the step table,
  # each from its own comparisons. a/2 + lo/2 cannot overflow.
  new_a = jnp.where(
      lo <= a, jnp.maximum(jnp.minimum(a - d / 2, a / 2 + lo / 2), bound),
      jnp.where(jnp.isnan(lo), a, a / 2 + lo / 2))
  new_d = jnp.where(lo <= a, 2 * d,
                    _new_steps(a, d, lo, jnp.float32)).astype(aov_step.dtype)
  return new_a.astype(dtype), new_d


# The rules `aov_rule=` takes by name.
AOV_RULES = {"paper": update_aovs, "reflect": update_aovs_reflect,
             "anneal": update_aovs_anneal}


def resolve_rule(aov_rule):
  """The section-end function of `aov_rule`: a name or a callable."""
  if callable(aov_rule):
    return aov_rule
  if isinstance(aov_rule, str) and aov_rule in AOV_RULES:
    return AOV_RULES[aov_rule]
  raise ValueError(
      f"aov_rule must be one of {tuple(AOV_RULES)} or a callable "
      "(aov, aov_step, loss_estimate, lower_bound) -> (aov, aov_step), got "
      f"aov_rule={aov_rule!r}.")


def apply_rule(rule, aov, aov_step, estimate, lower_bound, due):
  """`rule`'s new (aov, aov_step) where `due`, the old entries elsewhere.

  The rule sees a NaN estimate where no update is due: this package's rules
  then leave the row as it is (and XLA can write both tables in place).
  Other rules' output is kept only where due, so that a rule that does not
  expect the NaN estimate of a never-seen example changes nothing for it.
  Raises a ValueError naming `aov_rule` when the rule does not return two
  arrays of its input's shape.
  """
  estimate = jnp.where(due, estimate, jnp.nan)
  out = rule(aov, aov_step, estimate, lower_bound)
  if not (isinstance(out, (tuple, list)) and len(out) == 2):
    got = type(out).__name__
    if isinstance(out, (tuple, list)):
      got += f" of length {len(out)}"
    raise ValueError(
        f"aov_rule must return a pair (aov, aov_step), got a {got}.")
  new = []
  for name, value, old in (("aov", out[0], aov), ("aov_step", out[1],
                                                  aov_step)):
    if jnp.shape(value) != old.shape:
      raise ValueError(
          f"aov_rule returned {name} of shape {jnp.shape(value)}, expected "
          f"{old.shape}: a rule maps each example's entries to new ones.")
    value = jnp.asarray(value).astype(old.dtype)
    if rule not in AOV_RULES.values():
      value = jnp.where(due, value, old)
    new.append(value)
  return tuple(new)


def current_section(count, config: AaligConfig):
  """The section a step with this `count` belongs to."""
  # (count >= 0: a plain division, one op where // is three.)
  return jax.lax.div(count, jnp.asarray(config.steps_per_section, count.dtype))


def bring_up_to_date(aov, aov_step, last_loss, loss_section, section,
                     lower_bound, rule):
  """Rows with their AOV updates applied, for ``loss_estimate="last"``.

  A row whose loss was recorded in an earlier section than `section` has the
  update of that section's end still due: `rule`, once, with the recorded
  loss as the estimate. Element-wise: it runs on a batch's rows or on the
  whole table.
  """
  due = ~jnp.isnan(last_loss) & (loss_section != section)
  return apply_rule(rule, aov, aov_step, last_loss, lower_bound, due)


def current_aovs(state) -> tuple[chex.Array, chex.Array]:
  """The AOV tables with every update still due applied: O(N), on request.

  A step brings only its batch's rows up to date (the AOV update of a
  section's end is applied to an example's row when the example is next
  read), so `state.aov` may still hold, for examples not read since the last
  section end, the AOVs from before it. This returns the tables as the
  section ends have made them.

  Args:
    state: any optimiser state holding one :class:`ScaleByAaligState`.

  Returns:
    ``(aov, aov_step)``, each of shape [N] in the table dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from aalig_optax import current_aovs, scale_by_aalig
    >>> tx = scale_by_aalig(0.1, num_examples=3, steps_per_epoch=1,
    ...                     epochs_per_section=1)
    >>> _, state = tx.update(jnp.ones(2), tx.init(None),
    ...                      losses=jnp.array([2.0]), indices=jnp.array([1]))
    >>> state.aov.tolist(), current_aovs(state)[0].tolist()
    ([0.0, 0.0, 0.0], [0.0, 1.0, 0.0])
  """
  s = the_aalig_arrays(state)
  if s.config.loss_estimate == "best_epoch":
    return s.aov, s.aov_step  # Updated at section ends (see end_epoch).
  return bring_up_to_date(
      s.aov, s.aov_step, s.last_loss, s.loss_section,
      current_section(s.count, s.config), s.lower_bound,
      resolve_rule(s.config.aov_rule))


def end_epoch(state: ScaleByAaligState, section_end, section, lower_bound,
              rule) -> ScaleByAaligState:
  """``loss_estimate="best_epoch"`` at an epoch end: keeps this epoch's
  losses if its mean is the section's lowest so far (an empty epoch never
  is); at a section end (`section_end`, the end of `section`) also moves the
  AOVs of the examples recorded in that section, by `rule` with those
  losses. O(N), once an epoch."""
  improved = ((state.epoch_loss_count > 0)
              & (state.epoch_loss_mean < state.best_epoch_mean))
  best_loss = jnp.where(improved, state.last_loss, state.best_loss)
  best_mean = jnp.where(improved, state.epoch_loss_mean,
                        state.best_epoch_mean)
  due = section_end & ~jnp.isnan(best_loss) & (state.loss_section == section)
  aov, aov_step = apply_rule(rule, state.aov, state.aov_step, best_loss,
                             lower_bound, due)
  return state._replace(
      aov=aov, aov_step=aov_step, best_loss=best_loss,
      best_epoch_mean=jnp.where(section_end, jnp.inf, best_mean),
      epoch_loss_mean=jnp.zeros_like(state.epoch_loss_mean),
      epoch_loss_count=jnp.zeros_like(state.epoch_loss_count))
