"""Step overhead: the same jitted, donated Flax train step under each optimiser.

For each model (a linear model, the smallest step and so the largest
relative overhead; the paper's small ResNet on 32x32x3 batches of 128; and an
MLP on the same batches) and each optimiser, one train step is compiled once:
forward, per-example losses, gradient of their mean, ``tx.update`` (given
``value=``, ``losses=`` and ``indices=``), ``optax.apply_updates``; params,
BatchNorm statistics and optimiser state are donated. The optimisers then run
interleaved (A B C ... A B C ..., the order rotated every round), each turn a
few steps closed by ``block_until_ready``; we report the median seconds per
step and its ratio to ``optax.sgd(momentum=0.9, nesterov=True)``.

Where the time goes: the optimiser part alone (``tx.update`` plus
``apply_updates`` on the model's parameter shapes, jitted and donated) is
timed the same way, and its compiled HLO is summarised (top-level kernels by
opcode, XLA's flop and byte estimates, the temporary buffer it allocates at
every call). For AALIG it is also timed with a table of 1.2M examples
(ImageNet-sized) to check that a step's cost does not grow with N (only the
section end is O(N)), and on the models of ``sweep_models`` the whole train
step runs with tables of each size in ``table_sizes``, interleaved, its time
reported against the smallest table's (:func:`table_sweep`).
"""

from __future__ import annotations

import re
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import _sources
from benchmarks import timing
from examples.common import optimizers
from examples.common import problems
from studies import hlo

# Optimisers of the step-overhead benchmark, with the hyperparameters used
# (the values do not change the cost).
OVERHEAD_OPTS = {
    "sgd": 0.1,
    "aalig": 0.1,
    "aalig_chain": 0.1,
    "alig": 0.1,
    "sps": 1.0,
    "adam": 1e-3,
    "prodigy": 1.0,
    "dog": 1.0,
    "dadapt": 1.0,
}


def _split(model):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest


def make_train_step(graphdef, tx):
  """One jitted, donated train step (params, rest, opt_state donated)."""

  def loss_fn(params, rest, x, y):
    model = nnx.merge(graphdef, params, rest, copy=True)
    losses = problems.cross_entropy(model(x, train=True), y)
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return jnp.mean(losses), (losses, new_rest)

  def step(params, rest, opt_state, x, y, idx):
    (loss, (losses, rest)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params, rest, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss,
                                   losses=losses, indices=idx)
    params = optax.apply_updates(params, updates)
    return params, rest, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1, 2))


_COPY_RE = re.compile(
    r"=\s*(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\][^ ]*\s+"
    r"copy\((?P<arg>[^)]*)\)")
_DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "f64": 8,
                "s64": 8, "pred": 1, "s8": 1, "u8": 1}


def _copy_info(line: str) -> dict[str, Any]:
  """The shape, size and operand of a top-level HLO copy instruction."""
  m = _COPY_RE.search(line)
  if not m:
    return {"shape": "?", "bytes": 0, "operand": line.strip()[:120]}
  dims = [int(d) for d in m.group("dims").split(",") if d]
  n = int(np.prod(dims)) if dims else 1
  return {"shape": f"{m.group('dtype')}{dims}",
          "bytes": n * _DTYPE_BYTES.get(m.group("dtype"), 4),
          "operand": m.group("arg").strip().lstrip("%")}


