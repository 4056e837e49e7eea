"""The state: its fields, shapes and dtypes, how it is made, and how it fits
Optax, JAX and Flax.

Specifies the fields and their dtypes (tables float32 by default, stable
through steps), `optax.tree_utils.tree_get` of every named quantity, `init`
from ShapeDtypeStructs and its memory check, a state of another transform
refused in words (and AOVs below a raised bound read at the bound), and the
fit with inject_hyperparams (STATIC_ARGS), MultiSteps, apply_if_finite,
lax.cond, jit against eager, and nnx.Optimizer.
"""

from __future__ import annotations

import inspect
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aalig_optax as ao
from aalig_optax import aalig
from aalig_optax import scale_by_aalig
from tests.problems import (B, N, STEPS_PER_EPOCH, batches, init_params,
                            loss_and_grads, make_problem, make_step, run_update)


# Fields, shapes and dtypes.

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


def test_tables_default_to_float32_whatever_the_params():
  for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
    state = ao.aalig(0.1, 7, 1, 1).init({"w": jnp.zeros(3, dtype)})
    for name in ("aov", "aov_step", "last_loss"):
      leaf = optax.tree_utils.tree_get(state, name)
      assert leaf.dtype == jnp.float32 and leaf.shape == (7,)


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


# Making a state.

def test_init_accepts_shape_dtype_struct_params():
  abstract = {"w": jax.ShapeDtypeStruct((3, 2), jnp.bfloat16)}
  opt = ao.aalig(0.1, 11, 2, 1)
  state = opt.init(abstract)
  assert state[1].trace["w"].shape == (3, 2)
  shapes = jax.eval_shape(opt.init, abstract)
  chex.assert_trees_all_equal_shapes_and_dtypes(shapes, state)


def test_wide_integer_initial_aovs_keep_their_values():
  table = np.array([2**62, 3_000_000_000, 3, 4], np.int64)
  state = ao.scale_by_aalig(1.0, 4, 1, 1, initial_aov=table).init(None)
  np.testing.assert_array_equal(np.asarray(state.aov),
                                table.astype(np.float32))


def test_tables_too_large_for_the_host_fail_at_init_in_bytes(monkeypatch):
  # A fixed limit makes the test independent of the CI machine's memory.
  from aalig_optax import _checks  # pylint: disable=g-import-not-at-top
  page, pages = 4096, 1024  # 4 MiB of "physical memory"
  real_sysconf = os.sysconf
  monkeypatch.setattr(_checks.os, "sysconf", lambda k: {
      "SC_PAGE_SIZE": page, "SC_PHYS_PAGES": pages}.get(k, real_sysconf(k)))
  opt = aalig(0.1, 1_000_000, 10, 1, loss_estimate="best_epoch")
  need = (4 * 4 + 4) * 1_000_000  # four float32 tables, the int32 sections
  with pytest.raises(MemoryError, match=f"need {need:,} bytes.*"
                     f"at most {page * pages:,} bytes"):
    opt.init(jnp.zeros(3))
  with pytest.raises(MemoryError, match=f"need {need:,} bytes"):
    jax.eval_shape(opt.init, jnp.zeros(3))  # before any allocation
  half = aalig(0.1, 1_000_000, 10, 1, table_dtype=jnp.float16)
  with pytest.raises(MemoryError,
                     match=f"need {(3 * 2 + 4) * 1_000_000:,} bytes"):
    half.init(jnp.zeros(3))
  assert aalig(0.1, 100_000, 10, 1).init(jnp.zeros(3))[0].aov.shape == (
      100_000,)


def test_tables_too_large_for_this_machine_fail_at_init():
  n = 2**31 - 1
  need = (4 * 4 + 4) * n
  try:
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    pytest.skip("host memory unknown")
  if need <= host:
    pytest.skip(f"this host has {host:,} bytes, enough for {need:,}")
  opt = aalig(0.1, n, 10, 1, loss_estimate="best_epoch")
  with pytest.raises(MemoryError, match=f"need {need:,} bytes"):
    opt.init(jnp.zeros(3))


# A state that does not fit the transform.

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
    run_update(tx, foreign, jnp.ones(2), jnp.ones(2), jnp.arange(2), jit=jit)
  for w in words:
    assert w in str(e.value)


