#!/usr/bin/env bash
# Fold a new photo folder into an existing result without renumbering, as the
# spec's "merging a new source into an existing result":
#   embed NEW into the same cache -> extend raw + facesets -> enrich -> export-swap
# Usage: scripts/merge.sh [--gpu] NEW_SRC NAME
#   --gpu: with the GPU build, in .venv-gpu (as scripts/pipeline.sh --gpu).
#   NAME is the name the first pipeline run used (work/cache/NAME.npz, work/out/NAME/).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gpu=""
if [ "${1:-}" = "--gpu" ]; then gpu=1; shift; fi
[ $# -eq 2 ] || { echo "usage: $0 [--gpu] NEW_SRC NAME" >&2; exit 2; }
# shellcheck source=scripts/steps.sh
source "$root/scripts/steps.sh"
src="$(source_folder "$1")" || exit 2
name="$2"
check_name "$name" || exit 2
use_venv "$gpu"
# this command, for a step's refusal to name (EXPORT_ARGS=... before it)
FACESETS_RECIPE_EXPORT_SWAP="bash $(printf %q "${at}scripts/merge.sh")${gpu:+ --gpu}"\
" $(printf %q "$src") $(printf %q "$name")"
export FACESETS_RECIPE_EXPORT_SWAP
cache="${at}work/cache/$name.npz"
out="${at}work/out/$name"
[ -f "$cache" ] || { echo "error: no cache $cache: run bash $(printf %q "${at}scripts/pipeline.sh")" \
                          "SRC $(printf %q "$name") first" >&2; exit 2; }
# shellcheck disable=SC2086
check_args EXPORT_ARGS export-swap "$cache" "$out/facesets_full/refine_manifest.json" \
    "$out/facesets_swap_ready" --raw-manifest "$out/raw_full/manifest.json" --candidates \
    ${EXPORT_ARGS:-}
step embed "$src" "$cache"
step extend "$cache" "$out/raw_full" --refine-out "$out/facesets_full"
step enrich "$cache"
# shellcheck disable=SC2086
step export-swap "$cache" "$out/facesets_full/refine_manifest.json" "$out/facesets_swap_ready" \
    --raw-manifest "$out/raw_full/manifest.json" --candidates ${EXPORT_ARGS:-}
echo
for part in raw_full facesets_full facesets_swap_ready; do
    folder="$root/work/out/$name/$part"
    printf '%-20s %s\n' "$part:" "$folder  (review: $folder/index.html)"
done
exit "$status"
