#!/usr/bin/env bash
# Builds the documentation site, warnings as errors:
#   bash docs/build.sh [OUTDIR]        (default: docs/_build/html)
# Needs the package and its docs extra: pip install -e ".[docs]"
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m sphinx -W --keep-going -b html docs "${1:-docs/_build/html}"
