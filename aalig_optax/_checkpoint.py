"""Checked save and restore of training state (optimiser tables included).

A restore must never reshape, pad, truncate, cast or drop a per-example table
in silence: a checkpoint written for another `num_examples`, `table_dtype` or
`loss_estimate`, or one whose files are incomplete, raises a ValueError that
names the leaf. Orbax (``orbax-checkpoint``) is imported only when these
functions are called; the transforms themselves do not need it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

_TABLES = ("aov", "aov_step", "last_loss", "best_loss")
# Written next to Orbax's files once they are complete: each leaf's shape,
# dtype and SHA-256, so that a missing or damaged chunk (which Zarr may read
# back as its fill value) cannot pass unnoticed.
CHECKSUM_FILE = "aalig_checksums.json"


def _key_str(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat(tree: Any) -> dict[str, Any]:
  """{'a/0/aov': leaf} for every non-None leaf; NamedTuples by field name."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_str(k) for k in path): leaf for path, leaf in leaves}


def _describe(path: str, got: Any, want: Any, what: str) -> str:
  got_shape, want_shape = tuple(got.shape), tuple(want.shape)
  msg = (f"leaf '{path}': {what} has shape {got_shape} dtype "
         f"{np.dtype(got.dtype)}, expected shape {want_shape} dtype "
         f"{np.dtype(want.dtype)}")
  name = path.rsplit("/", 1)[-1]
  if (name in _TABLES and got_shape != want_shape and len(got_shape) == 1
      and len(want_shape) == 1):
    msg += (f" (the {what} holds tables for {got_shape[0]} examples, the "
            f"optimiser was built with num_examples={want_shape[0]})")
  return msg


def _compare(found: dict[str, Any], expected: dict[str, Any], what: str):
  problems = []
  for path in sorted(expected.keys() - found.keys()):
    problems.append(f"leaf '{path}' is missing from the {what}")
  for path in sorted(found.keys() - expected.keys()):
    problems.append(f"leaf '{path}' is in the {what} but not expected")
  for path in sorted(found.keys() & expected.keys()):
    got, want = found[path], expected[path]
    if (tuple(np.shape(got)) != tuple(np.shape(want))
        or np.dtype(got.dtype) != np.dtype(want.dtype)):
      problems.append(_describe(path, got, want, what))
  return problems


def validate_state(state: Any, like: Any) -> None:
  """Raises a ValueError unless `state` matches `like` leaf by leaf.

  Checks the tree structure and each leaf's shape and dtype, so that, e.g., a
  state built for another `num_examples`, `table_dtype` or `loss_estimate`
  is reported rather than used.

  Args:
    state: a pytree of arrays, e.g. a restored optimiser state.
    like: the expected pytree: arrays or ``jax.ShapeDtypeStruct`` leaves, e.g.
      ``jax.eval_shape(opt.init, params)``.

  Raises:
    ValueError: naming every mismatched leaf by its path.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from aalig_optax import aalig, validate_state
    >>> state = aalig(0.1, 10, 1, 1).init(jnp.zeros(2))
    >>> like = jax.eval_shape(aalig(0.1, 12, 1, 1).init, jnp.zeros(2))
    >>> try:
    ...   validate_state(state, like)
    ... except ValueError as e:
    ...   print(str(e).splitlines()[1].split(":")[0].strip())
    leaf '0/aov'
  """
  problems = _compare(_flat(state), _flat(like), "state")
  if problems:
    raise ValueError("The state does not match the expected structure:\n  "
                     + "\n  ".join(problems))


def _digest(x: Any) -> str | None:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None  # Multi-process arrays: Orbax's own checks only.
  arr = np.ascontiguousarray(np.asarray(jax.device_get(x)))
  return hashlib.sha256(arr.tobytes()).hexdigest()


def _manifest(state: Any) -> dict[str, Any]:
  return {path: {"shape": list(np.shape(x)), "dtype": str(np.dtype(x.dtype)),
                 "sha256": _digest(x)}
          for path, x in _flat(state).items()}


