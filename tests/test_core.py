"""Core behaviour of AALIG and ALI-G: the semantics to the letter, Optax fit."""

import functools
import re

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
from tests import reference

N, B, D = 32, 8, 5
STEPS_PER_EPOCH = N // B


def make_problem(seed, n=N, d=D):
  """A non-interpolating least-squares problem: per-example 0.5 (x.w - y)^2."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = (x @ rng.normal(size=d) + rng.normal(size=n)).astype(np.float32)
  return x, y


def batches(seed, num_epochs, n=N, b=B):
  """Index batches: a fresh permutation each epoch."""
  rng = np.random.default_rng(seed + 1000)
  for _ in range(num_epochs):
    perm = rng.permutation(n)
    for k in range(n // b):
      yield perm[k * b:(k + 1) * b].astype(np.int32)


def per_example_losses(params, x, y):
  pred = x @ params["w"] + params["b"]
  return 0.5 * (pred - y) ** 2


def loss_and_grads(params, x, y):
  losses, vjp = jax.vjp(lambda p: per_example_losses(p, x, y), params)
  (grads,) = vjp(jnp.full_like(losses, 1.0 / losses.shape[0]))
  return losses, grads


def init_params(d=D):
  return {"w": jnp.zeros(d, jnp.float32), "b": jnp.zeros([], jnp.float32)}


def make_step(opt):
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, x, y, idx):
    losses, grads = loss_and_grads(params, x, y)
    updates, state = opt.update(grads, state, params, losses=losses,
                                indices=idx)
    return optax.apply_updates(params, updates), state, losses
  return step


def numpy_grad(w_flat, x, y):
  w, b = w_flat[:-1], w_flat[-1]
  r = x.astype(np.float64) @ w + b - y
  losses = 0.5 * r ** 2
  grad = np.concatenate([x.T @ r / len(y), [r.mean()]])
  return losses, grad


def flat(params):
  return np.concatenate([np.asarray(params["w"], np.float64),
                         [float(params["b"])]])


# --------------------------------------------------------------------------
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


# --------------------------------------------------------------------------
# Peers: ALI-G and SPS+.


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


def test_scale_by_alig_ignores_unknown_extra_args_and_needs_value():
  tx = ao.scale_by_alig(1.0)
  tx.update(jnp.ones(2), tx.init(None), value=1.0, losses=jnp.ones(3))
  with pytest.raises(TypeError, match="value="):
    tx.update(jnp.ones(2), tx.init(None))
  with pytest.raises(ValueError, match="scalar"):
    tx.update(jnp.ones(2), tx.init(None), value=jnp.ones(3))


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


# --------------------------------------------------------------------------
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


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(aov_tables())
def test_update_aovs_properties(tables):
  aov, step, est, lower = tables
  new_aov, new_step = ao.update_aovs(jnp.asarray(aov), jnp.asarray(step),
                                     jnp.asarray(est), lower)
  new_aov, new_step = np.asarray(new_aov), np.asarray(new_step)
  seen = ~np.isnan(est)
  reached = seen & (est <= aov)
  missed = seen & (est > aov)
  # Never below the lower bound (the tables start at or above it).
  assert np.all(new_aov >= np.float32(lower) - 1e-6)
  # Unseen examples are untouched, bit for bit.
  np.testing.assert_array_equal(new_aov[~seen], aov[~seen])
  np.testing.assert_array_equal(new_step[~seen], step[~seen])
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


# --------------------------------------------------------------------------
# Optax and JAX fit.


def test_jit_and_eager_agree():
  x, y = make_problem(7)
  opt = ao.aalig(0.5, N, STEPS_PER_EPOCH, 1, weight_decay=1e-3)
  p_eager = p_jit = init_params()
  s_eager, s_jit = opt.init(p_eager), opt.init(p_jit)
  update_jit = jax.jit(opt.update)
  for idx in batches(7, 3):
    losses, grads = loss_and_grads(p_eager, x[idx], y[idx])
    u, s_eager = opt.update(grads, s_eager, p_eager, losses=losses,
                            indices=idx)
    p_eager = optax.apply_updates(p_eager, u)
    losses, grads = loss_and_grads(p_jit, x[idx], y[idx])
    u, s_jit = update_jit(grads, s_jit, p_jit, losses=losses, indices=idx)
    p_jit = optax.apply_updates(p_jit, u)
  chex.assert_trees_all_close(p_eager, p_jit, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s_eager, s_jit, rtol=1e-5, atol=1e-6)


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


def test_state_dtypes_and_shapes_stable_with_bf16_params_and_f16_losses():
  params = {"w": jnp.zeros(4, jnp.bfloat16)}
  for table_dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    opt = ao.aalig(0.1, 10, 2, 1, table_dtype=table_dtype)
    state = opt.init(params)
    before = jax.tree.map(lambda a: (a.shape, a.dtype), state)
    step = jax.jit(lambda s, p: opt.update(
        {"w": jnp.ones(4, jnp.bfloat16)}, s, p,
        losses=jnp.array([1.0, 60000.0], jnp.float16),
        indices=jnp.array([1, 2])))
    for _ in range(4):
      updates, state = step(state, params)
    after = jax.tree.map(lambda a: (a.shape, a.dtype), state)
    assert before == after
    assert state[0].aov.dtype == table_dtype
    assert updates["w"].dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(state[0].aov)))


def test_tables_default_to_float32_whatever_the_params():
  for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
    state = ao.aalig(0.1, 7, 1, 1).init({"w": jnp.zeros(3, dtype)})
    for name in ("aov", "aov_step", "last_loss"):
      leaf = optax.tree_utils.tree_get(state, name)
      assert leaf.dtype == jnp.float32 and leaf.shape == (7,)


def test_tree_get_finds_every_named_quantity_inside_any_chain():
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    ao.aalig(0.1, 9, 1, 1))
  state = opt.init({"w": jnp.zeros(2)})
  core = state[1][0]
  for name in core._fields:
    if name == "config" or getattr(core, name) is None:
      continue
    found = optax.tree_utils.tree_get(state, name)
    assert found is not None, name
    chex.assert_trees_all_equal(found, getattr(core, name))
  assert optax.tree_utils.tree_get(state, "aov").shape == (9,)
  assert optax.tree_utils.tree_get(state, "count").shape == ()
  metrics = ao.aalig_metrics(state)
  assert set(metrics) == {"step_size", "mean_aov", "mean_gap",
                          "reached_fraction", "sections_done",
                          "num_invalid", "num_skipped", "num_overflows",
                          "num_clipped"}


@pytest.mark.parametrize("loss_estimate", ["last", "best_epoch"])
def test_state_fields_shapes_and_dtypes(loss_estimate):
  state = ao.scale_by_aalig(0.1, 9, 2, 1, loss_estimate=loss_estimate).init(
      None)
  best = loss_estimate == "best_epoch"
  assert len(jax.tree.leaves(state)) == 12 + (4 if best else 0)
  for name in ("aov", "aov_step", "last_loss"):
    assert getattr(state, name).shape == (9,)
    assert getattr(state, name).dtype == jnp.float32
  assert state.loss_section.shape == (9,)
  assert state.loss_section.dtype == jnp.int32
  for name in ("count",) + ao._state.COUNTER_FIELDS:
    assert getattr(state, name).shape == () and int(getattr(state, name)) == 0
    assert getattr(state, name).dtype == jnp.int32
  assert state.step_size.dtype == state.lower_bound.dtype == jnp.float32
  assert (state.best_epoch_mean is None) == (not best)
  assert (state.best_loss is None) == (not best)


def test_init_accepts_shape_dtype_struct_params():
  abstract = {"w": jax.ShapeDtypeStruct((3, 2), jnp.bfloat16)}
  opt = ao.aalig(0.1, 11, 2, 1)
  state = opt.init(abstract)
  assert state[1].trace["w"].shape == (3, 2)
  shapes = jax.eval_shape(opt.init, abstract)
  chex.assert_trees_all_equal_shapes_and_dtypes(shapes, state)


def test_works_under_inject_hyperparams():
  opt = optax.inject_hyperparams(
      ao.aalig,
      static_args=("num_examples", "steps_per_epoch", "epochs_per_section",
                   "loss_estimate"))(
          max_learning_rate=0.5, num_examples=N,
          steps_per_epoch=STEPS_PER_EPOCH, epochs_per_section=1)
  x, y = make_problem(9)
  params = init_params()
  state = opt.init(params)
  step = make_step(opt)
  for idx in batches(9, 2):
    params, state, _ = step(params, state, x[idx], y[idx], idx)
    state.hyperparams["max_learning_rate"] = jnp.asarray(0.01)
  assert float(ao.aalig_metrics(state)["step_size"]) <= 0.01 + 1e-8
  assert int(ao.aalig_metrics(state)["sections_done"]) == 2


def test_inject_hyperparams_without_static_args_says_what_to_do():
  opt = optax.inject_hyperparams(ao.aalig)(0.5, N, STEPS_PER_EPOCH, 1)
  with pytest.raises(TypeError, match="static_args"):
    jax.jit(opt.init)(init_params())


def test_works_under_multisteps():
  x, y = make_problem(10)
  opt = optax.MultiSteps(ao.aalig(0.5, N, 2, 1), every_k_schedule=2)
  params = init_params()
  state = opt.init(params)
  step = make_step(opt)
  before = np.asarray(params["w"])
  for idx in list(batches(10, 1)):
    params, state, _ = step(params, state, x[idx], y[idx], idx)
  inner = state.inner_opt_state[0]
  # Two inner steps from four micro-batches; the inner state is only
  # replaced on the emitting micro-step, so it holds that batch's record.
  assert int(inner.count) == 2
  assert int(jnp.sum(~jnp.isnan(inner.last_loss))) == 2 * B
  assert not np.allclose(params["w"], before)


@pytest.mark.parametrize("poison", ["loss_nan", "loss_inf", "grad_nan"])
def test_apply_if_finite_a_non_finite_batch_changes_neither_params_nor_tables(
    poison):
  x, y = make_problem(11)
  opt = optax.apply_if_finite(ao.aalig(0.5, N, STEPS_PER_EPOCH, 1), 5)
  params = init_params()
  state = opt.init(params)

  @jax.jit
  def step(params, state, x, y, idx, poison_it):
    losses, grads = loss_and_grads(params, x, y)
    if poison.startswith("loss"):
      bad = jnp.nan if poison == "loss_nan" else jnp.inf
      losses = jnp.where(poison_it, losses.at[0].set(bad), losses)
    else:
      grads = jax.tree.map(
          lambda g: jnp.where(poison_it, g * jnp.nan, g), grads)
    updates, state = opt.update(grads, state, params, losses=losses,
                                indices=idx)
    return optax.apply_updates(params, updates), state

  idx = np.arange(B, dtype=np.int32)
  for k in range(STEPS_PER_EPOCH - 1):  # stop one step before a section end
    params, state = step(params, state, x[idx + k * B], y[idx + k * B],
                         idx + k * B, False)
  kept_params, kept_inner = params, state.inner_state[0]
  last = idx + (STEPS_PER_EPOCH - 1) * B
  params, state = step(params, state, x[last], y[last], last, True)
  chex.assert_trees_all_equal(params, kept_params)
  core = state.inner_state[0]
  for name in ("aov", "aov_step", "last_loss", "count", "num_sections"):
    chex.assert_trees_all_equal(getattr(core, name), getattr(kept_inner, name))
  skipped = int(state.total_notfinite) + int(core.num_skipped)
  assert skipped == 1
  # The next healthy batch is the section's last step and is taken.
  params, state = step(params, state, x[last], y[last], last, False)
  assert int(state.inner_state[0].num_sections) == 1


def test_non_finite_losses_skip_the_batch_without_a_wrapper():
  opt = ao.scale_by_aalig(0.5, 6, 1, 1)
  state = opt.init(None)
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    losses = jnp.array([1.0, bad, 2.0])
    updates, new = jax.jit(opt.update)(
        jnp.ones(2), state, losses=losses, indices=jnp.arange(3))
    chex.assert_trees_all_equal(updates, jnp.zeros(2))
    assert int(new.num_skipped) == 1 and int(new.count) == 0
    assert bool(jnp.all(jnp.isnan(new.last_loss)))
    chex.assert_trees_all_equal(
        new._replace(num_skipped=jnp.zeros([], jnp.int32)), state)
  # A non-finite loss in a padding row is ignored, not a reason to skip.
  updates, new = opt.update(jnp.ones(2), state,
                            losses=jnp.array([1.0, jnp.nan]),
                            indices=jnp.arange(2),
                            mask=jnp.array([True, False]))
  assert int(new.num_skipped) == 0 and float(new.last_loss[0]) == 1.0


def test_works_inside_lax_cond():
  opt = ao.aalig(0.5, N, 1, 1)
  params = init_params()
  state = opt.init(params)
  x, y = make_problem(12)
  idx = np.arange(B, dtype=np.int32)
  losses, grads = loss_and_grads(params, x[idx], y[idx])

  @jax.jit
  def maybe_step(take, state):
    def do(state):
      return opt.update(grads, state, params, losses=losses, indices=idx)
    def skip(state):
      return optax.tree.zeros_like(grads), state
    return jax.lax.cond(take, do, skip, state)

  u, s = maybe_step(True, state)
  assert int(s[0].count) == 1 and float(optax.tree.norm(u)) > 0
  u, s = maybe_step(False, state)
  assert int(s[0].count) == 0 and float(optax.tree.norm(u)) == 0


def test_duplicated_indices_record_the_lowest_loss():
  opt = ao.scale_by_aalig(0.5, 5, 10, 1)
  state = opt.init(None)
  _, state = jax.jit(opt.update)(
      jnp.ones(2), state, losses=jnp.array([3.0, 1.0, 2.0, 5.0]),
      indices=jnp.array([2, 2, 2, 4]))
  np.testing.assert_array_equal(state.last_loss[2], 1.0)
  np.testing.assert_array_equal(state.last_loss[4], 5.0)


# --------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("name,kwargs", [
    ("max_learning_rate", dict(max_learning_rate=0.0)),
    ("max_learning_rate", dict(max_learning_rate=-1.0)),
    ("num_examples", dict(num_examples=0)),
    ("num_examples", dict(num_examples=2.5)),
    ("steps_per_epoch", dict(steps_per_epoch=-3)),
    ("epochs_per_section", dict(epochs_per_section=0)),
    ("momentum", dict(momentum=1.0)),
    ("momentum", dict(momentum=-0.1)),
    ("weight_decay", dict(weight_decay=-1e-4)),
    ("eps", dict(eps=-1e-5)),
    ("loss_estimate", dict(loss_estimate="mean")),
    ("table_dtype", dict(table_dtype=jnp.int32)),
    ("lower_bound", dict(lower_bound=float("nan"))),
])
def test_bad_hyperparameters_raise_naming_the_argument(name, kwargs):
  args = dict(max_learning_rate=0.1, num_examples=10, steps_per_epoch=2,
              epochs_per_section=1)
  args.update(kwargs)
  with pytest.raises(ValueError, match=name):
    ao.aalig(**args)


@pytest.mark.parametrize("kwargs", [dict(max_learning_rate=0.0),
                                    dict(momentum=1.5), dict(eps=-1.0),
                                    dict(max_norm=0.0)])
def test_bad_alig_hyperparameters_raise(kwargs):
  args = dict(max_learning_rate=0.1)
  args.update(kwargs)
  with pytest.raises(ValueError, match=list(kwargs)[0]):
    ao.alig(**args)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(), TypeError, "missing: losses, indices"),
    (dict(losses=jnp.ones(3)), TypeError, "missing: indices"),
    (dict(losses=jnp.ones(3), indices=jnp.arange(4)), ValueError,
     "same shape"),
    (dict(losses=jnp.ones((3, 1)), indices=jnp.arange(3)), ValueError,
     "1-D"),
    (dict(losses=jnp.ones(()), indices=jnp.arange(1)), ValueError, "1-D"),
    (dict(losses=jnp.ones(3), indices=jnp.arange(3.0)), TypeError,
     "integers"),
    (dict(losses=jnp.arange(3), indices=jnp.arange(3)), TypeError,
     "floating"),
    (dict(losses=jnp.ones(3), indices=jnp.arange(3), mask=jnp.ones(3)),
     ValueError, "boolean"),
])
def test_bad_batch_inputs_raise_at_trace_time(kwargs, error, match):
  opt = ao.aalig(0.1, 10, 2, 1)
  params = {"w": jnp.ones(2)}
  state = opt.init(params)
  for update in (opt.update, jax.jit(opt.update)):
    with pytest.raises(error, match=match):
      update(params, state, params, **kwargs)


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


def test_unknown_extra_args_are_ignored():
  opt = ao.aalig(0.1, 10, 2, 1)
  params = {"w": jnp.ones(2)}
  opt.update(params, opt.init(params), params, losses=jnp.ones(2),
             indices=jnp.arange(2), value=3.0, rng=jax.random.key(0))


def test_weight_decay_needs_params():
  opt = ao.aalig(0.1, 10, 2, 1, weight_decay=1e-4)
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="params"):
    opt.update(params, opt.init(params), None, losses=jnp.ones(2),
               indices=jnp.arange(2))


def test_nnx_model_trains_with_nnx_optimizer():
  from flax import nnx

  x, y = make_problem(13, n=64, d=4)
  model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ao.aalig(0.5, 64, 8, 2), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y, idx):
    def loss_fn(model):
      losses = 0.5 * (model(x)[:, 0] - y) ** 2
      return jnp.mean(losses), losses
    (loss, losses), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, losses=losses, indices=idx)
    return loss

  first = None
  for epoch in range(6):
    perm = np.random.default_rng(epoch).permutation(64).astype(np.int32)
    for k in range(8):
      idx = perm[k * 8:(k + 1) * 8]
      loss = train_step(model, optimizer, x[idx], y[idx], idx)
      first = float(loss) if first is None else first
  full = float(jnp.mean(0.5 * (model(x)[:, 0] - y) ** 2))
  assert full < 0.5 * first
  metrics = ao.aalig_metrics(optimizer.opt_state)
  assert int(metrics["sections_done"]) == 3
  assert int(jnp.sum(~jnp.isnan(
      optax.tree_utils.tree_get(optimizer.opt_state, "last_loss")))) == 64


def _donated_step_hlo(opt, params):
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, grads, losses, idx):
    updates, state = opt.update(grads, state, params, losses=losses,
                                indices=idx)
    return optax.apply_updates(params, updates), state
  state = opt.init(params)
  return step.lower(params, state, params, jnp.ones(4),
                    jnp.arange(4)).compile().as_text()


@pytest.mark.parametrize("weight_decay", [0.0, 1e-4])
def test_donated_step_copies_no_param_sized_buffer(weight_decay):
  params = {"w": jnp.zeros((64, 48)), "b": jnp.zeros(48)}
  hlo = _donated_step_hlo(
      ao.aalig(0.1, 1000, 10, 1, weight_decay=weight_decay), params)
  copies = re.findall(r"= (f32\[[0-9,]*\])\{[^}]*\} copy\(", hlo)
  assert "f32[64,48]" not in copies and "f32[48]" not in copies, copies


def test_skipped_batch_with_weight_decay_moves_nothing():
  opt = ao.aalig(0.5, 8, 2, 1, weight_decay=0.1)
  params = {"w": jnp.ones(3)}
  state = opt.init(params)
  grads = {"w": jnp.ones(3)}
  u, state = opt.update(grads, state, params, losses=jnp.ones(2),
                        indices=jnp.arange(2))
  assert float(optax.tree.norm(u)) > 0  # a real step: momentum is non-zero
  u, new = jax.jit(opt.update)(grads, state, params,
                               losses=jnp.array([1.0, jnp.nan]),
                               indices=jnp.arange(2))
  chex.assert_trees_all_equal(u, {"w": jnp.zeros(3)})
  chex.assert_trees_all_equal(new[1], state[1])
  assert int(new[0].num_skipped) == 1
