"""AALIG (Adaptive ALI-G): a Polyak step size with per-example optimal values."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from aalig_optax import _checks

_LOSS_ESTIMATES = ("last", "best_epoch")


class ScaleByAaligState(NamedTuple):
  """State of :func:`scale_by_aalig`. N is `num_examples`, T the `table_dtype`.

  Attributes:
    count: int32 [], steps taken.
    aov: T [N], approximate optimal value (AOV) of each example's loss.
    aov_step: T [N], the last increase applied to each AOV.
    last_loss: T [N], the loss last recorded per example; NaN if never seen.
    best_loss: T [N] with ``loss_estimate="best_epoch"``, else None: each
      example's loss in the section's best epoch so far.
    epoch_loss_sum: float32 [] (best_epoch only, else None), sum of the
      losses recorded in the current epoch.
    epoch_loss_count: float32 [] (best_epoch only, else None), their number.
    best_epoch_mean: float32 [] (best_epoch only, else None), lowest epoch
      mean loss in the current section; inf at a section's start.
    step_size: float32 [], the step size gamma of the last step.
    reached_fraction: float32 [], share of seen examples whose AOV was reached
      at the last section end; NaN before the first section end.
    num_sections: int32 [], section ends passed.
    num_invalid: int32 [], rows dropped so far because their index was outside
      [0, num_examples) (see :func:`check_indices`).
    num_skipped: int32 [], batches skipped because a loss or the gradient was
      not finite; a skipped batch changes nothing else in the state.
  """

  count: chex.Array
  aov: chex.Array
  aov_step: chex.Array
  last_loss: chex.Array
  best_loss: Optional[chex.Array]
  epoch_loss_sum: Optional[chex.Array]
  epoch_loss_count: Optional[chex.Array]
  best_epoch_mean: Optional[chex.Array]
  step_size: chex.Array
  reached_fraction: chex.Array
  num_sections: chex.Array
  num_invalid: chex.Array
  num_skipped: chex.Array


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


def _record(table, write_idx, values):
  """Writes `values` at `write_idx`; out-of-range entries are dropped.

  Duplicated indices keep their lowest value: a deterministic choice, unlike a
  plain scatter-set whose winner XLA leaves unspecified. The rows are sorted by
  (index, value) and every row writes its index's lowest value, so one plain
  scatter-set suffices whoever wins. (A scatter-min would do, but XLA
  partitions one into a replicated table from a sharded batch as an
  all-reduce-min of the whole table, O(N) per step, which also turns the NaN
  of never-seen examples into inf.)
  """
  values = values.astype(table.dtype)
  write_idx, values = _unshard_explicit(write_idx), _unshard_explicit(values)
  idx, values = jax.lax.sort((write_idx, values), num_keys=2)
  rows = jnp.arange(idx.shape[0])
  first = (rows == 0) | (idx != jnp.roll(idx, 1))
  lowest = values[jax.lax.cummax(jnp.where(first, rows, 0))]
  return table.at[idx].set(lowest, mode="drop",
                           **_explicit_out_sharding(table))


def _take(table, idx):
  """table[idx], placed like `idx` when on a mesh with Explicit axes."""
  return table.at[idx].get(**_explicit_out_sharding(idx))


def _unshard_explicit(x):
  """x replicated (it is batch-sized) when on a mesh with Explicit axes."""
  kw = _explicit_out_sharding(x)
  if not kw:
    return x
  replicated = jax.sharding.NamedSharding(kw["out_sharding"].mesh,
                                          jax.sharding.PartitionSpec())
  return jax.sharding.reshard(x, replicated)


def _explicit_out_sharding(x):
  """{"out_sharding": x's sharding} on a mesh with Explicit axes, else {}.

  With `jax.make_mesh`'s default (Explicit) axes, JAX asks gathers and
  scatters whose operand and indices are sharded for their output sharding;
  elsewhere nothing is passed and the program is unchanged.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  explicit = getattr(jax.sharding.AxisType, "Explicit", None)
  if explicit is None or explicit not in getattr(mesh, "axis_types", ()):
    return {}
  return {"out_sharding": sharding}


def _gather(x, axis_name):
  """Every replica's `x`, concatenated in replica order.

  A psum of each replica's rows placed in a zero block (exact, and small: the
  batch) rather than an all_gather, whose result shard_map types as varying:
  the tables written from it must stay replicated under `check_vma=True`.
  """
  if axis_name is None:
    return x
  n = jax.lax.axis_size(axis_name)
  placed = jnp.zeros((n,) + x.shape, x.dtype).at[
      jax.lax.axis_index(axis_name)].set(x)
  return jax.lax.psum(placed, axis_name).reshape((-1,) + x.shape[1:])


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


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
  if num_examples > np.iinfo(np.int32).max:
    raise ValueError(
        f"num_examples must be at most 2**31 - 1 (indices are int32), got "
        f"num_examples={num_examples}.")
  steps_per_epoch = _checks.static_positive_int(
      "steps_per_epoch", steps_per_epoch)
  epochs_per_section = _checks.static_positive_int(
      "epochs_per_section", epochs_per_section)
  _checks.check_positive("max_learning_rate", max_learning_rate)
  _checks.check_non_negative("eps", eps)
  _checks.check_finite("lower_bound", lower_bound)
  if loss_estimate not in _LOSS_ESTIMATES:
    raise ValueError(
        f"loss_estimate must be one of {_LOSS_ESTIMATES}, got "
        f"loss_estimate={loss_estimate!r}.")
  table_dtype = jnp.dtype(table_dtype)
  if not jnp.issubdtype(table_dtype, jnp.floating):
    raise ValueError(
        f"table_dtype must be a floating dtype, got table_dtype={table_dtype}.")
  best_epoch = loss_estimate == "best_epoch"
  steps_per_section = steps_per_epoch * epochs_per_section
  num_tables = 4 if best_epoch else 3
  # Losses beyond the table dtype's range are stored at its max (or -max).
  table_max = float(jnp.finfo(table_dtype).max)

  def init_fn(params):
    del params
    _checks.check_table_memory(
        num_tables * num_examples * table_dtype.itemsize)
    table = lambda v: jnp.full((num_examples,), v, table_dtype)
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    return ScaleByAaligState(
        count=jnp.zeros([], jnp.int32),
        aov=table(lower_bound),
        aov_step=table(0.0),
        last_loss=table(jnp.nan),
        best_loss=table(jnp.nan) if best_epoch else None,
        epoch_loss_sum=f32(0.0) if best_epoch else None,
        epoch_loss_count=f32(0.0) if best_epoch else None,
        best_epoch_mean=f32(jnp.inf) if best_epoch else None,
        step_size=f32(0.0),
        reached_fraction=f32(jnp.nan),
        num_sections=jnp.zeros([], jnp.int32),
        num_invalid=jnp.zeros([], jnp.int32),
        num_skipped=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None, *, losses=None, indices=None,
                mask=None, **extra_args):
    del params, extra_args
    losses, indices, mask = _checks.check_batch(
        losses, indices, mask, num_examples)
    losses = losses.astype(jnp.float32)
    in_range = (indices >= 0) & (indices < num_examples)
    valid = mask & in_range
    # int32 after the range check, so wide indices cannot wrap into range.
    safe_idx = jnp.where(in_range, indices, 0).astype(jnp.int32)

    aov_b = _take(state.aov, safe_idx).astype(jnp.float32)
    n = _psum(jnp.sum(valid, dtype=jnp.float32), axis_name)
    loss_sum = _psum(jnp.sum(jnp.where(valid, losses, 0.0)), axis_name)
    aov_sum = _psum(jnp.sum(jnp.where(valid, aov_b, 0.0)), axis_name)
    gap = (loss_sum - aov_sum) / jnp.maximum(n, 1.0)
    # Finite losses whose float32 sum overflows: the same mean, summed scaled.
    scaled_gap = _psum(jnp.sum(jnp.where(
        valid, losses / jnp.maximum(n, 1.0) - aov_b / jnp.maximum(n, 1.0),
        0.0)), axis_name)
    gap = jnp.where(jnp.isfinite(gap), gap, scaled_gap)
    gap = jnp.where(n > 0, gap, 0.0)
    sq_norm = optax.tree.norm(
        optax.tree.cast(updates, jnp.float32), squared=True)
    # A non-finite loss or gradient skips the batch: no step, nothing recorded.
    skip = ~(jnp.isfinite(gap) & jnp.isfinite(sq_norm))
    step_size = polyak_step_size(gap, sq_norm, max_learning_rate, eps)
    new_updates = jax.tree.map(
        lambda g: jnp.where(skip, 0, step_size * g).astype(g.dtype), updates)

    record = valid & ~skip
    num_invalid = _psum(jnp.sum(mask & ~in_range, dtype=jnp.int32), axis_name)
    write_idx = _gather(jnp.where(record, safe_idx, num_examples), axis_name)
    rec_losses = _gather(jnp.clip(losses, -table_max, table_max), axis_name)
    last_loss = _record(state.last_loss, write_idx, rec_losses)

    count = jnp.where(skip, state.count,
                      optax.safe_int32_increment(state.count))
    tables = dict(aov=state.aov, aov_step=state.aov_step,
                  best_loss=state.best_loss,
                  epoch_loss_sum=state.epoch_loss_sum,
                  epoch_loss_count=state.epoch_loss_count,
                  best_epoch_mean=state.best_epoch_mean,
                  reached_fraction=state.reached_fraction,
                  num_sections=state.num_sections)

    if best_epoch:
      rec_sum = _psum(jnp.sum(jnp.where(record, losses, 0.0)), axis_name)
      rec_n = _psum(jnp.sum(record, dtype=jnp.float32), axis_name)
      tables["epoch_loss_sum"] = state.epoch_loss_sum + rec_sum
      tables["epoch_loss_count"] = state.epoch_loss_count + rec_n

      def end_epoch(t):
        mean = t["epoch_loss_sum"] / t["epoch_loss_count"]
        improved = mean < t["best_epoch_mean"]  # False for an empty epoch.
        t = dict(t)
        t["best_loss"] = jnp.where(improved, last_loss, t["best_loss"])
        t["best_epoch_mean"] = jnp.where(improved, mean, t["best_epoch_mean"])
        t["epoch_loss_sum"] = jnp.zeros_like(t["epoch_loss_sum"])
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
          t["aov"], t["aov_step"], estimate, lower_bound)
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
        num_invalid=state.num_invalid + num_invalid,
        num_skipped=state.num_skipped + skip.astype(jnp.int32),
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
    # A batch the core skipped must move nothing. The core's update is then
    # zero, so a decay of 1 keeps the momentum buffer as it was; arithmetic,
    # not a select between old and new buffers, which would make XLA copy
    # the donated buffer at every step.
    skipped = new_core.num_skipped != core_state.num_skipped
    if has_momentum:
      decay = jnp.where(skipped, 1.0, momentum)
      # optax.trace(momentum, nesterov=True), with that decay.
      new_trace = jax.tree.map(
          lambda g, t: g + decay.astype(t.dtype) * t, updates,
          trace_state.trace)
      updates = jax.tree.map(lambda g, t: g + momentum * t, updates,
                             new_trace)
      trace_state = optax.TraceState(trace=new_trace)
    if has_decay:
      if params is None:
        raise ValueError("aalig with weight_decay > 0 needs params in update.")
      updates = optax.tree.add_scale(
          updates, new_core.step_size * weight_decay, params)
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
        f"{n} batch row(s) had an index outside [0, num_examples="
        f"{s.aov.shape[-1]}) and were dropped: neither their loss nor their "
        "AOV entered a step size, and nothing was recorded for them. Check the "
        "data pipeline's example indices.")
