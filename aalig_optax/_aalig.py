"""AALIG (Adaptive ALI-G): a Polyak step size with per-example optima.

A step, top to bottom (:func:`step`): check the batch; read its rows, with
the AOV updates of past section ends that are still due applied
(:func:`_read_aovs`); the batch's mean gap (:func:`_mean_gap`) and the step
size; record the losses (:func:`_record`); move the counters
(:func:`_count`). No branch, and O(batch) work, except for
``loss_estimate="best_epoch"``, whose epoch ends copy a table.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from aalig_optax import _aov
from aalig_optax import _checks
from aalig_optax import _initial
from aalig_optax import _numerics
from aalig_optax import _state
from aalig_optax import _tables
from aalig_optax._state import AaligConfig
from aalig_optax._state import I32_MAX
from aalig_optax._state import saturating_add

_LOSS_ESTIMATES = ("last", "best_epoch")
# The gap is also summed over its rows scaled by 2^-GAP_SHIFT: finite for
# any finite losses and AOVs in batches of up to 2^39 rows.
GAP_SHIFT = 40


class Settings(NamedTuple):
  """What a :func:`scale_by_aalig` was built with, checked."""
  config: AaligConfig
  max_learning_rate: Any
  eps: Any
  lower_bound: Any
  axis_name: Optional[str]
  initial_aov: Any
  rule: Callable
  table_max: float  # The table dtype's largest value.
  count_period: int  # The count wraps here, a multiple of the section.


class StepResult(NamedTuple):
  step_size: jax.Array  # gamma, 0 for a skipped batch.
  state: _state.ScaleByAaligState
  skipped: jax.Array  # bool: a non-finite loss or gradient.
  clipped: Any  # bool, or False when no hyperparameter was injected.


def scale_by_aalig(
    max_learning_rate: chex.Numeric,
    num_examples: int,
    steps_per_epoch: int,
    epochs_per_section: int,
    *,
    lower_bound: chex.Numeric = 0.0,
    eps: chex.Numeric = 1e-5,
    loss_estimate: str = "last",
    table_dtype: Any = jnp.float32,
    axis_name: Optional[str] = None,
    aov_rule: Any = "paper",
    initial_aov: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Scales updates by AALIG's step size, learning per-example optimal values.

  At each step, for a batch :math:`b` with per-example losses
  :math:`\ell_z` and approximate optimal values (AOVs) :math:`a_z`:

  .. math::
    \gamma = \mathrm{clip}\left(
      \frac{\mathrm{mean}_{z \in b}\,\ell_z - \mathrm{mean}_{z \in b}\,a_z}
           {\|g\|^2 + \epsilon}, 0, \eta\right), \qquad
    u = \gamma\, g.

  The batch's losses are recorded, and at the end of every section of
  `epochs_per_section` epochs of `steps_per_epoch` steps the AOV of each
  example recorded in the section moves by the AOV rule (:func:`update_aovs`
  by default). That update is applied to an example's row when the example
  is next read, so a step reads and writes only its batch's rows, with no
  branch and no pass over the tables (:func:`current_aovs` applies every
  update still due). The output is :math:`\gamma g` (no sign flip), to be
  chained with momentum and ``optax.scale(-1)``; :func:`aalig` is the
  complete optimiser.

  ``update`` takes these extra args as keywords and ignores unknown ones.

  Extra args of update:
    losses: float [B], per-example losses of the batch at the current params
      (the gradient is that of their mean).
    indices: int [B], each example's position in [0, num_examples).
    mask: optional bool [B], False for padding rows, which count in neither
      mean and are not recorded.

  Rows whose index is outside [0, num_examples) raise a ValueError in eager
  mode; under `jit` they are treated as masked and counted in
  ``state.num_invalid``, which :func:`check_indices` turns into an error on
  the host. A batch with a non-finite loss (among its valid rows) or a
  non-finite gradient is skipped: the update is zero, nothing is recorded and
  only ``state.num_skipped`` changes. A finite gradient whose ||g||^2 + eps
  overflows float32 takes a zero step (the exact one is below float32's
  resolution of any parameter), its losses are recorded, and it is counted
  in ``state.num_overflows``. (``optax.apply_if_finite`` inspects the
  gradient only, so this is what keeps a NaN loss out of the tables.)
  An index repeated within a batch counts once per row in the means and
  records its lowest loss.

  Args:
    max_learning_rate: the maximal step size :math:`\eta` (> 0; ``inf``
      for none, in effect float32's largest value).
    num_examples: N, the size of the training set (static).
    steps_per_epoch: optimiser steps in an epoch (static).
    epochs_per_section: epochs between AOV updates; the paper uses a tenth of
      the epoch budget (static).
    lower_bound: known lower bound B of every per-example loss.
    eps: :math:`\epsilon` in the denominator (>= 0).
    loss_estimate: ``"last"`` takes each example's most recent loss as its
      loss at the best point; ``"best_epoch"`` takes its loss in the epoch of
      the section with the lowest mean loss (one more table, and one O(N)
      copy at each improving epoch end).
    table_dtype: dtype of the tables (float32; a 16-bit float halves them).
    axis_name: under ``pmap``/``shard_map``, the batch axis: means are taken
      over it and every replica records every replica's rows.
    aov_rule: how AOVs move at section ends: ``"paper"`` (Algorithm 2,
      :func:`update_aovs`), ``"reflect"`` (:func:`update_aovs_reflect`, which
      cannot freeze), ``"anneal"`` (:func:`update_aovs_anneal`, the choice
      with momentum on problems the model cannot interpolate), or a
      callable ``(aov, aov_step, loss_estimate, lower_bound) -> (aov,
      aov_step)`` of the same kind (element-wise and
      traceable: it runs under ``jit`` on the rows of each batch, and only
      its output for rows with an update due is kept).
    initial_aov: the AOVs at init: None (the lower bound), a scalar, an
      array of shape [N] (e.g. a teacher's per-example losses from
      :func:`loss_table`, or a finished run's :func:`current_aovs`), or a
      callable ``params -> [N]`` called by ``init``. Checked when known
      (finite, at least `lower_bound`); traced values are clipped into
      range.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`ScaleByAaligState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from aalig_optax import scale_by_aalig
    >>> tx = optax.chain(scale_by_aalig(0.1, num_examples=4, steps_per_epoch=2,
    ...                                 epochs_per_section=1),
    ...                  optax.scale(-1.0))
    >>> params = jnp.ones(3)
    >>> state = tx.init(params)
    >>> grads = jnp.full(3, 0.5)
    >>> updates, state = tx.update(grads, state, params,
    ...                            losses=jnp.array([1.0, 2.0]),
    ...                            indices=jnp.array([0, 3]))
    >>> round(float(state[0].step_size), 6)
    0.1

  References:
    Paren, Poudel, Kumar, "Faking Interpolation Until You Make It", TMLR
    2022 (AALIG), Algorithms 1-2; Berrada, Zisserman, Kumar, "Training
    Neural Networks for and by Interpolation" (ALI-G), ICML 2020.
  """
  s = make_settings(
      max_learning_rate, num_examples, steps_per_epoch, epochs_per_section,
      lower_bound=lower_bound, eps=eps, loss_estimate=loss_estimate,
      table_dtype=table_dtype, axis_name=axis_name, aov_rule=aov_rule,
      initial_aov=initial_aov)

  def update_fn(updates, state, params=None, *, losses=None, indices=None,
                mask=None, **extra_args):
    del params, extra_args
    out = step(s, updates, state, losses, indices, mask)
    return scale_updates(updates, out), out.state

  return optax.GradientTransformationExtraArgs(
      lambda params: init(s, params), update_fn)


