"""Packaging: declared floors equal the floor check; pytest's warning filters.

`.ci/floor` installs exactly the pins of `.ci/floor-constraints.txt` and runs
the core tests; pyproject.toml's ">=" floors must equal those pins, so that a
declared minimum is always one that was tested.
"""

import pathlib
import subprocess
import sys
import textwrap
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / ".ci" / "floor-constraints.txt"


def _pins():
  pins = {}
  for line in CONSTRAINTS.read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
      req = Requirement(line)
      (spec,) = req.specifier
      assert spec.operator == "==", line
      pins[req.name.lower()] = Version(spec.version)
  return pins


def _floors():
  """{name: [floor, ...]} over dependencies and every extra."""
  project = tomllib.loads(PYPROJECT.read_text())["project"]
  reqs = list(project["dependencies"])
  for extra in project["optional-dependencies"].values():
    reqs += extra
  floors = {}
  for line in reqs:
    req = Requirement(line)
    floors.setdefault(req.name.lower(), [])
    floors[req.name.lower()] += [Version(s.version) for s in req.specifier
                                 if s.operator == ">="]
  return project, floors


def test_pyproject_floors_equal_the_floor_check_pins():
  project, floors = _floors()
  pins = _pins()
  for line in project["dependencies"]:  # every runtime dependency is tested
    assert Requirement(line).name.lower() in pins, line
  assert pins["jaxlib"] == pins["jax"]  # jax pins its own jaxlib
  for name, pin in pins.items():
    if name == "jaxlib":
      continue
    assert name in floors, f"{name} is pinned but not declared"
    assert floors[name] and all(f == pin for f in floors[name]), (
        f"{name}: pyproject floors {floors[name]} != floor pin {pin}")


def test_requires_python_is_a_tested_floor():
  project, _ = _floors()
  assert project["requires-python"] == ">=3.11"  # jax>=0.7 needs 3.11
  assert sys.version_info >= (3, 11)


def test_deprecation_warnings_from_our_package_are_errors(tmp_path):
  """pyproject's filterwarnings, run by a real pytest: ours fail, others pass.

  The module field of a filter is matched against the module a warning is
  attributed to (its caller's, for stacklevel=2), so each probe names one.
  """
  probe = tmp_path / "test_probe.py"
  probe.write_text(textwrap.dedent("""
      import warnings

      def _warn(module):
        warnings.warn_explicit("old", DeprecationWarning, module + ".py", 1,
                               module=module)

      def test_package():
        _warn("aalig_optax")

      def test_submodule():
        _warn("aalig_optax._aalig")

      def test_tests():
        _warn("tests.test_core")

      def test_third_party():
        _warn("jax._src.deprecations")

      def test_lookalike():
        _warn("aalig_optax_extra")

      def test_other_warning_kinds_unaffected():
        warnings.warn_explicit("x", UserWarning, "aalig_optax.py", 1,
                               module="aalig_optax")
  """))
  run = subprocess.run(
      [sys.executable, "-m", "pytest", "-c", str(PYPROJECT),
       "--rootdir", str(tmp_path), "-q", "-rA", "-p", "no:randomly",
       str(probe)],
      cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
  out = run.stdout + run.stderr
  outcome = {}
  for line in out.splitlines():
    word, _, rest = line.partition(" ")
    if word in ("PASSED", "FAILED") and "::" in rest:
      outcome[rest.split("::")[1].split()[0]] = word
  assert outcome == {
      "test_package": "FAILED",
      "test_submodule": "FAILED",
      "test_tests": "FAILED",
      "test_third_party": "PASSED",
      "test_lookalike": "PASSED",
      "test_other_warning_kinds_unaffected": "PASSED",
  }, out
  assert "DeprecationWarning: old" in out, out
