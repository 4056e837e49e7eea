"""optax's checklist for a contributed optimiser, run on ours.

The same checks as optax's tests of its contributed optimisers (extra args
and no recompilation, ``optax.tree.map_params``, convergence on four targets
in 30,000 steps, ``inject_hyperparams`` equality, dtype preservation,
``MultiSteps``, state stability under ``lax.cond`` from float16 to float64),
written for `aalig`, a `scale_by_aalig` chain and `alig`, each given the
extra args it needs: AALIG sees each target as a data set of one example
(``losses=[f(w)]``, ``indices=[0]``), ALI-G takes ``value=f(w)``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aalig_optax as ao

# The paper's K = 10 sections over the 30,000 steps of the convergence test.
SECTION = 3000

FACTORIES = {
    "aalig": (ao.aalig, dict(max_learning_rate=1.0, num_examples=1,
                             steps_per_epoch=1, epochs_per_section=SECTION)),
    "alig": (ao.alig, dict(max_learning_rate=1.0)),
}


def _chain():
  return optax.chain(
      ao.scale_by_aalig(1.0, 1, 1, SECTION),
      optax.trace(decay=0.9, nesterov=True), optax.scale(-1.0))


def make(name):
  if name == "aalig_chain":
    return _chain()
  factory, kwargs = FACTORIES[name]
  return factory(**kwargs)


NAMES = ["aalig", "aalig_chain", "alig"]


def extra_args(name, value):
  value = jnp.asarray(value, jnp.float32)
  if name == "alig":
    return {"value": value}
  return {"losses": value[None], "indices": jnp.zeros((1,), jnp.int32)}


def parabola(dtype):
  final = jnp.array([1.0, -1.0, 1.0], dtype)
  return (jnp.array([-1.0, 10.0, 1.0], dtype), final,
          lambda p: jnp.sum((p - final) ** 2))


def rosenbrock(dtype):
  return (jnp.zeros(2, dtype), jnp.array([1.0, 1.0], dtype),
          lambda p: (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2)


def matrix_parabola(dtype):
  final = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype)
  return (jnp.zeros((2, 2), dtype), final,
          lambda p: jnp.sum((p - final) ** 2))


def mixed(dtype):
  f1 = jnp.array([1.0, -1.0, 2.0], dtype)
  f2 = jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype)
  return ((jnp.zeros(3, dtype), jnp.zeros((2, 2), dtype)), (f1, f2),
          lambda p: jnp.sum((p[0] - f1) ** 2) + jnp.sum((p[1] - f2) ** 2))


@pytest.mark.parametrize("name", NAMES)
def test_extra_args_are_accepted_and_a_step_compiles_once(name):
  chex.clear_trace_counter()  # (The count is kept per function's code.)
  opt = make(name)
  params, _, objective = rosenbrock(jnp.float32)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    value, grads = jax.value_and_grad(objective)(params)
    updates, state = opt.update(
        grads, state, params, unexpected_extra_arg_we_ignore=1,
        **extra_args(name, value))
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  for _ in range(3):
    params, state = step(params, state)


@pytest.mark.parametrize("target", [parabola, rosenbrock, matrix_parabola,
                                    mixed])
@pytest.mark.parametrize("name", NAMES)
def test_converges_on_optax_targets_in_30000_steps(name, target):
  opt = make(name)
  params, final, objective = target(jnp.float32)

  def step(carry, _):
    params, state = carry
    value, grads = jax.value_and_grad(objective)(params)
    updates, state = opt.update(grads, state, params,
                                **extra_args(name, value))
    return (optax.apply_updates(params, updates), state), None

  state = opt.init(params)
  # A no-op map over the state's parameter-shaped leaves must work.
  state = optax.tree.map_params(opt, lambda v: v, state)
  (params, state), _ = jax.jit(lambda c: jax.lax.scan(
      step, c, length=30_000))((params, state))
  chex.assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", ["aalig", "alig"])
def test_inject_hyperparams_gives_the_same_updates_and_state(name):
  factory, kwargs = FACTORIES[name]
  static = ao.STATIC_ARGS if name == "aalig" else ()
  opt = factory(**kwargs)
  injected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
  params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
  grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
  args = extra_args(name, 1.0)
  updates, state = jax.jit(lambda s: opt.update(grads, s, params, **args))(
      jax.jit(opt.init)(params))
  updates_inj, state_inj = jax.jit(
      lambda s: injected.update(grads, s, params, **args))(
          jax.jit(injected.init)(params))
  chex.assert_trees_all_close(updates_inj, updates, rtol=1e-5)
  chex.assert_trees_all_close(state_inj.inner_state, state, rtol=1e-5,
                              atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_updates_keep_the_params_dtype(name, dtype):
  opt = make(name)
  params = jnp.array([1.0, 2.0], dtype)
  value, grads = jax.value_and_grad(lambda x: jnp.sum(x ** 2))(params)
  updates, _ = jax.jit(lambda s: opt.update(
      grads, s, params, **extra_args(name, value)))(jax.jit(opt.init)(params))
  assert updates.dtype == params.dtype


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_multisteps_accumulates_without_a_step(name, dtype):
  opt = optax.MultiSteps(make(name), every_k_schedule=4)
  params = jnp.array([1.0, 2.0], dtype)
  value, grads = jax.value_and_grad(lambda x: jnp.sum(x ** 2))(params)
  updates, _ = jax.jit(lambda s: opt.update(
      grads, s, params, **extra_args(name, value)))(jax.jit(opt.init)(params))
  chex.assert_trees_all_equal(updates, jnp.zeros_like(grads))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32",
                                   "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_state_keeps_its_shapes_and_dtypes_through_lax_cond(name, dtype):
  """Both branches of a cond, one that steps and one that does not, must
  give states of one structure, shape and dtype."""
  with jax.enable_x64(dtype == "float64"):
    dtype = jnp.dtype(dtype)
    opt = make(name)
    params, _, objective = parabola(dtype)

    @jax.jit
    def step(params, state):
      value, grads = jax.value_and_grad(objective)(params)
      # An odd dtype for the loss, on purpose.
      value = value.astype(jnp.float16 if dtype != jnp.float16
                           else jnp.bfloat16)
      take = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
      updates, state = jax.lax.cond(
          take, lambda: opt.update(grads, state, params,
                                   **extra_args(name, value)),
          lambda: (params, state))
      return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for _ in range(2):
      params, new_state = step(params, state)
      assert params.dtype == dtype
      chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
      state = new_state
    assert np.all(np.isfinite(np.asarray(params, np.float32)))
