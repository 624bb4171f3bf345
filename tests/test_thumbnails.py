"""Tests for review_section.py: face thumbnails and the index.html review page.

Thumbnails are checked against sort_faces.decode_image (the frame face boxes
live in): upright, all eight EXIF orientations, and images reduced for being
above MAX_DECODE_PIXELS (lowered here so small files exercise it). The page is
built from real photos of the shared data set (read only), unit-checked, then
opened in headless Chromium through tests/browser.py (Debian's chromium
package; .ci/run installs it).
"""

import html
import os
import re
import time
import urllib.parse
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import sort_faces  # noqa: E402
from browser import check_page, require_chromium  # noqa: E402
from conftest import DATA  # noqa: E402

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
    left, top, right, bottom = rv._square_box(bbox, rv.THUMB_PAD)
    x0, y0, x1, y1 = int(np.floor(left)), int(np.floor(top)), int(np.ceil(right)), int(np.ceil(bottom))
    canvas = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
    h, w = rgb.shape[:2]
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    canvas[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = rgb[iy0:iy1, ix0:ix1]
    box = (left - x0, top - y0, right - x0, bottom - y0)
    return np.asarray(Image.fromarray(canvas).resize((size, size), Image.Resampling.LANCZOS, box=box))


def _diff(a, b) -> float:
    return float(np.mean(np.abs(a.astype(np.float32) - b.astype(np.float32))))


@pytest.fixture(scope="module")
def detected(tmp_path_factory):
    """Real face boxes (decode_image's frame): face_recognition and group_photos
    embedded with the offline buffalo_s pack, as the tool itself does (~4 s)."""
    tmp = tmp_path_factory.mktemp("embed")
    os.environ.setdefault("FACESETS_LOG_DIR", str(tmp / "logs"))
    cache_path = tmp / "faces.npz"
    for folder in ("face_recognition", "group_photos"):
        sort_faces.embed(DATA / folder, cache_path, model="buffalo_s", quiet=True)
    cache = sort_faces.load_cache(cache_path)
    files = cache["files"]
    faces: dict[str, list] = {}
    for index, bbox in zip(cache["face_file"], cache["bbox"]):
        faces.setdefault(str(files[index]), []).append(tuple(float(v) for v in bbox))
    return faces


# --------------------------------------------------------------------------
# Thumbnails
# --------------------------------------------------------------------------

OBAMA = DATA / "face_recognition" / "barack_obama" / "obama.jpg"


@pytest.fixture(scope="module")
def obama_box(detected):
    return detected[str(OBAMA)][0]


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


# --------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------

WEIRD_NAME = 'Tom & "Jerry" <b>'


@pytest.fixture(scope="module")
def review_folder(tmp_path_factory, detected):
    """A cluster-like output folder: thumbnails of real faces and index.html."""
    out = tmp_path_factory.mktemp("review")
    thumbs_dir = out / rv.THUMBS_DIR_NAME
    thumbs_dir.mkdir()
    by_person: dict[str, list] = {}
    total = 0
    for photo_path, boxes in sorted(detected.items()):
        photo = Path(photo_path)
        datas = rv.face_thumbnails(photo_path, boxes)
        person = photo.parent.name if photo.parent.parent.name == "face_recognition" else "group"
        for box, data in zip(boxes, datas):
            name = rv.thumb_file_name(str(photo), box)
            (thumbs_dir / name).write_bytes(data)
            by_person.setdefault(person, []).append((photo, box, name))
            total += 1
    groups = []
    for index, (person, faces) in enumerate(sorted(by_person.items())):
        folder = f"person_{index + 1:03d}"
        (out / folder).mkdir()
        thumbs = []
        for n, (photo, box, name) in enumerate(faces):
            (out / folder / photo.name).write_bytes(b"")  # stands in for the linked photo
            thumbs.append({"src": f"{rv.THUMBS_DIR_NAME}/{name}", "href": f"{folder}/{photo.name}",
                           "title": f"{photo.name} box {[round(v) for v in box]}",
                           "badge": f"{0.9 - n * 0.05:.2f}", "mark": "top" if n == 0 else None})
        group = {"name": folder if person != "group" else WEIRD_NAME,
                 "href": f"{folder}/", "subtitle": f"{len(faces)} faces ({person})", "thumbs": thumbs[:-1] or thumbs}
        if len(thumbs) > 1:
            group["sections"] = [{"heading": "dropped by the quality gate (1)",
                                  "thumbs": [dict(thumbs[-1], mark="dropped", badge="blur")]}]
        groups.append(group)
    # Singletons: the whole row collapsed; reuses thumbnails already written.
    (out / "_singletons").mkdir()
    singles = [dict(g["thumbs"][0], href="_singletons/", badge=None, mark=None) for g in groups[:3]]
    groups.append({"name": "_singletons", "href": "_singletons/", "subtitle": f"{len(singles)} faces",
                   "thumbs": singles, "collapsed": True})
    groups.append({"name": "_noface", "href": "_singletons/", "subtitle": "0 faces", "thumbs": [],
                   "collapsed": True})
    (out / "faceset_001_top30.fsz").write_bytes(b"x" * 123456)
    page = {"title": "cluster: person folders",
            "summary": f"{len(groups) - 2} people, {len(singles)} singletons, {total} faces",
            "groups": groups,
            "files": [{"name": "faceset_001_top30.fsz", "href": "faceset_001_top30.fsz", "bytes": 123456}]}
    path = rv.write_review_page(out, page)
    return out, page, path


def _count_thumbs(page):
    return sum(len(g.get("thumbs") or []) + sum(len(s["thumbs"]) for s in g.get("sections") or [])
               for g in page["groups"])


def test_page_html_names_links_and_escaping(review_folder):
    out, page, path = review_folder
    assert path == out / "index.html" and not list(out.glob(".index.html.*"))
    text = path.read_text("utf-8")
    assert sum(1 for g in page["groups"] if g["thumbs"]) >= 4
    assert text.count(" data-row data-name=") == len(page["groups"])
    assert len(re.findall(r"<img data-thumb ", text)) == _count_thumbs(page) >= 25
    for group in page["groups"]:
        assert html.escape(group["name"]) in text and html.escape(group["subtitle"]) in text
    assert WEIRD_NAME not in text and "Tom &amp; &quot;Jerry&quot; &lt;b&gt;" in text
    assert "<b>" not in text.replace("<body>", "")
    # Nothing external: every link and image is a file beside the page.
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)
    links = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert len(links) > 2 * _count_thumbs(page)
    for link in links:
        target = out / urllib.parse.unquote(html.unescape(link))
        assert target.exists(), link
    assert text.count("<details") == 2 + sum(len(g.get("sections") or []) for g in page["groups"])
    assert "120.6 KB" in text and 'loading="lazy"' in text and 'width="112" height="112"' in text