def hlo_summary(compiled) -> dict[str, Any]:
  """Top-level (ENTRY) instructions by opcode, and XLA's cost estimates."""
  text = compiled.as_text()
  copies = [_copy_info(line) for line in hlo.entry_lines(text)
            if hlo.opcode(line) == "copy"]
  kernels = dict(sorted(hlo.entry_kernels(text).items()))
  out = {"entry_ops": kernels, "num_kernels": int(sum(kernels.values())),
         "num_fusions": int(kernels.get("fusion", 0)),
         "copies": copies,
         "copy_bytes": int(sum(c["bytes"] for c in copies))}
  try:
    # Allocated at every call (on XLA:CPU, the untaken branches' scratch
    # included): what a step costs beyond its inputs and outputs.
    out["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    out["flops"] = float(cost.get("flops", float("nan")))
    out["bytes_accessed"] = float(cost.get("bytes accessed", float("nan")))
  except Exception:  # pylint: disable=broad-except
    pass
  return out


def _summ(ts: list[float], ref: list[float]) -> dict[str, float]:
  med, ref_med = statistics.median(ts), statistics.median(ref)
  q = np.quantile(np.asarray(ts), [0.25, 0.75])
  # Ratio of per-round times (the same round shares the machine's load).
  paired = [a / b for a, b in zip(ts, ref)]
  return {
      "median_s": med,
      "q25_s": float(q[0]),
      "q75_s": float(q[1]),
      "ratio_to_sgd": med / ref_med,
      "paired_ratio_median": statistics.median(paired),
      "paired_ratio_q25": float(np.quantile(paired, 0.25)),
      "paired_ratio_q75": float(np.quantile(paired, 0.75)),
      # Fastest-decile ratio: the turns least disturbed by other load.
      "p10_ratio": float(np.quantile(ts, 0.1) / np.quantile(ref, 0.1)),
      "rounds": len(ts),
  }


def _compiled_part(tx, params0, batches):
  """The optimiser part of `tx`, compiled, and a runner on fresh copies."""
  copy = lambda t: jax.tree.map(jnp.array, t)
  p, s = copy(params0), copy(tx.init(params0))
  cpart = timing.opt_part(tx).lower(p, s, *batches[0]).compile()
  return cpart, timing.Runner(cpart, (p, s), batches)


def bench_model(model_name: str, cfg: dict, log=print) -> dict[str, Any]:
  batch, num_examples = cfg["batch"], cfg["num_examples"]
  in_shape, classes = _sources.inputs(model_name)
  model = _sources.make_model(model_name, num_classes=classes,
                              in_shape=in_shape, seed=0)
  graphdef, params0, rest0 = _split(model)
  n_params = int(sum(x.size for x in jax.tree.leaves(params0)))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch,) + in_shape), jnp.float32)
  y = jnp.asarray(rng.integers(0, classes, batch), jnp.int32)
  idx_all = jnp.asarray(rng.integers(0, num_examples, (64, batch)), jnp.int32)
  # The paper: 200 epochs in K=10 sections, so 20 epochs a section.
  ctx = optimizers.RunContext.create(num_examples, batch, 200,
                                     drop_remainder=True)
  names = [n for n in cfg["optimizers"]]

  fns, pfns = {}, {}
  hlo_step, hlo_part, hlo_text = {}, {}, {}
  grads0 = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params0)
  losses0 = jnp.ones((batch,), jnp.float32)
  step_batches = [(x, y, i) for i in idx_all]
  part_batches = [(grads0, jnp.float32(1.0), losses0, i) for i in idx_all]
  for n in names:
    tx = optimizers.build(n, OVERHEAD_OPTS[n], 0.0, ctx)
    step = make_train_step(graphdef, tx)
    copy = lambda t: jax.tree.map(jnp.array, t)
    p, r = copy(params0), copy(rest0)
    s = copy(tx.init(p))
    t0 = time.perf_counter()
    compiled = step.lower(p, r, s, x, y, idx_all[0]).compile()
    compile_s = time.perf_counter() - t0
    hlo_step[n] = hlo_summary(compiled)
    hlo_step[n]["compile_s"] = compile_s
    fns[n] = timing.Runner(compiled, (p, r, s), step_batches)
    cpart, pfns[n] = _compiled_part(tx, params0, part_batches)
    hlo_part[n] = hlo_summary(cpart)
    if n in ("sgd", "aalig"):
      hlo_text[n] = cpart.as_text()
  log(f"  [{model_name}] {n_params} params, compiled {len(names)} steps")

  for f in fns.values():  # warm-up
    f(cfg["warmup"])
  t = timing.interleave(fns, cfg["rounds"][model_name],
                        cfg["steps_per_round"][model_name])
  step_res = {n: _summ(t[n], t["sgd"]) for n in names}

  # The optimiser part alone; AALIG also with an ImageNet-sized table.
  big_n = cfg.get("big_num_examples", 0)
  if big_n:
    tx = optimizers.build("aalig", 0.1, 0.0, optimizers.RunContext.create(
        big_n, batch, 200, drop_remainder=True))
    cpart, pfns["aalig_bigN"] = _compiled_part(tx, params0, part_batches)
    hlo_part["aalig_bigN"] = hlo_summary(cpart)
  for f in pfns.values():
    f(cfg["warmup"])
  tp = timing.interleave(pfns, cfg["part_rounds"],
                         cfg["part_steps_per_round"])
  part_res = {n: _summ(tp[n], tp["sgd"]) for n in pfns}
  for n in pfns:
    part_res[n]["extra_over_sgd_us"] = 1e6 * (
        part_res[n]["median_s"] - part_res["sgd"]["median_s"])
  for n in names:
    log(f"  [{model_name}] {n:8s} step {1e3 * step_res[n]['median_s']:8.3f} ms"
        f"  ratio {step_res[n]['ratio_to_sgd']:.3f}"
        f" (paired {step_res[n]['paired_ratio_median']:.3f})"
        f"  opt part {1e6 * part_res[n]['median_s']:9.1f} us")
  return {
      "model": model_name,
      "model_source": _sources.model_source(model_name),
      "num_params": n_params,
      "batch": batch,
      "num_examples": num_examples,
      "big_num_examples": big_n,
      "step": step_res,
      "opt_part": part_res,
      "hlo_step": hlo_step,
      "hlo_opt_part": hlo_part,
      # Popped by the runner into hlo/<model>_<optimiser>_opt_part.txt.
      "hlo_text": hlo_text,
  }


