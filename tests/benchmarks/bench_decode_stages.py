"""Where the time of one 12 MP phone photo goes, stage by stage (issue 16's
starting point: embed reaches only ~1.1x a bare loop on such photos).

    .venv/bin/python tests/benchmarks/bench_decode_stages.py [N_PHOTOS]

Makes N (default 24) photos of 4000x3000 from the shared labeled photos
(phone_photos.py: JPEG quality 92, ~1-2 MB), and a HEIC of one, then times in one process and
one thread, median milliseconds per photo: sha256 of the file, the full decode
(cv2, libjpeg-turbo, Pillow), libjpeg-turbo's DCT-scaled decodes (1/2, 1/4,
1/8), the detector at 640 on the full and on the 1/4 decode, the recognizer
per face, the blur score, the perceptual hashes, and the HEIC decode. Not
collected by pytest.
"""

import hashlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import sort_faces  # noqa: E402
from phone_photos import make_phone_photos  # noqa: E402


def timed(function, repeat=1):
    started = time.perf_counter()
    for _ in range(repeat):
        result = function()
    return (time.perf_counter() - started) / repeat * 1000, result


def main(count: int = 24) -> None:
    import simplejpeg
    from PIL import Image

    pack = sort_faces.offline_pack_dir()
    app = sort_faces.load_face_analysis(str(pack), ["detection", "recognition"],
                                        ["CPUExecutionProvider"], 640)
    detector, recognizer = app.det_model, app.models["recognition"]
    with tempfile.TemporaryDirectory() as tmp:
        photos = make_phone_photos(Path(tmp), count)
        times: dict[str, list[float]] = {}

        def note(stage, ms):
            times.setdefault(stage, []).append(ms)

        for path in photos:
            data = path.read_bytes()
            note("sha256 of the file", timed(lambda: hashlib.sha256(data).hexdigest())[0])
            ms, full = timed(lambda: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
            note("decode full: cv2.imdecode", ms)
            note("decode full: libjpeg-turbo", timed(
                lambda: simplejpeg.decode_jpeg(data, colorspace="BGR"))[0])
            note("decode full: Pillow", timed(
                lambda: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))[0])
            reduced = {}
            for factor in (2, 4, 8):
                height, width = simplejpeg.decode_jpeg_header(data)[:2]
                ms, reduced[factor] = timed(lambda: simplejpeg.decode_jpeg(
                    data, colorspace="BGR", min_width=-(-width // factor),
                    min_height=-(-height // factor)))
                note(f"decode 1/{factor}: libjpeg-turbo", ms)
            note("decode_image_checked (today's embed)", timed(
                lambda: sort_faces.decode_image_checked(str(path)))[0])
            ms, (boxes, kps) = timed(lambda: detector.detect(full, max_num=0, metric="default"))
            note("detect at 640, from the full decode", ms)
            note("detect at 640, from the 1/4 decode", timed(
                lambda: detector.detect(reduced[4], max_num=0, metric="default"))[0])
            for box, points in zip(boxes, kps):
                face = sort_faces_face(box, points)
                note("recognizer, per face", timed(lambda: recognizer.get(full, face))[0])
                note("blur score, per face", timed(lambda: sort_faces.blur_score(full, box[:4]))[0])
            note("perceptual hashes (full decode)", timed(lambda: sort_faces.perceptual_hashes(full))[0])
            note("perceptual hashes (1/4 decode)", timed(
                lambda: sort_faces.perceptual_hashes(reduced[4]))[0])
        heic = heic_cost(photos[0])
        print(f"{len(photos)} photos of 4000x3000, JPEG q92, "
              f"{statistics.median(p.stat().st_size for p in photos) / 2**20:.1f} MB median")
        print(f"{'stage':44} {'median ms':>10}")
        for stage, values in times.items():
            print(f"{stage:44} {statistics.median(values):10.1f}")
        print(heic)


def sort_faces_face(box, points):
    from insightface.app.common import Face

    return Face(bbox=box[:4], kps=points, det_score=box[4])


def heic_cost(photo: Path) -> str:
    """The HEIC decode of one photo (pillow-heif), whole and with its thumbnail."""
    try:
        import pillow_heif
        from PIL import Image
    except ImportError:
        return "HEIC: pillow-heif not installed"
    pillow_heif.register_heif_opener()
    image = Image.open(photo)
    buffer = io.BytesIO()
    image.save(buffer, format="HEIF", quality=85)
    data = buffer.getvalue()
    ms_full, _ = timed(lambda: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), 3)
    threads = pillow_heif.options.DECODE_THREADS
    pillow_heif.options.DECODE_THREADS = 1  # what one worker of a busy pool gets
    ms_one, _ = timed(lambda: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), 3)
    pillow_heif.options.DECODE_THREADS = threads
    heif = pillow_heif.open_heif(io.BytesIO(data))
    thumbs = [t.size for t in heif[0].thumbnails] if hasattr(heif[0], "thumbnails") else []
    return (f"HEIC 4000x3000 ({len(data) / 2**20:.1f} MB): full decode {ms_full:.0f} ms wall with "
            f"libheif's {threads} decode threads, {ms_one:.0f} ms with one; "
            f"pillow-heif offers no scaled decode; thumbnails stored in this file: {thumbs or 'none'}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 24)
