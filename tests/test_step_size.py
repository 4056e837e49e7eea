"""The step size: gamma = clip(gap / (||g||^2 + eps), 0, max_lr).

Specifies the gap (mean loss minus mean AOV of the batch's valid rows), the
Polyak step and its clipping; the equalities with the peers (ALI-G and
AALIG before a section end are optax.polyak_sgd's SPS+, AALIG is a chain of
its parts); the zero step of a degenerate batch, of an overflowing norm and
of an uncapped gamma that overflows; gaps and sums that overflow float32
computed as float64 says; weight decay and the L2-ball projection.
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

import aalig_optax
import aalig_optax as ao
from aalig_optax import aalig_metrics
from aalig_optax import scale_by_aalig
from tests.problems import (F32, F32_MAX, MAX_LR, N, STEPS_PER_EPOCH, TABLE_N,
                            batches, init_params, injected_aalig,
                            loss_and_grads, make_problem, one_step, run_update)


@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_alig_without_momentum_equals_polyak_sgd_sps_plus(eps):
  x, y = make_problem(4)
  ours, peer = ao.alig(0.3, momentum=0.0, eps=eps), optax.polyak_sgd(
      0.3, eps=eps, variant="sps+")
  p1 = p2 = init_params()
  s1, s2 = ours.init(p1), peer.init(p2)
  for idx in batches(4, 3):
    for tx, p, s, k in ((ours, p1, s1, 1), (peer, p2, s2, 2)):
      losses, grads = loss_and_grads(p, x[idx], y[idx])
      u, s = tx.update(grads, s, p, value=jnp.mean(losses))
      p = optax.apply_updates(p, u)
      if k == 1:
        p1, s1 = p, s
      else:
        p2, s2 = p, s
    chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-7)


def test_aalig_before_first_section_end_equals_polyak_sgd():
  x, y = make_problem(5)
  ours = ao.aalig(0.3, N, STEPS_PER_EPOCH, 3, momentum=0.0)
  peer = optax.polyak_sgd(0.3, eps=1e-5, variant="sps+")
  p1 = p2 = init_params()
  s1, s2 = ours.init(p1), peer.init(p2)
  for idx in batches(5, 3):  # 3 epochs = the first section; AOVs still 0
    losses, grads = loss_and_grads(p1, x[idx], y[idx])
    u, s1 = ours.update(grads, s1, p1, losses=losses, indices=idx)
    p1 = optax.apply_updates(p1, u)
    losses, grads = loss_and_grads(p2, x[idx], y[idx])
    u, s2 = peer.update(grads, s2, p2, value=jnp.mean(losses))
    p2 = optax.apply_updates(p2, u)
    chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-7)


def test_chain_of_parts_equals_aalig_without_weight_decay():
  x, y = make_problem(6)
  kw = dict(num_examples=N, steps_per_epoch=STEPS_PER_EPOCH,
            epochs_per_section=1)
  whole = ao.aalig(0.5, momentum=0.9, **kw)
  chained = optax.chain(ao.scale_by_aalig(0.5, **kw),
                        optax.trace(0.9, nesterov=True), optax.scale(-1.0))
  p1 = p2 = init_params()
  s1, s2 = whole.init(p1), chained.init(p2)
  for idx in batches(6, 4):
    losses, grads = loss_and_grads(p1, x[idx], y[idx])
    u, s1 = whole.update(grads, s1, p1, losses=losses, indices=idx)
    p1 = optax.apply_updates(p1, u)
    losses, grads = loss_and_grads(p2, x[idx], y[idx])
    u, s2 = chained.update(grads, s2, p2, losses=losses, indices=idx)
    p2 = optax.apply_updates(p2, u)
  chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(s1[0], s2[0], rtol=1e-6, atol=1e-7)
  assert int(s1[0].num_sections) == 4


def test_scale_by_alig_ignores_unknown_extra_args_and_needs_value():
  tx = ao.scale_by_alig(1.0)
  tx.update(jnp.ones(2), tx.init(None), value=1.0, losses=jnp.ones(3))
  with pytest.raises(TypeError, match="value="):
    tx.update(jnp.ones(2), tx.init(None))
  with pytest.raises(ValueError, match="scalar"):
    tx.update(jnp.ones(2), tx.init(None), value=jnp.ones(3))


def test_unknown_extra_args_are_ignored():
  opt = ao.aalig(0.1, 10, 2, 1)
  params = {"w": jnp.ones(2)}
  opt.update(params, opt.init(params), params, losses=jnp.ones(2),
             indices=jnp.arange(2), value=3.0, rng=jax.random.key(0))


def test_alig_projects_onto_l2_ball():
  opt = ao.alig(10.0, momentum=0.9, max_norm=0.5)
  params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array(2.0)}
  state = opt.init(params)
  for _ in range(3):
    grads = jax.tree.map(lambda p: -jnp.ones_like(p), params)
    u, state = opt.update(grads, state, params, value=jnp.array(5.0))
    params = optax.apply_updates(params, u)
    np.testing.assert_allclose(optax.tree.norm(params), 0.5, rtol=1e-5)
  # Inside the ball the projection changes nothing.
  tx = ao.project_l2_ball(100.0)
  u, _ = tx.update({"a": jnp.ones(2)}, tx.init(None), {"a": jnp.ones(2)})
  chex.assert_trees_all_close(u, {"a": jnp.ones(2)})


def test_weight_decay_needs_params():
  opt = ao.aalig(0.1, 10, 2, 1, weight_decay=1e-4)
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="params"):
    opt.update(params, opt.init(params), None, losses=jnp.ones(2),
               indices=jnp.arange(2))


@pytest.mark.parametrize("case", ["empty batch", "all rows masked",
                                  "zero loss", "negative loss",
                                  "zero gradient"])
def test_degenerate_batches_give_a_zero_step(case):
  losses, idx, mask, grads = np.array([0.0], F32), np.array([2]), None, (1, 0)
  if case == "empty batch":
    losses, idx = np.zeros(0, F32), np.zeros(0, np.int32)
  elif case == "all rows masked":
    mask = np.array([False])
  elif case == "negative loss":
    losses = np.array([-1.0], F32)
  elif case == "zero gradient":
    grads = (0.0, 0.0)
  updates, s = one_step(losses, idx, mask=mask, grads=grads)
  assert np.all(np.asarray(updates) == 0) and int(s.count) == 1
  if case in ("zero loss", "negative loss", "zero gradient"):
    assert float(s.last_loss[2]) == float(losses[0])  # still recorded
  else:
    assert np.all(np.isnan(np.asarray(s.last_loss)))


def test_huge_losses_do_not_overflow_the_step_or_the_tables():
  # Two float32 losses whose sum overflows: the mean is finite, so is gamma.
  updates, s = one_step(np.array([3e38, 3e38], F32), np.array([0, 1]))
  assert float(s.step_size) == pytest.approx(MAX_LR)
  assert np.all(np.isfinite(np.asarray(updates)))
  np.testing.assert_array_equal(np.asarray(s.last_loss[:2]),
                                np.full(2, 3e38, F32))
  # Sections with such losses: (aov + l)/2 must not overflow either.
  tx = scale_by_aalig(MAX_LR, TABLE_N, 1, 1)
  s = tx.init(None)
  for _ in range(4):
    _, s = one_step(np.array([3.4e38], F32), np.array([0]), tx=tx, state=s)
    assert np.all(np.isfinite(np.asarray(s.aov)))
    assert np.all(np.isfinite(np.asarray(s.aov_step)))
  assert float(aalig_optax.current_aovs(s)[0][0]) > 3e38


def _gamma64(g, gap, max_lr, eps):
  """The step size float64 computes, and whether float32's ||g||^2 + eps
  overflows (then AALIG and ALI-G take a zero step)."""
  g64 = np.asarray(g, np.float64)
  denom = float(np.sum(g64 * g64)) + float(np.float32(eps))
  return min(max(gap, 0.0) / denom, max_lr), denom > F32_MAX


# Finite gradients whose ||g||^2 overflows float32, with the batch's losses.
_OVERFLOWING_NORMS = {
    "one entry 2e19": (jnp.array([2e19, 1.0]), [1e3, 2e3]),
    "one entry 3e19": (jnp.array([3e19, 1.0]), [1e3, 2e3]),
    "one entry 1e20": (jnp.array([1e20, 1.0]), [1e3, 2e3]),
    # Finite; its square (9e38) is not a float32.
    "a leaf of 3e19, losses 3e38": (
        {"a": jnp.full((3,), 3e19), "b": jnp.array([1.0])}, [3e38, 3e38]),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", list(_OVERFLOWING_NORMS))
def test_overflowing_norm_takes_a_zero_step_and_records_the_losses(case, jit):
  """||g||^2 overflows float32 for a finite g: a zero step, the (finite)
  losses recorded, the step counted (not skipped), the overflow counted,
  eagerly and under jit alike."""
  grads, losses = _OVERFLOWING_NORMS[case]
  tx = ao.scale_by_aalig(1.0, 8, 100, 1)
  updates, state = run_update(tx, tx.init(None), grads,
                              jnp.array(losses, jnp.float32),
                              jnp.array([0, 1]), jit=jit)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(np.asarray(u), 0.0)
  np.testing.assert_array_equal(np.asarray(state.last_loss)[:2],
                                np.float32(losses))
  assert int(state.num_skipped) == 0 and int(state.count) == 1
  assert int(state.num_overflows) == 1


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
  updates, state = run_update(tx, tx.init(None), {"g": jnp.asarray(g)},
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


@functools.lru_cache(maxsize=None)
def _large_gradient_steps(eps):
  """Jitted (AALIG's update and state, ALI-G's update) of a 4096-entry
  gradient and a batch of two examples of loss `gap`: compiled once per
  eps."""
  from aalig_optax import scale_by_alig  # pylint: disable=g-import-not-at-top
  aalig = scale_by_aalig(1e30, num_examples=4, steps_per_epoch=10,
                         epochs_per_section=1, eps=eps)
  alig = scale_by_alig(1e30, eps=eps)

  @jax.jit
  def steps(g, gap):
    updates, state = aalig.update(g, aalig.init(None), None,
                                  losses=jnp.full((2,), gap),
                                  indices=jnp.arange(2))
    return updates, state, alig.update(g, alig.init(None), None,
                                       value=gap)[0]
  return steps


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
  AALIG and ALI-G alike; never a skip while the entries' sum is finite (see
  the next test). (One leaf shape, zero past `size` entries: one
  compilation per eps.)"""
  rng = np.random.default_rng(seed)
  g = np.zeros(4096, np.float32)
  g[:size] = np.exp2(top - rng.uniform(0.0, spread, size)) * rng.choice(
      [-1.0, 1.0], size)
  g[0] = np.exp2(top)
  gamma, overflows = _gamma64(g, gap, 1e30, eps)
  # Within float32's rounding of the edge either outcome is right.
  hypothesis.assume(abs(float(np.sum(g.astype(np.float64) ** 2))
                        + float(np.float32(eps)) - F32_MAX) > 1e-5 * F32_MAX)
  # (A sum in float32 may overflow in any order where |g|'s sum does.)
  hypothesis.assume(float(np.sum(np.abs(g.astype(np.float64)))) < F32_MAX)
  updates, state, alig_updates = _large_gradient_steps(eps)(
      jnp.asarray(g), jnp.float32(gap))
  assert int(state.num_skipped) == 0
  assert int(state.num_overflows) == int(overflows)
  if overflows:
    np.testing.assert_array_equal(np.asarray(updates), 0.0)
  elif gamma >= 2.0**-126:  # A subnormal step size has few bits: see docs.
    _assert_close_where_normal(updates, gamma * g.astype(np.float64))
  chex.assert_trees_all_equal(alig_updates, updates)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_finite_entries_that_sum_past_float32_skip_the_batch(jit):
  """The documented edge of telling an infinite entry from an overflowing
  norm by the entries' sum: finite entries near float32's largest value
  whose sum overflows are taken for an infinite one, and the batch is
  skipped (nothing recorded), not stepped."""
  g = np.full(4, 2.0**126, np.float32)  # sum 2^128: past float32
  tx = scale_by_aalig(1.0, num_examples=4, steps_per_epoch=10,
                      epochs_per_section=1)
  update = jax.jit(tx.update) if jit else tx.update
  updates, state = update(jnp.asarray(g), tx.init(None),
                          losses=jnp.ones(2), indices=jnp.arange(2))
  assert int(state.num_skipped) == 1 and int(state.num_overflows) == 0
  np.testing.assert_array_equal(np.asarray(updates), 0.0)
  assert np.all(np.isnan(np.asarray(state.last_loss)))


def test_rows_whose_own_gap_overflows_give_the_float64_mean_gap():
  """A row whose loss minus AOV overflows float32 (3e38 - (-3e38)) beside a
  row of gap 0: the mean gap, 3e38, is finite, and each row's gap is summed
  as l 2^-40 - a 2^-40 (scaling l - a would give inf)."""
  aovs = np.array([-3e38, 0.0], np.float32)
  tx = scale_by_aalig(1e30, num_examples=2, steps_per_epoch=10,
                      epochs_per_section=1, eps=0.0, lower_bound=-3.3e38,
                      initial_aov=jnp.asarray(aovs))
  _, state = run_update(tx, tx.init(None), jnp.full((3,), 1e10),
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
  _, state = run_update(tx, tx.init(None), grads, jnp.asarray(losses),
                        jnp.arange(batch))
  assert int(state.num_skipped) == 0
  gap = (np.mean(losses.astype(np.float64))
         - np.mean(aovs.astype(np.float64)))
  np.testing.assert_allclose(float(state.step_size), gap / 3e20, rtol=1e-6)


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
    tx, params, state = injected_aalig(max_learning_rate=np.inf, momentum=0.0)
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
