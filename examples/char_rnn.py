"""Character-level language model on War and Peace (DeepOBS Tolstoi, Sec. 5.4).

A 2-layer LSTM with 128 hidden units predicts the next character; batch 50
sequences of 50 characters, no regularisation, as in the AALIG paper's
Tolstoi experiment (where AALIG beat every single-hyperparameter baseline by
over 1% test accuracy; it is not an interpolation problem). An example is a
sequence (non-overlapping 51-character windows of the training text), so an
AOV is the optimal value of a sequence's mean per-character loss.

Data: ``war-and-peace.txt`` from ``--data-dir`` or ``$AALIG_DATA_DIR``,
else downloaded (Project Gutenberg #2600), with
DeepOBS's split (the last 20% is the test set); ``--dataset
tiny_shakespeare`` is the small fallback.

Run (offline default: the first 300,000 characters, 3 epochs, aalig / adam /
sgd, a few minutes on 2 CPU cores)::

    python -m examples.char_rnn
    python -m examples.char_rnn --paper     # full text, 150 epochs, for a GPU

References:
  Paren, Poudel, Kumar, "Faking Interpolation Until You Make It", Sec. 5.4,
  Table 2; Schneider et al., "DeepOBS" (2019), the ``tolstoi_char_rnn``
  problem.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time

from examples.common import cli
from examples.common import data as data_lib
from examples.common import loop
from examples.common import models
from examples.common import optimizers
from examples.common import problems
from examples.common import report
from examples.common import text as text_lib

# Powers of ten; AALIG's maximal step size is large because the Polyak step
# clips it early in training and shrinks itself near the AOVs.
DEFAULT_LRS = {"aalig": 1.0, "alig": 1.0, "sps": 1.0, "adam": 3e-3,
               "sgd": 1.0}


@dataclasses.dataclass(frozen=True)
class Preset:
  epochs: int = 3
  batch_size: int = 50
  optimisers: str = "aalig,adam,sgd"
  max_chars: int = 300_000  # Use the first N characters (0: all).
  max_test_seqs: int = 2000  # 0: all.


CPU = Preset()
# Full text, 150 epochs, all optimisers.
PAPER = Preset(epochs=150, optimisers=",".join(optimizers.OPTIMISERS),
               max_chars=0, max_test_seqs=0)
PRESETS = {"CPU": CPU, "PAPER": PAPER}


def make_problem(name: str = "tolstoi", seq_len: int = 50, hidden: int = 128,
                 num_layers: int = 2, max_chars=None, max_test_seqs=None,
                 data_dir=None) -> problems.Problem:
  """The next-character prediction problem on text `name`.

  Args:
    name: ``tolstoi`` or ``tiny_shakespeare``.
    seq_len: characters per sequence (50).
    hidden: LSTM units per layer (128).
    num_layers: LSTM layers (2).
    max_chars: use only the first characters of the text.
    max_test_seqs: keep at most this many test sequences.
    data_dir: a folder with the text, looked in first (then as
      :func:`examples.common.text.load_text`).

  Returns:
    A :class:`~examples.common.problems.Problem` over sequences.
  """
  text = text_lib.load_text(name, data_dir=data_dir, max_chars=max_chars)
  tr = text.sequences("train", seq_len)
  te = text.sequences("test", seq_len)[:max_test_seqs]
  data = data_lib.ArrayDataset(tr[:, :-1], tr[:, 1:], te[:, :-1], te[:, 1:],
                               len(text.vocab), name)
  vocab = len(text.vocab)
  return problems.Problem(
      data=data,
      make_model=lambda rngs: models.CharRNN(vocab, hidden, num_layers,
                                             rngs=rngs),
      per_example_loss=problems.sequence_loss,
      accuracy=problems.sequence_accuracy, name=name)


def main(argv=None):
  parser = cli.make_parser(__doc__, presets=PRESETS, workdir="runs/char_rnn")
  parser.add_argument("--dataset", default="tolstoi",
                      choices=("tolstoi", "tiny_shakespeare"))
  parser.add_argument("--data-dir", default=None,
                      help="folder with the text (default: $AALIG_DATA_DIR, "
                      "else the verified download cache)")
  parser.add_argument("--seq-len", type=int, default=50)
  parser.add_argument("--hidden", type=int, default=128)
  cli.preset_arg(parser, "--max-chars", PRESETS, type=int,
                 help="use the first N characters (0: all)")
  cli.preset_arg(parser, "--max-test-seqs", PRESETS, type=int, help="0: all")
  parser.add_argument("--momentum", type=float, default=0.9)
  args = cli.parse(parser, argv, PRESETS)
  cli.check_workdir(args)
  with cli.clear_errors():
    problem = make_problem(args.dataset, args.seq_len, args.hidden,
                           max_chars=args.max_chars or None,
                           max_test_seqs=args.max_test_seqs or None,
                           data_dir=args.data_dir)
  configs = cli.optimiser_configs(
      args, DEFAULT_LRS, common=dict(momentum=args.momentum),
      adam=dict(momentum=0.0), sps=dict(momentum=0.0))
  d = problem.data
  print(f"{args.dataset}: {d.num_train} train / {len(d.y_test)} test "
        f"sequences of {args.seq_len} characters, vocab {d.num_classes}")
  workdir = pathlib.Path(args.workdir)
  t_start = time.time()
  rows, histories = loop.compare_classifiers(
      functools.partial(loop.train_supervised, problem), d.num_train,
      configs, args, args.dataset,
      val_label="test accuracy (per character)",
      title=f"2-layer LSTM on {args.dataset}")
  report.summarise(
      workdir, f"Char-RNN on {args.dataset}, {args.epochs} epochs, batch "
      f"{args.batch_size}, {time.time() - t_start:.0f} s", rows,
      ["optimiser", "train_loss", "test_loss", "test_acc", "best_test_acc",
       "seconds"], histories, f"Plot: {workdir / (args.dataset + '.png')}")
  return rows


if __name__ == "__main__":
  main()
