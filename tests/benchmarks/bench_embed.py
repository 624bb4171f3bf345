#!/usr/bin/env python3
"""embed throughput against a bare single-process InsightFace loop.

    .venv/bin/python tests/benchmarks/bench_embed.py [PHOTO_FOLDER ...] [--repeat N]

Default photos: every set under ../shared/data/faces. The bare loop is what a
user would write first: one FaceAnalysis (default threads), `app.get(cv2.imread(f))`
over the same files. embed runs into a fresh temp cache each time (hashing,
decoding, phash, blur and the journal included). Not collected by pytest.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import sort_faces  # noqa: E402


def bare_loop(pack_dir, files):
    import cv2
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=str(pack_dir), allowed_modules=["detection", "recognition"],
                       providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    started = time.perf_counter()
    faces = sum(len(app.get(cv2.imread(str(f)))) for f in files)
    return time.perf_counter() - started, faces


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folders", nargs="*", default=[str(ROOT.parent / "shared/data/faces")])
    parser.add_argument("--repeat", type=int, default=2, help="passes over the photos per timing")
    args = parser.parse_args()
    import logging
    logging.disable(logging.WARNING)
    pack_name, pack_dir = sort_faces.resolve_model("buffalo_s")
    photos = [p for folder in args.folders for p in sort_faces.scan_images(Path(folder))[0]]
    n = len(photos) * args.repeat
    with tempfile.TemporaryDirectory() as tmp:
        # embed dedups identical content, so each pass gets distinct copies: a
        # trailing byte changes the sha256, not the pixels
        for rep in range(args.repeat):
            folder = Path(tmp) / "src" / f"r{rep}"
            folder.mkdir(parents=True)
            for i, photo in enumerate(photos):
                data = Path(photo).read_bytes() + b"\0" * (rep + 1)
                (folder / f"{i}_{Path(photo).name}").write_bytes(data)
        bare_seconds, bare_faces = bare_loop(pack_dir, sorted((Path(tmp) / "src").rglob("*.*")))
        started = time.perf_counter()
        summary = sort_faces.embed(Path(tmp) / "src", Path(tmp) / "cache.npz",
                                   model="buffalo_s", quiet=True)
        embed_seconds = time.perf_counter() - started
    print(f"images: {n} ({args.repeat} passes over {len(photos)} photos)")
    print(f"bare single-process loop: {bare_seconds:6.1f} s  {n / bare_seconds:6.1f} img/s  "
          f"{bare_faces} faces")
    print(f"sort_faces embed        : {embed_seconds:6.1f} s  {n / embed_seconds:6.1f} img/s  "
          f"{summary['faces']} faces (pool start and model load included)")
    print(f"ratio: {bare_seconds / embed_seconds:.2f}x")


if __name__ == "__main__":
    main()
