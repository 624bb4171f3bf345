"""dedup recall on edited copies of the shared photos, and false groups.

    .venv/bin/python tests/benchmarks/measure_dedup_edits.py [N_ORIGINALS]

Takes N originals (default 40) from the shared labeled photos, writes for each
the edits a library holds (crops of 3, 5 and 10% per side; turns of 90, 180
and 270 degrees in pixels; a mirror; JPEG quality 30; half size), embeds
originals and copies into one cache with the real buffalo_s models, runs
`sort_faces.dedup`, and prints per edit the share of copies grouped with their
original. False groups: pairs of two different originals (different shots,
often of the same person) put in one group. Not collected by pytest.
"""

import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "faces"
sys.path.insert(0, str(ROOT))
import sort_faces  # noqa: E402

EDITS = {
    "crop 3%": lambda im: crop(im, 0.03),
    "crop 5%": lambda im: crop(im, 0.05),
    "crop 10%": lambda im: crop(im, 0.10),
    "turn 90": lambda im: cv2.rotate(im, cv2.ROTATE_90_CLOCKWISE),
    "turn 180": lambda im: cv2.rotate(im, cv2.ROTATE_180),
    "turn 270": lambda im: cv2.rotate(im, cv2.ROTATE_90_COUNTERCLOCKWISE),
    "mirror": lambda im: im[:, ::-1],
    "JPEG q30": None,  # written with quality 30
    "half size": lambda im: cv2.resize(im, (im.shape[1] // 2, im.shape[0] // 2),
                                       interpolation=cv2.INTER_AREA),
}
# Near-duplicates the shared sets already hold (looked at: a photo and a crop of
# it, or the same picture twice).
KNOWN_PAIRS = {("face_recognition/barack_obama/obama.jpg",
                "face_recognition/barack_obama/obama_small.jpg"),
               ("five_celebs/jerry_seinfeld/train_10.jpg",
                "five_celebs/jerry_seinfeld/train_13.jpg"),
               ("five_celebs/jerry_seinfeld/train_11.jpg",
                "five_celebs/jerry_seinfeld/train_9.jpg"),
               ("five_celebs/ben_affleck/train_6.jpg", "five_celebs/ben_affleck/val_3.jpg")}


def crop(image, share):
    h, w = image.shape[:2]
    dy, dx = round(h * share), round(w * share)
    return image[dy:h - dy, dx:w - dx]


def originals(count):
    photos = sorted(p for s in ("face_recognition", "five_celebs", "lfw10")
                    for p in (DATA / s).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    step = max(1, len(photos) // count)
    return photos[::step][:count]


def main(count=40):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        copies = {}  # copy path -> (original path, edit)
        chosen = originals(count)
        for index, photo in enumerate(chosen):
            folder = src / f"{index:03d}"
            folder.mkdir(parents=True)
            original = folder / ("original" + photo.suffix.lower())
            shutil.copy2(photo, original)
            image = cv2.imread(str(photo))
            for edit, make in EDITS.items():
                target = folder / (edit.replace(" ", "_").replace("%", "") + ".jpg")
                if make is None:
                    cv2.imwrite(str(target), image, [cv2.IMWRITE_JPEG_QUALITY, 30])
                else:
                    cv2.imwrite(str(target), make(image), [cv2.IMWRITE_JPEG_QUALITY, 95])
                copies[str(target)] = (str(original), edit)
        shared_of = {str(src / f"{i:03d}" / ("original" + p.suffix.lower())):
                     str(p.relative_to(DATA)) for i, p in enumerate(chosen)}
        cache = tmp / "c.npz"
        sort_faces.embed(src, cache, model="buffalo_s", quiet=True)
        started = time.perf_counter()
        report = sort_faces.dedup(cache, quiet=True)
        seconds = time.perf_counter() - started
        group_of = {}
        for number, group in enumerate(report["visual"]):
            for member in [group["keep"]] + group["others"]:
                group_of[member["path"]] = number
        print(f"{len(chosen)} originals, {len(copies)} copies; dedup {seconds:.1f} s")
        print(f"{'edit':10} {'found':>7}  with faces found in the copy")
        cache_data = sort_faces.load_cache(cache)
        has_faces = {str(p): int((cache_data["face_file"] == row).sum()) > 0
                     for row, p in enumerate(cache_data["files"])}
        for edit in EDITS:
            pairs = [(c, o) for c, (o, e) in copies.items() if e == edit]
            found = sum(c in group_of and group_of.get(o) == group_of[c] for c, o in pairs)
            faces = sum(has_faces.get(c, False) for c, _ in pairs)
            print(f"{edit:10} {found:3d}/{len(pairs):<3d}  {faces}/{len(pairs)}")
        false, known = [], []
        originals_grouped = {}
        for original in shared_of:
            if original in group_of:
                originals_grouped.setdefault(group_of[original], []).append(shared_of[original])
        for members in originals_grouped.values():
            for i, a in enumerate(sorted(members)):
                for b in sorted(members)[i + 1:]:
                    (known if (a, b) in KNOWN_PAIRS else false).append((a, b))
        print(f"false groups (two different originals): {len(false)} {false}")
        print(f"real near-duplicates in the shared photos, found: {len(known)} {known}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
