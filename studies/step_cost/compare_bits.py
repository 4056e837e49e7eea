"""This checkout's AALIG against another checkout's, bit for bit.

Runs the same trajectories (a least-squares problem of 96 examples, batches
of 8 drawn as epochs of permutations, 12 epochs in sections of 2) under both
packages and compares every final parameter, current AOV, recorded loss and
the step sizes, bit for bit. What is compared is ``scale_by_aalig`` (the
step size and the tables: what issue 28 changed), each step in a jitted
program of its own; the gradient, and the momentum, weight decay and
parameter update that ``aalig`` adds to it (the same formula in both), run
in programs shared by the two packages. (Fused with the optimiser's own
program, XLA may contract a multiply-add of the momentum into one rounding
in one program and not in the other.)

Where every example is drawn in every section, issue 28's lazy section end
must give the previous step's results exactly::

  python -m studies.step_cost.compare_bits --baseline /path/to/older/checkout
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import aalig_optax
from studies.step_cost.lean_step import load_baseline

N, B, D, EPOCHS = 96, 8, 5, 12


def configurations(ao):
  """name -> (scale_by_aalig kwargs and momentum/weight decay, repeat an
  index in each batch, add a masked padding row)."""
  same = lambda a, d, loss, b: ao.update_aovs(a, d, loss, b)
  return {
      "plain": (dict(momentum=0.0), False, False),
      "momentum": ({}, False, False),
      "weight_decay": (dict(weight_decay=1e-2), False, False),
      "lower_bound": (dict(lower_bound=0.05, momentum=0.5), False, False),
      "reflect": (dict(aov_rule="reflect"), False, False),
      "best_epoch": (dict(loss_estimate="best_epoch"), False, False),
      "best_epoch_reflect": (dict(loss_estimate="best_epoch",
                                  aov_rule="reflect"), False, False),
      "bfloat16_tables": (dict(table_dtype=jnp.bfloat16), False, False),
      "callable_rule": (dict(aov_rule=same), False, False),
      "mask": ({}, False, True),
      "repeated_index": ({}, True, False),
      "repeated_index_best_epoch": (dict(loss_estimate="best_epoch"), True,
                                    False),
  }


def _momentum_step(params, trace, scaled, gamma, mu, wd):
  """aalig's momentum form around scale_by_aalig's gamma g: v <- mu v -
  gamma g, w <- w - gamma (g + wd w) + mu v (skipped batches never occur
  here)."""
  trace = jax.tree.map(lambda u, t: u + mu * t, scaled, trace)
  step = jax.tree.map(lambda u, t, p: -(u + mu * t) - gamma * wd * p,
                      scaled, trace, params)
  return optax.apply_updates(params, step), trace


def run(ao, kwargs, seed, repeat, masked):
  """The trajectory's final bits, as hex strings by quantity."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
  y = x @ jnp.asarray(rng.normal(size=D), jnp.float32) + jnp.asarray(
      rng.normal(size=N), jnp.float32)
  mu = kwargs.pop("momentum", 0.9)
  wd = kwargs.pop("weight_decay", 0.0)
  opt = ao.scale_by_aalig(0.5, N, N // B, 2, **kwargs)
  params = {"w": jnp.zeros(D), "b": jnp.zeros([])}
  state, trace = opt.init(params), jax.tree.map(jnp.zeros_like, params)

  @jax.jit
  def grad(p, idx):
    def f(p):
      losses = 0.5 * (x[idx] @ p["w"] + p["b"] - y[idx]) ** 2
      return losses.mean(), losses
    (_, losses), g = jax.value_and_grad(f, has_aux=True)(p)
    return losses, g

  update = jax.jit(lambda p, s, g, losses, idx, mask: opt.update(
      g, s, p, losses=losses, indices=idx, mask=mask))
  apply = jax.jit(lambda p, t, u, gamma: _momentum_step(p, t, u, gamma, mu,
                                                        wd))

  step_sizes = []
  for _ in range(EPOCHS):
    perm = rng.permutation(N)
    for k in range(N // B):
      idx = perm[k * B:(k + 1) * B].astype(np.int32)
      mask = np.ones(B, bool)
      losses, g = grad(params, idx)
      if repeat or masked:
        # One more row, of an example the batch holds already (a padding
        # row, or the same example again with another loss, as under
        # augmentation): every example is still recorded every epoch.
        idx = np.append(idx, idx[0])
        mask = np.append(mask, not masked)
        losses = jnp.append(losses, 0.5 * losses[0])
      updates, state = update(params, state, g, losses, idx, mask)
      params, trace = apply(params, trace, updates, state.step_size)
    step_sizes.append(state.step_size)
  core = state
  aov = (ao.current_aovs(core)[0] if hasattr(ao, "current_aovs")
         else core.aov)
  bits = lambda a: np.asarray(a).tobytes().hex()
  return {"w": bits(params["w"]), "b": bits(params["b"]), "aov": bits(aov),
          "last_loss": bits(core.last_loss),
          "step_sizes": bits(jnp.stack(step_sizes))}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--baseline", required=True,
                  help="the root of the checkout to compare with")
  ap.add_argument("--seeds", type=int, default=2)
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  base = load_baseline(args.baseline)
  out = {}
  for name, (kwargs, repeat, masked) in configurations(aalig_optax).items():
    base_kwargs = configurations(base)[name][0]
    for seed in range(args.seeds):
      ours = run(aalig_optax, kwargs, seed, repeat, masked)
      theirs = run(base, base_kwargs, seed, repeat, masked)
      differ = [k for k in ours if ours[k] != theirs[k]]
      out[f"{name}/{seed}"] = differ
      print(f"{name:28s} seed {seed}: "
            f"{'bit for bit' if not differ else 'DIFFER in ' + str(differ)}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  sys.exit(0 if not any(main().values()) else 1)
