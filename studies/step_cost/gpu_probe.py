"""Where AALIG's extra step time goes on an accelerator: three hypotheses.

Issue 13's GPU run (``benchmarks/results/gpu/``) measured AALIG's train step
at 1.09-1.10x SGD's on the paper's ResNet-8 and 1.76x on a linear model,
where the target is 1.02. On a GPU, XLA runs a ``conditional`` by copying
its predicate to the host and waiting for it, so a step with a cond cannot
be queued ahead of the device. This script times, interleaved on the
overhead benchmark's models (batch 128, N = 50,000):

- ``sgd``, ``sps`` (``optax.polyak_sgd``), ``alig``, ``aalig`` as built for
  the benchmarks;
- ``aalig_noswitch``: AALIG traced with ``lax.switch`` computed as a select
  of both branches (the overflow-safe coefficient computed every step);
- ``aalig_nocond``: AALIG traced with ``lax.cond`` and ``lax.switch`` both as
  selects (the section end, O(N), computed every step and discarded: a
  diagnostic, not a valid step for large N).

With ``--child-flags FLAGS`` it runs itself again in a subprocess with
``XLA_FLAGS=FLAGS`` (e.g. command buffers that hold conditionals), and
reports those timings too. Results go to ``--json``::

  python -m studies.step_cost.gpu_probe --json gpu_probe.json \
      --child-flags=--xla_gpu_enable_command_buffer=+CONDITIONAL
  python -m studies.step_cost.gpu_probe --models resnet \
      --variants sgd,alig,aalig --rounds 5 --hlo-dir hlo  # compiled steps
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _sources
from benchmarks import overhead
from benchmarks import timing
from examples.common import optimizers

VARIANTS = ("sgd", "sps", "alig", "aalig", "aalig_noswitch", "aalig_nocond")


def _select_cond(pred, true_fun, false_fun, *operands, **_):
  t, f = true_fun(*operands), false_fun(*operands)
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), t, f)


def _select_switch(index, branches, *operands, **_):
  outs = [b(*operands) for b in branches]
  index = jnp.clip(index, 0, len(outs) - 1)
  return jax.tree.map(
      lambda *xs: jnp.select([index == i for i in range(len(xs))], xs),
      *outs)


@contextlib.contextmanager
def _patched(cond=False, switch=False):
  saved = jax.lax.cond, jax.lax.switch
  if cond:
    jax.lax.cond = _select_cond
  if switch:
    jax.lax.switch = _select_switch
  try:
    yield
  finally:
    jax.lax.cond, jax.lax.switch = saved


def bench(model_name, variants, rounds, steps, log=print, hlo_dir=None):
  batch, n = 128, 50_000
  model = _sources.make_model(model_name, num_classes=10,
                              in_shape=(32, 32, 3), seed=0)
  graphdef, params0, rest0 = overhead._split(model)  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  idx_all = jnp.asarray(rng.integers(0, n, (16, batch)), jnp.int32)
  ctx = optimizers.RunContext.create(n, batch, 200, drop_remainder=True)
  fns, kernels = {}, {}
  for v in variants:
    name = v.split("_")[0]
    tx = optimizers.build(name, overhead.OVERHEAD_OPTS[name], 0.0, ctx)
    copy = lambda t: jax.tree.map(jnp.array, t)
    p, r = copy(params0), copy(rest0)
    s = copy(tx.init(p))
    with _patched(cond=v.endswith("nocond"),
                  switch=v.endswith(("nocond", "noswitch"))):
      compiled = overhead.make_train_step(graphdef, tx).lower(
          p, r, s, x, y, idx_all[0]).compile()
    summ = overhead.hlo_summary(compiled)
    if hlo_dir:
      os.makedirs(hlo_dir, exist_ok=True)
      with open(os.path.join(hlo_dir, f"{model_name}_{v}_step.txt"), "w",
                encoding="utf-8") as f:
        f.write(compiled.as_text())
    kernels[v] = {k: summ[k] for k in ("num_kernels", "num_fusions")}
    kernels[v]["conditionals"] = summ["entry_ops"].get("conditional", 0)
    fns[v] = timing.Runner(compiled, (p, r, s), [(x, y, i) for i in idx_all])
  log(f"  [{model_name}] compiled {len(variants)} variants; timing {rounds} "
      f"rounds of {steps} steps each")
  for f in fns.values():
    f(3)
  t = timing.interleave(fns, rounds, steps)
  res = {}
  for v in variants:
    # pylint: disable-next=protected-access
    res[v] = dict(overhead._summ(t[v], t["sgd"]), **kernels[v])
    log(f"  [{model_name}] {v:15s} {1e3 * res[v]['median_s']:7.3f} ms  "
        f"/sgd paired {res[v]['paired_ratio_median']:.3f} "
        f"p10 {res[v]['p10_ratio']:.3f}  kernels {kernels[v]}")
  return res


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--json", default=None)
  ap.add_argument("--models", default="linear,resnet")
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--rounds", type=int, default=40)
  ap.add_argument("--child-flags", default="")
  ap.add_argument("--hlo-dir", default=None,
                  help="write each variant's compiled train step here "
                  "(<model>_<variant>_step.txt), e.g. to compare the GPU "
                  "kernels of AALIG's step with SGD's")
  args = ap.parse_args(argv)
  out = {"xla_flags": os.environ.get("XLA_FLAGS", ""),
         "backend": jax.default_backend(),
         "devices": [str(d) for d in jax.devices()],
         "versions": {"jax": jax.__version__}, "models": {}}
  print(f"XLA_FLAGS={out['xla_flags']!r} on {out['devices']}", flush=True)
  steps = {"linear": 50, "resnet": 10, "mlp": 20}
  for m in args.models.split(","):
    out["models"][m] = bench(m, args.variants.split(","), args.rounds,
                             steps[m], log=lambda s: print(s, flush=True),
                             hlo_dir=args.hlo_dir)
  if args.child_flags:
    env = dict(os.environ, XLA_FLAGS=args.child_flags)
    child = subprocess.run(
        [sys.executable, "-m", "studies.step_cost.gpu_probe", "--json",
         "/tmp/gpu_probe_child.json", "--models", args.models,
         "--variants", "sgd,alig,aalig", "--rounds", str(args.rounds)],
        env=env, check=False)
    out["child_returncode"] = child.returncode
    if child.returncode == 0:
      with open("/tmp/gpu_probe_child.json", encoding="utf-8") as f:
        out["with_flags"] = json.load(f)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