def test_page_escapes_and_quotes_every_field():
    page = {"title": "a<b>&c", "summary": '"s"', "files": [{"name": "f&.fsz", "href": "f&.fsz", "bytes": 10}],
            "groups": [{"name": "n<1>", "href": "dir with space/#x?/", "subtitle": "<i>",
                        "thumbs": [{"src": "_thumbs/a b&c.jpg", "href": 'p"q.jpg', "title": "<t>",
                                    "badge": "<1>", "mark": 'top" onload="x'}]}]}
    text = rv.render_review_page(page)
    for raw in ("a<b>", "<i>", "<t>", "<1>", 'p"q', "onload="):
        assert raw not in text
    assert "<title>a&lt;b&gt;&amp;c</title>" in text
    assert 'href="dir%20with%20space/%23x%3F/"' in text and 'src="_thumbs/a%20b%26c.jpg"' in text
    assert 'class="t mark mark-toponloadx"' in text


def test_write_is_atomic_and_replaces(tmp_path):
    rv.write_review_page(tmp_path, {"title": "one", "groups": []})
    rv.write_review_page(tmp_path, {"title": "two", "groups": []})
    assert "<title>two</title>" in (tmp_path / "index.html").read_text("utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["index.html"]


def needs_chromium(test):
    """The browser checks: skipped, saying so, without Chromium (failed in CI)."""
    def run(*args, **kwargs):
        require_chromium()
        return test(*args, **kwargs)
    run.__name__, run.__wrapped__ = test.__name__, test
    return run


@needs_chromium
def test_page_in_chromium(review_folder, tmp_path):
    out, page, path = review_folder
    screenshot = tmp_path / "review-screenshot.png"  # an artifact to look at, never in work/
    result = check_page(path, screenshot=screenshot)
    n = _count_thumbs(page)
    assert result["rows"] == len(page["groups"])
    assert result["thumbs"] == n
    assert result["decoded"] == n, result["failed"]
    assert result["title"] == page["title"]
    assert screenshot.stat().st_size > 10_000


@needs_chromium
def test_page_in_chromium_reports_missing_thumbnails(review_folder, tmp_path):
    out, page, _ = review_folder
    broken = dict(page, groups=[dict(page["groups"][0], thumbs=[{"src": "_thumbs/missing.jpg"}], sections=[])])
    for item in out.iterdir():  # the same files beside the page, through links
        if item.name != "index.html":
            (tmp_path / item.name).symlink_to(item)
    result = check_page(rv.write_review_page(tmp_path, broken))
    assert (result["thumbs"], result["decoded"]) == (1, 0)
    assert result["failed"] == ["_thumbs/missing.jpg"]


def big_page(review_folder, rows=500, per_row=40):
    """500 rows x 40 thumbnails, cycling through the real thumbnail files."""
    out, page, _ = review_folder
    files = sorted(p.name for p in (out / rv.THUMBS_DIR_NAME).iterdir())
    groups = []
    for r in range(rows):
        thumbs = [{"src": f"{rv.THUMBS_DIR_NAME}/{files[(r * per_row + i) % len(files)]}",
                   "href": "person_001/", "title": f"face {i} of row {r}",
                   "badge": f"{i / per_row:.2f}", "mark": "top" if i < 3 else None}
                  for i in range(per_row)]
        groups.append({"name": f"person_{r + 1:03d}", "href": "person_001/",
                       "subtitle": f"{per_row} faces in {per_row} images", "thumbs": thumbs,
                       "collapsed": r >= rows - 2})
    return {"title": "cluster: 500 people", "summary": f"{rows} people, {rows * per_row} faces",
            "groups": groups}


@needs_chromium
def test_big_page_renders_fast_and_loads(review_folder, tmp_path):
    page = big_page(review_folder)
    started = time.perf_counter()
    text = rv.render_review_page(page)
    render_s = time.perf_counter() - started
    out, _, _ = review_folder
    (tmp_path / rv.THUMBS_DIR_NAME).symlink_to(out / rv.THUMBS_DIR_NAME)
    path = tmp_path / "index.html"
    path.write_text(text, "utf-8")
    result = check_page(path, timeout=180)
    print(f"\nbig page: {len(text) / 1e6:.2f} MB HTML, rendered in {render_s:.3f} s; "
          f"chromium check {result['seconds']} s: {result['rows']} rows, "
          f"{result['thumbs']} thumbs, {result['decoded']} decoded")
    assert render_s < 2.0
    assert (result["rows"], result["thumbs"], result["decoded"]) == (500, 20_000, 20_000)
