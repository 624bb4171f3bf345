#!/usr/bin/env bash
# The GPU check (issue 33), for a machine with an NVIDIA GPU: sets up the GPU venv
# (scripts/setup_venv.sh --gpu: .venv-gpu, or GPU_VENV), then embeds the 12 MP phone photos
# (phone_photos.py) and the shared photos twice each, with CUDA (the default providers: the
# model server a GPU fed by a decode worker a core) and with the CPU pool (--providers
# CPUExecutionProvider: a worker a core, each decoding and running the model), and prints for
# each: img/s of both, the GPU's utilisation during the CUDA run (nvidia-smi, sampled every
# 200 ms), and whether the two runs found the same faces (tests/same_faces.py). The last line
# is the one-line summary. Made to finish within 8 minutes on one GPU and 16 cores, once the
# venv is set up (the first setup downloads about 3 GB).
#
#   bash tests/benchmarks/gpu_check.sh [--photos N] [--model MODEL] [--keep DIR]
#     --photos N     phone photos (default 480)
#     --model MODEL  embed's --model (default auto: buffalo_l where it is on disk or can be
#                    downloaded, else buffalo_s), resolved once for every run
#     --keep DIR     make the photos and caches in DIR and keep them (default: a temporary
#                    folder, removed at the end)
#
# The machine needs the NVIDIA driver (CUDA 13: driver 580 or newer), Python 3.11 and the
# package index, or the wheels at hand: on a machine that cannot reach the index, download them
# elsewhere (`pip download -r requirements-gpu.txt -d wheels`, on Linux x86_64 with Python
# 3.11) and run `PIP_NO_INDEX=1 PIP_FIND_LINKS=wheels bash tests/benchmarks/gpu_check.sh`.
# Offline, `auto` is buffalo_s; for buffalo_l put its ONNX files in ~/.insightface/models/.
#
# Without an NVIDIA GPU (nvidia-smi finds none) it says so on its first line and runs everything
# all the same: the CUDA half asks for CUDA, which falls back to the CPU (the run's fallback
# line gives onnxruntime's reason), in the GPU's shape forced on (FACESETS_PIPELINE=server), so
# the whole check runs end to end; its figures are then not a GPU's, and the summary says
# "NO GPU".
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
photos=480 model=auto keep=""
while [ $# -gt 0 ]; do
    case "$1" in
        --photos) photos="$2"; shift 2 ;;
        --model) model="$2"; shift 2 ;;
        --keep) keep="$2"; shift 2 ;;
        *) echo "usage: $0 [--photos N] [--model MODEL] [--keep DIR]" >&2; exit 2 ;;
    esac
done
started=$(date +%s)
cd "$root"
bash scripts/setup_venv.sh --gpu
py="${GPU_VENV:-.venv-gpu}/bin/python"
if [ -n "$keep" ]; then
    work="$keep"; mkdir -p "$work"
else
    work="$(mktemp -d -t gpu-check-XXXXXX)"; trap 'rm -rf "$work"' EXIT
fi
gpu="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
       | head -n 1)" || gpu=""
cores="$(nproc)"
if [ -n "$gpu" ]; then
    echo "gpu_check: $gpu; $cores cores; $("$py" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_device())')"
    shape=auto
else
    echo "gpu_check: NO NVIDIA GPU here (nvidia-smi finds none): the CUDA half falls back to the" \
         "CPU, in the GPU's shape (FACESETS_PIPELINE=server); its figures are not a GPU's. $cores cores"
    gpu="NO GPU"
    shape=server
fi
pack="$("$py" -c 'import sys, sort_faces; print(sort_faces.resolve_model(sys.argv[1])[1])' "$model")"
echo "model: $pack"
"$py" tests/benchmarks/phone_photos.py "$work/phone" "$photos" "$cores"
shared="$(cd ../shared/data/faces && pwd)"

embed() {  # embed SRC CACHE [FLAGS...]: the run's lines, then "img/s" on the last line
    local src="$1" cache="$2"; shift 2
    rm -rf "$cache" "$cache".*
    local out
    out="$("$py" sort_faces.py embed "$src" "$cache" --model "$pack" "$@" 2>"$cache.err")" || {
        cat "$cache.err" >&2; echo "error: embed failed (above)" >&2; exit 1; }
    grep -E "^model: " <<<"$out" | sed 's/^/  /'
    grep -E "^model: " "$cache.err" | sed 's/^/  /' || true
    "$py" - "$out" <<'PY'
import re, sys
done = next(l for l in sys.argv[1].splitlines() if l.startswith("embed done:"))
new, seconds = int(re.search(r"seen, (\d+) new", done).group(1)), float(re.search(r"([\d.]+) s$", done).group(1))
print(f"{new / seconds:.1f}")
PY
}

summary=()
for set in phone shared; do
    if [ "$set" = phone ]; then src="$work/phone"; else src="$shared"; fi
    count="$(find "$src" -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) | wc -l)"
    echo "$set photos ($count):"
    samples="$work/$set.gpu-util"
    : >"$samples"
    sampler=""
    if [ "$gpu" != "NO GPU" ]; then
        nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 \
            >"$samples" 2>/dev/null &
        sampler=$!
    fi
    cuda="$(FACESETS_PIPELINE=$shape embed "$src" "$work/$set-cuda.npz")"
    if [ -n "$sampler" ]; then kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true; fi
    cpu="$(FACESETS_PIPELINE=pool embed "$src" "$work/$set-cpu.npz" --providers CPUExecutionProvider)"
    printf '%s\n' "$cuda" | sed '$d'
    printf '%s\n' "$cpu" | sed '$d'
    cuda_rate="$(tail -n 1 <<<"$cuda")" cpu_rate="$(tail -n 1 <<<"$cpu")"
    util="$("$py" - "$samples" <<'PY'
import sys
values = [float(v) for v in open(sys.argv[1]).read().split() if v.replace(".", "", 1).isdigit()]
print(f"GPU {sum(values) / len(values):.0f}% mean, {max(values):.0f}% max" if values else "GPU n/a")
PY
)"
    same="$("$py" tests/same_faces.py "$work/$set-cuda.npz" "$work/$set-cpu.npz")" || true
    ratio="$("$py" -c 'import sys; print(f"{float(sys.argv[1]) / float(sys.argv[2]):.1f}x")' \
             "$cuda_rate" "$cpu_rate")"
    echo "  CUDA $cuda_rate img/s ($util), CPU pool $cpu_rate img/s: $ratio"
    echo "  $same"
    summary+=("$set $count: CUDA $cuda_rate img/s ($util), CPU pool $cpu_rate img/s, $ratio, ${same%%:*}")
done
elapsed=$(( $(date +%s) - started ))
line="gpu_check: $gpu, $cores cores, $(basename "$pack") | ${summary[0]} | ${summary[1]} | $((elapsed / 60)) min $((elapsed % 60)) s"
echo "$line"
case "$line" in *DIFFERENT*) exit 1 ;; esac
