#!/usr/bin/env python3
"""The bare loop a user writes first, as a whole process (the yardstick of
bench_embed.py): one InsightFace FaceAnalysis with default threads and
`app.get(cv2.imread(f))` over every photo of a folder, sorted.

    .venv/bin/python tests/benchmarks/bare_loop.py FOLDER

Prints the number of photos and faces.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import sort_faces  # noqa: E402

EXTENSIONS = (".jpg", ".jpeg", ".png")


def bare_loop(pack_dir, files) -> int:
    import cv2
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=str(pack_dir), allowed_modules=["detection", "recognition"],
                       providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    return sum(len(app.get(cv2.imread(str(f)))) for f in files)


if __name__ == "__main__":
    photos = sorted(p for p in Path(sys.argv[1]).rglob("*") if p.suffix.lower() in EXTENSIONS)
    faces = bare_loop(sort_faces.resolve_model("buffalo_s")[1], photos)
    print(f"{len(photos)} photos, {faces} faces")
