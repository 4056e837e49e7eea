"""The quality benchmark's engine: many configurations of one optimiser at once.

Every configuration (learning rate, weight decay, seed) of one optimiser on
one task runs in one compiled program: a ``vmap`` over configurations of a
``lax.scan`` over an epoch's steps, so a grid costs one compilation. The
heavy tasks (``loop_steps``) run a Python loop of two programs instead (see
:meth:`Programs.epoch_fn`). Models are evaluated at
:func:`examples.common.optimizers.eval_params` (the schedule-free
optimisers' averaged iterate, the parameters for the others).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.tasks import Task
from examples.common import optimizers

__all__ = ["Programs", "train"]


def _split(model):
  return nnx.split(model, nnx.Param, ...)


class Programs:
  """The compiled pieces of one task (shared by its optimisers)."""

  def __init__(self, task: Task):
    self.task = task
    self.graphdef, _, _ = _split(task.make_model(0))
    graphdef = self.graphdef

    def forward(params, rest, x, train):
      model = nnx.merge(graphdef, params, rest, copy=True)
      out = model(x, train=train)
      _, _, new_rest = _split(model)
      return out, new_rest

    self.forward = forward

    def eval_one(params, rest, x_all, y_all):
      n = x_all.shape[0]
      eb = min(task.eval_batch, n)
      nb = -(-n // eb)
      pad = nb * eb - n
      xp = jnp.concatenate([x_all, jnp.zeros((pad,) + x_all.shape[1:],
                                             x_all.dtype)])
      yp = jnp.concatenate([y_all, jnp.zeros((pad,) + y_all.shape[1:],
                                             y_all.dtype)])
      valid = jnp.arange(nb * eb) < n

      def chunk(i):
        xb = jax.lax.dynamic_slice_in_dim(xp, i * eb, eb)
        yb = jax.lax.dynamic_slice_in_dim(yp, i * eb, eb)
        vb = jax.lax.dynamic_slice_in_dim(valid, i * eb, eb)
        out, _ = forward(params, rest, xb, False)
        loss = jnp.where(vb, task.per_example_loss(out, yb), 0.0)
        met = jnp.where(vb, task.per_example_metric(out, yb), 0.0)
        return jnp.sum(loss), jnp.sum(met)

      losses, mets = jax.lax.map(chunk, jnp.arange(nb))
      return jnp.sum(losses) / n, jnp.sum(mets) / n

    self.vmapped = task.configs_per_call != 1
    if self.vmapped:
      self.evaluate = jax.jit(jax.vmap(eval_one, in_axes=(0, 0, None, None)))
    else:
      eval_jit = jax.jit(eval_one)
      def evaluate(params, rest, x, y):
        loss, metric = eval_jit(_unstack1(params), _unstack1(rest), x, y)
        return loss[None], metric[None]
      self.evaluate = evaluate
    self._epochs = {}
    self._inits = {}
    self._evals = {}
    self._grad = None

  def eval_params_fn(self, opt: str):
    """(params, opt_state) of a batch of configurations -> the params to
    evaluate (:func:`optimizers.eval_params`); the identity for most."""
    if optimizers.SPECS[opt].eval_params is None:
      return lambda params, opt_state: params
    if opt not in self._evals:
      # Both engines keep a leading configuration axis (size 1 unvmapped).
      self._evals[opt] = jax.jit(jax.vmap(
          lambda p, s: optimizers.eval_params(opt, s, p)))
    return self._evals[opt]

  def init_fn(self, opt: str, ctx):
    key = (opt, ctx)
    if key not in self._inits:
      def init_one(params, lr, wd):
        return optimizers.build(opt, lr, wd, ctx,
                                 momentum=self.task.momentum).init(params)
      if self.vmapped:
        self._inits[key] = jax.jit(jax.vmap(init_one))
      else:
        init_jit = jax.jit(init_one)
        self._inits[key] = lambda p, lr, wd: _stack1(
            init_jit(_unstack1(p), lr[0], wd[0]))
    return self._inits[key]

  def _loss_fn(self, p, r, xb, yb):
    out, r = self.forward(p, r, xb, True)
    losses = self.task.per_example_loss(out, yb)
    return jnp.mean(losses), (losses, r)

  def grad_fn(self):
    """The model's gradient step, shared by every optimiser of the task."""
    if self._grad is None:
      def grad_one(params, rest, ib, x_all, y_all):
        (loss, (losses, rest)), g = jax.value_and_grad(
            self._loss_fn, has_aux=True)(params, rest, x_all[ib], y_all[ib])
        return loss, losses, rest, g
      if self.vmapped:
        grad_one = jax.vmap(grad_one, in_axes=(0, 0, 0, None, None))
      self._grad = jax.jit(grad_one, donate_argnums=(1,))
    return self._grad

  def epoch_fn(self, opt: str, ctx):
    """Runs one epoch of every configuration in a batch of configurations.

    ``task.loop_steps`` False: one program, jit(vmap over configurations of
    lax.scan over the epoch's steps). True: a Python loop over steps of two
    programs, the model's gradient (compiled once per task) and the
    optimiser's update (one small compilation per optimiser): XLA:CPU runs a
    ResNet step about ten times slower inside lax.scan (a while loop) than
    as its own program, and a ResNet/LSTM step costs far more to compile
    than to dispatch.
    """
    key = (opt, ctx)
    if key in self._epochs:
      return self._epochs[key]

    if not self.task.loop_steps:
      def one(params, rest, opt_state, lr, wd, idx, x_all, y_all):
        tx = optimizers.build(opt, lr, wd, ctx,
                                 momentum=self.task.momentum)

        def body(carry, ib):
          p, r, s = carry
          (loss, (losses, r)), g = jax.value_and_grad(
              self._loss_fn, has_aux=True)(p, r, x_all[ib], y_all[ib])
          u, s = tx.update(g, s, p, value=loss, losses=losses, indices=ib)
          return (optax.apply_updates(p, u), r, s), loss

        (params, rest, opt_state), losses = jax.lax.scan(
            body, (params, rest, opt_state), idx)
        return params, rest, opt_state, jnp.mean(losses)

      fn = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, 0, 0, None, None)),
                   donate_argnums=(0, 1, 2))
      self._epochs[key] = fn
      return fn

    def upd_one(params, opt_state, g, loss, losses, ib, lr, wd):
      tx = optimizers.build(opt, lr, wd, ctx,
                                 momentum=self.task.momentum)
      u, opt_state = tx.update(g, opt_state, params, value=loss,
                               losses=losses, indices=ib)
      return optax.apply_updates(params, u), opt_state

    if self.vmapped:
      upd_one = jax.vmap(upd_one)
    upd = jax.jit(upd_one, donate_argnums=(0, 1))
    grad = self.grad_fn()
    squeeze = (lambda t: t) if self.vmapped else _unstack1
    expand = (lambda t: t) if self.vmapped else _stack1

    def fn(params, rest, opt_state, lr, wd, idx, x_all, y_all):
      p, r, s = squeeze(params), squeeze(rest), squeeze(opt_state)
      lr, wd = squeeze(lr), squeeze(wd)
      idx = idx if self.vmapped else idx[0]
      losses = []
      for k in range(idx.shape[-2]):
        ib = idx[:, k] if self.vmapped else idx[k]
        loss, per_ex, r, g = grad(p, r, ib, x_all, y_all)
        p, s = upd(p, s, g, loss, per_ex, ib, lr, wd)
        losses.append(loss)
      mean_loss = jnp.mean(jnp.stack(losses), axis=0)
      return expand(p), expand(r), expand(s), expand(mean_loss)

    self._epochs[key] = fn
    return fn


