"""Bad or unusual input to AALIG's construction, rules and helpers: each case
either does what the finite maths says or raises an error that names the
argument at fault. Each runs eagerly and under `jit` where it can differ."""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aalig_optax as ao

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


@pytest.mark.parametrize("jit", [False, True])
def test_a_rule_that_returns_nan_for_never_seen_examples_is_harmless(jit):
  """A rule written without the NaN estimate of never-seen examples in mind
  changes nothing for them: only rows with an update due keep its output."""
  careless = lambda a, d, l, b: (
      jnp.where(l <= a, jnp.maximum(0.9 * l, b), (a + l) / 2), d)
  tx = ao.scale_by_aalig(1.0, 8, 1, 1, aov_rule=careless)
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(None)
  grads = jnp.ones(2)
  for first in (0, 2, 4):  # each batch meets never-seen examples
    _, state = update(grads, state, losses=jnp.array([1.0, 2.0]),
                      indices=jnp.array([first, first + 1]))
  assert int(state.num_skipped) == 0
  aov, _ = ao.current_aovs(state)
  assert np.all(np.isfinite(np.asarray(aov)))
  np.testing.assert_array_equal(np.asarray(aov)[6:], 0.0)


@pytest.mark.parametrize("bad", [
    lambda a, d, l, b: (a, d, l),
    lambda a, d, l, b: None,
    lambda a, d, l, b: a,
])
def test_a_rule_that_does_not_return_a_pair_is_named(bad):
  tx = ao.scale_by_aalig(1.0, 4, 1, 1, aov_rule=bad)
  state = tx.init(None)
  with pytest.raises(ValueError, match="aov_rule"):
    tx.update(jnp.ones(2), state, losses=jnp.ones(2),
              indices=jnp.array([0, 1]))


def test_wide_integer_initial_aovs_keep_their_values():
  table = np.array([2**62, 3_000_000_000, 3, 4], np.int64)
  state = ao.scale_by_aalig(1.0, 4, 1, 1, initial_aov=table).init(None)
  np.testing.assert_array_equal(np.asarray(state.aov),
                                table.astype(np.float32))


def test_an_initial_aov_callable_returning_none_is_named():
  tx = ao.scale_by_aalig(1.0, 4, 1, 1, initial_aov=lambda params: None)
  with pytest.raises(ValueError, match="initial_aov"):
    tx.init(None)


def test_loss_table_refuses_float_indices_and_a_non_finite_fill():
  loss_fn = lambda w, b: (w * b) ** 2
  with pytest.raises(ValueError, match="indices"):
    ao.loss_table(loss_fn, 1.0, [(jnp.ones(2), np.array([0.0, 1.0]))], 2)
  for fill in (np.nan, np.inf):
    with pytest.raises(ValueError, match="fill_value"):
      ao.loss_table(loss_fn, 1.0, [(jnp.ones(1), np.array([0]))], 2,
                    fill_value=fill)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("g", [2e19, 3e19, 1e20])
def test_overflowing_norm_takes_a_zero_step_and_records_the_losses(jit, g):
  """||g||^2 overflows float32 for a finite g: a zero step, the (finite)
  losses recorded, the step counted, eagerly and under jit alike."""
  tx = ao.scale_by_aalig(1.0, 8, 100, 1)
  update = jax.jit(tx.update) if jit else tx.update
  updates, state = update(jnp.array([g, 1.0]), tx.init(None),
                          losses=jnp.array([1e3, 2e3]),
                          indices=jnp.array([0, 1]))
  np.testing.assert_array_equal(np.asarray(updates), 0.0)
  np.testing.assert_array_equal(np.asarray(state.last_loss)[:2], [1e3, 2e3])
  assert int(state.num_skipped) == 0 and int(state.count) == 1
  assert int(state.num_overflows) == 1


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_non_finite_gradient_entry_skips_the_batch(jit, bad):
  """An inf or NaN entry is told apart from a finite gradient whose norm
  overflows: the batch is skipped and nothing is recorded."""
  tx = ao.scale_by_aalig(1.0, 8, 100, 1)
  update = jax.jit(tx.update) if jit else tx.update
  updates, state = update(jnp.array([bad, 1.0]), tx.init(None),
                          losses=jnp.array([1.0, 2.0]),
                          indices=jnp.array([0, 1]))
  np.testing.assert_array_equal(np.asarray(updates), 0.0)
  assert np.all(np.isnan(np.asarray(state.last_loss)))
  assert int(state.num_skipped) == 1 and int(state.count) == 0
  assert int(state.num_overflows) == 0
