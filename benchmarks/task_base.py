"""What the quality and regime task catalogues share: the Task record.

:mod:`benchmarks.tasks` (the paper's problems) and
:mod:`benchmarks.regime_tasks` (the regime in miniature) both build
:class:`Task` records with these helpers; keeping them here lets
``tasks.make_task`` dispatch to the regime tasks without an import circle.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np
from flax import nnx

from examples.common import optimizers
from examples.common import problems


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
  loop_steps: bool = False  # see engine.Programs.epoch_fn
  # Nesterov momentum of aalig, alig and sgd (Sec. 5.1's problems: none).
  momentum: float = 0.9
  # What picks each optimiser's configuration: the final validation metric,
  # or (the paper's Figure 2, an optimisation result) the training loss.
  select_on: str = "val_metric"
  # The lowest reachable training loss, where known (matrix factorisation).
  loss_floor: Optional[float] = None
  notes: str = ""

  @property
  def num_train(self) -> int:
    return int(self.data["x_train"].shape[0])

  @property
  def ctx(self) -> optimizers.RunContext:
    """The run of every configuration: N // B full batches an epoch."""
    return optimizers.RunContext.create(self.num_train, self.batch_size,
                                        self.epochs, drop_remainder=True)

  @property
  def steps_per_epoch(self) -> int:
    return self.ctx.steps_per_epoch


def _normalise_images(x_tr, *others):
  mean, std = problems.channel_stats(x_tr)
  return [(x.astype(np.float32) / 255.0 - mean) / std
          for x in (x_tr,) + others]
