"""What the specification tests share: a small least-squares problem to
train on, and drivers of one update.

- `make_problem`, `batches`, ...: a non-interpolating least-squares problem of
  N examples in batches of B, and its gradient in NumPy for the reference;
- `run_update`: one update of a transform, jitted or eager;
- `one_step`: one update of `scale_by_aalig` on a table of TABLE_N examples;
- `injected_aalig`: AALIG under `optax.inject_hyperparams`, values set.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import aalig_optax
from aalig_optax import aalig
from aalig_optax import scale_by_aalig


N, B, D = 32, 8, 5
STEPS_PER_EPOCH = N // B


def make_problem(seed, n=N, d=D):
  """A non-interpolating least-squares problem: per-example 0.5 (x.w - y)^2."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = (x @ rng.normal(size=d) + rng.normal(size=n)).astype(np.float32)
  return x, y


def batches(seed, num_epochs, n=N, b=B):
  """Index batches: a fresh permutation each epoch."""
  rng = np.random.default_rng(seed + 1000)
  for _ in range(num_epochs):
    perm = rng.permutation(n)
    for k in range(n // b):
      yield perm[k * b:(k + 1) * b].astype(np.int32)


def per_example_losses(params, x, y):
  pred = x @ params["w"] + params["b"]
  return 0.5 * (pred - y) ** 2


def loss_and_grads(params, x, y):
  losses, vjp = jax.vjp(lambda p: per_example_losses(p, x, y), params)
  (grads,) = vjp(jnp.full_like(losses, 1.0 / losses.shape[0]))
  return losses, grads


def init_params(d=D):
  return {"w": jnp.zeros(d, jnp.float32), "b": jnp.zeros([], jnp.float32)}


def make_step(opt):
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, x, y, idx):
    losses, grads = loss_and_grads(params, x, y)
    updates, state = opt.update(grads, state, params, losses=losses,
                                indices=idx)
    return optax.apply_updates(params, updates), state, losses
  return step


def numpy_grad(w_flat, x, y):
  w, b = w_flat[:-1], w_flat[-1]
  r = x.astype(np.float64) @ w + b - y
  losses = 0.5 * r ** 2
  grad = np.concatenate([x.T @ r / len(y), [r.mean()]])
  return losses, grad


def flat(params):
  return np.concatenate([np.asarray(params["w"], np.float64),
                         [float(params["b"])]])


F32_MAX = float(np.finfo(np.float32).max)
I32_MAX = int(np.iinfo(np.int32).max)


def run_update(tx, state, grads, losses, indices, *, jit=True, **kw):
  """`tx.update` with params None, jitted (default) or eager."""
  def f(s, g, l, i):
    return tx.update(g, s, None, losses=l, indices=i, **kw)
  return (jax.jit(f) if jit else f)(state, grads, losses, indices)


# One update on a small table: the edge cases and the fuzz.
TABLE_N = 16
MAX_LR = 0.5
EPS = 1e-5


# The core either skips a batch with a non-finite loss or gradient (and
# counts it in `num_skipped`), or lets its step size become NaN so that
# `optax.apply_if_finite` rejects it. The reference follows whichever the
# state type documents.
SKIPS = hasattr(aalig_optax.ScaleByAaligState, "num_skipped")
F32 = np.float32


def one_step(losses, indices, mask=None, table_dtype=jnp.float32,
             grads=(1.0, 0.0), jit=False, state=None, tx=None):
  tx = tx or scale_by_aalig(MAX_LR, TABLE_N, 100, 1, table_dtype=table_dtype)
  state = tx.init(None) if state is None else state
  fn = jax.jit(tx.update) if jit else tx.update
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return fn(jnp.asarray(grads, jnp.float32), state, None,
              losses=losses, indices=indices, mask=mask)


def skipped_or_nan(updates, state):
  if SKIPS:
    return int(state.num_skipped) == 1 and not np.any(np.asarray(updates))
  return not np.all(np.isfinite(np.asarray(updates)))


def injected_aalig(**hp):
  """AALIG under inject_hyperparams on two params, `hp` set in its state."""
  tx = optax.inject_hyperparams(aalig, static_args=(
      "num_examples", "steps_per_epoch", "epochs_per_section",
      "loss_estimate"))(
          max_learning_rate=0.5, num_examples=4, steps_per_epoch=2,
          epochs_per_section=1, momentum=0.5)
  params = jnp.array([1.0, -1.0])
  state = tx.init(params)
  for k, v in hp.items():
    state.hyperparams[k] = jnp.asarray(v, state.hyperparams[k].dtype)
  return tx, params, state
