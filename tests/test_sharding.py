"""Scale-out: AALIG on many devices under jit+sharding, shard_map and pmap.

The root conftest gives 8 simulated CPU devices. Every multi-device run must
reproduce the single-device run (params, tables, counters) up to float32
reduction order, whatever the number of devices, the table layout
(replicated or split along the example axis) and the parallel API. The
state's shardings are stable across steps, a donated step moves and copies
no table, and a table split over a `shard_map` axis is refused in words.
Batches placed (or not) on explicit meshes: test_sharding_explicit_mesh.py.
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

N, D, B = 64, 4, 16            # examples, features, global batch
STEPS_PER_EPOCH, EPOCHS_PER_SECTION = 2, 1
NUM_STEPS = 7                  # section ends after steps 2, 4 and 6
NUM_DEVICES = (1, 2, 4, 8)
TOL = dict(rtol=2e-5, atol=2e-6)

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 (simulated) devices; see conftest")


def make_tx(axis_name=None, loss_estimate="last", table_dtype=jnp.float32):
  return ao.aalig(0.5, N, STEPS_PER_EPOCH, EPOCHS_PER_SECTION, momentum=0.9,
                  loss_estimate=loss_estimate, table_dtype=table_dtype,
                  axis_name=axis_name)


def problem():
  """Least squares that no w interpolates, and a fixed stream of batches."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N, D)).astype(np.float32)
  y = (x @ rng.normal(size=D) + rng.normal(size=N)).astype(np.float32)
  order = np.concatenate([rng.permutation(N) for _ in range(2)])
  idx = [order[k * B:(k + 1) * B].astype(np.int32) for k in range(NUM_STEPS)]
  return x, y, idx


X, Y, BATCHES = problem()


def init_params():
  return {"w": jnp.zeros(D, jnp.float32), "b": jnp.zeros([], jnp.float32)}


def losses_and_grads(params, x, y):
  """Per-example losses and the gradient of their (local) mean."""
  def mean_loss(p):
    losses = 0.5 * (x @ p["w"] + p["b"] - y) ** 2
    return jnp.mean(losses), losses
  (_, losses), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
  return losses, grads


def apply_step(tx, params, state, x, y, idx, grads_axis=None):
  losses, grads = losses_and_grads(params, x, y)
  if grads_axis is not None:  # equal local batches: the mean of local means
    grads = jax.lax.pmean(grads, grads_axis)
  updates, state = tx.update(grads, state, params, losses=losses, indices=idx)
  return optax.apply_updates(params, updates), state


def mesh_of(n, axis_type=AxisType.Explicit):
  return jax.make_mesh((n,), ("data",), axis_types=(axis_type,),
                       devices=jax.devices()[:n])


@functools.lru_cache(maxsize=None)
def reference_run(loss_estimate="last"):
  """The single-device run every other run must match."""
  tx = make_tx(loss_estimate=loss_estimate)
  step = jax.jit(functools.partial(apply_step, tx))
  params, state = init_params(), tx.init(init_params())
  for idx in BATCHES:
    params, state = step(params, state, X[idx], Y[idx], idx)
  return jax.device_get((params, state))


def placed_on_mesh(tx, mesh, table_axis):
  """Replicated params, the state laid out by state_shardings, donated step."""
  params = jax.device_put(init_params(), NamedSharding(mesh, P()))
  shardings = ao.state_shardings(jax.eval_shape(tx.init, params), mesh,
                                 table_axis=table_axis)
  state = jax.jit(tx.init, out_shardings=shardings)(params)
  step = jax.jit(functools.partial(apply_step, tx), donate_argnums=(0, 1),
                 out_shardings=(NamedSharding(mesh, P()), shardings))
  return params, state, step


def run_jit_sharded(n, table_axis, axis_type=AxisType.Explicit,
                    loss_estimate="last"):
  """jit + NamedSharding: batch split over `n` devices, state placed."""
  mesh = mesh_of(n, axis_type)
  tx = make_tx(loss_estimate=loss_estimate)
  params, state, step = placed_on_mesh(tx, mesh, table_axis)
  batch = NamedSharding(mesh, P("data"))
  for idx in BATCHES:
    x, y, i = jax.device_put((X[idx], Y[idx], idx), batch)
    params, state = step(params, state, x, y, i)
  return params, state


