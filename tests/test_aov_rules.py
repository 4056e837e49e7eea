"""AOV rules (``aov_rule=``), starting AOVs (``initial_aov=``), loss_table."""

from __future__ import annotations

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aalig_optax as ao
from aalig_optax import _aov
from tests.test_sections import aov_tables
from tests.test_sections import apply_rule_and_check_invariants


def _run(tx, steps=24, n=48, b=8, seed=0):
  """A few sections of a least-squares problem; the final optimiser state."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, 5)), jnp.float32)
  y = x @ jnp.arange(1.0, 6.0) + jnp.asarray(rng.normal(size=n), jnp.float32)

  def losses_fn(w, idx):
    return (x[idx] @ w - y[idx]) ** 2

  @jax.jit
  def step(w, s, idx):
    losses, vjp = jax.vjp(lambda w: losses_fn(w, idx), w)
    (g,) = vjp(jnp.full(idx.shape, 1.0 / idx.shape[0]))
    u, s = tx.update(g, s, w, losses=losses, indices=idx)
    return optax.apply_updates(w, u), s

  w = jnp.zeros(5)
  s = tx.init(w)
  for k in range(steps):
    w, s = step(w, s, jnp.asarray(rng.permutation(n)[:b], jnp.int32))
  del k
  return w, s


# --------------------------------------------------------------------------
# The paper's rule stays the default, bit for bit.

def test_default_rule_is_the_paper_rule_bit_for_bit():
  make = lambda **kw: ao.aalig(0.5, 48, 6, 1, momentum=0.5, **kw)
  ref = _run(make())
  for rule in ("paper", ao.update_aovs):
    # (The static config names the rule as given.)
    chex.assert_trees_all_equal(jax.tree.leaves(_run(make(aov_rule=rule))),
                                jax.tree.leaves(ref))
  assert int(ref[1][0].num_sections) == 4


def test_reflect_rule_changes_only_what_it_should():
  """The same run with "reflect": the AOVs differ once a section end found
  reached AOVs, and never-seen examples keep the initial AOV."""
  paper = _run(ao.aalig(0.5, 60, 6, 1), n=48)[1][0]
  reflect = _run(ao.aalig(0.5, 60, 6, 1, aov_rule="reflect"), n=48)[1][0]
  paper_aov = np.asarray(ao.current_aovs(paper)[0])
  reflect_aov = np.asarray(ao.current_aovs(reflect)[0])
  assert not np.array_equal(paper_aov, reflect_aov)
  np.testing.assert_array_equal(reflect_aov[48:], 0.0)
  seen = ~np.isnan(np.asarray(reflect.last_loss))
  # After a section end every seen AOV lies at or below the loss it used.
  assert np.all(reflect_aov[seen]
                <= np.asarray(reflect.last_loss)[seen] + 1e-6)


def test_aov_rule_is_checked():
  with pytest.raises(ValueError, match="aov_rule"):
    ao.aalig(1.0, 8, 2, 1, aov_rule="papers")
  with pytest.raises(ValueError, match="aov_rule"):
    ao.scale_by_aalig(1.0, 8, 2, 1, aov_rule=3)
  bad = lambda aov, step, est, bound: (aov[:4], step)
  with pytest.raises(ValueError, match="aov_rule returned aov of shape"):
    _run(ao.aalig(0.5, 48, 6, 1, aov_rule=bad))


def test_a_callable_rule_runs_under_jit_in_the_table_dtype():
  calls = []

  def halve(aov, step, est, bound):
    calls.append(1)
    return jnp.where(jnp.isnan(est), aov, jnp.maximum(est / 2, bound)), step

  _, s = _run(ao.aalig(0.5, 48, 6, 1, aov_rule=halve,
                       table_dtype=jnp.bfloat16))
  core = s[0]
  assert core.aov.dtype == jnp.bfloat16 and calls
  seen = ~np.isnan(np.asarray(core.last_loss, np.float32))
  assert np.all(np.asarray(core.aov, np.float32)[seen] >= 0)


# --------------------------------------------------------------------------
# Properties of the reflect rule.

def _apply_and_check_the_shared_half(rule, tables):
  """`rule` on `tables`, checked where every rule here agrees: never below
  the lower bound, never-seen rows untouched bit for bit, and rows not
  reached moved exactly as the paper's rule moves them. Returns the new
  tables, the reached and not-reached masks, and the paper's tables."""
  aov, step, est, lower = tables
  new_aov, new_step, reached, missed = apply_rule_and_check_invariants(
      rule, tables)
  p_aov, p_step = ao.update_aovs(jnp.asarray(aov), jnp.asarray(step),
                                 jnp.asarray(est), lower)
  p_aov, p_step = np.asarray(p_aov), np.asarray(p_step)
  np.testing.assert_array_equal(new_aov[missed], p_aov[missed])
  np.testing.assert_array_equal(new_step[missed], p_step[missed])
  return new_aov, new_step, reached, missed, p_aov, p_step


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(aov_tables())
def test_reflect_rule_properties(tables):
  aov, step, est, lower = tables
  new_aov, new_step, reached, missed, p_aov, p_step = (
      _apply_and_check_the_shared_half(ao.update_aovs_reflect, tables))
  lower = np.float32(lower)
  seen = ~np.isnan(est)
  # Reached: at or below the loss reached (or at the bound, for a loss below
  # it), by at least a quarter of its distance to the bound, and at or below
  # where the paper's rule would put it; the step kept.
  r_est, r_new = est[reached], new_aov[reached]
  tol = 1e-5 * (1 + np.abs(r_est))
  assert np.all(r_new <= np.maximum(r_est, lower) + tol)
  assert np.all((r_new <= r_est - (r_est - lower) / 4 + tol)
                | (r_new <= lower + tol))
  assert np.all(r_new <= np.asarray(p_aov)[reached] + tol)
  np.testing.assert_array_equal(new_step[reached], step[reached])
  assert np.all(np.isfinite(new_aov[seen]))


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(st.floats(2.0**-10, 2.0**10, width=32), st.floats(1.0, 100.0),
                  st.integers(1, 8))
