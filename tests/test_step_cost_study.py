"""The step-cost study (studies/step_cost/) and the HLO reader it shares.

Smoke runs of the study's scripts (lean_step, profile_threads, gpu_probe),
the check that its yardstick ``table_floor`` does the work it stands for,
and the HLO parser (`studies/hlo.py`) that the overhead benchmark and the
tests of the compiled step count kernels with.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")


def test_gpu_probe_smoke(tmp_path: pathlib.Path):
  """The probe's variants compile and time. (Since issue 28 AALIG's step has
  no cond to remove: every variant compiles to none.)"""
  probe = pytest.importorskip("studies.step_cost.gpu_probe")
  out = probe.main(["--models", "linear", "--rounds", "1", "--variants",
                    "sgd,aalig,aalig_noswitch,aalig_nocond",
                    "--json", str(tmp_path / "p.json"),
                    "--hlo-dir", str(tmp_path / "hlo")])
  res = out["models"]["linear"]
  for variant in ("aalig", "aalig_noswitch", "aalig_nocond"):
    assert res[variant]["conditionals"] == 0
  assert all(r["median_s"] > 0 for r in res.values())
  assert (tmp_path / "p.json").exists()
  text = (tmp_path / "hlo" / "linear_aalig_nocond_step.txt").read_text()
  assert "ENTRY" in text and " conditional(" not in text


def test_lean_step_smoke(tmp_path: pathlib.Path):
  """Issue 13's step benchmark end to end, in a few steps: every optimiser
  (the baseline tree included) is compiled, counted and timed, and the
  record says how the indices were drawn."""
  from studies.step_cost import lean_step
  root = pathlib.Path(__file__).resolve().parents[1]
  out = tmp_path / "lean.json"
  lean_step.main(["--rounds", "2", "--steps", "2", "--compile-reps", "1",
                  "--n-big", "5000", "--indices", "random", "--baseline",
                  str(root), "--floors", "--json", str(out)])
  res = json.loads(out.read_text())
  names = {"sgd", "polyak_sgd", "polyak_nesterov", "aalig_N1e+03",
           "aalig_N5e+03", "base_aalig_N1e+03", "base_aalig_N5e+03",
           "floor_tables", "floor_tables_cond", "floor_tables_late_cond"}
  assert set(res["hlo_opt_part"]) == names
  assert set(res["step"]["vs_polyak_nesterov"]) == names
  hlo = res["hlo_opt_part"]
  # The tables' size changes no temporary buffer, and nothing is copied.
  assert hlo["aalig_N1e+03"]["temp_bytes"] == hlo["aalig_N5e+03"]["temp_bytes"]
  assert hlo["aalig_N1e+03"]["copies"] == 0
  assert hlo["aalig_N1e+03"] == hlo["base_aalig_N1e+03"]
  assert hlo["polyak_nesterov"]["kernels"] > hlo["polyak_sgd"]["kernels"]
  assert res["environment"]["indices"] == "random"
  assert all(r["median_us"] > 0 for r in res["opt_part"]["vs_sgd"].values())


@pytest.mark.parametrize("section_cond,steps_per_section",
                         [(None, 1), ("early", 1), ("late", 1),
                          ("early", 10**9), ("late", 10**9)])
def test_lean_step_floor_does_the_work_it_stands_for(section_cond,
                                                     steps_per_section):
  """The floor that bounds issue 13's targets is not a stub: it takes the
  Polyak step of the batch's mean gap with Nesterov momentum, writes the
  batch's losses into its table, counts the step, and (with a section cond)
  updates the other table in place when the cond is due."""
  from studies.step_cost import lean_step
  n = 1000
  tx = lean_step.table_floor(n, section_cond, steps_per_section)
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  # ||g||^2 = 42: the step is below its cap, so the gap, the gathered AOVs
  # and the norm all show in the update.
  grads = {"w": jnp.full((3, 2), 2.0), "b": jnp.full(2, -3.0)}
  state = tx.init(params)
  aov = jnp.linspace(0.0, 0.5, n)
  state = ((aov, state[0][1], state[0][2]),) + tuple(state[1:])
  idx = jnp.array([3, 700, 42, 999], jnp.int32)
  losses = jnp.array([2.0, 1.5, 0.25, 3.0])
  update = jax.jit(functools.partial(tx.update, losses=losses, indices=idx))
  updates, new_state = update(grads, state, params)
  gap = float(np.mean(np.asarray(losses) - np.asarray(aov)[np.asarray(idx)]))
  lr = gap / (6 * 4.0 + 2 * 9.0 + 1e-5)
  assert 0 < lr < 0.05
  # Nesterov from a zero trace: (1 + 0.9) times the step.
  expected = jax.tree.map(lambda g: -1.9 * lr * g, grads)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  (new_aov, last, count), _ = new_state
  np.testing.assert_array_equal(np.asarray(last)[np.asarray(idx)], losses)
  assert int(count) == 1
  if section_cond is not None and steps_per_section == 1:  # A section end.
    np.testing.assert_array_equal(new_aov, np.minimum(last, aov))
  else:
    np.testing.assert_array_equal(new_aov, aov)
  compiled = lean_step.opt_part(tx).lower(
      params, state, grads, jnp.float32(1.0), losses, idx).compile()
  counts = lean_step.hlo_counts(compiled)
  assert counts["ops"].get("conditional", 0) == (section_cond is not None)
  # Tables are written in place (a scalar copy of the count at most).
  assert "f32[1000]{0} copy(" not in compiled.as_text()


def test_profile_threads_smoke(tmp_path):
  """The thread profile runs as documented, in a process of its own, and
  finds the kernels of both programs (none would mean the profiler stopped
  recording XLA:CPU's kernels)."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = tmp_path / "threads.json"
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-m", "studies.step_cost.profile_threads",
                  "--steps", "3", "--json", str(out)],
                 cwd=root, env=env, check=True, capture_output=True,
                 timeout=600)
  res = json.loads(out.read_text())
  for name in ("aalig", "floor_tables_late_cond"):
    assert res[name]["per_step"] >= 10, res
    assert 0 < res[name]["on_busiest_thread"] <= res[name]["per_step"]
    assert 0 <= res[name]["overlap_fraction"] <= 1
  assert res["aalig"]["per_step"] > res["floor_tables_late_cond"]["per_step"]


