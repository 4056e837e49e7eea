"""Checkpoints of training state (AALIG's tables included) on Orbax.

Orbax's ``CheckpointManager`` does the work: a directory per step, written
under a temporary name and renamed into place when complete (a save killed at
any moment leaves the previous steps restorable; the next writer removes the
debris), the last `max_to_keep` steps kept. AALIG's own part: beside the
arrays, each step stores the :class:`AaligConfig` of every
:class:`ScaleByAaligState` in the tree as JSON, and a restore checks leaves
and configs against `like`. The state is otherwise an arbitrary pytree.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Optional
import warnings

import jax
import numpy as np

from aalig_optax._state import ScaleByAaligState

STATE, CONFIGS = "state", "aalig_configs"


def _orbax():
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover
    raise ImportError("checkpoints need orbax-checkpoint: "
                      "pip install orbax-checkpoint") from e
  return ocp


def _path(key_path) -> str:
  return jax.tree_util.keystr(key_path, simple=True, separator="/")


# The config fields a restored state must share with `like`: what its tables'
# rows and counters mean. (The AOV rule may change between runs.)
_SCHEDULE = ("num_examples", "steps_per_epoch", "epochs_per_section",
             "loss_estimate", "table_dtype")


def _json_config(config) -> dict[str, Any]:
  """A config as JSON: a callable AOV rule by its qualified name."""
  out = dataclasses.asdict(config)
  rule = out.get("aov_rule")
  if callable(rule):
    out["aov_rule"] = f"{rule.__module__}.{rule.__qualname__}"
  return out


def _configs(tree) -> dict[str, Any]:
  """{path: config as a dict} of every ScaleByAaligState in `tree`."""
  nodes, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, ScaleByAaligState))
  return {_path(p): _json_config(s.config) for p, s in nodes
          if isinstance(s, ScaleByAaligState) and s.config is not None}


def _spec(x) -> tuple[tuple[int, ...], Optional[np.dtype]]:
  """A leaf's shape and dtype (none for a Python scalar: Orbax converts)."""
  if isinstance(x, (bool, int, float)) or type(x).__name__ == "ScalarMetadata":
    return (), None
  return tuple(x.shape), np.dtype(x.dtype)


def _mismatches(found, expected, what: str) -> list[str]:
  """Each leaf of `found` (a `what`) that is missing, extra or differs."""
  got = {_path(p): _spec(x) for p, x in
         jax.tree_util.tree_flatten_with_path(found)[0]}
  want = {_path(p): _spec(x) for p, x in
          jax.tree_util.tree_flatten_with_path(expected)[0]}
  problems = [f"leaf '{p}' is missing from the {what}"
              for p in sorted(want.keys() - got.keys())]
  problems += [f"leaf '{p}' is in the {what} but not expected"
               for p in sorted(got.keys() - want.keys())]
  for p in sorted(got.keys() & want.keys()):
    (shape, dtype), (shape_want, dtype_want) = got[p], want[p]
    if shape != shape_want or None not in (dtype, dtype_want) and (
        dtype != dtype_want):
      problems.append(
          f"leaf '{p}': {what} has shape {shape} dtype {dtype}, expected "
          f"shape {shape_want} dtype {dtype_want}")
  return problems


def validate_state(state: Any, like: Any) -> None:
  """Raises a ValueError naming each leaf (path) whose presence, shape or
  dtype differs between `state` and `like` (e.g. ``jax.eval_shape(opt.init,
  params)``): a state of another `num_examples` or `table_dtype`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from aalig_optax import aalig, validate_state
    >>> state = aalig(0.1, 10, 1, 1).init(jnp.zeros(2))
    >>> like = jax.eval_shape(aalig(0.1, 12, 1, 1).init, jnp.zeros(2))
    >>> try:
    ...   validate_state(state, like)
    ... except ValueError as e:
    ...   print(str(e).splitlines()[0])
    The state does not match the expected structure:
  """
  problems = _mismatches(state, like, "state")
  if problems:
    raise ValueError("The state does not match the expected structure:\n  "
                     + "\n  ".join(problems))


