#!/usr/bin/env bash
# Set up .venv (if missing) with the test requirements and run the test suite.
#   scripts/test.sh            the whole suite (what CI runs)
#   scripts/test.sh --fast     the quick tier: no model, no browser (pytest -m fast)
#   scripts/test.sh --gpu ...  the same with the GPU build, in .venv-gpu (setup_venv.sh --gpu);
#                              on a machine without a GPU it runs on the CPU, with the same results
# Other arguments go to pytest, e.g. scripts/test.sh -k embed, or scripts/test.sh tests/test_dedup.py
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python=.venv/bin/python
if [ "${1:-}" = "--gpu" ]; then
    shift
    bash "$root/scripts/setup_venv.sh" --gpu requirements-test-gpu.txt
    python="${GPU_VENV:-.venv-gpu}/bin/python"
else
    bash "$root/scripts/setup_venv.sh" requirements-test.txt
fi
cd "$root"
if [ "${1:-}" = "--fast" ]; then
    shift
    exec "$python" -m pytest tests -m fast "$@"
fi
# The review-page tests open pages in a real browser: Debian's Chromium, driven
# by Selenium through Debian's ChromeDriver (chromium-driver) where they click.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Debian's chromium and chromium-driver for the review-page tests" \
             "(apt-get, as root)" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            chromium chromium-driver >/dev/null
    else
        echo "note: Chromium or ChromeDriver is not installed: the review-page tests will" \
             "fail saying so (apt-get install chromium chromium-driver)" >&2
    fi
fi
for arg in "$@"; do  # paths given: run those instead of the whole tests/ folder
    case "$arg" in tests/*|tests) exec "$python" -m pytest "$@" ;; esac
done
exec "$python" -m pytest tests "$@"
