"""Reading compiled HLO text: the top-level instructions and their opcodes.

Shared by the overhead benchmark (kernel counts in its report), the
step-cost study and the tests that check the compiled step
(`tests/hlo_checks.py`), so that all count the same way; it lives outside
`benchmarks/` so that the core tests import no benchmark code. Only the
standard library: importing it pulls in no model code.
"""

from __future__ import annotations

import re
from typing import Iterator

# An instruction's opcode in HLO text: `%name = <shape> <opcode>(`, once
# the `/*index=5*/` comments of long tuple shapes are dropped.
_OPCODE = re.compile(r"=\s*(?:\([^=]*?\)|\S+)\s+([a-z][a-z0-9\-]*)\(")
_INDEX_COMMENT = re.compile(r"/\*index=\d+\*/")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_PRED_BRANCHES = re.compile(
    r"true_computation=%?([^,\s]+),\s*false_computation=%?([^,\s]+)")
_RESULT_SHAPE = re.compile(r"=\s*(\([^=]*?\)|\S+)\s+conditional\(")
# Instructions that launch no kernel.
FREE = frozenset({"parameter", "constant", "get-tuple-element", "tuple",
                  "bitcast"})


def opcode(line: str) -> str | None:
  """The opcode of an HLO instruction line (`%x = <shape> <opcode>(...`)."""
  m = _OPCODE.search(_INDEX_COMMENT.sub("", line))
  return m.group(1) if m else None


def entry_lines(text: str) -> Iterator[str]:
  """The lines of the ENTRY computation's body."""
  in_entry = False
  for line in text.splitlines():
    if line.startswith("ENTRY"):
      in_entry = True
    elif in_entry:
      if line.startswith("}"):
        return
      yield line


def entry_kernels(text: str) -> dict[str, int]:
  """The ENTRY computation's instructions that do work, counted by opcode.

  Each one is a kernel (a thunk on CPU, a launch on GPU) at every call:
  fusions, sorts, conditionals, copies... (parameters, constants, tuples,
  get-tuple-element and bitcasts are free).

  Example::

    >>> import jax, jax.numpy as jnp
    >>> text = jax.jit(lambda x: jnp.sin(x) + 1).lower(
    ...     jnp.ones(3)).compile().as_text()
    >>> entry_kernels(text)
    {'fusion': 1}
  """
  counts: dict[str, int] = {}
  for line in entry_lines(text):
    op = opcode(line)
    if op and op not in FREE:
      counts[op] = counts.get(op, 0) + 1
  return counts


def computation_lines(text: str, name: str) -> list[str]:
  """The lines of the body of computation `name` (without its ``%``).

  Raises:
    ValueError: if `text` has no computation of that name (an empty body
      would read as one that runs no kernel).
  """
  lines, inside = [], False
  for line in text.splitlines():
    if not inside:
      inside = (line.startswith((f"%{name} ", f"ENTRY %{name} "))
                and line.rstrip().endswith("{"))
    elif line.startswith("}"):
      return lines
    else:
      lines.append(line)
  raise ValueError(f"no computation %{name} in this HLO text")


def conditional_branches(text: str) -> list[tuple[str, list[dict[str, int]]]]:
  """Each top-level conditional: its result shape, and the kernels each of
  its branches runs (counted as :func:`entry_kernels` counts them).

  Example::

    >>> import jax, jax.numpy as jnp
    >>> f = lambda p, x: jax.lax.cond(p, jnp.sin, lambda x: x, x)
    >>> text = jax.jit(f).lower(True, jnp.ones(3)).compile().as_text()
    >>> [(shape, sorted(map(sum, (b.values() for b in branches))))
    ...  for shape, branches in conditional_branches(text)]
    [('(f32[3]{0})', [0, 1])]
  """
  out = []
  for line in entry_lines(text):
    clean = _INDEX_COMMENT.sub("", line)
    if opcode(line) != "conditional":
      continue
    indexed = _BRANCHES.search(clean)
    if indexed:
      names = [b.strip().lstrip("%") for b in indexed.group(1).split(",")]
    else:  # A predicate's conditional: branch 0 is the false one, as in cond.
      true_name, false_name = _PRED_BRANCHES.search(clean).groups()
      names = [false_name, true_name]
    branches = []
    for name in names:
      counts: dict[str, int] = {}
      for body_line in computation_lines(text, name):
        op = opcode(body_line)
        if op and op not in FREE:
          counts[op] = counts.get(op, 0) + 1
      branches.append(counts)
    out.append((_RESULT_SHAPE.search(clean).group(1), branches))
  return out