def shard_map_step(tx, params, state, x, y, idx):
  """The body under shard_map: each device holds B/n rows of the batch."""
  n = jax.lax.axis_size("data")

  def share_of_mean(p):  # this device's share of the global mean loss
    losses = 0.5 * (x @ p["w"] + p["b"] - y) ** 2
    return jnp.sum(losses) / (losses.shape[0] * n), losses

  # params are replicated (invariant), so shard_map's autodiff sums the
  # devices' shares: grads is the gradient of the global mean.
  (_, losses), grads = jax.value_and_grad(share_of_mean, has_aux=True)(params)
  updates, state = tx.update(grads, state, params, losses=losses, indices=idx)
  return optax.apply_updates(params, updates), state


def placed_for_shard_map(tx, mesh):
  """Replicated params and state, and the donated shard_map step."""
  step = jax.jit(jax.shard_map(
      functools.partial(shard_map_step, tx), mesh=mesh,
      in_specs=(P(), P(), P("data"), P("data"), P("data")),
      out_specs=(P(), P())), donate_argnums=(0, 1))
  params = jax.device_put(init_params(), NamedSharding(mesh, P()))
  state = jax.device_put(tx.init(params), NamedSharding(mesh, P()))
  return params, state, step


def run_shard_map(n):
  mesh = mesh_of(n)
  tx = make_tx(axis_name="data")
  params, state, step = placed_for_shard_map(tx, mesh)
  batch = NamedSharding(mesh, P("data"))
  for idx in BATCHES:
    x, y, i = jax.device_put((X[idx], Y[idx], idx), batch)
    params, state = step(params, state, x, y, i)
  return params, state