def test_hlo_conditional_branches_reads_both_forms_and_refuses_a_lost_name():
  """A predicate's conditional is read as cond orders it (false first); a
  branch whose body cannot be found raises instead of reading as empty."""
  from studies import hlo
  def comp(name, body):
    return (f"%{name} (a: f32[3]) -> (f32[3]) {{\n  %a = f32[3]{{0}} "
            f"parameter(0)\n{body}  ROOT %r = (f32[3]{{0}}) tuple(%a)\n}}\n\n")
  cond = ("  %c = (f32[3]{0}) conditional(pred[] %p, f32[3]{0} %x, "
          "f32[3]{0} %x), true_computation=%t.1, false_computation=%f.2\n")
  text = ("HloModule m\n\n"
          + comp("t.1", "  %s = f32[3]{0} sine(f32[3]{0} %a)\n")
          + comp("f.2", "")
          + "ENTRY %main (p: pred[], x: f32[3]) -> (f32[3]) {\n"
          "  %p = pred[] parameter(0)\n  %x = f32[3]{0} parameter(1)\n"
          + cond + "}\n")
  assert hlo.conditional_branches(text) == [("(f32[3]{0})", [{}, {"sine": 1}])]
  with pytest.raises(ValueError, match="no computation %t.1"):
    hlo.conditional_branches(text.replace("%t.1 (", "%t.9 ("))


def test_hlo_parser_counts_kernels_as_its_docstring_says():
  """studies.hlo is shared by the reports and the HLO tests: its example
  runs (studies are outside the doctest paths), and an op with a long
  tuple output is counted."""
  import doctest
  from studies import hlo
  from studies.step_cost import profile_threads
  assert doctest.testmod(hlo).failed == 0
  run = doctest.testmod(profile_threads)  # overlap_fraction's example.
  assert run.attempted and not run.failed
  line = ("  %c = (f32[], f32[], f32[], f32[], f32[], /*index=5*/f32[]) "
          "conditional(%p, %a, %b), branch_computations={%x, %y}")
  assert hlo.opcode(line) == "conditional"
  text = "\n".join(["HloModule m", "", "ENTRY %main {", line,
                    "  ROOT %t = () tuple()", "}"])
  assert hlo.entry_kernels(text) == {"conditional": 1}


def test_compare_bits_finds_a_checkout_equal_to_itself(tmp_path):
  """The bit-for-bit comparison of issue 28, run against this checkout's own
  package: every configuration equal (and the script exits 0)."""
  from studies.step_cost import compare_bits
  root = pathlib.Path(__file__).resolve().parents[1]
  out = compare_bits.main(["--baseline", str(root), "--seeds", "1",
                           "--json", str(tmp_path / "bits.json")])
  assert out and not any(out.values()), out
  assert json.loads((tmp_path / "bits.json").read_text()) == out
