"""AALIG (Adaptive ALI-G): a Polyak step size with per-example optimal values."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from aalig_optax import _checks
from aalig_optax import _tables

_LOSS_ESTIMATES = ("last", "best_epoch")
_I32_MAX = int(np.iinfo(np.int32).max)
# The largest float32 below 1: an injected momentum is clipped to it.
_MAX_MOMENTUM = float(np.nextafter(np.float32(1), np.float32(0)))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class AaligConfig:
  """What a :class:`ScaleByAaligState` was built for.

  Static: it has no leaves and is part of the state's tree structure, so that
  ``update`` can refuse a state of another transform at trace time and a
  checkpoint can record the schedule its tables belong to.

  Attributes:
    num_examples: N, the number of rows of each table.
    steps_per_epoch: optimiser steps in an epoch.
    epochs_per_section: epochs between AOV updates.
    loss_estimate: ``"last"`` or ``"best_epoch"``.
    table_dtype: the tables' dtype, by name.
    lower_bound: the loss lower bound, or None when it was given as a JAX
      array (e.g. injected with ``optax.inject_hyperparams``).
  """

  num_examples: int
  steps_per_epoch: int
  epochs_per_section: int
  loss_estimate: str
  table_dtype: str
  lower_bound: Optional[float]


class ScaleByAaligState(NamedTuple):
  """State of :func:`scale_by_aalig`. N is `num_examples`, T the `table_dtype`.

  Attributes:
    count: int32 [], steps taken (skipped batches excluded), modulo the
      largest multiple of the section length below 2**31, so that sections
      keep ending however long training runs.
    aov: T [N], approximate optimal value (AOV) of each example's loss.
    aov_step: T [N], the last increase applied to each AOV.
    last_loss: T [N], the loss last recorded per example; NaN if never seen.
    best_loss: T [N] with ``loss_estimate="best_epoch"``, else None: each
      example's loss in the section's best epoch so far.
    epoch_loss_mean: float32 [] (best_epoch only, else None), mean of the
      losses recorded in the current epoch (a running mean: it cannot
      overflow where a sum of large losses would).
    epoch_loss_count: float32 [] (best_epoch only, else None), their number.
    best_epoch_mean: float32 [] (best_epoch only, else None), lowest epoch
      mean loss in the current section; inf at a section's start.
    step_size: float32 [], the step size gamma of the last step.
    reached_fraction: float32 [], share of seen examples whose AOV was reached
      at the last section end; NaN before the first section end.
    num_sections: int32 [], section ends passed.
    num_invalid: int32 [], rows dropped so far because their index was outside
      [0, num_examples) (see :func:`check_indices`); saturates at 2**31 - 1.
    num_skipped: int32 [], batches skipped because a loss or the gradient was
      not finite; a skipped batch changes nothing else in the state;
      saturates at 2**31 - 1.
    num_clipped: int32 [], steps at which an injected hyperparameter lay
      outside its valid range and was clipped into it (see
      :func:`check_hyperparams`); saturates at 2**31 - 1.
    config: :class:`AaligConfig`, static (no leaves): what the state was
      built for.
  """

  count: chex.Array
  aov: chex.Array
  aov_step: chex.Array
  last_loss: chex.Array
  best_loss: Optional[chex.Array]
  epoch_loss_mean: Optional[chex.Array]
  epoch_loss_count: Optional[chex.Array]
  best_epoch_mean: Optional[chex.Array]
  step_size: chex.Array
  reached_fraction: chex.Array
  num_sections: chex.Array
  num_invalid: chex.Array
  num_skipped: chex.Array
  num_clipped: chex.Array
  config: AaligConfig


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
    Paren, Poudel, Kumar, "Faking Interpolation Until You Make It",
    Algorithm 2, and the authors' released code (Alasdair-P/alig_plus).
  """
  dtype = aov.dtype
  a = aov.astype(jnp.float32)
  d = aov_step.astype(jnp.float32)
  lo = jnp.asarray(loss_estimate).astype(jnp.float32)
  seen = ~jnp.isnan(lo)
  reached = lo <= a
  # a/2 + lo/2 rounds as (a + lo)/2 does, but cannot overflow to inf.
  # The new step first, then the AOV from it (equal to the old step where
  # reached): each table then reads only itself and tables already written,
  # so that under `jit` XLA updates both in place (no per-step table copy).
  new_d = jnp.where(seen & ~reached, lo / 2 - a / 2, d).astype(aov_step.dtype)
  new_a = jnp.where(
      reached,
      jnp.maximum(a - new_d.astype(jnp.float32) / 2,
                  jnp.asarray(lower_bound, jnp.float32)),
      a / 2 + lo / 2)
  return jnp.where(seen, new_a, a).astype(dtype), new_d


