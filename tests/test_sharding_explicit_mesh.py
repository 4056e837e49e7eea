"""Explicit meshes: tables placed by state_shardings, batches placed or not.

`jax.make_mesh` gives Explicit axes by default. With the tables on such a
mesh (split along the example axis or replicated), a batch may arrive placed
like the README's (split over the batch axis), replicated (e.g. B not
divisible by the device count), or not placed at all (numpy, or an array on
the default device). Every case must give the result of the same steps on one
device without a mesh. The root conftest gives 8 simulated CPU devices.
"""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import aalig_optax as ao
from aalig_optax import _tables
from tests import hlo_checks

N, D = 64, 4                    # examples, features
STEPS_PER_EPOCH, EPOCHS_PER_SECTION = 2, 1
NUM_STEPS = 5                   # section ends after steps 2 and 4
TOL = dict(rtol=1e-5, atol=1e-6)   # float32 sums in another order

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 (simulated) devices; see conftest")


def make_tx(loss_estimate="last"):
  return ao.aalig(0.5, N, STEPS_PER_EPOCH, EPOCHS_PER_SECTION, momentum=0.9,
                  loss_estimate=loss_estimate)


def problem(batch_size):
  """Least squares that no w interpolates, and a fixed stream of batches."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N, D)).astype(np.float32)
  y = (x @ rng.normal(size=D) + rng.normal(size=N)).astype(np.float32)
  order = np.concatenate([rng.permutation(N) for _ in range(2)])
  idx = [order[k * batch_size:(k + 1) * batch_size].astype(np.int32)
         for k in range(NUM_STEPS)]
  return x, y, idx


def init_params():
  return {"w": jnp.zeros(D, jnp.float32), "b": jnp.zeros([], jnp.float32)}


def apply_step(tx, params, state, x, y, idx):
  def mean_loss(p):
    losses = 0.5 * (x @ p["w"] + p["b"] - y) ** 2
    return jnp.mean(losses), losses
  (_, losses), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
  updates, state = tx.update(grads, state, params, losses=losses, indices=idx)
  return optax.apply_updates(params, updates), state


def apply_grads(tx, params, state, grads, losses, idx):
  """A step whose gradient and losses come from outside (any placement)."""
  updates, state = tx.update(grads, state, params, losses=losses, indices=idx)
  return optax.apply_updates(params, updates), state


@functools.lru_cache(maxsize=None)
def reference_run(loss_estimate, batch_size):
  """The same steps on one device, no mesh: what every run must equal."""
  tx = make_tx(loss_estimate)
  x, y, batches = problem(batch_size)
  step = jax.jit(functools.partial(apply_step, tx))
  params, state = init_params(), tx.init(init_params())
  for idx in batches:
    params, state = step(params, state, x[idx], y[idx], idx)
  return jax.device_get((params, state))


def explicit_mesh():
  return jax.make_mesh((8,), ("data",))  # the default axis types


def placed(tx, mesh, table_axis):
  """The README's set-up: replicated params, tables by state_shardings."""
  params = jax.device_put(init_params(), NamedSharding(mesh, P()))
  shardings = ao.state_shardings(jax.eval_shape(tx.init, params), mesh,
                                 table_axis=table_axis)
  state = jax.jit(tx.init, out_shardings=shardings)(params)
  return params, state, shardings


def assert_matches_reference(params, state, loss_estimate, batch_size):
  ref_params, ref_state = reference_run(loss_estimate, batch_size)
  got_params, got_state = jax.device_get((params, state))
  chex.assert_trees_all_close(got_params, ref_params, **TOL)
  chex.assert_trees_all_close(got_state, ref_state, **TOL)
  core = got_state[0]
  assert int(core.num_sections) == NUM_STEPS // (
      STEPS_PER_EPOCH * EPOCHS_PER_SECTION)
  assert int(core.num_skipped) == 0 and int(core.num_invalid) == 0


def test_make_mesh_axes_are_explicit_by_default():
  """The premise of this file, in the installed JAX."""
  assert explicit_mesh().axis_types == (AxisType.Explicit,)


def test_reference_run_crosses_section_ends_that_move_the_aovs():
  for loss_estimate in ("last", "best_epoch"):
    _, state = reference_run(loss_estimate, 12)
    assert int(state[0].num_sections) == 2
    assert np.count_nonzero(np.asarray(ao.current_aovs(state[0])[0])) > 0


# How the batch (x, y, indices) reaches the donated step, and its size B.
PLACEMENTS = {
    # The README's placement: split over the mesh's batch axis (control).
    "split": (16, lambda mesh, a: jax.device_put(a, NamedSharding(
        mesh, P("data")))),
    # Not placed: numpy arrays, and arrays on the default device.
    "numpy": (16, lambda mesh, a: a),
    "default_device": (16, lambda mesh, a: jnp.asarray(a)),
    # B = 12 cannot be split over 8 devices: replicated, or not placed.
    "replicated_b12": (12, lambda mesh, a: jax.device_put(a, NamedSharding(
        mesh, P()))),
    "numpy_b12": (12, lambda mesh, a: a),
    # Inputs split over the mesh, indices left as numpy.
    "indices_unplaced": (16, lambda mesh, a: a if a.dtype == np.int32 else
                         jax.device_put(a, NamedSharding(mesh, P("data")))),
}


