"""The benchmark runner: step overhead and optimisation quality, one command.

Run from the project root::

    python -m benchmarks.run                      # everything, CPU scale
    python -m benchmarks.run --only overhead      # the step overhead only
    python -m benchmarks.run --only quality --tasks mf_rank1,rbf_ijcnn1
    python -m benchmarks.run --scale paper        # the paper's settings (GPU)

Results go to ``--out`` (default ``benchmarks/results``): ``results.json``
(every number, every configuration), ``README.md`` (tables, the command, the
machine, the versions, the date) and PNG plots. A run of one part replaces
that part in an existing ``results.json`` and regenerates the report.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from benchmarks import overhead
from benchmarks import quality
from benchmarks import report
from benchmarks import tasks
from examples.common import optimizers
from examples.common import report as report_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def overhead_config(scale: str, tiny: bool, models=None) -> dict:
  cfg = dict(models=["linear", "resnet", "mlp"], batch=128,
             num_examples=50_000,
             optimizers=list(overhead.OVERHEAD_OPTS), warmup=2,
             rounds={"linear": 60, "resnet": 20, "mlp": 40},
             steps_per_round={"linear": 50, "resnet": 2, "mlp": 20},
             part_rounds=40, part_steps_per_round=20,
             big_num_examples=1_281_167,
             # The whole step against the table size (on the model where a
             # per-step cost of the table would show most).
             sweep_models=["linear"],
             table_sizes=[1_000, 100_000, 1_000_000, 10_000_000])
  if scale == "paper":
    cfg.update(rounds={"linear": 100, "resnet": 50, "mlp": 100,
                       "resnet18": 20},
               steps_per_round={"linear": 50, "resnet": 10, "mlp": 20,
                                "resnet18": 5})
  if tiny:
    cfg.update(models=["mlp"], rounds={"mlp": 2}, steps_per_round={"mlp": 1},
               part_rounds=2, part_steps_per_round=2, warmup=1,
               optimizers=["sgd", "aalig", "alig"], big_num_examples=0,
               table_sizes=[1_000, 10_000], sweep_models=["mlp"])
  if models:
    unknown = [m for m in models if m not in cfg["rounds"]]
    if unknown:
      raise ValueError(f"--models: unknown {unknown}; the models of this "
                       f"scale are {sorted(cfg['rounds'])}")
    cfg["models"] = list(models)
  return cfg


def quality_config(args) -> dict:
  names = (args.tasks.split(",") if args.tasks else list(tasks.TASK_NAMES))
  opts = (args.optimizers.split(",") if args.optimizers
          else list(tasks.QUALITY_OPTS))
  return dict(tasks=names, optimizers=opts, scale=args.scale,
              seeds=args.seeds, heavy_seeds=args.heavy_seeds, tiny=args.tiny)


def _rounded(x):
  """`x` with floats kept to 6 significant digits (a smaller results.json)."""
  if isinstance(x, float):
    return float(f"{x:.6g}")
  if isinstance(x, dict):
    return {k: _rounded(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_rounded(v) for v in x]
  return x


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(
      description="AALIG benchmarks: step overhead and optimisation quality.")
  parser.add_argument("--only", choices=["overhead", "quality"], default=None,
                      help="run one part (default: both)")
  parser.add_argument("--scale", choices=["cpu", "paper"], default="cpu",
                      help="cpu: budgets that fit 2 cores (default); paper: "
                      "the paper's settings (200 epochs, CIFAR-100 through "
                      "TFDS, full data), for a GPU")
  parser.add_argument("--models", default="",
                      help="overhead: comma-separated models (default "
                      "linear,resnet,mlp; --scale paper also has resnet18, "
                      "a step of several ms on a GPU)")
  parser.add_argument("--seeds", type=int, default=3,
                      help="seeds of the light tasks (matrix factorisation, "
                      "RBF kernels)")
  parser.add_argument("--heavy-seeds", type=int, default=2,
                      help="seeds of the ResNet and char-RNN tasks")
  parser.add_argument("--tasks", default="",
                      help=f"comma-separated, default {tasks.TASK_NAMES}; "
                      f"also {tasks.SHORT_TASK_NAMES}")
  parser.add_argument("--optimizers", default="",
                      help="comma-separated subset of "
                      f"{tasks.QUALITY_OPTS} (quality)")
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  parser.add_argument("--hlo-dir", default=str(ROOT / "runs" / "benchmarks" /
                                               "hlo"),
                      help="where the compiled HLO of the optimiser parts is "
                      "written (a run's output, not part of the results)")
  parser.add_argument("--tiny", action="store_true",
                      help="a seconds-long smoke run (tests); its numbers "
                      "mean nothing")
  parser.add_argument("--report-only", action="store_true",
                      help="regenerate README.md and the plots from the "
                      "results.json in --out, running nothing")
  args = parser.parse_args(argv)
  if args.seeds < 1 or args.heavy_seeds < 1:
    parser.error("--seeds and --heavy-seeds must be >= 1")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "results.json"
  results = json.loads(path.read_text()) if path.exists() else {}
  if args.report_only:
    report.write(results, out)
    return results
  command = "python -m benchmarks.run " + " ".join(
      argv if argv is not None else sys.argv[1:])
  env = report_lib.environment()
  t_start = time.perf_counter()
  log = lambda msg: print(msg, flush=True)
  log(f"{command.strip()}  [{env['date_utc']}, {env['nproc']} x "
      f"{env['cpu_model']}, {env['backend']}]")
  parts = [args.only] if args.only else ["overhead", "quality"]
  for part in parts:
    t0 = time.perf_counter()
    if part == "overhead":
      try:
        cfg = overhead_config(args.scale, args.tiny, [
            m for m in args.models.split(",") if m])
      except ValueError as e:
        parser.error(str(e))
      res = overhead.run(cfg, log=log)
      hlo_dir = pathlib.Path(args.hlo_dir)
      hlo_dir.mkdir(parents=True, exist_ok=True)
      for model, m in res["models"].items():
        for opt, text in m.pop("hlo_text").items():
          if model == "mlp" or args.tiny:  # The ResNet's is 0.6 MB.
            (hlo_dir / f"{model}_{opt}_opt_part.txt").write_text(text)
    else:
      res = quality.run(quality_config(args), log=log)
    res["wall_s"] = time.perf_counter() - t0
    res["command"] = command.strip()
    res["environment"] = env
    res["scale"] = args.scale
    res["tiny"] = args.tiny
    results[part] = res
    log(f"{part}: {res['wall_s']:.0f} s")
  results["last_run"] = {"command": command.strip(), "environment": env,
                         "parts": parts,
                         "wall_s": time.perf_counter() - t_start}
  results["optimizers"] = {
      k: {"label": v.label, "tuned": v.tuned, "description": v.description}
      for k, v in optimizers.SPECS.items()}
  report_lib.write_files(out, {path.name: _rounded(results)}, indent=None)
  report.write(results, out)
  log(f"done in {results['last_run']['wall_s']:.0f} s; results in {out}")
  return results


if __name__ == "__main__":
  main()