def run_pmap(n):
  """Returns the per-replica params and state, with a leading axis [n]."""
  tx = make_tx(axis_name="data")
  step = jax.pmap(functools.partial(apply_step, tx, grads_axis="data"),
                  axis_name="data", devices=jax.devices()[:n],
                  donate_argnums=(0, 1))
  replicate = lambda t: jax.tree.map(lambda a: np.stack([a] * n), t)
  params = replicate(init_params())
  state = replicate(jax.device_get(tx.init(init_params())))
  split = lambda a: a.reshape((n, B // n) + a.shape[1:])
  for idx in BATCHES:
    params, state = step(params, state, split(X[idx]), split(Y[idx]),
                         split(idx))
  return params, state


def assert_matches_reference(params, state, loss_estimate="last"):
  ref_params, ref_state = reference_run(loss_estimate)
  chex.assert_trees_all_close(jax.device_get(params), ref_params, **TOL)
  chex.assert_trees_all_close(jax.device_get(state), ref_state, **TOL)
  core = jax.device_get(state)[0]
  assert int(core.num_sections) == NUM_STEPS // (
      STEPS_PER_EPOCH * EPOCHS_PER_SECTION)
  assert int(core.num_skipped) == 0 and int(core.num_invalid) == 0


def test_reference_run_moves_the_aovs():
  """The runs compared below do cross section ends that change the tables."""
  _, state = reference_run()
  aov = np.asarray(state[0].aov)
  assert int(state[0].num_sections) == 3
  assert np.count_nonzero(aov) > N // 2
  assert np.isnan(np.asarray(state[0].last_loss)).sum() < N


@pytest.mark.parametrize("table_axis", [None, "data"])
@pytest.mark.parametrize("n", NUM_DEVICES)
def test_jit_sharding_matches_single_device(n, table_axis):
  params, state = run_jit_sharded(n, table_axis)
  assert_matches_reference(params, state)
  spec = P("data") if table_axis else P()
  for table in (state[0].aov, state[0].aov_step, state[0].last_loss):
    assert table.sharding.spec == spec
    # Each device holds N/n rows of a split table, all N of a replicated one.
    rows = N // n if table_axis else N
    chex.assert_equal({s.data.shape for s in table.addressable_shards},
                      {(rows,)})


@pytest.mark.parametrize("table_axis", [None, "data"])
def test_jit_sharding_auto_axes_and_best_epoch(table_axis):
  """Auto (not Explicit) mesh axes, and the extra best_loss table."""
  params, state = run_jit_sharded(8, table_axis, axis_type=AxisType.Auto,
                                  loss_estimate="best_epoch")
  assert_matches_reference(params, state, loss_estimate="best_epoch")
  assert state[0].best_loss.sharding.spec == (
      P("data") if table_axis else P())


@pytest.mark.parametrize("n", NUM_DEVICES)
def test_shard_map_matches_single_device(n):
  params, state = run_shard_map(n)
  assert_matches_reference(params, state)


@pytest.mark.parametrize("n", NUM_DEVICES)
def test_pmap_matches_single_device_and_replicas_agree(n):
  params, state = run_pmap(n)
  params, state = jax.device_get((params, state))
  for r in range(n):
    assert_matches_reference(jax.tree.map(lambda a, r=r: a[r], params),
                             jax.tree.map(lambda a, r=r: a[r], state))
  # After the section updates, every replica holds bit-identical tables.
  core = state[0]
  for table in (core.aov, core.aov_step, core.last_loss):
    for r in range(1, n):
      np.testing.assert_array_equal(table[r], table[0])


def test_pmap_section_update_keeps_replicas_identical_with_uneven_batches():
  """Replicas see different rows, padding and losses; tables stay equal."""
  n = 8
  tx = ao.scale_by_aalig(0.5, N, steps_per_epoch=1, epochs_per_section=1,
                         axis_name="i")

  def update(state, losses, idx, mask):
    _, state = tx.update(jnp.ones(3), state, losses=losses, indices=idx,
                         mask=mask)
    return state

  step = jax.pmap(update, axis_name="i", devices=jax.devices()[:n])
  rng = np.random.default_rng(1)
  state = jax.tree.map(lambda a: np.stack([a] * n),
                       jax.device_get(tx.init(None)))
  for _ in range(3):
    idx = rng.permutation(N)[:n * 4].reshape(n, 4).astype(np.int32)
    losses = rng.uniform(0, 2, size=(n, 4)).astype(np.float32)
    mask = rng.uniform(size=(n, 4)) < 0.75
    state = step(state, losses, idx, mask)
    core = jax.device_get(state)
    assert (core.num_sections == core.num_sections[0]).all()
    assert core.num_sections[0] >= 1
    for table in (core.aov, core.aov_step, core.last_loss):
      for r in range(1, n):
        np.testing.assert_array_equal(table[r], table[0])
    # Every replica recorded every replica's unmasked rows.
    seen = ~np.isnan(core.last_loss[0])
    assert seen[idx[mask]].all()


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("table_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("table_axis", [None, "data"])
def test_state_types_and_shardings_are_stable(table_axis, table_dtype,
                                              axis_type):
  """jax.typeof and .sharding of every leaf: init == update == jit(update)."""
  mesh = mesh_of(8, axis_type)
  tx = make_tx(table_dtype=table_dtype)
  params = jax.device_put(init_params(), NamedSharding(mesh, P()))
  abstract = jax.eval_shape(tx.init, params)
  shardings = ao.state_shardings(abstract, mesh, table_axis=table_axis)
  state = jax.jit(tx.init, out_shardings=shardings)(params)

  def assert_same_types(tree, ref):
    chex.assert_trees_all_equal_structs(tree, ref)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref)):
      chex.assert_equal(jax.typeof(a), jax.typeof(b))
      assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (
          a.sharding, b.sharding)

  first = state
  chex.assert_trees_all_equal_shapes_and_dtypes(state, abstract)
  assert jax.tree.map(lambda a: a.sharding, state) == shardings
  assert state[0].aov.dtype == table_dtype
  batch = NamedSharding(mesh, P("data"))
  idx = BATCHES[0]
  x, y, i = jax.device_put((X[idx], Y[idx], idx), batch)
  # jit with no out_shardings: the layout must come back unchanged...
  step = jax.jit(functools.partial(apply_step, tx))
  for _ in range(STEPS_PER_EPOCH * EPOCHS_PER_SECTION):  # ...over a section end
    params, state = step(params, state, x, y, i)
    assert_same_types(state, first)
  assert int(state[0].num_sections) == 1
  # ...and the abstract evaluation of update agrees with the concrete one.
  _, abstract_out = jax.eval_shape(functools.partial(apply_step, tx), params,
                                   state, x, y, i)
  chex.assert_trees_all_equal_shapes_and_dtypes(abstract_out, state)


