#!/usr/bin/env python3
"""How export-swap's bundles behave downstream, measured on the labeled photos.

    .venv/bin/python tests/benchmarks/eval_downstream.py [--top-n 10]

Embeds five_celebs + lfw10 (buffalo_s) into a temp cache, runs cluster, refine
and export-swap with gates lowered for these small photos (printed below),
then reads every PNG of every `_all.fsz` bundle back as roop-unleashed would
(`cv2.imdecode`, InsightFace detection) and reports:
  - the share of crops re-detected as exactly one face at det 640 and det 320,
  - identity agreement: each crop's source label against its faceset's majority
    label, and the cosine similarity of each crop's embedding to the faceset
    centroid,
  - how the mean embedding of the top-N bundle (roop averages the embeddings of
    every face in the bundle) compares with the full faceset's centroid and with
    the mean of the whole `_all` bundle.
Not collected by pytest.
"""

import argparse
import logging
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import sort_faces  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "faces"
REFINE = {"min_short": 40, "min_faces": 5, "min_blur": 20.0}
EXPORT = {"min_face_short": 60}


def label(path):
    parts = Path(path).parts
    return parts[-3] + "/" + parts[-2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--top-n", type=int, default=10)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache" / "c.npz"
        for name in ("five_celebs", "lfw10"):
            sort_faces.embed(DATA / name, cache, model="buffalo_s", quiet=True)
        sort_faces.cluster(cache, tmp / "raw", quiet=True)
        refined = sort_faces.refine(cache, tmp / "refined", quiet=True, **REFINE)
        sort_faces.enrich(cache, quiet=True)
        manifest = sort_faces.export_swap(cache, tmp / "refined" / "refine_manifest.json",
                                          tmp / "swap", top_n=args.top_n, quiet=True, **EXPORT)
        app = sort_faces.load_face_analysis(str(sort_faces.offline_pack_dir()),
                                            ["detection", "recognition"],
                                            ["CPUExecutionProvider"], 640)
        centroids = {s["name"]: np.asarray(s["centroid"], np.float32) for s in refined["facesets"]}
        one_face = {640: 0, 320: 0}
        crops = agree = 0
        similarity, top_vs_full, top_vs_all, all_vs_full = [], [], [], []
        for entry in manifest["facesets"]:
            majority = Counter(label(c["source"]) for c in entry["crops"]).most_common(1)[0][0]
            embeddings = []
            with zipfile.ZipFile(tmp / "swap" / f"{entry['name']}_all.fsz") as bundle:
                for crop, name in zip(entry["crops"], bundle.namelist()):
                    image = cv2.imdecode(np.frombuffer(bundle.read(name), np.uint8), cv2.IMREAD_COLOR)
                    crops += 1
                    for size in one_face:
                        one_face[size] += len(app.det_model.detect(image, input_size=(size, size))[0]) == 1
                    faces = app.get(image)
                    embeddings.append(faces[0].embedding)  # roop averages raw embeddings
                    similarity.append(float(faces[0].normed_embedding @ centroids[entry["name"]]))
                    agree += label(crop["source"]) == majority
            embeddings = np.array(embeddings)
            unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
            top = unit(embeddings[: args.top_n].mean(axis=0))
            everything = unit(embeddings.mean(axis=0))
            top_vs_full.append(float(top @ centroids[entry["name"]]))
            top_vs_all.append(float(top @ everything))
            all_vs_full.append(float(everything @ centroids[entry["name"]]))
    print(f"photos: five_celebs + lfw10; refine {REFINE}; export {EXPORT}, top-n {args.top_n}")
    print(f"facesets: {len(manifest['facesets'])}, crops: {crops}, "
          f"skipped: {manifest['summary']['skipped']}")
    for size, count in one_face.items():
        print(f"exactly one face at det {size}: {count}/{crops} ({count / crops:.1%})")
    print(f"crops whose source label is their faceset's majority: {agree}/{crops} ({agree / crops:.1%})")
    s = np.array(similarity)
    print(f"crop vs faceset centroid cosine: min {s.min():.3f}, median {np.median(s):.3f}, "
          f"mean {s.mean():.3f}")
    print(f"top-{args.top_n} mean embedding vs faceset centroid: mean {np.mean(top_vs_full):.3f}, "
          f"min {np.min(top_vs_full):.3f}")
    print(f"top-{args.top_n} mean embedding vs _all bundle mean: mean {np.mean(top_vs_all):.3f}, "
          f"min {np.min(top_vs_all):.3f}")
    print(f"_all bundle mean vs faceset centroid: mean {np.mean(all_vs_full):.3f}")


if __name__ == "__main__":
    main()
