#!/usr/bin/env bash
# Create .venv beside sort_faces.py if it is missing, and install a requirements file into it.
# Usage: scripts/setup_venv.sh [requirements file]   (default: requirements.txt)
#   PYTHON=python3.11 scripts/setup_venv.sh   the interpreter that creates .venv (default:
#   python3). face-sets is tested on Python 3.11: older is an error (the pinned packages
#   need 3.11), newer a warning (it may work). PYTHON matters only while .venv is missing.
# What it does goes to stderr, one line each; a wrong Python exits 2 before any install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="${1:-requirements.txt}"
# The paths in the notes as the user would type them: relative in the project, else absolute.
if [ "$PWD" = "$root" ]; then at=""; else at="$root/"; fi
cd "$root"
[ -f "$req" ] || { echo "error: no requirements file $req in $root" >&2; exit 2; }
python="${PYTHON:-python3}"
again="PYTHON=python3.11 bash $(printf %q "${at}scripts/setup_venv.sh")${1:+ $(printf %q "$1")}"
created=""
if [ ! -x .venv/bin/python ]; then
    version="not found"
    if command -v "$python" >/dev/null; then
        version="$("$python" --version 2>&1 | head -n 1)" || true
    fi
    [[ "$version" =~ ^Python\ 3\.([0-9]+) ]] || {
        echo "error: no Python 3 at PYTHON=$python ($version): install Python 3.11 and" \
             "name it: $again" >&2
        exit 2; }
    minor="${BASH_REMATCH[1]}"
    if [ "$minor" -lt 11 ]; then
        echo "error: $python is $version; face-sets needs Python 3.11 (its pinned packages" \
             "need 3.11 or newer): install it and name it: $again" >&2
        exit 2
    elif [ "$minor" -gt 11 ]; then
        echo "warning: $python is $version; face-sets is tested on Python 3.11 (this may" \
             "work; for 3.11: rm -r $(printf %q "${at}.venv"); $again)" >&2
    fi
    echo "setting up .venv with $version (first run only, about 1 GB to download)" >&2
    "$python" -m venv .venv || {
        rm -rf .venv  # half made (on Debian, the python3-venv package is missing)
        echo "error: $python could not create .venv (the reason is above)" >&2
        exit 2; }
    created=1
elif [ -n "${PYTHON:-}" ]; then
    echo "note: .venv exists ($(.venv/bin/python --version 2>&1)); PYTHON is used only to" \
         "create it (to change it: rm -r $(printf %q "${at}.venv") first)" >&2
fi
stamp=".venv/.installed-$(basename "$req")"
# Re-install only when a requirements file changed since the last install.
changed=()
if [ -f "$stamp" ]; then
    for file in requirements*.txt; do  # (a file may include another)
        if [ "$file" -nt "$stamp" ]; then changed+=("$file"); fi
    done
fi
if [ ! -f "$stamp" ] || [ ${#changed[@]} -gt 0 ]; then
    if [ ${#changed[@]} -gt 0 ]; then
        echo "updating .venv: ${changed[*]} changed since $req was last installed" >&2
    elif [ -z "$created" ]; then
        echo "installing $req into .venv (first time; up to 1 GB to download)" >&2
    fi
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r "$req"
    touch "$stamp"
fi
