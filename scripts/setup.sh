#!/usr/bin/env bash
# Sets up a development environment from scratch: a venv in .venv, torch, attnmap built with
# maturin (release) and installed with its dev extras. Safe to run again; each run rebuilds attnmap.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned, so the resolver never swaps it for another build.
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pip install -q "maturin>=1.5,<2"
maturin develop --release --extras "${ATTNMAP_EXTRAS:-triton,models,dev}"
