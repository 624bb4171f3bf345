#!/usr/bin/env python3
"""Faces that fill the frame (issue 26): how many a detection rule finds, and
what it costs on ordinary photos.

    .venv/bin/python tests/benchmarks/measure_close_ups.py [--subjects 60] [--rounds 3]

1. Close-ups made from the shared photos (five_celebs, lfw10,
   face_recognition): the largest face of each photo, as embed finds it,
   centred in a 1080 px square whose side its box fills at 50%, 70%, 90% and
   100% (black where the square leaves the photo), and tight crops of 100 px
   and 250 px (the box filling 90% and 100%: the crops face-swap users collect).
   For each rule, the close-ups in which a face is found with the identity of
   the original (embedding cosine >= 0.85 with the face in the uncropped
   photo; embedded as embed does, from the key points the rule gives).
2. Every shared photo (group photos included): the faces each rule finds that
   the first pass alone does not (an ordinary photo must keep its faces), and
   the detector's milliseconds per photo for each rule (median of --rounds).

The rules: the first pass alone (det 640, embed before issue 26), and
detect_faces as embed runs it now (SECOND_LOOK), and variants of its second
look. Not collected by pytest.
"""

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import sort_faces  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "faces"
FILLS = (0.5, 0.7, 0.9, 1.0)
CROPS = ((100, 0.9), (100, 1.0), (250, 0.9), (250, 1.0))  # (side, fill)


def shared_photos(sets=("five_celebs", "lfw10", "face_recognition")) -> list[Path]:
    return sorted(p for s in sets for p in (DATA / s).rglob("*")
                  if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def around(image: np.ndarray, box, fill: float, side: int) -> np.ndarray:
    """A `side` px square centred on the box, the box's long side `fill` of it."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    span = max(x2 - x1, y2 - y1) / fill
    scale = side / span
    matrix = np.array([[scale, 0, side / 2 - (x1 + x2) / 2 * scale],
                       [0, scale, side / 2 - (y1 + y2) / 2 * scale]], np.float32)
    return cv2.warpAffine(image, matrix, (side, side), borderValue=0,
                          flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


def first_pass(det_model, image, det_size):
    return det_model.detect(image, input_size=(det_size, det_size), max_num=0, metric="default")


def rules(args) -> dict:
    """name -> detect(det_model, image, det_size) -> (boxes, kps)."""
    out = {"first pass only (before)": first_pass,
           "detect_faces (now)": sort_faces.detect_faces}
    for size in args.also:
        out[f"second look at det {size}"] = (
            lambda det, image, det_size, size=size: sort_faces.detect_faces(
                det, image, det_size, second_look_size=size))
    return out


def identities(app, image: np.ndarray, rule, det_size: int) -> np.ndarray:
    """The embeddings of the faces `rule` finds in an image, made as embed
    makes them (embed_photo: the rule's key points, aligned)."""
    photo = sort_faces.PhotoPixels.from_pixels("close-up", image)
    return sort_faces.embed_photo(app, photo, det_size, 512, detect=rule)["embeddings"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--subjects", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--also", type=int, nargs="*", default=[],
                        help="second-look detector sizes to compare beside the default")
    args = parser.parse_args()
    pack = sort_faces.offline_pack_dir()
    app = sort_faces.load_face_analysis(str(pack), ["detection", "recognition"],
                                        ["CPUExecutionProvider"], 640)
    det, det_size = app.det_model, sort_faces.DEFAULT_DET_SIZE
    chosen = rules(args)
    photos = shared_photos()
    step = max(1, len(photos) // args.subjects)
    cases, found = {}, {name: {} for name in chosen}
    subjects = 0
    for path in photos[::step][:args.subjects]:
        image = cv2.imread(str(path))
        boxes, _kps = first_pass(det, image, det_size)
        if not len(boxes):
            continue
        subject = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
        faces = sort_faces.embed_photo(app, sort_faces.PhotoPixels.from_pixels(str(path), image),
                                       det_size, 512, detect=first_pass)
        original = faces["embeddings"][int(np.argmax(
            sort_faces.box_iou(boxes[[subject], :4], faces["bbox"])[0]))]
        subjects += 1
        cases = {f"close-up {int(f * 100)}% of 1080 px": around(image, boxes[subject], f, 1080)
                 for f in FILLS}
        cases.update({f"crop {side} px, {int(f * 100)}%": around(image, boxes[subject], f, side)
                      for side, f in CROPS})
        for name, rule in chosen.items():
            for case, picture in cases.items():
                same = bool((identities(app, picture, rule, det_size) @ original >= 0.85).any())
                found[name][case] = found[name].get(case, 0) + same
    print(f"close-ups and crops of {subjects} shared photos' largest faces: found with the "
          "original's identity (cosine >= 0.85)")
    width = max(map(len, chosen))
    print(" " * width + " | " + " | ".join(cases))
    for name in chosen:
        print(f"{name:<{width}} | " + " | ".join(f"{found[name].get(c, 0):>{len(c)}}"
                                                   for c in cases))
    ordinary = shared_photos(("five_celebs", "lfw10", "face_recognition", "group_photos"))
    views = []
    for path in ordinary:
        photo = sort_faces.PhotoPixels(str(path))
        views.append(photo.at(sort_faces.detect_factor(photo, det_size)))
    base = [first_pass(det, view, det_size)[0] for view in views]
    print(f"\nthe {len(views)} shared photos as embed sees them ({sum(map(len, base))} faces "
          "in the first pass alone):")
    for name, rule in chosen.items():
        seconds, extra = [], 0
        for _round in range(args.rounds):
            started = time.perf_counter()
            results = [rule(det, view, det_size)[0] for view in views]
            seconds.append(time.perf_counter() - started)
        for got, before in zip(results, base):
            if len(got):
                overlap = sort_faces.box_iou(got[:, :4], before[:, :4]) if len(before) else \
                    np.zeros((len(got), 0))
                extra += int(sum(not row.size or row.max() < 0.5 for row in overlap))
        print(f"  {name:<{width}}: {sum(map(len, results))} faces ({extra} the first pass does "
              f"not find), {1000 * np.median(seconds) / len(views):.2f} ms a photo")


if __name__ == "__main__":
    main()