def scale_updates(grads, out: StepResult):
  """gamma * g in the gradient's dtype; zero for a skipped batch (whose g
  may hold NaN)."""
  return jax.tree.map(
      lambda g: jnp.where(out.skipped, 0, g * out.step_size).astype(g.dtype),
      grads)


def make_settings(max_learning_rate, num_examples, steps_per_epoch,
                  epochs_per_section, *, lower_bound, eps, loss_estimate,
                  table_dtype, axis_name, aov_rule, initial_aov) -> Settings:
  """Checks :func:`scale_by_aalig`'s arguments, naming the one at fault."""
  num_examples = _checks.static_positive_int("num_examples", num_examples)
  if num_examples > I32_MAX:
    raise ValueError(
        f"num_examples must be at most 2**31 - 1 (indices are int32), got "
        f"num_examples={num_examples}.")
  steps_per_epoch = _checks.static_positive_int(
      "steps_per_epoch", steps_per_epoch)
  epochs_per_section = _checks.static_positive_int(
      "epochs_per_section", epochs_per_section)
  steps_per_section = steps_per_epoch * epochs_per_section
  if steps_per_section > I32_MAX:
    raise ValueError(
        "steps_per_epoch * epochs_per_section must be at most 2**31 - 1 (the "
        f"step count is int32), got steps_per_epoch={steps_per_epoch} and "
        f"epochs_per_section={epochs_per_section} ({steps_per_section} steps "
        "a section).")
  _checks.check_positive("max_learning_rate", max_learning_rate)
  _checks.check_non_negative("eps", eps)
  _checks.check_finite("eps", eps)
  _checks.check_finite("lower_bound", lower_bound)
  if loss_estimate not in _LOSS_ESTIMATES:
    raise ValueError(
        f"loss_estimate must be one of {_LOSS_ESTIMATES}, got "
        f"loss_estimate={loss_estimate!r}.")
  if isinstance(table_dtype, jax.Array):
    # optax.inject_hyperparams takes a dtype such as jnp.bfloat16 (callable)
    # for a schedule and calls it with the step count: the result's dtype is
    # the one meant.
    table_dtype = table_dtype.dtype
  table_dtype = jnp.dtype(table_dtype)
  if not jnp.issubdtype(table_dtype, jnp.floating):
    raise ValueError(
        f"table_dtype must be a floating dtype, got table_dtype={table_dtype}.")
  # Losses beyond the table dtype's range are stored at its max (or -max).
  table_max = float(jnp.finfo(table_dtype).max)
  _checks.check_within("lower_bound", lower_bound, table_max,
                       f"the largest {table_dtype.name} table entry")
  rule = _aov.resolve_rule(aov_rule)
  _initial.check_initial_aov(initial_aov, num_examples, lower_bound,
                             table_max)
  config = AaligConfig(
      num_examples=num_examples, steps_per_epoch=steps_per_epoch,
      epochs_per_section=epochs_per_section, loss_estimate=loss_estimate,
      table_dtype=table_dtype.name, aov_rule=aov_rule)
  return Settings(
      config=config, max_learning_rate=max_learning_rate, eps=eps,
      lower_bound=lower_bound, axis_name=axis_name, initial_aov=initial_aov,
      rule=rule, table_max=table_max,
      count_period=(I32_MAX // steps_per_section) * steps_per_section)


def init(s: Settings, params) -> _state.ScaleByAaligState:
  """The state at init: the starting AOVs, nothing recorded."""
  c = s.config
  num_tables = 4 if c.loss_estimate == "best_epoch" else 3
  _checks.check_table_memory(
      c.num_examples * (num_tables * jnp.dtype(c.table_dtype).itemsize + 4))
  return _state.new_state(
      aov=_initial.initial_table(s.initial_aov, params, c.num_examples,
                                 s.lower_bound, s.table_max,
                                 jnp.dtype(c.table_dtype)),
      config=c, lower_bound=s.lower_bound)


def _hyperparameters(s: Settings):
  """(max_lr, eps, bound, clipped): injected (traced) values clipped into
  their valid range, `clipped` saying whether one was outside it (False,
  the Python bool, when none is injected)."""
  max_lr, bad_lr = _checks.clip_injected(s.max_learning_rate, 0.0, jnp.inf,
                                         0.0)
  eps, bad_eps = _checks.clip_injected(s.eps, 0.0, _numerics.F32_MAX,
                                       _numerics.F32_MAX)
  bound, bad_bound = _checks.clip_injected(s.lower_bound, -s.table_max,
                                           s.table_max, -s.table_max)
  return (_numerics.cap_max_learning_rate(max_lr), eps, bound,
          bad_lr | bad_eps | bad_bound)


def _batch_rows(indices, mask, num_examples):
  """(in_range, valid, safe_idx): rows in [0, N), rows that count, and
  indices safe to read with (0 where out of range)."""
  if jnp.iinfo(indices.dtype).bits < 32:
    # Compared in their own dtype, narrow indices would wrap num_examples.
    indices = indices.astype(jnp.int32)
  # 0 <= i < N as one unsigned comparison (negatives wrap above N).
  unsigned = jnp.dtype(f"uint{jnp.iinfo(indices.dtype).bits}")
  in_range = indices.astype(unsigned) < num_examples
  # int32 after the range check, so wide indices cannot wrap into range.
  return (in_range, mask & in_range,
          jnp.where(in_range, indices, 0).astype(jnp.int32))


def _read_aovs(s: Settings, state, idx, section, bound):
  """The rows `idx` of (aov, aov_step), with the AOV updates still due
  applied (``loss_estimate="last"``; ``"best_epoch"`` applies them at
  section ends) and AOVs below the bound raised to it."""
  dtype = state.aov.dtype
  aov = jnp.maximum(_tables.take(state.aov, idx),
                    jnp.asarray(bound).astype(dtype))
  aov_step = _tables.take(state.aov_step, idx)
  if s.config.loss_estimate == "best_epoch":
    return aov, aov_step
  return _aov.bring_up_to_date(
      aov, aov_step, _tables.take(state.last_loss, idx),
      _tables.take(state.loss_section, idx), section, bound, s.rule)


def _mean_gap(losses, aovs, valid, dropped, axis_name):
  """(gap, num_dropped): mean(losses) - mean(aovs) over the valid rows (and
  over `axis_name`), 0 with no valid row and non-finite only where a loss
  is; and the number of `dropped` rows.

  One pass over the rows gives every sum, the gap's also over the rows
  scaled by 2^-GAP_SHIFT, which stays finite where finite losses overflow
  the plain sum.
  """
  kept_losses = jnp.where(valid, losses, 0.0)
  kept_aovs = jnp.where(valid, aovs.astype(jnp.float32), 0.0)
  # Behind a barrier: as a constant, XLA may factor it out, l s - a s into
  # (l - a) s, and l - a can overflow.
  shift = jax.lax.optimization_barrier(_numerics.pow2(jnp.int32(-GAP_SHIFT)))
  n, loss_sum, aov_sum, scaled_sum, num_dropped = _tables.psum(
      _tables.batch_sums(valid.astype(jnp.float32), kept_losses, kept_aovs,
                         kept_losses * shift - kept_aovs * shift,
                         dropped.astype(jnp.int32)), axis_name)
  n = jnp.maximum(n, 1.0)  # With no valid row every sum is 0.
  mean = (loss_sum - aov_sum) / n
  scaled_mean = scaled_sum / n * _numerics.pow2(jnp.int32(GAP_SHIFT))
  return jnp.where(jnp.isfinite(mean), mean, scaled_mean), num_dropped


def _record(s: Settings, state, idx, aov, aov_step, losses, record, section):
  """The tables with the recorded rows written: their AOVs as read (brought
  up to date), their losses (an index repeated keeps its lowest) and the
  section. `idx`, `aov`, `aov_step`, `losses` and `record` are every
  replica's rows."""
  write_idx = jnp.where(record, idx, s.config.num_examples)
  losses = jnp.clip(losses, -s.table_max, s.table_max)
  return dict(
      aov=_tables.write(state.aov, write_idx, aov),
      aov_step=_tables.write(state.aov_step, write_idx, aov_step),
      last_loss=_tables.write(state.last_loss, write_idx, losses,
                              lowest=True),
      loss_section=_tables.write(state.loss_section, write_idx,
                                 jnp.full(idx.shape, section, jnp.int32)))


def _epoch_mean(state, losses, record, axis_name):
  """``best_epoch``: the running (epoch_loss_mean, epoch_loss_count) with
  this replica's recorded losses (and every other's, over `axis_name`)
  added, as a convex combination of two means: no sum that could overflow."""
  kept = jnp.where(record, losses, 0.0)
  n = _tables.psum(jnp.sum(record, dtype=jnp.float32), axis_name)
  mean = _tables.psum(jnp.sum(kept), axis_name) / jnp.maximum(n, 1.0)
  mean = jnp.where(jnp.isfinite(mean), mean, _tables.psum(
      jnp.sum(kept / jnp.maximum(n, 1.0)), axis_name))
  count = state.epoch_loss_count + n
  share = lambda k: k / jnp.maximum(count, 1.0)
  return (state.epoch_loss_mean * share(state.epoch_loss_count)
          + mean * share(n)), count


def step(s: Settings, grads, state, losses, indices, mask) -> StepResult:
  """One AALIG step: the step size, and the state with the batch recorded."""
  c = s.config
  _state.check_state_fits(state, c, s.axis_name)
  losses, indices, mask = _checks.check_batch(losses, indices, mask,
                                              c.num_examples)
  losses = losses.astype(jnp.float32)
  max_lr, eps, bound, clipped = _hyperparameters(s)
  in_range, valid, idx = _batch_rows(indices, mask, c.num_examples)
  section = _aov.current_section(state.count, c)

  # Every replica's rows, brought up to date: what this step writes.
  gather = lambda x: _tables.gather(x, s.axis_name)
  all_idx, all_valid, all_losses = gather(idx), gather(valid), gather(losses)
  aov, aov_step = _read_aovs(s, state, all_idx, section, bound)
  own_aov = aov if s.axis_name is None else _read_aovs(
      s, state, idx, section, bound)[0]

  gap, num_dropped = _mean_gap(losses, own_aov, valid, mask & ~in_range,
                               s.axis_name)
  sq_norm, finite = _numerics.sq_norm_and_finite(
      optax.tree.cast(grads, jnp.float32))
  # A non-finite loss or gradient skips the batch: no step, nothing recorded.
  skipped = ~jnp.isfinite(gap) | ~finite
  gamma = jnp.where(skipped, 0.0,
                    _numerics.polyak_step_size(gap, sq_norm, max_lr, eps))
  overflowed = ~skipped & ~jnp.isfinite(sq_norm + eps)

  record = all_valid & ~skipped
  tables = _record(s, state, all_idx, aov, aov_step, all_losses, record,
                   section)
  count = jnp.where(skipped, state.count,
                    jnp.where(state.count >= s.count_period - 1, 0,
                              state.count + 1))
  section_end = ~skipped & (count % c.steps_per_section == 0)
  new = state._replace(
      **tables, count=count, config=c,
      step_size=jnp.where(skipped, state.step_size, gamma),
      lower_bound=(state.lower_bound if not isinstance(bound, jax.Array)
                   else bound.astype(jnp.float32)),
      num_sections=saturating_add(state.num_sections, section_end),
      num_invalid=saturating_add(state.num_invalid, num_dropped),
      num_skipped=saturating_add(state.num_skipped, skipped),
      num_overflows=saturating_add(state.num_overflows, overflowed),
      num_clipped=(state.num_clipped if clipped is False
                   else saturating_add(state.num_clipped, clipped)))
  if c.loss_estimate == "best_epoch":
    mean, n = _epoch_mean(state, losses, valid & ~skipped, s.axis_name)
    new = new._replace(epoch_loss_mean=mean, epoch_loss_count=n)
    new = jax.lax.cond(
        ~skipped & (count % c.steps_per_epoch == 0),
        lambda t: _aov.end_epoch(t, section_end, section, bound, s.rule),
        lambda t: t, new)
  return StepResult(gamma, new, skipped, clipped)
