"""The optimiser's own edge cases.

Each test names the behaviour a user hit: narrow index dtypes, a state that
does not fit its transform, hyperparameters the tables cannot hold, counters
at their limits, overflowing norms and sums, and injected hyperparameters
outside their range.
"""

from __future__ import annotations

import functools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aalig_optax as ao
from aalig_optax import aalig
from aalig_optax import aalig_metrics
from aalig_optax import check_hyperparams
from aalig_optax import check_indices
from aalig_optax import scale_by_aalig

F32_MAX = float(np.finfo(np.float32).max)
I32_MAX = int(np.iinfo(np.int32).max)


def _update(tx, state, grads, losses, indices, *, jit=True, **kw):
  def f(s, g, l, i):
    return tx.update(g, s, None, losses=l, indices=i, **kw)
  return (jax.jit(f) if jit else f)(state, grads, losses, indices)


# 1. Narrow index dtypes ----------------------------------------------------

@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("dtype,n", [(np.int8, 300), (np.uint8, 300),
                                     (np.int16, 40_000), (np.uint16, 70_000)])
def test_narrow_index_dtypes_use_every_valid_row(dtype, n, jit):
  tx = scale_by_aalig(1.0, num_examples=n, steps_per_epoch=100,
                      epochs_per_section=1)
  top = int(np.iinfo(dtype).max)
  indices = np.array([0, 1, top - 1, top], dtype)
  losses = jnp.array([1.0, 2.0, 3.0, 4.0])
  _, state = _update(tx, tx.init(None), jnp.ones(2), losses, indices, jit=jit)
  assert int(state.num_invalid) == 0
  check_indices(state)
  np.testing.assert_array_equal(
      np.asarray(state.last_loss)[indices.astype(np.int64)], [1, 2, 3, 4])
  assert int(np.sum(~np.isnan(np.asarray(state.last_loss)))) == 4


# 2. A state that does not fit the transform --------------------------------

def _state_for(**kw):
  args = dict(max_learning_rate=1.0, num_examples=100, steps_per_epoch=10,
              epochs_per_section=2)
  args.update(kw)
  return scale_by_aalig(**args).init(None)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("other,words", [
    (dict(num_examples=120), ["120", "100", "num_examples"]),
    (dict(table_dtype=jnp.bfloat16), ["bfloat16", "float32"]),
    (dict(loss_estimate="best_epoch"), ["loss_estimate", "best_epoch"]),
    (dict(steps_per_epoch=5), ["steps_per_epoch", "5", "10"]),
    (dict(epochs_per_section=3), ["epochs_per_section", "3", "2"]),
])
def test_state_of_another_transform_is_refused(other, words, jit):
  tx = scale_by_aalig(1.0, num_examples=100, steps_per_epoch=10,
                      epochs_per_section=2)
  foreign = _state_for(**other)
  with pytest.raises(ValueError) as e:
    _update(tx, foreign, jnp.ones(2), jnp.ones(2), jnp.arange(2), jit=jit)
  for w in words:
    assert w in str(e.value)


def test_state_with_a_lower_bound_at_or_above_the_new_one_is_accepted():
  # The AOVs of the old state are all >= its bound >= the new bound.
  tx = scale_by_aalig(1.0, num_examples=100, steps_per_epoch=10,
                      epochs_per_section=2, lower_bound=-1.0)
  state = _state_for(lower_bound=0.0)
  _, new = _update(tx, state, jnp.ones(2), jnp.ones(2), jnp.arange(2))
  np.testing.assert_allclose(float(new.step_size), 1 / (2 + 1e-5), rtol=1e-6)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_aovs_below_a_raised_lower_bound_are_read_at_the_bound(jit):
  """A state whose AOVs lie below this transform's bound (built with a lower
  one, or an injected bound that rose) is read with them raised to it."""
  tx = scale_by_aalig(1.0, num_examples=100, steps_per_epoch=10,
                      epochs_per_section=2, lower_bound=0.5)
  state = _state_for(lower_bound=-1.0)
  _, new = _update(tx, state, jnp.ones(2), jnp.ones(2), jnp.arange(2),
                   jit=jit)
  np.testing.assert_allclose(float(new.step_size), 0.5 / (2 + 1e-5),
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(new.aov)[:2], 0.5)


