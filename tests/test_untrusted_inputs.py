"""Hardening (issue 17): tampered manifests, damaged journals, readers during a
fold, pool failures, odd geometry, hostile names, signals and bad options.
Each test reproduces one way the earlier code lost data, wrote outside its
output, put a face on a wrong photo or crashed."""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

import sort_faces
from conftest import DATA, REFINE, ROOT, embed_quiet, run_cli, tree_fingerprint


def one_line_error(code, err, *words):
    """Exit 2, one 'error:' line naming what it is about, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error:"), err
    for word in words:
        assert word in lines[0], (word, lines[0])


def photos(folder: Path, count: int, sets=("lfw10",)) -> Path:
    """`count` real photos copied into `folder` (flat, stable order)."""
    folder.mkdir(parents=True, exist_ok=True)
    found = sorted(p for s in sets for p in (DATA / s).rglob("*.jpg"))[:count]
    for index, photo in enumerate(found):
        shutil.copy2(photo, folder / f"{index:03d}_{photo.name}")
    return folder


def face_places(cache) -> set:
    """Each face as (its photo's path, its box rounded): what must never shift."""
    return {(str(cache["files"][f]), tuple(np.round(cache["bbox"][f]).astype(int).tolist()))
            for f in range(cache.n_faces)}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A small real cache with cluster and refine outputs (12 photos, 2 people)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    src = tmp / "src"
    for person in ("Ariel_Sharon", "Colin_Powell"):
        for photo in sorted((DATA / "lfw10" / person).glob("*.jpg"))[:6]:
            (src / person).mkdir(parents=True, exist_ok=True)
            shutil.copy2(photo, src / person / photo.name)
    cache = tmp / "cache" / "c.npz"
    embed_quiet(src, cache)
    sort_faces.cluster(cache, tmp / "raw", quiet=True)
    sort_faces.refine(cache, tmp / "refined", quiet=True, **dict(REFINE, min_faces=3))
    return {"tmp": tmp, "src": src, "cache": cache, "raw": tmp / "raw",
            "refined": tmp / "refined"}


def copy_outputs(pipeline, tmp_path):
    """The pipeline's cache and outputs, copied so a test may tamper with them."""
    shutil.copytree(pipeline["tmp"] / "cache", tmp_path / "cache")
    for name in ("raw", "refined"):
        shutil.copytree(pipeline[name], tmp_path / name)
    return tmp_path / "cache" / "c.npz"


# ---------------------------------------------------------------------------
# 1. Output ownership
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("command, manifest_name", [("cluster", "manifest.json"),
                                                    ("refine", "refine_manifest.json")])
def test_a_foreign_folder_holding_a_manifest_is_never_replaced(pipeline, tmp_path, command,
                                                              manifest_name):
    foreign = tmp_path / "my documents"
    foreign.mkdir()
    (foreign / "taxes.txt").write_text("keep me")
    shutil.copy2(pipeline["raw"] / "manifest.json", foreign / manifest_name)
    before = tree_fingerprint(foreign)
    code, _out, err = run_cli(command, pipeline["cache"], foreign)
    one_line_error(code, err, "not made by face-sets")
    assert tree_fingerprint(foreign) == before


def test_export_refuses_a_foreign_folder_and_a_step_refuses_another_kind(pipeline, tmp_path):
    cache = copy_outputs(pipeline, tmp_path)
    foreign = tmp_path / "exports"
    foreign.mkdir()
    (foreign / "export_manifest.json").write_text("{}")
    (foreign / "holiday.png").write_bytes(b"mine")
    before = tree_fingerprint(foreign)
    code, _out, err = run_cli("export-swap", cache, tmp_path / "refined" / "refine_manifest.json",
                              foreign, "--enrich", "--min-face-short", "40")
    one_line_error(code, err, "not made by face-sets")
    assert tree_fingerprint(foreign) == before
    # a cluster output is face-sets' own, but not refine's to replace
    raw_before = tree_fingerprint(tmp_path / "raw")
    code, _out, err = run_cli("refine", cache, tmp_path / "raw")
    one_line_error(code, err, "cluster output")
    assert tree_fingerprint(tmp_path / "raw") == raw_before


def test_an_output_from_before_markers_is_adopted_only_if_its_manifest_covers_it(pipeline,
                                                                                   tmp_path):
    cache = copy_outputs(pipeline, tmp_path)
    raw = tmp_path / "raw"
    (raw / sort_faces.OUTPUT_MARKER).unlink()  # as an earlier face-sets left it
    manifest = sort_faces.cluster(cache, raw, quiet=True)
    assert sort_faces.read_marker(raw)["kind"] == "cluster" and manifest["clusters"]
    (raw / sort_faces.OUTPUT_MARKER).unlink()
    (raw / "notes.txt").write_text("the user's")  # not the manifest's: not ours
    with pytest.raises(sort_faces.UserError, match="not made by face-sets"):
        sort_faces.cluster(cache, raw, quiet=True)
    assert (raw / "notes.txt").read_text() == "the user's"


def test_an_output_path_that_is_a_file_is_refused(pipeline, tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("a file")
    code, _out, err = run_cli("cluster", pipeline["cache"], target)
    one_line_error(code, err, "is a file")
    assert target.read_text() == "a file"


# ---------------------------------------------------------------------------
# 2. Manifests are input
# ---------------------------------------------------------------------------


def tamper(path: Path, change) -> None:
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/absolute_faceset", "faceset_001/../../x",
                                  "faceset_1", ""])
def test_export_refuses_faceset_names_not_of_its_own_form(pipeline, tmp_path, name):
    cache = copy_outputs(pipeline, tmp_path)
    refine_manifest = tmp_path / "refined" / "refine_manifest.json"
    tamper(refine_manifest, lambda m: m["facesets"][0].update(name=name))
    before = tree_fingerprint(tmp_path)
    src_before = tree_fingerprint(pipeline["src"])
    code, _out, err = run_cli("export-swap", cache, refine_manifest, tmp_path / "swap",
                              "--enrich", "--min-face-short", "40")
    one_line_error(code, err, "refine_manifest.json", "facesets[0].name")
    assert tree_fingerprint(tmp_path) == before  # nothing written, not even the enrich
    assert tree_fingerprint(pipeline["src"]) == src_before
    assert not Path("/tmp/absolute_faceset").exists()


