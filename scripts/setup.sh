#!/usr/bin/env bash
# Sets up a development environment from scratch: Chromium for the browser tests, a venv in .venv,
# torch, attnmap built with maturin (release) and installed with its dev extras (Selenium among them).
# Safe to run again; each run rebuilds attnmap.
set -euo pipefail
cd "$(dirname "$0")/.."
# The report's browser tests drive headless Chromium with Selenium: on Debian or Ubuntu, install Chromium
# and its driver where they are missing (non-interactive; ATTNMAP_NO_APT=1 skips this, and without apt or
# root the tests skip and say why).
have_browser() {
    command -v chromedriver >/dev/null 2>&1 &&
        { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }
}
if [ "${ATTNMAP_NO_APT:-0}" = "0" ] && ! have_browser && command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ]; then sudo_=(); else sudo_=(sudo -n); fi
    echo "setup.sh: installing chromium and chromium-driver with apt-get (for the report's browser tests)"
    if ! { "${sudo_[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        "${sudo_[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            chromium chromium-driver; }; then
        echo "setup.sh: could not install chromium; the browser tests will skip" >&2
    fi
fi
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
