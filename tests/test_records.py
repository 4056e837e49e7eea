"""The records: which batch rows write their loss to the loss table, where.

Specifies that a masked (padding) row is never recorded, that a repeated
index keeps its lowest loss (also when its step ends a section), that an
index out of range is refused eagerly and, under `jit`, dropped, counted
and reported (also under `shard_map` and `lax.scan`), that every index
dtype reaches every valid row, that losses beyond a 16-bit table are
clipped to it, and what a batch in a rare case (an overflow, a non-finite
loss or gradient) records.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aalig_optax
import aalig_optax as ao
from aalig_optax import aalig
from aalig_optax import check_indices
from aalig_optax import scale_by_aalig
from tests import reference
from tests.problems import (EPS, F32, MAX_LR, N, TABLE_N, make_problem,
                            one_step, run_update)


def test_mask_excludes_padding_rows():
  x, y = make_problem(3)
  opt = ao.scale_by_aalig(0.5, N, 2, 1)
  ref = reference.NumpyAalig(0.5, N, 2, 1, momentum=0.0)
  idx = np.array([0, 1, 2, 3, 4, 5, 6, 6], np.int32)
  mask = np.array([1, 1, 1, 1, 1, 0, 0, 0], bool)
  losses = jnp.asarray(np.linspace(0.5, 4.0, 8), jnp.float32)
  grads = jnp.ones(3)
  state = opt.init(None)
  _, state = jax.jit(opt.update)(grads, state, losses=losses, indices=idx,
                                 mask=mask)
  ref.step(np.zeros(3), np.ones(3), np.asarray(losses), idx, mask)
  np.testing.assert_allclose(state.step_size, ref.step_sizes[-1], rtol=1e-6)
  np.testing.assert_array_equal(np.isnan(state.last_loss),
                                np.isnan(ref.last_loss))
  assert np.isnan(state.last_loss[5]) and np.isnan(state.last_loss[6])


def test_all_masked_batch_takes_no_step_and_records_nothing():
  opt = ao.scale_by_aalig(0.5, N, 2, 1)
  state = opt.init(None)
  updates, state = opt.update(
      jnp.ones(3), state, losses=jnp.ones(4), indices=jnp.arange(4),
      mask=jnp.zeros(4, bool))
  chex.assert_trees_all_close(updates, jnp.zeros(3))
  assert bool(jnp.all(jnp.isnan(state.last_loss)))


# Repeated indices.

@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_duplicated_indices_count_per_row_and_record_the_lowest(jit):
  tx = scale_by_aalig(MAX_LR, TABLE_N, 100, 1)
  s = tx.init(None)._replace(aov=jnp.arange(TABLE_N, dtype=jnp.float32) / 10)
  losses = np.array([2.0, 0.5, 5.0, 1.0], F32)
  idx = np.array([3, 3, 3, 4])
  grads = (3.0, 0.0)
  _, s = one_step(losses, idx, jit=jit, tx=tx, state=s, grads=grads)
  # Means over the 4 rows, 3 of which are example 3 (aov 0.3), one 4 (0.4).
  gap = losses.mean() - (3 * 0.3 + 0.4) / 4
  assert float(s.step_size) == pytest.approx(gap / (9 + EPS), rel=1e-6)
  assert float(s.last_loss[3]) == 0.5 and float(s.last_loss[4]) == 1.0


def _lowest_reference(table, idx, values):
  """What `_tables.write(..., lowest=True)` must write, the slow way: per
  index, the lowest value (-0 as +0); rows at an index >= the table's size
  dropped."""
  out = np.asarray(table).copy()
  values = np.asarray(values, np.float32).astype(out.dtype)
  for i in np.unique(idx):
    if i < out.shape[0]:
      out[i] = values[idx == i].min() + out.dtype.type(0)
  return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 40, 300])
def test_write_lowest_keeps_each_index_lowest_value(dtype, rows):
  """Duplicated indices in a batch (with -0, +0, equal and unequal values)
  write the lowest value of each index, bit for bit; the rest of the table
  is untouched."""
  from aalig_optax import _tables
  rng = np.random.default_rng(rows)
  n = 6 if rows < 100 else 50
  write = jax.jit(lambda t, i, v: _tables.write(t, i, v, lowest=True))
  for _ in range(20):
    idx = np.minimum(rng.integers(0, n + 2, rows), n).astype(np.int32)
    vals = rng.choice(np.array([0.0, -0.0, 1.0, -1.0, 2.5, 1e30],
                               np.float32), rows)
    vals = np.where(rng.random(rows) < 0.3, rng.standard_normal(rows),
                    vals).astype(np.float32)
    table = jnp.asarray(rng.standard_normal(n), dtype)
    want = _lowest_reference(table, idx, vals)
    got = write(table, jnp.asarray(idx), jnp.asarray(vals))
    bits = np.uint16 if jnp.dtype(dtype).itemsize == 2 else np.uint32
    np.testing.assert_array_equal(np.asarray(got).view(bits), want.view(bits))


@pytest.mark.parametrize("loss_estimate", ["last", "best_epoch"])
@pytest.mark.parametrize("rows", [40, 300])
def test_step_resolves_repeated_indices_before_the_section_end(
    rows, loss_estimate):
  """A batch repeating indices with different losses records each index's
  lowest loss, whether its step ends a section (which must read the resolved
  table) or not; all pairs of rows (40) or a sort (300)."""
  n = 30
  rng = np.random.default_rng(rows)
  idx = rng.integers(0, n, rows).astype(np.int32)
  losses = rng.uniform(0.5, 3.0, rows).astype(np.float32)
  want = np.full(n, np.nan, np.float32)
  for i in np.unique(idx):
    want[i] = losses[idx == i].min()
  for steps_per_section in (1, 10**6):  # a section end at this step, or not
    tx = ao.scale_by_aalig(0.5, n, steps_per_section, 1,
                           loss_estimate=loss_estimate)
    state = tx.init(None)
    _, new = jax.jit(tx.update)(jnp.ones(3), state, losses=jnp.asarray(losses),
                                indices=jnp.asarray(idx))
    np.testing.assert_array_equal(new.last_loss, want)
    if steps_per_section == 1:
      estimate = want if loss_estimate == "last" else new.best_loss
      if loss_estimate == "best_epoch":
        np.testing.assert_array_equal(new.best_loss, want)
      aov, _ = ao.update_aovs(state.aov, state.aov_step, estimate)
      np.testing.assert_array_equal(ao.current_aovs(new)[0], aov)
      assert int(new.num_sections) == 1
    else:
      np.testing.assert_array_equal(ao.current_aovs(new)[0], state.aov)


# Indices out of range or of any integer dtype.

def test_out_of_range_index_raises_in_eager_mode_naming_it():
  opt = ao.aalig(0.1, 10, 2, 1)
  params = {"w": jnp.ones(2)}
  state = opt.init(params)
  for bad in (10, -1, 2**31 - 1):
    with pytest.raises(ValueError, match=rf"\[{bad}\]"):
      opt.update(params, state, params, losses=jnp.ones(2),
                 indices=jnp.array([0, bad]))


def test_out_of_range_index_under_jit_is_dropped_counted_and_reported():
  opt = ao.scale_by_aalig(0.5, 4, 100, 1)
  state = opt.init(None)
  update = jax.jit(opt.update)
  losses = jnp.array([1.0, 9.0, 2.0, 9.0])
  _, state = update(jnp.ones(1), state, losses=losses,
                    indices=jnp.array([0, 4, 3, -1]))
  # The bad rows are not used: the gap is the mean of rows 0 and 2.
  np.testing.assert_allclose(state.step_size, min(1.5 / (1 + 1e-5), 0.5))
  np.testing.assert_array_equal(np.isnan(state.last_loss),
                                [False, True, True, False])
  assert int(state.num_invalid) == 2
  with pytest.raises(ValueError, match="2 batch row"):
    ao.check_indices(state)
  ao.check_indices(opt.init(None))  # a clean state passes


@pytest.mark.parametrize("bad", [TABLE_N, TABLE_N + 1000, -1, -TABLE_N,
                                 2**31 - 1],
                         ids=["N", "N+1000", "-1", "-N", "int32max"])
def test_out_of_range_index_under_jit_is_counted_and_not_written(bad):
  tx = scale_by_aalig(MAX_LR, TABLE_N, 100, 1)
  state = tx.init(None)
  step = jax.jit(lambda s, i: tx.update(
      jnp.ones(2), s, losses=jnp.array([4.0, 7.0]), indices=i)[1])
  state = step(state, jnp.array([5, bad], jnp.int32))
  last = np.asarray(state.last_loss)
  # Only row 0 was recorded; nothing at 0, N-1 or any clamped position.
  assert float(last[5]) == 4.0 and np.sum(~np.isnan(last)) == 1
  assert int(state.num_invalid) == 1
  # Row 1 entered no mean: gap = 4 - 0 over one row.
  assert float(state.step_size) == pytest.approx(min(4 / (2 + EPS), MAX_LR))
  with pytest.raises(ValueError, match=r"^1 batch row\(s\) had an index "):
    check_indices(state)
  # Through a long scan, inside apply_if_finite and a chain: the exact total.
  opt = optax.apply_if_finite(aalig(0.1, TABLE_N, 4, 2), 10)
  params = jnp.zeros(2)

  def body(carry, i):
    s = carry
    idx = jnp.array([i % TABLE_N, jnp.where(i % 3 == 0, bad, i % TABLE_N)],
                    jnp.int32)
    _, s = opt.update(jnp.ones(2), s, params, losses=jnp.array([1.0, 1.0]),
                      indices=idx)
    return s, None

  final, _ = jax.lax.scan(body, opt.init(params), jnp.arange(30))
  with pytest.raises(ValueError, match=r"^10 batch row\(s\)"):
    check_indices(final)
  assert int(aalig_optax.aalig_metrics(final)["num_invalid"]) == 10


def test_out_of_range_index_under_shard_map_is_counted_on_every_replica():
  devices = jax.local_devices()[:2]
  if len(devices) < 2:
    pytest.skip("needs 2 devices")
  mesh = jax.sharding.Mesh(np.array(devices), ("b",))
  P = jax.sharding.PartitionSpec
  tx = scale_by_aalig(MAX_LR, TABLE_N, 100, 1, axis_name="b")

  def per_replica(s, l, i):
    s = tx.update(jnp.ones(2), s, losses=l, indices=i)[1]
    return jax.tree.map(lambda x: x[None], s)  # one copy per replica

  step = jax.jit(jax.shard_map(per_replica, mesh=mesh,
                               in_specs=(P(), P("b"), P("b")),
                               out_specs=P("b")))
  state = step(tx.init(None), jnp.ones(4), jnp.array([0, TABLE_N, 1, -3]))
  np.testing.assert_array_equal(np.asarray(state.num_invalid), [2, 2])
  last = np.asarray(state.last_loss)
  np.testing.assert_array_equal(last[0], last[1])  # replicas agree
  assert np.sum(~np.isnan(last[0])) == 2
  with pytest.raises(ValueError, match=r"^2 batch row\(s\)"):
    check_indices(state)


def test_int64_index_wraps_at_jit_boundary():
  """Documents JAX's own behaviour (x64 off), which no optimiser can see.

  `jax.jit` converts an int64 argument to int32 with wraparound before the
  traced code runs, so feed indices as int32 (or enable x64). Eagerly the
  same index is refused, because the value is checked before conversion.
  """
  assert int(jax.jit(lambda i: i)(np.array([2**32 + 1], np.int64))[0]) == 1
  with pytest.raises(ValueError, match="4294967297"):
    one_step(np.ones(1, F32), np.array([2**32 + 1], np.int64))


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("dtype,n", [(np.int8, 300), (np.uint8, 300),
                                     (np.int16, 40_000), (np.uint16, 70_000)])
def test_narrow_index_dtypes_use_every_valid_row(dtype, n, jit):
  tx = scale_by_aalig(1.0, num_examples=n, steps_per_epoch=100,
                      epochs_per_section=1)
  top = int(np.iinfo(dtype).max)
  indices = np.array([0, 1, top - 1, top], dtype)
  losses = jnp.array([1.0, 2.0, 3.0, 4.0])
  _, state = run_update(tx, tx.init(None), jnp.ones(2), losses, indices,
                        jit=jit)
  assert int(state.num_invalid) == 0
  check_indices(state)
  np.testing.assert_array_equal(
      np.asarray(state.last_loss)[indices.astype(np.int64)], [1, 2, 3, 4])
  assert int(np.sum(~np.isnan(np.asarray(state.last_loss)))) == 4


# Loss values and rare cases.

@pytest.mark.parametrize("table_dtype", [jnp.float16, jnp.bfloat16],
                         ids=["float16", "bfloat16"])
def test_losses_beyond_a_16_bit_table_are_clipped(table_dtype):
  tmax = float(jnp.finfo(table_dtype).max)
  big = 1e5 if table_dtype == jnp.float16 else 3.4e38
  _, s = one_step(np.array([big, -big], F32), np.array([0, 1]),
                  table_dtype=table_dtype)
  np.testing.assert_array_equal(
      np.asarray(s.last_loss[:2]).astype(np.float64), [tmax, -tmax])


_RARE_CASES = {
    "usual": ({"a": jnp.full((3,), 0.5), "b": jnp.array([1.0])},
              [2.0, 3.0]),
    "overflowing norm": ({"a": jnp.full((3,), 3e19), "b": jnp.array([1.0])},
                         [3e38, 3e38]),
    "overflowing sum": ({"a": jnp.full((3,), 0.5), "b": jnp.array([1.0])},
                        [3e38, 3e38]),
    "nan loss": ({"a": jnp.full((3,), 0.5), "b": jnp.array([1.0])},
                 [1.0, np.nan]),
    "inf gradient": ({"a": jnp.array([0.5, np.inf, 0.5]),
                      "b": jnp.array([1.0])}, [2.0, 3.0]),
}


_SKIPPED = ("nan loss", "inf gradient")


@pytest.mark.parametrize("section_end", [False, True])
@pytest.mark.parametrize("case", list(_RARE_CASES))
def test_rare_case_batch_is_recorded_unless_skipped(case, section_end):
  """A batch in the rare case (an overflow, a non-finite loss or gradient):
  a skipped batch records nothing and ends no section; any other is
  recorded like a usual one (each index its lowest loss), and a section
  that ends with it sees its losses."""
  grads, losses = _RARE_CASES[case]
  # Index 2 twice, with different losses: the lowest is kept.
  losses = jnp.asarray(losses + [5.0, 4.0], jnp.float32)
  indices = jnp.array([0, 1, 2, 2])
  tx = aalig(1.0, num_examples=4, steps_per_epoch=1 if section_end else 10,
             epochs_per_section=1)
  params = jax.tree.map(jnp.zeros_like, grads)
  updates, (core, _) = jax.jit(lambda s, g: tx.update(
      g, s, params, losses=losses, indices=indices))(tx.init(params), grads)
  skipped = case in _SKIPPED
  assert int(core.num_skipped) == int(skipped)
  assert int(core.count) == int(not skipped)
  assert int(core.num_sections) == int(section_end and not skipped)
  last = np.asarray(core.last_loss)
  if skipped:
    assert np.all(np.isnan(last))
    assert not any(np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
  else:
    np.testing.assert_array_equal(last, np.float32(
        [losses[0], losses[1], 4.0, np.nan]))
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
    # The section end saw the recorded losses: their AOVs moved.
    aov, _ = ao.current_aovs(core)
    assert np.any(np.asarray(aov)[:3] != 0.0) == section_end