@pytest.mark.parametrize("field, value, words", [
    ("face", -1, "out of range"),
    ("face", 999999, "out of range"),
    ("face", "3", "is not an integer"),
    ("face", True, "is not an integer"),
    (None, None, "has no 'face'"),
])
def test_face_ids_are_checked_against_the_cache(pipeline, tmp_path, field, value, words):
    cache = copy_outputs(pipeline, tmp_path)
    manifest_path = tmp_path / "raw" / "manifest.json"

    def change(manifest):
        record = manifest["clusters"][0]["faces"][0]
        if field is None:
            del record["face"]
        else:
            record[field] = value

    tamper(manifest_path, change)
    before = tree_fingerprint(tmp_path)
    code, _out, err = run_cli("extend", cache, tmp_path / "raw")
    one_line_error(code, err, "manifest.json", words)
    assert tree_fingerprint(tmp_path) == before


def test_duplicate_names_and_faces_are_refused(pipeline, tmp_path):
    cache = copy_outputs(pipeline, tmp_path)
    manifest_path = tmp_path / "raw" / "manifest.json"
    original = manifest_path.read_text()
    tamper(manifest_path, lambda m: m["clusters"].append(dict(m["clusters"][0])))
    with pytest.raises(sort_faces.UserError, match="duplicates|listed twice"):
        sort_faces.extend(cache, tmp_path / "raw", quiet=True)
    manifest_path.write_text(original)
    tamper(manifest_path, lambda m: m["clusters"][1]["faces"].append(m["clusters"][0]["faces"][0]))
    with pytest.raises(sort_faces.UserError, match="listed twice"):
        sort_faces.extend(cache, tmp_path / "raw", quiet=True)


@pytest.mark.parametrize("victim", ["source photo", "outside file"])
def test_extend_never_deletes_what_a_manifest_lists_outside_its_output(pipeline, tmp_path,
                                                                      victim):
    cache = copy_outputs(pipeline, tmp_path)
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    source_photo = next(pipeline["src"].rglob("*.jpg"))
    target = str(source_photo) if victim == "source photo" else "../../precious.txt"
    manifest_path = tmp_path / "raw" / "manifest.json"
    tamper(manifest_path, lambda m: m["singletons"]["outputs"].append(target))
    src_before = tree_fingerprint(pipeline["src"])
    code, _out, err = run_cli("extend", cache, tmp_path / "raw")
    one_line_error(code, err, "singletons.outputs", "not a plain file name")
    assert outside.read_text() == "keep" and source_photo.exists()
    assert tree_fingerprint(pipeline["src"]) == src_before


def test_nan_thresholds_in_a_manifest_are_refused(pipeline, tmp_path):
    cache = copy_outputs(pipeline, tmp_path)
    manifest_path = tmp_path / "raw" / "manifest.json"
    text = manifest_path.read_text().replace('"threshold": 0.55', '"threshold": NaN')
    manifest_path.write_text(text)
    with pytest.raises(sort_faces.UserError, match="parameters.threshold"):
        sort_faces.extend(cache, tmp_path / "raw", quiet=True)


@pytest.mark.fast
def test_inside_refuses_every_way_out():
    root = Path("/tmp/out")
    for parts in (("..", "x"), ("/etc/passwd",), ("a/../../b",), ("",), (".",)):
        with pytest.raises(sort_faces.UserError, match="outside the output"):
            sort_faces.inside(root, *parts)
    assert sort_faces.inside(root, "person_001", "a.jpg") == root / "person_001" / "a.jpg"


# ---------------------------------------------------------------------------
# 3. and 4. The journal never shifts rows; readers never see a half fold.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def journal_run(tmp_path_factory):
    """16 photos embedded in chunks of 4 whose journal was never folded (as a run
    killed after its last flush leaves it), and a clean run for reference."""
    tmp = tmp_path_factory.mktemp("journal")
    src = photos(tmp / "src", 16, sets=("lfw10", "five_celebs"))
    reference = tmp / "reference.npz"
    embed_quiet(src, reference, workers=1)
    killed = tmp / "killed" / "c.npz"
    save = sort_faces.save_cache
    sort_faces.save_cache = lambda *args, **kwargs: None
    try:
        embed_quiet(src, killed, workers=1, flush_every=3)
    finally:
        sort_faces.save_cache = save
    chunks = sort_faces.journal_chunks(killed)
    assert [seq for seq, _ in chunks] == [1, 2, 3, 4] and not killed.exists()
    return {"src": src, "reference": sort_faces.load_cache(reference), "killed": killed}


def damaged_copy(journal_run, tmp_path, damage):
    cache = tmp_path / "c.npz"
    shutil.copytree(sort_faces.journal_dir(journal_run["killed"]), sort_faces.journal_dir(cache))
    damage(sort_faces.journal_dir(cache))
    return cache


@pytest.mark.parametrize("damage, named", [
    (lambda d: (d / "00000002.npz").write_bytes((d / "00000002.npz").read_bytes()[:3000]),
     "00000002.npz is unreadable"),
    (lambda d: (d / "00000002.npz").unlink(), "00000002.npz is missing"),
])
def test_a_damaged_or_missing_chunk_never_puts_a_face_on_a_wrong_photo(journal_run, tmp_path,
                                                                       caplog, damage, named):
    cache_path = damaged_copy(journal_run, tmp_path, damage)
    caplog.set_level("WARNING", logger="face-sets")
    cache = sort_faces.load_cache(cache_path)
    warnings = [r.getMessage() for r in caplog.records if "journal chunk" in r.getMessage()]
    assert len(warnings) == 1 and named in warnings[0], warnings
    reference = face_places(journal_run["reference"])
    assert cache.n_files == 4 and 0 < cache.n_faces  # chunk 1 only
    assert face_places(cache) <= reference  # no face on a wrong photo
    # the next embed redoes the files after the gap, and the result is whole
    summary = embed_quiet(journal_run["src"], cache_path, workers=1)
    assert summary["new"] == 12
    healed = sort_faces.load_cache(cache_path)
    assert face_places(healed) == reference and healed.n_files == 16
    assert not any(sort_faces.journal_dir(cache_path).glob("*.npz"))


def test_a_chunk_that_does_not_continue_the_cache_is_not_applied(journal_run, tmp_path):
    """A chunk whose rows start elsewhere (a chunk of another run, or renumbered)."""
    def swap(folder):
        a, b = folder / "00000002.npz", folder / "00000003.npz"
        data = a.read_bytes()
        a.write_bytes(b.read_bytes())
        b.write_bytes(data)

    cache = sort_faces.load_cache(damaged_copy(journal_run, tmp_path, swap))
    assert cache.n_files == 4 and "00000002.npz" in cache.journal_problem
    assert face_places(cache) <= face_places(journal_run["reference"])


