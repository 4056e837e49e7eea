"""AALIG with a Flax linen model and ``TrainState``.

Linen's ``TrainState.apply_gradients(grads=...)`` calls ``tx.update(grads,
opt_state, params)`` with no extra arguments, so AALIG would never see the
per-example losses and indices (and ALI-G never the batch loss). The clean
fix is a small subclass that forwards keyword arguments::

    class TrainState(train_state.TrainState):
      def apply_gradients(self, *, grads, **extra_args):
        updates, opt_state = self.tx.update(grads, self.opt_state,
                                            self.params, **extra_args)
        return self.replace(step=self.step + 1,
                            params=optax.apply_updates(self.params, updates),
                            opt_state=opt_state)

    state = state.apply_gradients(grads=grads, losses=losses,
                                  indices=indices, mask=mask, value=loss)

(Calling ``state.tx.update(...)`` directly in the step is the other option.)
This example trains a linen MLP on Fashion-MNIST (its IDX files, see
``examples.common.images.load_fashion_mnist``; ``--tfds`` for TFDS's copy)
with AALIG, ALI-G and Adam, through the same jitted, donated, checkpointed
loop as the NNX examples.

Run (all 60,000 images, 10 epochs: about 2 minutes on 2 CPU cores)::

    python -m examples.linen_mlp
    python -m examples.linen_mlp --dataset cifar10 --download   # TFDS

References:
  Paren, Poudel, Kumar, "Faking Interpolation Until You Make It";
  Flax ``flax.training.train_state``.
"""

from __future__ import annotations

import functools
import pathlib
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import aalig_optax
from examples.common import cli
from examples.common import data as data_lib
from examples.common import loop
from examples.common import optimizers
from examples.common import problems
from examples.common import report

DEFAULT_LRS = problems.DEEP_LRS
# All 60,000 images, 10 epochs.
PRESETS = {"CPU": cli.ImagePreset(epochs=10, optimisers="aalig,alig,adam")}


class TrainState(train_state.TrainState):
  """A linen ``TrainState`` whose ``apply_gradients`` forwards extra args.

  ``apply_gradients(grads=..., losses=..., indices=..., mask=...,
  value=...)`` passes every keyword argument after `grads` to
  ``tx.update``, which AALIG (``losses``, ``indices``, ``mask``) and ALI-G or
  ``optax.polyak_sgd`` (``value``) need.
  """

  def apply_gradients(self, *, grads, **extra_args):
    updates, new_opt_state = self.tx.update(grads, self.opt_state,
                                            self.params, **extra_args)
    return self.replace(step=self.step + 1,
                        params=optax.apply_updates(self.params, updates),
                        opt_state=new_opt_state)


class MLP(nn.Module):
  """A ReLU MLP classifier on flattened images."""

  hidden: Sequence[int] = (256, 256)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(self.num_classes)(x)


def train(data: data_lib.ArrayDataset, cfg: optimizers.OptConfig,
          ctx: optimizers.RunContext, run: loop.Run, hidden=(256, 256)):
  """Trains the linen MLP on `data` with optimiser `cfg`; see ``loop.fit``."""
  model = MLP(tuple(hidden), data.num_classes)
  tx = optimizers.make_optimizer(cfg, ctx)
  sample = jnp.zeros((1,) + data.x_train.shape[1:], jnp.float32)
  state = TrainState.create(
      apply_fn=model.apply,
      params=model.init(jax.random.PRNGKey(run.seed), sample)["params"],
      tx=tx)
  # An int32 array, not create()'s Python 0: the first step would otherwise
  # return a different type and the step would compile twice.
  state = state.replace(step=jnp.zeros([], jnp.int32))
  train_data = dict(x=jnp.asarray(data.x_train), y=jnp.asarray(data.y_train))
  norm = lambda im: im.astype(jnp.float32) / 255.0 - 0.5

  def per_example_loss(params, x, y):
    return problems.cross_entropy(state.apply_fn({"params": params}, x), y)

  def train_step(state, train_data, idx, mask):
    x, y = norm(train_data["x"][idx]), train_data["y"][idx]
    m = mask.astype(jnp.float32)

    def loss_fn(params):
      losses = per_example_loss(params, x, y)
      return jnp.sum(losses * m) / jnp.maximum(jnp.sum(m), 1.0), losses

    (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    state = state.apply_gradients(grads=grads, losses=losses, indices=idx,
                                  mask=mask, value=loss)
    step_size = optimizers.logged_step_size(cfg, state.opt_state, grads,
                                            loss, ctx)
    return state, dict(loss=loss, count=jnp.sum(m), step_size=step_size)

  @jax.jit
  def eval_batch(params, x, y):
    logits = model.apply({"params": params}, norm(x))
    return problems.cross_entropy(logits, y), problems.accuracy(logits, y)

  def evaluate(state):
    losses, accs = [], []
    for s in range(0, len(data.y_test), 1000):
      loss, a = eval_batch(state.params, data.x_test[s:s + 1000],
                           data.y_test[s:s + 1000])
      losses.append(np.asarray(loss))
      accs.append(np.asarray(a))
    return dict(val_loss=float(np.concatenate(losses).mean()),
                val_acc=float(np.concatenate(accs).mean()))

  epoch_metrics = None
  if cfg.name == "aalig":
    epoch_metrics = lambda s: aalig_optax.aalig_metrics(s.opt_state)
  return loop.fit(state, train_step, train_data, ctx, run, evaluate=evaluate,
                  epoch_metrics=epoch_metrics, desc=f"linen MLP {cfg.label}")


def main(argv=None):
  parser = cli.make_parser(__doc__, presets=PRESETS, workdir="runs/linen_mlp")
  cli.add_image_args(parser, PRESETS)
  parser.add_argument("--momentum", type=float, default=0.9)
  args = cli.parse(parser, argv, PRESETS)
  cli.check_workdir(args)
  data = cli.load_images(args)
  configs = cli.optimiser_configs(args, DEFAULT_LRS,
                                  common=dict(momentum=args.momentum),
                                  adam=dict(momentum=0.0))
  workdir = pathlib.Path(args.workdir)
  t_start = time.time()
  rows, histories = loop.compare_classifiers(
      functools.partial(train, data), data.num_train, configs, args,
      data.name, val_label="test accuracy",
      title=f"linen MLP on {data.name}")
  report.summarise(
      workdir, f"Linen MLP on {data.name} ({data.num_train} train), "
      f"{args.epochs} epochs, {time.time() - t_start:.0f} s", rows,
      ["optimiser", "train_loss", "test_loss", "test_acc"], histories,
      f"Plot: {workdir / (data.name + '.png')}")
  return rows


if __name__ == "__main__":
  main()
