#!/usr/bin/env bash
# Set up .venv (if missing) with the test requirements and run the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k embed
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_venv.sh" requirements-test.txt
cd "$root"
exec .venv/bin/python -m pytest tests "$@"
