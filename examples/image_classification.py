"""Image classification with Flax NNX: the paper's small ResNet (Sec. 5.2).

ResNet8 (8 layers, 16 channels in the first, ~78K parameters), cross-entropy,
Nesterov momentum 0.9, batch 128, trained by AALIG and the baselines (SGD
with the step schedule of He et al., Adam, ALI-G, SPS). Images are centred
and normalised per channel; ``--augment`` adds the standard random crops
(4-pixel padding) and horizontal flips, drawn inside the jitted step. Each
example keeps one AOV whatever its augmentation: the AOV is keyed on the
dataset index that the sampler carries alongside the batch.

Data: ``--dataset fashion_mnist`` (the default) reads the four IDX files
from ``$AALIG_DATA_DIR``, Debian's ``dataset-fashion-mnist`` package or the
cache, else downloads them (verified); ``--tfds`` reads it from TFDS instead.
Any other TFDS image set (``cifar10``, ``cifar100``, ``svhn_cropped``, ...)
is read with ``tfds.data_source`` (ArrayRecord, no TensorFlow),
``--download`` preparing it on a connected machine (needs tensorflow).

Run (offline default: 6,000 Fashion-MNIST images, 3 epochs, ~4 min on 2 CPU
cores)::

    python -m examples.image_classification
    python -m examples.image_classification --paper --dataset cifar100 \\
        --download --augment        # the paper's settings, for a GPU

The train step is the functional NNX pattern (``nnx.split`` once, then
``nnx.merge`` inside a jitted pure function) from
:func:`examples.common.loop.train_supervised`. With ``nnx.Optimizer`` the
same update is ``optimizer.update(model, grads, losses=losses,
indices=indices, mask=mask)``: it forwards the keyword arguments to the
optax transformation.

References:
  Paren, Poudel, Kumar, "Faking Interpolation Until You Make It", Sec. 5.2,
  Table 1 and Figure 4; He et al., "Deep Residual Learning" (2016).
"""

from __future__ import annotations

import functools
import pathlib
import time

import jax
import jax.numpy as jnp
from flax import nnx

from examples.common import cli
from examples.common import data as data_lib
from examples.common import loop
from examples.common import models
from examples.common import optimizers
from examples.common import problems
from examples.common import report

DEFAULT_LRS = problems.DEEP_LRS

# 6,000 Fashion-MNIST images, 3 epochs; the paper: all the data, 200 epochs.
CPU = cli.ImagePreset(epochs=3, optimisers="aalig,sgd,adam", max_train=6000,
                      max_test=2000)
PAPER = cli.ImagePreset(epochs=200, optimisers=",".join(optimizers.OPTIMISERS))
PRESETS = {"CPU": CPU, "PAPER": PAPER}


def random_crop_flip(key, images, pad: int = 4, flip: bool = True):
  """Random crops after zero padding and random horizontal flips, in-jit.

  Args:
    key: a PRNG key.
    images: float [B, H, W, C] (already normalised, so zero padding is the
      mean colour).
    pad: padding on each side before cropping back to H x W.
    flip: flip half of the images left-right.

  Returns:
    The augmented images, same shape.
  """
  b, h, w, c = images.shape
  k_y, k_x, k_f = jax.random.split(key, 3)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = jax.random.randint(k_y, (b,), 0, 2 * pad + 1)
  dx = jax.random.randint(k_x, (b,), 0, 2 * pad + 1)
  crop = jax.vmap(lambda im, i, j: jax.lax.dynamic_slice(
      im, (i, j, 0), (h, w, c)))(padded, dy, dx)
  if not flip:
    return crop
  flips = jax.random.bernoulli(k_f, 0.5, (b,))
  return jnp.where(flips[:, None, None, None], crop[:, :, ::-1], crop)


def make_problem(data: data_lib.ArrayDataset, augment: bool,
                 width: int = 16) -> problems.Problem:
  """ResNet8 cross-entropy classification of `data` (uint8 images)."""
  mean, std = map(jnp.asarray, problems.channel_stats(data.x_train))
  channels = data.x_train.shape[-1]

  def preprocess(images):
    return (images.astype(jnp.float32) / 255.0 - mean) / std

  return problems.Problem(
      data=data,
      make_model=lambda rngs: models.ResNet8(data.num_classes, channels,
                                             width, rngs=rngs),
      per_example_loss=problems.cross_entropy, accuracy=problems.accuracy,
      preprocess=preprocess,
      augment=random_crop_flip if augment else None, name=data.name)


def main(argv=None):
  parser = cli.make_parser(
      __doc__, presets=PRESETS, workdir="runs/image_classification")
  cli.add_image_args(parser, PRESETS)
  parser.add_argument("--augment", action="store_true",
                      help="random crops and flips")
  parser.add_argument("--momentum", type=float, default=0.9)
  parser.add_argument("--weight-decay", type=float, default=0.0)
  parser.add_argument("--width", type=int, default=16)
  args = cli.parse(parser, argv, PRESETS)
  cli.check_workdir(args)
  data = cli.load_images(args)
  problem = make_problem(data, args.augment, args.width)
  configs = cli.optimiser_configs(
      args, DEFAULT_LRS,
      common=dict(momentum=args.momentum, weight_decay=args.weight_decay),
      sgd=dict(schedule="step"), adam=dict(momentum=0.0),
      sps=dict(momentum=0.0))
  num_params = models.count_params(
      nnx.eval_shape(lambda: problem.make_model(nnx.Rngs(0))))
  print(f"{data.name}: {data.num_train} train / {len(data.y_test)} test "
        f"images {data.x_train.shape[1:]}, {data.num_classes} classes; "
        f"ResNet8 with {num_params} parameters")
  workdir = pathlib.Path(args.workdir)
  t_start = time.time()
  rows, histories = loop.compare_classifiers(
      functools.partial(loop.train_supervised, problem), data.num_train,
      configs, args, data.name,
      val_label="test accuracy",
      title=f"ResNet8 on {data.name}")
  report.summarise(
      workdir, f"ResNet8 on {data.name}, {args.epochs} epochs, batch "
      f"{args.batch_size}, augment={args.augment}, "
      f"{time.time() - t_start:.0f} s", rows,
      ["optimiser", "train_loss", "test_loss", "test_acc", "best_test_acc",
       "seconds"], histories, f"Plot: {workdir / (data.name + '.png')}")
  return rows


if __name__ == "__main__":
  main()