def test_a_reader_during_the_fold_sees_a_whole_cache(journal_run, tmp_path, monkeypatch):
    """The fold (main file written, chunks removed) happens while a reader is
    between chunk 1 and chunk 2: the reader must not apply chunk 3 to a cache
    without chunk 2's rows."""
    cache_path = damaged_copy(journal_run, tmp_path, lambda d: None)
    folded = sort_faces.load_cache(cache_path)
    real_read = sort_faces._npz_arrays
    state = {"folded": False}

    def read(path, *args):
        arrays = real_read(path, *args)
        if Path(path).name == "00000001.npz" and not state["folded"]:
            state["folded"] = True  # the writer, mid-fold: main file in, chunk 2 gone
            with sort_faces.atomic_output(cache_path) as handle:
                np.savez(handle, **folded.arrays())
            (sort_faces.journal_dir(cache_path) / "00000002.npz").unlink()
        return arrays

    monkeypatch.setattr(sort_faces, "_npz_arrays", read)
    cache = sort_faces.load_cache(cache_path)
    assert state["folded"]
    assert cache.n_files == 16 and cache.journal_problem is None
    assert face_places(cache) == face_places(journal_run["reference"])
    assert np.all(cache["face_file"] < cache.n_files)


@pytest.mark.fast
def test_a_file_that_is_not_a_cache_says_so(tmp_path, capsys):
    fake = tmp_path / "notes.npz"
    fake.write_bytes(b"just some bytes")
    np.savez(tmp_path / "other.npz", x=np.arange(3))
    np.savez(tmp_path / "objects.npz", meta=np.array([{"a": 1}], dtype=object))
    np.savez(tmp_path / "cut.npz", x=np.arange(3000))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "cut.npz").read_bytes()[:-300])
    for name, reason in [("notes.npz", "it is not an .npz archive"),
                         ("other.npz", "it has no face-sets meta"),
                         ("objects.npz", "it holds something other than arrays of numbers"),
                         ("cut.npz", "it is not an .npz archive")]:
        code = sort_faces.main(["cluster", str(tmp_path / name), str(tmp_path / "out")])
        err = capsys.readouterr().err
        one_line_error(code, err, name, "is not a face-sets cache: " + reason)
        assert "pickle" not in err and "Error" not in err, err  # the user's words, not numpy's
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# 5. A pool that cannot run is a run error; a file that crashes is retried once.
# ---------------------------------------------------------------------------


def broken_pack(tmp_path, pack_dir) -> Path:
    """A model folder whose detector ONNX names an opset onnxruntime cannot load."""
    import onnx

    folder = tmp_path / "broken_pack"
    folder.mkdir()
    for name in sort_faces.OFFLINE_PACK_FILES:
        shutil.copyfile(pack_dir / name, folder / name)
    model = onnx.load(str(folder / "scrfd_500m_bnkps.onnx"))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 99
    onnx.save(model, str(folder / "scrfd_500m_bnkps.onnx"))
    return folder


def test_a_pool_that_cannot_start_is_a_run_error_and_records_nothing(tmp_path, pack_dir):
    src = photos(tmp_path / "src", 6)
    cache = tmp_path / "c.npz"
    code, _out, err = run_cli("embed", src, cache, "--model", broken_pack(tmp_path, pack_dir),
                              "--workers", "2")
    one_line_error(code, err, "could not load the model")
    assert not cache.exists() or sort_faces.load_cache(cache).n_files == 0
    summary = embed_quiet(src, cache)  # a good model: every file embedded, none unreadable
    assert summary["new"] == 6 and summary["unreadable"] == 0


def test_a_file_that_crashes_a_worker_is_retried_once_then_recorded(tmp_path, monkeypatch):
    from crashing_task import embed_or_crash

    src = photos(tmp_path / "src", 5)
    crasher = next(src.iterdir())
    crasher.rename(src / f"CRASH_{crasher.name}")
    monkeypatch.setattr(sort_faces, "embed_task", embed_or_crash)
    cache = tmp_path / "c.npz"
    first = embed_quiet(src, cache, workers=2)
    assert first["crashed"] == 1 and first["new"] == 4 and first["unreadable"] == 0
    assert sort_faces.embed_incomplete(first)
    assert len(sort_faces.load_cache(cache).meta["crash_suspects"]) == 1
    second = embed_quiet(src, cache, workers=2)  # tried again: crashes again
    assert second["new"] == 1 and second["unreadable"] == 1 and second["crashed"] == 0
    loaded = sort_faces.load_cache(cache)
    row = list(loaded["files"]).index(str(src / f"CRASH_{crasher.name}"))
    assert loaded["file_status"][row] == "unreadable" and "two runs" in loaded["file_reason"][row]
    assert loaded.meta["crash_suspects"] == {}
    third = embed_quiet(src, cache, workers=2)  # known unreadable: not tried again, reported
    assert third["new"] == 0 and third["unreadable"] == 1 and third["unreadable_new"] == 0


# ---------------------------------------------------------------------------
# 6. Odd geometry and memory
# ---------------------------------------------------------------------------


def write_png_rows(path: Path, width: int, height: int) -> None:
    """A real, complete RGB PNG of width x height black pixels, written row by
    row, so a huge image is a small file made in little memory."""
    def chunk(kind, data):
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    packer = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)
    compressed = [packer.compress(row) for _ in range(height)] + [packer.flush()]
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", b"".join(compressed)) + chunk(b"IEND", b""))


def test_thin_images_are_no_face_and_every_other_file_is_embedded(tmp_path):
    src = photos(tmp_path / "src", 8)
    for name, size in (("wide.png", (641, 1)), ("tall.png", (1, 5000)), ("sliver.png", (4000, 3))):
        Image.new("RGB", size, (120, 90, 60)).save(src / name)
    summary = embed_quiet(src, tmp_path / "c.npz")
    assert summary["new"] == 11 and summary["unreadable"] == 0 and summary["faces"] >= 8
    cache = sort_faces.load_cache(tmp_path / "c.npz")
    status = dict(zip(map(os.path.basename, cache["files"]), cache["file_status"]))
    reason = dict(zip(map(os.path.basename, cache["files"]), cache["file_reason"]))
    for name in ("wide.png", "tall.png", "sliver.png"):
        assert status[name] == "noface" and "too thin" in reason[name]
    assert sort_faces.too_small_for_faces(641, 1, 640)
    assert not sort_faces.too_small_for_faces(4000, 3000, 640)


