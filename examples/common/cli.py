"""Command-line pieces shared by the example scripts."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import pathlib
from typing import Any, Mapping, Optional

from examples.common import checkpoint
from examples.common import download
from examples.common import images
from examples.common import optimizers


def positive_int(text: str) -> int:
  """argparse type: an integer of at least 1."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
  return value


def comma_list(choices) -> Any:
  """argparse type: comma-separated names, each one of `choices`."""
  choices = tuple(choices)

  def parse(text: str) -> str:
    items = [t.strip() for t in text.split(",")]
    bad = [t for t in items if t not in choices]
    if bad:
      raise argparse.ArgumentTypeError(
          f"unknown {', '.join(map(repr, bad))}: choose from "
          f"{', '.join(choices)}")
    return ",".join(items)

  parse.__name__ = "comma-separated list"
  return parse


def lr_override(text: str) -> str:
  """argparse type of --lr: NAME=VALUE (or NAME=A:B:C, a grid), NAME an
  optimiser and each value a positive, finite step size."""
  name, sep, values = text.partition("=")
  if not sep:
    raise argparse.ArgumentTypeError(
        f"expected NAME=VALUE (e.g. aalig=0.1), got {text!r}")
  if name not in optimizers.CHOICES:
    raise argparse.ArgumentTypeError(
        f"unknown optimiser {name!r}: one of "
        f"{', '.join(optimizers.CHOICES)}")
  for value in values.split(":"):
    try:
      ok = math.isfinite(float(value)) and float(value) > 0
    except ValueError:
      ok = False
    if not ok:
      raise argparse.ArgumentTypeError(
          f"the step size of {name} must be a positive number, got "
          f"{value!r}")
  return text


def folder(text: str) -> str:
  """argparse type: a path that is not an existing file."""
  if os.path.exists(text) and not os.path.isdir(text):
    raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
  return text


def preset_arg(parser: argparse.ArgumentParser, flag: str,
               presets: Mapping[str, Any], help: str = "", **kwargs
               ) -> None:  # pylint: disable=redefined-builtin
  """A flag whose default is its field in the chosen preset.

  Left out on the command line, the flag takes its value from the preset
  that :func:`parse` picks (``PAPER`` with ``--paper``, else ``CPU``); given,
  it wins over both.
  """
  dest = flag.lstrip("-").replace("-", "_")
  values = {name: getattr(p, dest) for name, p in presets.items()}
  shown = ", ".join(f"{name} {v!r}" for name, v in values.items()
                    if name == "CPU" or v != values["CPU"])
  parser.add_argument(flag, default=argparse.SUPPRESS,
                      help=f"{help} (default: {shown})".lstrip(), **kwargs)


def make_parser(doc: str, *, presets: Mapping[str, Any], workdir: str,
                quiet: bool = False) -> argparse.ArgumentParser:
  """An example's parser with the flags every example has.

  Args:
    doc: the script's docstring (its first line describes the script).
    presets: ``"CPU"`` (and ``"PAPER"``, which adds ``--paper``) to frozen
      dataclasses with at least ``epochs``, ``batch_size`` and
      ``optimisers`` fields: the defaults of those flags (see :func:`parse`).
    workdir: the default of --workdir.
    quiet: the default of --quiet.
  """
  parser = argparse.ArgumentParser(description=doc.split("\n")[0])
  preset_arg(parser, "--epochs", presets, type=positive_int)
  preset_arg(parser, "--batch-size", presets, type=positive_int)
  preset_arg(parser, "--optimisers", presets,
             type=comma_list(optimizers.CHOICES),
             help=f"comma-separated, from {optimizers.CHOICES}")
  if "PAPER" in presets:
    parser.add_argument("--paper", action="store_true",
                        help="the paper's settings: the PAPER preset")
  parser.add_argument("--lr", action="append", default=[],
                      metavar="NAME=VALUE", type=lr_override,
                      help="override an optimiser's (maximal) step size, "
                      "e.g. --lr aalig=0.1 (repeatable)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default=workdir, type=folder,
                      help="runs, checkpoints, metrics and plots go here")
  # A rerun must say what to do with a previous run: never both.
  previous = parser.add_mutually_exclusive_group()
  previous.add_argument("--resume", action="store_true",
                        help="continue each run from its latest checkpoint")
  previous.add_argument("--overwrite", action="store_true",
                        help="replace a previous run's checkpoints and "
                        "results in --workdir (without --resume or "
                        "--overwrite, a previous run stops the script)")
  parser.add_argument("--steps-per-epoch", type=positive_int, default=None,
                      help="cut epochs short (smoke tests)")
  parser.add_argument("--quiet", action="store_true", default=quiet,
                      help="no per-epoch lines" + (" (default)" if quiet
                                                   else ""))
  parser.add_argument("--verbose", dest="quiet", action="store_false",
                      help="one line of metrics per epoch" + (
                          "" if quiet else " (default)"))
  return parser


