"""Command-line pieces shared by the example scripts."""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Mapping, Sequence

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
  parser.add_argument("--resume", action="store_true",
                      help="continue each run from its latest checkpoint")
  parser.add_argument("--steps-per-epoch", type=int, default=None,
                      help="cut epochs short (smoke tests)")
  parser.add_argument("--quiet", action="store_true", default=quiet,
                      help="no per-epoch lines" + (" (default)" if quiet
                                                   else ""))
  parser.add_argument("--verbose", dest="quiet", action="store_false",
                      help="one line of metrics per epoch" + (
                          "" if quiet else " (default)"))


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
