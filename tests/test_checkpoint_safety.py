"""Checkpoints (CheckpointManager on Orbax) under kills, misuse and other
schedules.

- A save killed at any moment leaves the last complete step restorable, and
  the next manager on the directory removes the debris.
- Nothing that is not a checkpoint is ever deleted or replaced: a folder of
  other files, a plain file, ``"."``, an existing step, a symlink.
- One writer per directory (an flock on it); a second is refused in one
  sentence.
- A checkpoint is refused by a transform with another schedule, each field
  named (checkpoint vs expected).

States are built by the public ``aalig(...).init``; the tests name no field
of the state but ``config``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from aalig_optax import aalig
from aalig_optax import CheckpointManager
from aalig_optax import restore_state
from aalig_optax import save_state
from aalig_optax import scale_by_aalig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def _randomised(tree, seed):
  """`tree` with every float leaf replaced by random values (tables too)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.random(x.shape), x.dtype)
      if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# --------------------------------------------------------------------------
# A save killed at any moment leaves the last complete step restorable.
# --------------------------------------------------------------------------

N_BIG = 100_000


def _big_tree(seed):
  """About 4 MB of params and AALIG tables; `seed` picks the values."""
  opt = aalig(0.1, N_BIG, 10, 2)
  params = {"w": jnp.zeros((500, 1000)), "b": jnp.zeros(1000)}
  return _randomised({"params": params, "opt_state": opt.init(params),
                      "step": jnp.asarray(seed, jnp.int32)}, seed)


def _child():
  """Child process: save _big_tree(2) as step 2 into argv[1] (which holds
  steps 0 and 1; max_to_keep=2, so step 0 is deleted), dying at a point.

  argv[2] is "none" (run to the end, printing every file-system event), an
  event such as "rename#1" (os._exit just before the first os.rename),
  "rmtree-mid#1" (the first shutil.rmtree deletes about half the files, then
  os._exit: a kill in the middle of a deletion) or "signal" (wait for the
  parent's SIGKILL).
  """
  path, kill = sys.argv[1], sys.argv[2]
  tree = _big_tree(2)
  jax.block_until_ready(tree)
  counts, events = {}, []

  def hooked(module, name):
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
      counts[name] = counts.get(name, 0) + 1
      label = f"{name}#{counts[name]}"
      events.append(label)
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

  manager = CheckpointManager(path, max_to_keep=2)
  for module, name in ((os, "rename"), (os, "replace"), (shutil, "rmtree")):
    hooked(module, name)
  print("SAVING", flush=True)
  start = time.time()
  manager.save(2, tree)
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


def _debris(path):
  return sorted(e for e in os.listdir(path) if not e.isdigit())


def test_save_killed_at_any_point_keeps_the_last_complete_step(tmp_path):
  old, new = _big_tree(1), _big_tree(2)
  like = jax.eval_shape(lambda: old)
  good = tmp_path / "good" / "ckpt"
  with CheckpointManager(good, max_to_keep=2) as manager:
    manager.save(0, _big_tree(0))
    manager.save(1, old)

  def fresh_copy(label):
    path = tmp_path / label.replace("#", "_") / "ckpt"
    shutil.copytree(good, path)
    return path

  # An uninterrupted save, to list its file-system events.
  path = fresh_copy("complete")
  proc = _start_child(path, "none")
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert _same(restore_state(path, like), new)
  assert sorted(os.listdir(path)) == ["1", "2"]
  lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
  save_seconds = float(lines["SAVED"])
  events = lines["EVENTS"].split()
  assert any(e.startswith("rename") for e in events), events
  assert any(e.startswith("rmtree") for e in events), events
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
      # The next manager removes the killed save's debris; saving goes on.
      save_state(path, new, step=3, max_to_keep=2)
      assert _same(restore_state(path, like), new), kill
      assert sorted(os.listdir(path))[-1] == "3", (kill, os.listdir(path))
      assert not _debris(path), (kill, os.listdir(path))
  print(outcomes)
  bad = {k: v for k, v in outcomes.items() if v not in ("old", "new")}
  assert not bad, f"after these kills the last step does not restore: {bad}"
  # The kill points did fall inside the save.
  assert "old" in outcomes.values()


