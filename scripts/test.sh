#!/usr/bin/env bash
# Set up .venv (if missing) with the test requirements and run the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k embed, or scripts/test.sh tests/test_dedup.py
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_venv.sh" requirements-test.txt
cd "$root"
for arg in "$@"; do  # paths given: run those instead of the whole tests/ folder
    case "$arg" in tests/*|tests) exec .venv/bin/python -m pytest "$@" ;; esac
done
exec .venv/bin/python -m pytest tests "$@"
