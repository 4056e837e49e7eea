"""Checkpoints of a run (the library's CheckpointManager, on Orbax), and the
guards that keep a previous run.

One checkpoint per epoch of the training state, with the history so far and
the run's flags stored beside it, the last two kept; ``resume`` continues
from the latest bit for bit, and only a run made with the same flags. A fresh
run never deletes a previous run's checkpoints or metrics unless told to
(``overwrite``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

import aalig_optax

__all__ = ["Checkpointer", "Run", "RunExistsError", "RunMismatchError",
           "previous_run_files"]


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


class RunMismatchError(ValueError):
  """``resume`` would continue a run made with other flags, or a run whose
  checkpoints are gone."""


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
    flags: what the run was asked for (e.g. the command line's flags, by
      name): stored with each checkpoint, and ``resume`` refuses a run
      checkpointed with other flags, naming each.
  """

  workdir: pathlib.Path
  seed: int = 0
  resume: bool = False
  overwrite: bool = False
  verbose: bool = True
  flags: Optional[Mapping[str, Any]] = None


class Checkpointer:
  """One checkpoint per epoch of the state, the last 2 kept.

  Each epoch ``n`` is a step directory ``epoch_<n>/`` of
  :class:`aalig_optax.CheckpointManager` (Orbax: complete or absent, AALIG's
  schedule recorded), with the history and the run's flags in its metadata;
  it is restored against a freshly initialised template, so a mismatch names
  its leaf path.
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
    directory = pathlib.Path(directory).resolve()
    if fresh and directory.is_dir() and any(directory.iterdir()):
      if not overwrite:
        raise RunExistsError(
            f"{directory} holds a previous run's checkpoints: pass "
            "resume=True (--resume) to continue it, overwrite=True "
            "(--overwrite) to replace it, or use another workdir.")
      shutil.rmtree(directory)
    self.directory = directory
    self.manager = aalig_optax.CheckpointManager(
        directory, max_to_keep=2, step_prefix="epoch",
        step_format_fixed_length=5)

  def save(self, epoch: int, state, history: list,
           flags: Optional[Mapping[str, Any]] = None) -> None:
    flags = None if flags is None else json.loads(json.dumps(dict(flags)))
    self.manager.save(epoch, _keys_as_data(state),
                      metadata=dict(history=history, flags=flags))

  def latest(self) -> Optional[int]:
    return self.manager.latest_step()

  def flags(self, epoch: int) -> Optional[dict]:
    return self.manager.metadata(epoch).get("flags")

  def restore(self, epoch: int, template):
    saved = self.manager.restore(_keys_as_data(template), epoch)
    state = jax.tree.map(
        lambda t, x: jax.random.wrap_key_data(
            x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
        template, saved)
    history = self.manager.metadata(epoch).get("history")
    if history is None:
      raise ValueError(f"The checkpoint of epoch {epoch} in "
                       f"{self.directory} records no history.")
    return state, list(history)

  def close(self) -> None:
    self.manager.close()


def flag_mismatches(saved: Mapping[str, Any], flags: Mapping[str, Any]
                    ) -> list[str]:
  """'--name: saved X, now Y' for each flag that differs (JSON-compared)."""
  return [f"--{k.replace('_', '-')}: {saved.get(k)!r} in the run, "
          f"{flags.get(k)!r} now" for k in sorted(saved.keys() | flags.keys())
          if saved.get(k) != flags.get(k)]