def _schedule_problems(stored: dict, expected: dict) -> list[str]:
  """Each AALIG state whose config differs, with each field named."""
  problems = []
  for path, want in sorted(expected.items()):
    have = stored.get(path)
    if have is None:
      problems.append(f"the checkpoint holds no AALIG state at '{path}'")
      continue
    diffs = [f"{field}={have.get(field)!r} (checkpoint) vs "
             f"{want.get(field)!r} (expected)" for field in _SCHEDULE
             if have.get(field) != want.get(field)]
    if diffs:
      problems.append(
          f"the AALIG state at '{path}' was saved for another schedule (its "
          "counters and AOVs would be read against the wrong sections): "
          + "; ".join(diffs))
  return problems


def _check_directory(directory: str, step_prefix: Optional[str]) -> None:
  """Refuses a path that holds anything but Orbax's step directories."""
  if os.path.lexists(directory) and not os.path.isdir(directory):
    raise ValueError(f"{directory} is a file, not a checkpoint directory.")
  if not os.path.isdir(directory):
    return
  step = (re.escape(step_prefix) + "_" if step_prefix else "") + r"\d+"
  others = sorted(e for e in os.listdir(directory) if not
                  re.fullmatch(step + r"(\.orbax-checkpoint-tmp.*)?", e))
  if others:
    raise ValueError(
        f"{directory} holds {', '.join(others[:5])}"
        + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        + ", which are not checkpoints: checkpoints go to a directory of "
        "their own (new or empty).")


