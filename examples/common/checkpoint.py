"""Checkpoints of a run (the library's save_state), and the guard that keeps
a previous run.

One checkpoint per epoch of (state, history), the last two kept;
``resume`` continues from the latest bit for bit. A fresh run never deletes
a previous run's checkpoints or metrics unless told to (``overwrite``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import Optional

import jax
import jax.numpy as jnp

import aalig_optax

__all__ = ["Checkpointer", "Run", "RunExistsError", "previous_run_files"]


def _keys_as_data(tree):
  """PRNG key arrays as their raw uint32 data (what a checkpoint can hold)."""
  return jax.tree.map(
      lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


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
  """One checkpoint per epoch of (state, history), the last 2 kept.

  Each is written by the library's :func:`aalig_optax.save_state` (atomic,
  checksummed, with AALIG's schedule recorded) into ``epoch_<n>/`` with the
  history beside it, and restored by :func:`aalig_optax.restore_state`
  against a freshly initialised template, so a mismatch names its leaf path.
  """

  _PREFIX = "epoch_"

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
    directory = pathlib.Path(directory).resolve()
    if fresh and directory.is_dir() and any(directory.iterdir()):
      if not overwrite:
        raise RunExistsError(
            f"{directory} holds a previous run's checkpoints: pass "
            "resume=True (--resume) to continue it, overwrite=True "
            "(--overwrite) to replace it, or use another workdir.")
      shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self.directory = directory

  def _path(self, epoch: int) -> pathlib.Path:
    return self.directory / f"{self._PREFIX}{epoch:05d}"

  def _epochs(self) -> list[int]:
    return sorted(int(p.name[len(self._PREFIX):])
                  for p in self.directory.glob(self._PREFIX + "[0-9]*")
                  if p.is_dir() and p.name[len(self._PREFIX):].isdigit())

  def save(self, epoch: int, state, history: list) -> None:
    path = self._path(epoch)
    aalig_optax.save_state(path, _keys_as_data(state), force=True)
    # The history goes in after the arrays: a checkpoint without it is
    # incomplete, and latest() skips it.
    tmp = path / "history.json.tmp"
    tmp.write_text(json.dumps(history))
    os.replace(tmp, path / "history.json")
    for old in self._epochs()[:-2]:
      shutil.rmtree(self._path(old))

  def latest(self) -> Optional[int]:
    done = [e for e in self._epochs()
            if (self._path(e) / "history.json").exists()]
    return done[-1] if done else None

  def restore(self, epoch: int, template):
    path = self._path(epoch)
    saved = aalig_optax.restore_state(path, _keys_as_data(template))
    state = jax.tree.map(
        lambda t, x: jax.random.wrap_key_data(
            x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
        template, saved)
    history = json.loads((path / "history.json").read_text())
    return state, list(history)