def test_init_accepts_shape_dtype_structs():
  mesh = mesh_of(8)
  tx = make_tx()
  rep = NamedSharding(mesh, P())
  abstract_params = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
      init_params())
  concrete = tx.init(init_params())
  for abstract in (jax.eval_shape(tx.init, abstract_params),
                   tx.init(abstract_params)):
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract, concrete)
  shardings = ao.state_shardings(jax.eval_shape(tx.init, abstract_params),
                                 mesh, table_axis="data")
  # Lowering for abstract params, e.g. to compile before any data exists.
  compiled = jax.jit(tx.init, out_shardings=shardings).lower(
      abstract_params).compile()
  state = compiled(jax.device_put(init_params(), rep))
  assert state[0].aov.sharding.spec == P("data")


def test_state_shardings_layout_and_errors():
  mesh = mesh_of(8)
  tx = make_tx(loss_estimate="best_epoch")
  abstract = jax.eval_shape(tx.init, init_params())
  sharded = ao.state_shardings(abstract, mesh, table_axis="data")
  replicated = ao.state_shardings(abstract, mesh)
  core = sharded[0]
  for name in ("aov", "aov_step", "last_loss", "best_loss"):
    assert getattr(core, name).spec == P("data"), name
    assert getattr(replicated[0], name).spec == P(), name
  for name in ("count", "step_size", "num_sections", "best_epoch_mean"):
    assert getattr(core, name).spec == P(), name
  chex.assert_equal(jax.tree.structure(sharded), jax.tree.structure(abstract))
  assert all(s.spec == P() for s in jax.tree.leaves(sharded[1]))
  # Works inside any chain holding the state, e.g. apply_if_finite.
  wrapped = optax.apply_if_finite(tx, 3)
  w_abstract = jax.eval_shape(wrapped.init, init_params())
  w_sharded = ao.state_shardings(w_abstract, mesh, table_axis="data")
  chex.assert_equal(jax.tree.structure(w_sharded),
                    jax.tree.structure(w_abstract))
  mesh2 = jax.make_mesh((4, 2), ("data", "model"),
                        axis_types=(AxisType.Explicit,) * 2)
  two = ao.state_shardings(abstract, mesh2, table_axis=("data", "model"))
  assert two[0].aov.spec == P(("data", "model"))
  with pytest.raises(ValueError, match="table_axis"):
    ao.state_shardings(abstract, mesh, table_axis="batch")


def _compiled_step_text(n, table_axis, num_examples, **kwargs):
  mesh = mesh_of(n)
  tx = ao.aalig(0.5, num_examples, 10, 1000, **kwargs)
  params = jax.device_put(init_params(), NamedSharding(mesh, P()))
  shardings = ao.state_shardings(jax.eval_shape(tx.init, params), mesh,
                                 table_axis=table_axis)
  state = jax.jit(tx.init, out_shardings=shardings)(params)
  batch = NamedSharding(mesh, P("data"))
  x, y, i = jax.device_put((X[:B], Y[:B], np.arange(B, dtype=np.int32)),
                           batch)
  step = jax.jit(functools.partial(apply_step, tx), donate_argnums=(0, 1),
                 out_shardings=(NamedSharding(mesh, P()), shardings))
  return step.lower(params, state, x, y, i).compile().as_text()


@pytest.mark.parametrize("kwargs", [
    {}, dict(loss_estimate="best_epoch", table_dtype=jnp.bfloat16),
    dict(aov_rule="reflect")])
