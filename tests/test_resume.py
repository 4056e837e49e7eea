"""Exact resume from Orbax checkpoints, and clear errors for bad ones.

A checkpoint taken mid-section and mid-epoch is restored in a fresh Python
process (tests/_resume_worker.py), which continues through the next section
updates; every leaf (params, tables, counters, momentum, apply_if_finite
counters) and every step size must equal the uninterrupted run's bit for bit.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aalig_optax import aalig
from aalig_optax import aalig_metrics
from aalig_optax import restore_state
from aalig_optax import save_state
from aalig_optax import validate_state
from tests import _resume_worker as w

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT_AT = 13  # mid-epoch (13 % 5 = 3) and mid-section (13 % 10 = 3)
STOP = 33  # the resumed run passes at least two section ends


def _fresh_process(ckpt, out, loss_estimate, devices=None, device_count=8):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [ROOT, os.path.dirname(__file__), env.get("PYTHONPATH", "")])
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count="
                      f"{device_count}")
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, os.path.join(os.path.dirname(__file__),
                                      "_resume_worker.py"),
         str(ckpt), str(out), loss_estimate, str(STOP)]
  if devices:
    cmd.append(str(devices))
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return np.load(out)


def _bitwise_equal(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return (a.shape == b.shape and a.dtype == b.dtype
          and a.tobytes() == b.tobytes())


def _same(got, want):
  return jax.tree.structure(got) == jax.tree.structure(want) and all(
      _bitwise_equal(a, b)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def _check_identical(full, sizes, resumed):
  expected = w.leaves(full)
  got = {k: resumed[k] for k in resumed.files if not k.startswith("__")}
  assert sorted(got) == sorted(expected)
  differ = [k for k in expected if not _bitwise_equal(expected[k], got[k])]
  assert not differ, f"leaves differ after resume: {differ}"
  assert _bitwise_equal(sizes[CHECKPOINT_AT:], resumed["__step_sizes__"])


def _run_with_checkpoint(opt, ckpt, start=None):
  saved = {}

  def on_step(t, tree):
    if t == CHECKPOINT_AT:
      save_state(ckpt, tree, step=t)
      saved["tree"] = tree

  full, sizes = w.train(start or w.initial(opt), STOP, opt, on_step=on_step)
  return full, sizes, saved["tree"]


@pytest.mark.parametrize("loss_estimate", ["last", "best_epoch"])
def test_resume_in_a_fresh_process_is_bit_identical(tmp_path, loss_estimate):
  opt = w.make_opt(loss_estimate)
  ckpt = tmp_path / "ckpt"
  full, sizes, at_ckpt = _run_with_checkpoint(opt, ckpt)
  at, end = aalig_metrics(at_ckpt["opt_state"]), aalig_metrics(
      full["opt_state"])
  # The checkpoint is mid-epoch and mid-section; sections end after it.
  assert CHECKPOINT_AT % w.STEPS_PER_EPOCH != 0
  assert int(end["sections_done"]) >= int(at["sections_done"]) + 2
  assert int(full["opt_state"].total_notfinite) + int(
      end["num_skipped"]) == len(w.NAN_STEPS)
  resumed = _fresh_process(ckpt, tmp_path / "out.npz", loss_estimate)
  _check_identical(full, sizes, resumed)
  # The check can fail: a resume from one step later differs.
  assert not _bitwise_equal(sizes[CHECKPOINT_AT + 1:],
                            resumed["__step_sizes__"][:-1])


@pytest.mark.parametrize("devices_after", [2, 4])
def test_resume_with_sharded_tables_on_another_device_count(tmp_path,
                                                            devices_after):
  """Tables sharded over 8 devices, restored over 2 or 4 in a fresh process."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (simulated) devices")
  opt = w.make_opt("best_epoch")
  shardings = w.table_shardings(jax.eval_shape(lambda: w.initial(opt)),
                                jax.devices()[:8])
  start = jax.device_put(w.initial(opt), shardings)
  assert {len(x.sharding.device_set) for x in jax.tree.leaves(start)
          if x.shape == (w.N,)} == {8}
  ckpt = tmp_path / "ckpt"
  saved = {}

  def on_step(t, tree):
    if t == CHECKPOINT_AT:
      saved["tables"] = [x for x in jax.tree.leaves(tree["opt_state"])
                         if x.shape == (w.N,)]
      save_state(ckpt, tree, step=t)

  full, sizes = w.train(start, STOP, opt, on_step=on_step,
                        shardings=shardings)
  # The tables stayed split in 8 (5 rows a device) up to the checkpoint.
  assert saved["tables"]
  for table in saved["tables"]:
    assert table.sharding.spec == jax.sharding.PartitionSpec("data")
    assert {s.data.shape for s in table.addressable_shards} == {(w.N // 8,)}
  resumed = _fresh_process(ckpt, tmp_path / "out.npz", "best_epoch",
                           devices=devices_after, device_count=devices_after)
  assert int(resumed["__devices__"]) == devices_after
  assert "P('data',)" in list(resumed["__shardings__"])
  _check_identical(full, sizes, resumed)


# --------------------------------------------------------------------------
# Bad checkpoints: clear errors, never a silent reshape, cast or drop.
# --------------------------------------------------------------------------


def _tree(opt):
  """Params, `opt`'s state with random tables, and a step counter."""
  params = jnp.arange(3.0)
  rng = np.random.default_rng(0)
  state = jax.tree.map(
      lambda x: jnp.asarray(rng.random(x.shape), x.dtype)
      if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim == 1 else x,
      opt.init(params))
  return {"params": params, "opt_state": state,
          "step": jnp.asarray(7, jnp.int32)}


def _like(opt):
  return jax.eval_shape(lambda: _tree(opt))


@pytest.fixture(name="saved")
def fixture_saved(tmp_path):
  opt = aalig(0.1, 40, 5, 2)
  tree = _tree(opt)
  save_state(tmp_path / "ckpt", tree, step=0)
  return tmp_path / "ckpt", tree, opt


def test_restore_round_trip_is_exact(saved):
  path, tree, opt = saved
  for like in (_like(opt), tree):  # abstract leaves, or arrays
    got = restore_state(path, like)
    assert jax.tree.structure(got) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(tree)):
      assert _bitwise_equal(a, b)


@pytest.mark.parametrize("n", [32, 48])
def test_table_size_mismatch_is_a_clear_error(saved, n):
  path, _, _ = saved
  with pytest.raises(ValueError) as e:
    restore_state(path, _like(aalig(0.1, n, 5, 2)))
  msg = str(e.value)
  assert re.search(rf"leaf 'opt_state/0/\w+': checkpoint has shape \(40,\) "
                   rf"dtype float32, expected shape \({n},\)", msg), msg
  assert f"num_examples=40 (checkpoint) vs {n} (expected)" in msg


def test_table_dtype_mismatch_is_a_clear_error_not_a_cast(saved):
  path, _, _ = saved
  with pytest.raises(ValueError) as e:
    restore_state(path, _like(aalig(0.1, 40, 5, 2, table_dtype=jnp.float16)))
  msg = str(e.value)
  assert re.search(r"leaf 'opt_state/0/\w+': checkpoint has shape \(40,\) "
                   r"dtype float32, expected shape \(40,\) dtype float16",
                   msg), msg
  assert "table_dtype='float32' (checkpoint) vs 'float16' (expected)" in msg


def test_loss_estimate_mismatch_names_the_extra_or_missing_table(tmp_path,
                                                                  saved):
  path, _, _ = saved
  best = aalig(0.1, 40, 5, 2, loss_estimate="best_epoch")
  with pytest.raises(ValueError) as e:
    restore_state(path, _like(best))
  assert re.search(r"leaf 'opt_state/0/\w+' is missing from the checkpoint",
                   str(e.value))
  assert "loss_estimate='last' (checkpoint) vs 'best_epoch'" in str(e.value)
  save_state(tmp_path / "best", _tree(best), step=0)
  with pytest.raises(ValueError,
                     match=r"leaf 'opt_state/0/\w+' is in the checkpoint but "
                     r"not expected"):
    restore_state(tmp_path / "best", _like(aalig(0.1, 40, 5, 2)))


# Orbax's reader coroutines, abandoned on a damaged file, warn when collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_or_missing_files_never_restore_wrong_values(tmp_path):
  """Each file of a checkpoint truncated, or removed, in turn."""
  opt = aalig(0.1, 4000, 5, 2)
  tree, like = _tree(opt), _like(opt)

  def files_of(step):
    # Data files have random names: label them by folder and rank in it.
    found = sorted(os.path.relpath(f, step) for f in glob.glob(
        str(step / "**"), recursive=True) if os.path.isfile(f))
    labels = {}
    for rel in found:
      folder, name = os.path.split(rel)
      if len(name) == 32 and all(c in "0123456789abcdef" for c in name):
        rank = sum(os.path.dirname(r) == folder for r in labels.values())
        labels[os.path.join(folder, f"<data #{rank}>")] = rel
      else:
        labels[rel] = rel
    return labels

  save_state(tmp_path / "ref", tree, step=0)
  files = sorted(files_of(tmp_path / "ref" / "0"))
  assert files
  outcomes = {}
  for i, label in enumerate(files):
    for how in ("truncate", "remove"):
      path = tmp_path / f"c{i}{how}"
      save_state(path, tree, step=0)
      if label not in files_of(path / "0"):
        continue  # Orbax wrote fewer data files this time
      target = path / "0" / files_of(path / "0")[label]
      if how == "truncate":
        with open(target, "r+b") as f:
          f.truncate(os.path.getsize(target) // 2)
      else:
        os.remove(target)
      try:
        got = restore_state(path, like)
      except (ValueError, FileNotFoundError) as e:
        outcomes[(label, how)] = type(e).__name__
      else:
        outcomes[(label, how)] = ("restored exactly" if _same(got, tree)
                                  else "WRONG VALUES")
  print(outcomes)
  assert "WRONG VALUES" not in outcomes.values(), outcomes
  # The files that matter were detected.
  assert outcomes[("state/_METADATA", "truncate")] == "ValueError"
  assert outcomes[("aalig_configs/metadata", "truncate")] == "ValueError"


def test_validate_state_names_every_mismatched_leaf():
  params = jnp.zeros(2)
  state = aalig(0.1, 10, 1, 1).init(params)
  validate_state(state, jax.eval_shape(aalig(0.1, 10, 1, 1).init, params))
  with pytest.raises(ValueError) as e:
    validate_state(state, jax.eval_shape(
        aalig(0.1, 12, 1, 1, table_dtype=jnp.bfloat16).init, params))
  # Every table (the leaves with N rows) is named, and nothing else.
  tables = [jax.tree_util.keystr(p, simple=True, separator="/") for p, x in
            jax.tree_util.tree_flatten_with_path(state)[0] if x.shape == (10,)]
  assert tables
  named = re.findall(r"leaf '([^']+)'", str(e.value))
  assert sorted(named) == sorted(tables), (named, tables)
