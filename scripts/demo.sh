#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then runs the demo: synthetic shapes captured through
# torch's SDPA, stored, analysed and rendered into ${1:-demo_out}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
attnmap-render demo --output "${1:-demo_out}"
