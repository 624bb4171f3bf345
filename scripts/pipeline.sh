#!/usr/bin/env bash
# The whole pipeline on one photo folder, as the spec's "typical end-to-end run":
#   embed -> cluster -> refine -> dedup -> enrich -> export-swap (--candidates)
# Usage: scripts/pipeline.sh [--gpu] SRC [NAME]
#   --gpu: run it with the GPU build, in .venv-gpu (scripts/setup_venv.sh --gpu): the model on
#   the NVIDIA GPU (on the CPU, with the same results, where there is none).
#   NAME (default: the folder's name) names the cache work/cache/NAME.npz and the
#   outputs under work/out/NAME/. Re-running is quick: embed and enrich only do
#   new photos, and the other steps rebuild their folders from the cache.
#   Extra flags: REFINE_ARGS="--min-faces 5" EXPORT_ARGS="--top-n 20" scripts/pipeline.sh SRC
#   LINK=hardlink (or symlink; default copy): how cluster and refine put the photos in
#   raw_full/ and facesets_full/ (their --link; scripts/merge.sh's extend keeps it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gpu=""
if [ "${1:-}" = "--gpu" ]; then gpu=1; shift; fi
[ $# -ge 1 ] || { echo "usage: $0 [--gpu] SRC [NAME]" >&2; exit 2; }
# shellcheck source=scripts/steps.sh
source "$root/scripts/steps.sh"
src="$(source_folder "$1")" || exit 2
name="${2:-$(basename "$src")}"
check_name "$name" || exit 2
link="${LINK:-copy}"
case "$link" in copy|hardlink|symlink) ;;
    *) echo "error: LINK must be copy, hardlink or symlink, not '$link'" >&2; exit 2 ;;
esac
use_venv "$gpu"
# this command, for a step's refusal to name (the step's own REFINE_ARGS=/EXPORT_ARGS= before it)
command="$([ "$link" = copy ] || printf 'LINK=%s ' "$link")bash $(printf %q \
    "${at}scripts/pipeline.sh")${gpu:+ --gpu} $(printf %q "$src") $(printf %q "$name")"
FACESETS_RECIPE_REFINE="${EXPORT_ARGS:+EXPORT_ARGS=$(printf %q "$EXPORT_ARGS") }$command"
FACESETS_RECIPE_EXPORT_SWAP="${REFINE_ARGS:+REFINE_ARGS=$(printf %q "$REFINE_ARGS") }$command"
export FACESETS_RECIPE_REFINE FACESETS_RECIPE_EXPORT_SWAP
cache="${at}work/cache/$name.npz"
out="${at}work/out/$name"
# shellcheck disable=SC2086
check_args REFINE_ARGS refine "$cache" "$out/facesets_full" --link "$link" ${REFINE_ARGS:-}
# shellcheck disable=SC2086
check_args EXPORT_ARGS export-swap "$cache" "$out/facesets_full/refine_manifest.json" \
    "$out/facesets_swap_ready" --raw-manifest "$out/raw_full/manifest.json" --candidates \
    ${EXPORT_ARGS:-}
step embed "$src" "$cache"
step cluster "$cache" "$out/raw_full" --link "$link"
# shellcheck disable=SC2086
step refine "$cache" "$out/facesets_full" --link "$link" ${REFINE_ARGS:-}
step dedup "$cache"
step enrich "$cache"
# shellcheck disable=SC2086
step export-swap "$cache" "$out/facesets_full/refine_manifest.json" "$out/facesets_swap_ready" \
    --raw-manifest "$out/raw_full/manifest.json" --candidates ${EXPORT_ARGS:-}
echo
printf '%-20s %s\n' "cache:" "$root/work/cache/$name.npz" \
    "duplicates:" "$root/work/cache/$name.duplicates.json"
for part in raw_full facesets_full facesets_swap_ready; do
    folder="$root/work/out/$name/$part"
    printf '%-20s %s\n' "$part:" "$folder  (review: $folder/index.html)"
done
printf '%-20s %s\n' "logs:" "$root/work/logs/"
# Small libraries: refine's size filter (--min-faces 15) may have dropped everyone.
case " ${REFINE_ARGS:-} " in
    *" --min-faces "*) ;;
    *) "$python" - "$out/facesets_full/refine_manifest.json" "$src" "$name" "$link" "$gpu" \
           "${at}scripts/pipeline.sh" <<'PY'
import json, shlex, sys
manifest = json.load(open(sys.argv[1]))
size = manifest["stages"].get("size_filter") or {}
if size.get("kept_at_suggestion"):
    n, keep = len(manifest["facesets"]), size["suggested_min_faces"]
    link = "" if sys.argv[4] == "copy" else f"LINK={sys.argv[4]} "  # as this run had it
    gpu = "--gpu " if sys.argv[5] else ""
    print(f"\n{n} facesets; the size filter (--min-faces {size['min_faces']}) dropped "
          f"{size['dropped_people']} people (the largest has {size['largest_images']} images). "
          f"To keep the {size['kept_at_suggestion']} with {keep} or more, re-run:\n"
          f"  {link}REFINE_ARGS=\"--min-faces {keep}\" bash {shlex.quote(sys.argv[6])} {gpu}"
          f"{shlex.quote(sys.argv[2])} {shlex.quote(sys.argv[3])}")
PY
    ;;
esac
exit "$status"