def test_reflect_undoes_an_overshoot_in_one_section(loss, overshoot, sections):
  """However far an AOV overshot its loss, and however small its last step,
  one section end puts it below the loss: the gap of a frozen run turns
  positive again; the paper's rule needs many sections for the same."""
  aov = jnp.array([loss * (1 + overshoot)], jnp.float32)
  step = jnp.array([loss * 1e-3], jnp.float32)
  est = jnp.array([loss], jnp.float32)
  new, _ = ao.update_aovs_reflect(aov, step, est)
  assert float(new[0]) <= 0.75 * loss * (1 + 1e-6)
  paper = aov
  for _ in range(sections):
    paper, _ = ao.update_aovs(paper, step, est)
  assert float(paper[0]) > loss


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_reflect_stays_finite_at_the_dtype_limits(dtype):
  big = float(jnp.finfo(dtype).max)
  aov = jnp.array([big, big, 0.0, big], dtype)
  step = jnp.array([big, 0.0, big, big], dtype)
  est = jnp.array([-big, big, -big, 0.0], dtype)
  new, new_step = ao.update_aovs_reflect(aov, step, est, -big)
  assert new.dtype == dtype and new_step.dtype == dtype
  assert np.all(np.isfinite(np.asarray(new, np.float32)))
  assert np.all(np.asarray(new, np.float32) >= -big)


def test_reflect_removes_the_freeze_of_section_5_1_rank_4():
  """The stall case of the issue, in the paper's settings (Sec. 5.1's rank-4
  matrix factorisation, momentum 0, maximal step size 1, 50 epochs, K = 10),
  on 3 seeds: the paper's rule ends with (almost) every step of the last
  section zero; the reflect rule never freezes and ends within 1% of the
  loss floor on every seed."""
  from benchmarks import aov_rules
  from benchmarks import tasks
  task = tasks.make_task("mf_rank4", "cpu", 3, 3)
  runner = aov_rules.Runner(task)
  paper = runner.run("paper", 0.0, [1.0], range(3))
  reflect = runner.run("reflect", 0.0, [1.0], range(3))
  assert np.mean([r["zero_share_last"] for r in paper]) > 0.5
  assert max(r["zero_share_last"] for r in reflect) < 0.05
  assert max(r["final_train_loss"] for r in reflect) < 1.01 * task.loss_floor


# --------------------------------------------------------------------------
# Properties of the anneal rule.

