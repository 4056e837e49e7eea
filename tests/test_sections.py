"""The sections: at each section's end the AOVs of the examples recorded in
it move by the AOV rule, and only theirs.

Specifies whole trajectories against the NumPy reference (tests/reference.py):
params, step sizes, AOVs and records over several section ends, with
momentum, weight decay, a lower bound, the best-epoch estimate and batches
drawn with replacement; the section-end rule itself (`update_aovs`'s
properties, under jit, vmap and cond); `current_aovs`; the best epoch near
float32's largest value; no recompilation across sections; sections that
keep ending and counters that saturate past 2**31 steps.
"""

from __future__ import annotations

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aalig_optax as ao
from aalig_optax import check_indices
from aalig_optax import scale_by_aalig
from tests import reference
from tests.problems import (B, F32_MAX, I32_MAX, N, STEPS_PER_EPOCH, batches,
                            flat, init_params, loss_and_grads, make_problem,
                            make_step, numpy_grad)


# Trajectories against the NumPy transcription of docs/algorithm.md.

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(momentum=0.0),
        dict(momentum=0.9),
        dict(momentum=0.9, weight_decay=1e-2),
        dict(momentum=0.5, weight_decay=1e-3, lower_bound=0.05),
        dict(momentum=0.9, loss_estimate="best_epoch"),
    ],
    ids=["plain", "momentum", "weight_decay", "lower_bound", "best_epoch"],
)
def test_trajectory_matches_numpy_reference(seed, kwargs):
  x, y = make_problem(seed)
  epochs_per_section, num_epochs = 2, 10  # 5 section ends
  opt = ao.aalig(0.5, N, STEPS_PER_EPOCH, epochs_per_section, **kwargs)
  ref = reference.NumpyAalig(0.5, N, STEPS_PER_EPOCH, epochs_per_section,
                             **kwargs)
  params = init_params()
  state = opt.init(params)
  w_ref = flat(params)
  step = make_step(opt)
  for idx in batches(seed, num_epochs):
    params, state, _ = step(params, state, x[idx], y[idx], idx)
    losses_ref, grad_ref = numpy_grad(w_ref, x[idx], y[idx])
    w_ref = ref.step(w_ref, grad_ref, losses_ref, idx)
    np.testing.assert_allclose(float(state[0].step_size), ref.step_sizes[-1],
                               rtol=2e-4, atol=5e-5)
  core = state[0]
  assert int(core.num_sections) == num_epochs // epochs_per_section
  np.testing.assert_allclose(flat(params), w_ref, rtol=2e-4, atol=1e-5)
  aov, aov_step = ao.current_aovs(core)
  np.testing.assert_allclose(aov, ref.aov, rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(aov_step, ref.aov_step, rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(core.last_loss, ref.last_loss, rtol=2e-4,
                             atol=1e-5)
  # The AOVs moved: the run crossed real section updates.
  assert np.ptp(np.asarray(aov)) > 0.01


@pytest.mark.parametrize("loss_estimate", ["last", "best_epoch"])
@pytest.mark.parametrize("aov_rule", ["paper", "reflect"])
def test_random_batches_move_only_the_aovs_recorded_in_each_section(
    loss_estimate, aov_rule):
  """Batches drawn with replacement miss examples for whole sections (and
  repeat some within a batch): an AOV moves at the end of each section in
  which its example was recorded, and only then."""
  x, y = make_problem(5)
  opt = ao.aalig(0.5, N, STEPS_PER_EPOCH, 1, loss_estimate=loss_estimate,
                 aov_rule=aov_rule)
  ref = reference.NumpyAalig(0.5, N, STEPS_PER_EPOCH, 1,
                             loss_estimate=loss_estimate)
  if aov_rule == "reflect":
    def section_end(estimate, examples=None):
      examples, ref.recorded = sorted(ref.recorded), set()
      for z in examples:
        if not np.isnan(estimate[z]):
          a, d = ao.update_aovs_reflect(
              jnp.float32(ref.aov[z]), jnp.float32(ref.aov_step[z]),
              jnp.float32(estimate[z]))
          ref.aov[z], ref.aov_step[z] = float(a), float(d)
    ref.section_end = section_end
  rng = np.random.default_rng(3)
  params, state = init_params(), opt.init(init_params())
  w_ref = flat(params)
  step = make_step(opt)
  for _ in range(8 * STEPS_PER_EPOCH):
    idx = rng.integers(0, N // 2, B).astype(np.int32)  # half never drawn
    params, state, _ = step(params, state, x[idx], y[idx], idx)
    losses_ref, grad_ref = numpy_grad(w_ref, x[idx], y[idx])
    w_ref = ref.step(w_ref, grad_ref, losses_ref, idx)
  np.testing.assert_allclose(flat(params), w_ref, rtol=2e-4, atol=1e-5)
  aov, aov_step = ao.current_aovs(state[0])
  np.testing.assert_allclose(aov, ref.aov, rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(aov_step, ref.aov_step, rtol=2e-4, atol=1e-5)
  assert np.ptp(np.asarray(aov)) > 0.01


# Properties of the section-end update.

# XLA flushes subnormal floats to zero (a 4e-41 loss compares as 0), so the
# properties are stated for normal floats.
finite = st.floats(-1e3, 1e3, allow_nan=False, width=32, allow_subnormal=False)


@st.composite
def aov_tables(draw):
  n = draw(st.integers(1, 40))
  lower = draw(st.floats(-5.0, 5.0, width=32, allow_subnormal=False))
  aov = draw(hnp.arrays(np.float32, n, elements=st.floats(
      0, 50, width=32, allow_subnormal=False)))
  aov = aov + np.float32(lower)
  step = draw(hnp.arrays(np.float32, n, elements=st.floats(
      0, 20, width=32, allow_subnormal=False)))
  est = draw(hnp.arrays(np.float32, n, elements=finite))
  est = np.where(draw(hnp.arrays(bool, n)), np.nan, est).astype(np.float32)
  return aov, step, est, lower


def apply_rule_and_check_invariants(rule, tables):
  """`rule` on `tables` (from :func:`aov_tables`), checked for what every
  AOV rule keeps: never below the lower bound (the tables start at or above
  it), never-seen rows untouched bit for bit. Returns the new tables and
  the reached and not-reached masks."""
  aov, step, est, lower = tables
  new_aov, new_step = rule(jnp.asarray(aov), jnp.asarray(step),
                           jnp.asarray(est), lower)
  new_aov, new_step = np.asarray(new_aov), np.asarray(new_step)
  seen = ~np.isnan(est)
  assert np.all(new_aov >= np.float32(lower) - 1e-6)
  np.testing.assert_array_equal(new_aov[~seen], aov[~seen])
  np.testing.assert_array_equal(new_step[~seen], step[~seen])
  return new_aov, new_step, seen & (est <= aov), seen & (est > aov)


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(aov_tables())
def test_update_aovs_properties(tables):
  aov, step, est, lower = tables
  new_aov, new_step, reached, missed = apply_rule_and_check_invariants(
      ao.update_aovs, tables)
  # Not reached: halfway to the loss, step = the increase applied.
  np.testing.assert_allclose(new_aov[missed], (aov[missed] + est[missed]) / 2,
                             rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(new_step[missed], new_aov[missed] - aov[missed],
                             rtol=1e-5, atol=1e-4)
  # Reached: lowered by half the last increase (floored), step kept.
  np.testing.assert_allclose(
      new_aov[reached],
      np.maximum(aov[reached] - step[reached] / 2, np.float32(lower)),
      rtol=1e-6, atol=1e-5)
  np.testing.assert_array_equal(new_step[reached], step[reached])
  # And the whole thing equals the per-example transcription (reference.py).
  ref_aov, ref_step = reference.numpy_update_aovs(aov, step, est, lower)
  np.testing.assert_allclose(new_aov, ref_aov, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(new_step, ref_step, rtol=1e-6, atol=1e-5)


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(st.floats(0.5, 10, width=32), st.floats(0.125, 4, width=32),
                  st.integers(2, 6))
def test_repeated_reaches_lower_by_the_same_amount(start, step, reaches):
  aov, d = jnp.array([start]), jnp.array([step])
  est = jnp.array([-100.0])  # always reached
  seen_values = [float(aov[0])]
  for _ in range(reaches):
    aov, d = ao.update_aovs(aov, d, est, lower_bound=-1000.0)
    seen_values.append(float(aov[0]))
    assert float(d[0]) == pytest.approx(step)
  np.testing.assert_allclose(np.diff(seen_values), -step / 2, rtol=1e-4)


def test_update_aovs_runs_under_jit_vmap_and_cond():
  aov, step, est = jnp.zeros((3, 4)), jnp.ones((3, 4)), jnp.full((3, 4), 2.0)
  out = jax.jit(jax.vmap(ao.update_aovs, in_axes=(0, 0, 0, None)))(
      aov, step, est, 0.0)
  chex.assert_trees_all_close(out, (jnp.ones((3, 4)), jnp.ones((3, 4))))
  f = jax.jit(lambda p: jax.lax.cond(p, ao.update_aovs, lambda a, s, e, b:
                                     (a, s), aov[0], step[0], est[0], 0.0))
  chex.assert_trees_all_close(f(True)[0], jnp.ones(4))
  chex.assert_trees_all_close(f(False)[0], jnp.zeros(4))


def test_no_recompilation_across_steps_and_sections():
  x, y = make_problem(8)
  opt = ao.aalig(0.5, N, STEPS_PER_EPOCH, 1, loss_estimate="best_epoch")

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, x, y, idx):
    losses, grads = loss_and_grads(params, x, y)
    updates, state = opt.update(grads, state, params, losses=losses,
                                indices=idx)
    return optax.apply_updates(params, updates), state

  params = init_params()
  state = opt.init(params)
  for idx in batches(8, 3):
    params, state = step(params, state, x[idx], y[idx], idx)
  assert int(state[0].num_sections) == 3


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
