"""Flax NNX models of the AALIG paper's experiments (Sec. 5).

All models take ``rngs: nnx.Rngs`` and map a batch to per-example outputs;
the losses live in :mod:`examples.common.train`.

References:
  Paren, Poudel, Kumar, "Faking Interpolation Until You Make It", Sec. 5;
  He et al., "Deep Residual Learning for Image Recognition" (2016), the CIFAR
  ResNet family; Schneider et al., "DeepOBS" (2019), the Tolstoi char-RNN.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["CharRNN", "LinearFactorisation", "LinearModel", "MLP", "ResNet8",
           "count_params"]


def count_params(model: nnx.Module) -> int:
  """Number of trainable scalars (``nnx.Param`` leaves) in `model`."""
  return sum(int(np.prod(x.shape))
             for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# PyTorch's default nn.Linear weight initialisation, kaiming_uniform_(a=
# sqrt(5)): U(-b, b) with b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 +
# 5)), i.e. b = 1 / sqrt(fan_in) (variance 1 / (3 fan_in)).
torch_linear_init = jax.nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform")


class LinearFactorisation(nnx.Module):
  """x -> W1 W2 x, with W1 in R^{out x k} and W2 in R^{k x in}, no bias.

  The matrix factorisation model of Vaswani et al. (2019) (AALIG paper,
  Eq. 5). ``rank=None`` is the full linear model ("true model") x -> W x.
  The weights start as PyTorch's ``nn.Linear`` (their code):
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn with JAX from `rngs`.

  Args:
    in_dim: input size (6).
    out_dim: output size (10).
    rank: k, or None for the full linear model.
    rngs: initialisation randomness.
    kernel_init: the weights' initialiser (default: PyTorch's, above).
  """

  def __init__(self, in_dim: int, out_dim: int, rank: Optional[int],
               *, rngs: nnx.Rngs, kernel_init=torch_linear_init):
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False,
                                     kernel_init=kernel_init, rngs=rngs)
    if rank is None:
      self.layers = nnx.List([linear(in_dim, out_dim)])
    else:
      self.layers = nnx.List([linear(in_dim, rank), linear(rank, out_dim)])

  def __call__(self, x, train: bool = True):
    del train
    for layer in self.layers:
      x = layer(x)
    return x


class LinearModel(nnx.Module):
  """A linear model with one output (logistic regression on features).

  Args:
    in_dim: number of features.
    use_bias: add a bias (off for kernel models, whose features already
      include each centre's own similarity).
    rngs: initialisation randomness.
    kernel_init: the weights' initialiser: zeros by default (as usual for
      convex problems); :data:`torch_linear_init` for PyTorch's
      ``nn.Linear(in_dim, 1)``, the sls code's RBF-kernel model.
  """

  def __init__(self, in_dim: int, use_bias: bool = True, *,
               rngs: nnx.Rngs, kernel_init=nnx.initializers.zeros):
    self.linear = nnx.Linear(in_dim, 1, use_bias=use_bias,
                             kernel_init=kernel_init, rngs=rngs)

  def __call__(self, x, train: bool = True):
    del train
    return self.linear(x)[..., 0]


class MLP(nnx.Module):
  """A ReLU multi-layer perceptron on flattened inputs.

  Args:
    in_dim: input size after flattening.
    hidden: hidden layer widths.
    out_dim: number of outputs.
    rngs: initialisation randomness.
  """

  def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int,
               *, rngs: nnx.Rngs):
    sizes = [in_dim, *hidden, out_dim]
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x, train: bool = True):
    del train
    x = x.reshape(x.shape[0], -1)
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x)


class _BasicBlock(nnx.Module):
  """Two 3x3 convolutions with batch norm and an identity/1x1 shortcut."""

  def __init__(self, in_ch: int, out_ch: int, stride: int, *,
               rngs: nnx.Rngs):
    conv = lambda i, o, k, s: nnx.Conv(i, o, (k, k), strides=(s, s),
                                       padding="SAME", use_bias=False,
                                       rngs=rngs)
    self.conv1 = conv(in_ch, out_ch, 3, stride)
    self.bn1 = nnx.BatchNorm(out_ch, momentum=0.9, rngs=rngs)
    self.conv2 = conv(out_ch, out_ch, 3, 1)
    self.bn2 = nnx.BatchNorm(out_ch, momentum=0.9, rngs=rngs)
    if stride != 1 or in_ch != out_ch:
      self.shortcut = conv(in_ch, out_ch, 1, stride)
      self.bn_sc = nnx.BatchNorm(out_ch, momentum=0.9, rngs=rngs)
    else:
      self.shortcut = None
      self.bn_sc = None

  def __call__(self, x, train: bool):
    ura = not train
    y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    y = self.bn2(self.conv2(y), use_running_average=ura)
    if self.shortcut is not None:
      x = self.bn_sc(self.shortcut(x), use_running_average=ura)
    return jax.nn.relu(x + y)


class ResNet8(nnx.Module):
  """The AALIG paper's small ResNet: 8 layers, 16 channels in the first.

  A CIFAR-style ResNet (He et al. 2016) with one basic block per stage:
  a 3x3 conv with 16 channels, three stages of 16, 32 and 64 channels
  (strides 1, 2, 2), global average pooling and a linear classifier:
  1 + 3 x 2 + 1 = 8 weight layers, about 78K parameters for 10 classes and
  84K for 100 (the paper: "90K parameters").

  Args:
    num_classes: outputs.
    in_channels: image channels (3 for CIFAR/SVHN, 1 for Fashion-MNIST).
    width: channels in the first layer (16).
    rngs: initialisation randomness.

  Call with ``(images float [B, H, W, C], train: bool)``; ``train=True``
  uses and updates batch statistics.
  """

  def __init__(self, num_classes: int = 10, in_channels: int = 3,
               width: int = 16, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(in_channels, width, (3, 3), padding="SAME",
                         use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
    chans = [width, 2 * width, 4 * width]
    self.blocks = nnx.List([
        _BasicBlock(width, chans[0], 1, rngs=rngs),
        _BasicBlock(chans[0], chans[1], 2, rngs=rngs),
        _BasicBlock(chans[1], chans[2], 2, rngs=rngs)])
    self.head = nnx.Linear(chans[2], num_classes, rngs=rngs)

  def __call__(self, x, train: bool = True):
    x = jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))
    for block in self.blocks:
      x = block(x, train)
    return self.head(jnp.mean(x, axis=(1, 2)))


class ResNet18(nnx.Module):
  """ResNet-18 (He et al. 2016): two basic blocks in each of four stages of
  64, 128, 256 and 512 channels, with a 3x3 stem for small images (no max
  pooling), about 11M parameters: the paper's ImageNet model, sized here for
  the step-overhead benchmark on a GPU.

  Call with ``(images float [B, H, W, C], train: bool)``.
  """

  def __init__(self, num_classes: int = 1000, in_channels: int = 3,
               width: int = 64, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(in_channels, width, (3, 3), padding="SAME",
                         use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
    blocks, ch = [], width
    for k, stride in enumerate((1, 2, 2, 2)):
      out = width * 2**k
      blocks += [_BasicBlock(ch, out, stride, rngs=rngs),
                 _BasicBlock(out, out, 1, rngs=rngs)]
      ch = out
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(ch, num_classes, rngs=rngs)

  def __call__(self, x, train: bool = True):
    x = jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))
    for block in self.blocks:
      x = block(x, train)
    return self.head(jnp.mean(x, axis=(1, 2)))


class CharRNN(nnx.Module):
  """A character-level LSTM language model (DeepOBS Tolstoi, AALIG Sec. 5.4).

  Embedding, `num_layers` stacked LSTMs of `hidden` units, and a linear
  read-out to the vocabulary: the paper's "2 layers, 128 hidden units".
  (DeepOBS adds dropout 0.2; the paper trains Tolstoi with no
  regularisation, which is what this model does.)

  Args:
    vocab_size: number of symbols.
    hidden: units per layer (128).
    num_layers: stacked LSTM layers (2).
    embed_dim: embedding size (default `hidden`).
    rngs: initialisation randomness.

  Call with ``(ids int [B, T])``; returns logits [B, T, vocab_size].
  """

  def __init__(self, vocab_size: int, hidden: int = 128, num_layers: int = 2,
               embed_dim: Optional[int] = None, *, rngs: nnx.Rngs):
    embed_dim = embed_dim or hidden
    self.hidden = hidden
    self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
    self.layers = nnx.List([
        nnx.RNN(nnx.OptimizedLSTMCell(embed_dim if i == 0 else hidden, hidden,
                                      rngs=rngs))
        for i in range(num_layers)])
    self.head = nnx.Linear(hidden, vocab_size, rngs=rngs)

  def __call__(self, ids, train: bool = True):
    del train
    x = self.embed(ids)
    for layer in self.layers:
      # An explicit zero carry: the default would draw it from an RNG stream,
      # which cannot be mutated inside a jitted step.
      zeros = jnp.zeros(x.shape[:1] + (self.hidden,), x.dtype)
      x = layer(x, initial_carry=(zeros, zeros))
    return self.head(x)
