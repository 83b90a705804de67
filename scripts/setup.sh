#!/usr/bin/env bash
# Sets up a development environment from scratch: a venv in .venv, torch, attnmap built with
# maturin (release) and installed with its dev extras (Selenium among them). Safe to run again; each
# run rebuilds attnmap.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch is pinned for every pip call (maturin's too), so no dependency swaps it for another build.
export PIP_CONSTRAINT="$PWD/scripts/constraints.txt"
python -c "import torch" 2>/dev/null || pip install -q torch
pip install -q "maturin>=1.5,<2"
maturin develop --release --extras "${ATTNMAP_EXTRAS:-triton,models,dev}"
