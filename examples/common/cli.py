"""Command-line pieces shared by the example scripts."""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
from typing import Mapping, Sequence

from examples.common import download
from examples.common import train as train_lib


def add_common_args(parser: argparse.ArgumentParser, *, epochs: int,
                    batch_size: int, optimisers: Sequence[str],
                    workdir: str, quiet: bool = False) -> None:
  """Adds the flags every example has; `quiet` is the default of --quiet."""
  parser.add_argument("--epochs", type=int, default=epochs)
  parser.add_argument("--batch-size", type=int, default=batch_size)
  parser.add_argument("--optimisers", default=",".join(optimisers),
                      help=f"comma-separated, from {train_lib.OPTIMISERS}")
  parser.add_argument("--lr", action="append", default=[],
                      metavar="NAME=VALUE",
                      help="override an optimiser's (maximal) step size, "
                      "e.g. --lr aalig=0.1 (repeatable)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default=workdir,
                      help="runs, checkpoints, metrics and plots go here")
  # A rerun must say what to do with a previous run: never both.
  previous = parser.add_mutually_exclusive_group()
  previous.add_argument("--resume", action="store_true",
                        help="continue each run from its latest checkpoint")
  previous.add_argument("--overwrite", action="store_true",
                        help="replace a previous run's checkpoints and "
                        "results in --workdir (without --resume or "
                        "--overwrite, a previous run stops the script)")
  parser.add_argument("--steps-per-epoch", type=int, default=None,
                      help="cut epochs short (smoke tests)")
  parser.add_argument("--quiet", action="store_true", default=quiet,
                      help="no per-epoch lines" + (" (default)" if quiet
                                                   else ""))
  parser.add_argument("--verbose", dest="quiet", action="store_false",
                      help="one line of metrics per epoch" + (
                          "" if quiet else " (default)"))


def check_workdir(args) -> None:
  """Stops before any work if a rerun would replace a previous run.

  Called right after parsing, so the check happens before data are loaded
  and before the first of several runs is trained.

  Args:
    args: the parsed command line (workdir, resume, overwrite).

  Raises:
    SystemExit: with one sentence naming what exists and the three ways on,
      if ``--workdir`` holds checkpoints or metrics and neither
      ``--resume`` nor ``--overwrite`` was given.
  """
  if args.resume or args.overwrite:
    return
  workdir = pathlib.Path(args.workdir)
  found = train_lib.previous_run_files(workdir)
  if found:
    shown = ", ".join(str(p.relative_to(workdir)) for p in found[:3])
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    raise SystemExit(
        f"{workdir} already holds a previous run ({shown}{more}): pass "
        "--resume to continue it, --overwrite to replace it, or another "
        "--workdir to keep it.")


@contextlib.contextmanager
def clear_errors():
  """Turns missing data and existing runs into one-line exits.

  Inside this block a :class:`~examples.common.download.DataUnavailableError`
  or :class:`~examples.common.train.RunExistsError` ends the script with its
  message alone: it already says what to do, a traceback would bury it.
  """
  try:
    yield
  except (download.DataUnavailableError, train_lib.RunExistsError) as e:
    raise SystemExit(f"error: {e}") from e


def optimiser_configs(args, default_lrs: Mapping[str, float],
                      **kwargs) -> list[train_lib.OptConfig]:
  """The OptConfigs selected by ``--optimisers`` and ``--lr``."""
  lrs = dict(default_lrs)
  for item in args.lr:
    name, value = item.split("=")
    lrs[name] = float(value)
  configs = []
  for name in args.optimisers.split(","):
    name = name.strip()
    if name not in train_lib.OPTIMISERS:
      raise SystemExit(f"unknown optimiser {name!r}; one of "
                       f"{train_lib.OPTIMISERS}")
    extra = dict(kwargs.get("common", {}))
    extra.update(kwargs.get(name, {}))
    configs.append(train_lib.OptConfig(name, lrs[name], **extra))
  return configs


def write_summary(workdir, table: str, histories, extra: dict = None) -> None:
  """Writes ``results.md`` and ``results.json`` into `workdir`."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "results.md").write_text(table + "\n")
  payload = {"histories": histories}
  payload.update(extra or {})
  (workdir / "results.json").write_text(json.dumps(payload, indent=1))
