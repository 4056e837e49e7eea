"""Exact resume from Orbax checkpoints, and clear errors for bad ones.

A checkpoint taken mid-section and mid-epoch is restored in a fresh Python
process (tests/_resume_worker.py), which continues through the next section
updates; every leaf (params, tables, counters, momentum, apply_if_finite
counters) and every step size must equal the uninterrupted run's bit for bit.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aalig_optax import aalig
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
      save_state(ckpt, tree)
      saved["tree"] = tree

  full, sizes = w.train(start or w.initial(opt), STOP, opt, on_step=on_step)
  return full, sizes, saved["tree"]


@pytest.mark.parametrize("loss_estimate", ["last", "best_epoch"])
def test_resume_in_a_fresh_process_is_bit_identical(tmp_path, loss_estimate):
  opt = w.make_opt(loss_estimate)
  ckpt = tmp_path / "ckpt"
  full, sizes, at_ckpt = _run_with_checkpoint(opt, ckpt)
  core_at, core_end = (at_ckpt["opt_state"].inner_state[0],
                       full["opt_state"].inner_state[0])
  # The checkpoint is mid-epoch and mid-section; sections end after it.
  assert int(core_at.count) % w.STEPS_PER_EPOCH != 0
  assert int(core_end.num_sections) >= int(core_at.num_sections) + 2
  assert int(full["opt_state"].total_notfinite) + int(
      getattr(core_end, "num_skipped", 0)) == len(w.NAN_STEPS)
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
  assert len(start["opt_state"].inner_state[0].aov.sharding.device_set) == 8
  ckpt = tmp_path / "ckpt"
  saved = {}

  def on_step(t, tree):
    if t == CHECKPOINT_AT:
      saved["aov"] = tree["opt_state"].inner_state[0].aov
      save_state(ckpt, tree)

  full, sizes = w.train(start, STOP, opt, on_step=on_step,
                        shardings=shardings)
  # The tables stayed split in 8 (5 rows a device) up to the checkpoint.
  assert saved["aov"].sharding.spec == jax.sharding.PartitionSpec("data")
  assert {s.data.shape for s in saved["aov"].addressable_shards} == {
      (w.N // 8,)}
  resumed = _fresh_process(ckpt, tmp_path / "out.npz", "best_epoch",
                           devices=devices_after, device_count=devices_after)
  assert int(resumed["__devices__"]) == devices_after
  assert "P('data',)" in list(resumed["__shardings__"])
  _check_identical(full, sizes, resumed)


# --------------------------------------------------------------------------
# Bad checkpoints: clear errors, never a silent reshape, cast or drop.
# --------------------------------------------------------------------------


def _tree(opt):
  params = jnp.arange(3.0)
  state = opt.init(params)
  core = state[0]
  rng = np.random.default_rng(0)
  core = core._replace(
      aov=jnp.asarray(rng.random(core.aov.shape), core.aov.dtype),
      last_loss=jnp.asarray(rng.random(core.aov.shape), core.aov.dtype))
  return {"params": params, "opt_state": (core, state[1]),
          "step": jnp.asarray(7, jnp.int32)}


def _like(opt):
  return jax.eval_shape(lambda: _tree(opt))


@pytest.fixture(name="saved")
def fixture_saved(tmp_path):
  opt = aalig(0.1, 40, 5, 2)
  tree = _tree(opt)
  save_state(tmp_path / "ckpt", tree)
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
  with pytest.raises(ValueError, match=(
      rf"leaf 'opt_state/0/aov': checkpoint has shape \(40,\).*expected "
      rf"shape \({n},\).*tables for 40 examples, the optimiser was built with "
      rf"num_examples={n}")):
    restore_state(path, _like(aalig(0.1, n, 5, 2)))


def test_table_dtype_mismatch_is_a_clear_error_not_a_cast(saved):
  path, _, _ = saved
  with pytest.raises(ValueError,
                     match=r"'opt_state/0/last_loss'.*dtype float32.*"
                     r"expected.*dtype float16"):
    restore_state(path, _like(aalig(0.1, 40, 5, 2, table_dtype=jnp.float16)))


def test_loss_estimate_mismatch_names_the_extra_or_missing_table(tmp_path,
                                                                  saved):
  path, _, _ = saved
  with pytest.raises(ValueError, match=r"'opt_state/0/best_loss' is missing"):
    restore_state(path, _like(aalig(0.1, 40, 5, 2, loss_estimate="best_epoch")))
  best = aalig(0.1, 40, 5, 2, loss_estimate="best_epoch")
  save_state(tmp_path / "best", _tree(best))
  with pytest.raises(ValueError,
                     match=r"'opt_state/0/best_loss' is in the checkpoint but "
                     r"not expected"):
    restore_state(tmp_path / "best", _like(aalig(0.1, 40, 5, 2)))


def test_missing_checkpoint_is_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint directory"):
    restore_state(tmp_path / "nowhere", {"a": jnp.zeros(2)})


# Orbax's reader coroutines, abandoned on a damaged file, warn when collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_or_missing_files_never_restore_wrong_values(tmp_path):
  """Each file of a checkpoint truncated, or removed, in turn."""
  opt = aalig(0.1, 4000, 5, 2)
  tree, like = _tree(opt), _like(opt)

  def files_of(ckpt):
    # Data files have random names: label them by folder and rank in it.
    found = sorted(os.path.relpath(f, ckpt) for f in glob.glob(
        str(ckpt / "**"), recursive=True) if os.path.isfile(f))
    labels = {}
    for rel in found:
      folder, name = os.path.split(rel)
      if len(name) == 32 and all(c in "0123456789abcdef" for c in name):
        rank = sum(os.path.dirname(r) == folder for r in labels.values())
        labels[os.path.join(folder, f"<data #{rank}>")] = rel
      else:
        labels[rel] = rel
    return labels

  save_state(tmp_path / "ref", tree)
  files = sorted(files_of(tmp_path / "ref"))
  assert files
  outcomes = {}
  for i, label in enumerate(files):
    for how in ("truncate", "remove"):
      path = tmp_path / f"c{i}{how}"
      save_state(path, tree)
      if label not in files_of(path):
        continue  # Orbax wrote fewer data files this time
      target = path / files_of(path)[label]
      if how == "truncate":
        with open(target, "r+b") as f:
          f.truncate(os.path.getsize(target) // 2)
      else:
        os.remove(target)
      rel = label
      try:
        got = restore_state(path, like)
      except ValueError as e:
        assert "incomplete or corrupt" in str(e) or "corrupt" in str(e)
        outcomes[(rel, how)] = "ValueError"
      else:  # a file Orbax does not need: then the values must be exact
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(tree)):
          assert _bitwise_equal(a, b), (rel, how)
        outcomes[(rel, how)] = "restored exactly"
  print(outcomes)
  # The files that matter were all detected.
  assert outcomes[("aalig_checksums.json", "remove")] == "ValueError"
  assert outcomes[("aalig_checksums.json", "truncate")] == "ValueError"
  assert outcomes[("_METADATA", "truncate")] == "ValueError"
  assert sum(v == "ValueError" for v in outcomes.values()) >= len(files) // 2


def test_checksum_catches_a_silently_changed_value(saved):
  """A damaged chunk that Orbax would read back as other values is caught."""
  path, tree, opt = saved
  changed = dict(tree)
  changed["params"] = tree["params"].at[1].set(5.0)
  save_state(str(path) + "_other", changed)
  # Swap the other checkpoint's arrays in, keeping the first's checksums.
  os.replace(os.path.join(path, "aalig_checksums.json"),
             os.path.join(str(path) + "_other", "aalig_checksums.json"))
  with pytest.raises(ValueError, match=r"'params/0'|'params'.*checksum"):
    restore_state(str(path) + "_other", _like(opt))


def test_validate_state_names_every_mismatched_leaf():
  params = jnp.zeros(2)
  state = aalig(0.1, 10, 1, 1).init(params)
  validate_state(state, jax.eval_shape(aalig(0.1, 10, 1, 1).init, params))
  with pytest.raises(ValueError) as e:
    validate_state(state, jax.eval_shape(
        aalig(0.1, 12, 1, 1, table_dtype=jnp.bfloat16).init, params))
  for leaf in ("0/aov", "0/aov_step", "0/last_loss"):
    assert f"leaf '{leaf}'" in str(e.value)
  assert "num_examples=12" in str(e.value)
