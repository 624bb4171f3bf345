# Sourced by pipeline.sh and merge.sh (not run on its own): what the two recipes share.
#   source_folder ARG  the photo folder ARG, absolute (on stdout), or one line why not (exit 2)
#   check_name NAME    NAME names work/cache/NAME.npz and work/out/NAME/: a plain name, or
#                      one line why not (exit 2)
#   use_venv GPU       set up the venv (.venv; .venv-gpu or GPU_VENV when GPU is not empty, the
#                      GPU build: scripts/setup_venv.sh --gpu) and point `py` at its sort_faces.py
#   check_args VAR ARGS...  a step's words checked before any step runs (its parser checks
#                      every word and option value, and nothing runs: FACESETS_CHECK_ONLY), or
#                      its one line, a line naming VAR (the variable the words came from), and
#                      exit 2: REFINE_ARGS="--min-faces 0" stops before embed
#   step ARGS...       one step, `sort_faces.py ARGS...`: exit code 1 (some files unreadable
#                      or damaged, each named in the log) is kept in `status` and the recipe
#                      goes on; any other failure ends the recipe with its code
# Needs `root` (the project folder). The steps run in the folder the recipe was started in,
# their paths (`at`: "" in the project folder, else the project's absolute path) as typed
# there, so that every command they print runs as pasted where the user is.
status=0
if [ "$PWD" = "$root" ]; then at=""; else at="$root/"; fi
source_folder() {
    if [ -d "$1" ]; then
        (CDPATH='' cd -- "$1" >/dev/null && pwd)
    elif [ -e "$1" ]; then
        echo "error: $1 is a file, not a folder: give the folder that holds the photos" >&2
        return 2
    else
        echo "error: source folder not found: $1" >&2
        return 2
    fi
}
check_name() {
    case "$1" in
        ""|.|..|*/*) echo "error: the name '$1' is not a plain name (it names" \
                          "work/cache/NAME.npz and work/out/NAME/): give one that is not" \
                          ". or .. and has no /" >&2
                     return 2 ;;
    esac
}
use_venv() {
    if [ -n "$1" ]; then
        bash "$root/scripts/setup_venv.sh" --gpu
        python="${GPU_VENV:-.venv-gpu}/bin/python"
    else
        bash "$root/scripts/setup_venv.sh" requirements.txt
        python=.venv/bin/python
    fi
    case "$python" in /*) ;; *) python="$root/$python" ;; esac
    if [ -z "$at" ]; then python="${python#"$root/"}"; fi
    py=("$python" "${at}sort_faces.py")
}
check_args() {
    local var="$1" said
    shift
    said="$(FACESETS_CHECK_ONLY=1 "${py[@]}" "$@" 2>&1 >/dev/null)" || {
        printf '%s\n(those are the words of %s)\n' "$said" "$var" >&2; exit 2; }
}
step() {
    local rc=0
    "${py[@]}" "$@" || rc=$?
    if [ "$rc" -eq 1 ]; then status=1; elif [ "$rc" -ne 0 ]; then exit "$rc"; fi
}
