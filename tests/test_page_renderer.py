"""The review page's HTML from its data (render_review_page,
write_review_page): names, links and escaping, an atomic write, then opened in
headless Chromium through tests/browser.py (Debian's chromium package; .ci/run
installs it), a big page among them. The thumbnails on it are of real faces of
the shared photos (face_boxes), read only."""

import html
import re
import time
import urllib.parse
from pathlib import Path

import pytest

import sort_faces
from browser import check_page, require_chromium

rv = sort_faces

WEIRD_NAME = 'Tom & "Jerry" <b>'


@pytest.fixture(scope="module")
def review_folder(tmp_path_factory, face_boxes):
    """A cluster-like output folder: thumbnails of real faces and index.html."""
    out = tmp_path_factory.mktemp("review")
    thumbs_dir = out / rv.THUMBS_DIR_NAME
    thumbs_dir.mkdir()
    by_person: dict[str, list] = {}
    total = 0
    for photo_path, boxes in sorted(face_boxes.items()):
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