@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(aov_tables())
def test_anneal_rule_properties(tables):
  aov, step, est, lower = tables
  new_aov, new_step, reached, missed, p_aov, p_step = (
      _apply_and_check_the_shared_half(_aov.update_aovs_anneal, tables))
  lower = np.float32(lower)
  seen = ~np.isnan(est)
  # Reached: at or below where the paper's rule puts it, at most halfway
  # from the AOV down to its loss (or at the bound), and the step doubled.
  a, r_est, r_new = aov[reached], est[reached], new_aov[reached]
  tol = 1e-5 * (1 + np.abs(a) + np.abs(r_est))
  assert np.all(r_new <= np.asarray(p_aov)[reached] + tol)
  assert np.all((r_new <= a / 2 + r_est / 2 + tol) | (r_new <= lower + tol))
  np.testing.assert_array_equal(new_step[reached],
                                np.float32(2) * step[reached])
  assert np.all(np.isfinite(new_aov[seen]))


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(st.floats(2.0**-10, 2.0**10, width=32),
                  st.floats(1.0, 1e4), st.floats(1e-6, 1e-1))
def test_anneal_crosses_a_frozen_loss_in_few_sections(loss, overshoot, step):
  """An AOV far above a loss that no longer moves (a frozen run), with a
  tiny last step: below the loss after about log4(overshoot / step) section
  ends (at most 20 here), where the paper's rule needs overshoot / (step/2)."""
  aov = jnp.array([loss * (1 + overshoot)], jnp.float32)
  d = jnp.array([loss * step], jnp.float32)
  est = jnp.array([loss], jnp.float32)
  bound = np.log(overshoot / step) / np.log(4) + 3
  a, s = aov, d
  for k in range(1, 21):
    a, s = _aov.update_aovs_anneal(a, s, est)
    if float(a[0]) < loss:
      break
  assert float(a[0]) < loss and k <= bound, (k, bound)
  paper = aov
  for _ in range(k):
    paper, _ = ao.update_aovs(paper, d, est)
  assert float(paper[0]) > loss


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_anneal_stays_finite_at_the_dtype_limits(dtype):
  """A step that doubles past the dtype's range is inf; the AOV is then the
  lower bound, never NaN."""
  big = float(jnp.finfo(dtype).max)
  aov = jnp.array([big, big, 0.0, big, big], dtype)
  step = jnp.array([big, 0.0, big, big, big], dtype)
  est = jnp.array([-big, big, -big, 0.0, big], dtype)
  new, new_step = _aov.update_aovs_anneal(aov, step, est, -big)
  assert new.dtype == dtype and new_step.dtype == dtype
  assert np.all(np.isfinite(np.asarray(new, np.float32)))
  assert np.all(np.asarray(new, np.float32) >= -big)
  assert not np.any(np.isnan(np.asarray(new_step, np.float32)))


def test_anneal_rule_by_name_and_the_default_unchanged():
  """aov_rule="anneal" runs and differs from the paper's rule; the default
  is still the paper's, bit for bit, next to it."""
  make = lambda **kw: ao.aalig(0.5, 48, 6, 1, momentum=0.5, **kw)
  paper = _run(make())
  anneal = _run(make(aov_rule="anneal"))
  chex.assert_trees_all_equal(_run(make(aov_rule="paper")), paper)
  assert not np.array_equal(np.asarray(paper[1][0].aov_step),
                            np.asarray(anneal[1][0].aov_step))
  chex.assert_tree_all_finite(anneal)


def test_anneal_rule_on_a_split_table():
  """aov_rule="anneal", tables split over 8 devices: the single-device run,
  to float32 rounding."""
  from tests import test_sharding as ts
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices; see conftest")
  make = lambda: ao.aalig(0.5, ts.N, ts.STEPS_PER_EPOCH,
                          ts.EPOCHS_PER_SECTION, momentum=0.9,
                          aov_rule="anneal")
  tx = make()
  step = jax.jit(lambda p, s, x, y, i: ts.apply_step(tx, p, s, x, y, i))
  ref = ts.init_params(), tx.init(ts.init_params())
  mesh = ts.mesh_of(8)
  params, state, sharded_step = ts.placed_on_mesh(make(), mesh, "data")
  batch = ts.NamedSharding(mesh, ts.P("data"))
  for idx in ts.BATCHES:
    ref = step(*ref, ts.X[idx], ts.Y[idx], idx)
    x, y, i = jax.device_put((ts.X[idx], ts.Y[idx], idx), batch)
    params, state = sharded_step(params, state, x, y, i)
  chex.assert_trees_all_close(jax.device_get((params, state)),
                              jax.device_get(ref), rtol=ts.TOL["rtol"],
                              atol=2e-5)
  assert state[0].aov.sharding.spec == ts.P("data")
  assert int(state[0].num_sections) == 3
  assert np.any(np.asarray(state[0].aov_step) != 0)


