"""Scaling: AALIG's cost against the number of examples N, and on a mesh.

What it measures (CPU by default; the same script runs on GPU/TPU):

1. Step time against N (10^3 ... 10^7, all in one run): one jitted train step
   of an MLP (forward, per-example losses, gradient of their mean,
   ``aalig.update``, ``apply_updates``) with params and optimiser state
   donated, for each N. The Ns run interleaved (A B C ... A B C ..., the order
   rotated every round), each turn a few steps closed by
   ``block_until_ready``; we report the median time per step and its ratio
   to N = 10^3. A step touches only the batch's rows, so the ratio should
   stay near 1 (target: step(10^7) / step(10^3) <= 1.05). The optimiser part
   alone (``update`` + ``apply_updates``) is timed the same way, since a
   small per-step constant is easier to see there. N = 3*10^7 is timed too,
   and all of it is timed again in a child process started with glibc
   settings that keep freed memory mapped (``MALLOC_ENV``), which isolates
   an XLA:CPU allocator effect from AALIG's own cost (explained in the
   results).
2. Section-end update time against N: the same optimiser part with a section
   end at every step, minus the part without one (the section end is the
   only O(N) work).
3. Bytes of optimiser state per example: the [N] tables' bytes / N (target:
   12 with the default estimate and float32 tables, 6 with bfloat16).
4. Per-device table memory with the tables split over 8 (simulated) devices
   (``state_shardings(..., table_axis="data")``), against replicated tables,
   and the step time of both layouts on that mesh.

Run from the repository root (the flag gives the 8 simulated devices, and is
set by the script when absent)::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m benchmarks.scaling

Writes benchmarks/results/scaling.json and benchmarks/results/scaling.md.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import aalig_optax as ao
from benchmarks import report_scaling
from benchmarks import timing
from examples.common import optimizers
from examples.common import problems
from examples.common import report

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def log(*args):
  print(f"[scaling {time.strftime('%H:%M:%S')}]", *args, flush=True)


# ----------------------------------------------------------------- the model
def init_mlp(key, sizes):
  params = []
  for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1),
                       zip(sizes[:-1], sizes[1:])):
    params.append({"w": jax.random.normal(k, (m, n)) / np.sqrt(m),
                   "b": jnp.zeros(n)})
  return params


def mlp_losses(params, x, y):
  h = x
  for layer in params[:-1]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  return problems.cross_entropy(h @ params[-1]["w"] + params[-1]["b"], y)


def make_train_step(tx, out_shardings=None):
  def step(params, state, x, y, idx):
    def mean_loss(p):
      losses = mlp_losses(p, x, y)
      return jnp.mean(losses), losses
    (_, losses), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, losses=losses,
                               indices=idx)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)


# ------------------------------------------------------------------ timing
def _timed(runners, rounds, steps):
  """Median seconds per step of each runner (see benchmarks.timing)."""
  return timing.medians(timing.interleave(runners, rounds, steps), steps)


def tree_bytes(tree):
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize
             for a in jax.tree.leaves(tree))


def table_bytes(state):
  """Bytes of AALIG's [N] tables in `state` (arrays or shape structs)."""
  core = optimizers.aalig_state(state)
  return sum(int(np.prod(getattr(core, t).shape)) *
             getattr(core, t).dtype.itemsize
             for t in ("aov", "aov_step", "last_loss", "loss_section",
                       "best_loss")
             if getattr(core, t) is not None)


