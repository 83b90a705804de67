#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then runs every check and test: cargo fmt, clippy,
# cargo test, ruff, mypy and pytest (benches only smoke-run; `make bench` times them).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
echo "== cargo fmt / clippy / test"
cargo fmt --check
cargo clippy --all-targets -q -- -D warnings
cargo clippy --all-targets --features python -q -- -D warnings
cargo test -q
echo "== ruff / mypy / stubtest"
ruff check python tests benches scripts
ruff format --check python tests benches scripts
mypy
python -m mypy.stubtest attnmap._native
echo "== pytest"
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
pytest "$@"
echo "test.sh: all checks passed in $(( $(date +%s) - start )) s"
