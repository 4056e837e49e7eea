"""AALIG (Adaptive ALI-G): a Polyak step size with per-example optima."""

from __future__ import annotations

from typing import Any, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from aalig_optax import _alig
from aalig_optax import _aov
from aalig_optax import _checks
from aalig_optax import _initial
from aalig_optax import _state
from aalig_optax import _tables
from aalig_optax._state import AaligConfig
from aalig_optax._state import I32_MAX
from aalig_optax._state import saturating_add

_LOSS_ESTIMATES = ("last", "best_epoch")
# Platforms where the rare case's scaled norm of the gradient is computed at
# every step rather than in a branch: a GPU conditional copies its predicate
# to the host and waits for it (XLA's ConditionalThunk, openxla/xla
# xla/backends/gpu/runtime/conditional_thunk.cc), so that the step cannot be
# queued ahead of the device (on an H200 the branch cost 2% of the step of a
# linear model and of a 1.8M-parameter MLP, under 1% of ResNet-8's, which has
# 29 leaves; benchmarks/results/gpu/). The scaled norm reads every gradient
# leaf once more: above BRANCH_FREE_MAX_LEAVES leaves or BRANCH_FREE_MAX_SIZE
# gradient entries a wait's fixed cost is the cheaper, and the branch stays.
# (Both limits were set when that case read each leaf twice.) With a batch
# split over several GPUs it also adds one dependent scalar all-reduce a step
# (not measured).
BRANCH_FREE_PLATFORMS = ("cuda", "rocm")
BRANCH_FREE_MAX_LEAVES = 32
BRANCH_FREE_MAX_SIZE = 1 << 22
# The gap is also summed over its rows scaled by 2^-GAP_SHIFT: finite for
# any finite losses and AOVs in batches of up to 2^39 rows.
GAP_SHIFT = 40


def _batch_mean(total, n):
  """The batch's mean from its total (summed over `axis_name`) and count."""
  return total / jnp.maximum(n, 1.0)


def _scaled_mean(values, n, axis_name):
  """mean(values) for masked rows, summed after dividing each term by n:
  finite where finite values overflow the plain sum."""
  return _tables.psum(jnp.sum(values / jnp.maximum(n, 1.0)), axis_name)


