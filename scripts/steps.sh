# Sourced by pipeline.sh and merge.sh (not run on its own): what the two recipes share.
#   use_venv GPU   set up the venv (.venv; .venv-gpu or GPU_VENV when GPU is not empty, the
#                  GPU build: scripts/setup_venv.sh --gpu) and point `py` at its sort_faces.py
#   step ARGS...   one step, `sort_faces.py ARGS...`: exit code 1 (some files unreadable or
#                  damaged, each named in the log) is kept in `status` and the recipe goes on;
#                  any other failure ends the recipe with its code
# Needs `root` (the project folder); the recipe runs the steps from there.
status=0
use_venv() {
    if [ -n "$1" ]; then
        bash "$root/scripts/setup_venv.sh" --gpu
        python="${GPU_VENV:-.venv-gpu}/bin/python"
    else
        bash "$root/scripts/setup_venv.sh" requirements.txt
        python=.venv/bin/python
    fi
    py=("$python" sort_faces.py)
}
step() {
    local rc=0
    "${py[@]}" "$@" || rc=$?
    if [ "$rc" -eq 1 ]; then status=1; elif [ "$rc" -ne 0 ]; then exit "$rc"; fi
}
