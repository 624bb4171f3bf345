#!/usr/bin/env bash
# Create a venv beside sort_faces.py if it is missing, and install a requirements file into it.
# Usage: scripts/setup_venv.sh [--gpu] [requirements file]
#   (no --gpu)  .venv, with onnxruntime's CPU build (default file: requirements.txt)
#   --gpu       .venv-gpu, with onnxruntime's CUDA build, CUDA and cuDNN from the package index
#               (default file: requirements-gpu.txt; a GPU file is one named *gpu*). The two
#               builds install the same files, so they never share a venv: each install
#               removes the other build if a dependency brought it (insightface depends on
#               `onnxruntime`) and reinstalls its own whole. GPU_VENV=FOLDER: another folder
#               than .venv-gpu.
#   PYTHON=python3.11 scripts/setup_venv.sh   the interpreter that creates the venv (default:
#   python3). face-sets is tested on Python 3.11: older is an error (the pinned packages
#   need 3.11), newer a warning (it may work). PYTHON matters only while the venv is missing.
# What it does goes to stderr, one line each; a wrong Python exits 2 before any install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gpu=""
if [ "${1:-}" = "--gpu" ]; then gpu=1; shift; fi
if [ -n "$gpu" ]; then
    venv="${GPU_VENV:-.venv-gpu}"; req="${1:-requirements-gpu.txt}"
    build=onnxruntime-gpu; other=onnxruntime; size="about 3 GB with CUDA and cuDNN"
else
    venv=".venv"; req="${1:-requirements.txt}"
    build=onnxruntime; other=onnxruntime-gpu; size="about 1 GB"
fi
# The paths in the notes as the user would type them: relative in the project, else absolute.
if [ "$PWD" = "$root" ]; then at=""; else at="$root/"; fi
cd "$root"
[ -f "$req" ] || { echo "error: no requirements file $req in $root" >&2; exit 2; }
case "$(basename "$req")" in
    *gpu*) [ -n "$gpu" ] || { echo "error: $req is the GPU build: it goes into its own venv," \
                                   "bash $(printf %q "${at}scripts/setup_venv.sh") --gpu" >&2
                              exit 2; } ;;
    *) [ -z "$gpu" ] || { echo "error: --gpu installs a GPU requirements file" \
                               "(requirements-gpu.txt, requirements-test-gpu.txt), not $req" >&2
                          exit 2; } ;;
esac
python="${PYTHON:-python3}"
again="PYTHON=python3.11 bash $(printf %q "${at}scripts/setup_venv.sh")${gpu:+ --gpu}${1:+ $(printf %q "$1")}"
created=""
if [ ! -x "$venv/bin/python" ]; then
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
             "work; for 3.11: rm -r $(printf %q "${at}$venv"); $again)" >&2
    fi
    echo "setting up $venv with $version (first run only, $size to download)" >&2
    "$python" -m venv "$venv" || {
        rm -rf "$venv"  # half made (on Debian, the python3-venv package is missing)
        echo "error: $python could not create $venv (the reason is above)" >&2
        exit 2; }
    created=1
elif [ -n "${PYTHON:-}" ]; then
    echo "note: $venv exists ($("$venv/bin/python" --version 2>&1)); PYTHON is used only to" \
         "create it (to change it: rm -r $(printf %q "${at}$venv") first)" >&2
fi
stamp="$venv/.installed-$(basename "$req")"
# Re-install only when a requirements file changed since the last install.
changed=()
if [ -f "$stamp" ]; then
    for file in requirements*.txt; do  # (a file may include another)
        if [ "$file" -nt "$stamp" ]; then changed+=("$file"); fi
    done
fi
if [ ! -f "$stamp" ] || [ ${#changed[@]} -gt 0 ]; then
    if [ ${#changed[@]} -gt 0 ]; then
        echo "updating $venv: ${changed[*]} changed since $req was last installed" >&2
    elif [ -z "$created" ]; then
        echo "installing $req into $venv (first time; up to ${size#about } to download)" >&2
    fi
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -r "$req"
    # onnxruntime and onnxruntime-gpu are one package (onnxruntime/) in two builds: with both
    # installed, whichever was installed last wins file by file. A dependency that names
    # `onnxruntime` (insightface does) brings the CPU build into the GPU venv: remove it, and
    # reinstall this venv's own build whole (removing one build deletes the files they share).
    installed="$("$venv/bin/python" -m pip list --format=freeze 2>/dev/null)" || true
    if grep -q -i -E "^$other==" <<<"$installed"; then
        pin="$(grep -h -E "^$build(\[[a-z,]*\])?==" requirements*.txt | head -n 1 | sed 's/\[.*\]//')"
        echo "$venv: removing $other (a dependency brought it) and reinstalling ${pin:-$build}" \
             "whole: the two builds never share a venv" >&2
        "$venv/bin/python" -m pip uninstall --quiet --yes "$other"
        "$venv/bin/python" -m pip install --quiet --no-deps --force-reinstall "${pin:-$build}"
    fi
    touch "$stamp"
fi
