"""Orbax checkpoints of a run, and the guard that keeps a previous run.

One checkpoint per epoch of (state, history), the last two kept;
``resume`` continues from the latest bit for bit. A fresh run never deletes
a previous run's checkpoints or metrics unless told to (``overwrite``).
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Checkpointer", "Run", "RunExistsError", "previous_run_files"]


def _to_saveable(state):
  leaves = jax.tree.leaves(state)
  out = {}
  for i, leaf in enumerate(leaves):
    if jnp.issubdtype(jnp.asarray(leaf).dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    out[f"{i:05d}"] = np.asarray(jax.device_get(leaf))
  return out


def _from_saveable(template, saved):
  leaves, treedef = jax.tree.flatten(template)
  new = []
  for i, leaf in enumerate(leaves):
    value = saved[f"{i:05d}"]
    if jnp.issubdtype(jnp.asarray(leaf).dtype, jax.dtypes.prng_key):
      value = jax.random.wrap_key_data(value)
    new.append(jnp.asarray(value, dtype=None if jnp.issubdtype(
        jnp.asarray(leaf).dtype, jax.dtypes.prng_key) else leaf.dtype))
  return jax.tree.unflatten(treedef, new)


def previous_run_files(directory) -> list[pathlib.Path]:
  """What a previous run left in `directory`: checkpoints and metrics.

  Looks at `directory` and two levels of run folders below it (the
  examples' layouts: ``<workdir>/<run>/`` and ``<workdir>/<set>/<run>/``),
  not deeper, so that a mistaken ``--workdir ~`` stays quick.

  Args:
    directory: a run folder or an example's workdir.

  Returns:
    The non-empty ``ckpt`` folders and ``metrics.json`` files found, sorted.
  """
  directory = pathlib.Path(directory)
  found = []
  for pattern in ("", "*/", "*/*/"):
    for path in directory.glob(pattern + "ckpt"):
      if path.is_dir() and any(path.iterdir()):
        found.append(path)
    found.extend(p for p in directory.glob(pattern + "metrics.json")
                 if p.is_file())
  return sorted(found)


class RunExistsError(FileExistsError):
  """A fresh run would replace a previous run's checkpoints."""


@dataclasses.dataclass(frozen=True)
class Run:
  """Where one run goes and what it does with a previous run there.

  Attributes:
    workdir: the run's folder: ``ckpt/`` and ``metrics.json`` go there.
    seed: model-initialisation and data-order seed.
    resume: continue from the latest checkpoint in `workdir` if any.
    overwrite: without `resume`, replace a previous run's checkpoints and
      metrics in `workdir`; without either, a previous run raises
      :class:`RunExistsError` and nothing is deleted.
    verbose: print one line of metrics per epoch.
  """

  workdir: pathlib.Path
  seed: int = 0
  resume: bool = False
  overwrite: bool = False
  verbose: bool = True


class Checkpointer:
  """Orbax checkpoints of (state, history), one per epoch, the last 2 kept.

  The state is saved as its flat list of leaves, so any pytree (NNX states,
  optax NamedTuples with None fields) round-trips exactly into the structure
  of a freshly initialised template.
  """

  def __init__(self, directory: pathlib.Path, fresh: bool,
               overwrite: bool = False):
    """Opens (or, for a fresh run, creates) the checkpoint folder.

    Args:
      directory: the run's ``ckpt`` folder.
      fresh: the run starts from scratch (no ``resume``).
      overwrite: a fresh run may delete the checkpoints already in
        `directory`; without it, existing checkpoints raise.

    Raises:
      RunExistsError: if `fresh`, `directory` holds checkpoints and not
        `overwrite`; nothing is deleted.
    """
    import orbax.checkpoint as ocp  # Imported late: slow to import.
    self._ocp = ocp
    directory = pathlib.Path(directory).resolve()
    if fresh and directory.is_dir() and any(directory.iterdir()):
      if not overwrite:
        raise RunExistsError(
            f"{directory} holds a previous run's checkpoints: pass "
            "resume=True (--resume) to continue it, overwrite=True "
            "(--overwrite) to replace it, or use another workdir.")
      shutil.rmtree(directory)
    self.manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=2, enable_async_checkpointing=False))

  def save(self, epoch: int, state, history: list) -> None:
    ocp = self._ocp
    self.manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_saveable(state)),
        history=ocp.args.JsonSave(history)))
    self.manager.wait_until_finished()

  def latest(self) -> Optional[int]:
    return self.manager.latest_step()

  def restore(self, epoch: int, template):
    ocp = self._ocp
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
        _to_saveable(template))
    out = self.manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        history=ocp.args.JsonRestore()))
    return _from_saveable(template, out["state"]), list(out["history"])
