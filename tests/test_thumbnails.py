"""Face thumbnails (face_thumbnail, face_thumbnails, thumb_file_name), checked
against sort_faces.decode_image, the frame face boxes live in: upright, all
eight EXIF orientations, a big JPEG decoded in draft, images reduced for being
above MAX_DECODE_PIXELS (lowered here so small files exercise it), odd modes
and HEIC. The boxes are real: the shared photos embedded once (face_boxes)."""

import time

import cv2
import numpy as np
import pytest
from PIL import Image

import sort_faces
from conftest import DATA, thumb_square

rv = sort_faces


# Inverse of each EXIF orientation's display transform: raw pixels to store so
# that exif_transpose shows the upright picture.
STORE_FOR_ORIENTATION = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def _jpeg_rgb(data: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _reference_thumb(path, bbox, size=rv.THUMB_SIZE):
    """The thumbnail the slow way: the same square, cut from the full
    decode_image output (no draft, no EXIF handling of its own)."""
    bgr, _, _ = sort_faces.decode_image(str(path))
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    left, top, right, bottom = thumb_square(bbox, rv.THUMB_PAD)
    x0, y0, x1, y1 = int(np.floor(left)), int(np.floor(top)), int(np.ceil(right)), int(np.ceil(bottom))
    canvas = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
    h, w = rgb.shape[:2]
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    canvas[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = rgb[iy0:iy1, ix0:ix1]
    box = (left - x0, top - y0, right - x0, bottom - y0)
    return np.asarray(Image.fromarray(canvas).resize((size, size), Image.Resampling.LANCZOS, box=box))


def _diff(a, b) -> float:
    return float(np.mean(np.abs(a.astype(np.float32) - b.astype(np.float32))))


OBAMA = DATA / "face_recognition" / "barack_obama" / "obama.jpg"


@pytest.fixture(scope="module")
def obama_box(face_boxes):
    return face_boxes[str(OBAMA)][0]


def test_thumbnail_is_square_jpeg_of_the_face(obama_box):
    data = rv.face_thumbnail(str(OBAMA), obama_box)
    assert data[:3] == b"\xff\xd8\xff"
    with Image.open(__import__("io").BytesIO(data)) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (112, 112)
    assert _diff(_jpeg_rgb(data), _reference_thumb(OBAMA, obama_box)) < 7
    assert rv.face_thumbnail(str(OBAMA), obama_box, size=64)[:3] == b"\xff\xd8\xff"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_rotated_photo_gives_the_same_face(tmp_path, obama_box, orientation):
    upright = Image.open(OBAMA).convert("RGB")
    stored = upright.transpose(STORE_FOR_ORIENTATION[orientation]) if orientation > 1 else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    rotated_path = tmp_path / f"rotated{orientation}.jpg"
    stored.save(rotated_path, quality=95, exif=exif)
    upright_thumb = _jpeg_rgb(rv.face_thumbnail(str(OBAMA), obama_box))
    rotated_thumb = _jpeg_rgb(rv.face_thumbnail(str(rotated_path), obama_box))
    assert _diff(upright_thumb, rotated_thumb) < 6
    # A box that ignored the orientation would crop something else entirely.
    if orientation > 1:
        assert _diff(upright_thumb, np.asarray(stored.crop((0, 0, 112, 112)))) > 15


def test_draft_decoding_of_a_big_jpeg_matches_a_full_decode(tmp_path, obama_box):
    big = Image.open(OBAMA).convert("RGB")
    big = big.resize((big.width * 4, big.height * 4), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "big.jpg"
    big.transpose(Image.Transpose.ROTATE_90).save(path, quality=92, exif=exif)
    box = tuple(v * 4 for v in obama_box)
    started = time.perf_counter()
    fast = _jpeg_rgb(rv.face_thumbnail(str(path), box))
    fast_s = time.perf_counter() - started
    started = time.perf_counter()
    slow = _reference_thumb(path, box)
    slow_s = time.perf_counter() - started
    assert _diff(fast, slow) < 6
    assert fast_s < slow_s  # the face is ~4x112 px: decoded at 1/4 scale


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("limit", [600_000, 150_000])
def test_boxes_of_reduced_decodes(tmp_path, monkeypatch, obama_box, fmt, limit):
    """Photos above MAX_DECODE_PIXELS: boxes are at full resolution, as the
    cache stores them (issue 25), whatever the reduction that decodes them."""
    upright = _jpeg_rgb(rv.face_thumbnail(str(OBAMA), obama_box))
    monkeypatch.setattr(sort_faces, "MAX_DECODE_PIXELS", limit)
    monkeypatch.setattr(rv, "MAX_DECODE_PIXELS", limit)
    exif = Image.Exif()
    exif[0x0112] = 8
    path = tmp_path / ("photo.jpg" if fmt == "JPEG" else "photo.png")
    Image.open(OBAMA).convert("RGB").transpose(Image.Transpose.ROTATE_270).save(path, exif=exif)
    bgr, full_w, full_h = sort_faces.decode_image(str(path))
    assert bgr.shape[1] < full_w  # really reduced
    factor = round(full_w / bgr.shape[1])
    thumb = _jpeg_rgb(rv.face_thumbnail(str(path), obama_box))
    # the slow way cuts the decode_image output, in the reduced frame
    assert _diff(thumb, _reference_thumb(path, tuple(v / factor for v in obama_box))) < 8
    # The same face as the un-reduced upright photo.
    assert _diff(thumb, upright) < 10


def test_box_past_the_edge_is_padded_black_and_modes_convert(tmp_path):
    path = tmp_path / "rgba.png"
    rgba = np.zeros((100, 120, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent: white after compositing
    Image.fromarray(rgba, "RGBA").save(path)
    thumb = _jpeg_rgb(rv.face_thumbnail(str(path), (0, 0, 40, 40), size=60))
    assert thumb[5, 5].max() < 20  # outside the photo: black
    assert thumb[40, 40].min() > 235  # transparent photo: white
    deep = tmp_path / "gray16.png"
    Image.fromarray(np.full((80, 80), 40000, np.uint16)).save(deep)
    gray = _jpeg_rgb(rv.face_thumbnail(str(deep), (20, 20, 60, 60), size=32))
    assert abs(int(gray[16, 16, 0]) - 40000 * 255 // 65535) < 6
    faces = rv.face_thumbnails(str(path), [(0, 0, 40, 40), (60, 50, 110, 90)], size=48)
    assert len(faces) == 2 and rv.face_thumbnails(str(path), []) == []
    cmyk = tmp_path / "cmyk.jpg"
    Image.open(OBAMA).convert("CMYK").save(cmyk)
    assert _jpeg_rgb(rv.face_thumbnail(str(cmyk), (300, 100, 600, 400))).shape == (112, 112, 3)


def test_heic_photo(tmp_path, obama_box):
    import pillow_heif
    pillow_heif.register_heif_opener()
    path = tmp_path / "photo.heic"
    Image.open(OBAMA).save(path, quality=90)
    thumb = _jpeg_rgb(rv.face_thumbnail(str(path), obama_box))
    assert _diff(thumb, _jpeg_rgb(rv.face_thumbnail(str(OBAMA), obama_box))) < 8


def test_thumb_file_name_is_stable():
    a = rv.thumb_file_name("/x/y.jpg", (1, 2, 3, 4))
    assert a == rv.thumb_file_name("/x/y.jpg", np.array([1.0, 2.0, 3.0, 4.0], np.float32))
    assert a != rv.thumb_file_name("/x/y.jpg", (1, 2, 3, 5)) and a.endswith(".jpg")
