"""The review pages the steps write, on real photos, checked as HTML and in Chromium."""

import re
import shutil
import urllib.parse
from pathlib import Path

import pytest

import sort_faces
from browser import check_page, require_chromium
from conftest import DATA, embed_quiet


@pytest.fixture(scope="module")
def outputs(labeled_export):
    return labeled_export


def links(page: Path) -> list[str]:
    text = page.read_text()
    return [urllib.parse.unquote(v) for v in re.findall(r'(?:href|src)="([^"]+)"', text)]


def rows(page: Path) -> dict[str, str]:
    """row name -> its subtitle."""
    text = page.read_text()
    found = re.findall(r'data-name="([^"]*)".*?<span class="sub">([^<]*)</span>', text, re.S)
    return {name: sub for name, sub in found}


@pytest.mark.parametrize("folder", ["raw", "refined", "swap"])
def test_every_link_on_every_page_points_at_a_file(outputs, folder):
    out = outputs["tmp"] / folder
    page = out / "index.html"
    found = links(page)
    assert len(found) > 50
    for link in found:
        assert (out / link).exists(), link
    assert all(not re.match(r"[a-z]+://", link) for link in found)  # nothing from a network


def test_cluster_page_lists_every_person_with_its_size(outputs):
    page = outputs["tmp"] / "raw" / "index.html"
    listed = rows(page)
    for entry in outputs["raw"]["clusters"]:
        assert listed[entry["name"]] == f"{entry['size']} faces in {entry['images']} images"
    assert "_singletons" in listed and "_noface" in listed
    names = list(listed)
    assert names[: len(outputs["raw"]["clusters"])] == [c["name"] for c in outputs["raw"]["clusters"]]


def test_strip_starts_nearest_the_centroid_and_ends_farthest(outputs):
    cache = sort_faces.load_cache(outputs["cache"])
    entry = max(outputs["raw"]["clusters"], key=lambda e: e["size"])
    faces = [f["face"] for f in entry["faces"]]
    strip = sort_faces.strip_faces(cache["embeddings"], faces, nearest=5, farthest=3)
    centroid = sort_faces.unit_rows(cache["embeddings"][faces].mean(axis=0))
    distance = {f: 1 - float(cache["embeddings"][f] @ centroid) for f in faces}
    ranked = sorted(faces, key=distance.get)
    assert strip == ranked[:5] + ranked[-3:]


def test_refine_page_shows_what_each_gate_dropped(outputs):
    listed = rows(outputs["tmp"] / "refined" / "index.html")
    assert any(entry.get("label") for entry in outputs["refined"]["facesets"])
    gated = {"quality": 0, "outlier": 0}
    for entry in outputs["refined"]["facesets"]:
        drops = [d for d in outputs["refined"]["dropped"] if d.get("faceset") == entry["name"]]
        # a named one's heading has its name
        row = listed[sort_faces.entry_title(entry["name"], entry.get("label")).lower()]
        assert row.startswith(f"{entry['size']} faces")
        said = dict(re.findall(r"(quality|outlier) (\d+)", row.partition("; dropped: ")[2]))
        for stage in ("quality", "outlier"):
            count = sum(d["stage"] == stage for d in drops)
            # the exact count; a gate that dropped none of its faces is not named
            assert said.get(stage) == (str(count) if count else None), (entry["name"], row)
            gated[stage] += count
    # the quality gate drops faces of these photos; the outlier gate (at its default) none:
    # its count is checked as 0 on every row
    assert gated["quality"] > 0, gated
    text = (outputs["tmp"] / "refined" / "index.html").read_text()
    some = outputs["refined"]["dropped"][0]
    assert some["reason"].split(";")[0].replace("<", "&lt;") in text


def test_export_page_shows_scores_bundles_and_candidates(outputs):
    text = (outputs["tmp"] / "swap" / "index.html").read_text()
    for entry in outputs["manifest"]["facesets"]:
        for bundle in entry["bundles"]:
            assert bundle["file"] in text
        for crop in entry["crops"]:
            assert f"score {crop['score']:.3f}" in text
        assert "frontality" in text and "sharpness" in text
    assert "candidates for review" in text


def test_thumbnails_are_reused_on_a_rerun(outputs):
    out = outputs["tmp"] / "raw"
    before = {p.name: p.stat().st_mtime_ns for p in (out / "_thumbs").iterdir()}
    sort_faces.cluster(outputs["cache"], out, quiet=True)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "_thumbs").iterdir()}
    assert after == before


def test_extend_rewrites_the_page(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(DATA / "face_recognition" / "barack_obama", src / "obama")
    cache = tmp_path / "c.npz"
    embed_quiet(src, cache)
    sort_faces.cluster(cache, tmp_path / "raw", quiet=True)
    assert "person_002" not in rows(tmp_path / "raw" / "index.html")
    shutil.copytree(DATA / "face_recognition" / "kit_harington", src / "kit")
    embed_quiet(src, cache)
    sort_faces.extend(cache, tmp_path / "raw", quiet=True)
    listed = rows(tmp_path / "raw" / "index.html")
    assert "person_002" in listed
    for link in links(tmp_path / "raw" / "index.html"):
        assert (tmp_path / "raw" / link).exists(), link


def test_cluster_page_in_a_real_browser(outputs, tmp_path):
    require_chromium()
    page = outputs["tmp"] / "raw" / "index.html"
    screenshot = tmp_path / "review-cluster.png"  # an artifact to look at, never in work/
    result = check_page(page, screenshot=screenshot)
    assert result["done"] and result["rows"] == len(outputs["raw"]["clusters"]) + 2
    assert result["thumbs"] > 100 and result["decoded"] == result["thumbs"]
    assert not result["failed"]
    assert screenshot.stat().st_size > 10_000
    for folder in ("refined", "swap"):
        result = check_page(outputs["tmp"] / folder / "index.html")
        assert result["done"] and result["decoded"] == result["thumbs"] > 50