def parse(parser: argparse.ArgumentParser, argv, presets: Mapping[str, Any]
          ) -> argparse.Namespace:
  """Parses `argv`; flags left out take the chosen preset's values."""
  args = parser.parse_args(argv)
  preset = presets["PAPER" if getattr(args, "paper", False) else "CPU"]
  for field in dataclasses.fields(preset):
    if not hasattr(args, field.name):
      setattr(args, field.name, getattr(preset, field.name))
  return args


@dataclasses.dataclass(frozen=True)
class ImagePreset:
  """The presets of the image examples (see :func:`add_image_args`)."""
  epochs: int
  optimisers: str
  batch_size: int = 128
  max_train: int = 0  # Train on the first N images (0: all).
  max_test: int = 0  # Evaluate on the first N test images (0: all).


def add_image_args(parser: argparse.ArgumentParser,
                   presets: Mapping[str, Any]) -> None:
  """The image examples' data flags; their presets have max_train/max_test."""
  parser.add_argument("--dataset", default="fashion_mnist")
  preset_arg(parser, "--max-train", presets, type=int,
             help="train on the first N images (0: all)")
  preset_arg(parser, "--max-test", presets, type=int,
             help="evaluate on the first N test images (0: all)")
  parser.add_argument("--download", action="store_true",
                      help="let TFDS download and prepare the data set "
                      "(needs tensorflow and a network)")
  parser.add_argument("--tfds", action="store_true",
                      help="read fashion_mnist from TFDS too (other data "
                      "sets always are)")


def load_images(args):
  """The image data set of :func:`add_image_args`' flags."""
  kwargs = dict(max_train=args.max_train or None,
                max_test=args.max_test or None)
  if args.download:
    kwargs["download"] = True
  with clear_errors():
    return images.load_image_dataset(
        args.dataset, source="tfds" if args.tfds else "auto", **kwargs)


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
  found = checkpoint.previous_run_files(workdir)
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
  :class:`~examples.common.checkpoint.RunExistsError` or
  :class:`~examples.common.checkpoint.RunMismatchError` ends the script with
  its message alone: it already says what to do, a traceback would bury it.
  """
  try:
    yield
  except (download.DataUnavailableError, checkpoint.RunExistsError,
          checkpoint.RunMismatchError) as e:
    raise SystemExit(f"error: {e}") from e


def optimiser_configs(args, default_lrs: Mapping[str, float],
                      **kwargs) -> list[optimizers.OptConfig]:
  """The OptConfigs selected by ``--optimisers`` and ``--lr``."""
  lrs = dict(default_lrs)
  for item in args.lr:
    name, value = item.split("=")
    if ":" in value:
      raise SystemExit(f"error: --lr {item}: a grid of step sizes is for "
                       "--sweep only")
    lrs[name] = float(value)
  configs = []
  for name in args.optimisers.split(","):
    name = name.strip()
    if name not in optimizers.CHOICES:
      raise SystemExit(f"unknown optimiser {name!r}; one of "
                       f"{optimizers.CHOICES}")
    extra = dict(kwargs.get("common", {}))
    extra.update(kwargs.get(name, {}))
    configs.append(optimizers.OptConfig(name, lrs[name], **extra))
  return configs


def run_context(args, num_examples: int, *, sections: int = 10,
                drop_remainder: bool = False) -> optimizers.RunContext:
  """The run of --epochs epochs of --batch-size over `num_examples`.

  ``--steps-per-epoch`` cuts the epochs short; the optimiser and the loop
  get this one object. ``drop_remainder``: each epoch drops its last partial
  batch (PyTorch's ``drop_last=True``) rather than padding it.
  """
  return optimizers.RunContext.create(
      num_examples, args.batch_size, args.epochs, sections=sections,
      max_steps_per_epoch=args.steps_per_epoch,
      drop_remainder=drop_remainder)


# Flags that do not change what a run computes, or that pick which runs a
# script makes (each run has a folder of its own): --resume leaves them free.
NOT_RUN_FLAGS = ("resume", "overwrite", "quiet", "workdir", "download",
                 "paper", "optimisers", "problems", "datasets", "variants",
                 "seeds", "sweep")


def run_flags(args) -> dict:
  """The flags a run was made with, by name: stored with its checkpoints so
  that --resume refuses to continue it with others."""
  return {k: v for k, v in sorted(vars(args).items())
          if k not in NOT_RUN_FLAGS}


def run_of(args, workdir, seed: Optional[int] = None) -> checkpoint.Run:
  """A run in `workdir` with --seed (or `seed`), --resume, --overwrite, and
  the command line's other flags (see :func:`run_flags`)."""
  return checkpoint.Run(pathlib.Path(workdir),
                        args.seed if seed is None else seed,
                        resume=args.resume, overwrite=args.overwrite,
                        verbose=not args.quiet, flags=run_flags(args))
