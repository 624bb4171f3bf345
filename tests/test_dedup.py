"""dedup: byte copies and edited copies of real photos are grouped; different
photos of the same person are not."""

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

import sort_faces
from conftest import DATA, embed_quiet, tree_fingerprint

PEOPLE = ("barack_obama", "joe_biden", "kit_harington")
# The shared set holds one real near-duplicate: obama_small.jpg is a crop of
# obama.jpg, resized (the hash cannot see it; the faces can).
REAL_CROPS = {"obama_small.jpg": "obama.jpg"}


@pytest.fixture(scope="module")
def duplicated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dedup")
    src = tmp / "src"
    originals, crops = [], []
    for person in PEOPLE:
        for photo in sorted((DATA / "face_recognition" / person).iterdir()):
            target = src / person / photo.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(photo, target)
            if photo.name not in REAL_CROPS:
                originals.append(target)
            else:
                crops.append(target)
    edits = {}
    for photo in originals[::2]:  # every other photo gets edited copies
        image = cv2.imread(str(photo))
        h, w = image.shape[:2]
        stem = src / "edits" / photo.stem
        stem.parent.mkdir(exist_ok=True)
        dy, dx = round(h * 0.015), round(w * 0.015)  # a 3% crop: 1.5% off each side
        variants = {
            "q30.jpg": lambda p: cv2.imwrite(p, image, [cv2.IMWRITE_JPEG_QUALITY, 30]),
            "half.jpg": lambda p: cv2.imwrite(p, cv2.resize(image, (w // 2, h // 2),
                                                            interpolation=cv2.INTER_AREA)),
            "crop.jpg": lambda p: cv2.imwrite(p, image[dy:h - dy, dx:w - dx]),
            "png.png": lambda p: cv2.imwrite(p, image),
            # what the hash cannot see: a crop of 5% per side, a turn in pixels, a mirror
            "crop5.jpg": lambda p: cv2.imwrite(p, image[round(h * .05):h - round(h * .05),
                                                         round(w * .05):w - round(w * .05)]),
            "turned.jpg": lambda p: cv2.imwrite(p, cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)),
            "mirror.jpg": lambda p: cv2.imwrite(p, image[:, ::-1]),
        }
        edits[str(photo)] = []
        for suffix, write in variants.items():
            path = f"{stem}_{suffix}"
            write(path)
            edits[str(photo)].append(path)
    for crop in crops:  # the real crop belongs with its original's edits
        original = str(crop.with_name(REAL_CROPS[crop.name]))
        edits.setdefault(original, []).append(str(crop))
    shutil.copy2(originals[0], src / "byte copy.jpg")
    cache = tmp / "cache" / "c.npz"
    embed_quiet(src, cache)
    before = tree_fingerprint(src)
    report = sort_faces.dedup(cache, quiet=True)
    assert tree_fingerprint(src) == before  # dedup only reports
    return {"src": src, "cache": cache, "report": report, "edits": edits, "originals": originals}


def group_of(report, path):
    for group in report["visual"]:
        members = [group["keep"]["path"]] + [o["path"] for o in group["others"]]
        if path in members:
            return members
    return [path]


def test_report_is_written_beside_the_cache(duplicated):
    target = duplicated["cache"].with_name("c.duplicates.json")
    assert json.loads(target.read_text()) == json.loads(json.dumps(duplicated["report"]))


def test_byte_copies_are_grouped_as_byte_identical(duplicated):
    groups = duplicated["report"]["byte_identical"]
    assert len(groups) == 1
    assert sorted([groups[0]["keep"]] + groups[0]["others"]) == sorted(
        [str(duplicated["originals"][0]), str(duplicated["src"] / "byte copy.jpg")])


def test_edited_copies_are_grouped_with_their_original(duplicated):
    report = duplicated["report"]
    for original, copies in duplicated["edits"].items():
        assert sorted(group_of(report, original)) == sorted([original] + copies), original
    assert report["summary"]["visual_groups"] == len(duplicated["edits"])
    # keep: the largest resolution, then the largest file (the PNG of a JPEG original)
    for group in report["visual"]:
        pixels = [o["width"] * o["height"] for o in group["others"]]
        assert group["keep"]["width"] * group["keep"]["height"] >= max(pixels)


