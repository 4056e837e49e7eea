"""AALIG's step against optax's on a tiny model: HLO counts and paired timings.

The model of issue 13: a 10,100-parameter linear model (100 -> 100, weights
and bias), batches of 64, softmax cross-entropy. For ``optax.sgd`` (Nesterov
0.9), ``optax.polyak_sgd`` and ``aalig`` (momentum 0.9, tables of N = 10^3
and 10^7 examples, no section end while timing):

- the optimiser part alone (``update`` + ``apply_updates``, donated): its
  compiled HLO's top-level kernels and fusions, copies, and temporary bytes
  (``memory_analysis``), all deterministic;
- the first compilation of the whole train step, each optimiser in turn,
  repeated, as ratios to SGD's (paired by repetition);
- the whole train step and the optimiser part, timed interleaved
  (:mod:`benchmarks.timing`): medians, paired ratios, fastest-decile ratios;
- with ``--floors``, also :func:`table_floor`: what a lean step with
  per-example tables costs without AALIG's guards, a yardstick for the
  targets.

Self-contained, so that it runs unchanged against an older checkout (run
from that checkout's root: ``python /path/to/studies/step_cost/lean_step.py``).
With ``--baseline PATH`` (the root of another checkout) that checkout's
``aalig_optax`` is loaded too, renamed, and timed interleaved with this one
(``base_aalig_*``): a before/after comparison in one process, under the same
machine load::

  python -m studies.step_cost.lean_step [--rounds 40] [--steps 50]
      [--json out.json] [--baseline ../older-checkout]
  python /path/to/studies/step_cost/lean_step.py --overhead-models   # HLO only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import optax

import aalig_optax as ao

B, D_IN, D_OUT = 64, 100, 100


def params0():
  w = jax.random.normal(jax.random.key(0), (D_IN, D_OUT)) * 0.01
  return {"w": w, "b": jnp.zeros(D_OUT)}


def per_example_losses(p, x, y):
  logits = x @ p["w"] + p["b"]
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]


def load_baseline(root):
  """`root`/aalig_optax, imported as the package `aalig_baseline`."""
  import pathlib
  import shutil
  import tempfile
  dst = pathlib.Path(tempfile.mkdtemp()) / "aalig_baseline"
  shutil.copytree(pathlib.Path(root) / "aalig_optax", dst)
  for f in dst.glob("*.py"):
    f.write_text(f.read_text().replace("aalig_optax", "aalig_baseline"))
  sys.path.insert(0, str(dst.parent))
  import importlib
  return importlib.import_module("aalig_baseline")


def table_floor(num_examples, section_cond=None, steps_per_section=10**9):
  """A lean step with per-example tables, as a yardstick; not an optimiser.

  The work we see no way for a Polyak step with per-example tables to
  avoid, written plainly (one implementation, not a proven minimum): gather
  the batch's table entries, their mean gap, ``||g||^2``, the step size
  ``min(max_lr, gap / (||g||^2 + eps))``, a scatter of the batch's losses into
  a table, and a step counter; chained with AALIG's default Nesterov momentum.
  None of AALIG's guards: no skip of a non-finite batch, no overflow case, no
  resolution of repeated indices, no masks, one counter. What AALIG costs
  beyond this is what those guards cost.

  Args:
    num_examples: the tables' size.
    section_cond: None (no section end), ``"early"``: a section-end
      ``lax.cond`` (an O(N) ``jnp.where`` over a table when taken, never while
      timing) whose predicate reads the count and the gap, or ``"late"``: its
      predicate also reads ``||g||^2``, as AALIG's reads the skip decision.
    steps_per_section: the section's length (the default is never reached
      while timing).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (``losses=``, ``indices=``).
  """
  def init(params):
    del params
    return (jnp.zeros(num_examples), jnp.zeros(num_examples),
            jnp.zeros((), jnp.int32))

  def update(g, state, params=None, *, losses, indices, **extra):
    del params, extra
    aov, last, count = state
    gap = jnp.maximum(jnp.mean(losses - aov[indices]), 0.0)
    sq = optax.tree.norm(g, squared=True)
    lr = jnp.minimum(0.1, gap / (sq + 1e-5))
    last = last.at[indices].set(losses)
    count = count + 1
    if section_cond is not None:
      # (Reading the gap orders the cond after the gather: XLA then writes
      # the table in place instead of copying it.)
      due = (count % steps_per_section == 0) & ~jnp.isnan(gap)
      if section_cond == "late":
        due = due & jnp.isfinite(sq)
      aov = jax.lax.cond(due, lambda a, seen: jnp.where(seen < a, seen, a),
                         lambda a, seen: a, aov, last)
    return jax.tree.map(lambda x: -lr * x, g), (aov, last, count)

  return optax.chain(optax.GradientTransformationExtraArgs(init, update),
                     optax.trace(0.9, nesterov=True))


def optimisers(n_small, n_big, baseline=None, floors=False):
  out = {
      "sgd": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
      "polyak_sgd": lambda: optax.polyak_sgd(1.0, eps=1e-8),
      # The Polyak step with AALIG's default momentum (Nesterov, 0.9): the
      # same momentum buffers, so the difference to AALIG is AALIG's own.
      "polyak_nesterov": lambda: optax.chain(
          optax.polyak_sgd(1.0, eps=1e-8), optax.trace(0.9, nesterov=True)),
      f"aalig_N{n_small:.0e}": lambda: ao.aalig(0.1, n_small, 10**6, 10**3),
      f"aalig_N{n_big:.0e}": lambda: ao.aalig(0.1, n_big, 10**6, 10**3),
  }
  if floors:
    out["floor_tables"] = lambda: table_floor(n_small)
    out["floor_tables_cond"] = lambda: table_floor(n_small, "early")
    out["floor_tables_late_cond"] = lambda: table_floor(n_small, "late")
  if baseline is not None:
    out[f"base_aalig_N{n_small:.0e}"] = lambda: baseline.aalig(
        0.1, n_small, 10**6, 10**3)
    out[f"base_aalig_N{n_big:.0e}"] = lambda: baseline.aalig(
        0.1, n_big, 10**6, 10**3)
  return out


def train_step(tx):
  def step(p, s, x, y, idx):
    def mean(p):
      losses = per_example_losses(p, x, y)
      return jnp.mean(losses), losses
    (loss, losses), g = jax.value_and_grad(mean, has_aux=True)(p)
    u, s = tx.update(g, s, p, value=loss, losses=losses, indices=idx)
    return optax.apply_updates(p, u), s, loss
  return jax.jit(step, donate_argnums=(0, 1))


def opt_part(tx):
  def part(p, s, g, loss, losses, idx):
    u, s = tx.update(g, s, p, value=loss, losses=losses, indices=idx)
    return optax.apply_updates(p, u), s
  return jax.jit(part, donate_argnums=(0, 1))


def hlo_counts(compiled):
  """Top-level (ENTRY) kernels by opcode, copies, temporary bytes."""
  from studies.hlo import entry_kernels
  counts = entry_kernels(compiled.as_text())
  return dict(kernels=sum(counts.values()), fusions=counts.get("fusion", 0),
              copies=counts.get("copy", 0), ops=counts,
              temp_bytes=compiled.memory_analysis().temp_size_in_bytes)


class Runner:
  def __init__(self, fn, carry, batches):
    self.fn, self.carry, self.batches, self.k = fn, carry, batches, 0

  def __call__(self, steps):
    out = None
    for _ in range(steps):
      out = self.fn(*self.carry, *self.batches[self.k % len(self.batches)])
      self.k += 1
      self.carry = tuple(out[:len(self.carry)])
    jax.block_until_ready(out)


def interleave(fns, rounds, steps):
  names, times = list(fns), {n: [] for n in fns}
  for r in range(rounds):
    for n in names[r % len(names):] + names[:r % len(names)]:
      t0 = time.perf_counter()
      fns[n](steps)
      times[n].append((time.perf_counter() - t0) / steps)
  return times


def ratios(times, ref):
  out = {}
  for k, v in times.items():
    out[k] = dict(
        median_us=1e6 * statistics.median(v),
        paired=statistics.median([a / b for a, b in zip(v, times[ref])]),
        p10=float(np.quantile(v, 0.1) / np.quantile(times[ref], 0.1)))
  return out


def overhead_models_hlo():
  """The optimiser part's HLO counts on the overhead benchmark's models.

  Linear (3072 -> 10), ResNet8 and the 512x512 MLP, built from
  ``examples.common`` (present in older checkouts too); SGD, SPS
  (``optax.polyak_sgd``) and AALIG as the overhead benchmark builds them
  (N = 50,000, batch 128).
  """
  from flax import nnx
  from examples.common import models as models_lib
  from examples.common import optimizers
  out = {}
  for name in ("linear", "resnet", "mlp"):
    rngs = nnx.Rngs(0)
    model = {"linear": lambda: models_lib.MLP(3072, (), 10, rngs=rngs),
             "resnet": lambda: models_lib.ResNet8(10, 3, 16, rngs=rngs),
             "mlp": lambda: models_lib.MLP(3072, (512, 512), 10, rngs=rngs),
             }[name]()
    _, params, _ = nnx.split(model, nnx.Param, ...)
    grads = jax.tree.map(lambda a: jnp.full_like(a, 1e-3), params)
    ctx = optimizers.RunContext.create(50_000, 128, 200, drop_remainder=True)
    for opt in ("sgd", "sps", "aalig"):
      tx = optimizers.build(opt, 0.1, 0.0, ctx)
      compiled = opt_part(tx).lower(
          params, tx.init(params), grads, jnp.float32(1.0), jnp.ones(128),
          jnp.arange(128, dtype=jnp.int32)).compile()
      h = hlo_counts(compiled)
      out[f"{name}/{opt}"] = h
      print(f"{name:7s} {opt:6s} kernels {h['kernels']:4d} fusions "
            f"{h['fusions']:4d} copies {h['copies']} temp "
            f"{h['temp_bytes']:,} B", flush=True)
  return out


def main(argv=None):
  global B
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rounds", type=int, default=40)
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--compile-reps", type=int, default=5)
  ap.add_argument("--n-big", type=int, default=10**7)
  ap.add_argument("--batch", type=int, default=B,
                  help="rows a batch (the issue's tiny model: 64)")
  ap.add_argument("--indices", choices=("epoch", "random"), default="epoch",
                  help="a batch's indices: distinct, as in an epoch of "
                  "shuffled data (default), or drawn with replacement")
  ap.add_argument("--floors", action="store_true",
                  help="also time `table_floor` (a lean step with "
                  "per-example tables and none of AALIG's guards), "
                  "without a section-end cond and with one")
  ap.add_argument("--json", default=None)
  ap.add_argument("--baseline", default=None,
                  help="root of another checkout to compare with")
  ap.add_argument("--overhead-models", action="store_true",
                  help="only the optimiser part's HLO counts on the overhead "
                  "benchmark's models (linear, ResNet8, MLP)")
  args = ap.parse_args(argv)
  if args.batch < 1:
    ap.error(f"--batch must be positive, got {args.batch}")
  B = args.batch
  if args.overhead_models:
    res = overhead_models_hlo()
    if args.json:
      with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    return res
  n_small = 10**3
  txs = optimisers(n_small, args.n_big,
                   load_baseline(args.baseline) if args.baseline else None,
                   floors=args.floors)
  rng = np.random.default_rng(0)
  p = params0()
  xs = jnp.asarray(rng.standard_normal((16, B, D_IN)), jnp.float32)
  ys = jnp.asarray(rng.integers(0, D_OUT, (16, B)), jnp.int32)
  table_n = {k: (args.n_big if k.endswith(f"N{args.n_big:.0e}") else n_small)
             for k in txs}
  if args.indices == "epoch":
    # As an epoch of shuffled data gives them: no index twice in a batch.
    draw = lambda n: np.stack([rng.choice(n, B, replace=False)
                               for _ in range(16)])
  else:
    # With replacement: repeated indices with different losses, which the
    # record resolves in its rarely taken branch (taken at most steps here).
    draw = lambda n: rng.integers(0, n, (16, B))
  idx = {k: jnp.asarray(draw(table_n[k]), jnp.int32) for k in txs}
  res = {"hlo_opt_part": {}, "hlo_step": {}, "compile_ratio_to_sgd": {}}

  # 1. HLO of the optimiser part and of the whole step (deterministic).
  g0 = jax.tree.map(lambda a: jnp.full_like(a, 1e-3), p)
  for k, make in txs.items():
    tx = make()
    part = opt_part(tx).lower(p, tx.init(p), g0, jnp.float32(1.0),
                              jnp.ones(B), idx[k][0]).compile()
    res["hlo_opt_part"][k] = hlo_counts(part)
    step = train_step(tx).lower(p, tx.init(p), xs[0], ys[0],
                                idx[k][0]).compile()
    res["hlo_step"][k] = hlo_counts(step)
    print(f"{k:14s} opt part: {res['hlo_opt_part'][k]}", flush=True)
    print(f"{'':14s} step:     kernels {res['hlo_step'][k]['kernels']}, "
          f"fusions {res['hlo_step'][k]['fusions']}, temp "
          f"{res['hlo_step'][k]['temp_bytes']:,} B", flush=True)

  # 2. First compilation of the whole step, in turn, repeated.
  comp = {k: [] for k in txs}
  for r in range(args.compile_reps):
    for k, make in txs.items():
      jax.clear_caches()
      tx = make()
      s = jax.eval_shape(tx.init, p)
      t0 = time.perf_counter()
      train_step(tx).lower(p, s, xs[0], ys[0], idx[k][0]).compile()
      comp[k].append(time.perf_counter() - t0)
  for k in txs:
    res["compile_ratio_to_sgd"][k] = dict(
        median_s=statistics.median(comp[k]),
        paired=statistics.median([a / b for a, b in zip(comp[k],
                                                        comp["sgd"])]))
    print(f"{k:14s} compile {res['compile_ratio_to_sgd'][k]}", flush=True)

  # 3. Timings, interleaved.
  steps, parts = {}, {}
  for k, make in txs.items():
    tx = make()
    pp = jax.tree.map(jnp.array, p)
    steps[k] = Runner(train_step(tx), (pp, tx.init(pp)),
                      [(xs[i], ys[i], idx[k][i]) for i in range(16)])
    pq = jax.tree.map(jnp.array, p)
    parts[k] = Runner(opt_part(tx), (pq, tx.init(pq)),
                      [(g0, jnp.float32(1.0), jnp.ones(B), idx[k][i])
                       for i in range(16)])
  for f in list(steps.values()) + list(parts.values()):
    f(5)
  t_step = interleave(steps, args.rounds, args.steps)
  t_part = interleave(parts, args.rounds, args.steps)
  big = f"aalig_N{args.n_big:.0e}"
  small = f"aalig_N{n_small:.0e}"
  for name, t in (("step", t_step), ("opt_part", t_part)):
    res[name] = {"vs_sgd": ratios(t, "sgd"),
                 "vs_polyak_sgd": ratios(t, "polyak_sgd"),
                 "vs_polyak_nesterov": ratios(t, "polyak_nesterov"),
                 "vs_aalig_small_n": ratios(t, small)}
    for k in txs:
      vs_sgd = res[name]["vs_sgd"][k]
      print(f"{name:8s} {k:15s} median {vs_sgd['median_us']:8.1f}"
            f" us | /sgd paired {res[name]['vs_sgd'][k]['paired']:.3f} p10 "
            f"{res[name]['vs_sgd'][k]['p10']:.3f} | /polyak paired "
            f"{res[name]['vs_polyak_sgd'][k]['paired']:.3f} p10 "
            f"{res[name]['vs_polyak_sgd'][k]['p10']:.3f} | /polyak+mom "
            f"paired {res[name]['vs_polyak_nesterov'][k]['paired']:.3f}"
            f" | /{small} paired "
            f"{res[name]['vs_aalig_small_n'][k]['paired']:.3f} p10 "
            f"{res[name]['vs_aalig_small_n'][k]['p10']:.3f}", flush=True)
  res["big_over_small"] = {
      "step_paired": res["step"]["vs_aalig_small_n"][big]["paired"],
      "opt_part_paired": res["opt_part"]["vs_aalig_small_n"][big]["paired"]}
  if args.baseline:
    bsmall, bbig = "base_" + small, "base_" + big
    for name, t in (("step", t_step), ("opt_part", t_part)):
      res[name]["vs_base_aalig_small_n"] = ratios(t, bsmall)
      print(f"{name:8s} N=1e3 new/base paired "
            f"{res[name]['vs_base_aalig_small_n'][small]['paired']:.3f}; "
            f"base N=big/N=1e3 paired "
            f"{res[name]['vs_base_aalig_small_n'][bbig]['paired']:.3f}",
            flush=True)
  res["environment"] = dict(
      batch=B, indices=args.indices, jax=jax.__version__,
      optax=optax.__version__,
      backend=jax.default_backend(), nproc=os.cpu_count(),
      load_avg=os.getloadavg(), date_utc=time.strftime("%Y-%m-%d %H:%M:%S",
                                                       time.gmtime()))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == "__main__":
  main()
