"""An independent NumPy transcription of docs/algorithm.md, for the tests.

Written from the semantics alone (no import of the package), one example at
a time where the text speaks per example, so that the tests compare two separate
readings of the same text.
"""

from __future__ import annotations

import math

import numpy as np


class NumpyAalig:
  """AALIG of docs/algorithm.md: step size, records, momentum, sections."""

  def __init__(self, max_lr, num_examples, steps_per_epoch, epochs_per_section,
               momentum=0.9, weight_decay=0.0, lower_bound=0.0, eps=1e-5,
               loss_estimate="last"):
    self.max_lr = max_lr
    self.n = num_examples
    self.steps_per_epoch = steps_per_epoch
    self.epochs_per_section = epochs_per_section
    self.mu = momentum
    self.wd = weight_decay
    self.b_low = lower_bound
    self.eps = eps
    self.estimate = loss_estimate
    self.aov = [float(lower_bound)] * num_examples
    self.aov_step = [0.0] * num_examples
    self.last_loss = [math.nan] * num_examples
    self.best_loss = [math.nan] * num_examples
    self.epoch_losses = []
    self.best_epoch_mean = math.inf
    self.recorded = set()  # examples recorded in the current section
    self.v = None
    self.t = 0
    self.step_sizes = []

  def step(self, w, grad, losses, indices, mask=None):
    """One step on flat params `w` with gradient `grad` of mean(losses)."""
    if mask is None:
      mask = [True] * len(losses)
    rows = [(float(l), int(i)) for l, i, m in zip(losses, indices, mask) if m]
    if rows:
      mean_loss = sum(l for l, _ in rows) / len(rows)
      mean_aov = sum(self.aov[i] for _, i in rows) / len(rows)
      gap = mean_loss - mean_aov
    else:
      gap = 0.0
    sq = float(np.sum(np.asarray(grad, np.float64) ** 2))
    gamma = min(max(gap / (sq + self.eps), 0.0), self.max_lr)
    self.step_sizes.append(gamma)
    # Record; a duplicated index keeps its lowest loss (the package's
    # documented choice for a case the spec leaves open).
    written = {}
    for l, i in rows:
      written[i] = min(l, written.get(i, math.inf))
    for i, l in written.items():
      self.last_loss[i] = l
      self.recorded.add(i)
    self.epoch_losses.extend(l for l, _ in rows)
    # Momentum form of the released code; weight decay outside the buffer.
    w = np.asarray(w, np.float64)
    g = np.asarray(grad, np.float64)
    if self.v is None:
      self.v = np.zeros_like(w)
    self.v = self.mu * self.v - gamma * g
    w = w - gamma * (g + self.wd * w) + self.mu * self.v
    self.t += 1
    if self.estimate == "best_epoch" and self.t % self.steps_per_epoch == 0:
      if self.epoch_losses:
        mean = sum(self.epoch_losses) / len(self.epoch_losses)
        if mean < self.best_epoch_mean:
          self.best_epoch_mean = mean
          self.best_loss = list(self.last_loss)
      self.epoch_losses = []
    if self.t % (self.steps_per_epoch * self.epochs_per_section) == 0:
      est = self.best_loss if self.estimate == "best_epoch" else self.last_loss
      self.section_end(est)
      self.best_epoch_mean = math.inf
    return w

  def section_end(self, estimate, examples=None):
    """Moves the AOVs of `examples` (those recorded in the section, by
    default), each by its estimate."""
    if examples is None:
      examples, self.recorded = sorted(self.recorded), set()
    for z in examples:
      l = estimate[z]
      if math.isnan(l):
        continue  # no estimate: unchanged
      if l <= self.aov[z]:  # reached
        self.aov[z] = max(self.aov[z] - self.aov_step[z] / 2, self.b_low)
      else:
        old = self.aov[z]
        self.aov[z] = (old + l) / 2
        self.aov_step[z] = (l - old) / 2


def numpy_update_aovs(aov, aov_step, estimate, lower_bound):
  """The section-end rule of docs/algorithm.md, one example at a time."""
  ref = NumpyAalig(1.0, len(aov), 1, 1, lower_bound=lower_bound)
  ref.aov = [float(a) for a in aov]
  ref.aov_step = [float(d) for d in aov_step]
  ref.section_end([float(l) for l in estimate], examples=range(len(aov)))
  return np.array(ref.aov), np.array(ref.aov_step)
