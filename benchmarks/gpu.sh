#!/usr/bin/env bash
# The step-overhead benchmark and issue 13's lean-step comparison on a GPU, in
# one command that fits a short lease (about 5 minutes on an H200), from the
# project root:
#
#   bash benchmarks/gpu.sh OUT_DIR [BASELINE_CHECKOUT]
#
# OUT_DIR receives results.json, README.md and overhead.png (the overhead part
# of `python -m benchmarks.run --scale paper`: more rounds than the CPU scale,
# and ResNet-18 on 64x64 batches, a step of several ms; MODELS overrides the
# list),
# lean_step_b64.json (`python -m studies.step_cost.lean_step`, the step-cost
# study's tiny model, with BASELINE_CHECKOUT's AALIG timed in the same process
# when given) and gpu.log.
# Each stage has a time limit, so that one slow stage leaves the others their
# time; a stage that fails is reported and the rest still run. Set TESTS to a
# pytest selection (e.g. "tests/test_step_size.py") to also run tests on the GPU.
# Without a GPU it stops with exit status 2 (ALLOW_CPU=1: run on the CPU).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [BASELINE_CHECKOUT]}
base=${2:-}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$out/gpu.log") 2>&1

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@"
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s"
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
  --format=csv || true
"$py" -c "import jax, jaxlib, optax, flax, chex, numpy; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'optax', optax.__version__, 'flax', flax.__version__, 'chex', chex.__version__, 'numpy', numpy.__version__); print(jax.devices())" \
  || exit 1

if [[ -z "${ALLOW_CPU:-}" ]] && ! "$py" -c \
    "import jax, sys; sys.exit(jax.default_backend() == 'cpu')"; then
  echo "JAX sees no GPU here (backend cpu): this script is for a GPU. On the" \
    "CPU, run python -m benchmarks.run --only overhead (ALLOW_CPU=1 runs" \
    "this script anyway)."
  exit 2
fi

lean=(-m studies.step_cost.lean_step --json "$out/lean_step_b64.json")
[[ -n "$base" ]] && lean+=(--baseline "$base")
# First: short, and an incompatibility with this machine's JAX shows here.
stage lean_step "${LEAN_LIMIT:-150}" "$py" "${lean[@]}" || [[ $? == 124 ]] \
  || exit 1
stage overhead "${OVERHEAD_LIMIT:-420}" "$py" -m benchmarks.run \
  --only overhead --scale paper --models "${MODELS:-linear,resnet,mlp,resnet18}" \
  --out "$out" --hlo-dir /tmp/aalig-gpu-hlo
if [[ -n "${TESTS:-}" ]]; then
  # conftest.py picks the CPU unless JAX_PLATFORMS is set: here, the GPU.
  # shellcheck disable=SC2086
  JAX_PLATFORMS=cuda stage tests "${TESTS_LIMIT:-150}" "$py" -m pytest -q \
    -x -p no:cacheprovider $TESTS
fi
ls -la "$out"
