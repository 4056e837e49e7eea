"""Optimisation quality: the paper's protocol (Sec. 5) at CPU scale.

For each task and optimiser, the single step-size hyperparameter (the maximal
step size of AALIG, ALI-G and SPS; the learning rate of Adam and of SGD with
its step schedule) is cross-validated over powers of ten, weight decay over
{0, 1e-4} where the paper does it (the image task); every configuration gets
the same epoch budget and several seeds (initialisation and batch order).
The learning-rate-free optimisers of ``optax.contrib`` run once per seed at
their defaults. A configuration's score is its validation metric at the end
of the budget, averaged over seeds; the best configuration of each optimiser
is reported with its validation and test metrics and its final training loss
(mean and standard deviation over seeds).

Every configuration of one optimiser on one task runs in one compiled
program: a ``vmap`` over (learning rate, weight decay, seed) of a
``lax.scan`` over an epoch's steps, so a grid costs one compilation.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import _optimizers
from benchmarks._sources import data_lib
from benchmarks._sources import models_lib

QUALITY_OPTS = ("aalig", "alig", "sps", "adam", "sgd_step", "prodigy", "dog",
                "dadapt")


def _pow10(lo: int, hi: int) -> tuple[float, ...]:
  return tuple(float(10.0 ** e) for e in range(lo, hi + 1))


@dataclasses.dataclass
class Task:
  """One benchmark problem and its budget."""
  name: str
  label: str
  interpolating: bool
  make_model: Callable[[int], nnx.Module]  # seed -> model
  per_example_loss: Callable  # (outputs, targets) -> [B]
  per_example_metric: Callable  # (outputs, targets) -> [B]
  metric: str
  higher_is_better: bool
  data: dict  # x_train, y_train, x_val, y_val, x_test, y_test (numpy)
  batch_size: int
  epochs: int
  grids: dict  # optimiser name -> learning rates
  weight_decays: tuple = (0.0,)
  seeds: int = 3
  eval_every_epoch: bool = True
  eval_batch: int = 1000
  # 0: all of an optimiser's configs in one vmapped program; 1: one config
  # at a time, unvmapped (XLA:CPU runs vmapped convolutions, i.e. grouped
  # convolutions with batched kernels, many times slower).
  configs_per_call: int = 0
  # 0: the full grid on every seed. k > 0: a staged search on the first k
  # seeds (see run_optimiser), then the chosen configuration on the others.
  sweep_seeds: int = 0
  loop_steps: bool = False  # see _Programs.epoch_fn
  notes: str = ""

  @property
  def num_train(self) -> int:
    return int(self.data["x_train"].shape[0])

  @property
  def steps_per_epoch(self) -> int:
    return self.num_train // self.batch_size


# --------------------------------------------------------------------------
# Losses and metrics.


def _softmax_ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _acc(logits, y):
  return (jnp.argmax(logits, -1) == y).astype(jnp.float32)


def _seq_ce(logits, y):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y),
                  axis=-1)


def _seq_acc(logits, y):
  return jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32), axis=-1)


def _logistic(logits, y):
  return optax.sigmoid_binary_cross_entropy(logits, y)


def _bin_acc(logits, y):
  return ((logits > 0).astype(jnp.float32) == y).astype(jnp.float32)


def _sq_err(pred, y):
  return jnp.mean((pred - y) ** 2, axis=-1)


# --------------------------------------------------------------------------
# Tasks.


def _split_val(x, y, val_fraction, seed=1234):
  perm = np.random.default_rng(seed).permutation(len(x))
  n_val = int(round(len(x) * val_fraction))
  va, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
  return x[tr], y[tr], x[va], y[va]


def _f32(*xs):
  return [np.asarray(x, np.float32) for x in xs]


def matrix_factorisation_task(rank: int, scale: str, seeds: int) -> Task:
  raw = data_lib.load_matrix_factorisation(seed=0)
  x_tr, y_tr, x_va, y_va = _split_val(raw.x_train, raw.y_train, 0.2)
  data = dict(zip(("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"),
                  _f32(x_tr, y_tr, x_va, y_va, raw.x_test, raw.y_test)))
  grid = _pow10(-4, 2)
  return Task(
      name=f"mf_rank{rank}", label=f"Matrix factorisation, rank {rank}",
      interpolating=rank >= 6,
      make_model=lambda seed: models_lib.LinearFactorisation(
          6, 10, rank, rngs=nnx.Rngs(seed)),
      per_example_loss=_sq_err, per_example_metric=_sq_err, metric="mse",
      higher_is_better=False, data=data, batch_size=100,
      epochs=50 if scale == "cpu" else 50,
      grids={n: grid for n in QUALITY_OPTS}, seeds=seeds,
      notes=(f"x ~ N(0, I_6), y = A x (A 10x6, row scales 1..1e-10), 640 "
             f"train / 160 validation / 200 test, batch 100, mean squared "
             f"error; rank {rank} "
             + ("can fit A exactly (interpolation)." if rank >= 6 else
                "cannot (no interpolation).")))


def rbf_task(name: str, scale: str, seeds: int) -> Task:
  raw = data_lib.load_libsvm(name)
  x_tr, y_tr, x_va, y_va = _split_val(raw.x_train, raw.y_train, 0.2)
  x_te, y_te = raw.x_test, raw.y_test
  sigma = {"mushrooms": 0.5, "ijcnn1": 0.05}[name]
  if scale == "cpu":
    # mushrooms: the exact kernel (every training point a centre), as in the
    # paper; ijcnn1: 2,000 random centres (the exact 32K x 32K kernel would
    # not fit the CPU budget).
    num_centres = {"mushrooms": len(x_tr), "ijcnn1": 2000}[name]
    max_eval = 10000
    epochs = {"mushrooms": 20, "ijcnn1": 10}[name]
  else:
    num_centres, max_eval, epochs = len(x_tr), None, 35
  x_va, y_va = x_va[:max_eval], y_va[:max_eval]
  x_te, y_te = x_te[:max_eval], y_te[:max_eval]
  pick = np.sort(np.random.default_rng(0).choice(
      len(x_tr), min(num_centres, len(x_tr)), replace=False))
  centres = x_tr[pick]
  feats = lambda x: data_lib.rbf_features(x, centres, sigma)
  data = dict(zip(("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"),
                  _f32(feats(x_tr), y_tr, feats(x_va), y_va, feats(x_te),
                       y_te)))
  grid = _pow10(-3, 2)
  return Task(
      name=f"rbf_{name}", label=f"RBF kernel, {name}",
      interpolating=name == "mushrooms",
      make_model=lambda seed: models_lib.LinearModel(len(centres),
                                                     rngs=nnx.Rngs(seed)),
      per_example_loss=_logistic, per_example_metric=_bin_acc,
      metric="accuracy", higher_is_better=True, data=data, batch_size=100,
      epochs=epochs, grids={n: grid for n in QUALITY_OPTS}, seeds=seeds,
      notes=(f"logistic regression on RBF features (sigma {sigma}) against "
             + (f"all {len(centres)} training points (the exact kernel); "
                if len(centres) == len(x_tr) else
                f"{len(centres)} random training points (Nystrom-style); ")
             + f"{len(y_tr)} train / "
             f"{len(y_va)} validation / {len(y_te)} test (the LIBSVM file "
             f"split 80/20, then 20% of train held out), batch 100; "
             f"always predicting the majority class scores "
             f"{max(np.mean(y_va), 1 - np.mean(y_va)):.4f} on validation."))


def _normalise_images(x_tr, *others):
  x_tr = x_tr.astype(np.float32) / 255.0
  mean = x_tr.mean(axis=(0, 1, 2), keepdims=True)
  std = x_tr.std(axis=(0, 1, 2), keepdims=True) + 1e-6
  out = [(x_tr - mean) / std]
  for x in others:
    out.append((x.astype(np.float32) / 255.0 - mean) / std)
  return out


def resnet_task(scale: str, seeds: int, dataset: Optional[str] = None
                ) -> Task:
  if scale == "cpu":
    dataset = dataset or "fashion_mnist"
    raw = data_lib.load_image_dataset(dataset)
    n_train, n_val, n_test, epochs, batch = 1024, 1000, 1000, 10, 128
    rng = np.random.default_rng(0)
    perm = rng.permutation(raw.num_train)
    tr, va = perm[:n_train], perm[n_train:n_train + n_val]
    x_te, y_te = raw.x_test[:n_test], raw.y_test[:n_test]
    lrs_p = _pow10(-2, 0)
    grids = {"aalig": lrs_p, "alig": lrs_p, "sps": lrs_p,
             "sgd_step": lrs_p, "adam": _pow10(-4, -2)}
    wds = (0.0, 1e-4)
  else:
    dataset = dataset or "cifar100"
    raw = data_lib.load_image_dataset(dataset, download=True)
    tr_all, va_all = np.arange(raw.num_train), None
    rng = np.random.default_rng(0)
    perm = rng.permutation(raw.num_train)
    n_val = 5000
    tr, va = perm[n_val:], perm[:n_val]
    x_te, y_te = raw.x_test, raw.y_test
    n_train, epochs, batch = len(tr), 200, 128
    del tr_all, va_all
    grids = {"aalig": _pow10(-3, 0), "alig": _pow10(-3, 0),
             "sps": _pow10(-3, 0), "sgd_step": _pow10(-3, 0),
             "adam": _pow10(-5, -2)}
    wds = (0.0, 1e-5, 1e-4, 1e-3)
  x_tr, x_va, x_te = _normalise_images(raw.x_train[tr], raw.x_train[va], x_te)
  data = dict(x_train=x_tr, y_train=raw.y_train[tr].astype(np.int32),
              x_val=x_va, y_val=raw.y_train[va].astype(np.int32),
              x_test=x_te, y_test=np.asarray(y_te, np.int32))
  in_ch, ncls = x_tr.shape[-1], int(raw.num_classes)
  return Task(
      name=f"resnet_{dataset}", label=f"ResNet-8, {dataset}",
      interpolating=False,
      make_model=lambda seed: models_lib.ResNet8(ncls, in_ch, 16,
                                                 rngs=nnx.Rngs(seed)),
      per_example_loss=_softmax_ce, per_example_metric=_acc,
      metric="accuracy", higher_is_better=True, data=data, batch_size=batch,
      epochs=epochs, grids=grids, weight_decays=wds, seeds=seeds,
      eval_every_epoch=scale != "cpu", eval_batch=500,
      configs_per_call=1, sweep_seeds=1 if scale == "cpu" else 0,
      loop_steps=True,
      notes=(f"{dataset}: {len(tr)} train / {len(va)} validation (from the "
             f"training set) / {len(y_te)} test images, no augmentation, "
             f"batch {batch}, {epochs} epochs"
             + (" (a tiny CPU budget: far from convergence)."
                if scale == "cpu" else ".")))


def char_rnn_task(scale: str, seeds: int) -> Task:
  seq_len, batch = 50, 50
  if scale == "cpu":
    text = data_lib.load_text("tolstoi", max_chars=150_000)
    epochs = 4
  else:
    text = data_lib.load_text("tolstoi")
    epochs = 150
  seqs = text.sequences("train", seq_len)
  perm = np.random.default_rng(0).permutation(len(seqs))
  n_val = max(batch, len(seqs) // 10)
  va, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
  test = text.sequences("test", seq_len)
  if scale == "cpu":
    test = test[:1000]
  vocab = len(text.vocab)
  data = dict(x_train=seqs[tr, :-1], y_train=seqs[tr, 1:],
              x_val=seqs[va, :-1], y_val=seqs[va, 1:],
              x_test=test[:, :-1], y_test=test[:, 1:])
  data = {k: np.asarray(v, np.int32) for k, v in data.items()}
  grids = {"aalig": _pow10(-1, 1), "alig": _pow10(-1, 1),
           "sps": _pow10(-1, 1), "sgd_step": _pow10(-1, 1),
           "adam": _pow10(-3, -1)}
  return Task(
      name="char_rnn_tolstoi", label="Char LSTM, Tolstoi", interpolating=False,
      make_model=lambda seed: models_lib.CharRNN(vocab, 128, 2,
                                                 rngs=nnx.Rngs(seed)),
      per_example_loss=_seq_ce, per_example_metric=_seq_acc,
      metric="accuracy", higher_is_better=True, data=data, batch_size=batch,
      epochs=epochs, grids=grids, seeds=seeds,
      eval_every_epoch=scale != "cpu", eval_batch=250, loop_steps=True,
      notes=(f"War and Peace"
             + (", first 150,000 characters" if scale == "cpu" else "")
             + f": {len(tr)} train / {len(va)} validation sequences of "
             f"{seq_len} characters, {len(test)} test sequences (the text's "
             f"last 20%), vocabulary {vocab}, 2x128 LSTM, batch {batch}, "
             f"{epochs} epochs, no regularisation (per-example loss: a "
             f"sequence's mean character cross-entropy)."))


TASK_NAMES = ("mf_rank1", "mf_rank4", "mf_rank10", "rbf_ijcnn1",
              "rbf_mushrooms", "resnet", "char_rnn")


def make_task(name: str, scale: str, seeds: int, heavy_seeds: int) -> Task:
  if name.startswith("mf_rank"):
    return matrix_factorisation_task(int(name[len("mf_rank"):]), scale, seeds)
  if name.startswith("rbf_"):
    return rbf_task(name[len("rbf_"):], scale, seeds)
  if name == "resnet":
    return resnet_task(scale, heavy_seeds)
  if name == "char_rnn":
    return char_rnn_task(scale, heavy_seeds)
  raise ValueError(f"unknown task {name!r}; choose from {TASK_NAMES}")


# --------------------------------------------------------------------------
# Training many configurations of one optimiser at once.


def _split(model):
  return nnx.split(model, nnx.Param, ...)


class _Programs:
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
        l, m = eval_jit(_unstack1(params), _unstack1(rest), x, y)
        return l[None], m[None]
      self.evaluate = evaluate
    self._epochs = {}
    self._inits = {}
    self._grad = None

  def init_fn(self, opt: str, ctx):
    key = (opt, ctx)
    if key not in self._inits:
      def init_one(params, lr, wd):
        return _optimizers.build(opt, lr, wd, ctx).init(params)
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
        tx = _optimizers.build(opt, lr, wd, ctx)

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
      tx = _optimizers.build(opt, lr, wd, ctx)
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


def _configs(task: Task, opt: str):
  seeds = list(range(task.seeds))
  if _optimizers.SPECS[opt].tuned:
    grid = task.grids[opt]
    return [(lr, wd, s) for lr, wd, s in itertools.product(
        grid, task.weight_decays, seeds)]
  return [(1.0, 0.0, s) for s in seeds]


def _selection_seeds(task: Task) -> int:
  return task.sweep_seeds or task.seeds


def _best_key(task: Task, records: list[dict]):
  """(lr, wd) with the best mean final validation metric on the sweep seeds."""
  groups = {}
  for r in records:
    if r["seed"] < _selection_seeds(task):
      groups.setdefault((r["lr"], r["wd"]), []).append(r["val_metric"][-1])
  higher = task.higher_is_better
  scores = {k: _nan_to_worst(float(np.mean(v)), higher)
            for k, v in groups.items()}
  return (max if higher else min)(scores, key=scores.get)


def run_optimiser(task: Task, progs: _Programs, opt: str, data_dev: dict,
                  log=print) -> dict[str, Any]:
  """Cross-validates `opt` on `task`; returns every configuration's record.

  With ``task.sweep_seeds == 0`` the full grid (learning rates x weight
  decays x seeds) runs. Otherwise (the heavy tasks) the search is staged:
  learning rates at the first weight decay on the first `sweep_seeds` seeds,
  then the other weight decays at the best learning rate, then the best
  pair on the remaining seeds.
  """
  t0 = time.perf_counter()
  seeds = list(range(task.seeds))
  if not _optimizers.SPECS[opt].tuned:
    records = _train(task, progs, opt, [(1.0, 0.0, s) for s in seeds],
                     data_dev)
  elif not task.sweep_seeds or task.sweep_seeds >= task.seeds:
    records = _train(task, progs, opt, _configs(task, opt), data_dev)
  else:
    sweep = seeds[:task.sweep_seeds]
    wds = task.weight_decays
    records = _train(task, progs, opt, [
        (lr, wds[0], s) for lr in task.grids[opt] for s in sweep], data_dev)
    if len(wds) > 1:
      lr = _best_key(task, records)[0]
      records += _train(task, progs, opt, [
          (lr, wd, s) for wd in wds[1:] for s in sweep], data_dev)
    lr, wd = _best_key(task, records)
    records += _train(task, progs, opt, [
        (lr, wd, s) for s in seeds[task.sweep_seeds:]], data_dev)
  wall = time.perf_counter() - t0
  log(f"    {opt:9s} {len(records):3d} runs  {wall:7.1f} s")
  return {"configs": records, "wall_s": wall}


def _train(task: Task, progs: _Programs, opt: str, configs: list,
           data_dev: dict) -> list[dict]:
  """Trains the (lr, wd, seed) `configs` of `opt`; one record each."""
  ctx = _optimizers.Context(task.num_train, task.steps_per_epoch, task.epochs)
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
            "val_loss": [], "val_metric": []}
    s_e, b = task.steps_per_epoch, task.batch_size
    for epoch in range(task.epochs):
      idx = np.stack([
          np.random.default_rng([c[2], epoch]).permutation(task.num_train)
          [:s_e * b].reshape(s_e, b) for c in chunk]).astype(np.int32)
      params, rest, opt_state, eloss = epoch_fn(
          params, rest, opt_state, lrs, wds, jnp.asarray(idx),
          data_dev["x_train"], data_dev["y_train"])
      hist["epoch_loss"].append(np.asarray(eloss))
      if task.eval_every_epoch or epoch == task.epochs - 1:
        tl, _ = progs.evaluate(params, rest, data_dev["x_train"],
                               data_dev["y_train"])
        vl, vm = progs.evaluate(params, rest, data_dev["x_val"],
                                data_dev["y_val"])
        hist["eval_epoch"].append(epoch + 1)
        hist["train_loss"].append(np.asarray(tl))
        hist["val_loss"].append(np.asarray(vl))
        hist["val_metric"].append(np.asarray(vm))
    tel, tem = progs.evaluate(params, rest, data_dev["x_test"],
                              data_dev["y_test"])
    tel, tem = np.asarray(tel), np.asarray(tem)
    for i, (lr, wd, seed) in enumerate(chunk):
      records.append({
          "lr": lr, "wd": wd, "seed": seed,
          "epoch_loss": [float(h[i]) for h in hist["epoch_loss"]],
          "eval_epoch": list(hist["eval_epoch"]),
          "train_loss": [float(h[i]) for h in hist["train_loss"]],
          "val_loss": [float(h[i]) for h in hist["val_loss"]],
          "val_metric": [float(h[i]) for h in hist["val_metric"]],
          "test_loss": float(tel[i]), "test_metric": float(tem[i]),
      })
  return records


def _nan_to_worst(v, higher):
  return v if math.isfinite(v) else (-math.inf if higher else math.inf)


def select_best(task: Task, opt: str, records: list[dict]) -> dict[str, Any]:
  """The configuration with the best seed-mean final validation metric."""
  groups = {}
  for r in records:
    groups.setdefault((r["lr"], r["wd"]), []).append(r)
  best = _best_key(task, records)
  rs = groups[best]

  def stat(field):
    v = np.asarray([r[field] if not isinstance(r[field], list)
                    else r[field][-1] for r in rs], np.float64)
    return {"mean": float(np.mean(v)), "std": float(np.std(v)),
            "values": [float(x) for x in v]}

  sel = _selection_seeds(task)
  sweep = [{"lr": k[0], "wd": k[1], "val_metric_mean": float(
      np.mean([r["val_metric"][-1] for r in groups[k] if r["seed"] < sel])),
            "train_loss_mean": float(np.mean(
                [r["train_loss"][-1] for r in groups[k] if r["seed"] < sel]))}
           for k in sorted(groups)]
  curve = np.mean(np.asarray([r["epoch_loss"] for r in rs]), axis=0)
  return {
      "optimizer": opt,
      "label": _optimizers.SPECS[opt].label,
      "tuned": _optimizers.SPECS[opt].tuned,
      "lr": best[0] if _optimizers.SPECS[opt].tuned else None,
      "wd": best[1],
      "lr_at_grid_edge": bool(_optimizers.SPECS[opt].tuned and best[0] in (
          min(task.grids[opt]), max(task.grids[opt]))),
      "val_metric": stat("val_metric"),
      "test_metric": stat("test_metric"),
      "train_loss": stat("train_loss"),
      "epoch_loss_curve": [float(x) for x in curve],
      "sweep": sweep,
      "num_seeds": len(rs),
  }


def run_task(task: Task, optimizers, log=print) -> dict[str, Any]:
  log(f"  task {task.name}: {task.num_train} train, {task.epochs} epochs, "
      f"{task.steps_per_epoch} steps/epoch, {task.seeds} seeds")
  t0 = time.perf_counter()
  progs = _Programs(task)
  data_dev = {k: jnp.asarray(v) for k, v in task.data.items()}
  results, best = {}, {}
  for opt in optimizers:
    res = run_optimiser(task, progs, opt, data_dev, log=log)
    results[opt] = res
    best[opt] = select_best(task, opt, res["configs"])
    best[opt]["wall_s"] = res["wall_s"]
  wall = time.perf_counter() - t0
  return {
      "name": task.name, "label": task.label,
      "interpolating": task.interpolating, "metric": task.metric,
      "higher_is_better": task.higher_is_better,
      "epochs": task.epochs, "batch_size": task.batch_size,
      "num_train": task.num_train, "steps_per_epoch": task.steps_per_epoch,
      "seeds": task.seeds, "weight_decays": list(task.weight_decays),
      "grids": {k: list(v) for k, v in task.grids.items()
                if k in optimizers},
      "notes": task.notes, "wall_s": wall,
      "sweep_note": (
          f"Staged search (CPU budget): step sizes at weight decay "
          f"{task.weight_decays[0]:g} on seed 0, then the other weight "
          f"decays at the best step size, then the chosen pair on seeds "
          f"1..{task.seeds - 1}; selection on seed 0's validation metric."
          if task.sweep_seeds and task.sweep_seeds < task.seeds else ""),
      "best": best,
      "runs": {k: v["configs"] for k, v in results.items()},
  }


def run(cfg: dict, log=print) -> dict[str, Any]:
  out = {"config": cfg, "tasks": {}}
  for name in cfg["tasks"]:
    t0 = time.perf_counter()
    task = make_task(name, cfg["scale"], cfg["seeds"], cfg["heavy_seeds"])
    if cfg.get("tiny"):
      task = _tiny(task)
    log(f"quality: {name} (data ready in {time.perf_counter() - t0:.1f} s)")
    out["tasks"][task.name] = run_task(task, cfg["optimizers"], log=log)
  return out


def _tiny(task: Task) -> Task:
  """A seconds-long version of `task` for the smoke test."""
  n = min(task.num_train, 4 * task.batch_size)
  data = dict(task.data)
  data["x_train"], data["y_train"] = data["x_train"][:n], data["y_train"][:n]
  for split in ("val", "test"):
    data[f"x_{split}"] = data[f"x_{split}"][:200]
    data[f"y_{split}"] = data[f"y_{split}"][:200]
  grids = {k: tuple(v[:2]) for k, v in task.grids.items()}
  return dataclasses.replace(task, data=data, epochs=2, grids=grids,
                             weight_decays=task.weight_decays[:1],
                             seeds=min(task.seeds, 2))