def test_anneal_removes_the_freeze_of_section_5_1_rank_4():
  """The stall case (Sec. 5.1's rank 4, momentum 0, maximal step size 1) on
  3 seeds: the anneal rule ends within 1% of the floor on every seed."""
  from benchmarks import aov_rules
  from benchmarks import tasks
  task = tasks.make_task("mf_rank4", "cpu", 3, 3)
  runner = aov_rules.Runner(task)
  anneal = runner.run("anneal", 0.0, [1.0], range(3))
  assert max(r["final_train_loss"] for r in anneal) < 1.01 * task.loss_floor


# --------------------------------------------------------------------------
# initial_aov.

def test_initial_aov_table_scalar_and_callable():
  table = jnp.linspace(0.0, 2.0, 8)
  s = ao.aalig(1.0, 8, 2, 1, initial_aov=table).init(jnp.zeros(3))[0]
  np.testing.assert_array_equal(np.asarray(s.aov), np.asarray(table))
  s = ao.aalig(1.0, 8, 2, 1, initial_aov=0.25).init(jnp.zeros(3))[0]
  np.testing.assert_array_equal(np.asarray(s.aov), 0.25)
  # A callable gets the params init was given (e.g. losses of the model
  # being resumed) and may run under jit.
  fn = lambda params: jnp.full(8, params.sum())
  tx = ao.scale_by_aalig(1.0, 8, 2, 1, initial_aov=fn)
  s = jax.jit(tx.init)(jnp.ones(3))
  np.testing.assert_array_equal(np.asarray(s.aov), 3.0)
  s = ao.aalig(1.0, 8, 2, 1, initial_aov=table,
               table_dtype=jnp.bfloat16).init(jnp.zeros(3))[0]
  assert s.aov.dtype == jnp.bfloat16
  # The rest of the state is the default's.
  np.testing.assert_array_equal(np.asarray(s.aov_step), 0.0)
  assert np.all(np.isnan(np.asarray(s.last_loss, np.float32)))


@pytest.mark.parametrize("bad, match", [
    (jnp.ones(7), "shape"), (jnp.ones((8, 1)), "shape"),
    (jnp.full(8, jnp.nan), "1 of 8|8 of 8"), (-jnp.ones(8), "lower_bound"),
    (np.array(["a"] * 8), "real numbers"),
    (np.full(8, 1e39), "3.40282e")])
def test_initial_aov_is_checked_at_construction(bad, match):
  with pytest.raises(ValueError, match="initial_aov") as err:
    ao.aalig(1.0, 8, 2, 1, initial_aov=bad)
  assert err.match(match)


def test_initial_aov_from_a_callable_is_checked_or_clamped():
  bad = lambda params: jnp.array([jnp.nan, -1.0, 2.0, 3.0])
  tx = ao.scale_by_aalig(1.0, 4, 2, 1, lower_bound=0.5, initial_aov=bad)
  with pytest.raises(ValueError, match="initial_aov"):
    tx.init(jnp.zeros(2))
  # Under jit the values cannot be checked: NaN and values below the bound
  # start at the bound, never below it.
  s = jax.jit(tx.init)(jnp.zeros(2))
  np.testing.assert_array_equal(np.asarray(s.aov), [0.5, 0.5, 2.0, 3.0])
  wrong = lambda params: jnp.zeros(3)
  with pytest.raises(ValueError, match=r"shape \(4,\)"):
    jax.jit(ao.scale_by_aalig(1.0, 4, 2, 1, initial_aov=wrong).init)(
        jnp.zeros(2))