def _unstack1(tree):
  return jax.tree.map(lambda x: x[0], tree)


def _stack1(tree):
  return jax.tree.map(lambda x: x[None], tree)


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def train(task: Task, progs: Programs, opt: str, configs: list,
          data_dev: dict, final: dict | None = None) -> list[dict]:
  """Trains the (lr, wd, seed) `configs` of `opt`; one record each.

  `final`, if given, receives the last chunk's trained ``params``, ``rest``
  and ``opt_state`` (a leading configuration axis), for tests.
  """
  ctx = task.ctx
  per_call = task.configs_per_call or len(configs)
  records = []
  for start in range(0, len(configs), per_call):
    chunk = configs[start:start + per_call]
    lrs = jnp.asarray([c[0] for c in chunk], jnp.float32)
    wds = jnp.asarray([c[1] for c in chunk], jnp.float32)
    models = [_split(task.make_model(c[2])) for c in chunk]
    params = _stack([m[1] for m in models])
    rest = _stack([m[2] for m in models])
    opt_state = progs.init_fn(opt, ctx)(params, lrs, wds)
    opt_state = jax.tree.map(jnp.array, opt_state)  # No shared buffers.
    epoch_fn = progs.epoch_fn(opt, ctx)
    hist = {"epoch_loss": [], "eval_epoch": [], "train_loss": [],
            "train_metric": [], "val_loss": [], "val_metric": []}
    eval_params = progs.eval_params_fn(opt)
    s_e, b = ctx.steps_per_epoch, ctx.batch_size
    for epoch in range(task.epochs):
      idx = np.stack([
          np.random.default_rng([c[2], epoch]).permutation(task.num_train)
          [:s_e * b].reshape(s_e, b) for c in chunk]).astype(np.int32)
      params, rest, opt_state, eloss = epoch_fn(
          params, rest, opt_state, lrs, wds, jnp.asarray(idx),
          data_dev["x_train"], data_dev["y_train"])
      hist["epoch_loss"].append(np.asarray(eloss))
      if task.eval_every_epoch or epoch == task.epochs - 1:
        p_eval = eval_params(params, opt_state)
        tl, tm = progs.evaluate(p_eval, rest, data_dev["x_train"],
                                data_dev["y_train"])
        vl, vm = progs.evaluate(p_eval, rest, data_dev["x_val"],
                                data_dev["y_val"])
        hist["eval_epoch"].append(epoch + 1)
        hist["train_loss"].append(np.asarray(tl))
        hist["train_metric"].append(np.asarray(tm))
        hist["val_loss"].append(np.asarray(vl))
        hist["val_metric"].append(np.asarray(vm))
    tel, tem = progs.evaluate(eval_params(params, opt_state), rest,
                              data_dev["x_test"], data_dev["y_test"])
    tel, tem = np.asarray(tel), np.asarray(tem)
    if final is not None:
      final.update(params=params, rest=rest, opt_state=opt_state)
    for i, (lr, wd, seed) in enumerate(chunk):
      records.append({
          "lr": lr, "wd": wd, "seed": seed,
          "epoch_loss": [float(h[i]) for h in hist["epoch_loss"]],
          "eval_epoch": list(hist["eval_epoch"]),
          "train_loss": [float(h[i]) for h in hist["train_loss"]],
          "train_metric": [float(h[i]) for h in hist["train_metric"]],
          "val_loss": [float(h[i]) for h in hist["val_loss"]],
          "val_metric": [float(h[i]) for h in hist["val_metric"]],
          "test_loss": float(tel[i]), "test_metric": float(tem[i]),
      })
  return records
