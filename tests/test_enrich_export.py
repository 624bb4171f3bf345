"""enrich and export-swap on real photos and the real buffalo_s models."""

import html
import json
import re
import shutil
import urllib.parse
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

import sort_faces
from conftest import DATA, embed_quiet, identity_of

from conftest import EXPORT, NAMED_FACESET


@pytest.fixture(scope="module")
def detector(pack_dir):
    return sort_faces.load_face_analysis(str(pack_dir), ["detection", "recognition"],
                                         ["CPUExecutionProvider"], 640)


@pytest.fixture(scope="module")
def exported(labeled_export):
    return labeled_export


def test_enrich_fills_every_face_and_is_resumable(exported):
    cache = sort_faces.load_cache(exported["cache"])
    assert exported["enriched"]["faces"] == cache.n_faces
    assert np.all(cache.extra["enrich_status"] == "ok")
    assert set(cache.extra["pose_source"]) == {"pnp106"}
    assert np.isfinite(cache.extra["landmark_2d_106"]).all()
    assert np.isfinite(cache.extra["pose"]).all()
    # landmarks sit on their face
    boxes = cache["bbox"]
    centre = cache.extra["landmark_2d_106"].mean(axis=1)
    assert np.all((centre[:, 0] > boxes[:, 0]) & (centre[:, 0] < boxes[:, 2]))
    again = sort_faces.enrich(exported["cache"], quiet=True)
    assert again["faces"] == 0 and again["images"] == 0