@pytest.mark.skipif(jax.device_count() < 8,
                    reason="needs 8 (simulated) devices; see conftest")
def test_split_tables_under_shard_map_are_refused_in_words():
  n_dev = 8
  mesh = jax.make_mesh((n_dev,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  P = jax.sharding.PartitionSpec
  tx = scale_by_aalig(1.0, num_examples=64, steps_per_epoch=4,
                      epochs_per_section=1, axis_name="data")
  state = tx.init(None)
  specs = jax.tree.map(lambda _: P(), state)
  specs = specs._replace(aov=P("data"), aov_step=P("data"),
                         last_loss=P("data"))

  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(specs, P("data"), P("data")),
                     out_specs=specs)
  def step(s, l, i):
    return tx.update(jnp.ones(2), s, None, losses=l, indices=i)[1]

  with pytest.raises(ValueError, match="num_examples=64") as e:
    jax.jit(step)(state, jnp.ones(16), jnp.arange(16))
  assert "8 rows" in str(e.value) and "replicated" in str(e.value)


# 3. Hyperparameters the tables cannot hold ---------------------------------

@pytest.mark.parametrize("kwargs,name", [
    (dict(lower_bound=-1e5, table_dtype=jnp.float16), "lower_bound"),
    (dict(lower_bound=-1e39), "lower_bound"),
    (dict(lower_bound=1e39), "lower_bound"),
    (dict(steps_per_epoch=2**20, epochs_per_section=2**12),
     "epochs_per_section"),
    (dict(eps=float("inf")), "eps"),
    (dict(eps=float("nan")), "eps"),
])
@pytest.mark.parametrize("make", [scale_by_aalig, aalig])
def test_unrepresentable_hyperparameters_are_refused(kwargs, name, make):
  args = dict(num_examples=10, steps_per_epoch=10, epochs_per_section=1)
  args.update(kwargs)
  with pytest.raises(ValueError, match=name):
    make(1.0, **args)


def test_largest_representable_lower_bound_is_accepted():
  tx = scale_by_aalig(1.0, 10, 1, 1, lower_bound=-65504.0,
                      table_dtype=jnp.float16)
  assert float(tx.init(None).aov[0]) == -65504.0


# 4. Counters at their limits -----------------------------------------------

def test_sections_keep_ending_past_2_31_steps():
  spe, eps_ = 3, 7  # 21 steps a section: 2**31 - 1 is not a multiple of it.
  tx = scale_by_aalig(1.0, num_examples=4, steps_per_epoch=spe,
                      epochs_per_section=eps_)
  section = spe * eps_
  state = tx.init(None)
  # Just before the last section end that fits below 2**31.
  last_end = (I32_MAX // section) * section
  state = state._replace(count=jnp.asarray(last_end - 1, jnp.int32))
  ends = []
  step = jax.jit(lambda s: tx.update(jnp.ones(2), s, None,
                                     losses=jnp.ones(2),
                                     indices=jnp.arange(2))[1])
  for _ in range(2 * section + 1):
    new = step(state)
    ends.append(int(new.num_sections) - int(state.num_sections))
    state = new
  # A section ends at the first step, then every `section` steps.
  assert [i for i, e in enumerate(ends) if e] == [0, section, 2 * section]
  assert 0 <= int(state.count) < I32_MAX


def test_counters_saturate_instead_of_wrapping():
  tx = scale_by_aalig(1.0, num_examples=4, steps_per_epoch=2,
                      epochs_per_section=1)
  state = tx.init(None)._replace(
      num_invalid=jnp.asarray(I32_MAX - 1, jnp.int32),
      num_skipped=jnp.asarray(I32_MAX, jnp.int32))
  step = jax.jit(lambda s, l: tx.update(jnp.ones(2), s, None, losses=l,
                                        indices=jnp.array([0, 9, 9, 9])[:2]
                                        )[1])
  state = step(state, jnp.array([1.0, 1.0]))  # One invalid row.
  state = jax.jit(lambda s: tx.update(
      jnp.ones(2), s, None, losses=jnp.array([1.0, 1.0]),
      indices=jnp.array([7, 8]))[1])(state)  # Two more.
  state = step(state, jnp.array([jnp.nan, 1.0]))  # A skip.
  assert int(state.num_invalid) == I32_MAX
  assert int(state.num_skipped) == I32_MAX
  with pytest.raises(ValueError, match="2147483647"):
    check_indices(state)


# 5. Overflow edge cases ----------------------------------------------------

def _gamma64(g, gap, max_lr, eps):
  """The step size float64 computes, and whether float32's ||g||^2 + eps
  overflows (then AALIG and ALI-G take a zero step)."""
  g64 = np.asarray(g, np.float64)
  denom = float(np.sum(g64 * g64)) + float(np.float32(eps))
  return min(max(gap, 0.0) / denom, max_lr), denom > F32_MAX


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_finite_gradient_with_overflowing_norm_is_a_zero_step(jit):
  tx = scale_by_aalig(1.0, num_examples=4, steps_per_epoch=10,
                      epochs_per_section=1)
  big = 3e19  # Finite; its square (9e38) is not a float32.
  grads = {"a": jnp.full((3,), big), "b": jnp.array([1.0])}
  losses = jnp.array([3e38, 3e38])
  updates, state = _update(tx, tx.init(None), grads, losses,
                           jnp.array([0, 1]), jit=jit)
  assert int(state.num_skipped) == 0 and int(state.count) == 1
  assert int(state.num_overflows) == 1
  np.testing.assert_array_equal(np.asarray(state.last_loss)[:2],
                                np.float32([3e38, 3e38]))
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(np.asarray(u), 0.0)


def test_pow2_is_exact_for_every_normal_exponent():
  from aalig_optax import _numerics  # pylint: disable=g-import-not-at-top
  e = np.arange(-126, 128)
  np.testing.assert_array_equal(
      np.asarray(jax.jit(_numerics.pow2)(jnp.asarray(e, jnp.int32))),
      np.ldexp(np.float32(1), e).astype(np.float32))


def _aalig_step(g, loss, max_lr=1e30, eps=0.0):
  """AALIG's update and state for gradient `g` (float32) and a batch of two
  examples of loss `loss`."""
  tx = scale_by_aalig(max_lr, num_examples=4, steps_per_epoch=10,
                      epochs_per_section=1, eps=eps)
  updates, state = _update(tx, tx.init(None), {"g": jnp.asarray(g)},
                           jnp.full((2,), loss, jnp.float32),
                           jnp.array([0, 1]))
  return updates["g"], state


def _alig_step(g, value, eps=0.0, max_lr=np.inf):
  from aalig_optax import scale_by_alig  # pylint: disable=g-import-not-at-top
  tx = scale_by_alig(max_lr, eps=eps)
  updates, state = jax.jit(lambda g, v: tx.update(
      {"g": g}, tx.init(None), None, value=v))(
          jnp.asarray(g, jnp.float32), jnp.float32(value))
  return updates["g"], state


def _assert_close_where_normal(got, want, rtol=2e-5):
  # Entries below float32's normal range may be flushed to zero.
  normal = np.abs(want) >= 2.0**-126
  np.testing.assert_allclose(np.asarray(got)[normal], want[normal], rtol=rtol)


@pytest.mark.parametrize("shape", [(1,), (1, 1), (2,), (3,), (5000,)])
def test_overflowing_norm_of_any_leaf_shape_is_a_zero_step(shape):
  g = np.full(shape, 2.0**70, np.float32)
  updates, state = _aalig_step(g, 3 * 2.0**100)
  assert int(state.num_skipped) == 0 and int(state.num_overflows) == 1
  np.testing.assert_array_equal(np.asarray(updates), 0.0)
  updates, state = _alig_step(g, 3 * 2.0**100, max_lr=1e30)
  np.testing.assert_array_equal(np.asarray(updates), 0.0)
  assert float(state.step_size) == 0.0
  for bad_g, value in ((np.inf, 1.0), (np.nan, 1.0), (1.0, np.nan)):
    updates, state = _alig_step(np.full(shape, bad_g, np.float32), value,
                                max_lr=1e30)
    np.testing.assert_array_equal(np.asarray(updates), 0.0)
    assert float(state.step_size) == 0.0


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    size=st.integers(1, 4096),
    top=st.floats(50.0, 127.9),  # log2 of the largest entry
    spread=st.floats(0.0, 80.0),  # the smallest entries are 2^-spread of it
    gap=st.floats(2.0**-20, 2.0**100),
    eps=st.sampled_from([0.0, 1e-5, 1e38, F32_MAX]),
    seed=st.integers(0, 2**31 - 1))
def test_large_gradients_step_as_float64_says_or_take_a_zero_step(
    size, top, spread, gap, eps, seed):
  """Gradients from 2^50 up to float32's largest entries, spread over up to
  80 binary orders: where ||g||^2 + eps fits in float32 the update is
  float64's gamma g (where normal), where it overflows a zero step, for
  AALIG and ALI-G alike; never a skip. (One leaf shape, zero past `size`
  entries: one compilation per eps.)"""
  rng = np.random.default_rng(seed)
  g = np.zeros(4096, np.float32)
  g[:size] = np.exp2(top - rng.uniform(0.0, spread, size)) * rng.choice(
      [-1.0, 1.0], size)
  g[0] = np.exp2(top)
  gamma, overflows = _gamma64(g, gap, 1e30, eps)
  # Within float32's rounding of the edge either outcome is right.
  hypothesis.assume(abs(float(np.sum(g.astype(np.float64) ** 2))
                        + float(np.float32(eps)) - F32_MAX) > 1e-5 * F32_MAX)
  updates, state = _aalig_step(g, gap, eps=eps)
  assert int(state.num_skipped) == 0
  assert int(state.num_overflows) == int(overflows)
  if overflows:
    np.testing.assert_array_equal(np.asarray(updates), 0.0)
  elif gamma >= 2.0**-126:  # A subnormal step size has few bits: see docs.
    _assert_close_where_normal(updates, gamma * g.astype(np.float64))
  alig_updates, _ = _alig_step(g, gap, eps=eps, max_lr=1e30)
  chex.assert_trees_all_equal(alig_updates, updates)


def test_rows_whose_own_gap_overflows_give_the_float64_mean_gap():
  """A row whose loss minus AOV overflows float32 (3e38 - (-3e38)) beside a
  row of gap 0: the mean gap, 3e38, is finite, and each row's gap is summed
  as l 2^-40 - a 2^-40 (scaling l - a would give inf)."""
  aovs = np.array([-3e38, 0.0], np.float32)
  tx = scale_by_aalig(1e30, num_examples=2, steps_per_epoch=10,
                      epochs_per_section=1, eps=0.0, lower_bound=-3.3e38,
                      initial_aov=jnp.asarray(aovs))
  _, state = _update(tx, tx.init(None), jnp.full((3,), 1e10),
                     jnp.array([3e38, 0.0], jnp.float32), jnp.arange(2))
  assert int(state.num_skipped) == 0
  np.testing.assert_allclose(float(state.step_size), 3e38 / 3e20, rtol=1e-6)


@pytest.mark.parametrize("batch", [2, 4096])
def test_overflowing_loss_sums_give_the_float64_mean_gap(batch):
  """Losses and AOVs whose float32 sums overflow, with a finite mean gap: the
  step size is that gap over ||g||^2, as float64 computes it, at a
  realistic batch size too."""
  rng = np.random.default_rng(batch)
  losses = rng.uniform(2e38, F32_MAX, batch).astype(np.float32)
  aovs = rng.uniform(0.0, 2e38, batch).astype(np.float32)
  tx = scale_by_aalig(1e30, num_examples=batch, steps_per_epoch=10,
                      epochs_per_section=1, eps=0.0,
                      initial_aov=jnp.asarray(aovs))
  grads = jnp.full((3,), 1e10)
  _, state = _update(tx, tx.init(None), grads, jnp.asarray(losses),
                     jnp.arange(batch))
  assert int(state.num_skipped) == 0
  gap = (np.mean(losses.astype(np.float64))
         - np.mean(aovs.astype(np.float64)))
  np.testing.assert_allclose(float(state.step_size), gap / 3e20, rtol=1e-6)


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


def test_best_epoch_with_losses_near_the_float32_max_still_improves():
  tx = scale_by_aalig(1.0, num_examples=4, steps_per_epoch=2,
                      epochs_per_section=2, loss_estimate="best_epoch")
  state = tx.init(None)
  step = jax.jit(lambda s, l, i: tx.update(jnp.ones(2), s, None, losses=l,
                                           indices=i)[1])
  big = 0.9 * F32_MAX
  for epoch_losses in ([big, big, big, big], [big / 2] * 4):
    for b in range(2):
      state = step(state, jnp.asarray(epoch_losses[2 * b: 2 * b + 2]),
                   jnp.arange(2) + 2 * b)
  # Two epochs, one section: the section end used the second (lower) epoch.
  assert int(state.num_sections) == 1
  np.testing.assert_allclose(np.asarray(state.aov), big / 4, rtol=1e-6)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("g", [0.0, 1e-30])
@pytest.mark.parametrize("opt", ["aalig", "alig", "aalig_injected"])
def test_uncapped_step_size_that_overflows_gives_a_finite_update(opt, g, jit):
  """With max_learning_rate=inf (no cap), a gap above float32's largest value
  times eps or machine epsilon overflows gap / (||g||^2 + eps). The update
  was inf * 0 = NaN for a zero gradient (the parameters lost, nothing
  counted); a step size is a float32, so it is now at most float32's
  largest value: a zero gradient gives a zero update, a small one a finite
  update, and the step is neither skipped nor counted as clipped."""
  from aalig_optax import scale_by_alig  # pylint: disable=g-import-not-at-top
  grads = {"g": jnp.full((3,), g, jnp.float32)}
  gap = 1e34  # gap / eps = 1e39 > float32's largest value.
  if opt == "alig":
    tx = scale_by_alig(np.inf)
    def run(gr):
      return tx.update(gr, tx.init(None), None, value=jnp.float32(gap))
  elif opt == "aalig":
    tx = scale_by_aalig(np.inf, num_examples=4, steps_per_epoch=10,
                        epochs_per_section=1)
    def run(gr):
      return tx.update(gr, tx.init(None), None, losses=jnp.full((2,), gap),
                       indices=jnp.array([0, 1]))
  else:
    tx, params, state = _injected(max_learning_rate=np.inf, momentum=0.0)
    grads = {"g": grads["g"][:2]}
    def run(gr):
      return tx.update(gr["g"], state, params, losses=jnp.full((2,), gap),
                       indices=jnp.array([0, 1]))
  updates, new_state = (jax.jit(run) if jit else run)(grads)
  got = np.asarray(jax.tree.leaves(updates)[0])
  assert np.all(np.isfinite(got)), got
  # gamma = float32's largest value; a descent direction, whatever the sign.
  np.testing.assert_allclose(np.abs(got), np.float32(F32_MAX) * np.float32(g),
                             rtol=1e-6)
  if opt != "alig":
    metrics = aalig_metrics(new_state)
    assert int(metrics["num_skipped"]) == 0
    assert float(metrics["step_size"]) == F32_MAX
    if opt == "aalig_injected":
      assert int(metrics["num_clipped"]) == 0
  else:
    assert float(new_state.step_size) == F32_MAX


# 7. Injected hyperparameters -----------------------------------------------

def _injected(**hp):
  tx = optax.inject_hyperparams(aalig, static_args=(
      "num_examples", "steps_per_epoch", "epochs_per_section",
      "loss_estimate"))(
          max_learning_rate=0.5, num_examples=4, steps_per_epoch=2,
          epochs_per_section=1, momentum=0.5)
  params = jnp.array([1.0, -1.0])
  state = tx.init(params)
  for k, v in hp.items():
    state.hyperparams[k] = jnp.asarray(v, state.hyperparams[k].dtype)
  return tx, params, state


_MAX_MOMENTUM = float(np.nextafter(np.float32(1), np.float32(0)))


@pytest.mark.parametrize("hp,clipped_to", [
    (dict(momentum=1.5), dict(momentum=_MAX_MOMENTUM)),
    (dict(momentum=-0.5), dict(momentum=0.0)),
    (dict(momentum=float("nan")), dict(momentum=0.0)),
    (dict(max_learning_rate=-1.0), dict(max_learning_rate=0.0)),
    (dict(max_learning_rate=float("nan")), dict(max_learning_rate=0.0)),
    (dict(weight_decay=-1.0), dict(weight_decay=0.0)),
    (dict(eps=-1.0), dict(eps=0.0)),
    (dict(eps=float("inf")), dict(eps=F32_MAX)),
])
def test_injected_hyperparameters_out_of_range_are_clipped_and_counted(
    hp, clipped_to):
  def run(**values):
    tx, params, state = _injected(**{"weight_decay": 0.1, **values})

    @jax.jit
    def step(p, s):
      losses = jnp.stack([jnp.sum(p**2), jnp.sum(p**2)]) + 1.0
      u, s = tx.update(2 * p, s, p, losses=losses, indices=jnp.array([0, 1]))
      return optax.apply_updates(p, u), s

    trajectory = []
    for _ in range(6):
      params, state = step(params, state)
      trajectory.append(params)
    return jnp.stack(trajectory), state

  got, state = run(**hp)
  want, want_state = run(**clipped_to)
  assert np.all(np.isfinite(np.asarray(got)))
  chex.assert_trees_all_close(got, want, rtol=1e-6)
  assert int(aalig_metrics(state)["num_clipped"]) == 6
  assert int(aalig_metrics(want_state)["num_clipped"]) == 0
  with pytest.raises(ValueError, match="6 step"):
    check_hyperparams(state)
  if "max_learning_rate" in hp:  # A zero step: never an ascent.
    np.testing.assert_array_equal(np.asarray(got[-1]), [1.0, -1.0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_table_dtype_survives_inject_hyperparams(dtype):
  # inject_hyperparams calls a dtype like a schedule; the tables keep it.
  tx = optax.inject_hyperparams(aalig, static_args=(
      "num_examples", "steps_per_epoch", "epochs_per_section"))(
          0.1, num_examples=4, steps_per_epoch=2, epochs_per_section=1,
          table_dtype=dtype)
  params = jnp.zeros(2)
  _, state = jax.jit(lambda s: tx.update(
      params, s, params, losses=jnp.ones(2), indices=jnp.arange(2)))(
          tx.init(params))
  assert state.inner_state[0].aov.dtype == jnp.dtype(dtype)


def test_injected_hyperparameters_in_range_are_not_counted():
  tx, params, state = _injected(momentum=0.9, max_learning_rate=0.1)
  u, state = jax.jit(lambda p, s: tx.update(
      p, s, p, losses=jnp.array([4.0, 4.0]), indices=jnp.array([0, 1])))(
          params, state)
  assert int(aalig_metrics(state)["num_clipped"]) == 0
  check_hyperparams(state)