@pytest.mark.fast
def test_a_huge_png_is_refused_with_its_reason_not_decoded(tmp_path):
    path = tmp_path / "huge.png"
    write_png_rows(path, 20000, 20000)
    assert path.stat().st_size < 5_000_000
    with pytest.raises(sort_faces.UnreadableImage, match="too large to decode within 1024 MB"):
        sort_faces.decode_image(str(path))
    reason = sort_faces.decode_memory_problem("PNG", "RGB", 20000, 20000, 2, 0)
    assert reason and "PNG cannot be decoded at a reduced scale" in reason
    # a JPEG of the same size decodes at 1/2 in the DCT, well inside the budget
    assert sort_faces.decode_memory_problem("JPEG", "RGB", 20000, 20000, 2, 0, common=True) is None
    # a 16-bit scan of 100 MP would need its float copy too
    assert sort_faces.decode_memory_problem("TIFF", "I;16", 10000, 10000, 1, 0)


# ---------------------------------------------------------------------------
# 7. Names
# ---------------------------------------------------------------------------


def test_colliding_and_undecodable_names_go_through_every_step(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    sharon = sorted((DATA / "lfw10" / "Ariel_Sharon").glob("*.jpg"))
    names = ["a:b.jpg", "a?b.jpg", "a_b.jpg", "a__b.jpg"]
    for name, photo in zip(names, sharon):
        shutil.copy2(photo, src / name)
    (src / "a").mkdir()
    shutil.copy2(sharon[4], src / "a" / "_b.jpg")  # flattens like a__b.jpg
    raw_name = os.fsdecode(b"caf\xe9_\xff.jpg")  # Latin-1 bytes: not UTF-8
    shutil.copy2(sharon[5], src / raw_name)
    before = tree_fingerprint(src)
    cache = tmp_path / "c.npz"
    code, out, err = run_cli("embed", src, cache, "--model", "buffalo_s")
    assert code == 0 and "Traceback" not in err, err
    code, out, err = run_cli("cluster", cache, tmp_path / "raw")
    assert code == 0 and "Traceback" not in err, err
    manifest = json.loads((tmp_path / "raw" / "manifest.json").read_text())
    person = max(manifest["clusters"], key=lambda c: c["images"])
    assert person["images"] == 6 and len(set(person["outputs"])) == 6
    assert sorted(os.listdir(tmp_path / "raw" / person["name"])) == sorted(person["outputs"])
    for name in person["outputs"]:
        name.encode("utf-8")  # output names are valid UTF-8 on every file system
    assert any("%E9_%FF" in name for name in person["outputs"])
    code, out, err = run_cli("refine", cache, tmp_path / "refined", "--min-faces", "3",
                             "--min-short", "40", "--min-blur", "10")
    assert code == 0 and "Traceback" not in err, err
    page = (tmp_path / "raw" / "index.html").read_bytes().decode("utf-8")  # valid UTF-8
    assert "caf\ufffd_\ufffd.jpg" in page
    logs = Path(os.environ["FACESETS_LOG_DIR"])
    assert all("Logging error" not in p.read_text(errors="replace") for p in logs.glob("*.log"))
    assert tree_fingerprint(src) == before


@pytest.mark.fast
def test_safe_dst_name_is_unique_for_names_that_flatten_alike():
    paths = ["/p/a:b.jpg", "/p/a?b.jpg", "/p/a_b.jpg", "/p/a__b.jpg", "/p/a/_b.jpg",
             "/p/a/b.jpg", "/p__a/b.jpg", os.fsdecode(b"/p/\xff.jpg"), "/p/%FF.jpg",
             "/p/a.jpg.", "/p/a.jpg"]
    names = [sort_faces.safe_dst_name(p) for p in paths]
    assert len(set(names)) == len(names), names
    assert sort_faces.safe_dst_name("/p/a_b.jpg") == "p__a_b.jpg"  # a plain name stays plain


# ---------------------------------------------------------------------------
# 8. Signals
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_save_stop_the_pool_and_exit_130(tmp_path, signum):
    src = photos(tmp_path / "src", 120, sets=("lfw10", "five_celebs"))
    cache = tmp_path / "c.npz"
    process = subprocess.Popen([sys.executable, str(ROOT / "sort_faces.py"), "embed", str(src),
                                str(cache), "--model", "buffalo_s", "--flush-every", "4",
                                "--workers", "2"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    journal = sort_faces.journal_dir(cache)
    deadline = time.time() + 120
    while time.time() < deadline and not list(journal.glob("*.npz")):
        time.sleep(0.05)
    children = psutil.Process(process.pid).children(recursive=True)
    assert len(children) >= 2  # the model workers (and multiprocessing's helpers)
    process.send_signal(signum)  # to the run only, as `kill PID` does
    _out, err = process.communicate(timeout=60)
    assert process.returncode == sort_faces.EXIT_INTERRUPTED and "Traceback" not in err, err
    assert "interrupted" in err
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], alive
    saved = sort_faces.load_cache(cache)
    assert cache.exists() and not journal.exists() and saved.n_files >= 4
    assert not Path(str(cache) + ".lock").exists()
    assert embed_quiet(src, cache)["new"] == 120 - saved.n_files


# ---------------------------------------------------------------------------
# 9. Options
# ---------------------------------------------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize("argv, words", [
    (["cluster", "{cache}", "{tmp}/o", "--threshold", "nan"], "--threshold must be a finite"),
    (["cluster", "{cache}", "{tmp}/o", "--threshold", "inf"], "--threshold must be a finite"),
    (["cluster", "{cache}", "{tmp}/o", "--threshold", "3"], "between 0.0 and 2.0"),
    (["refine", "{cache}", "{tmp}/o", "--min-faces", "0"], "--min-faces must be at least 1"),
    (["refine", "{cache}", "{tmp}/o", "--min-det-score", "1.5"], "--min-det-score"),
    (["export-swap", "{cache}", "m.json", "{tmp}/o", "--top-n", "-1"], "--top-n must be at least 1"),
    (["export-swap", "{cache}", "m.json", "{tmp}/o", "--out-size", "10"], "--out-size must be"),
    (["export-swap", "{cache}", "m.json", "{tmp}/o", "--pad-ratio", "-1"], "--pad-ratio must be"),
    (["export-swap", "{cache}", "m.json", "{tmp}/o", "--outlier-threshold", "nan"], "finite"),
    (["embed", "{tmp}", "{tmp}/c.npz", "--workers", "0"], "--workers must be at least 1"),
    (["embed", "{tmp}", "{tmp}/c.npz", "--det-size", "100"], "--det-size must be between"),
    (["embed", "{tmp}", "{tmp}/c.npz", "--det-size", "650"], "multiple of 32"),
    (["embed", "{tmp}", "{tmp}/c.npz", "--flush-every", "0"], "--flush-every must be"),
    (["dedup", "{cache}", "--hamming", "70"], "between 0 and 64"),
    (["embed", "{tmp}", "{tmp}/c.npz", "--providers", ","], "--providers must name"),
    (["export-swap", "{cache}", "m.json", "{tmp}/o", "--providers", " "], "--providers must name"),
])
def test_bad_options_are_refused_by_the_command_line(tmp_path, argv, words):
    # options are checked before anything is read: no cache is needed to refuse them
    argv = [a.format(cache=tmp_path / "c.npz", tmp=tmp_path) for a in argv]
    code, _out, err = run_cli(*argv)
    assert code == 2 and words in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "c.npz").exists()