def polyak_step_size(gap, sq_norm, max_learning_rate, eps):
  """clip(gap / (||g||^2 + eps), 0, max_learning_rate), as in optax's SPS+.

  Zero where the denominator is at or below machine epsilon, or where `gap`
  or `sq_norm` is not finite (the callers then skip the batch).
  """
  denom = sq_norm + eps
  step = jnp.minimum(jnp.maximum(gap, 0.0) / denom, max_learning_rate)
  ok = jnp.isfinite(gap) & jnp.isfinite(sq_norm)
  return jnp.where(ok & (denom > jnp.finfo(jnp.float32).eps), step,
                   0.0).astype(jnp.float32)


_F32_MAX = float(np.finfo(np.float32).max)


def saturating_add(count: chex.Array, increment: chex.Array) -> chex.Array:
  """int32 `count + increment` (increment >= 0), stopping at 2**31 - 1."""
  increment = jnp.asarray(increment).astype(jnp.int32)
  return jnp.where(count > _I32_MAX - increment, _I32_MAX, count + increment)


def _clip_injected(value, lo, hi, nan_to):
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


def _batch_mean(values, subtract, n, axis_name):
  """mean(values - subtract) over the batch (and `axis_name`), for masked rows.

  Summed first, as usual; where finite values overflow that sum, summed again
  after dividing each term by n.
  """
  n1 = jnp.maximum(n, 1.0)
  total = _tables.psum(jnp.sum(values), axis_name)
  scaled = values / n1
  if subtract is not None:
    total = total - _tables.psum(jnp.sum(subtract), axis_name)
    scaled = scaled - subtract / n1
  mean = total / n1
  return jnp.where(jnp.isfinite(mean), mean,
                   _tables.psum(jnp.sum(scaled), axis_name))


def _step_coefficients(gap, grads32, sq_norm, max_learning_rate, eps):
  """(c, s, gamma) such that the update is c * (s * g) and gamma the step size.

  Usually s = 1 and c = gamma. When ||g||^2 overflows float32 though g is
  finite, g is first scaled by a power of two s = 2^-e that makes its norm
  representable, and c = gamma / s: the update gamma * g is then what the
  finite maths gives even where gamma itself is below float32's range.
  """
  gamma = polyak_step_size(gap, sq_norm, max_learning_rate, eps)

  def overflowed():
    top = optax.tree.max(jax.tree.map(jnp.abs, grads32))
    e = jnp.clip(jnp.ceil(jnp.log2(top)), 0, 126).astype(jnp.int32)
    s = jnp.ldexp(jnp.float32(1), -e)
    r = optax.tree.norm(optax.tree.scale(s, grads32), squared=True)
    # gamma / s = gap s / (r + eps s^2), clipped at max_learning_rate / s.
    c = (gap * s) / (r + (eps * s) * s)
    c = jnp.clip(c, 0.0, max_learning_rate * jnp.ldexp(jnp.float32(1), e))
    return c, s, c * s

  def usual():
    return gamma, jnp.float32(1), gamma

  return jax.lax.cond(jnp.isinf(sq_norm) & jnp.isfinite(gap), overflowed,
                      usual)


