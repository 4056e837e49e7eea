"""save_state/restore_state under kills, odd leaves and other schedules.

Reliability issue items 8 (an overwrite killed at any moment keeps a
restorable checkpoint), 9 (any pytree Orbax accepts, including Python
scalars; a failed save changes nothing; a malformed checksum file is a
ValueError) and 10 (a checkpoint is refused by a transform with another
schedule).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from aalig_optax import aalig
from aalig_optax import restore_state
from aalig_optax import save_state
from aalig_optax import scale_by_aalig
from aalig_optax import ScaleByAaligState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKSUMS = "aalig_checksums.json"
KILLED = 17  # the child's exit status at a deterministic kill point


def _bitwise_equal(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return (a.shape == b.shape and a.dtype == b.dtype
          and a.tobytes() == b.tobytes())


def _same(got, want):
  if jax.tree.structure(got) != jax.tree.structure(want):
    return False
  return all(_bitwise_equal(a, b)
             for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


# --------------------------------------------------------------------------
# Item 8: an overwrite killed at any moment leaves the old or the new
# checkpoint, never neither.
# --------------------------------------------------------------------------

N_BIG = 100_000


def _big_tree(seed):
  """About 4 MB of params and AALIG tables; `seed` picks the values."""
  rng = np.random.default_rng(seed)
  opt = aalig(0.1, N_BIG, 10, 2)
  params = {"w": jnp.asarray(rng.random((500, 1000)), jnp.float32),
            "b": jnp.asarray(rng.random(1000), jnp.float32)}
  state = opt.init(params)
  core = state[0]._replace(
      aov=jnp.asarray(rng.random(N_BIG), jnp.float32),
      last_loss=jnp.asarray(rng.random(N_BIG), jnp.float32))
  return {"params": params, "opt_state": (core, state[1]),
          "step": jnp.asarray(seed, jnp.int32)}


def _child():
  """Child process: overwrite argv[1] with _big_tree(2), dying at a point.

  argv[2] is "none" (run to the end, printing every file-system event), an
  event such as "rename#2" (os._exit just before the second os.rename),
  "rmtree-mid#1" (the first shutil.rmtree deletes about half the files, then
  os._exit: a kill in the middle of a deletion) or "signal" (wait for the
  parent's SIGKILL).
  """
  path, kill = sys.argv[1], sys.argv[2]
  tree = _big_tree(2)
  jax.block_until_ready(tree)
  counts, events = {}, []

  def event(name):
    counts[name] = counts.get(name, 0) + 1
    label = f"{name}#{counts[name]}"
    events.append(label)
    return label

  def hooked(module, name):
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
      label = event(name)
      if label == kill:
        os._exit(KILLED)
      if name == "rmtree" and kill == f"rmtree-mid#{counts['rmtree']}":
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(args[0])
                       for f in fs)
        for f in files[:max(1, len(files) // 2)]:
          os.unlink(f)
        os._exit(KILLED)
      return real(*args, **kwargs)

    setattr(module, name, wrapped)

  for module, name in ((os, "rename"), (os, "replace"), (shutil, "rmtree")):
    hooked(module, name)
  print("SAVING", flush=True)
  start = time.time()
  save_state(path, tree, force=True)
  print("SAVED", time.time() - start, flush=True)
  print("EVENTS", " ".join(events), flush=True)


def _start_child(path, kill):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)
  code = "from tests.test_checkpoint_safety import _child; _child()"
  return subprocess.Popen([sys.executable, "-c", code, str(path), kill],
                          env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_overwrite_killed_at_any_point_keeps_old_or_new(tmp_path):
  old, new = _big_tree(1), _big_tree(2)
  like = jax.eval_shape(lambda: old)
  good = tmp_path / "good" / "ckpt"
  save_state(good, old)

  def fresh_copy(label):
    path = tmp_path / label.replace("#", "_") / "ckpt"
    shutil.copytree(good, path)
    return path

  # An uninterrupted overwrite, to list its file-system events.
  path = fresh_copy("complete")
  proc = _start_child(path, "none")
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert _same(restore_state(path, like), new)
  lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
  save_seconds = float(lines["SAVED"])
  events = lines["EVENTS"].split()
  kills = events + [e.replace("rmtree", "rmtree-mid") for e in events
                    if e.startswith("rmtree")]
  kills += ["signal#1", "signal#2"]
  assert len(kills) < 30, kills

  outcomes = {}
  for first in range(0, len(kills), 3):  # three children at a time (2 cores)
    running = []
    for kill in kills[first:first + 3]:
      path = fresh_copy(kill)
      running.append((kill, path, _start_child(path, kill)))
    for kill, path, proc in running:
      if kill.startswith("signal"):
        assert proc.stdout.readline().strip() == "SAVING"
        # A SIGKILL a third or two thirds through the save.
        time.sleep(save_seconds * int(kill[-1]) / 3)
        proc.send_signal(signal.SIGKILL)
      _, err = proc.communicate(timeout=120)
      assert proc.returncode in (KILLED, -signal.SIGKILL, 0), (kill,
                                                               err[-3000:])
    for kill, path, proc in running:
      try:
        got = restore_state(path, like)
      except Exception as e:  # pylint: disable=broad-except
        outcomes[kill] = f"{type(e).__name__}: {str(e)[:300]}"
        continue
      outcomes[kill] = ("old" if _same(got, old) else
                        "new" if _same(got, new) else "other values")
      # The next save recovers from the kill and leaves no debris.
      save_state(path, new, force=True)
      assert _same(restore_state(path, like), new), kill
      assert os.listdir(path.parent) == ["ckpt"], (kill,
                                                   os.listdir(path.parent))
  print(outcomes)
  bad = {k: v for k, v in outcomes.items() if v not in ("old", "new")}
  assert not bad, f"after these kills neither checkpoint restores: {bad}"
  # The kill points did fall inside the overwrite.
  assert "old" in outcomes.values()


# --------------------------------------------------------------------------
# Item 9: any pytree Orbax accepts; a failed save changes nothing; a
# malformed checksum file is a ValueError.
# --------------------------------------------------------------------------


def _scalars_tree():
  return {"step": 3, "lr": 0.1, "big": 2**62 + 1, "nan": math.nan,
          "inf": -math.inf, "flag": True, "w": jnp.ones(2)}


@pytest.mark.parametrize("like_from", ["same tree", "eval_shape"])
def test_python_scalar_leaves_round_trip(tmp_path, like_from):
  tree = _scalars_tree()
  save_state(tmp_path / "ckpt", tree)
  # eval_shape gives int32/float32/bool ShapeDtypeStructs (and cannot trace
  # an int beyond int32: its like holds a Python int there).
  like = (tree if like_from == "same tree" else dict(
      jax.eval_shape(lambda: dict(_scalars_tree(), big=0)), big=0))
  got = restore_state(tmp_path / "ckpt", like)
  assert jax.tree.structure(got) == jax.tree.structure(tree)
  for key, want in tree.items():
    if isinstance(want, jax.Array):
      assert _bitwise_equal(got[key], want)
    else:  # the Python scalar as saved: its type and exact value
      assert type(got[key]) is type(want), key
      assert got[key] == want or (math.isnan(want) and math.isnan(got[key]))


def test_python_scalar_against_another_kind_is_a_clear_error(tmp_path):
  save_state(tmp_path / "ckpt", _scalars_tree())
  like = dict(_scalars_tree(), step=0.0)
  with pytest.raises(ValueError, match=r"leaf 'step'.*Python int.*"
                     r"expected a Python float"):
    restore_state(tmp_path / "ckpt", like)
  like = dict(_scalars_tree(), lr=jax.ShapeDtypeStruct((2,), jnp.float32))
  with pytest.raises(ValueError, match=r"leaf 'lr'.*Python float.*expected "
                     r"shape \(2,\)"):
    restore_state(tmp_path / "ckpt", like)
  # An array leaf is not turned into a Python scalar either.
  like = dict(_scalars_tree(), w=1.0)
  with pytest.raises(ValueError, match=r"leaf 'w'.*shape \(2,\).*expected a "
                     r"Python float"):
    restore_state(tmp_path / "ckpt", like)


@pytest.mark.parametrize("bad", ["zero-size array", "int beyond int64",
                                 "string"])
@pytest.mark.parametrize("over", ["a good checkpoint", "nothing"])
def test_failed_save_changes_nothing(tmp_path, bad, over):
  bad_leaf = {"zero-size array": jnp.ones((0,)), "int beyond int64": 2**70,
              "string": "text"}[bad]
  good = {"w": jnp.arange(3.0), "step": jnp.asarray(1)}
  path = tmp_path / "ckpt"
  if over == "a good checkpoint":
    save_state(path, good)
  with pytest.raises(Exception):  # pylint: disable=broad-except
    save_state(path, {"w": jnp.zeros(3), "step": jnp.asarray(2),
                      "bad": bad_leaf}, force=True)
  if over == "a good checkpoint":
    assert _same(restore_state(path, jax.eval_shape(lambda: good)), good)
    assert os.listdir(tmp_path) == ["ckpt"]
  else:
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("content", [
    "[]", "null", '"leaves"', '{"leaves": []}', '{"leaves": {"w": 3}}',
    '{"leaves": {"w": {"sha256": 5}}}', '{"leaves": {"w": {}}}',
    '{"leaves": {"w": {"sha256": null}}, "configs": []}',
    '{"leaves": {"w": {"sha256": null}}, "configs": {"x": 3}}',
    '{"leaves": {"w": {"sha256": null}}, "configs": {"x": {"num_examples":'
    ' "ten"}}}',
    "{not json",
])
def test_malformed_checksum_file_is_a_corrupt_checkpoint(tmp_path, content):
  tree = {"w": jnp.arange(3.0)}
  save_state(tmp_path / "ckpt", tree)
  with open(tmp_path / "ckpt" / CHECKSUMS, "w") as f:
    f.write(content)
  with pytest.raises(ValueError, match=r"corrupt"):
    restore_state(tmp_path / "ckpt", tree)


# --------------------------------------------------------------------------
# Item 10: restoring into a transform with another schedule.
# --------------------------------------------------------------------------

BASE = {"num_examples": 40, "steps_per_epoch": 5, "epochs_per_section": 2,
        "lower_bound": 0.5, "loss_estimate": "last",
        "table_dtype": jnp.float32}


def _opt(**changes):
  kw = dict(BASE, **changes)
  return aalig(0.1, kw.pop("num_examples"), kw.pop("steps_per_epoch"),
               kw.pop("epochs_per_section"), **kw)


def _state_tree(opt):
  params = jnp.arange(3.0)
  return {"params": params, "opt_state": opt.init(params)}


def _like(opt):
  return jax.eval_shape(lambda: _state_tree(opt))


@pytest.fixture(name="ckpt")
def fixture_ckpt(tmp_path):
  save_state(tmp_path / "ckpt", _state_tree(_opt()))
  return tmp_path / "ckpt"


@pytest.mark.parametrize("field,value,shown", [
    ("steps_per_epoch", 4, "steps_per_epoch=5 (checkpoint) vs 4 (expected)"),
    ("epochs_per_section", 3,
     "epochs_per_section=2 (checkpoint) vs 3 (expected)"),
    ("lower_bound", 0.75, "lower_bound=0.5 (checkpoint) vs 0.75 (expected)"),
    ("num_examples", 48, "num_examples=40 (checkpoint) vs 48 (expected)"),
    ("loss_estimate", "best_epoch",
     "loss_estimate='last' (checkpoint) vs 'best_epoch' (expected)"),
    ("table_dtype", jnp.bfloat16,
     "table_dtype='float32' (checkpoint) vs 'bfloat16' (expected)"),
])
def test_restore_refuses_another_schedule(ckpt, field, value, shown):
  with pytest.raises(ValueError) as e:
    restore_state(ckpt, _like(_opt(**{field: value})))
  msg = str(e.value)
  assert str(ckpt) in msg
  assert "'opt_state/0'" in msg and "schedule" in msg
  assert shown in msg, msg


def test_restore_refuses_every_differing_field_at_once(ckpt):
  with pytest.raises(ValueError) as e:
    restore_state(ckpt, _like(_opt(steps_per_epoch=4, epochs_per_section=3,
                                   lower_bound=1.0)))
  for field in ("steps_per_epoch=5", "epochs_per_section=2",
                "lower_bound=0.5"):
    assert field in str(e.value)


def test_restore_accepts_a_lower_or_injected_lower_bound(ckpt):
  want = _state_tree(_opt())
  for lower_bound in (0.25, 0.5, jnp.asarray(2.0)):  # 2.0 injected: unknown
    got = restore_state(ckpt, _like(_opt(lower_bound=lower_bound)))
    assert all(_bitwise_equal(a, b) for a, b in
               zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  # The restored state carries `like`'s config, so update accepts it.
  opt = _opt(lower_bound=0.25)
  got = restore_state(ckpt, _like(opt))
  assert got["opt_state"][0].config == opt.init(jnp.zeros(3))[0].config
  opt.update(jnp.ones(3), got["opt_state"], got["params"],
             losses=jnp.ones(2), indices=jnp.arange(2))


def test_injected_lower_bound_in_the_checkpoint_is_not_compared(tmp_path):
  tx = scale_by_aalig(0.1, 40, 5, 2, lower_bound=jnp.asarray(3.0))
  params = jnp.zeros(2)
  save_state(tmp_path / "ckpt", {"s": tx.init(params)})
  like = jax.eval_shape(
      lambda: {"s": scale_by_aalig(0.1, 40, 5, 2, lower_bound=9.0).init(
          params)})
  restore_state(tmp_path / "ckpt", like)


def test_schedule_is_checked_by_path_inside_nested_transforms(tmp_path):
  def tx(steps):
    import optax  # pylint: disable=g-import-not-at-top
    return optax.apply_if_finite(_opt(steps_per_epoch=steps), 3)

  save_state(tmp_path / "ckpt", _state_tree(tx(5)))
  restore_state(tmp_path / "ckpt", _like(tx(5)))
  with pytest.raises(ValueError, match=r"'opt_state/inner_state/0'.*"
                     r"steps_per_epoch=5 \(checkpoint\) vs 7 \(expected\)"):
    restore_state(tmp_path / "ckpt", _like(tx(7)))


def test_checkpoint_without_schedule_is_accepted_with_a_warning(ckpt,
                                                                tmp_path):
  # Written before configs were recorded: drop them from the checksum file.
  with open(ckpt / CHECKSUMS) as f:
    manifest = json.load(f)
  assert "configs" in manifest
  del manifest["configs"]
  with open(ckpt / CHECKSUMS, "w") as f:
    json.dump(manifest, f)
  with pytest.warns(UserWarning, match=r"schedule cannot be checked"):
    restore_state(ckpt, _like(_opt(steps_per_epoch=4)))
  # Written by plain Orbax.
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "plain", _state_tree(_opt()))
  checkpointer.wait_until_finished()
  checkpointer.close()
  with pytest.warns(UserWarning, match=r"schedule cannot be checked"):
    restore_state(tmp_path / "plain", _like(_opt()), verify_checksums=False)
  # No AALIG state in `like`: nothing to check, nothing to warn about.
  params = {"w": jnp.arange(3.0)}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "plain_params", params)
  checkpointer.wait_until_finished()
  checkpointer.close()
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    restore_state(tmp_path / "plain_params", params, verify_checksums=False)


class _StateOf010(NamedTuple):
  """AALIG's state as aalig-optax 0.1.0 saved it: one leaf per scalar."""
  count: jax.Array
  aov: jax.Array
  aov_step: jax.Array
  last_loss: jax.Array
  best_loss: None
  epoch_loss_mean: None
  epoch_loss_count: None
  best_epoch_mean: None
  step_size: jax.Array
  reached_fraction: jax.Array
  num_sections: jax.Array
  num_invalid: jax.Array
  num_skipped: jax.Array
  num_clipped: jax.Array


def test_checkpoint_of_the_old_layout_is_refused_with_the_way_out(tmp_path):
  opt = _opt()
  new = _state_tree(opt)
  core = new["opt_state"][0]
  scalars = {n: getattr(core, n) for n in _StateOf010._fields
             if n not in ("aov", "aov_step", "last_loss") and
             getattr(core, n, None) is not None}
  old = _StateOf010(aov=core.aov, aov_step=core.aov_step,
                    last_loss=core.last_loss, best_loss=None,
                    epoch_loss_mean=None, epoch_loss_count=None,
                    best_epoch_mean=None, **scalars)
  save_state(tmp_path / "old", {"params": new["params"],
                                "opt_state": (old,) + new["opt_state"][1:]})
  with pytest.raises(ValueError) as e:
    restore_state(tmp_path / "old", _like(opt))
  assert "0.1.0" in str(e.value) and "from_fields" in str(e.value)
  # The way out that the message names gives back the state it was.
  rebuilt = ScaleByAaligState.from_fields(
      aov=old.aov, aov_step=old.aov_step, last_loss=old.last_loss,
      config=core.config, **scalars)
  assert _same(rebuilt, core)
