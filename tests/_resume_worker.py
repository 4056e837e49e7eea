"""A small AALIG training run, shared by test_resume.py and its fresh process.

Imported, it gives the problem, the optimiser and a deterministic step loop.
Run as a script, it is the "fresh process" of an exact-resume test:

  python _resume_worker.py CKPT OUT.npz LOSS_ESTIMATE STOP [MESH_DEVICES]

restores the latest step in CKPT with `aalig_optax.restore_state`, continues
training to step STOP and writes every state leaf and the step sizes to
OUT.npz. With MESH_DEVICES the tables are restored sharded over that many
devices.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aalig_optax import aalig
from aalig_optax import aalig_metrics
from aalig_optax import restore_state
from aalig_optax import state_shardings

N, B, DIM = 40, 8, 3
STEPS_PER_EPOCH = N // B  # 5
EPOCHS_PER_SECTION = 2  # a section is 10 steps
NAN_STEPS = (4, 17, 24)  # steps whose batch holds a NaN (skipped)


def problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N, DIM)).astype(np.float32)
  y = (x @ np.array([1.0, -2.0, 0.5], np.float32)
       + 0.3 * rng.normal(size=N).astype(np.float32))
  return jnp.asarray(x), jnp.asarray(y)


def make_opt(loss_estimate="last"):
  return optax.apply_if_finite(
      aalig(0.5, N, STEPS_PER_EPOCH, EPOCHS_PER_SECTION, momentum=0.9,
            weight_decay=1e-3, loss_estimate=loss_estimate),
      max_consecutive_errors=100)


def batch(t):
  """Step t's indices (an epoch's permutation; one duplicate) and NaN flag."""
  epoch, pos = divmod(t, STEPS_PER_EPOCH)
  perm = np.random.default_rng(1000 + epoch).permutation(N)
  idx = perm[pos * B:(pos + 1) * B].copy()
  if t % 3 == 0:
    idx[-1] = idx[0]  # a duplicated index within the batch
  return idx.astype(np.int32), t in NAN_STEPS


def make_step(opt, shardings=None):
  x, y = problem()
  out = None if shardings is None else (shardings["params"],
                                        shardings["opt_state"])

  @jax.jit(out_shardings=out)
  def step(params, opt_state, idx, poison):
    def per_example(w):
      pred = x[idx] @ w
      return (pred - y[idx]) ** 2 + jnp.where(poison, jnp.nan, 0.0)

    losses, vjp = jax.vjp(per_example, params)
    (grads,) = vjp(jnp.full_like(losses, 1.0 / B))
    updates, opt_state = opt.update(grads, opt_state, params, losses=losses,
                                    indices=idx)
    return optax.apply_updates(params, updates), opt_state

  return step


def initial(opt):
  params = jnp.zeros(DIM)
  return {"params": params, "opt_state": opt.init(params),
          "step": jnp.asarray(0, jnp.int32)}


def step_size_of(opt_state):
  return aalig_metrics(opt_state)["step_size"]


def train(tree, stop, opt, on_step=None, shardings=None):
  """Runs steps tree['step'] .. stop-1; returns (tree, step sizes).

  With `shardings` (a pytree like `tree`), every step keeps the state there.
  """
  step = make_step(opt, shardings)
  params, opt_state = tree["params"], tree["opt_state"]
  sizes = []
  for t in range(int(tree["step"]), stop):
    if on_step is not None:
      on_step(t, {"params": params, "opt_state": opt_state,
                  "step": jnp.asarray(t, jnp.int32)})
    idx, poison = batch(t)
    params, opt_state = step(params, opt_state, jnp.asarray(idx),
                             jnp.asarray(poison))
    sizes.append(np.asarray(step_size_of(opt_state)))
  return ({"params": params, "opt_state": opt_state,
           "step": jnp.asarray(stop, jnp.int32)}, np.asarray(sizes))


def table_shardings(tree, devices):
  """Shardings for `tree`: AALIG's tables split over `devices`."""
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return {"params": replicated, "step": replicated,
          "opt_state": state_shardings(tree["opt_state"], mesh,
                                       table_axis="data")}


def with_shardings(tree, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def leaves(tree):
  """{path: numpy array} of every leaf, for bitwise comparison."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def main(argv):
  ckpt, out, loss_estimate, stop = argv[1], argv[2], argv[3], int(argv[4])
  opt = make_opt(loss_estimate)
  like = jax.eval_shape(lambda: initial(opt))
  shardings = None
  if len(argv) > 5:
    shardings = table_shardings(like, jax.devices()[:int(argv[5])])
    like = with_shardings(like, shardings)
  tree = restore_state(ckpt, like)
  specs = sorted({str(x.sharding.spec) if hasattr(x.sharding, "spec")
                  else "single" for x in jax.tree.leaves(tree)})
  tree, sizes = train(tree, stop, opt, shardings=shardings)
  np.savez(out, __step_sizes__=sizes, __devices__=len(jax.devices()),
           __shardings__=np.asarray(specs), **leaves(tree))


if __name__ == "__main__":
  main(sys.argv)
