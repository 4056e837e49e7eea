"""Checked save and restore of training state (optimiser tables included).

A restore must never reshape, pad, truncate, cast or drop a per-example table
in silence: a checkpoint written for another `num_examples`, `table_dtype` or
`loss_estimate`, or one whose files are incomplete, raises a ValueError that
names the leaf. Orbax (``orbax-checkpoint``) is imported only when these
functions are called; the transforms themselves do not need it.

Next to Orbax's files, :func:`save_state` writes ``aalig_checksums.json``:
each leaf's shape, dtype and SHA-256, and the :class:`AaligConfig` of every
:class:`ScaleByAaligState` in the tree (by its path). :func:`restore_state`
uses it to catch damaged files, and to refuse a checkpoint of another AALIG
schedule (`steps_per_epoch`, `epochs_per_section`, a lower `lower_bound`):
its counters and AOVs would be read against the wrong sections.

Saving is atomic on a local (POSIX) file system: the checkpoint is written in
full beside its destination and renamed into place, so a save that fails or
is killed at any moment leaves the previous checkpoint restorable (or no
checkpoint, for a new one), never a mixture; the next save to the same path
removes what a killed one left behind. Leaves may be arrays (JAX or NumPy)
or Python ``bool``, ``int`` and ``float`` scalars, which restore as the same
Python scalars. One process (or one multi-process job) writes a given path at
a time.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from typing import Any
import warnings

import jax
import numpy as np

from aalig_optax import _manifest
from aalig_optax._manifest import CHECKSUM_FILE
from aalig_optax._manifest import validate_state

# Siblings of a checkpoint at PATH during a save: PATH.tmp-<hex> is the new
# checkpoint being written (or an old one being deleted), PATH.old-<hex> the
# previous, complete checkpoint between the two renames of a commit.
_TMP = r"\.tmp-[0-9a-f]{16}(\.orbax-checkpoint-tmp.*)?|\.orbax-checkpoint-tmp.*"
_OLD = r"\.old-[0-9a-f]{16}"


def _orbax():
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover
    raise ImportError(
        "save_state/restore_state need orbax-checkpoint: "
        "pip install orbax-checkpoint") from e
  return ocp


def _siblings(path: str, pattern: str) -> list[str]:
  parent, name = os.path.split(path)
  try:
    entries = os.listdir(parent)
  except FileNotFoundError:
    return []
  rx = re.compile(re.escape(name) + f"(?:{pattern})")
  return sorted(os.path.join(parent, e) for e in entries if rx.fullmatch(e))


def _token() -> str:
  """16 random hex digits, the same on every process."""
  words = np.frombuffer(os.urandom(8), np.uint32)
  if jax.process_count() > 1:
    words = np.asarray(_multihost().broadcast_one_to_all(words))
  return "".join(f"{int(w):08x}" for w in words)


def _multihost():
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    _multihost().sync_global_devices(name)


def _fsync(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass  # Not every file system syncs directories.
  finally:
    os.close(fd)


def _delete_old(old: str, path: str) -> None:
  """Deletes a previous checkpoint `old` of `path`.

  It is renamed to a .tmp- name first, so that an .old- sibling is always
  complete and a half-deleted one is mere debris.
  """
  trash = f"{path}.tmp-{secrets.token_hex(8)}"
  try:
    os.rename(old, trash)
  except OSError:
    trash = old
  if os.path.isdir(trash) and not os.path.islink(trash):
    shutil.rmtree(trash, ignore_errors=True)
  else:  # `force` replaced a file or a link
    os.remove(trash)


def _recover(path: str) -> None:
  """Finishes or undoes a save that was killed; removes its debris."""
  olds = _siblings(path, _OLD)
  if olds and not os.path.lexists(path):
    # Killed between its two renames: the previous checkpoint goes back.
    os.rename(olds.pop(), path)
  for old in olds:
    _delete_old(old, path)
  for debris in _siblings(path, _TMP):
    shutil.rmtree(debris, ignore_errors=True)


def _resolve(path: str) -> str:
  """The directory to read: `path`, or its previous checkpoint mid-commit."""
  if os.path.isdir(path):
    return path
  olds = [p for p in _siblings(path, _OLD) if os.path.isdir(p)]
  if olds:
    return max(olds, key=os.path.getmtime)
  raise FileNotFoundError(f"No checkpoint directory at {path}.")


def _commit(tmp: str, path: str, token: str) -> None:
  """Renames the complete checkpoint `tmp` to `path`, replacing one there."""
  parent = os.path.dirname(path)
  old = f"{path}.old-{token}"
  replacing = os.path.lexists(path)
  # A directory cannot be renamed over a non-empty one: the old checkpoint
  # steps aside first. In between, restore_state reads it from `old`.
  if replacing:
    os.rename(path, old)
  try:
    os.rename(tmp, path)
  except BaseException:
    if replacing:
      os.rename(old, path)
    raise
  _fsync(parent)
  if replacing:
    _delete_old(old, path)


def save_state(directory: str | os.PathLike, state: Any, *,
               force: bool = False) -> None:
  """Saves a pytree (params, optimiser state, counters) with Orbax, atomically.

  Blocks until the checkpoint is complete on disk. The checksums and the
  AALIG configs (see the module docstring) are computed first, so a leaf that
  cannot be saved fails before anything is written. Orbax then writes the
  checkpoint to a sibling ``<directory>.tmp-<random>``, which is renamed to
  `directory`. When `directory` exists (``force=True``), it is first renamed
  to ``<directory>.old-<random>`` and deleted only after the new checkpoint is
  in place; :func:`restore_state` reads the ``.old-`` sibling if a kill falls
  between the two renames, and the next :func:`save_state` to the same path
  puts it back (or deletes it) and removes other debris of a killed save. So
  at every instant either the previous or the new checkpoint restores, and a
  save that raises leaves the previous one (or nothing) untouched. While it
  runs, the disk holds both checkpoints.

  Args:
    directory: the checkpoint's directory, on a local file system; must not
      exist unless `force`.
    state: a pytree whose leaves are arrays (JAX or NumPy, not empty) or
      Python ``bool``, ``int`` (within int64) or ``float`` scalars, e.g.
      ``{"params": p, "opt_state": s, "step": 3}``.
    force: replace an existing checkpoint.

  Raises:
    ValueError: when `directory` exists and `force` is False.
    TypeError: naming a leaf that cannot be saved (nothing is written).
    Exception: whatever Orbax raises for a tree it cannot save (nothing is
      written).

  Example:
    >>> import tempfile, os, jax.numpy as jnp
    >>> from aalig_optax import save_state, restore_state
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> save_state(path, {"w": jnp.ones(2), "step": 3})
    >>> save_state(path, {"w": jnp.zeros(2), "step": 4}, force=True)
    >>> restore_state(path, {"w": jnp.ones(2), "step": 0})["step"]
    4
  """
  ocp = _orbax()
  path = os.path.abspath(os.fspath(directory))
  primary = jax.process_index() == 0
  text = json.dumps(_manifest.manifest(state))
  if primary:
    _recover(path)
  _sync("aalig_save_state_recovered")
  if os.path.lexists(path) and not force:
    raise ValueError(
        f"Destination {path} already exists; pass force=True to replace it.")
  token = _token()
  tmp = f"{path}.tmp-{token}"
  try:
    # Synchronous: an asynchronous checkpointer that fails may still create
    # its directories after save returns, behind our clean-up.
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
      checkpointer.save(tmp, args=ocp.args.StandardSave(state))
    finally:
      checkpointer.close()
    if primary:
      if not os.path.isdir(tmp):
        raise RuntimeError(f"Orbax did not finish writing {tmp}.")
      manifest = os.path.join(tmp, CHECKSUM_FILE)
      with open(manifest, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
      _fsync(tmp)
      _commit(tmp, path, token)
  except BaseException:
    if primary:  # The previous checkpoint (if any) is still in place.
      for debris in _siblings(tmp, r"|\.orbax-checkpoint-tmp.*"):
        shutil.rmtree(debris, ignore_errors=True)
    raise
  _sync("aalig_save_state_committed")


def restore_state(directory: str | os.PathLike, like: Any, *,
                  verify_checksums: bool = True) -> Any:
  """Restores a checkpoint of :func:`save_state`, checked against `like`.

  The stored leaves' paths, shapes and dtypes are compared with `like` before
  any array is read, and the restored tree is checked again: nothing is
  padded, truncated, cast or dropped. Each :class:`ScaleByAaligState` in
  `like` is checked against the config stored for the same path:
  `num_examples`, `steps_per_epoch`, `epochs_per_section`, `loss_estimate`
  and `table_dtype` must be equal, and `lower_bound` must not be higher than
  the stored one (a lower bound is still met by the stored AOVs; a bound
  injected as a JAX array, on either side, is not compared). A checkpoint
  that records no config for such a state (written before configs were
  recorded, or by plain Orbax) is restored with a ``UserWarning``.

  If `directory` is missing because a :func:`save_state` overwriting it was
  killed between its two renames, the previous checkpoint is read from the
  ``<directory>.old-*`` sibling.

  Args:
    directory: the checkpoint's directory.
    like: the expected pytree, with ``jax.ShapeDtypeStruct`` or array leaves,
      e.g. ``jax.eval_shape(lambda: {"params": p, "opt_state": opt.init(p)})``,
      which keeps each AALIG state's static config. Leaves that carry a
      ``sharding`` are restored with it, so a checkpoint can be restored onto
      a different set of devices. Where a Python scalar was saved, `like` may
      hold a Python scalar of the same type or a shape-() leaf of its kind
      (what ``jax.eval_shape`` makes of it: int32 for an int, float32 for a
      float); either way the saved Python scalar comes back, unchanged.
    verify_checksums: compare every restored leaf with the SHA-256 that
      :func:`save_state` recorded (its checksum file missing or malformed is
      an error); False for checkpoints written by plain Orbax, whose AALIG
      schedule then cannot be checked (a ``UserWarning``).

  Returns:
    The restored pytree, with the structure of `like` (AALIG configs
    included).

  Raises:
    FileNotFoundError: when `directory` does not exist.
    ValueError: when the checkpoint is incomplete or corrupt (its checksum
      file malformed included), or does not match `like`: the message names
      each mismatched leaf, and each AALIG state saved for another schedule
      with its differing fields (checkpoint vs expected).

  Example:
    >>> import tempfile, os, jax, jax.numpy as jnp
    >>> from aalig_optax import aalig, save_state, restore_state
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> p = jnp.zeros(2)
    >>> tree = lambda tx: {"params": p, "opt_state": tx.init(p)}
    >>> save_state(path, tree(aalig(0.1, 8, 4, 1)))
    >>> like = jax.eval_shape(lambda: tree(aalig(0.1, 8, 2, 1)))
    >>> try:
    ...   restore_state(path, like)
    ... except ValueError as e:
    ...   print(str(e).split(": ")[-1])
    steps_per_epoch=4 (checkpoint) vs 2 (expected)
  """
  ocp = _orbax()
  path = _resolve(os.path.abspath(os.fspath(directory)))
  checkpointer = ocp.StandardCheckpointer()
  try:
    try:
      metadata = checkpointer.metadata(path)
      stored = _manifest.specs(getattr(metadata, "item_metadata", metadata),
                      "checkpoint")
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f"The checkpoint at {path} is incomplete or corrupt: its metadata "
          f"cannot be read ({type(e).__name__}: {e}).") from e
    if not stored:
      raise ValueError(
          f"The checkpoint at {path} is incomplete or corrupt: it lists no "
          "arrays.")
    checksums, configs, unreadable = None, None, None
    try:
      with open(os.path.join(path, CHECKSUM_FILE)) as f:
        checksums, configs = _manifest.parse_manifest(json.load(f))
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
      unreadable = f"{type(e).__name__}: {e}"
      if verify_checksums:
        raise ValueError(
            f"The checkpoint at {path} is incomplete or corrupt: its "
            f"{CHECKSUM_FILE}, written when save_state finishes, cannot be "
            f"read ({unreadable}). Pass verify_checksums=False for a "
            "checkpoint not written by save_state.") from e
    if not verify_checksums:
      checksums = None
    expected = _manifest.specs(like, "expected state")

    def target(key_path, x):
      got = stored.get(_manifest.path_str(key_path))
      if got is not None and got.python is not None:
        # Orbax restores a Python scalar into a Python scalar of its type.
        return _manifest.SCALAR_TYPES[got.python]()
      if (type(x) in _manifest.PYTHON_SCALARS
          or isinstance(x, jax.ShapeDtypeStruct)):
        return x
      return jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                  sharding=getattr(x, "sharding", None))

    abstract = jax.tree_util.tree_map_with_path(target, like)
    problems, unchecked = _manifest.schedule_problems(
        configs, _manifest.configs(like))
    problems += _manifest.compare(stored, expected, "checkpoint")
    if problems:
      raise ValueError(
          f"The checkpoint at {path} does not match the expected state:\n  "
          + "\n  ".join(problems))
    if unchecked:
      warnings.warn(
          f"The checkpoint at {path} records no AALIG config for "
          f"{', '.join(repr(p) for p in unchecked)} (it was written before "
          "save_state recorded them, or not by save_state"
          + (f"; {CHECKSUM_FILE}: {unreadable}" if unreadable else "")
          + "): its schedule cannot be checked against the transform's "
          "steps_per_epoch, epochs_per_section and lower_bound.",
          UserWarning, stacklevel=2)
    try:
      restored = checkpointer.restore(path, abstract)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f"The checkpoint at {path} is incomplete or corrupt: reading its "
          f"arrays failed ({type(e).__name__}: {e}).") from e
  finally:
    checkpointer.close()
  validate_state(restored, abstract)
  if checksums is not None:
    damaged = []
    for p, x in _manifest.flat(restored).items():
      entry = checksums.get(p)
      got = _manifest.digest(x, _manifest.spec(x))
      if entry is None or (got is not None
                           and entry["sha256"] not in (None, got)):
        damaged.append(p)
    if damaged:
      raise ValueError(
          f"The checkpoint at {path} is corrupt: the restored values of "
          f"{', '.join(repr(p) for p in damaged)} differ from what save_state "
          "wrote (checksum mismatch).")
  return restored