# ---------------------------------------------------------------- sections
def bench_steps(args, sizes, data):
  """1 and 2: train step, optimiser part, and section end, against N."""
  x_all, y_all = data
  key = jax.random.key(0)
  params0 = jax.device_get(init_mlp(key, args.mlp))  # host: fresh copies
  device = jax.devices()[0]
  rng = np.random.default_rng(0)
  steps_per_epoch, epochs = 10**6, 10**3  # no section end while timing

  def batches_for(n, k=16):
    out = []
    for _ in range(k):
      idx = rng.integers(0, n, size=args.batch).astype(np.int32)
      rows = rng.integers(0, x_all.shape[0], size=args.batch)
      out.append(jax.device_put((x_all[rows], y_all[rows], idx), device))
    return out

  # Gradients and losses for the optimiser-part runs.
  grads0 = jax.tree.map(lambda a: np.full_like(a, 1e-3), params0)

  train, part, section = {}, {}, {}
  for n in sizes:
    log(f"compiling N={n:.0e}")
    b = batches_for(n)
    tx = ao.aalig(0.1, n, steps_per_epoch, epochs)
    fresh = lambda tx=tx: (jax.device_put(params0, device),
                           jax.device_put(tx.init(params0), device))
    step = make_train_step(tx)
    train[n] = timing.Runner(step, fresh(), b)
    train[n](1)
    opt_batches = [(jax.device_put(grads0, device), jnp.float32(1.0),
                    jnp.abs(x[:, 0]), idx) for x, _, idx in b]
    part[n] = timing.Runner(timing.opt_part(tx), fresh(), opt_batches)
    part[n](1)
    tx_sec = ao.aalig(0.1, n, 1, 1)  # a section end at every step
    section[n] = timing.Runner(timing.opt_part(tx_sec),
                               (jax.device_put(params0, device),
                                jax.device_put(tx_sec.init(params0), device)),
                               opt_batches)
    section[n](1)

  log(f"timing the train step, {args.rounds} interleaved rounds")
  t_train = _timed(train, args.rounds, args.steps)
  log("timing the optimiser part")
  t_part = _timed(part, args.rounds, args.steps)
  log("timing the optimiser part with a section end at every step")
  big = [n for n in sizes if n >= 10**7]
  t_sec = _timed(section, max(3, args.rounds // 3),
                 max(1, args.steps // (10 if big else 1)))
  base = sizes[0]
  rows = []
  for n in sizes:
    rows.append(dict(
        num_examples=n,
        train_step_s=t_train[n]["median_s"],
        train_step_ratio=t_train[n]["median_s"] / t_train[base]["median_s"],
        opt_part_s=t_part[n]["median_s"],
        opt_part_ratio=t_part[n]["median_s"] / t_part[base]["median_s"],
        section_end_s=max(t_sec[n]["median_s"] - t_part[n]["median_s"], 0.0),
        section_end_ns_per_example=max(
            t_sec[n]["median_s"] - t_part[n]["median_s"], 0.0) / n * 1e9,
    ))
    log(f"N={n:.0e}: step {rows[-1]['train_step_s'] * 1e3:.3f} ms "
        f"(x{rows[-1]['train_step_ratio']:.3f}), optimiser part "
        f"{rows[-1]['opt_part_s'] * 1e6:.1f} us "
        f"(x{rows[-1]['opt_part_ratio']:.3f}), section end "
        f"{rows[-1]['section_end_s'] * 1e3:.3f} ms")
  for runners in (train, part, section):
    runners.clear()
  return rows, dict(train=t_train, part=t_part, section=t_sec)


def bench_bytes(args):
  """3: bytes of optimiser state per example."""
  n = 10**6
  params = init_mlp(jax.random.key(0), args.mlp)
  out = []
  for est in ("last", "best_epoch"):
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
      tx = ao.aalig(0.1, n, 10, 1, loss_estimate=est, table_dtype=dtype)
      state = jax.eval_shape(tx.init, params)
      tables = table_bytes(state)
      out.append(dict(loss_estimate=est, table_dtype=jnp.dtype(dtype).name,
                      table_bytes_per_example=tables / n,
                      other_state_bytes=tree_bytes(state) - tables))
      log(f"{est}/{jnp.dtype(dtype).name}: {tables / n:g} bytes per example")
  return out


def bench_mesh(args, data):
  """4: per-device table bytes, and step time, on an 8-device mesh."""
  n_dev = 8
  if jax.device_count() < n_dev:
    log("fewer than 8 devices: mesh section skipped")
    return None
  mesh = jax.make_mesh((n_dev,), ("data",), devices=jax.devices()[:n_dev])
  x_all, y_all = data
  params0 = jax.device_get(init_mlp(jax.random.key(0), args.mlp))
  rep = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P("data"))
  rng = np.random.default_rng(1)
  n = args.mesh_examples
  result = dict(num_devices=n_dev, num_examples=n, layouts={})
  runners = {}
  for layout, axis in (("replicated", None), ("sharded", "data")):
    tx = ao.aalig(0.1, n, 10**6, 10**3)
    params = jax.device_put(params0, rep)
    shardings = ao.state_shardings(jax.eval_shape(tx.init, params), mesh,
                                   table_axis=axis)
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    per_device = {}
    for shard in state[0].aov.addressable_shards:
      per_device.setdefault(str(shard.device), 0)
    for t in ("aov", "aov_step", "last_loss", "loss_section"):
      for shard in getattr(state[0], t).addressable_shards:
        per_device[str(shard.device)] += shard.data.nbytes
    sizes = sorted(set(per_device.values()))
    result["layouts"][layout] = dict(
        table_axis=axis, total_table_bytes=table_bytes(state),
        per_device_table_bytes=sizes[0] if len(sizes) == 1 else sizes,
        per_device_table_bytes_per_example=(
            sizes[0] / n if len(sizes) == 1 else None),
        rows_per_device=state[0].aov.addressable_shards[0].data.shape[0])
    log(f"{layout}: {sizes} table bytes per device "
        f"({result['layouts'][layout]['rows_per_device']} rows)")
    b = []
    for _ in range(8):
      idx = rng.integers(0, n, size=args.batch).astype(np.int32)
      rows = rng.integers(0, x_all.shape[0], size=args.batch)
      b.append(jax.device_put((x_all[rows], y_all[rows], idx), batch))
    step = make_train_step(tx, out_shardings=(rep, shardings))
    runners[layout] = timing.Runner(step, (params, state), b)
    runners[layout](1)
  log("timing the train step on the mesh, both layouts")
  t = _timed(runners, max(3, args.rounds // 2), args.steps)
  for layout in runners:
    result["layouts"][layout]["train_step_s"] = t[layout]["median_s"]
  return result


# glibc malloc settings under which a freed block is neither unmapped nor
# trimmed: XLA:CPU allocates a program's temporary buffer at every call, and
# the section end's O(N) temporaries make it > 32 MB for N >~ 6.4M, past
# glibc's largest dynamic mmap threshold; each step then page-faults the
# freshly mapped pages it touches (its own params-sized temporaries).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**31),
              "MALLOC_TRIM_THRESHOLD_": str(2**32),
              "MALLOC_ARENA_MAX": "1"}


def steps_under_malloc_env(argv):
  """Section 1 again, in a child process started with MALLOC_ENV."""
  import subprocess
  import tempfile
  out = pathlib.Path(tempfile.mkdtemp()) / "steps.json"
  cmd = [sys.executable, "-m", "benchmarks.scaling",
         "--steps-only-json", str(out)] + list(argv or sys.argv[1:])
  log("the same step timings in a child process with", MALLOC_ENV)
  subprocess.run(cmd, env=dict(os.environ, **MALLOC_ENV), check=True,
                 cwd=pathlib.Path(__file__).resolve().parents[1])
  return json.loads(out.read_text())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--max-exp", type=int, default=7,
                      help="largest N is 10**max_exp (from 10**3)")
  parser.add_argument("--extra-sizes", type=int, nargs="*",
                      default=[3 * 10**7],
                      help="further N timed after 10**max_exp (beyond the "
                      "XLA:CPU temp-buffer threshold; see the results)")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--mlp", type=int, nargs="+", default=[256, 256, 10])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--mesh-examples", type=int, default=8 * 10**6)
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  parser.add_argument("--no-malloc-run", action="store_true",
                      help="skip the step timings under MALLOC_ENV")
  parser.add_argument("--steps-only-json", type=pathlib.Path, default=None,
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  t0 = time.time()
  sizes = [10**e for e in range(3, args.max_exp + 1)] + args.extra_sizes
  rng = np.random.default_rng(0)
  data = (rng.normal(size=(4096, args.mlp[0])).astype(np.float32),
          rng.integers(0, args.mlp[-1], size=4096).astype(np.int32))
  log(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; "
      f"N = {sizes}")
  steps, raw = bench_steps(args, sizes, data)
  if args.steps_only_json:  # the child run under MALLOC_ENV
    report.write_files(args.steps_only_json.parent,
                       {args.steps_only_json.name: steps}, indent=None)
    return steps
  malloc_steps = None if args.no_malloc_run else steps_under_malloc_env(argv)
  nbytes = bench_bytes(args)
  mesh = bench_mesh(args, data)
  last = [r for r in steps if r["num_examples"] == 10**args.max_exp][0]
  cmd = " ".join(["XLA_FLAGS=--xla_force_host_platform_device_count=8",
                  "python -m benchmarks.scaling"] + (argv or sys.argv[1:]))
  res = dict(
      command=cmd,
      environment=report.environment(),
      config=dict(batch=args.batch, mlp=args.mlp, rounds=args.rounds,
                  max_exp=args.max_exp,
                  steps=args.steps, sizes=sizes),
      steps=steps, malloc_env=MALLOC_ENV, steps_malloc_env=malloc_steps,
      raw_step_timings={k: {str(n): v for n, v in d.items()}
                                     for k, d in raw.items()},
      bytes=nbytes, mesh=mesh,
      summary=dict(
          train_step_ratio_max_n=last["train_step_ratio"],
          train_step_target_met=last["train_step_ratio"] <= 1.05,
          train_step_target_met_malloc_env=(
              malloc_steps[len(sizes) - 1 - len(args.extra_sizes)]
              ["train_step_ratio"] <= 1.05 if malloc_steps else None),
          opt_part_ratio_max_n=last["opt_part_ratio"],
          train_step_ratio_max_n_malloc_env=(
              malloc_steps[len(sizes) - 1 - len(args.extra_sizes)]
              ["train_step_ratio"] if malloc_steps else None),
          opt_part_ratio_max_n_malloc_env=(
              malloc_steps[len(sizes) - 1 - len(args.extra_sizes)]
              ["opt_part_ratio"] if malloc_steps else None),
          table_bytes_per_example_default=nbytes[0]["table_bytes_per_example"],
          table_bytes_per_example_bf16=nbytes[1]["table_bytes_per_example"],
          seconds=time.time() - t0),
  )
  args.out.mkdir(parents=True, exist_ok=True)
  report.write_files(args.out, {
      "scaling.json": res, "scaling.md": report_scaling.to_markdown(res)})
  log(f"done in {time.time() - t0:.0f} s: step ratio "
      f"{last['train_step_ratio']:.3f}, wrote {args.out}/scaling.{{json,md}}")
  return res


if __name__ == "__main__":
  main()
