#!/usr/bin/env bash
# CI's check of the GPU install (.ci/run runs it after the suite): the install as the README
# gives it (scripts/setup_venv.sh --gpu: .venv-gpu, or GPU_VENV), then a few shared photos
# embedded with it and with the CPU build (.venv). It fails when the venv holds both builds of
# onnxruntime, when the GPU build's run does not say what it runs on (its model line: CUDA on a
# GPU; without one the CPU, and the fallback line with onnxruntime's reason), or when the two
# builds find different faces (tests/same_faces.py). On a machine without a GPU (CI's) this is
# "the GPU install still runs everything on the CPU, with the same results".
# Not in the suite: the install downloads about 3 GB and takes minutes the first time.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_venv.sh --gpu
gpu_py="${GPU_VENV:-.venv-gpu}/bin/python"
"$gpu_py" - <<'PY'
import importlib.metadata
import onnxruntime

names = {(d.metadata["Name"] or "").lower() for d in importlib.metadata.distributions()}
assert "onnxruntime-gpu" in names and "onnxruntime" not in names, \
    f"the GPU venv must hold onnxruntime-gpu alone: {sorted(n for n in names if 'onnxruntime' in n)}"
assert "CUDAExecutionProvider" in onnxruntime.get_available_providers(), \
    onnxruntime.get_available_providers()
print(f"gpu build: onnxruntime-gpu {onnxruntime.__version__} alone, "
      f"offering {onnxruntime.get_available_providers()}")
PY
work="$(mktemp -d -t gpu-build-XXXXXX)"
trap 'rm -rf "$work"' EXIT
mkdir "$work/src"
data="$(cd ../shared/data/faces && pwd)"
cp "$data"/group_photos/* "$work/src/"
find "$data/lfw10" -name '*.jpg' | sort | head -n 4 | xargs -I{} cp {} "$work/src/"
.venv/bin/python sort_faces.py embed "$work/src" "$work/cpu.npz" --model buffalo_s --quiet
"$gpu_py" sort_faces.py embed "$work/src" "$work/gpu.npz" --model buffalo_s \
    >"$work/out" 2>"$work/err" || { cat "$work/out" "$work/err"; exit 1; }
cat "$work/out"
grep -E "^model: |^CUDA was asked for" "$work/err" || true
if nvidia-smi -L >/dev/null 2>&1; then
    grep -q "^model: CUDAExecutionProvider" "$work/out" || {
        echo "error: the GPU build does not run on CUDA on this GPU" >&2; cat "$work/err"; exit 1; }
else
    grep -q "^model: CPUExecutionProvider" "$work/out" || {
        echo "error: no model line naming the CPU" >&2; exit 1; }
    grep -q "^model: CUDA was asked for, but the model runs on CPUExecutionProvider: ." \
        "$work/err" || { echo "error: no fallback line with a reason" >&2; cat "$work/err"; exit 1; }
fi
"$gpu_py" tests/same_faces.py "$work/gpu.npz" "$work/cpu.npz"
