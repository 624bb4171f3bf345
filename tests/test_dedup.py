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


@pytest.fixture(scope="module")
def duplicated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dedup")
    src = tmp / "src"
    originals = []
    for person in PEOPLE:
        for photo in sorted((DATA / "face_recognition" / person).iterdir()):
            target = src / person / photo.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(photo, target)
            originals.append(target)
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
        }
        edits[str(photo)] = []
        for suffix, write in variants.items():
            path = f"{stem}_{suffix}"
            write(path)
            edits[str(photo)].append(path)
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
    assert summary["removable_files"] == 1 + 4 * len(duplicated["edits"])
    expected = Path(duplicated["src"] / "byte copy.jpg").stat().st_size
    for original, copies in duplicated["edits"].items():
        members = [original] + copies
        keeper = next(g["keep"]["path"] for g in duplicated["report"]["visual"]
                      if g["keep"]["path"] in members)
        expected += sum(Path(p).stat().st_size for p in members if p != keeper)
    assert summary["bytes_freed"] == expected


def test_visual_groups_on_the_labeled_sets_are_the_same_picture(labeled_cache, tmp_path):
    cache = tmp_path / "c.npz"
    shutil.copy2(labeled_cache, cache)
    report = sort_faces.dedup(cache, quiet=True)
    for group in report["visual"]:
        members = [group["keep"]["path"]] + [o["path"] for o in group["others"]]
        images = [cv2.resize(cv2.imread(p, cv2.IMREAD_GRAYSCALE), (64, 64),
                             interpolation=cv2.INTER_AREA).astype(float) for p in members]
        for image in images[1:]:
            assert np.abs(image - images[0]).mean() < 12, members


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