@pytest.mark.parametrize("loss_estimate", ["last", "best_epoch"])
@pytest.mark.parametrize("table_axis", [None, "data"])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_donated_step_with_any_batch_placement_matches_one_device(
    placement, table_axis, loss_estimate):
  batch_size, place = PLACEMENTS[placement]
  mesh = explicit_mesh()
  tx = make_tx(loss_estimate)
  params, state, shardings = placed(tx, mesh, table_axis)
  step = jax.jit(functools.partial(apply_step, tx), donate_argnums=(0, 1),
                 out_shardings=(NamedSharding(mesh, P()), shardings))
  x, y, batches = problem(batch_size)
  for idx in batches:
    params, state = step(params, state,
                         *(place(mesh, a) for a in (x[idx], y[idx], idx)))
  assert_matches_reference(params, state, loss_estimate, batch_size)
  assert jax.tree.map(lambda a: a.sharding, state) == shardings


@pytest.mark.parametrize("table_axis", [None, "data"])
@pytest.mark.parametrize("batch_size", [12, 16])
def test_unplaced_grads_and_losses_with_params_on_the_mesh(batch_size,
                                                           table_axis):
  """grads, losses and indices all numpy; params and tables on the mesh."""
  mesh = explicit_mesh()
  tx = make_tx()
  params, state, shardings = placed(tx, mesh, table_axis)
  x, y, batches = problem(batch_size)
  losses_and_grads = jax.jit(lambda p, x, y: jax.value_and_grad(
      lambda p: jnp.mean(0.5 * (x @ p["w"] + p["b"] - y) ** 2))(p))
  per_example = jax.jit(lambda p, x, y: 0.5 * (x @ p["w"] + p["b"] - y) ** 2)
  step = jax.jit(functools.partial(apply_grads, tx), donate_argnums=(0, 1),
                 out_shardings=(NamedSharding(mesh, P()), shardings))
  for idx in batches:
    host_params = jax.device_get(params)  # computed off the mesh
    _, grads = losses_and_grads(host_params, x[idx], y[idx])
    grads = jax.device_get(grads)
    losses = np.asarray(per_example(host_params, x[idx], y[idx]))
    params, state = step(params, state, grads, losses, idx)
  assert_matches_reference(params, state, "last", batch_size)


def test_eager_update_in_mesh_context_with_numpy_batch(table_axis="data"):
  """Outside jit (under jax.set_mesh, as eager ops on the mesh need)."""
  mesh = explicit_mesh()
  tx = make_tx("best_epoch")
  params, state, shardings = placed(tx, mesh, table_axis)
  x, y, batches = problem(12)
  with jax.set_mesh(mesh):
    for idx in batches:
      params, state = apply_step(tx, params, state, x[idx], y[idx], idx)
  assert_matches_reference(params, state, "best_epoch", 12)
  for name in ("aov", "aov_step", "last_loss", "best_loss"):
    assert getattr(state[0], name).sharding.is_equivalent_to(
        getattr(shardings[0], name), 1), name


@pytest.mark.parametrize("batch_spec", [P("data"), None])
def test_two_axis_mesh_with_a_batch_split_over_one_axis(batch_spec):
  """Tables over both axes of a 4x2 mesh; B = 12 split over 4, or unplaced."""
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  tx = make_tx()
  params, state, shardings = placed(tx, mesh, ("data", "model"))
  step = jax.jit(functools.partial(apply_step, tx), donate_argnums=(0, 1),
                 out_shardings=(NamedSharding(mesh, P()), shardings))
  x, y, batches = problem(12)
  for idx in batches:
    batch = (x[idx], y[idx], idx)
    if batch_spec is not None:
      batch = jax.device_put(batch, NamedSharding(mesh, batch_spec))
    params, state = step(params, state, *batch)
  assert_matches_reference(params, state, "last", 12)


def test_batch_on_another_mesh_is_a_clear_error():
  """Only reachable eagerly (jit rejects inputs on different meshes first)."""
  mesh = explicit_mesh()
  other = jax.make_mesh((4, 2), ("a", "b"))
  table = jax.device_put(jnp.zeros(N), NamedSharding(mesh, P("data")))
  idx = jax.device_put(jnp.arange(8, dtype=jnp.int32),
                       NamedSharding(other, P("a")))
  with pytest.raises(ValueError, match=re.escape(
      "jax.device_put(batch, NamedSharding(mesh, P()))")):
    _tables.take(table, idx)
  with pytest.raises(ValueError, match="another mesh"):
    _tables.write(table, idx, jnp.ones(8), lowest=True)


def test_unplaced_batch_step_moves_no_table():
  """Handling an unplaced batch costs O(batch): no [N] collective or copy."""
  n_ex = 8 * 512
  mesh = explicit_mesh()
  tx = ao.aalig(0.5, n_ex, 10, 1000)
  params, state, shardings = placed(tx, mesh, "data")
  x, y, _ = problem(16)
  step = jax.jit(functools.partial(apply_step, tx), donate_argnums=(0, 1),
                 out_shardings=(NamedSharding(mesh, P()), shardings))
  text = step.lower(params, state, x[:12], y[:12],
                    np.arange(12, dtype=np.int32)).compile().as_text()
  hlo_checks.assert_no_table_traffic(text, (n_ex, n_ex // 8), n_ex // 8)
