"""The regime benchmark's tasks: the paper's image/text regime in miniature.

Models that cannot fit their data, 50 epochs in K = 10 sections of 5
epochs, weight decay over the paper's grid (see :mod:`benchmarks.regime`).
Built on :class:`benchmarks.task_base.Task` and its helpers.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from benchmarks.task_base import Task
from benchmarks.task_base import _normalise_images
from benchmarks.task_base import _pow10
from examples.common import images
from examples.common import models as models_lib
from examples.common import problems
from examples.common import text as text_lib

# The regime tasks' optimisers: every one tuned over powers of ten.
REGIME_OPTS = ("aalig", "alig", "sps", "momo", "sgd_step", "adam", "sf_sgd",
               "sf_adamw")
# The paper's weight-decay grid (Sec. 5.3/5.4), searched on the regime tasks.
PAPER_WDS = (0.0, 1e-5, 1e-4, 1e-3)
# Not in benchmarks.run's default (minutes each): `python -m benchmarks.regime`.
REGIME_TASK_NAMES = ("regime_fmnist_mlp", "regime_tolstoi_lstm")


def _regime_grids(polyak_lo: int = -2, shift: int = 0) -> dict:
  # Four powers of ten each (2 CPU cores), placed where the paper's grids
  # and a 3-epoch probe of this file's tasks put the optima; the Polyak
  # methods' from 10**polyak_lo; `shift` moves every grid but Adam's up
  # that many powers of ten.
  polyak = _pow10(polyak_lo + shift, 1 + shift)  # maximal step sizes
  return {"aalig": polyak, "alig": polyak, "sps": polyak, "momo": polyak,
          "sgd_step": _pow10(-3 + shift, shift),
          "sf_sgd": _pow10(-2 + shift, 1 + shift),
          "adam": _pow10(-4, -1), "sf_adamw": _pow10(-4 + shift, -1 + shift),
          # Untuned (run at their defaults) if asked for.
          "prodigy": (1.0,), "dog": (1.0,), "dadapt": (1.0,)}


def regime_fmnist_mlp_task(seeds: int, epochs: int = 50) -> Task:
  """A 196-32-10 MLP on all of Fashion-MNIST (55,000 train / 5,000 val).

  The images 2x2 mean-pooled to 14x14 (a quarter of the first layer's
  compute); 6,634 parameters for 55,000 images: it cannot reach 100%
  training accuracy, so the per-example losses stay far from zero (no
  interpolation), the regime the paper's Table 1 is about.
  """
  raw = images.load_fashion_mnist()
  n_val = 5000
  perm = np.random.default_rng(0).permutation(raw.num_train)
  va, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
  pool = lambda x: x.reshape(len(x), 14, 2, 14, 2, 1).mean(
      axis=(2, 4), dtype=np.float32)
  x_tr, x_va, x_te = _normalise_images(pool(raw.x_train[tr]),
                                       pool(raw.x_train[va]),
                                       pool(raw.x_test))
  data = dict(x_train=x_tr.reshape(len(tr), -1),
              y_train=raw.y_train[tr].astype(np.int32),
              x_val=x_va.reshape(len(va), -1),
              y_val=raw.y_train[va].astype(np.int32),
              x_test=x_te.reshape(len(x_te), -1),
              y_test=np.asarray(raw.y_test, np.int32))
  hidden, batch = 32, 128
  return Task(
      name="regime_fmnist_mlp", label="MLP 196-32-10, Fashion-MNIST (regime)",
      interpolating=False,
      make_model=lambda seed: models_lib.MLP(196, (hidden,), 10,
                                             rngs=nnx.Rngs(seed)),
      per_example_loss=problems.cross_entropy,
      per_example_metric=problems.accuracy,
      metric="accuracy", higher_is_better=True, data=data, batch_size=batch,
      # From 1e-3: a first run chose 0.01, the grid's lower edge, for AALIG
      # and ALI-G (momentum 0.9 makes 0.01 an effective 0.1).
      epochs=epochs, grids=_regime_grids(polyak_lo=-3),
      weight_decays=PAPER_WDS,
      seeds=seeds, eval_every_epoch=False, eval_batch=5000, sweep_seeds=1,
      notes=(f"Fashion-MNIST, all of it: {len(tr)} train / {len(va)} "
             f"validation (held out of the 60,000 training images) / "
             f"{len(x_te)} test images, 2x2 mean-pooled to 14x14, "
             f"standardised, no augmentation; a 196-{hidden}-10 ReLU MLP "
             f"(6,634 parameters), batch {batch} "
             f"({len(tr) // batch} steps an epoch), {epochs} epochs "
             f"(AALIG's sections: {max(1, epochs // 10)} epochs). Sized "
             f"down from the paper's wide ResNets/DenseNets on CIFAR (and "
             f"the images pooled) so that the whole grid fits 2 CPU cores "
             f"(a 784-32-10 MLP measured 0.5 s per configuration-epoch, "
             f"too slow for the grid); like them it cannot "
             f"interpolate (see its final training accuracy)."))


def regime_tolstoi_lstm_task(seeds: int, epochs: int = 50) -> Task:
  """A 1x32 char LSTM on the first 60,000 characters of War and Peace."""
  seq_len, batch, hidden, embed, max_chars = 50, 50, 32, 16, 60_000
  text = text_lib.load_text("tolstoi", max_chars=max_chars)
  seqs = text.sequences("train", seq_len)
  perm = np.random.default_rng(0).permutation(len(seqs))
  n_val = max(batch, len(seqs) // 10)
  va, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
  test = text.sequences("test", seq_len)
  vocab = len(text.vocab)
  data = dict(x_train=seqs[tr, :-1], y_train=seqs[tr, 1:],
              x_val=seqs[va, :-1], y_val=seqs[va, 1:],
              x_test=test[:, :-1], y_test=test[:, 1:])
  data = {k: np.asarray(v, np.int32) for k, v in data.items()}
  make = lambda seed: models_lib.CharRNN(vocab, hidden, 1, embed_dim=embed,
                                         rngs=nnx.Rngs(seed))
  n_params = models_lib.count_params(make(0))
  return Task(
      name="regime_tolstoi_lstm", label="Char LSTM 1x32, Tolstoi (regime)",
      interpolating=False, make_model=make,
      per_example_loss=problems.sequence_loss,
      per_example_metric=problems.sequence_accuracy,
      metric="accuracy", higher_is_better=True, data=data, batch_size=batch,
      # One power of ten up from the MLP's: a first run chose the upper
      # edge (10; SGD 1, SF-AdamW 0.1) for AALIG, SPS, MoMo, SGD and both
      # schedule-free optimisers, and 0.01 (1e-3 for SGD) was far worst.
      epochs=epochs, grids=_regime_grids(shift=1), weight_decays=PAPER_WDS,
      seeds=seeds, eval_every_epoch=False, eval_batch=500, sweep_seeds=1,
      notes=(f"War and Peace, its first {max_chars:,} characters (the "
             f"first 80% for training and validation, the last 20% for "
             f"test, DeepOBS-style): {len(tr)} train / {len(va)} "
             f"validation sequences of {seq_len} characters, {len(test)} "
             f"test sequences, vocabulary {vocab}; an LSTM of 1 layer x "
             f"{hidden} units, embedding {embed} ({n_params:,} parameters "
             f"for {len(tr) * seq_len:,} training characters), batch "
             f"{batch}, {epochs} epochs (sections of "
             f"{max(1, epochs // 10)}), no regularisation but the weight "
             f"decay. Sized down from the paper's 2x128 LSTM on the whole "
             f"text (3.2M characters): the paper's model costs about 30x "
             f"the compute per character and the whole text 55x the "
             f"characters, far beyond 2 CPU cores for a grid of 50-epoch "
             f"runs (this task measured 0.7 s per configuration-epoch at "
             f"150,000 characters on an idle machine, and the machine was "
             f"shared); it is still far from memorising its "
             f"text (see its final training accuracy)."))


def make_regime_task(name: str, seeds: int) -> Task:
  """The regime task `name`, the same at either scale (the regime is the
  point)."""
  if name == "regime_fmnist_mlp":
    return regime_fmnist_mlp_task(seeds)
  if name == "regime_tolstoi_lstm":
    return regime_tolstoi_lstm_task(seeds)
  raise ValueError(f"unknown regime task {name!r}; one of "
                   f"{REGIME_TASK_NAMES}")
