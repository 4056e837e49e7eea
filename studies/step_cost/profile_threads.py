"""On which threads XLA:CPU runs the tiny model's train step, kernel by kernel.

Issue 13's tiny step (:mod:`studies.step_cost.lean_step`: a 10,100-parameter
linear model, batches of 64) under AALIG and under ``table_floor`` with a
late section-end cond, profiled with ``jax.profiler.trace``, which records
an event for each kernel XLA:CPU runs (jax 0.10.2, with or without
``--xla_cpu_enable_xprof_traceme``). Kernel events are those whose name
contains ``fusion``, ``cond``, ``scatter``, ``dot`` or ``custom`` (not
every kernel: copies and the like are left out, so the counts are below
the HLO's). The result, per program: kernel events per step on each
thread, and the fraction of the kernels' time during which two of them run
at once. If that is near zero, the step is a sequence and costs the sum of
its kernels::

  python -m studies.step_cost.profile_threads [--steps 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

import aalig_optax as ao
from studies.step_cost import lean_step

_KERNEL_WORDS = ("fusion", "cond", "scatter", "dot", "custom")


def kernel_events_by_thread(tx, steps: int) -> tuple[dict[str, float], float]:
  """(kernel events per step by thread name, :func:`overlap_fraction`) of
  the whole train step."""
  rng = np.random.default_rng(0)
  params = lean_step.params0()
  x = jnp.asarray(rng.standard_normal((lean_step.B, lean_step.D_IN)),
                  jnp.float32)
  y = jnp.asarray(rng.integers(0, lean_step.D_OUT, lean_step.B), jnp.int32)
  idx = jnp.asarray(rng.choice(1000, lean_step.B, replace=False), jnp.int32)
  step = lean_step.train_step(tx)
  state = tx.init(params)
  for _ in range(20):  # Compiled and warm before the trace.
    params, state, _ = step(params, state, x, y, idx)
  jax.block_until_ready(params)
  with tempfile.TemporaryDirectory() as out:
    with jax.profiler.trace(out):
      for _ in range(steps):
        params, state, _ = step(params, state, x, y, idx)
        jax.block_until_ready(params)
    files = glob.glob(f"{out}/**/*.trace.json.gz", recursive=True)
    if not files:
      raise RuntimeError("jax.profiler.trace wrote no trace.json.gz")
    with gzip.open(files[0]) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names = {e["tid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "thread_name"}
  kernels = [e for e in events
             if e.get("ph") == "X" and not e["name"].startswith("end:")
             and any(w in e["name"] for w in _KERNEL_WORDS)]
  counts = collections.Counter(names.get(e["tid"], str(e["tid"]))
                               for e in kernels)
  return ({thread: n / steps for thread, n in counts.most_common()},
          overlap_fraction([(e["ts"], e["ts"] + e.get("dur", 0))
                            for e in kernels]))


def overlap_fraction(spans) -> float:
  """The fraction of the time some kernel runs during which two or more do.

  >>> overlap_fraction([(0, 2), (1, 3), (5, 6)])  # 1 of 4 time units.
  0.25
  """
  edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
  busy = both = 0.0
  active, last = 0, None
  for t, step in edges:
    if last is not None:
      busy += (t - last) * (active >= 1)
      both += (t - last) * (active >= 2)
    active, last = active + step, t
  return both / busy if busy else 0.0


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  programs = {
      "aalig": ao.aalig(0.1, 1000, 10**6, 10**3),
      "floor_tables_late_cond": lean_step.table_floor(1000, "late"),
  }
  result = {"environment": {"jax": jax.__version__,
                            "backend": jax.default_backend(),
                            "nproc": os.cpu_count(), "steps": args.steps,
                            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S",
                                                      time.gmtime())}}
  for name, tx in programs.items():
    by_thread, overlap = kernel_events_by_thread(tx, args.steps)
    total = sum(by_thread.values())
    busiest = max(by_thread.values(), default=0.0)
    result[name] = {"per_step": total, "on_busiest_thread": busiest,
                    "threads": len(by_thread), "overlap_fraction": overlap}
    print(f"{name:24s} kernel events a step {total:6.2f}, on the busiest "
          f"thread {busiest:6.2f}, threads {len(by_thread)}, time two "
          f"kernels overlap {100 * overlap:.1f}%")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
