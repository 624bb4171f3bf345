#!/usr/bin/env bash
# Create .venv beside sort_faces.py if it is missing, and install a requirements file into it.
# Usage: scripts/setup_venv.sh [requirements file]   (default: requirements.txt)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="${1:-requirements.txt}"
cd "$root"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=".venv/.installed-$(basename "$req")"
# Re-install only when a requirements file changed since the last install.
changed=""
for file in requirements*.txt; do  # (a file may include another)
    if [ "$file" -nt "$stamp" ]; then changed=1; fi
done
if [ ! -f "$stamp" ] || [ -n "$changed" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r "$req"
    touch "$stamp"
fi
