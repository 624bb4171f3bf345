#!/usr/bin/env python3
"""dedup end to end on a synthetic 100k-image cache.

    .venv/bin/python tests/benchmarks/bench_dedup.py [N_IMAGES]

Builds a cache of N images (default 100,000) with random perceptual hashes,
2% of them planted as near-duplicate pairs (hash within 6 bits, same faces),
one face per image on average, and 2,000 blank images (hash 0: flat, grouped with nothing),
then times `sort_faces.dedup` on it: load, hash search, face confirmation,
report. Not collected by pytest.
"""

import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import sort_faces  # noqa: E402


def synthetic_cache(n: int, rng) -> sort_faces.FaceCache:
    hashes = rng.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + \
        rng.integers(0, 2, size=n).astype(np.uint64)
    n_dupes = n // 50
    originals = rng.choice(n - n_dupes, size=n_dupes, replace=False)
    copies = np.arange(n - n_dupes, n)
    flips = rng.integers(0, 64, size=(n_dupes, 3))
    for bit in range(3):
        hashes[copies] = hashes[originals] ^ (np.uint64(1) << flips[:, bit].astype(np.uint64))
    hashes[:2000] = 0  # blank images
    # each photo's hash turned 90, 180 and mirrored: as random as its own
    turns = rng.integers(0, 2**63, size=(n, 3), dtype=np.int64).astype(np.uint64)
    turns[copies] = turns[originals]
    faces_per_file = rng.integers(0, 3, size=n)
    faces_per_file[copies] = faces_per_file[originals]
    face_file = np.repeat(np.arange(n), faces_per_file).astype(np.int32)
    embeddings = sort_faces.unit_rows(rng.standard_normal((len(face_file), 512)))
    bbox = np.tile(np.array([100, 100, 300, 340], np.float32), (len(face_file), 1))
    bbox += rng.uniform(-50, 50, size=(len(face_file), 1)).astype(np.float32)
    kps = np.tile(np.array([[150, 180], [250, 180], [200, 240], [160, 290], [240, 290]],
                           np.float32), (len(face_file), 1, 1))
    # copies carry their original's faces
    starts = np.concatenate([[0], np.cumsum(faces_per_file)])
    for copy, original in zip(copies, originals):
        embeddings[starts[copy]:starts[copy + 1]] = embeddings[starts[original]:starts[original + 1]]
        bbox[starts[copy]:starts[copy + 1]] = bbox[starts[original]:starts[original + 1]]
    cache = sort_faces.FaceCache({"model": {"embedding_size": 512}, "phash": sort_faces.PHASH_VERSION})
    paths = np.array([f"/photos/{i // 1000:03d}/img_{i:06d}.jpg" for i in range(n)])
    shas = np.array([f"{i:064x}" for i in range(n)])
    cache.append({
        "files": paths, "sha256": shas, "file_size": rng.integers(1e5, 5e6, n),
        "file_mtime_ns": np.zeros(n, np.int64), "file_width": np.full(n, 4000, np.int32),
        "file_height": np.full(n, 3000, np.int32),
        "file_status": np.where(faces_per_file > 0, "ok", "noface"),
        "file_reason": np.full(n, ""), "file_phash": hashes, "file_phash_turns": turns,
        "embeddings": embeddings, "embedding_norm": np.ones(len(face_file), np.float32),
        "face_file": face_file, "bbox": bbox, "kps": kps,
        "det_score": np.ones(len(face_file), np.float32),
        "face_short": sort_faces.face_short_edge(bbox), "blur": np.ones(len(face_file), np.float32),
        "path_seen": paths, "path_sha256": shas, "path_size": np.zeros(n, np.int64),
        "path_mtime_ns": np.zeros(n, np.int64),
    })
    return cache


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    import logging
    logging.disable(logging.WARNING)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        cache_path = Path(tmp) / "bench.npz"
        sort_faces.save_cache(cache_path, synthetic_cache(n, rng))
        started = time.perf_counter()
        report = sort_faces.dedup(cache_path, quiet=True)
        seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"images: {n}, visual groups: {report['summary']['visual_groups']} "
          f"(planted {n // 50} pairs; blank images join no group)")
    print(f"dedup: {seconds:.1f} s end to end (load, hash search, face checks, report); "
          f"peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
