"""How many pixels a face needs in a reduced decode before its embedding and
blur score stop changing (issue 16: FACE_DETAIL_PX).

    .venv/bin/python tests/benchmarks/measure_face_detail.py [N_PHONE_PHOTOS] [--phone-dir DIR]

Takes the 12 MP phone photos (phone_photos.py) and every shared JPEG, finds
the faces on the full decode, and makes each face's recognizer crop and blur
score again from libjpeg-turbo's 1/2, 1/4 and 1/8 DCT decodes (the same
landmarks, scaled). Prints, per band of the face's short edge in the reduced
decode, the cosine of that embedding to the one from the full decode reduced
by averaging blocks of pixels (what embed --full-decode reads: the two paths
agree where this is ~1), to the one from the full decode itself (the crop
before issue 16, whose bilinear warp from 2-16x more pixels aliases), and the
blur score's ratio to the block-averaged one. Not collected by pytest.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import sort_faces  # noqa: E402
from phone_photos import DATA, make_phone_photos  # noqa: E402

BANDS = (0, 32, 48, 64, 80, 96, 112, 128, 160, 224, 100000)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("count", nargs="?", type=int, default=60)
    parser.add_argument("--phone-dir")
    args = parser.parse_args()
    import simplejpeg
    from insightface.app.common import Face

    pack = sort_faces.offline_pack_dir()
    app = sort_faces.load_face_analysis(str(pack), ["detection", "recognition"],
                                        ["CPUExecutionProvider"], 640)
    recognizer = app.models["recognition"]
    folder = Path(args.phone_dir or tempfile.mkdtemp(prefix="phone-photos-"))
    photos = make_phone_photos(folder, args.count)
    photos += [p for p in sorted(DATA.rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg")]
    rows = []  # (short edge in the reduced decode, cosine, blur ratio)
    for path in photos:
        data = path.read_bytes()
        try:
            full = simplejpeg.decode_jpeg(data, colorspace="BGR")
        except ValueError:
            continue
        boxes, kpss = app.det_model.detect(full, max_num=0, metric="default")
        for box, kps in zip(boxes, kpss):
            reference = Face(bbox=box[:4], kps=kps, det_score=box[4])
            emb_full = unit(recognizer.get(full, reference))
            short = float(sort_faces.face_short_edge(box[:4])[0])
            for factor in (2, 4, 8):
                h, w = full.shape[:2]
                small = simplejpeg.decode_jpeg(data, colorspace="BGR", min_width=-(-w // factor),
                                               min_height=-(-h // factor))
                boxed = sort_faces.box_reduce(full, factor)
                face = Face(bbox=box[:4] / factor, kps=kps / factor, det_score=box[4])
                emb = unit(recognizer.get(small, face))
                emb_boxed = unit(recognizer.get(boxed, face))
                blur = sort_faces.blur_score(small, box[:4] / factor)
                blur_boxed = sort_faces.blur_score(boxed, box[:4] / factor)
                rows.append((short / factor, float(emb @ emb_boxed), float(emb @ emb_full),
                             blur / max(blur_boxed, 1e-9)))
    rows = np.array(rows)
    print(f"{len(photos)} photos, {len(rows) // 3} faces; per band of the face's short edge "
          "in the reduced decode, cosine min / 1st percentile / median:")
    print(f"{'short edge px':>14} {'faces':>6} {'DCT vs block-averaged':>24} "
          f"{'DCT vs full resolution':>24} {'blur DCT/averaged':>18}")
    for low, high in zip(BANDS, BANDS[1:]):
        band = rows[(rows[:, 0] >= low) & (rows[:, 0] < high)]
        if len(band):
            print(f"{low:>6}-{high:<7} {len(band):6d} {stats(band[:, 1]):>24} "
                  f"{stats(band[:, 2]):>24} {band[:, 3].min():8.2f}..{band[:, 3].max():.2f}")


def unit(vector):
    return vector / np.linalg.norm(vector)


def stats(values) -> str:
    return f"{values.min():.4f} {np.percentile(values, 1):.4f} {np.median(values):.4f}"


if __name__ == "__main__":
    main()