def test_enrich_reports_vanished_images_and_new_faces(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(DATA / "face_recognition" / "barack_obama", src)
    cache = tmp_path / "c.npz"
    embed_quiet(src, cache)
    (src / "obama1.jpg").unlink()
    summary = sort_faces.enrich(cache, quiet=True)
    assert summary["missing"] == 1 and summary["images"] == 5 and summary["faces"] == 4
    # the vanished photo's face stays to do; new photos get enriched on the next run
    shutil.copy2(DATA / "face_recognition" / "joe_biden" / "biden.jpg", src / "biden.jpg")
    embed_quiet(src, cache)
    summary = sort_faces.enrich(cache, quiet=True)
    assert summary["faces"] == 1 and summary["missing"] == 1


def test_pose_signs_flip_on_a_mirrored_photo(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("obama1.jpg", "obama2.jpg"):  # turned one way and the other
        image = cv2.imread(str(DATA / "face_recognition" / "barack_obama" / name))
        cv2.imwrite(str(src / name.replace(".jpg", ".png")), image)
        cv2.imwrite(str(src / name.replace(".jpg", "_mirror.png")), cv2.flip(image, 1))
    cache_path = tmp_path / "c.npz"
    embed_quiet(src, cache_path)
    sort_faces.enrich(cache_path, quiet=True)
    cache = sort_faces.load_cache(cache_path)
    pose = {Path(cache["files"][cache["face_file"][f]]).stem: cache.extra["pose"][f]
            for f in range(cache.n_faces)}
    assert pose["obama1"][1] > 10 and pose["obama2"][1] < -10  # sign convention: see README
    for name in ("obama1", "obama2"):
        pitch, yaw, roll = pose[name]
        m_pitch, m_yaw, m_roll = pose[name + "_mirror"]
        assert np.sign(yaw) == -np.sign(m_yaw) and abs(abs(yaw) - abs(m_yaw)) < 5
        assert abs(pitch - m_pitch) < 5
        assert abs(roll) < 1 or np.sign(roll) == -np.sign(m_roll)


def faceset_centroids(exported):
    return {s["name"]: np.asarray(s["centroid"], dtype=np.float32)
            for s in exported["refined"]["facesets"]}


def folder_of(entry: dict) -> str:
    """The folder of a faceset of a manifest as its JSON has it (entry_folder)."""
    return sort_faces.entry_folder(entry["name"], entry.get("label"))


def bundle_of(entry: dict, top_n: int | None = None) -> str:
    """The bundle of a faceset of a manifest as its JSON has it (entry_bundle)."""
    return sort_faces.entry_bundle(entry["name"], entry.get("label"), top_n)


def candidates_of(entry: dict) -> str:
    """The candidates' folder of a faceset as its JSON has it (candidates_folder)."""
    return sort_faces.candidates_folder(entry["name"], entry.get("label"))


def test_every_bundled_png_is_one_face_of_its_person(exported, detector):
    out, manifest = exported["out"], exported["manifest"]
    centroids = faceset_centroids(exported)
    assert manifest["summary"]["crops"] > 50
    for entry in manifest["facesets"]:
        with zipfile.ZipFile(out / bundle_of(entry)) as bundle:
            for name in bundle.namelist():
                image = cv2.imdecode(np.frombuffer(bundle.read(name), np.uint8), cv2.IMREAD_COLOR)
                assert image.shape == (512, 512, 3)
                for size in (640, 320):
                    boxes, _ = detector.det_model.detect(image, input_size=(size, size))
                    assert len(boxes) == 1, (entry["name"], name, size)
                faces = detector.get(image)
                similarity = float(faces[0].normed_embedding @ centroids[entry["name"]])
                assert similarity > 0.3, (entry["name"], name, similarity)


def test_crops_agree_with_their_faceset_identity(exported):
    for entry in exported["manifest"]["facesets"]:
        people = {identity_of(c["source"]) for c in entry["crops"]}
        assert len(people) == 1, (entry["name"], people)


def test_bundle_names_order_and_contents(exported):
    out, manifest = exported["out"], exported["manifest"]
    for entry in manifest["facesets"]:
        crops = entry["crops"]
        assert [c["png"] for c in crops] == [f"{i:04d}.png" for i in range(len(crops))]
        scores = [c["score"] for c in crops]
        assert scores == sorted(scores, reverse=True)
        with zipfile.ZipFile(out / bundle_of(entry)) as bundle:
            names = bundle.namelist()
            assert names == [c["png"] for c in crops]
            for name in names:
                assert bundle.read(name) == (out / folder_of(entry) / name).read_bytes()
        with zipfile.ZipFile(out / bundle_of(entry, 5)) as bundle:
            assert bundle.namelist() == names[:5]
        assert [c["in_top"] for c in crops] == [i < 5 for i in range(len(crops))]
        for crop in crops:
            terms = crop["terms"]
            assert all(0 <= v <= 1 for v in terms.values())
            expected = sum(sort_faces.QUALITY_WEIGHTS[k] * terms[k] for k in terms)
            assert abs(expected - crop["score"]) < 1e-3
    listing = sorted(p.name for p in out.iterdir())
    for entry in manifest["facesets"]:
        assert {folder_of(entry), bundle_of(entry),
                bundle_of(entry, 5)} <= set(listing)
    saved = json.loads((out / "export_manifest.json").read_text())
    assert saved["summary"] == manifest["summary"]


def test_candidates_only_with_the_flag(exported):
    assert not (exported["tmp"] / "plain" / "_candidates").exists()
    assert exported["plain"]["candidates"] == []
    candidates = exported["manifest"]["candidates"]
    assert candidates, "singletons near a faceset are offered for review"
    # the plain export is of the named faceset alone, which has candidates with the flag
    assert [e["name"] for e in exported["plain"]["facesets"]] == [NAMED_FACESET[0]]
    assert NAMED_FACESET[0] in {e["name"] for e in candidates}
    bundled = {c["face"] for e in exported["manifest"]["facesets"] for c in e["crops"]}
    centroids = faceset_centroids(exported)
    cache = sort_faces.load_cache(exported["cache"])
    singles = {f["face"] for f in exported["raw"]["singletons"]["faces"]}
    for entry in candidates:
        folder = exported["out"] / candidates_of(entry)
        assert sorted(p.name for p in folder.iterdir()) == [c["png"] for c in entry["crops"]]
        for crop in entry["crops"]:
            assert crop["face"] in singles and crop["face"] not in bundled
            assert crop["score"] >= 0.40
            distance = 1 - float(cache["embeddings"][crop["face"]] @ centroids[entry["name"]])
            assert distance <= 0.55 + 1e-4


@pytest.mark.fast
def test_a_facesets_folder_bundles_and_candidates_share_one_name():
    plain = ("faceset_002", None)
    named = ("faceset_002", "Mindy Kaling: a/b é.")
    assert [sort_faces.entry_folder(*e) for e in (plain, named)] == [
        "faceset_002", "faceset_002_Mindy Kaling_ a_b é"]
    for entry in (plain, named):
        folder = sort_faces.entry_folder(*entry)
        assert sort_faces.entry_bundle(*entry, 30) == folder + "_top30.fsz"
        assert sort_faces.entry_bundle(*entry) == folder + "_all.fsz"
        assert sort_faces.candidates_folder(*entry) == "_candidates/" + folder
    assert sort_faces.entry_title(*plain) == "faceset_002"
    assert sort_faces.entry_title(*named) == "faceset_002 Mindy Kaling: a/b é."


def page_rows(text: str) -> list[str]:
    """The rows (one person's or faceset's HTML each) of a review page."""
    return text.split("data-row ")[1:]


def test_a_named_faceset_is_exported_under_its_name_everywhere(exported):
    """Issue 27: after `people name faceset_002 "Mindy Kaling"` export-swap wrote
    the candidates under the name and looked for them without it (the page
    showed "candidates for review (1)", then "no faces"), the page's subtitle
    named faceset_002_top30.fsz (not the file written) and its heading left the
    name out. Every folder, bundle and thumbnail the page and the manifest name
    must exist, under the name."""
    out, manifest = exported["out"], exported["manifest"]
    number, name = NAMED_FACESET
    folder = f"{number}_{name}"  # nothing in the name to make safe
    named = next(e for e in manifest["facesets"] if e["name"] == number)
    assert named["label"] == name and folder_of(named) == folder
    assert {b["file"] for b in named["bundles"]} == {f"{folder}_top5.fsz", f"{folder}_all.fsz"}
    candidate = next(c for c in manifest["candidates"] if c["name"] == number)
    assert candidate["label"] == name and candidate["crops"], "Mindy Kaling has a candidate"
    # the manifest, as written, names only what is there
    saved = json.loads((out / "export_manifest.json").read_text("utf-8"))
    assert saved["facesets"] == manifest["facesets"]
    for entry in saved["facesets"]:
        assert sorted(p.name for p in (out / folder_of(entry)).iterdir()) == \
            [c["png"] for c in entry["crops"]]
        for bundle in entry["bundles"]:
            assert (out / bundle["file"]).is_file(), bundle
    for entry in saved["candidates"]:
        assert sorted(p.name for p in (out / candidates_of(entry)).iterdir()) == \
            [c["png"] for c in entry["crops"]]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(number)) == sorted(
        [folder, f"{folder}_top5.fsz", f"{folder}_all.fsz"])
    assert sorted(p.name for p in (out / "_candidates").iterdir()) == sorted(
        folder_of(c) for c in saved["candidates"])
    # the page: every link and thumbnail is a file, each subtitle names its real bundle
    text = (out / "index.html").read_text("utf-8")
    for link in re.findall(r'(?:href|src)="([^"]+)"', text):
        assert (out / urllib.parse.unquote(html.unescape(link))).exists(), link
    rows = page_rows(text)
    for entry in saved["facesets"]:
        row = next(r for r in rows if re.match(f'data-name="{entry["name"]}[ "]', r))
        subtitle = html.unescape(re.search(r'<span class="sub">([^<]*)</span>', row)[1])
        bundle = re.search(r"bundled in (\S.*\.fsz)$", subtitle)[1]
        assert (out / bundle).is_file() and bundle == bundle_of(entry, 5), subtitle
    row = next(r for r in rows if re.match(f'data-name="{number}[ "]', r))
    heading = html.unescape(re.search(r'<span class="name"><a [^>]*>([^<]*)</a>', row)[1])
    assert name in heading and number in heading
    assert name.lower() in html.unescape(re.search(r'data-name="([^"]*)"', row)[1])
    section = row.split("candidates for review", 1)[1].split("</details>", 1)[0]
    assert "no faces" not in section
    hrefs = [urllib.parse.unquote(html.unescape(h)) for h in re.findall(r'href="([^"]+)"', section)]
    assert hrefs == [f"_candidates/{folder}/{c['png']}" for c in candidate["crops"]]
    assert len(re.findall(r'src="_thumbs/[^"]+"', section)) == len(candidate["crops"])


def test_a_group_photo_crop_keeps_out_the_neighbour(tmp_path, detector):
    """A faceset of one person whose photos include a crowded selfie."""
    photo = DATA / "group_photos" / "selfie-many-people.jpg"
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy2(photo, src / "group.jpg")
    image = cv2.imread(str(photo))
    faces = detector.get(image)

    def neighbours_in_crop(face):  # other faces reaching into its padded crop
        x0, y0, side = sort_faces.square_crop_box(face.bbox, 0.5)
        box = [[x0, y0, x0 + side, y0 + side]]
        return sum(sort_faces.box_iou(box, [o.bbox])[0, 0] > 0 for o in faces if o is not face)

    target = max(faces, key=neighbours_in_crop)
    assert neighbours_in_crop(target) >= 1
    alone = image.copy()  # the same person with everyone else blacked out
    for other in faces:
        if other is not target:
            ox1, oy1, ox2, oy2 = other.bbox.astype(int)
            alone[max(0, oy1 - 20):oy2 + 20, max(0, ox1 - 20):ox2 + 20] = 0
    x1, y1, x2, y2 = target.bbox.astype(int)
    pad = x2 - x1
    for variant, scale in enumerate((1.6, 2.0, 2.4, 2.8)):
        solo = alone[max(0, y1 - pad):y2 + pad, max(0, x1 - pad):x2 + pad]
        solo = cv2.resize(solo, None, fx=scale, fy=scale)
        cv2.imwrite(str(src / f"solo_{variant}.jpg"),
                    cv2.GaussianBlur(solo, (0, 0), 0.3 * variant + 0.1))
    cache = tmp_path / "c.npz"
    embed_quiet(src, cache)
    sort_faces.enrich(cache, quiet=True)
    refined = sort_faces.refine(cache, tmp_path / "refined", min_faces=3, min_short=40,
                                min_blur=5.0, quiet=True)
    faceset = refined["facesets"][0]
    assert any(Path(f["file"]).name == "group.jpg" for f in faceset["faces"])
    manifest = sort_faces.export_swap(cache, tmp_path / "refined" / "refine_manifest.json",
                                      tmp_path / "swap", min_face_short=60, quiet=True)
    entry = manifest["facesets"][0]
    from_group = [c for c in entry["crops"] if Path(c["source"]).name == "group.jpg"]
    cache_data = sort_faces.load_cache(cache)
    skipped = [s for s in entry["skipped"]
               if Path(cache_data["files"][cache_data["face_file"][s["face"]]]).name == "group.jpg"]
    # The neighbours do not overlap the face: the black-out must isolate it, so the
    # crop is written (a black-out that failed would skip it: "another face ...").
    assert skipped == [] and len(from_group) == 1, skipped
    crop = from_group[0]
    assert crop["blacked_out"] >= 1
    written = cv2.imread(str(tmp_path / "swap" / folder_of(entry) / crop["png"]))
    for size in (640, 320):
        assert len(detector.det_model.detect(written, input_size=(size, size))[0]) == 1


def test_export_rerun_replaces_output_cleanly(exported):
    tmp = exported["tmp"]
    out = tmp / "swap-again"
    shutil.copytree(exported["out"], out)
    again = sort_faces.export_swap(exported["cache"], tmp / "refined" / "refine_manifest.json",
                                   out, quiet=True, **EXPORT)
    assert not (out / "_candidates").exists()  # the old result is gone whole
    assert again["summary"]["crops"] == exported["manifest"]["summary"]["crops"]
    assert not list(tmp.glob(".swap-again.*"))


def test_export_refuses_a_cache_without_landmarks_naming_enrich(exported, labeled_cache,
                                                                  tmp_path):
    """export-swap needs enrich's landmarks and pose: on a cache without them it
    stops with the command to run, before it writes anything."""
    cache = tmp_path / "c.npz"
    shutil.copy2(labeled_cache, cache)  # exported's cache as it was before enrich
    before = cache.read_bytes()
    refined = exported["tmp"] / "refined" / "refine_manifest.json"
    with pytest.raises(sort_faces.UserError, match=r"without landmarks and pose: run "
                                                   r"`.+ enrich .+` first, or pass --enrich"):
        sort_faces.export_swap(cache, refined, tmp_path / "swap", quiet=True, **EXPORT)
    assert not (tmp_path / "swap").exists() and cache.read_bytes() == before


def test_export_with_enrich_flag_enriches_first(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(DATA / "face_recognition" / "barack_obama", src)
    cache = tmp_path / "cache" / "c.npz"
    embed_quiet(src, cache)
    sort_faces.refine(cache, tmp_path / "refined", min_faces=3, min_short=40, quiet=True)
    manifest = sort_faces.export_swap(cache, tmp_path / "refined" / "refine_manifest.json",
                                      tmp_path / "swap", enrich_first=True, min_face_short=60,
                                      quiet=True)
    assert manifest["summary"]["crops"] >= 3
    assert np.all(sort_faces.load_cache(cache).extra["enrich_status"] == "ok")


def test_an_export_of_photos_gone_from_the_source_reads_the_outputs_copies(tmp_path, caplog):
    """Photos deleted from the source since, or replaced there by another
    picture: export-swap crops them from the copies the refine output holds
    (their bytes the photos'), the same PNGs;
    where no copy is left (a symlink output) a re-run that would leave fewer
    than half of the export's crops is refused and nothing is replaced, and
    with --replace-smaller the empty faceset says why it has no crop."""
    src = tmp_path / "src"
    shutil.copytree(DATA / "face_recognition" / "barack_obama", src)
    cache = tmp_path / "cache" / "c.npz"
    embed_quiet(src, cache)
    swaps = {}
    for link in ("copy", "symlink"):
        sort_faces.refine(cache, tmp_path / f"refined_{link}", link=link, min_faces=3,
                          min_short=40, quiet=True)
        swaps[link] = (tmp_path / f"refined_{link}" / "refine_manifest.json",
                       tmp_path / f"swap_{link}")
        first = sort_faces.export_swap(cache, *swaps[link], enrich_first=True,
                                       min_face_short=60, quiet=True)
    assert first["summary"]["crops"] >= 3
    crops = {p.read_bytes() for p in swaps["copy"][1].rglob("*.png")}
    # one more photo, embedded and refined but gone before enrich could read it: the export
    # does not ask for an enrich that cannot help, and crops it from the refine output's copy
    shutil.copy2(DATA / "group_photos" / "obama_and_biden.jpg", src)
    embed_quiet(src, cache)
    sort_faces.refine(cache, tmp_path / "refined_copy", min_faces=3, min_short=40, quiet=True)
    for photo in src.iterdir():
        photo.unlink()
    (src / "obama.jpg").write_bytes((DATA / "face_recognition" / "joe_biden" /
                                     "biden.jpg").read_bytes())  # another picture at its path
    again = sort_faces.export_swap(cache, *swaps["copy"], min_face_short=60, quiet=True)
    assert again["summary"]["crops"] == first["summary"]["crops"] + 1
    assert crops < {p.read_bytes() for p in swaps["copy"][1].rglob("*.png")}
    manifest_before = (swaps["symlink"][1] / "export_manifest.json").read_bytes()
    with pytest.raises(sort_faces.UserError, match=r"holds \d+ crops and this export-swap would "
                       r"leave 0 \(\d+ faces of photos that have moved, changed or vanished since "
                       r"embed"
                       r".*To keep them, put the photos back where they were"):
        sort_faces.export_swap(cache, *swaps["symlink"], min_face_short=60, quiet=True)
    assert (swaps["symlink"][1] / "export_manifest.json").read_bytes() == manifest_before
    caplog.set_level("INFO", logger="face-sets")
    caplog.clear()
    emptied = sort_faces.export_swap(cache, *swaps["symlink"], min_face_short=60,
                                     replace_smaller=True, quiet=True)
    assert emptied["summary"]["crops"] == 0
    assert re.search(r"faceset_001 has no crop, so no files: \d+ faces: the photo has moved, "
                     r"changed or vanished since embed", caplog.text)
    # stricter options that would leave fewer than half of the crops: refused the same way
    sort_faces.export_swap(cache, *swaps["copy"], min_face_short=60, quiet=True)
    with pytest.raises(sort_faces.UserError, match=r"would leave 0: nothing was replaced. To "
                       r"keep them, run with the options they were made with "
                       r"\(--min-face-short 60\)"):
        sort_faces.export_swap(cache, *swaps["copy"], min_face_short=5000, quiet=True)


@pytest.mark.fast
def test_candidates_leave_out_faces_decided_not_that_person_or_in_a_faceset():
    """export-swap --candidates offers no face a people decision says is not
    the faceset's person (kept apart from faces it holds, or rejected), and
    none a faceset already holds."""
    near = np.array([[1.0, 0.0], [0.99, 0.14], [0.98, 0.2], [0.97, 0.24], [0.99, 0.1],
                     [0.98, -0.2], [0.99, -0.1], [0.97, 0.2]], np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    faceset = sort_faces.Entry(
        name="faceset_001", size=2, images=2, outputs=[], centroid=[1.0, 0.0],
        faces=[sort_faces.FaceRef(face=f, file=f"{f}.jpg", bbox=[0, 0, 99, 99]) for f in (0, 1)])
    constraints = {"together": [[5], [0, 1]], "apart": [(0, 1)], "apart_only": [5],
                   "rejected": [7], "names": []}
    not_of = sort_faces.decided_not_of([faceset], constraints)
    assert not_of == {"faceset_001": {5, 7}}
    score = {f: 1.0 for f in range(8)}
    params = dict(sort_faces.EXPORT_DEFAULTS)
    offered = sort_faces.plan_candidates([faceset], [1, 4, 5, 6, 7], near, score, params)
    assert sorted(offered[0].ranked) == [4, 5, 6, 7]  # without the decisions: all but 1
    decided = sort_faces.plan_candidates([faceset], [1, 4, 5, 6, 7], near, score, params, not_of)
    assert sorted(decided[0].ranked) == [4, 6]