def test_different_photos_of_one_person_are_not_duplicates(duplicated):
    report = duplicated["report"]
    originals = [str(p) for p in duplicated["originals"]]
    for path in originals:
        others = [o for o in group_of(report, path) if o != path]
        assert not set(others) & set(originals), (path, others)


def test_summary_counts_what_could_be_removed(duplicated):
    summary = duplicated["report"]["summary"]
    assert summary["removable_files"] == 1 + sum(len(c) for c in duplicated["edits"].values())
    expected = Path(duplicated["src"] / "byte copy.jpg").stat().st_size
    for original, copies in duplicated["edits"].items():
        members = [original] + copies
        keeper = next(g["keep"]["path"] for g in duplicated["report"]["visual"]
                      if g["keep"]["path"] in members)
        expected += sum(Path(p).stat().st_size for p in members if p != keeper)
    assert summary["bytes_freed"] == expected


def face_patch(image, box, size=96):
    """The square around a face box (twice its size), as gray levels at size x size."""
    x1, y1, x2, y2 = box
    half = max(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    matrix = np.float32([[size / (2 * half), 0, size / 2 - cx * size / (2 * half)],
                         [0, size / (2 * half), size / 2 - cy * size / (2 * half)]])
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return cv2.warpAffine(gray, matrix, (size, size), borderMode=cv2.BORDER_REFLECT).astype(float)


def same_picture(cache, path_a, path_b) -> bool:
    """An independent check: around their largest faces, the two photos have the
    same pixels (whatever the crop or scale), as they are or turned or mirrored."""
    def largest(path):
        row = list(cache["files"]).index(path)
        faces = np.flatnonzero(cache["face_file"] == row)
        if not len(faces):
            return cv2.imread(path), None
        return cv2.imread(path), cache["bbox"][max(faces, key=lambda f: np.ptp(cache["bbox"][f][::2]))]

    (a, box_a), (b, box_b) = largest(path_a), largest(path_b)
    if box_a is None or box_b is None:  # a turned copy the detector missed: whole images
        variants = [b, cv2.rotate(b, cv2.ROTATE_90_CLOCKWISE), cv2.rotate(b, cv2.ROTATE_180),
                    cv2.rotate(b, cv2.ROTATE_90_COUNTERCLOCKWISE), b[:, ::-1]]
        small = lambda im: cv2.resize(cv2.cvtColor(im, cv2.COLOR_BGR2GRAY), (64, 64),  # noqa: E731
                                      interpolation=cv2.INTER_AREA).astype(float)
        return min(np.abs(small(a) - small(v)).mean() for v in variants) < 12
    def correlation(p, q):  # normalised: brightness and contrast edits do not count
        p, q = (p - p.mean()) / (p.std() + 1e-9), (q - q.mean()) / (q.std() + 1e-9)
        return float((p * q).mean())

    patch_a = face_patch(a, box_a)
    mirrored = b[:, ::-1].copy()
    flipped_box = [b.shape[1] - box_b[2], box_b[1], b.shape[1] - box_b[0], box_b[3]]
    return max(correlation(patch_a, face_patch(b, box_b)),
               correlation(patch_a, face_patch(mirrored, flipped_box))) > 0.8


def test_visual_groups_on_the_labeled_sets_are_the_same_picture(labeled_cache, tmp_path):
    cache = tmp_path / "c.npz"
    shutil.copy2(labeled_cache, cache)
    report = sort_faces.dedup(cache, quiet=True)
    data = sort_faces.load_cache(cache)
    assert report["visual"]  # the labeled sets hold real crops (five_celebs' Seinfeld 10 and 13)
    for group in report["visual"]:
        members = [group["keep"]["path"]] + [o["path"] for o in group["others"]]
        for other in members[1:]:
            assert same_picture(data, members[0], other), members


def test_a_cache_without_perceptual_hashes_gets_them(duplicated, tmp_path):
    cache_path = tmp_path / "old.npz"
    cache = sort_faces.load_cache(duplicated["cache"])
    expected = cache["file_phash"].copy()
    cache.meta.pop("phash")  # as written before hashes were stored
    cache._chunks["file_phash"] = [np.zeros_like(expected)]
    sort_faces.save_cache(cache_path, cache)
    report = sort_faces.dedup(cache_path, quiet=True)
    assert np.array_equal(sort_faces.load_cache(cache_path)["file_phash"], expected)
    assert report["summary"]["visual_groups"] == duplicated["report"]["summary"]["visual_groups"]
