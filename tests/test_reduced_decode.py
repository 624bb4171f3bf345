"""Reduced decoding: photos are decoded only as finely as the detector and each
face need (libjpeg's DCT scaling), with the same faces, embeddings and clusters
as the full-decode path (embed --full-decode), on the shared photos and on
12 MP phone-like photos made from them (issue 16)."""

import importlib.util
import io
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import sort_faces
from conftest import DATA, embed_quiet, run_cli

_spec = importlib.util.spec_from_file_location(
    "phone_photos", Path(__file__).parent / "benchmarks" / "phone_photos.py")
phone_photos = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(phone_photos)


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3)).astype(np.uint8), (0, 0), 3)


def jpeg_bytes(bgr: np.ndarray, orientation: int = 1, quality: int = 92) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(bgr[:, :, ::-1]).save(buffer, format="JPEG", quality=quality,
                                          exif=exif.tobytes())
    return buffer.getvalue()


# --- fast tier: decoding and the reductions, no model -------------------------


@pytest.mark.fast
def test_reductions_are_the_coarsest_that_keep_the_detail():
    assert sort_faces.coarsest_factor(4000, 640) == 4  # 1000 px still covers 640
    assert sort_faces.coarsest_factor(1279, 640) == 1
    assert sort_faces.coarsest_factor(1280, 640) == 2
    assert sort_faces.coarsest_factor(300, 640) == 1  # never below the finest
    assert sort_faces.coarsest_factor(4000, 640, finest=8) == 8
    assert sort_faces.detail_factor(111.0, 1) == 1
    assert sort_faces.detail_factor(224.0, 1) == 2
    assert sort_faces.detail_factor(2000.0, 1) == 16  # beyond the DCT's 1/8, by box-averaging