def _orbax():
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover
    raise ImportError(
        "save_state/restore_state need orbax-checkpoint: "
        "pip install orbax-checkpoint") from e
  return ocp


def save_state(directory: str | os.PathLike, state: Any, *,
               force: bool = False) -> None:
  """Saves a pytree of arrays (params, optimiser state, counters) with Orbax.

  Blocks until the checkpoint is complete on disk.

  Args:
    directory: the checkpoint's directory; must not exist unless `force`.
    state: any pytree of arrays, e.g. ``{"params": p, "opt_state": s}``.
    force: overwrite an existing checkpoint.
  """
  ocp = _orbax()
  path = os.path.abspath(os.fspath(directory))
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(path, state, force=force)
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()
  if jax.process_index() == 0:
    tmp = os.path.join(path, CHECKSUM_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump({"leaves": _manifest(state)}, f)
    os.replace(tmp, os.path.join(path, CHECKSUM_FILE))


def restore_state(directory: str | os.PathLike, like: Any, *,
                  verify_checksums: bool = True) -> Any:
  """Restores a checkpoint of :func:`save_state`, checked against `like`.

  The stored leaves' paths, shapes and dtypes are compared with `like` before
  any array is read, and the restored tree is checked again: nothing is
  padded, truncated, cast or dropped.

  Args:
    directory: the checkpoint's directory.
    like: the expected pytree, with ``jax.ShapeDtypeStruct`` or array leaves,
      e.g. ``jax.eval_shape(lambda: {"params": p, "opt_state": opt.init(p)})``.
      Leaves that carry a ``sharding`` are restored with it, so a checkpoint
      can be restored onto a different set of devices.
    verify_checksums: compare every restored leaf with the SHA-256 that
      :func:`save_state` recorded (its file missing is an error); False for
      checkpoints written by plain Orbax.

  Returns:
    The restored pytree, with the structure of `like`.

  Raises:
    FileNotFoundError: when `directory` does not exist.
    ValueError: when the checkpoint is incomplete or unreadable, or does not
      match `like` (the message names each mismatched leaf).
  """
  ocp = _orbax()
  path = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No checkpoint directory at {path}.")
  checkpointer = ocp.StandardCheckpointer()
  try:
    try:
      metadata = checkpointer.metadata(path)
      stored = _flat(getattr(metadata, "item_metadata", metadata))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f"The checkpoint at {path} is incomplete or corrupt: its metadata "
          f"cannot be read ({type(e).__name__}: {e}).") from e
    if not stored:
      raise ValueError(
          f"The checkpoint at {path} is incomplete or corrupt: it lists no "
          "arrays.")
    checksums = None
    if verify_checksums:
      try:
        with open(os.path.join(path, CHECKSUM_FILE)) as f:
          checksums = json.load(f)["leaves"]
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"The checkpoint at {path} is incomplete or corrupt: its "
            f"{CHECKSUM_FILE}, written when save_state finishes, cannot be "
            f"read ({type(e).__name__}: {e}). Pass verify_checksums=False "
            "for a checkpoint not written by save_state.") from e
    abstract = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
        else jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                  sharding=getattr(x, "sharding", None)),
        like)
    problems = _compare(stored, _flat(abstract), "checkpoint")
    if problems:
      raise ValueError(
          f"The checkpoint at {path} does not match the expected state:\n  "
          + "\n  ".join(problems))
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
    for p, entry in _manifest(restored).items():
      stored_sum = checksums.get(p, {}).get("sha256", "missing")
      if p not in checksums or (
          entry["sha256"] is not None
          and stored_sum not in (None, entry["sha256"])):
        damaged.append(p)
    if damaged:
      raise ValueError(
          f"The checkpoint at {path} is corrupt: the restored values of "
          f"{', '.join(repr(p) for p in damaged)} differ from what save_state "
          "wrote (checksum mismatch).")
  return restored