def test_initial_aovs_steer_the_first_steps():
  """AOVs at the batch's losses give a zero step; AOVs at 0 do not."""
  losses = jnp.array([1.0, 2.0])
  idx = jnp.array([0, 1])
  grads = jnp.ones(3)
  for table, zero in ((jnp.array([1.0, 2.0, 0.0, 0.0]), True),
                      (None, False)):
    tx = ao.scale_by_aalig(1.0, 4, 2, 1, initial_aov=table)
    _, s = tx.update(grads, tx.init(grads), losses=losses, indices=idx)
    assert (float(s.step_size) == 0.0) == zero


# --------------------------------------------------------------------------
# loss_table.

def _batches(x, y, b, n=None):
  n = len(x) if n is None else n
  for i in range(0, n, b):
    idx = np.arange(i, min(i + b, n))
    yield (x[idx], y[idx]), idx


def _sq_loss(w, batch):
  xb, yb = batch
  return (xb @ w - yb) ** 2


def test_loss_table_at_a_realistic_size():
  """N = 200,000 examples in batches of 4,096 (the last one short): each
  example's loss at its own index, in float32."""
  n = 200_000
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, 4)).astype(np.float32)
  y = rng.normal(size=n).astype(np.float32)
  w = jnp.array([0.5, -1.0, 0.25, 2.0])
  # Shuffled indices: the table is keyed by index, not by order.
  perm = rng.permutation(n)
  batches = (((x[perm[i:i + 4096]], y[perm[i:i + 4096]]), perm[i:i + 4096])
             for i in range(0, n, 4096))
  table = ao.loss_table(_sq_loss, w, batches, n)
  assert table.shape == (n,) and table.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(table),
                             np.asarray(_sq_loss(w, (x, y))), rtol=1e-5)
  tx = ao.aalig(1.0, n, 49, 1, initial_aov=table)
  np.testing.assert_array_equal(np.asarray(tx.init(w)[0].aov),
                                np.asarray(table))


def test_loss_table_duplicates_masks_and_missing_rows():
  x = np.arange(6, dtype=np.float32)[:, None]
  y = np.zeros(6, np.float32)
  w = jnp.ones(1)
  # Example 1 twice (its lowest loss kept); example 5 only in a masked row.
  batches = [((x[[0, 1, 2]], y[[0, 1, 2]]), np.array([0, 1, 2])),
             ((x[[0, 3, 4]], y[[0, 3, 4]]), np.array([1, 3, 4])),
             ((x[[5, 5]], y[[5, 5]]), np.array([5, 5]),
              np.array([False, False]))]
  with pytest.raises(ValueError, match=r"1 of 6 examples.*\[5\]"):
    ao.loss_table(_sq_loss, w, batches, 6)
  table = ao.loss_table(_sq_loss, w, batches, 6, fill_value=7.0)
  np.testing.assert_array_equal(np.asarray(table), [0, 0, 4, 9, 16, 7])


@pytest.mark.parametrize("batch, match", [
    (((np.ones((2, 1)), np.zeros(2)), np.array([0, 6])), r"\[0, 6\)"),
    (((np.ones((2, 1)), np.zeros(2)), np.array([-1, 0])), r"\[0, 6\)"),
    (((np.full((2, 1), np.inf), np.zeros(2)), np.array([0, 1])), "finite"),
    (((np.ones((2, 1)), np.zeros(2)), np.array([0, 1, 2])), "one loss per"),
    ((np.ones(2),), "yield"),
])
def test_loss_table_refuses_bad_batches(batch, match):
  with pytest.raises(ValueError, match=match):
    ao.loss_table(_sq_loss, jnp.ones(1), [batch], 6, fill_value=0.0)


def test_mean_gap_shows_a_freeze():
  """aalig_metrics' mean_gap: last loss minus AOV over the seen examples
  only; negative once the AOVs overshoot the losses."""
  opt = ao.aalig(0.1, 4, 1, 1)
  core, trace = opt.init(jnp.zeros(2))
  assert np.isnan(float(ao.aalig_metrics((core, trace))["mean_gap"]))
  core = core._replace(aov=jnp.array([1.0, 2.0, 3.0, 9.0]),
                       last_loss=jnp.array([0.5, 1.0, 3.0, jnp.nan]))
  gap = float(ao.aalig_metrics((core, trace))["mean_gap"])
  assert gap == pytest.approx(-0.5)