# --------------------------------------------------------------------------
# Nothing that is not a checkpoint is deleted or replaced (red-team item 4,
# and item 7's symlink and two writers).
# --------------------------------------------------------------------------

TREE = {"w": jnp.arange(3.0), "step": jnp.asarray(1)}


@pytest.mark.parametrize("what", ["a folder of user files", "a plain file",
                                  "the current directory"])
def test_never_deletes_what_is_not_a_checkpoint(tmp_path, monkeypatch, what):
  if what == "a folder of user files":
    path = tmp_path / "mine"
    path.mkdir()
    (path / "thesis.tex").write_text("years of work")
  elif what == "a plain file":
    path = tmp_path / "thesis.tex"
    path.write_text("years of work")
  else:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.tex").write_text("years of work")
    path = "."
  with pytest.raises(ValueError, match=r"not a checkpoint|not checkpoints"):
    save_state(path, TREE, step=0)
  with pytest.raises(ValueError, match=r"not a checkpoint|not checkpoints"):
    CheckpointManager(path, max_to_keep=1)
  assert sorted(os.listdir(tmp_path)) == (
      ["mine"] if what == "a folder of user files" else ["thesis.tex"])
  kept = (tmp_path / "mine" / "thesis.tex" if what == "a folder of user files"
          else tmp_path / "thesis.tex")
  assert kept.read_text() == "years of work"


def test_an_existing_step_is_never_replaced(tmp_path):
  save_state(tmp_path / "ckpt", TREE, step=0)
  with pytest.raises(ValueError, match=r"already exists"):
    save_state(tmp_path / "ckpt", {"w": jnp.zeros(3), "step": jnp.asarray(2)},
               step=0)
  assert _same(restore_state(tmp_path / "ckpt", TREE), TREE)


def test_saving_through_a_symlink_keeps_the_link(tmp_path):
  (tmp_path / "real").mkdir()
  os.symlink(tmp_path / "real", tmp_path / "link")
  save_state(tmp_path / "link", TREE, step=0)
  save_state(tmp_path / "link", TREE, step=1, max_to_keep=1)
  assert os.path.islink(tmp_path / "link")
  assert sorted(os.listdir(tmp_path / "real")) == ["1"]
  assert _same(restore_state(tmp_path / "link", TREE), TREE)


def test_a_second_writer_is_refused_and_a_reader_is_not(tmp_path):
  path = tmp_path / "ckpt"
  with CheckpointManager(path, max_to_keep=2) as writer:
    writer.save(0, TREE)
    with pytest.raises(RuntimeError, match=r"another CheckpointManager"):
      CheckpointManager(path)
    # The same from another process, in one sentence.
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, jax.numpy as jnp; "
         "from aalig_optax import save_state; "
         "save_state(sys.argv[1], {'w': jnp.zeros(3)}, step=1)", str(path)],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert "one writer per checkpoint directory" in proc.stderr
    # Readers do not lock: the writer's last step restores meanwhile.
    assert _same(restore_state(path, TREE), TREE)
    writer.save(1, TREE)
  assert sorted(os.listdir(path)) == ["0", "1"]
  save_state(path, TREE, step=2)  # closed: the directory is free again


def test_missing_checkpoint_is_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    restore_state(tmp_path / "nowhere", TREE)
  save_state(tmp_path / "ckpt", TREE, step=0)
  with pytest.raises(FileNotFoundError, match="step 5"):
    restore_state(tmp_path / "ckpt", TREE, step=5)


@pytest.mark.parametrize("over", ["a good checkpoint", "nothing"])
def test_failed_save_changes_nothing(tmp_path, over):
  path = tmp_path / "ckpt"
  if over == "a good checkpoint":
    save_state(path, TREE, step=0)
  with pytest.raises(Exception):  # pylint: disable=broad-except
    save_state(path, dict(TREE, bad="text"), step=1)
  assert "1" not in os.listdir(path)
  if over == "a good checkpoint":
    assert _same(restore_state(path, TREE), TREE)
  # Orbax's temporary folder stays until the next writer on the path.
  save_state(path, TREE, step=2)
  assert not _debris(path), os.listdir(path)