class CheckpointManager:
  """Saves and restores training state, one Orbax step directory per step.

  A thin layer on ``orbax.checkpoint.CheckpointManager`` (attribute
  ``orbax``): each step holds the state (``StandardSave``) and its AALIG
  configs (``JsonSave``). A writer refuses (ValueError) a directory holding
  anything but checkpoints, or a file: nothing else is ever deleted. One
  writer per directory: a second (an flock on the directory, one host)
  raises a RuntimeError.

  Args:
    directory: where the step directories go (created if missing).
    max_to_keep: keep only the latest this many steps (None: all).
    step_prefix: name step directories ``<prefix>_<step>``, not ``<step>``.
    step_format_fixed_length: pad the step number with zeros to this width.
    read_only: open to restore only: no lock, no clean-up, no directory made.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp
    >>> from aalig_optax import aalig, CheckpointManager
    >>> p = jnp.zeros(2)
    >>> tree = lambda tx: {"params": p, "opt_state": tx.init(p)}
    >>> with CheckpointManager(tempfile.mkdtemp(), max_to_keep=2) as ckpt:
    ...   ckpt.save(0, tree(aalig(0.1, 8, 4, 1)))
    ...   like = jax.eval_shape(lambda: tree(aalig(0.1, 8, 2, 1)))
    ...   try:
    ...     ckpt.restore(like)
    ...   except ValueError as e:
    ...     print(str(e).split(": ")[-1])
    steps_per_epoch=4 (checkpoint) vs 2 (expected)
  """

  def __init__(self, directory: str | os.PathLike, *,
               max_to_keep: Optional[int] = None,
               step_prefix: Optional[str] = None,
               step_format_fixed_length: Optional[int] = None,
               read_only: bool = False):
    ocp = _orbax()
    self.directory = os.path.abspath(os.fspath(directory))
    if not read_only:  # A reader deletes nothing, whatever lies beside.
      _check_directory(self.directory, step_prefix)
    self._lock = None
    if not read_only and jax.process_index() == 0:
      os.makedirs(self.directory, exist_ok=True)
      self._lock = _lock(self.directory)
    try:
      self.orbax = ocp.CheckpointManager(
          self.directory, options=ocp.CheckpointManagerOptions(
              max_to_keep=max_to_keep, step_prefix=step_prefix,
              step_format_fixed_length=step_format_fixed_length,
              read_only=read_only, create=not read_only,
              cleanup_tmp_directories=not read_only,
              enable_async_checkpointing=False),
          item_handlers={STATE: ocp.StandardCheckpointHandler(),
                         CONFIGS: ocp.JsonCheckpointHandler()})
    except BaseException:
      if self._lock is not None:
        os.close(self._lock)
      raise

  def save(self, step: int, state: Any, *,
           metadata: Optional[dict[str, Any]] = None) -> None:
    """Saves `state` (a pytree of arrays) as `step`, complete on return.

    `metadata`: a JSON-able dict stored with the step (Orbax's
    ``custom_metadata``), read back by :meth:`metadata`. An existing step
    raises (StepAlreadyExistsError); it is not replaced."""
    ocp = _orbax()
    # force: Orbax's policy would skip, in silence, a step not after the
    # latest; an existing step still raises (StepAlreadyExistsError).
    self.orbax.save(step, force=True, custom_metadata=metadata,
                    args=ocp.args.Composite(**{
                        STATE: ocp.args.StandardSave(state),
                        CONFIGS: ocp.args.JsonSave(_configs(state))}))
    self.orbax.wait_until_finished()

  def metadata(self, step: int) -> dict[str, Any]:
    """The `metadata` saved with `step` ({} if none)."""
    return dict(self.orbax.metadata(step).custom_metadata or {})

  def latest_step(self) -> Optional[int]:
    return self.orbax.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.orbax.all_steps())

  def restore(self, like: Any, step: Optional[int] = None) -> Any:
    """Restores `step` (default: the latest) into the structure of `like`.

    `like`: e.g. ``jax.eval_shape(lambda: {"params": p, "opt_state":
    tx.init(p)})``; leaves with a ``sharding`` are restored with it. Raises
    FileNotFoundError without the step, and ValueError naming each leaf
    whose path, shape or dtype differs, each AALIG state saved for another
    schedule with its fields (checkpoint vs expected), or files that cannot
    be read.
    """
    ocp = _orbax()
    step = self.latest_step() if step is None else step
    if step is None or step not in self.all_steps():
      raise FileNotFoundError(
          f"No checkpoint{'' if step is None else f' of step {step}'} in "
          f"{self.directory}.")
    where = f"The checkpoint of step {step} in {self.directory}"
    try:
      metadata = self.orbax.item_metadata(step)
      stored = metadata[STATE]
      stored = getattr(stored, "tree", stored)
      if stored is None:
        raise ValueError("no state metadata")
      configs = None
      if CONFIGS in metadata.keys():
        configs = self.orbax.restore(step, args=ocp.args.Composite(**{
            CONFIGS: ocp.args.JsonRestore()}))[CONFIGS]
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{where} is incomplete or corrupt: its metadata "
                       f"cannot be read ({type(e).__name__}: {e}).") from e
    problems = _mismatches(stored, like, "checkpoint")
    if configs is None and _configs(like):
      warnings.warn(f"{where} records no AALIG config: its schedule cannot "
                    "be checked.", UserWarning, stacklevel=2)
    elif configs is not None:
      problems += _schedule_problems(configs, _configs(like))
    if problems:
      raise ValueError(f"{where} does not match the expected state:\n  "
                       + "\n  ".join(problems))
    abstract = jax.tree.map(
        lambda x: x if isinstance(x, (bool, int, float)) else
        jax.ShapeDtypeStruct(x.shape, x.dtype,
                             sharding=getattr(x, "sharding", None)), like)
    try:
      return self.orbax.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(abstract)}))[STATE]
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{where} is incomplete or corrupt: reading its "
                       f"arrays failed ({type(e).__name__}: {e}).") from e

  def close(self) -> None:
    self.orbax.close()
    if self._lock is not None:
      os.close(self._lock)
      self._lock = None

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _lock(directory: str) -> Optional[int]:
  """An exclusive lock on `directory` itself (None where unsupported)."""
  import fcntl  # pylint: disable=g-import-not-at-top
  fd = os.open(directory, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd
  except OSError as e:
    os.close(fd)
    if isinstance(e, BlockingIOError):
      raise RuntimeError(
          f"{directory} is open for writing by another "
          "CheckpointManager (in this or another process): one writer per "
          "checkpoint directory.") from None
    return None


def save_state(directory: str | os.PathLike, state: Any, *, step: int,
               max_to_keep: Optional[int] = None) -> None:
  """Saves `state` as `step` in `directory`: ``CheckpointManager`` once.

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from aalig_optax import save_state, restore_state
    >>> path = tempfile.mkdtemp()
    >>> save_state(path, {"w": jnp.ones(2)}, step=3)
    >>> save_state(path, {"w": jnp.zeros(2)}, step=4)
    >>> restore_state(path, {"w": jnp.ones(2)})["w"].tolist()
    [0.0, 0.0]
  """
  with CheckpointManager(directory, max_to_keep=max_to_keep) as manager:
    manager.save(step, state)


def restore_state(directory: str | os.PathLike, like: Any, *,
                  step: Optional[int] = None) -> Any:
  """Restores `step` (default: the latest) of `directory`, checked against
  `like`: see :meth:`CheckpointManager.restore`."""
  with CheckpointManager(directory, read_only=True) as manager:
    return manager.restore(like, step)