@pytest.mark.fast
def test_bad_options_are_refused_by_the_library_functions(tmp_path):
    cache, out = tmp_path / "c.npz", tmp_path / "o"
    manifest = tmp_path / "refine_manifest.json"
    calls = [
        lambda: sort_faces.cluster(cache, out, threshold=float("nan")),
        lambda: sort_faces.cluster(cache, out, threshold="0.5"),
        lambda: sort_faces.cluster(cache, out, link="move"),
        lambda: sort_faces.refine(cache, out, min_faces=-3),
        lambda: sort_faces.refine(cache, out, initial_threshold=math.inf),
        lambda: sort_faces.refine(cache, out, min_sharpness=3),
        lambda: sort_faces.export_swap(cache, manifest, out, top_n=-1),
        lambda: sort_faces.export_swap(cache, manifest, out, top_n=True),
        lambda: sort_faces.export_swap(cache, manifest, out, workers=0),
        lambda: sort_faces.dedup(cache, hamming=-1),
        lambda: sort_faces.embed(DATA / "lfw10", tmp_path / "c.npz", det_size=641),
        lambda: sort_faces.enrich(cache, flush_every=0),
        lambda: sort_faces.embed(DATA / "lfw10", tmp_path / "c.npz", providers=","),
        lambda: sort_faces.enrich(cache, providers=" "),
        lambda: sort_faces.export_swap(cache, manifest, out, providers=""),
        lambda: sort_faces.agglomerative_labels(np.eye(3, 8, dtype=np.float32), float("nan")),
        lambda: sort_faces.agglomerative_labels(np.eye(3, 8, dtype=np.float32), -0.5),
    ]
    for call in calls:
        with pytest.raises(sort_faces.UserError, match="^(--|unknown option)"):
            call()  # refused for the option, before the missing cache is noticed
    assert not out.exists() and not (tmp_path / "c.npz").exists()


def test_the_pool_never_starts_more_workers_than_tasks(tmp_path, pack_dir, caplog):
    from crashing_task import worker_pid

    pids = []
    identity = sort_faces.model_identity("buffalo_s", pack_dir, 640)
    entries = [(str(p),) for p in sorted((DATA / "lfw10").rglob("*.jpg"))[:8]]
    sort_faces.run_model_step(worker_pid, sort_faces.in_batches(entries, 4),
                              lambda batch, result: pids.extend(result), pack_dir=pack_dir,
                              modules=["detection"], identity=identity,
                              providers=["CPUExecutionProvider"], workers=40, n_tasks=2,
                              crash_result=lambda reason: None)
    assert len(pids) == 8 and len(set(pids)) <= 2
    caplog.set_level("WARNING", logger="face-sets")
    sort_faces.worker_setup("CPUExecutionProvider", 64)
    assert any("more than the" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------
# 10. Reporting
# ---------------------------------------------------------------------------


def test_known_unreadable_files_are_reported_on_every_run_and_exit_1(tmp_path):
    src = photos(tmp_path / "src", 3)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cache = tmp_path / "c.npz"
    for _run in range(2):  # the second run finds nothing new, and still says so
        code, out, err = run_cli("embed", src, cache, "--model", "buffalo_s")
        assert code == sort_faces.EXIT_PARTIAL, err
        assert "1 unreadable" in out and "broken.jpg" in (err if _run == 0 else
                                                         _last_log("embed"))


def _last_log(step: str) -> str:
    logs = sorted(Path(os.environ["FACESETS_LOG_DIR"]).glob(f"{step}-*.log"),
                  key=lambda p: p.stat().st_mtime_ns)
    return logs[-1].read_text()


def test_special_files_are_reported_once_and_counted(tmp_path):
    import socket

    src = photos(tmp_path / "src", 2)
    os.symlink(tmp_path / "nowhere.jpg", src / "dangling.jpg")
    os.mkfifo(src / "pipe.jpg")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(src / "sock.jpg"))
    os.symlink(src, src / "loop")
    try:
        code, out, err = run_cli("embed", src, tmp_path / "c.npz", "--model", "buffalo_s")
    finally:
        server.close()
    assert code == sort_faces.EXIT_PARTIAL and "4 skipped" in out, out + err
    for words in ("dangling symlink", "FIFO", "socket", "symlink loop"):
        assert err.count(words) == 1, (words, err)


