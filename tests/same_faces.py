"""Do two embeddings of the same photos hold the same faces? The GPU's shape
of a model step against the CPU pool, the GPU build against the CPU build.

    python tests/same_faces.py CACHE_A CACHE_B    # one line; exit 1 when they differ

The same files (by sha256) with the same status, and each file's faces paired
one to one, boxes within BOX_PX pixels and embeddings at cosine COSINE or
more. Used by tests/test_gpu_pipeline.py, tests/benchmarks/gpu_check.sh and
the GPU build's check in .ci/run (tests/gpu_build_check.sh); it reads caches
with whichever venv runs it.
"""

import sys
from pathlib import Path

import numpy as np

BOX_PX = 1.0
COSINE = 0.999


def cache_faces(path) -> dict:
    """sha256 -> (status, boxes (N, 4), unit embeddings (N, D)) of a cache."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sort_faces

    cache = sort_faces.load_cache(Path(path))
    rows = sort_faces.faces_by_file(cache["face_file"], cache.n_files)
    return {str(sha): (str(status), cache["bbox"][faces], cache["embeddings"][faces])
            for sha, status, faces in zip(cache["sha256"], cache["file_status"], rows)}


def file_problems(label: str, a: tuple, b: tuple) -> tuple[list[str], float, float]:
    """What differs between one file's two embeddings; the largest box
    difference (px) and the lowest cosine of its paired faces."""
    (status_a, boxes_a, emb_a), (status_b, boxes_b, emb_b) = a, b
    if status_a != status_b:
        return [f"{label}: {status_a} against {status_b}"], 0.0, 1.0
    if len(boxes_a) != len(boxes_b):
        return [f"{label}: {len(boxes_a)} faces against {len(boxes_b)}"], 0.0, 1.0
    if not len(boxes_a):
        return [], 0.0, 1.0
    distance = np.abs(np.asarray(boxes_a)[:, None, :] - np.asarray(boxes_b)[None, :, :]).max(axis=2)
    pairs = distance.argmin(axis=1)
    if len(set(pairs.tolist())) != len(pairs):
        return [f"{label}: its faces do not pair one to one"], float(distance.min(axis=1).max()), 1.0
    moved = float(distance[np.arange(len(pairs)), pairs].max())
    cosine = float(np.min(np.sum(np.asarray(emb_a) * np.asarray(emb_b)[pairs], axis=1)))
    problems = []
    if moved > BOX_PX:
        problems.append(f"{label}: a box moved {moved:.2f} px")
    if cosine < COSINE:
        problems.append(f"{label}: an embedding at cosine {cosine:.5f}")
    return problems, moved, cosine


def compare(a: dict, b: dict) -> tuple[list[str], dict]:
    """(problems, summary) of two {key: (status, boxes, embeddings)}."""
    problems = [f"{key}: only in the first" for key in sorted(set(a) - set(b))]
    problems += [f"{key}: only in the second" for key in sorted(set(b) - set(a))]
    moved, cosine = 0.0, 1.0
    for key in sorted(set(a) & set(b)):
        found, file_moved, file_cosine = file_problems(key, a[key], b[key])
        problems += found
        moved, cosine = max(moved, file_moved), min(cosine, file_cosine)
    summary = {"files": len(set(a) & set(b)), "faces": sum(len(a[k][1]) for k in set(a) & set(b)),
               "box_px": round(moved, 3), "cosine": round(cosine, 5)}
    return problems, summary


def summary_line(problems: list[str], summary: dict) -> str:
    head = (f"{summary['files']} files, {summary['faces']} faces, boxes within "
            f"{summary['box_px']} px, cosine >= {summary['cosine']}")
    if not problems:
        return f"same faces: {head}"
    return f"DIFFERENT faces: {len(problems)} problems ({'; '.join(problems[:3])}); {head}"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    problems, summary = compare(cache_faces(argv[0]), cache_faces(argv[1]))
    print(summary_line(problems, summary))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
