"""The one report writer of the examples and benchmarks.

:func:`write_files` writes a run's outputs (JSON payloads and Markdown
tables) into its folder; :func:`format_table` makes the Markdown tables;
:func:`environment` records what a run ran on (machine, versions, commit),
for the benchmarks' reports.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
from typing import Any, Mapping, Sequence

__all__ = ["environment", "format_table", "summarise", "write_files",
           "write_summary"]

ROOT = pathlib.Path(__file__).resolve().parents[2]


def write_files(folder, files: Mapping[str, Any], *, indent=1) -> None:
  """Writes each of `files` ({name: content}) into `folder`.

  A ``.json`` name gets its content as JSON (NaN allowed), any other name
  its content as text.
  """
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  for name, content in files.items():
    if name.endswith(".json"):
      content = json.dumps(content, indent=indent, allow_nan=True)
    (folder / name).write_text(content)


def write_summary(workdir, table: str, histories, extra: dict = None) -> None:
  """An example's ``results.md`` (its table) and ``results.json``."""
  payload = {"histories": histories}
  payload.update(extra or {})
  write_files(workdir, {"results.md": table + "\n", "results.json": payload})


def summarise(workdir, heading: str, rows: Sequence[Mapping[str, Any]],
              columns: Sequence[str], histories, plots: str) -> None:
  """Prints an example's closing table and writes it with its histories."""
  table = format_table(rows, columns)
  print(f"\n{heading}\n")
  print(table)
  print(f"\n{plots}")
  write_summary(workdir, table, histories, {"rows": rows})


def format_table(rows: Sequence[Mapping[str, Any]],
                 columns: Sequence[str]) -> str:
  """A Markdown table of `rows` (dicts) with the given columns."""
  def fmt(v):
    if isinstance(v, float):
      if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) or math.isnan(v):
        return f"{v:.3e}"
      return f"{v:.5g}"
    return str(v)
  lines = ["| " + " | ".join(columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
  return "\n".join(lines)


def _git(*cmd):
  try:
    return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
  except Exception:  # pylint: disable=broad-except
    return "?"


def environment() -> dict:
  """The machine, the versions and the commit a run ran on."""
  import jax  # pylint: disable=g-import-not-at-top
  cpu = "?"
  try:
    for line in open("/proc/cpuinfo", encoding="utf-8"):
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  import flax
  import numpy
  import optax  # pylint: disable=g-import-not-at-top,multiple-imports
  import jaxlib  # pylint: disable=g-import-not-at-top
  import aalig_optax  # pylint: disable=g-import-not-at-top
  dirty = _git("status", "--porcelain", "--", "aalig_optax", "benchmarks",
               "examples/common")
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d %H:%M UTC"),
      "nproc": os.cpu_count(),
      "cpu_model": cpu,
      "platform": platform.platform(),
      "devices": [str(d) for d in jax.devices()],
      "backend": jax.default_backend(),
      "load_average_at_start": list(os.getloadavg()),
      "python": sys.version.split()[0],
      "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                   "optax": optax.__version__, "flax": flax.__version__,
                   "numpy": numpy.__version__,
                   "aalig_optax": aalig_optax.__version__},
      "git_commit": _git("rev-parse", "--short", "HEAD"),
      "git_dirty_paths": dirty.splitlines() if dirty not in ("", "?") else [],
  }
