"""Checks on compiled HLO text shared by the multi-device tests."""

from __future__ import annotations

import re

# Counted as the overhead benchmark and the step-cost study count them
# (re-exported from studies/hlo.py, which imports no benchmark code).
from studies.hlo import conditional_branches, entry_kernels  # noqa: F401

_COLLECTIVE = re.compile(
    r"= \S+ (all-gather|all-to-all|collective-permute|all-reduce)")


def collectives(text: str) -> list[str]:
  """The HLO lines that move data between devices."""
  return [line for line in text.splitlines() if _COLLECTIVE.search(line)]


def assert_no_table_traffic(text: str, table_sizes, local_rows: int) -> None:
  """No collective of a table's size and no copy of a table's local shard.

  Args:
    text: a compiled program's HLO text.
    table_sizes: the shapes' leading sizes that would mean a whole table (or a
      shard of one) crossed devices.
    local_rows: each device's rows of a table; a `copy` of that size means
      the donated table was not updated in place.
  """
  moved = collectives(text)
  for size in table_sizes:
    big = [line for line in moved if re.search(rf"\[{size}\]", line)]
    assert not big, big[:3]
  copies = [line for line in text.splitlines()
            if re.search(rf"\[{local_rows}\]\S* copy\(", line)]
  assert not copies, copies[:3]


_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) ")
_CALLS = re.compile(r"calls=%([\w.\-]+)")


def usual_path(text: str) -> str:
  """The HLO text of what runs at every call: the ENTRY computation and the
  computations its fusions call, not the branches of its conditionals."""
  bodies: dict[str, list[str]] = {}
  entry, name = None, None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m and line.rstrip().endswith("{"):
      name = m.group(1)
      bodies[name] = []
      if line.startswith("ENTRY"):
        entry = name
    elif name is not None:
      bodies[name].append(line)
  out, todo, seen = [], [entry], set()
  while todo:
    name = todo.pop()
    if name in seen or name not in bodies:
      continue
    seen.add(name)
    for line in bodies[name]:
      out.append(line)
      todo.extend(_CALLS.findall(line))
  return "\n".join(out)