@pytest.mark.fast
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_a_jpeg_reduced_in_the_dct_matches_the_full_decode_box_averaged(tmp_path, orientation):
    path = tmp_path / f"o{orientation}.jpg"
    path.write_bytes(jpeg_bytes(textured(1203, 1601), orientation))
    photo = sort_faces.PhotoPixels(str(path))
    full = photo.at(1)
    assert (photo.width, photo.height) == full.shape[1::-1]
    for factor in (2, 4, 8, 16):
        reduced = photo.at(factor)
        assert reduced.shape[:2] == (-(-full.shape[0] // factor), -(-full.shape[1] // factor))
        boxed = sort_faces.box_reduce(full, factor, tuple(photo.offset(factor)))
        difference = np.abs(reduced.astype(np.int16) - boxed).astype(np.float64)
        # the DCT's reduction is not a pure box filter: close on average, not equal
        assert difference.mean() < 1.5, (factor, difference.mean())
    assert set(photo.views) == {1, 2, 4, 8, 16}  # each decoded once, kept


@pytest.mark.fast
def test_full_decode_reduces_in_pixels_and_other_formats_do_too(tmp_path):
    data = jpeg_bytes(textured(600, 800), orientation=6)
    (tmp_path / "a.jpg").write_bytes(data)
    whole = sort_faces.PhotoPixels(str(tmp_path / "a.jpg"), dct=False)
    assert np.array_equal(whole.at(4), sort_faces.box_reduce(whole.at(1), 4, (0, 0)))
    assert tuple(whole.offset(4)) == (0, 0)  # 600 and 800 pixels: whole blocks, no edge before
    cv2.imwrite(str(tmp_path / "b.png"), textured(601, 803, seed=1))
    png = sort_faces.PhotoPixels(str(tmp_path / "b.png"))
    assert not png.scales
    assert np.array_equal(png.at(2), sort_faces.box_reduce(png.at(1), 2))
    assert png.at(2).shape[:2] == (301, 402)


@pytest.mark.fast
def test_damage_is_reported_at_every_reduction(tmp_path):
    data = jpeg_bytes(textured(1200, 1600))
    cut = data[:len(data) * 2 // 3] + b"\xff\xd9"  # a cut download, closed with an end marker
    (tmp_path / "cut.jpg").write_bytes(cut)
    for factor in (4, 1):
        photo = sort_faces.PhotoPixels(str(tmp_path / "cut.jpg"))
        photo.at(factor)
        assert "Premature end" in photo.damage or "Corrupt" in photo.damage, factor
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(sort_faces.UnreadableImage, match="empty"):
        sort_faces.PhotoPixels(str(tmp_path / "empty.jpg"))
    (tmp_path / "text.jpg").write_bytes(b"not a photo at all")
    reason = sort_faces.decode_or_reason(sort_faces.PhotoPixels, str(tmp_path / "text.jpg"))
    assert isinstance(reason, str) and "not an image" in reason


@pytest.mark.fast
def test_face_view_reads_the_same_pixels_as_the_whole_image_reduced():
    image = textured(900, 1200, seed=3)
    box = np.array([500.0, 300.0, 740.0, 560.0])
    kps = np.array([[570, 400], [670, 400], [620, 450], [580, 500], [660, 500]], np.float64)
    pixels, box_view, matrix = sort_faces.face_view(image, 2, box, kps)
    crop = cv2.warpAffine(pixels, matrix, (112, 112))
    whole = sort_faces.box_reduce(image, 2)
    expected = cv2.warpAffine(whole, sort_faces.alignment_matrix(kps / 2), (112, 112))
    assert np.abs(crop.astype(np.int16) - expected).max() <= 1
    assert sort_faces.blur_score(pixels, box_view) == pytest.approx(
        sort_faces.blur_score(whole, box / 2), rel=1e-6)


# --- the model tier: the same faces as the full-decode path --------------------


def faces_by_path(cache_path):
    cache = sort_faces.load_cache(cache_path)
    per_file = sort_faces.faces_by_file(cache["face_file"], cache.n_files)
    return cache, {path: per_file[row] for row, path in enumerate(cache["files"])}


def assert_same_faces(fast_cache, full_cache):
    """Same face count per photo, boxes IoU >= 0.9, embeddings cosine >= 0.99,
    the same clusters at the default threshold; returns the worst cosine."""
    fast, fast_faces = faces_by_path(fast_cache)
    full, full_faces = faces_by_path(full_cache)
    assert fast_faces.keys() == full_faces.keys()
    order_fast, order_full, worst = [], [], 1.0
    for path, mine in fast_faces.items():
        theirs = full_faces[path]
        assert len(mine) == len(theirs), path
        if not len(mine):
            continue
        iou = sort_faces.box_iou(fast["bbox"][mine], full["bbox"][theirs])
        match = iou.argmax(axis=1)
        assert len(set(match)) == len(match) and iou.max(axis=1).min() >= 0.9, (path, iou)
        cosine = (fast["embeddings"][mine] * full["embeddings"][theirs[match]]).sum(axis=1)
        assert cosine.min() >= 0.99, (path, cosine)
        worst = min(worst, float(cosine.min()))
        order_fast += list(mine)
        order_full += list(theirs[match])
    threshold = sort_faces.CLUSTER_DEFAULTS["threshold"]
    labels_fast, _ = sort_faces.agglomerative_labels(fast["embeddings"][order_fast], threshold)
    labels_full, _ = sort_faces.agglomerative_labels(full["embeddings"][order_full], threshold)
    assert sort_faces.bcubed(labels_full, labels_fast) == (1.0, 1.0)
    return worst


@pytest.mark.fast
def test_the_small_shared_photos_take_one_path_either_way():
    """lfw10 and five_celebs are under 1280 px: the detector's view is the whole
    decode in both paths (the model test below covers the larger sets)."""
    for photo_set in ("lfw10", "five_celebs"):
        for path in sorted((DATA / photo_set).rglob("*.jpg")):
            photo = sort_faces.PhotoPixels(str(path))
            assert sort_faces.detect_factor(photo, 640) == 1, path


def test_shared_sets_give_the_same_faces_as_the_full_decode(tmp_path):
    src = tmp_path / "src"  # the shared sets whose photos are reduced for the detector
    for photo_set in ("face_recognition", "group_photos"):
        shutil.copytree(DATA / photo_set, src / photo_set)
    fast = embed_quiet(src, tmp_path / "fast.npz")
    full = embed_quiet(src, tmp_path / "full.npz", full_decode=True)
    assert fast["faces"] == full["faces"] > 30 and fast["new"] == full["new"]
    assert_same_faces(tmp_path / "fast.npz", tmp_path / "full.npz")
    fast_cache = sort_faces.load_cache(tmp_path / "fast.npz")
    full_cache = sort_faces.load_cache(tmp_path / "full.npz")
    full_hash = dict(zip(full_cache["files"], full_cache["file_phash"]))
    distance = [bin(int(a) ^ int(full_hash[path])).count("1")
                for path, a in zip(fast_cache["files"], fast_cache["file_phash"])]
    # the DCT's reduction is not quite the box average: a few bits of a few photos move
    assert max(distance) <= sort_faces.DEDUP_TURN_MAX_HAMMING and np.mean(distance) < 0.5


@pytest.fixture(scope="module")
def phone_set(tmp_path_factory):
    """Nine 12 MP phone photos: portraits, LFW faces, a crowd, and group shots stored
    turned on their side with EXIF orientation 6 to turn them back (made as
    tests/benchmarks/phone_photos.py makes them)."""
    photos = phone_photos.make_phone_photos(tmp_path_factory.mktemp("phone") / "src", 8, DATA)
    # a crowd at a distance: faces of 150-250 px, which need a finer decode than 1/4
    selfie = cv2.imread(str(DATA / "group_photos" / "selfie-many-people.jpg"))
    frame = cv2.GaussianBlur(cv2.resize(selfie, (4000, 3000)), (0, 0), 40)
    people = cv2.resize(selfie, None, fx=2.5, fy=2.5, interpolation=cv2.INTER_CUBIC)
    frame[700:700 + people.shape[0], 1200:1200 + people.shape[1]] = people
    crowd = photos[0].parent / "phone_crowd.jpg"
    crowd.write_bytes(jpeg_bytes(frame))
    return photos + [crowd]


def test_12_mp_photos_give_the_same_faces_as_the_full_decode(phone_set, tmp_path):
    src = phone_set[0].parent
    fast = embed_quiet(src, tmp_path / "fast.npz")
    code, _out, err = run_cli("embed", src, tmp_path / "full.npz", "--model", "buffalo_s", "-q",
                              "--full-decode")
    assert code == 0, err
    assert fast["faces"] >= 8 and fast["unreadable"] == 0
    assert_same_faces(tmp_path / "fast.npz", tmp_path / "full.npz")
    cache = sort_faces.load_cache(tmp_path / "fast.npz")
    turned = [row for row, path in enumerate(cache["files"]) if path.endswith("_0003.jpg")]
    assert Image.open(phone_set[3]).size == (3000, 4000)  # stored on its side ...
    assert (cache["file_width"][turned[0]], cache["file_height"][turned[0]]) == (4000, 3000)
    stages = fast["stage_seconds"]
    assert {"decode", "detect", "recognize", "sha256", "journal"} <= stages.keys()


def test_a_photo_is_decoded_finer_at_most_once_and_only_for_small_faces(phone_set, pack_dir):
    app = sort_faces.load_face_analysis(str(pack_dir), ["detection", "recognition"],
                                        ["CPUExecutionProvider"], 640)
    kinds = set()
    for path in phone_set:
        photo = sort_faces.PhotoPixels(str(path))
        faces = sort_faces.embed_photo(app, photo, 640, 512)
        if not len(faces["face_file"]):
            assert set(photo.views) == {4}
            continue
        centres = faces["bbox"].reshape(-1, 2, 2).mean(axis=1)  # upright, full resolution
        assert (centres >= 0).all() and (centres <= [photo.width, photo.height]).all()
        if faces["face_short"].min() >= 4 * sort_faces.FACE_DETAIL_PX:
            assert set(photo.views) == {4}, path  # the detector's 1/4 view served every face
            kinds.add("large faces only")
        else:
            assert len(photo.views) == 2 and min(photo.views) < 4, path  # one finer decode
            kinds.add("a small face")
    assert kinds == {"large faces only", "a small face"}


def test_an_old_caches_perceptual_hashes_are_taken_again_once(celebs_cache, tmp_path):
    cache = sort_faces.load_cache(celebs_cache)
    expected = cache["file_phash"].copy()
    cache.meta["phash"] = "dct32-1:9+turns"  # hashed from the full decode, before issue 16
    cache._chunks["file_phash"] = [np.zeros_like(expected)]
    sort_faces.save_cache(tmp_path / "old.npz", cache)
    sort_faces.dedup(tmp_path / "old.npz", quiet=True)
    again = sort_faces.load_cache(tmp_path / "old.npz")
    assert again.meta["phash"] == sort_faces.PHASH_VERSION
    assert np.array_equal(again["file_phash"], expected)
