"""How the benchmarks time a step: one module for overhead.py and scaling.py.

A timed program holds its own donated state (:class:`Runner`); programs are
timed interleaved (A B C ... A B C ..., the order rotated every round), each
turn a few steps closed by ``block_until_ready``, so that every program sees
the same machine load (:func:`interleave`). :func:`opt_part` is the
optimiser part of a step alone (``tx.update`` + ``apply_updates``).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import jax
import optax

__all__ = ["Runner", "interleave", "medians", "opt_part"]


class Runner:
  """Runs ``fn(*carry, *batch)`` on a donated carry, batches in turn.

  `fn` returns the new carry first (as many values as `carry` has), then any
  further outputs (e.g. the loss); a call of ``steps`` steps ends with
  ``block_until_ready`` on the last outputs.
  """

  def __init__(self, fn: Callable, carry: Sequence, batches: Sequence):
    self.fn, self.carry = fn, tuple(carry)
    self.batches, self.k = batches, 0

  def __call__(self, steps: int) -> None:
    out = self.carry
    for _ in range(steps):
      batch = self.batches[self.k % len(self.batches)]
      self.k += 1
      out = self.fn(*self.carry, *batch)
      self.carry = tuple(out[:len(self.carry)])
    jax.block_until_ready(out)


def interleave(fns: dict, rounds: int, steps: int) -> dict[str, list[float]]:
  """Seconds per step of each fn, per round; turns interleaved and rotated."""
  names = list(fns)
  times = {n: [] for n in names}
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for n in order:
      t0 = time.perf_counter()
      fns[n](steps)
      times[n].append((time.perf_counter() - t0) / steps)
  return times


def medians(times: dict, steps: int) -> dict[str, dict]:
  """Median and minimum seconds per step of :func:`interleave`'s times."""
  return {k: dict(median_s=statistics.median(v), min_s=min(v),
                  rounds=len(v), steps_per_round=steps)
          for k, v in times.items()}


def opt_part(tx: optax.GradientTransformation):
  """The optimiser part alone: update + apply_updates, params/state donated.

  Called as ``part(params, opt_state, grads, loss, losses, idx)``.
  """

  def part(params, opt_state, grads, loss, losses, idx):
    updates, opt_state = tx.update(grads, opt_state, params, value=loss,
                                   losses=losses, indices=idx)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(part, donate_argnums=(0, 1))