def test_a_jpeg_libjpeg_repairs_is_marked_damaged_and_kept_out_of_facesets(tmp_path):
    src = photos(tmp_path / "src", 6, sets=("lfw10",))
    whole = (DATA / "group_photos" / "couple.jpg").read_bytes()
    (src / "repaired.jpg").write_bytes(whole[: len(whole) // 2] + b"\0" * 2000 + b"\xff\xd9")
    _bgr, _w, _h, damage = sort_faces.decode_image_checked(str(src / "repaired.jpg"))
    assert "Corrupt JPEG data" in damage
    cache_path = tmp_path / "c.npz"
    summary = embed_quiet(src, cache_path)
    assert summary["damaged"] == 1 and sort_faces.embed_incomplete(summary)
    cache = sort_faces.load_cache(cache_path)
    row = list(map(os.path.basename, cache["files"])).index("repaired.jpg")
    assert "Corrupt JPEG data" in cache["file_damage"][row]
    faces = np.flatnonzero(cache["face_file"] == row)
    assert len(faces) >= 1  # its intact half still has faces
    manifest = sort_faces.refine(cache_path, tmp_path / "refined", quiet=True,
                                 **dict(REFINE, min_faces=1))
    kept = {f["face"] for s in manifest["facesets"] for f in s["faces"]}
    dropped = {d["face"]: d["reason"] for d in manifest["dropped"]}
    for face in faces:
        assert face not in kept and "damaged" in dropped[face]


def test_gif_is_embedded_by_its_first_frame(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    face = Image.open(DATA / "face_recognition" / "barack_obama" / "obama.jpg").convert("RGB")
    blank = Image.new("RGB", face.size, (0, 0, 0))
    face.save(src / "animated.gif", save_all=True, append_images=[blank], duration=100)
    summary = embed_quiet(src, tmp_path / "c.npz")
    assert summary["new"] == 1 and summary["faces"] == 1


# ---------------------------------------------------------------------------
# 11. The lock is portable
# ---------------------------------------------------------------------------


@pytest.mark.fast
def test_the_lock_never_signals_a_process(tmp_path, monkeypatch):
    """face-sets itself never calls os.kill (on Windows it terminates the process
    it is asked about); psutil's own POSIX check may use signal 0."""
    real_kill = os.kill

    def kill(*args):
        caller = sys._getframe(1).f_globals.get("__name__")
        assert caller != "sort_faces", "os.kill would terminate the process on Windows"
        return real_kill(*args)

    monkeypatch.setattr(os, "kill", kill)
    target = tmp_path / "c.npz"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = psutil.Process(holder.pid).create_time()
        lock = Path(str(target) + ".lock")
        lock.write_text(f"{sort_faces.socket.gethostname()} {holder.pid} {started:.3f}")
        with pytest.raises(sort_faces.UserError, match="in use by another run"):
            with sort_faces.exclusive_lock(target, "cache"):
                pass
        # the same pid with another start time is a later process: the lock is stale
        lock.write_text(f"{sort_faces.socket.gethostname()} {holder.pid} {started - 100:.3f}")
        with sort_faces.exclusive_lock(target, "cache"):
            assert str(holder.pid) not in lock.read_text()
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------
# The first hour (issue 12): what a result says about itself
# ---------------------------------------------------------------------------


def test_versions_are_recorded_and_summaries_say_what_they_count(pipeline, tmp_path):
    cache = copy_outputs(pipeline, tmp_path)
    assert sort_faces.load_cache(cache).meta["face_sets_version"] == sort_faces.__version__
    for manifest in ("raw/manifest.json", "refined/refine_manifest.json"):
        assert json.loads((tmp_path / manifest).read_text())["face_sets_version"] == \
            sort_faces.__version__
    code, out, err = run_cli("cluster", cache, tmp_path / "again")
    manifest = json.loads((tmp_path / "again" / "manifest.json").read_text())
    faces, files = len(manifest["singletons"]["faces"]), len(manifest["singletons"]["outputs"])
    said = (f"{sort_faces.counted(faces, 'single face')} "
            f"({sort_faces.counted(files, 'photo')} in _singletons/)")
    assert code == 0 and said in out
    log = _last_log("cluster")
    assert " INFO cluster: " in log  # the summary is in the log at INFO, not DEBUG


@pytest.mark.fast
def test_a_link_that_cannot_be_made_is_a_copy(tmp_path, monkeypatch):
    """Windows without the right to make symlinks, or a file system without
    links: the photo is copied, never left out."""
    source = tmp_path / "photo.jpg"
    source.write_bytes(b"pixels")

    def refuse(*_args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "symlink", refuse)
    monkeypatch.setattr(os, "link", refuse)
    for link in ("symlink", "hardlink"):
        target = tmp_path / f"{link}.jpg"
        assert sort_faces.materialise(str(source), target, link) == "copy"
        assert target.read_bytes() == b"pixels" and not target.is_symlink()


@pytest.mark.fast
@pytest.mark.parametrize("key, value", [("journal_applied", "x"), ("crash_suspects", []),
                                        ("model", "oops"), ("sources", 5)])
def test_a_cache_with_a_damaged_meta_is_one_line_not_a_traceback(tmp_path, key, value):
    arrays = sort_faces.FaceCache({"model": {"embedding_size": 512}}).arrays()
    arrays["meta"] = np.array(json.dumps({"model": {"embedding_size": 512}, key: value}))
    with sort_faces.atomic_output(tmp_path / "c.npz") as handle:
        np.savez(handle, **arrays)
    code, _out, err = run_cli("cluster", tmp_path / "c.npz", tmp_path / "out")
    one_line_error(code, err, "is damaged", f"meta.{key}")


def test_a_cache_with_a_non_finite_embedding_is_one_line_not_a_traceback(celebs_cache, tmp_path):
    """A NaN in the embeddings: the exact search would quietly leave that face
    alone, and faiss (from 200,000 faces on) would end in a traceback."""
    with np.load(celebs_cache, allow_pickle=False) as loaded:
        arrays = {key: loaded[key] for key in loaded.files}
    arrays["embeddings"] = arrays["embeddings"].copy()
    arrays["embeddings"][3, 7] = np.nan
    with sort_faces.atomic_output(tmp_path / "c.npz") as handle:
        np.savez(handle, **arrays)
    code, _out, err = run_cli("cluster", tmp_path / "c.npz", tmp_path / "out")
    one_line_error(code, err, "is damaged", "not a finite number")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# Issue 25: the inputs beside the photos (decisions, caches, manifests,
# options) are refused with one line, and a refused decision is not kept
# ---------------------------------------------------------------------------


def synthetic_rows(path: Path, colour, embedding, file_row: int) -> dict:
    """A small photo written at `path`, and its rows (file, face, path) for a
    cache in which it is file row `file_row`, its one face at `embedding`."""
    Image.new("RGB", (160, 160), colour).save(path)
    info, sha = path.stat(), hashlib.sha256(path.read_bytes()).hexdigest()
    return {"files": {"files": str(path), "sha256": sha, "file_size": info.st_size,
                      "file_mtime_ns": info.st_mtime_ns, "file_width": 160, "file_height": 160,
                      "file_status": "ok", "file_reason": "", "file_phash": file_row,
                      "file_damage": "", "file_phash_turns": np.zeros(3, np.uint64),
                      "file_video": "", "file_time": 0.0},
            "faces": {"embeddings": embedding / np.linalg.norm(embedding),
                      "embedding_norm": 20.0, "face_file": file_row,
                      "bbox": [30.0, 30.0, 130.0, 130.0], "kps": np.full((5, 2), 80.0),
                      "det_score": 0.9, "face_short": 100.0, "blur": 100.0},
            "paths": {"path_seen": str(path), "path_sha256": sha, "path_size": info.st_size,
                      "path_mtime_ns": info.st_mtime_ns}}


def append_rows(cache: "sort_faces.FaceCache", rows: list[dict]) -> None:
    for table, columns in sort_faces.TABLES.items():
        cache.append(sort_faces.rows_from_records([r[table] for r in rows], columns, 512))


def synthetic_cache(tmp: Path, people: int = 2, each: int = 4) -> Path:
    """A cache of `people` x `each` small photos (one face each, the faces of a
    person close together, people far apart), made without the model; its
    photos under tmp/src, the cache at tmp/cache/c.npz."""
    src = tmp / "src"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(people, 512))
    rows = [synthetic_rows(src / f"person{person}_{index}.jpg",
                           (60 + 60 * person, 90, 100 + 20 * index),
                           centres[person] + rng.normal(0, 0.05, 512), person * each + index)
            for person in range(people) for index in range(each)]
    cache = sort_faces.FaceCache({"model": {"pack": "synthetic", "embedding_size": 512,
                                            "recognition_sha256": "0" * 64, "det_size": 640},
                                  "sources": [str(src)], "phash": sort_faces.PHASH_VERSION})
    append_rows(cache, rows)
    path = tmp / "cache" / "c.npz"
    path.parent.mkdir()
    sort_faces.save_cache(path, cache)
    return path


def add_a_photo(cache_path: Path) -> None:
    """One more photo in the cache, its face the first one's: new to its outputs."""
    cache = sort_faces.load_cache(cache_path)
    append_rows(cache, [synthetic_rows(Path(cache.meta["sources"][0]) / "new.jpg", (5, 5, 5),
                                       cache["embeddings"][0], cache.n_files)])
    sort_faces.save_cache(cache_path, cache)


@pytest.fixture()
def synthetic(tmp_path):
    """A synthetic cache with its cluster output (raw) and refine output (refined)."""
    cache = synthetic_cache(tmp_path)
    sort_faces.cluster(cache, tmp_path / "raw", quiet=True)
    sort_faces.refine(cache, tmp_path / "refined", quiet=True, min_faces=3)
    return {"tmp": tmp_path, "cache": cache, "raw": tmp_path / "raw",
            "refined": tmp_path / "refined", "decisions": sort_faces.people_path(cache)}


def contents(root: Path) -> dict:
    """Every entry under root, a regular file with its bytes' hash: what a
    refused run must leave as it was (a lock taken and given back aside)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else p.is_dir() for p in sorted(root.rglob("*"))}


def refused_in_process(capsys, argv, *words):
    """main(argv) in this process (quicker than a fresh one): exit 2, one line."""
    code = sort_faces.main([str(a) for a in argv])
    one_line_error(code, capsys.readouterr().err, *words)


@pytest.mark.fast
@pytest.mark.parametrize("command", ["people", "people name", "cluster", "refine"])
def test_a_decisions_file_that_is_a_fifo_is_refused_not_waited_on(synthetic, command):
    """A FIFO as <cache>.people.json held every step that reads it forever
    (all read it through load_decisions; extend does when it has new faces)."""
    os.mkfifo(synthetic["decisions"])
    argv = {"people": ["people", synthetic["raw"]],
            "people name": ["people", synthetic["raw"], "name", "person_001", "Alice"],
            "cluster": ["cluster", synthetic["cache"], synthetic["raw"]],
            "refine": ["refine", synthetic["cache"], synthetic["refined"], "--min-faces", "3"]}[
        command]
    before = contents(synthetic["tmp"])
    code, _out, err = run_cli(*argv, timeout=60)
    one_line_error(code, err, "people decisions", str(synthetic["decisions"]),
                   "not a regular file: a FIFO")
    assert contents(synthetic["tmp"]) == before


@pytest.mark.fast
def test_a_cache_a_manifest_or_a_lock_that_is_not_a_regular_file_is_refused(synthetic):
    tmp = synthetic["tmp"]
    os.mkfifo(tmp / "fifo.npz")
    code, _out, err = run_cli("cluster", tmp / "fifo.npz", tmp / "out", timeout=60)
    one_line_error(code, err, "cache", "fifo.npz", "a FIFO")
    manifest = synthetic["refined"] / "refine_manifest.json"
    manifest.unlink()
    os.mkfifo(manifest)
    code, _out, err = run_cli("export-swap", synthetic["cache"], manifest, tmp / "swap",
                              timeout=60)
    one_line_error(code, err, "refine manifest", "a FIFO")
    os.mkfifo(str(synthetic["cache"]) + ".lock")
    code, _out, err = run_cli("people", synthetic["raw"], "name", "person_001", "Alice",
                              timeout=60)
    one_line_error(code, err, "lock", "a FIFO")
    assert not synthetic["decisions"].exists() and not (tmp / "out").exists()
    assert not (tmp / "swap").exists()
    # a folder where the decisions file goes is named as one, not as a read error
    synthetic["decisions"].mkdir()
    with pytest.raises(sort_faces.UserError, match="not a regular file: a folder"):
        sort_faces.load_decisions(synthetic["decisions"])


@pytest.mark.fast
def test_a_folder_given_for_a_file_says_what_was_wanted(synthetic, capsys):
    """A folder where a cache or a manifest goes is one line that says what was
    wanted and names the file inside that was meant (issue 27: it said `cache X
    is not a regular file: a folder`, or `[Errno 21] Is a directory`); so is a
    manifest given where its output folder goes, and a folder where a report is
    written (a traceback, IsADirectoryError, at the end of dedup)."""
    tmp, cache, raw, refined = (synthetic[k] for k in ("tmp", "cache", "raw", "refined"))
    shelf = cache.parent  # the folder that holds the cache
    before = contents(tmp)
    code, _out, err = run_cli("cluster", raw, tmp / "out", timeout=60)
    one_line_error(code, err, f"{raw} is a folder, not a cache (.npz)",
                   f"it is a cluster output, made from the cache {cache}")
    code, _out, err = run_cli("export-swap", cache, refined, tmp / "swap", timeout=60)
    one_line_error(code, err, f"{refined} is a folder, not a refine manifest",
                   f"give the refine_manifest.json inside it, {refined / 'refine_manifest.json'}")
    refused_in_process(capsys, ["export-swap", cache, refined / "refine_manifest.json",
                                tmp / "swap", "--raw-manifest", raw],
                       f"{raw} is a folder, not a cluster manifest",
                       f"give the manifest.json inside it, {raw / 'manifest.json'}")
    refused_in_process(capsys, ["export-swap", cache, raw, tmp / "swap"],
                       f"{raw} is a folder, not a refine manifest", "there is none in it",
                       "(it is a cluster output)")
    for argv in (["embed", tmp / "src", shelf], ["cluster", shelf, tmp / "out"],
                 ["refine", shelf, tmp / "out"], ["dedup", shelf], ["enrich", shelf],
                 ["extend", shelf, raw], ["export-swap", shelf, refined / "refine_manifest.json",
                                          tmp / "swap"]):
        refused_in_process(capsys, argv, f"{shelf} is a folder, not a cache (.npz)",
                           f"the cache in it: {cache}")
    for argv in (["extend", cache, raw / "manifest.json"], ["people", raw / "manifest.json"],
                 ["extend", cache, raw, "--refine-out", refined / "refine_manifest.json"]):
        refused_in_process(capsys, argv, f"{argv[-1]} is a file, not a",
                           f"output folder; give the folder that holds it, {argv[-1].parent}")
    assert contents(tmp) == before
    report = sort_faces.duplicates_path(cache)
    report.mkdir()
    refused_in_process(capsys, ["dedup", cache], f"cannot write {report}: a folder is in its place")


@pytest.mark.fast
@pytest.mark.parametrize("kind", ["cluster", "refine"])
def test_a_decision_that_cannot_be_applied_is_not_kept(synthetic, capsys, kind):
    """people on a folder face-sets did not make ended with exit 2, but kept the
    decision, and the next cluster applied it."""
    out = synthetic["raw"] if kind == "cluster" else synthetic["refined"]
    prefix = "person" if kind == "cluster" else "faceset"
    assert sort_faces.main(["people", str(out), "name", f"{prefix}_001", "Alice"]) == 0
    kept = synthetic["decisions"].read_bytes()
    foreign = synthetic["tmp"] / "not ours"
    shutil.copytree(out, foreign)
    (foreign / sort_faces.OUTPUT_MARKER).unlink()
    (foreign / "taxes.txt").write_text("mine")
    before = contents(synthetic["tmp"])
    refused_in_process(capsys, ["people", foreign, "name", f"{prefix}_002", "Bob"],
                       "not kept", "not made by face-sets")
    assert contents(synthetic["tmp"]) == before
    assert synthetic["decisions"].read_bytes() == kept
    rebuilt = sort_faces.cluster(synthetic["cache"], synthetic["tmp"] / "again", quiet=True)
    assert [c.get("label") for c in rebuilt["clusters"]] == ["Alice", None]


def tamper_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


HUGE = 10 ** 400  # an integer JSON holds, and no float


def huge_bbox(manifest):
    entries = manifest.get("clusters", manifest.get("facesets"))
    entries[0]["faces"][0]["bbox"][2] = HUGE


def surrogate_output(manifest):
    entries = manifest.get("clusters", manifest.get("facesets"))
    entries[0]["outputs"][0] = "a\ud800b.jpg"  # JSON writes it as \ud800


@pytest.mark.fast
@pytest.mark.parametrize("damage, command", [
    (damage, command) for damage in ("huge bbox", "surrogate output")
    for command in ("cluster", "refine", "extend", "people", "export-swap")] + [
    ("huge box", command) for command in ("cluster", "refine", "extend", "people")])
def test_a_number_no_float_holds_or_a_name_no_file_has_is_one_line(synthetic, capsys, damage,
                                                                   command):
    """A 400-digit integer in a manifest's bbox or a decision's box
    (OverflowError), an output name with a lone surrogate (UnicodeEncodeError):
    a traceback in every step that read them."""
    tmp, cache = synthetic["tmp"], synthetic["cache"]
    raw, refined = synthetic["raw"], synthetic["refined"]
    assert sort_faces.main(["people", str(raw), "name", "person_001", "Alice"]) == 0
    capsys.readouterr()
    if command == "extend":
        add_a_photo(cache)  # else extend is up to date and reads no decision
    argv = {"cluster": ["cluster", cache, raw], "refine": ["refine", cache, refined],
            "extend": ["extend", cache, raw, "--refine-out", refined], "people": ["people", raw],
            "export-swap": ["export-swap", cache, refined / "refine_manifest.json",
                            tmp / "swap"]}[command]
    if damage == "huge box":
        tamper_json(synthetic["decisions"],
                    lambda d: d["decisions"][0]["faces"][0]["box"].__setitem__(1, HUGE))
        words = ("people decisions", "decision 1.faces[0].box", "not a finite number")
    else:
        uses_refine = command in ("refine", "export-swap")
        manifest = refined / "refine_manifest.json" if uses_refine else raw / "manifest.json"
        tamper_json(manifest, huge_bbox if damage == "huge bbox" else surrogate_output)
        where = "facesets[0]" if uses_refine else "clusters[0]"
        words = (manifest.name, f"{where}.faces[0].bbox", "not a finite number") \
            if damage == "huge bbox" else (manifest.name, f"{where}.outputs", "not a file name")
    before = contents(tmp)
    refused_in_process(capsys, argv, *words)
    assert contents(tmp) == before


@pytest.mark.fast
@pytest.mark.parametrize("key, value", [("bbox", np.inf), ("bbox", -np.inf), ("kps", np.nan)])
def test_a_cache_with_a_non_finite_box_is_one_line_not_a_traceback(tmp_path, capsys, key, value):
    """An infinite box ended cluster in an OverflowError (face_thumbnails)."""
    cache = synthetic_cache(tmp_path)
    with np.load(cache, allow_pickle=False) as loaded:
        arrays = {name: loaded[name] for name in loaded.files}
    arrays[key] = arrays[key].copy()
    arrays[key][2].flat[2] = value
    with sort_faces.atomic_output(cache) as handle:
        np.savez(handle, **arrays)
    refused_in_process(capsys, ["cluster", cache, tmp_path / "out"], "is damaged",
                       "not a finite number", "boxes" if key == "bbox" else "key points")
    assert not (tmp_path / "out").exists()
