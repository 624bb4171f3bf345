#!/usr/bin/env bash
# Set up .venv (if missing) with the test requirements and run the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k embed, or scripts/test.sh tests/test_dedup.py
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_venv.sh" requirements-test.txt
# The review-page tests open pages in a real browser: Debian's Chromium.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "note: install Chromium (apt-get install chromium) for the browser tests" >&2
    fi
fi
cd "$root"
for arg in "$@"; do  # paths given: run those instead of the whole tests/ folder
    case "$arg" in tests/*|tests) exec .venv/bin/python -m pytest "$@" ;; esac
done
exec .venv/bin/python -m pytest tests "$@"
