"""12 MP phone-like JPEGs made from the shared labeled photos (issue 16).

    .venv/bin/python tests/benchmarks/phone_photos.py FOLDER [COUNT [PROCESSES]]

Each photo takes one shared photo (cycling through every set: five_celebs,
lfw10, face_recognition, group_photos), scales it up to cover a 4000x3000
frame (the centre kept), softens it a little and adds sensor grain, and saves
it as JPEG quality 92 (about 1-2 MB, as a phone's). Every fourth is stored
turned on its side with EXIF orientation 6 to turn it back, as a phone stores
a photo taken the other way up. Faces come out at a phone portrait's size
(hundreds of pixels); the group photos give the small faces of a group shot.
Used by bench_embed.py --phone and bench_decode_stages.py; the tests make a
few the same way (tests/test_reduced_decode.py). Written only into FOLDER.
"""

import io
import sys
from pathlib import Path

import cv2
import numpy as np

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "faces"
FRAME = (4000, 3000)  # width, height of a 12 MP phone photo


def shared_photos(data: Path = DATA) -> list[Path]:
    sets = ("five_celebs", "lfw10", "face_recognition", "group_photos")
    by_set = [sorted(p for p in (data / s).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
              for s in sets]
    # interleave the sets, so a short run still sees every kind
    return [p for group in zip(*[iter_cycle(g, max(map(len, by_set))) for g in by_set]) for p in group]


def iter_cycle(items: list, length: int) -> list:
    return [items[i % len(items)] for i in range(length)]


def phone_photo(source: Path, seed: int, portrait: bool = False) -> bytes:
    """The JPEG bytes of one phone-like photo made from `source`."""
    from PIL import Image

    image = cv2.imread(str(source), cv2.IMREAD_COLOR)
    width, height = FRAME
    scale = max(width / image.shape[1], height / image.shape[0])
    big = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    top, left = (big.shape[0] - height) // 2, (big.shape[1] - width) // 2
    frame = cv2.GaussianBlur(big[top:top + height, left:left + width], (0, 0), 0.8)
    grain = np.random.default_rng(seed).integers(-4, 5, frame.shape, dtype=np.int16)
    frame = np.clip(frame + grain, 0, 255).astype(np.uint8)
    rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    exif = Image.Exif()
    if portrait:  # stored on its side; orientation 6 turns it 90 degrees clockwise to view
        rgb = np.ascontiguousarray(np.rot90(rgb, 1))
        exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=92, exif=exif.tobytes())
    return buffer.getvalue()


def make_phone_photo(path: Path, source: Path, index: int) -> Path:
    """The phone photo number `index` at `path` (made once: an existing one is kept)."""
    if not path.exists():
        data_bytes = phone_photo(source, index, portrait=index % 4 == 3)
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data_bytes)
        tmp.replace(path)
    return path


def make_phone_photos(folder: Path, count: int, data: Path = DATA,
                      processes: int = 1) -> list[Path]:
    """`count` phone photos in `folder` (made once: existing ones are kept),
    by `processes` processes side by side (each photo is its own: the same
    bytes however many make them)."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = shared_photos(data)
    jobs = [(folder / f"phone_{index:04d}.jpg", sources[index % len(sources)], index)
            for index in range(count)]
    if processes <= 1:
        return [make_phone_photo(*job) for job in jobs]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(processes) as pool:
        return list(pool.map(make_phone_photo, *zip(*jobs))) if jobs else []


if __name__ == "__main__":
    made = make_phone_photos(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 200,
                             processes=int(sys.argv[3]) if len(sys.argv) > 3 else 1)
    print(f"{len(made)} photos in {sys.argv[1]}")