def test_python_scalar_leaves_round_trip(tmp_path):
  tree = {"step": 3, "lr": 0.1, "flag": True, "w": jnp.ones(2)}
  save_state(tmp_path / "ckpt", tree, step=0)
  got = restore_state(tmp_path / "ckpt", tree)
  assert jax.tree.structure(got) == jax.tree.structure(tree)
  assert got["step"] == 3 and got["lr"] == 0.1 and got["flag"]
  assert _bitwise_equal(got["w"], tree["w"])


def test_malformed_config_file_is_a_corrupt_checkpoint(tmp_path):
  save_state(tmp_path / "ckpt", {"s": aalig(0.1, 8, 2, 1).init(jnp.zeros(2))},
             step=0)
  files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "ckpt")
           for f in fs if "aalig_configs" in d and f == "metadata"]
  assert len(files) == 1
  with open(files[0], "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match=r"corrupt"):
    restore_state(tmp_path / "ckpt",
                  jax.eval_shape(lambda: {"s": aalig(0.1, 8, 2, 1).init(
                      jnp.zeros(2))}))


# --------------------------------------------------------------------------
# Restoring into a transform with another schedule.
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
  save_state(tmp_path / "ckpt", _state_tree(_opt()), step=0)
  return tmp_path / "ckpt"


@pytest.mark.parametrize("field,value,shown", [
    ("steps_per_epoch", 4, "steps_per_epoch=5 (checkpoint) vs 4 (expected)"),
    ("epochs_per_section", 3,
     "epochs_per_section=2 (checkpoint) vs 3 (expected)"),
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
                                   num_examples=48)))
  for field in ("steps_per_epoch=5", "epochs_per_section=2",
                "num_examples=40"):
    assert field in str(e.value)


def test_restore_accepts_any_lower_bound_and_another_aov_rule(ckpt):
  """The lower bound and the AOV rule are not the schedule: a state goes on
  with the transform's (AOVs below a higher bound are read as the bound)."""
  want = _state_tree(_opt())
  for changes in (dict(lower_bound=0.25), dict(lower_bound=0.75),
                  dict(lower_bound=jnp.asarray(2.0)),
                  dict(aov_rule="reflect"),
                  dict(aov_rule=lambda a, d, l, b: (a, d))):
    got = restore_state(ckpt, _like(_opt(**changes)))
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
  save_state(tmp_path / "ckpt", {"s": tx.init(params)}, step=0)
  like = jax.eval_shape(
      lambda: {"s": scale_by_aalig(0.1, 40, 5, 2, lower_bound=9.0).init(
          params)})
  restore_state(tmp_path / "ckpt", like)


def test_schedule_is_checked_by_path_inside_nested_transforms(tmp_path):
  def tx(steps):
    import optax  # pylint: disable=g-import-not-at-top
    return optax.apply_if_finite(_opt(steps_per_epoch=steps), 3)

  save_state(tmp_path / "ckpt", _state_tree(tx(5)), step=0)
  restore_state(tmp_path / "ckpt", _like(tx(5)))
  with pytest.raises(ValueError, match=r"'opt_state/inner_state/0'.*"
                     r"steps_per_epoch=5 \(checkpoint\) vs 7 \(expected\)"):
    restore_state(tmp_path / "ckpt", _like(tx(7)))


def _plain_orbax(path, tree):
  manager = ocp.CheckpointManager(path)
  manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
  manager.wait_until_finished()
  manager.close()


def test_checkpoint_without_schedule_is_accepted_with_a_warning(tmp_path):
  # Written by plain Orbax: no configs beside the arrays.
  _plain_orbax(tmp_path / "plain", _state_tree(_opt()))
  with pytest.warns(UserWarning, match=r"schedule cannot be checked"):
    restore_state(tmp_path / "plain", _like(_opt(steps_per_epoch=4)))
  # No AALIG state in `like`: nothing to check, nothing to warn about.
  params = {"w": jnp.arange(3.0)}
  _plain_orbax(tmp_path / "plain_params", params)
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    assert _same(restore_state(tmp_path / "plain_params", params), params)
