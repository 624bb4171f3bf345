"""What lies beside the photos is input, not trust: output folders the tool
did not make are never replaced, and manifests, caches, decisions and options
that are tampered with, damaged, of another kind or not regular files are
refused with one line (exit 2, no traceback) before anything is written. Each
test reproduces one way earlier code lost data, wrote outside its output or
crashed (issues 17 and 25)."""

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sort_faces
from conftest import DATA, copy_outputs, one_line_error, run_cli, tree_fingerprint


# ---------------------------------------------------------------------------
# Output ownership
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("command, manifest_name", [("cluster", "manifest.json"),
                                                    ("refine", "refine_manifest.json")])
def test_a_foreign_folder_holding_a_manifest_is_never_replaced(small_run, tmp_path, command,
                                                              manifest_name):
    foreign = tmp_path / "my documents"
    foreign.mkdir()
    (foreign / "taxes.txt").write_text("keep me")
    shutil.copy2(small_run["raw"] / "manifest.json", foreign / manifest_name)
    before = tree_fingerprint(foreign)
    code, _out, err = run_cli(command, small_run["cache"], foreign)
    one_line_error(code, err, "not made by face-sets")
    assert tree_fingerprint(foreign) == before


def test_export_refuses_a_foreign_folder_and_a_step_refuses_another_kind(small_run, tmp_path):
    cache = copy_outputs(small_run, tmp_path)
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


def test_an_output_from_before_markers_is_adopted_only_if_its_manifest_covers_it(small_run,
                                                                                   tmp_path):
    cache = copy_outputs(small_run, tmp_path)
    raw = tmp_path / "raw"
    (raw / sort_faces.OUTPUT_MARKER).unlink()  # as an earlier face-sets left it
    manifest = sort_faces.cluster(cache, raw, quiet=True)
    assert sort_faces.read_marker(raw)["kind"] == "cluster" and manifest["clusters"]
    (raw / sort_faces.OUTPUT_MARKER).unlink()
    (raw / "notes.txt").write_text("the user's")  # not the manifest's: not ours
    with pytest.raises(sort_faces.UserError, match="not made by face-sets"):
        sort_faces.cluster(cache, raw, quiet=True)
    assert (raw / "notes.txt").read_text() == "the user's"


def test_an_output_path_that_is_a_file_is_refused(small_run, tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("a file")
    code, _out, err = run_cli("cluster", small_run["cache"], target)
    one_line_error(code, err, "is a file")
    assert target.read_text() == "a file"


# ---------------------------------------------------------------------------
# Manifests are input
# ---------------------------------------------------------------------------


def tamper(path: Path, change) -> None:
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/absolute_faceset", "faceset_001/../../x",
                                  "faceset_1", ""])
def test_export_refuses_faceset_names_not_of_its_own_form(small_run, tmp_path, name):
    cache = copy_outputs(small_run, tmp_path)
    refine_manifest = tmp_path / "refined" / "refine_manifest.json"
    tamper(refine_manifest, lambda m: m["facesets"][0].update(name=name))
    before = tree_fingerprint(tmp_path)
    src_before = tree_fingerprint(small_run["src"])
    code, _out, err = run_cli("export-swap", cache, refine_manifest, tmp_path / "swap",
                              "--enrich", "--min-face-short", "40")
    one_line_error(code, err, "refine_manifest.json", "facesets[0].name")
    assert tree_fingerprint(tmp_path) == before  # nothing written, not even the enrich
    assert tree_fingerprint(small_run["src"]) == src_before
    assert not Path("/tmp/absolute_faceset").exists()


@pytest.mark.parametrize("field, value, words", [
    ("face", -1, "out of range"),
    ("face", 999999, "out of range"),
    ("face", "3", "is not an integer"),
    ("face", True, "is not an integer"),
    (None, None, "has no 'face'"),
])
def test_face_ids_are_checked_against_the_cache(small_run, tmp_path, field, value, words):
    cache = copy_outputs(small_run, tmp_path)
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


def test_duplicate_names_and_faces_are_refused(small_run, tmp_path):
    cache = copy_outputs(small_run, tmp_path)
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
def test_extend_never_deletes_what_a_manifest_lists_outside_its_output(small_run, tmp_path,
                                                                      victim):
    cache = copy_outputs(small_run, tmp_path)
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    source_photo = next(small_run["src"].rglob("*.jpg"))
    target = str(source_photo) if victim == "source photo" else "../../precious.txt"
    manifest_path = tmp_path / "raw" / "manifest.json"
    tamper(manifest_path, lambda m: m["singletons"]["outputs"].append(target))
    src_before = tree_fingerprint(small_run["src"])
    code, _out, err = run_cli("extend", cache, tmp_path / "raw")
    one_line_error(code, err, "singletons.outputs", "not a plain file name")
    assert outside.read_text() == "keep" and source_photo.exists()
    assert tree_fingerprint(small_run["src"]) == src_before


def test_nan_thresholds_in_a_manifest_are_refused(small_run, tmp_path):
    cache = copy_outputs(small_run, tmp_path)
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
# Caches that are not the tool's own, or damaged
# ---------------------------------------------------------------------------


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
# Options
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


# ---------------------------------------------------------------------------
# Decisions, caches, manifests and output folders: refused with one line, and a
# refused decision is not kept
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
