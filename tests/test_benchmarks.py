"""Smoke test of the benchmark runner: a tiny end-to-end run and its outputs."""

import json
import pathlib

import pytest

run = pytest.importorskip("benchmarks.run")


def test_runner_end_to_end_tiny(tmp_path: pathlib.Path):
  results = run.main(["--tiny", "--tasks", "mf_rank1", "--optimizers",
                      "aalig,sgd_step,prodigy", "--seeds", "2",
                      "--out", str(tmp_path), "--hlo-dir",
                      str(tmp_path / "hlo")])
  for name in ("results.json", "README.md", "overhead.png",
               "quality_curves.png", "quality_sensitivity.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  # HLO text is a run's output, kept apart from the results.
  assert (tmp_path / "hlo" / "mlp_aalig_opt_part.txt").stat().st_size > 0
  assert not (tmp_path / "hlo_text").exists()

  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["overhead"]["tiny"] and saved["quality"]["tiny"]
  assert set(saved) >= {"overhead", "quality", "last_run", "optimizers"}

  mlp = saved["overhead"]["models"]["mlp"]
  assert mlp["step"]["sgd"]["ratio_to_sgd"] == pytest.approx(1.0)
  for opt in ("aalig", "alig"):
    assert mlp["step"][opt]["median_s"] > 0
    assert mlp["hlo_opt_part"][opt]["num_kernels"] > 0

  task = saved["quality"]["tasks"]["mf_rank1"]
  assert set(task["best"]) == {"aalig", "sgd_step", "prodigy"}
  best = task["best"]["aalig"]
  assert best["lr"] in task["grids"]["aalig"]
  assert best["num_seeds"] == 2 and len(best["val_metric"]["values"]) == 2
  # Every (lr, wd, seed) of the grid ran: 2 step sizes x 1 wd x 2 seeds.
  assert len(task["runs"]["aalig"]) == 4
  assert len(task["runs"]["prodigy"]) == 2

  # Sec. 5.1's settings: no momentum, chosen on the training loss, which
  # the report gives against the rank's Eckart-Young floor.
  assert task["momentum"] == 0.0 and task["select_on"] == "train_loss"
  assert task["loss_floor"] == pytest.approx(0.131786, rel=1e-5)
  scores = {}
  for r in task["runs"]["aalig"]:
    scores.setdefault(r["lr"], []).append(r["train_loss"][-1])
  assert best["lr"] == min(scores, key=lambda k: sum(scores[k]))

  text = (tmp_path / "README.md").read_text()
  assert "python -m benchmarks.run --tiny" in text
  assert "vs floor | epoch within 1% |" in text
  assert "Where AALIG loses" in text and "| AALIG |" in text
  assert results["last_run"]["parts"] == ["overhead", "quality"]

  # A run of one part keeps the other part's results.
  run.main(["--tiny", "--only", "overhead", "--out", str(tmp_path),
            "--hlo-dir", str(tmp_path / "hlo")])
  again = json.loads((tmp_path / "results.json").read_text())
  assert "mf_rank1" in again["quality"]["tasks"]