def table_sweep(model_name: str, cfg: dict, log=print) -> dict[str, Any]:
  """AALIG's train step with tables of each size in ``cfg["table_sizes"]``.

  The same model and batches for every size, the sizes interleaved; each
  step time against the smallest table's (median, per-round paired ratio,
  fastest decile), and the compiled step's kernels and temporary bytes. A
  step touches only the batch's rows: the ratios should stay near 1.
  """
  batch, sizes = cfg["batch"], sorted(cfg["table_sizes"])
  model = _sources.make_model(model_name, num_classes=10,
                              in_shape=(32, 32, 3), seed=0)
  graphdef, params0, rest0 = _split(model)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((batch, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  fns, hlo = {}, {}
  for n in sizes:
    ctx = optimizers.RunContext.create(n, batch, 200, drop_remainder=True)
    tx = optimizers.build("aalig", OVERHEAD_OPTS["aalig"], 0.0, ctx)
    idx_all = jnp.asarray(rng.integers(0, n, (16, batch)), jnp.int32)
    copy = lambda t: jax.tree.map(jnp.array, t)
    p, r = copy(params0), copy(rest0)
    s = tx.init(p)
    t0 = time.perf_counter()
    compiled = make_train_step(graphdef, tx).lower(
        p, r, s, x, y, idx_all[0]).compile()
    hlo[str(n)] = hlo_summary(compiled)
    hlo[str(n)]["compile_s"] = time.perf_counter() - t0
    fns[str(n)] = timing.Runner(compiled, (p, r, s),
                                [(x, y, i) for i in idx_all])
  for f in fns.values():
    f(cfg["warmup"])
  t = timing.interleave(fns, cfg["rounds"][model_name],
                        cfg["steps_per_round"][model_name])
  base = str(sizes[0])
  res = {k: _summ(v, t[base]) for k, v in t.items()}
  for n in sizes:
    log(f"  [{model_name}] AALIG, N = {n:>10,}: step "
        f"{1e3 * res[str(n)]['median_s']:8.3f} ms, paired ratio to "
        f"N = {sizes[0]:,}: {res[str(n)]['paired_ratio_median']:.3f}, temp "
        f"{hlo[str(n)].get('temp_bytes', -1):,} B")
  return {"model": model_name, "table_sizes": sizes, "step": res,
          "hlo_step": hlo}


def run(cfg: dict, log=print) -> dict[str, Any]:
  out = {"config": cfg, "models": {}, "table_sweep": {}}
  for m in cfg["models"]:
    log(f"overhead: {m}")
    out["models"][m] = bench_model(m, cfg, log=log)
  for m in cfg.get("sweep_models", []):
    log(f"overhead: table-size sweep on {m}")
    out["table_sweep"][m] = table_sweep(m, cfg, log=log)
  return out