def _check_state_fits(state, config: AaligConfig, axis_name) -> None:
  """Raises at trace time when `state` was not built by this transform."""
  if not isinstance(state, ScaleByAaligState):
    raise TypeError(
        "AALIG's update needs the ScaleByAaligState its init returned, got "
        f"{type(state).__name__}.")
  rows = tuple(state.aov.shape)
  n = config.num_examples
  if rows != (n,):
    msg = (f"The state's tables hold {rows[0] if len(rows) == 1 else rows} "
           f"rows but this transform was built with num_examples={n}: the "
           "state belongs to another transform or data set.")
    if axis_name is not None and len(rows) == 1 and n % rows[0] == 0:
      msg += (" Under shard_map or pmap each replica sees only its own block "
              "of a split table: pass the optimiser state replicated (in_specs"
              " P() for it), or split the tables under jit with "
              "state_shardings.")
    raise ValueError(msg)
  if state.aov.dtype != jnp.dtype(config.table_dtype):
    raise ValueError(
        f"The state's tables are {state.aov.dtype}, but this transform was "
        f"built with table_dtype={config.table_dtype}: the state belongs to "
        "another transform.")
  has_best = state.best_loss is not None
  if has_best != (config.loss_estimate == "best_epoch"):
    raise ValueError(
        "The state was built with loss_estimate="
        f"{'best_epoch' if has_best else 'last'!r}, but this transform has "
        f"loss_estimate={config.loss_estimate!r}.")
  old = state.config
  if old is None or old == config:
    return
  diffs = [f"{f}={getattr(old, f)!r} (state) vs {getattr(config, f)!r} "
           "(transform)"
           for f in ("steps_per_epoch", "epochs_per_section")
           if getattr(old, f) != getattr(config, f)]
  if (old.lower_bound is not None and config.lower_bound is not None
      and old.lower_bound < config.lower_bound):
    diffs.append(f"lower_bound={old.lower_bound!r} (state) vs "
                 f"{config.lower_bound!r} (transform): the state's AOVs may "
                 "lie below the new bound")
  if diffs:
    raise ValueError(
        "The state was built for another AALIG schedule; its counters and "
        "AOVs would be read against the wrong sections. Differing: "
        + "; ".join(diffs) + ".")


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

  Extra args of ``update`` (keyword-only; unknown ones are ignored):
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
    max_learning_rate: the maximal step size :math:`\eta` (> 0).
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
    Paren, Poudel, Kumar, "Faking Interpolation Until You Make It" (AALIG),
    Algorithms 1-2; Berrada, Zisserman, Kumar, "Training Neural Networks for
    and by Interpolation" (ALI-G), ICML 2020.
  """
  num_examples = _checks.static_positive_int("num_examples", num_examples)
  if num_examples > _I32_MAX:
    raise ValueError(
        f"num_examples must be at most 2**31 - 1 (indices are int32), got "
        f"num_examples={num_examples}.")
  steps_per_epoch = _checks.static_positive_int(
      "steps_per_epoch", steps_per_epoch)
  epochs_per_section = _checks.static_positive_int(
      "epochs_per_section", epochs_per_section)
  steps_per_section = steps_per_epoch * epochs_per_section
  if steps_per_section > _I32_MAX:
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
  table_dtype = jnp.dtype(table_dtype)
  if not jnp.issubdtype(table_dtype, jnp.floating):
    raise ValueError(
        f"table_dtype must be a floating dtype, got table_dtype={table_dtype}.")
  # Losses beyond the table dtype's range are stored at its max (or -max).
  table_max = float(jnp.finfo(table_dtype).max)
  _checks.check_within("lower_bound", lower_bound, table_max,
                       f"the largest {table_dtype.name} table entry")
  best_epoch = loss_estimate == "best_epoch"
  num_tables = 4 if best_epoch else 3
  # Sections end when count % steps_per_section == 0; wrapping the count at
  # a multiple of that keeps them ending past 2**31 steps.
  count_period = (_I32_MAX // steps_per_section) * steps_per_section
  injected_bound = isinstance(lower_bound, jax.Array)
  config = AaligConfig(
      num_examples=num_examples, steps_per_epoch=steps_per_epoch,
      epochs_per_section=epochs_per_section, loss_estimate=loss_estimate,
      table_dtype=table_dtype.name,
      lower_bound=None if injected_bound else float(lower_bound))

  def init_fn(params):
    del params
    _checks.check_table_memory(
        num_tables * num_examples * table_dtype.itemsize)
    table = lambda v: jnp.full((num_examples,), v, table_dtype)
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    zero = lambda: jnp.zeros([], jnp.int32)
    return ScaleByAaligState(
        count=zero(),
        aov=table(lower_bound),
        aov_step=table(0.0),
        last_loss=table(jnp.nan),
        best_loss=table(jnp.nan) if best_epoch else None,
        epoch_loss_mean=f32(0.0) if best_epoch else None,
        epoch_loss_count=f32(0.0) if best_epoch else None,
        best_epoch_mean=f32(jnp.inf) if best_epoch else None,
        step_size=f32(0.0),
        reached_fraction=f32(jnp.nan),
        num_sections=zero(),
        num_invalid=zero(),
        num_skipped=zero(),
        num_clipped=zero(),
        config=config,
    )

  def update_fn(updates, state, params=None, *, losses=None, indices=None,
                mask=None, **extra_args):
    del params, extra_args
    _check_state_fits(state, config, axis_name)
    losses, indices, mask = _checks.check_batch(
        losses, indices, mask, num_examples)
    losses = losses.astype(jnp.float32)
    if jnp.iinfo(indices.dtype).bits < 32:
      # Compared in their own dtype, narrow indices would wrap num_examples.
      indices = indices.astype(jnp.int32)
    in_range = (indices >= 0) & (indices < num_examples)
    valid = mask & in_range
    # int32 after the range check, so wide indices cannot wrap into range.
    safe_idx = jnp.where(in_range, indices, 0).astype(jnp.int32)

    # Injected (traced) hyperparameters are clipped into their valid range.
    max_lr, bad_lr = _clip_injected(max_learning_rate, 0.0, jnp.inf, 0.0)
    eps_, bad_eps = _clip_injected(eps, 0.0, _F32_MAX, _F32_MAX)
    bound, bad_bound = _clip_injected(lower_bound, -table_max, table_max,
                                      -table_max)
    clipped = bad_lr | bad_eps | bad_bound

    aov_b = _tables.take(state.aov, safe_idx).astype(jnp.float32)
    n = _tables.psum(jnp.sum(valid, dtype=jnp.float32), axis_name)
    gap = _batch_mean(jnp.where(valid, losses, 0.0),
                      jnp.where(valid, aov_b, 0.0), n, axis_name)
    gap = jnp.where(n > 0, gap, 0.0)
    grads32 = optax.tree.cast(updates, jnp.float32)
    sq_norm = optax.tree.norm(grads32, squared=True)
    # inf * 0 and nan * 0 are NaN: a finite sum means a finite gradient, even
    # where its squared norm overflows float32.
    grads_finite = jnp.isfinite(sq_norm) | jnp.isfinite(
        optax.tree.sum(optax.tree.scale(0.0, grads32)))
    # A non-finite loss or gradient skips the batch: no step, nothing recorded.
    skip = ~(jnp.isfinite(gap) & grads_finite)
    coef, scale, step_size = _step_coefficients(gap, grads32, sq_norm,
                                                max_lr, eps_)
    new_updates = jax.tree.map(
        lambda g: jnp.where(skip, 0, (g * scale) * coef).astype(g.dtype),
        updates)

    record = valid & ~skip
    num_invalid = _tables.psum(jnp.sum(mask & ~in_range, dtype=jnp.int32),
                               axis_name)
    write_idx = _tables.gather(jnp.where(record, safe_idx, num_examples),
                               axis_name)
    rec_losses = _tables.gather(jnp.clip(losses, -table_max, table_max),
                                axis_name)
    last_loss = _tables.record(state.last_loss, write_idx, rec_losses)

    count = jnp.where(skip, state.count,
                      jnp.where(state.count >= count_period - 1, 0,
                                state.count + 1))
    tables = dict(aov=state.aov, aov_step=state.aov_step,
                  best_loss=state.best_loss,
                  epoch_loss_mean=state.epoch_loss_mean,
                  epoch_loss_count=state.epoch_loss_count,
                  best_epoch_mean=state.best_epoch_mean,
                  reached_fraction=state.reached_fraction,
                  num_sections=state.num_sections)

    if best_epoch:
      rec_n = _tables.psum(jnp.sum(record, dtype=jnp.float32), axis_name)
      rec_losses_b = jnp.where(record, losses, 0.0)
      rec_mean = _batch_mean(rec_losses_b, None, rec_n, axis_name)
      total = state.epoch_loss_count + rec_n
      # A convex combination of two means: no sum that could overflow.
      tables["epoch_loss_mean"] = (
          state.epoch_loss_mean * (state.epoch_loss_count
                                   / jnp.maximum(total, 1.0))
          + rec_mean * (rec_n / jnp.maximum(total, 1.0)))
      tables["epoch_loss_count"] = total

      def end_epoch(t):
        improved = ((t["epoch_loss_count"] > 0)
                    & (t["epoch_loss_mean"] < t["best_epoch_mean"]))
        t = dict(t)
        t["best_loss"] = jnp.where(improved, last_loss, t["best_loss"])
        t["best_epoch_mean"] = jnp.where(improved, t["epoch_loss_mean"],
                                         t["best_epoch_mean"])
        t["epoch_loss_mean"] = jnp.zeros_like(t["epoch_loss_mean"])
        t["epoch_loss_count"] = jnp.zeros_like(t["epoch_loss_count"])
        return t

      tables = jax.lax.cond(~skip & (count % steps_per_epoch == 0), end_epoch,
                            lambda t: t, tables)

    def end_section(t):
      t = dict(t)
      estimate = t["best_loss"] if best_epoch else last_loss
      # Two independent reductions straight from the tables (NaN compares
      # False): XLA fuses each, where a shared [N] mask would be materialised.
      num_reached = jnp.sum(estimate <= t["aov"], dtype=jnp.int32)
      num_seen = jnp.sum(~jnp.isnan(estimate), dtype=jnp.int32)
      t["reached_fraction"] = (num_reached.astype(jnp.float32)
                               / jnp.maximum(num_seen, 1).astype(jnp.float32))
      t["aov"], t["aov_step"] = update_aovs(
          t["aov"], t["aov_step"], estimate, bound)
      t["num_sections"] = optax.safe_int32_increment(t["num_sections"])
      if best_epoch:
        t["best_epoch_mean"] = jnp.full_like(t["best_epoch_mean"], jnp.inf)
      return t

    # The only O(N) work, run once a section.
    tables = jax.lax.cond(~skip & (count % steps_per_section == 0),
                          end_section,
                          lambda t: t, tables)

    new_state = ScaleByAaligState(
        count=count,
        last_loss=last_loss,
        step_size=jnp.where(skip, state.step_size, step_size),
        num_invalid=saturating_add(state.num_invalid, num_invalid),
        num_skipped=saturating_add(state.num_skipped, skip),
        num_clipped=saturating_add(state.num_clipped, clipped),
        config=config,
        **tables,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _momentum_or_identity(momentum):
  if isinstance(momentum, (int, float)) and momentum == 0:
    return optax.identity()
  return optax.trace(decay=momentum, nesterov=True)


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
    Paren, Poudel, Kumar, "Faking Interpolation Until You Make It";
    the authors' PyTorch code, Alasdair-P/alig_plus (momentum form).
  """
  _checks.check_momentum(momentum)
  _checks.check_non_negative("weight_decay", weight_decay)
  core = scale_by_aalig(
      max_learning_rate, num_examples, steps_per_epoch, epochs_per_section,
      lower_bound=lower_bound, eps=eps, loss_estimate=loss_estimate,
      table_dtype=table_dtype, axis_name=axis_name)
  trace = _momentum_or_identity(momentum)
  has_momentum = not isinstance(trace.init(None), optax.EmptyState)
  has_decay = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)

  def init_fn(params):
    return core.init(params), trace.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    core_state, trace_state = state
    grads = updates
    updates, new_core = core.update(updates, core_state, params,
                                    **extra_args)
    # Injected values outside [0, 1) and [0, inf) are clipped, and counted
    # once a step with the core's own.
    mu, bad_mu = _clip_injected(momentum, 0.0, _MAX_MOMENTUM, 0.0)
    wd, bad_wd = _clip_injected(weight_decay, 0.0, jnp.inf, 0.0)
    core_clipped = new_core.num_clipped != core_state.num_clipped
    new_core = new_core._replace(num_clipped=saturating_add(
        new_core.num_clipped, (bad_mu | bad_wd) & ~core_clipped))
    # A batch the core skipped must move nothing. The core's update is then
    # zero, so a decay of 1 keeps the momentum buffer as it was; arithmetic,
    # not a select between old and new buffers, which would make XLA copy
    # the donated buffer at every step.
    skipped = new_core.num_skipped != core_state.num_skipped
    if has_momentum:
      decay = jnp.where(skipped, 1.0, mu)
      # optax.trace(momentum, nesterov=True), with that decay.
      new_trace = jax.tree.map(
          lambda g, t: g + decay.astype(t.dtype) * t, updates,
          trace_state.trace)
      updates = jax.tree.map(lambda g, t: g + mu * t, updates, new_trace)
      trace_state = optax.TraceState(trace=new_trace)
    if has_decay:
      if params is None:
        raise ValueError("aalig with weight_decay > 0 needs params in update.")
      updates = optax.tree.add_scale(
          updates, new_core.step_size * wd, params)
    updates = jax.tree.map(
        lambda u, g: jnp.where(skipped, 0, -u).astype(g.dtype), updates,
        grads)
    return updates, (new_core, trace_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_aalig_states(state) -> list[ScaleByAaligState]:
  return [
      s for s in jax.tree.leaves(
          state, is_leaf=lambda x: isinstance(x, ScaleByAaligState))
      if isinstance(s, ScaleByAaligState)
  ]


def _the_aalig_state(state) -> ScaleByAaligState:
  found = _find_aalig_states(state)
  if len(found) != 1:
    raise ValueError(
        f"Expected exactly one ScaleByAaligState in the optimiser state, found "
        f"{len(found)}.")
  return found[0]


def aalig_metrics(state) -> dict[str, jax.Array]:
  """The quantities the paper plots, read from an optimiser state for logging.

  Args:
    state: any optimiser state holding one :class:`ScaleByAaligState`
      (inside ``optax.chain``, ``apply_if_finite``, ``inject_hyperparams``...).

  Returns:
    A dict of scalar arrays: ``step_size`` (gamma of the last step),
    ``mean_aov`` (over all examples), ``reached_fraction`` (share of seen
    examples whose AOV was reached at the last section end, NaN before the
    first), ``sections_done`` and ``num_invalid`` (rows dropped for an
    out-of-range index).

  Example:
    >>> import jax.numpy as jnp
    >>> from aalig_optax import aalig, aalig_metrics
    >>> state = aalig(0.1, 10, 1, 1).init(jnp.zeros(2))
    >>> {k: float(v) for k, v in aalig_metrics(state).items()}["mean_aov"]
    0.0
  """
  s = _the_aalig_state(state)
  return dict(
      step_size=s.step_size,
      mean_aov=jnp.mean(s.aov.astype(jnp.float32)),
      reached_fraction=s.reached_fraction,
      sections_done=s.num_sections,
      num_invalid=s.num_invalid,
      num_skipped=s.num_skipped,
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
  s = _the_aalig_state(state)
  n = int(np.asarray(jax.device_get(s.num_invalid)).max())
  if n:
    raise ValueError(
        f"{'at least ' if n == _I32_MAX else ''}{n} batch row(s) had an "
        "index outside [0, num_examples="
        f"{s.aov.shape[-1]}) and were dropped: neither their loss nor their "
        "AOV entered a step size, and nothing was recorded for them. Check the "
        "data pipeline's example indices.")


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
  s = _the_aalig_state(state)
  n = int(np.asarray(jax.device_get(s.num_clipped)).max())
  if n:
    raise ValueError(
        f"{n} step(s) used an injected hyperparameter outside its valid range"
        ": it was clipped into the range (see check_hyperparams's docstring)."
        " Check the values written into the optimiser state's hyperparams.")