def test_state_with_a_lower_bound_at_or_above_the_new_one_is_accepted():
  # The AOVs of the old state are all >= its bound >= the new bound.
  tx = scale_by_aalig(1.0, num_examples=100, steps_per_epoch=10,
                      epochs_per_section=2, lower_bound=-1.0)
  state = _state_for(lower_bound=0.0)
  _, new = run_update(tx, state, jnp.ones(2), jnp.ones(2), jnp.arange(2))
  np.testing.assert_allclose(float(new.step_size), 1 / (2 + 1e-5), rtol=1e-6)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_aovs_below_a_raised_lower_bound_are_read_at_the_bound(jit):
  """A state whose AOVs lie below this transform's bound (built with a lower
  one, or an injected bound that rose) is read with them raised to it."""
  tx = scale_by_aalig(1.0, num_examples=100, steps_per_epoch=10,
                      epochs_per_section=2, lower_bound=0.5)
  state = _state_for(lower_bound=-1.0)
  _, new = run_update(tx, state, jnp.ones(2), jnp.ones(2), jnp.arange(2),
                      jit=jit)
  np.testing.assert_allclose(float(new.step_size), 0.5 / (2 + 1e-5),
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(new.aov)[:2], 0.5)


# Optax, JAX and Flax fit.

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


# The arguments that optax.inject_hyperparams can turn into run-time
# values: numbers.
NUMERIC_ARGS = {"max_learning_rate", "momentum", "weight_decay",
                "lower_bound", "eps"}


def test_static_args_cover_every_argument_that_is_not_a_number():
  params = set(inspect.signature(ao.aalig).parameters)
  assert set(ao.STATIC_ARGS) == params - NUMERIC_ARGS
  scale_params = set(inspect.signature(ao.scale_by_aalig).parameters)
  assert set(ao.STATIC_ARGS) >= scale_params - NUMERIC_ARGS


@pytest.mark.parametrize("jit", [False, True])
def test_inject_hyperparams_recipe_equals_the_plain_optimiser(jit):
  """With STATIC_ARGS, every argument means what it means without
  inject_hyperparams: a callable initial_aov is called with the params (not
  as a schedule), a callable rule is a rule, and the states have one
  structure."""
  n = 4
  rule = lambda a, d, l, b: ao.update_aovs_reflect(a, d, l, b)
  kwargs = dict(num_examples=n, steps_per_epoch=1, epochs_per_section=1,
                loss_estimate="last", table_dtype=jnp.bfloat16,
                axis_name=None, aov_rule=rule,
                initial_aov=lambda p: jnp.full(n, p.sum()))
  plain = ao.aalig(0.5, **kwargs)
  injected = optax.inject_hyperparams(ao.aalig, static_args=ao.STATIC_ARGS)(
      0.5, **kwargs)
  params = jnp.full(3, 0.5)
  maybe_jit = jax.jit if jit else (lambda f: f)
  s_plain = maybe_jit(plain.init)(params)
  s_inj = maybe_jit(injected.init)(params)
  np.testing.assert_array_equal(
      np.asarray(s_inj.inner_state[0].aov, np.float32), 1.5)
  chex.assert_trees_all_equal_structs(s_inj.inner_state, s_plain)
  grads = jnp.ones(3)
  batch = dict(losses=jnp.array([3.0, 1.0]), indices=jnp.array([0, 2]))
  for _ in range(3):
    u_plain, s_plain = maybe_jit(
        lambda s: plain.update(grads, s, params, **batch))(s_plain)
    u_inj, s_inj = maybe_jit(
        lambda s: injected.update(grads, s, params, **batch))(s_inj)
    chex.assert_trees_all_close(u_inj, u_plain)
    chex.assert_trees_all_close(s_inj.inner_state, s_plain)


@pytest.mark.parametrize("static", [True, False], ids=["static", "injected"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_table_dtype_survives_inject_hyperparams(dtype, static):
  """With STATIC_ARGS the dtype is passed as it is. Without, inject_hyperparams
  calls a dtype like a schedule, and the tables keep the result's dtype
  where optax keeps it (optax before 0.2.8 casts it to float32)."""
  version = tuple(int(v) for v in optax.__version__.split(".")[:3])
  if not static and dtype != jnp.float32 and version < (0, 2, 8):
    pytest.skip("optax < 0.2.8 casts injected hyperparameters to float32; "
                "STATIC_ARGS keeps the dtype")
  tx = optax.inject_hyperparams(aalig, static_args=(
      ao.STATIC_ARGS if static else (
          "num_examples", "steps_per_epoch", "epochs_per_section")))(
              0.1, num_examples=4, steps_per_epoch=2, epochs_per_section=1,
              table_dtype=dtype)
  params = jnp.zeros(2)
  _, state = jax.jit(lambda s: tx.update(
      params, s, params, losses=jnp.ones(2), indices=jnp.arange(2)))(
          tx.init(params))
  assert state.inner_state[0].aov.dtype == jnp.dtype(dtype)


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
