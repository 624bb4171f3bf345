#!/usr/bin/env python3
"""A re-run of embed over a large tree where nothing changed.

    .venv/bin/python tests/benchmarks/bench_rescan.py [N_FILES]

Writes N small files (default 100,000) into a temp tree of 1,000 folders,
records them in a cache as an earlier run would have (path, size, mtime,
sha256), then times `sort_faces.embed` over the tree: it must scan and stat
every file but hash and embed none. Not collected by pytest.
"""

import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import sort_faces  # noqa: E402


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "photos"
        paths = []
        for i in range(n):
            folder = src / f"{i // 100:04d}"
            if i % 100 == 0:
                folder.mkdir(parents=True)
            path = folder / f"IMG_{i:06d}.jpg"
            path.write_bytes(i.to_bytes(8, "little"))
            paths.append(str(path))
        stats = [Path(p).stat() for p in paths]
        shas = np.array([f"{i:064x}" for i in range(n)])
        name, pack = sort_faces.resolve_model("buffalo_s")
        cache = sort_faces.FaceCache({"model": sort_faces.model_identity(name, pack, 640),
                                      "phash": sort_faces.PHASH_VERSION})
        empty = sort_faces.rows_from_records([], sort_faces.FACE_COLUMNS, 512)
        cache.append({"files": np.array(paths), "sha256": shas,
                      "file_size": np.array([s.st_size for s in stats]),
                      "file_mtime_ns": np.array([s.st_mtime_ns for s in stats]),
                      "file_width": np.ones(n, np.int32), "file_height": np.ones(n, np.int32),
                      "file_status": np.full(n, "noface"), "file_reason": np.full(n, ""),
                      "file_phash": np.zeros(n, np.uint64), **empty,
                      "path_seen": np.array(paths), "path_sha256": shas,
                      "path_size": np.array([s.st_size for s in stats]),
                      "path_mtime_ns": np.array([s.st_mtime_ns for s in stats])})
        cache_path = Path(tmp) / "cache.npz"
        sort_faces.save_cache(cache_path, cache)
        started = time.perf_counter()
        summary = sort_faces.embed(src, cache_path, model="buffalo_s", quiet=True)
        seconds = time.perf_counter() - started
    print(f"{n} unchanged files: embed re-run {seconds:.1f} s "
          f"({summary['new']} new, {summary['seen']} seen)")


if __name__ == "__main__":
    main()