def _overflow_safe_mean(total, values, n, axis_name):
  """mean(values) (masked rows), `total` their sum over `axis_name`: the sum
  first, as usual, and where finite values overflow it, summed again after
  dividing each term by n."""
  mean = _batch_mean(total, n)
  return jnp.where(jnp.isfinite(mean), mean,
                   _scaled_mean(values, n, axis_name))


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

  The batch's losses are recorded, and after every `epochs_per_section`
  epochs of `steps_per_epoch` steps the AOVs move by :func:`update_aovs`. The
  output is :math:`\gamma g` (no sign flip), to be chained with momentum and
  ``optax.scale(-1)``; :func:`aalig` is the complete optimiser.

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
  only ``state.num_skipped`` changes. (``optax.apply_if_finite`` inspects the
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
      cannot freeze), or a callable ``(aov, aov_step, loss_estimate,
      lower_bound) -> (aov, aov_step)`` of the same kind (element-wise,
      traceable; it runs once a section under ``jit``).
    initial_aov: the AOVs at init: None (the lower bound), a scalar, an
      array of shape [N] (e.g. a teacher's per-example losses from
      :func:`loss_table`, or a finished run's ``state.aov``), or a callable
      ``params -> [N]`` called by ``init``. Checked when known (finite, at
      least `lower_bound`); traced values are clipped into range.

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
  return _scale_by_aalig(
      max_learning_rate, num_examples, steps_per_epoch, epochs_per_section,
      lower_bound=lower_bound, eps=eps, loss_estimate=loss_estimate,
      table_dtype=table_dtype, axis_name=axis_name, aov_rule=aov_rule,
      initial_aov=initial_aov)[0]


def _scale_by_aalig(
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
):
  """scale_by_aalig's transform, and its `step` (see there), which also says
  whether the batch was skipped and whether a hyperparameter was clipped."""
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
  best_epoch = loss_estimate == "best_epoch"
  num_tables = 4 if best_epoch else 3
  # Sections end when count % steps_per_section == 0; wrapping the count at
  # a multiple of that keeps them ending past 2**31 steps.
  count_period = (I32_MAX // steps_per_section) * steps_per_section
  injected_bound = isinstance(lower_bound, jax.Array)
  config = AaligConfig(
      num_examples=num_examples, steps_per_epoch=steps_per_epoch,
      epochs_per_section=epochs_per_section, loss_estimate=loss_estimate,
      table_dtype=table_dtype.name,
      lower_bound=None if injected_bound else float(lower_bound))

  def init_fn(params):
    _checks.check_table_memory(
        num_tables * num_examples * table_dtype.itemsize)
    table = lambda v: jnp.full((num_examples,), v, table_dtype)
    best = dict(epoch_loss_mean=0.0, epoch_loss_count=0.0,
                best_epoch_mean=jnp.inf) if best_epoch else {}
    return _state.new_state(
        aov=_initial.initial_table(initial_aov, params, num_examples,
                                   lower_bound, table_max, table_dtype),
        aov_step=table(0.0),
        last_loss=table(jnp.nan),
        best_loss=table(jnp.nan) if best_epoch else None,
        config=config,
        count=0, num_sections=0, num_invalid=0, num_skipped=0,
        num_clipped=0, step_size=0.0, reached_fraction=jnp.nan, **best)

  def step(updates, state, losses, indices, mask):
    """(update, new state, skip, clipped): the update of one batch."""
    _state.check_state_fits(state, config, axis_name)
    losses, indices, mask = _checks.check_batch(
        losses, indices, mask, num_examples)
    losses = losses.astype(jnp.float32)
    if jnp.iinfo(indices.dtype).bits < 32:
      # Compared in their own dtype, narrow indices would wrap num_examples.
      indices = indices.astype(jnp.int32)

    def rows(indices, mask):
      """(in_range, valid, safe_idx): cheap, recomputed by each kernel that
      reads them (none is written to memory)."""
      # 0 <= i < N as one unsigned comparison (negatives wrap above N).
      unsigned = jnp.dtype(f"uint{jnp.iinfo(indices.dtype).bits}")
      in_range = indices.astype(unsigned) < num_examples
      # int32 after the range check, so wide indices cannot wrap into range.
      return (in_range, mask & in_range,
              jnp.where(in_range, indices, 0).astype(jnp.int32))

    in_range, valid, safe_idx = rows(indices, mask)

    # Injected (traced) hyperparameters are clipped into their valid range.
    max_lr, bad_lr = _checks.clip_injected(max_learning_rate, 0.0, jnp.inf,
                                           0.0)
    max_lr = _alig.cap_max_learning_rate(max_lr)
    eps_, bad_eps = _checks.clip_injected(eps, 0.0, _alig.F32_MAX,
                                         _alig.F32_MAX)
    bound, bad_bound = _checks.clip_injected(lower_bound, -table_max,
                                             table_max, -table_max)
    clipped = bad_lr | bad_eps | bad_bound

    aov_b = _tables.take(state.aov, safe_idx).astype(jnp.float32)
    kept_losses = jnp.where(valid, losses, 0.0)
    kept_aovs = jnp.where(valid, aov_b, 0.0)
    # The batch's counts and sums, in one pass over its rows; the gap's sum
    # also of the rows scaled by 2^-GAP_SHIFT, for a sum that overflows.
    # (Behind a barrier: as a constant, XLA may factor it out, l s - a s
    # into (l - a) s, and l - a can overflow.)
    shift = jax.lax.optimization_barrier(_alig.pow2(jnp.int32(-GAP_SHIFT)))
    n, loss_sum, aov_sum, scaled_gap, num_invalid = _tables.psum(
        _tables.batch_sums(
            valid.astype(jnp.float32), kept_losses, kept_aovs,
            kept_losses * shift - kept_aovs * shift,
            (mask & ~in_range).astype(jnp.int32)), axis_name)
    mean = _batch_mean(loss_sum - aov_sum, n)
    grads32 = optax.tree.cast(updates, jnp.float32)
    sq_norm = optax.tree.norm(grads32, squared=True)

    # The usual case (a finite mean and ||g||^2 + eps): step_coefficients'
    # usual case, one scalar kernel; the mean is fused into it.
    denom = sq_norm + eps_
    usual_step = jnp.where(
        denom > jnp.finfo(jnp.float32).eps,
        jnp.minimum(jnp.maximum(jnp.where(n > 0, mean, 0.0), 0.0) / denom,
                    max_lr), 0.0)
    # The rare case: the mean overflowed (exactly when the sum does: n >= 1
    # in the mean), or ||g||^2 + eps is not finite: the switch's index.
    rare_i = jnp.where(jnp.isfinite(loss_sum - aov_sum) & jnp.isfinite(denom),
                       0, 1)

    # (coefficient, scale) of the usual case, which the switch's usual branch
    # hands back as it is: read by nothing else, XLA then gives it the
    # switch's output buffer and the branch runs no kernel (handing back two
    # scalars that are read later cost two copies a step).
    usual_pair = jnp.stack([usual_step, jnp.float32(1.0)])

    def rare(scaled_gap, grads32, sums, usual_pair):
      # The mean gap from the scaled sum where the plain one overflows, and
      # the step of a scaled gradient where ||g||^2 does; a batch to skip (a
      # non-finite gap or gradient) gets a NaN coefficient.
      del usual_pair  # (Both branches take the same operands.)
      mean = _batch_mean(sums[0] - sums[1], n)
      scaled_mean = _batch_mean(scaled_gap, n) * _alig.pow2(
          jnp.int32(GAP_SHIFT))
      gap = jnp.where(n > 0, jnp.where(jnp.isfinite(mean), mean, scaled_mean),
                      0.0)
      coef, scale, finite = _alig.step_coefficients(
          gap, sq_norm, _alig.scaled_sq_norm(grads32), max_lr, eps_)
      return jnp.stack([jnp.where(jnp.isfinite(gap) & finite, coef, jnp.nan),
                        scale])

    def usual(scaled_gap, grads32, sums, usual_pair):
      del scaled_gap, grads32, sums
      return usual_pair

    def switched(i, *operands):
      return jax.lax.switch(i, (usual, rare), *operands)

    def direct(i, *operands):
      return jnp.where(i > 0, rare(*operands), usual_pair)

    leaves = jax.tree.leaves(grads32)
    small = (len(leaves) <= BRANCH_FREE_MAX_LEAVES
             and sum(g.size for g in leaves) <= BRANCH_FREE_MAX_SIZE)
    pair = jax.lax.platform_dependent(
        rare_i, scaled_gap, grads32, (loss_sum, aov_sum), usual_pair,
        default=switched,
        **{platform: direct for platform in
           (BRANCH_FREE_PLATFORMS if small else ())})
    coef, scale = pair[0], pair[1]
    # A non-finite loss or gradient skips the batch: no step, nothing recorded.
    # (The usual case's coefficient is never NaN.)
    skip = jnp.isnan(coef)
    # gamma: c * s (s is 1 unless gamma is below float32's normal range).
    step_size = coef * scale
    new_updates = jax.tree.map(
        lambda g: jnp.where(skip, 0, (g * scale) * coef).astype(g.dtype),
        updates)

    record = valid & ~skip
    # (A valid row's index is in range: no need of safe_idx.)
    write_idx = _tables.gather(
        jnp.where(record, indices, num_examples).astype(jnp.int32),
        axis_name)
    rec_losses = _tables.gather(jnp.clip(losses, -table_max, table_max),
                                axis_name)
    # An index repeated with different losses is resolved (its lowest loss
    # written again) in the section-end cond below, which the step has
    # anyway: a cond of its own cost the step more than its work.
    if best_epoch:  # The epoch end reads the table: resolved at once.
      last_loss = _tables.record(state.last_loss, write_idx, rec_losses)
      unresolved, keep_lowest = False, lambda t: t
    else:
      last_loss, unresolved, keep_lowest = _tables.write_rows(
          state.last_loss, write_idx, rec_losses)

    next_count = lambda c: jnp.where(c >= count_period - 1, 0, c + 1)
    count = jnp.where(skip, state.count, next_count(state.count))
    new_state = state._replace(last_loss=last_loss, config=config)
    if best_epoch:
      rec_n = _tables.psum(jnp.sum(record, dtype=jnp.float32), axis_name)
      rec_losses_b = jnp.where(record, losses, 0.0)
      rec_mean = _overflow_safe_mean(
          _tables.psum(jnp.sum(rec_losses_b), axis_name), rec_losses_b, rec_n,
          axis_name)
      total = state.epoch_loss_count + rec_n
      # A convex combination of two means: no sum that could overflow.
      new_state = new_state._replace(
          epoch_loss_mean=(
              state.epoch_loss_mean * (state.epoch_loss_count
                                       / jnp.maximum(total, 1.0))
              + rec_mean * (rec_n / jnp.maximum(total, 1.0))),
          epoch_loss_count=total)
      new_state = jax.lax.cond(~skip & (count % steps_per_epoch == 0),
                               _aov.end_epoch, lambda s: s, new_state)
    # The only O(N) work, run once a section (after resolving the record).
    # (A skipped batch records nothing and ends no section.)
    section_end = ~skip & (count % steps_per_section == 0)

    # What the section end and the record's rewrite change: the tables, and
    # scalars (not the packed leaves, which a cond would pass through and
    # XLA then copy at every step).
    changed = ("aov", "aov_step", "last_loss", "best_loss", "num_sections",
               "reached_fraction") + (("best_epoch_mean",) if best_epoch
                                      else ())
    changes = lambda s: {name: getattr(s, name) for name in changed}

    def resolve_and_end_section(s):
      s = s._replace(last_loss=keep_lowest(s.last_loss))
      s = jax.lax.cond(section_end,
                       lambda s: _aov.end_section(s, bound, rule),
                       lambda s: s, s)
      return changes(s)

    new_state = new_state._replace(**jax.lax.cond(
        section_end | unresolved, resolve_and_end_section, changes,
        new_state))
    # The step's counters and step size: one kernel for each packed leaf,
    # each entry a function of its old value (so written in place).
    new_state = new_state._replace(
        count=lambda c: jnp.where(skip, c, next_count(c)),
        step_size=lambda s: jnp.where(skip, s, step_size),
        num_invalid=lambda c: saturating_add(c, num_invalid),
        num_skipped=lambda c: saturating_add(c, skip),
        # Unchanged, with no op in the program, unless a value was injected.
        **({} if clipped is False else
           {"num_clipped": lambda c: saturating_add(c, clipped)}))
    return new_updates, new_state, skip, clipped

  def update_fn(updates, state, params=None, *, losses=None, indices=None,
                mask=None, **extra_args):
    del params, extra_args
    new_updates, new_state, _, _ = step(updates, state, losses, indices, mask)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn), step
