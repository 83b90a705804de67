#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh, and Chromium for the report's browser tests), then runs every
# check and test: cargo fmt, clippy, cargo test, ruff, mypy and pytest (benches only smoke-run;
# `make bench` times them).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
# The report's browser tests drive headless Chromium with Selenium: on Debian or Ubuntu, install Chromium
# and its driver where they are missing (non-interactive; ATTNMAP_NO_APT=1 skips this, and without apt or
# root the tests skip and say why).
have_browser() {
    command -v chromedriver >/dev/null 2>&1 &&
        { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }
}
if [ "${ATTNMAP_NO_APT:-0}" = "0" ] && ! have_browser && command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ]; then sudo_=(); else sudo_=(sudo -n); fi
    echo "test.sh: installing chromium and chromium-driver with apt-get (for the report's browser tests)"
    if ! { "${sudo_[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        "${sudo_[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            chromium chromium-driver; }; then
        echo "test.sh: could not install chromium; the browser tests will skip" >&2
    fi
fi
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