def test_donated_step_copies_no_table(kwargs):
  """A step is O(batch): XLA copies no [N] table, and only best_epoch's
  epoch end is a branch."""
  n_ex = 4096
  text = _compiled_step_text(1, None, n_ex, **kwargs)
  copies = [l for l in text.splitlines()
            if re.search(rf"\[{n_ex}\]\S* copy\(", l)]
  assert not copies, copies[:3]
  branches = len(re.findall(r"conditional\(", text))
  assert branches == (kwargs.get("loss_estimate") == "best_epoch")
  assert not re.search(r" while\(", text)


@pytest.mark.parametrize("table_axis", [None, "data"])
def test_multi_device_step_moves_no_table(table_axis):
  """On 8 devices with a sharded batch, no collective moves table rows.

  Only batch-sized arrays and scalars cross devices, whether the tables are
  split (N/8 rows each) or replicated, and no table is copied.
  """
  n_ex = 8 * 512
  local = n_ex // 8 if table_axis else n_ex
  text = _compiled_step_text(8, table_axis, n_ex)
  # The batch's rows and the scalar sums do move.
  assert hlo_checks.collectives(text)
  hlo_checks.assert_no_table_traffic(text, (n_ex, n_ex // 8), local)


@pytest.mark.parametrize("table_axis", [None, "data"])
def test_auto_mesh_repeated_rows_keep_their_lowest_on_every_device(
    table_axis):
  """Under jit with Auto axes and a split batch, an index that rows on
  several devices write keeps its lowest value in every copy of the table
  (GPU scatters do not order duplicates), with no table-sized collective."""
  mesh = mesh_of(8, AxisType.Auto)
  n_ex = 8 * 512
  table = jax.device_put(jnp.zeros(n_ex), NamedSharding(
      mesh, P(table_axis)))
  batch = NamedSharding(mesh, P("data"))
  idx = jax.device_put(np.arange(B, dtype=np.int32) % (B // 2), batch)
  values = jax.device_put(np.arange(B, 0, -1, dtype=np.float32), batch)
  write = jax.jit(lambda t, i, v: _tables.write(t, i, v, lowest=True),
                  donate_argnums=(0,))
  text = write.lower(table, idx, values).compile().as_text()
  hlo_checks.assert_no_table_traffic(
      text, (n_ex, n_ex // 8), n_ex // 8 if table_axis else n_ex)
  written = write(table, idx, values)
  want = np.zeros(n_ex, np.float32)
  want[:B // 2] = np.arange(B // 2, 0, -1)
  for shard in written.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data),
                                  want[shard.index])


def test_process_example_range_splits_the_index_space():
  for n_ex in (0, 1, 7, 64, 10**9 + 7):
    for count in (1, 2, 3, 8):
      ranges = [ao.process_example_range(n_ex, p, count) for p in range(count)]
      assert ranges[0].start == 0 and ranges[-1].stop == n_ex
      for a, b in zip(ranges, ranges[1:]):
        assert a.stop == b.start
      assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
  assert ao.process_example_range(10) == range(0, 10)  # one process here
  with pytest.raises(ValueError):
    ao.process_example_range(10, 2, 2)


@pytest.mark.parametrize("table_axis", [None, "data"])
def test_simulated_multihost_matches_single_device(table_axis):
  """4 'processes' x 2 devices: each feeds rows of its own index range.

  Each process draws its share of every global batch from
  process_example_range and hands it to its own devices only
  (make_array_from_single_device_arrays, as
  make_array_from_process_local_data does on a real pod). The global batch
  is the concatenation in process order; the single-device reference run on
  the same global batches must agree.
  """
  num_procs, per_proc = 4, 2
  mesh = mesh_of(num_procs * per_proc)
  devices = list(mesh.devices.flat)
  proc_devices = [devices[p * per_proc:(p + 1) * per_proc]
                  for p in range(num_procs)]
  rng = np.random.default_rng(5)
  ranges = [ao.process_example_range(N, p, num_procs)
            for p in range(num_procs)]
  local_b = B // num_procs
  global_batches = []
  for _ in range(NUM_STEPS):
    parts = [rng.choice(np.asarray(r), local_b, replace=False) for r in ranges]
    global_batches.append(np.concatenate(parts).astype(np.int32))

  tx = make_tx()
  batch = NamedSharding(mesh, P("data"))
  params, state, step = placed_on_mesh(tx, mesh, table_axis)

  def from_processes(rows_of):
    """Assembles a global array from each simulated process's local rows."""
    shards = []
    for p, devs in enumerate(proc_devices):
      local = rows_of(p)  # only process p's own examples
      rows = len(local) // per_proc
      for k, d in enumerate(devs):
        part = local[k * rows:(k + 1) * rows]
        shards.append(jax.device_put(part, d))
    shape = (B,) + shards[0].shape[1:]
    return jax.make_array_from_single_device_arrays(shape, batch, shards)

  for g in global_batches:
    local = lambda p, g=g: g[p * local_b:(p + 1) * local_b]
    for p in range(num_procs):
      assert set(local(p).tolist()) <= set(ranges[p])
    x = from_processes(lambda p: X[local(p)])
    y = from_processes(lambda p: Y[local(p)])
    i = from_processes(local)
    params, state = step(params, state, x, y, i)

  ref_tx = make_tx()
  ref_step = jax.jit(functools.partial(apply_step, ref_tx))
  ref_params, ref_state = init_params(), ref_tx.init(init_params())
  for g in global_batches:
    ref_params, ref_state = ref_step(ref_params, ref_state, X[g], Y[g], g)
  chex.assert_trees_all_close(jax.device_get(params),
                              jax.device_get(ref_params), **TOL)
  chex.assert_trees_all_close(jax.device_get(state),
                              jax.device_get(ref_state), **TOL)


def test_docs_scaling_example_runs(capsys):
  """The first Python block of docs/scaling.md runs and prints its claim."""
  import pathlib
  text = (pathlib.Path(__file__).resolve().parents[1] / "docs" /
          "scaling.md").read_text()
  code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
  exec(compile(code, "docs/scaling.md", "exec"), {})  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert "P('data',) (125000,)" in out, out


def test_multihost_example_in_process():
  """examples/multihost.py --in-process: 4 simulated hosts match one device."""
  import os
  import pathlib
  import subprocess
  import sys
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # the script sets its own device count
  run = subprocess.run(
      [sys.executable, "-m", "examples.multihost", "--in-process"], cwd=root,
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "loads examples [1024, 2048)" in run.stdout
  assert "same params and tables as on one device" in run.stdout


def test_reflect_rule_and_initial_aov_on_a_split_table():
  """aov_rule="reflect" with a starting table, tables split over 8 devices:
  the single-device run, to float32 rounding."""
  start = jnp.asarray(np.random.default_rng(1).uniform(0, 2, N), jnp.float32)
  make = lambda: ao.aalig(0.5, N, STEPS_PER_EPOCH, EPOCHS_PER_SECTION,
                          momentum=0.9, aov_rule="reflect", initial_aov=start)
  tx = make()
  step = jax.jit(functools.partial(apply_step, tx))
  ref = init_params(), tx.init(init_params())
  mesh = mesh_of(8)
  params, state, sharded_step = placed_on_mesh(make(), mesh, "data")
  batch = NamedSharding(mesh, P("data"))
  for idx in BATCHES:
    ref = step(*ref, X[idx], Y[idx], idx)
    x, y, i = jax.device_put((X[idx], Y[idx], idx), batch)
    params, state = sharded_step(params, state, x, y, i)
  # The reached AOVs are differences of losses of similar size (l - (a - l)),
  # so the sum order's rounding shows a little more in absolute terms.
  chex.assert_trees_all_close(jax.device_get((params, state)),
                              jax.device_get(ref), rtol=TOL["rtol"],
                              atol=2e-5)
  assert state[0].aov.sharding.spec == P("data")
  assert int(state[0].num_sections) == 3
  # The run moved the starting AOVs.
  assert not np.allclose(np.asarray(state[0].aov), np.asarray(start))


def _batches_with_repeated_indices():
  """Each batch's second half repeats the first half's indices with other
  rows' features, so that each repeated index has two different losses, one
  on each half of the devices."""
  half = B // 2
  return [(rows, np.concatenate([rows[:half], rows[:half]]))
          for rows in BATCHES]


_DATA_PARALLEL_RUNS = ["jit_explicit", "jit_explicit_split", "jit_auto",
                       "jit_auto_split", "shard_map", "pmap"]


@pytest.mark.parametrize("run,loss_estimate,table_dtype", [
    *((run, "last", jnp.float32) for run in _DATA_PARALLEL_RUNS),
    # best_epoch records through its own cond; 16-bit tables compare the
    # rows' bits after rounding.
    *((run, "best_epoch", jnp.float32) for run in _DATA_PARALLEL_RUNS),
    ("jit_explicit_split", "last", jnp.bfloat16),
    ("shard_map", "last", jnp.float16),
])
def test_repeated_indices_across_devices_match_single_device(
    run, loss_estimate, table_dtype):
  """An index repeated on two devices records the same (lowest) loss, and
  the devices of a mesh agree, on every way of running data-parallel."""
  batches = _batches_with_repeated_indices()
  config = dict(loss_estimate=loss_estimate, table_dtype=table_dtype)
  tx = make_tx(axis_name="data" if run in ("shard_map", "pmap") else None,
               **config)
  one = jax.jit(functools.partial(apply_step, make_tx(**config)))
  ref = (init_params(), make_tx(**config).init(init_params()))
  for rows, idx in batches:
    losses, _ = losses_and_grads(ref[0], X[rows], Y[rows])
    ref = one(*ref, X[rows], Y[rows], idx)
  ref = jax.device_get(ref)
  # The reference itself keeps each repeated index's lowest loss (of the
  # last batch's, at the params before its step), rounded to the table's
  # dtype.
  half = B // 2
  lowest = jnp.minimum(losses[:half], losses[half:]).astype(table_dtype)
  chex.assert_trees_all_close(
      ref[1][0].last_loss[idx[:half]], lowest,
      rtol=1e-6 if table_dtype == jnp.float32 else 1e-2)
  assert np.any(np.asarray(losses[:half]) != np.asarray(losses[half:]))

  if run == "pmap":
    step = jax.pmap(functools.partial(apply_step, tx, grads_axis="data"),
                    axis_name="data", donate_argnums=(0, 1))
    rep = lambda t: jax.tree.map(lambda a: np.stack([a] * 8), t)
    params, state = rep(init_params()), rep(jax.device_get(
        tx.init(init_params())))
    split = lambda a: a.reshape((8, B // 8) + a.shape[1:])
    for rows, idx in batches:
      params, state = step(params, state, split(X[rows]), split(Y[rows]),
                           split(idx))
    params, state = jax.device_get((params, state))
    for r in range(1, 8):
      np.testing.assert_array_equal(state[0].last_loss[r],
                                    state[0].last_loss[0])
    params, state = jax.tree.map(lambda a: a[0], (params, state))
  else:
    if run == "shard_map":
      mesh = mesh_of(8)
      params, state, step = placed_for_shard_map(tx, mesh)
    else:
      axis_type = AxisType.Auto if "auto" in run else AxisType.Explicit
      mesh = mesh_of(8, axis_type)
      table_axis = "data" if run.endswith("split") else None
      params, state, step = placed_on_mesh(tx, mesh, table_axis)
    batch = NamedSharding(mesh, P("data"))
    for rows, idx in batches:
      x, y, i = jax.device_put((X[rows], Y[rows], idx), batch)
      params, state = step(params, state, x, y, i)
    for shard in state[0].last_loss.addressable_shards[1:]:
      first = state[0].last_loss.addressable_shards[0]
      if shard.index == first.index:
        np.testing.assert_array_equal(shard.data, first.data)
    params, state = jax.device_get((params, state))
  # Float32 sums in another order may round a 16-bit entry the other way.
  tol = TOL if table_dtype == jnp.float32 else dict(
      TOL, rtol=2 * float(jnp.finfo(table_dtype).eps))
  chex.assert_trees_all_close((params, state), ref, **tol)


@pytest.mark.skipif(jax.device_count() < 8,
                    reason="needs 8 (simulated) devices; see conftest")
def test_split_tables_under_shard_map_are_refused_in_words():
  n_dev = 8
  mesh = jax.make_mesh((n_dev,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  tx = ao.scale_by_aalig(1.0, num_examples=64, steps_per_epoch=4,
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
