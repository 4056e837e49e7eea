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
:func:`examples.common.train.train_supervised`. With ``nnx.Optimizer`` the
same update is ``optimizer.update(model, grads, losses=losses,
indices=indices, mask=mask)``: it forwards the keyword arguments to the
optax transformation.

References:
  Paren, Poudel, Kumar, "Faking Interpolation Until You Make It", Sec. 5.2,
  Table 1 and Figure 4; He et al., "Deep Residual Learning" (2016).
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from examples.common import cli
from examples.common import data as data_lib
from examples.common import models
from examples.common import train as train_lib

# The paper: maximal step size 0.1 for AALIG (its Figure 4); SGD 0.1 with the
# step schedule; Adam's default 1e-3.
DEFAULT_LRS = {"aalig": 0.1, "alig": 0.1, "sps": 0.1, "adam": 1e-3,
               "sgd": 0.1}


def cross_entropy(logits, labels):
  """Per-example softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def accuracy(logits, labels):
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


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
                 width: int = 16) -> train_lib.Problem:
  """ResNet8 cross-entropy classification of `data` (uint8 images)."""
  x = data.x_train.astype(np.float32) / 255.0
  mean = jnp.asarray(x.mean(axis=(0, 1, 2)))
  std = jnp.asarray(x.std(axis=(0, 1, 2)) + 1e-6)
  channels = data.x_train.shape[-1]

  def preprocess(images):
    return (images.astype(jnp.float32) / 255.0 - mean) / std

  return train_lib.Problem(
      data=data,
      make_model=lambda rngs: models.ResNet8(data.num_classes, channels,
                                             width, rngs=rngs),
      per_example_loss=cross_entropy, accuracy=accuracy,
      preprocess=preprocess,
      augment=random_crop_flip if augment else None, name=data.name)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  cli.add_common_args(parser, epochs=3, batch_size=128,
                      optimisers=("aalig", "sgd", "adam"),
                      workdir="runs/image_classification")
  parser.add_argument("--dataset", default="fashion_mnist")
  parser.add_argument("--max-train", type=int, default=6000,
                      help="train on the first N images (0: all)")
  parser.add_argument("--max-test", type=int, default=2000,
                      help="evaluate on the first N test images (0: all)")
  parser.add_argument("--augment", action="store_true",
                      help="random crops and flips")
  parser.add_argument("--momentum", type=float, default=0.9)
  parser.add_argument("--weight-decay", type=float, default=0.0)
  parser.add_argument("--width", type=int, default=16)
  parser.add_argument("--download", action="store_true",
                      help="let TFDS download and prepare the data set "
                      "(needs tensorflow and a network)")
  parser.add_argument("--tfds", action="store_true",
                      help="read fashion_mnist from TFDS too (other data "
                      "sets always are)")
  parser.add_argument("--paper", action="store_true",
                      help="the paper's settings: full data, 200 epochs, "
                      "all optimisers")
  args = parser.parse_args(argv)
  cli.check_workdir(args)
  if args.paper:
    args.max_train = args.max_test = 0
    args.epochs = 200
    args.optimisers = ",".join(train_lib.OPTIMISERS)
  kwargs = dict(max_train=args.max_train or None,
                max_test=args.max_test or None)
  if args.download:
    kwargs["download"] = True
  with cli.clear_errors():
    data = data_lib.load_image_dataset(
        args.dataset, source="tfds" if args.tfds else "auto", **kwargs)
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
  with cli.clear_errors():
    rows, histories = train_lib.compare_classifiers(
        problem, configs, args, data.name,
        val_label="test accuracy",
        title=f"ResNet8 on {data.name}")
  table = train_lib.format_table(
      rows, ["optimiser", "train_loss", "test_loss", "test_acc",
             "best_test_acc", "seconds"])
  print(f"\nResNet8 on {data.name}, {args.epochs} epochs, batch "
        f"{args.batch_size}, augment={args.augment}, "
        f"{time.time() - t_start:.0f} s\n")
  print(table)
  print(f"\nPlot: {workdir / (data.name + '.png')}")
  cli.write_summary(workdir, table, histories, {"rows": rows})
  return rows


if __name__ == "__main__":
  main()
