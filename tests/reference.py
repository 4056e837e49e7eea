"""The one independent NumPy transcription of docs/algorithm.md, for the tests.

Written from the semantics alone (no import of the package), one example at
a time where the text speaks per example, so that the tests compare two separate
readings of the same text. One set of rules (`step_size`, `lowest_per_index`,
`NumpyAalig.section_end`) serves both readers:

- `NumpyAalig`: whole trajectories (step size, records, momentum, sections)
  in float64, for the trajectory tests (tests/test_sections.py);
- `one_update`: one update at the edges (table dtypes, float32 losses,
  non-finite input, out-of-range indices), for the fuzz against the spec
  (tests/test_bad_input.py).
"""

from __future__ import annotations

import math
import warnings

import ml_dtypes
import numpy as np


def step_size(gap, sq, max_lr, eps):
  """gamma = clip(gap / (||g||^2 + eps), 0, max_lr); NaN for a non-finite gap
  or norm (the batch is skipped); 0 where the denominator is below float32's
  machine epsilon."""
  if not (np.isfinite(gap) and np.isfinite(sq)):
    return math.nan
  denom = sq + eps
  if denom <= np.finfo(np.float32).eps:
    return 0.0
  return min(max(gap, 0.0) / denom, max_lr)


def lowest_per_index(rows):
  """Records of (loss, index) rows: a duplicated index keeps its lowest loss
  (the package's documented choice for a case the spec leaves open)."""
  written = {}
  for l, i in rows:
    written[i] = min(l, written.get(i, math.inf))
  return written


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
    gamma = step_size(gap, sq, self.max_lr, self.eps)
    self.step_sizes.append(gamma)
    # Record; a duplicated index keeps its lowest loss.
    for i, l in lowest_per_index(rows).items():
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


def as_float32(losses):
  """Per-example losses as JAX sees them: float32 (x64 off), +-inf beyond."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return np.asarray(losses).astype(np.float64).astype(np.float32)


def one_update(prior, grads, losses, indices, mask, table_dtype, *,
               num_examples, max_lr, eps, lower_bound, steps_per_section,
               skips=True):
  """Expected (step size, skipped, state fields) of one update at the edges.

  `prior` holds float64 copies of the tables and the counters; `table_dtype`
  is the tables' NumPy dtype. `skips`: the core skips a batch with a
  non-finite loss or gradient (and counts it) rather than letting its step
  size become NaN for `optax.apply_if_finite`. Returns a dict; `eager_error`
  is set when an eager update must refuse the batch (an index out of range).
  """
  tmax = float(ml_dtypes.finfo(table_dtype).max)
  idx = [int(i) for i in np.asarray(indices)]  # no wrap: Python ints
  b = len(idx)
  m = [True] * b if mask is None else [bool(x) for x in np.asarray(mask)]
  l32 = as_float32(losses)
  in_range = [0 <= i < num_examples for i in idx]
  valid = [m[r] and in_range[r] for r in range(b)]
  num_invalid = sum(m[r] and not in_range[r] for r in range(b))

  # Step 1-2: gap and gamma.
  rows = [r for r in range(b) if valid[r]]
  g = np.asarray(grads, np.float64)
  sq = float(np.sum(g * g)) if np.all(np.isfinite(g)) else np.nan
  if rows:
    vals = [float(l32[r]) for r in rows]
    if all(np.isfinite(vals)):
      gap = (np.mean(vals) - np.mean([prior["aov"][idx[r]] for r in rows]))
    else:
      gap = np.nan
  else:
    gap = 0.0
  bad = not (np.isfinite(gap) and np.isfinite(sq))
  step = step_size(gap, sq, max_lr, eps)
  skipped = bad and skips

  # Step 3: records. Non-finite losses never; duplicates keep the lowest.
  last = prior["last_loss"].copy()
  if not skipped:
    written = lowest_per_index(
        (float(np.asarray(np.clip(l32[r], -tmax, tmax)).astype(table_dtype)),
         idx[r]) for r in rows if np.isfinite(l32[r]))
    for i, v in written.items():
      last[i] = v

  # Sections: after the last step of a section, update every example
  # recorded in it (the prior state's seen examples were recorded in the
  # current section, and so is the batch).
  count = prior["count"] + (0 if skipped else 1)
  aov, aov_step = prior["aov"].copy(), prior["aov_step"].copy()
  sections, reached_fraction = prior["num_sections"], None
  if not skipped and count % steps_per_section == 0:
    seen = ~np.isnan(last)
    reached = seen & (last <= aov)
    reached_fraction = reached.sum() / max(seen.sum(), 1)
    aov, aov_step = numpy_update_aovs(aov, aov_step, last, lower_bound)
    sections += 1
  return dict(step=step, skipped=skipped, bad=bad, last_loss=last, aov=aov,
              aov_step=aov_step, count=count, num_sections=sections,
              reached_fraction=reached_fraction,
              num_invalid=prior["num_invalid"] + num_invalid,
              eager_error=num_invalid > 0)
