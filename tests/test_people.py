"""Issue 13 (first part): people decisions (name, merge, move, reject, undo),
kept beside the cache, honoured by every later cluster at any threshold."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sort_faces
from conftest import DATA, embed_quiet


def key(i: int) -> dict:
    return {"sha256": f"{i:064x}", "box": [0.0, 0.0, 10.0, 10.0]}


def keys(*rows) -> list[dict]:
    return [key(r) for r in rows]


def rows_of(face_keys) -> np.ndarray:
    return np.array([int(k["sha256"], 16) for k in face_keys])


def decided(*decisions) -> list[dict]:
    return [dict(d, id=i + 1, time="2026-11-25T12:00:00") for i, d in enumerate(decisions)]


# --- fast tier: the decisions and the constraints, no model -----------------------


@pytest.mark.fast
def test_merge_pins_people_together_and_a_later_move_takes_a_face_out():
    decisions = decided({"verb": "merge", "people": [keys(1, 2), keys(3, 4)]},
                        {"verb": "move", "faces": keys(4), "to": None, "away": [keys(1, 2, 3, 4)]})
    folded = sort_faces.fold_decisions(decisions, rows_of)
    together = sorted(folded["together"])
    assert together == [[1, 2, 3], [4]]
    assert len(folded["apart"]) == 1
    a, b = folded["apart"][0]
    assert {tuple(folded["together"][a]), tuple(folded["together"][b])} == {(1, 2, 3), (4,)}


@pytest.mark.fast
def test_a_split_keeps_its_pieces_apart():
    decisions = decided({"verb": "merge", "people": [keys(1, 2), keys(3, 4, 5)]},
                        {"verb": "split", "pieces": [keys(1, 2, 3), keys(4), keys(5)]})
    folded = sort_faces.fold_decisions(decisions, rows_of)
    assert sorted(folded["together"]) == [[1, 2, 3], [4], [5]]
    assert len(folded["apart"]) == 3  # every pair of pieces


@pytest.mark.fast
def test_reject_and_undo():
    decisions = decided({"verb": "merge", "people": [keys(1), keys(2)]},
                        {"verb": "reject", "faces": keys(2, 7)},
                        {"verb": "name", "faces": keys(1, 2), "name": "Alice"})
    folded = sort_faces.fold_decisions(decisions, rows_of)
    assert folded["rejected"] == [2, 7] and folded["together"] == [[1]]
    assert folded["names"] == [([1, 2], "Alice")]
    undone = decisions + decided({}, {}, {}, {"verb": "undo", "undoes": 2})[3:]
    folded = sort_faces.fold_decisions(undone, rows_of)
    assert folded["rejected"] == [] and folded["together"] == [[1, 2]]
    # a face the cache no longer holds is left out
    gone = sort_faces.fold_decisions(decisions, lambda ks: np.array([-1] * len(ks)))
    assert gone["together"] == [] and gone["rejected"] == []


def blob(rng, centre, count, spread=0.05):
    points = centre + rng.normal(0, spread, (count, len(centre)))
    return points / np.linalg.norm(points, axis=1, keepdims=True)


@pytest.mark.fast
def test_clustering_keeps_pinned_faces_together_and_apart_groups_apart():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 64))
    X = np.vstack([blob(rng, a, 6), blob(rng, b, 6)]).astype(np.float32)
    plain, _ = sort_faces.agglomerative_labels(X, 0.5)
    assert len(set(plain[:6])) == 1 and len(set(plain[6:])) == 1 and plain[0] != plain[6]
    merged, _ = sort_faces.agglomerative_labels(X, 0.5, together=[np.arange(12)])
    assert len(set(merged)) == 1  # whatever the distance
    split, _ = sort_faces.agglomerative_labels(
        X, 0.5, together=[np.array([0, 1]), np.array([2, 3])], apart=[(0, 1)])
    assert split[0] == split[1] and split[2] == split[3] and split[0] != split[2]
    assert split[4] in (split[0], split[2]) and len(set(split[6:])) == 1
    # the same at any threshold: a looser one cannot join an apart pair
    loose, _ = sort_faces.agglomerative_labels(
        X, 1.9, together=[np.array([0, 1]), np.array([2, 3])], apart=[(0, 1)])
    assert loose[0] != loose[2]


@pytest.mark.fast
def test_numbers_are_kept_and_a_merge_keeps_the_lowest():
    old = [{"name": "person_003", "faces": [{"face": f} for f in (1, 2, 3)]},
           {"name": "person_017", "faces": [{"face": f} for f in (4, 5)]},
           {"name": "person_020", "faces": [{"face": f} for f in (8, 9)]}]
    groups = [np.array([1, 2, 3, 4, 5]), np.array([8, 9]), np.array([30, 31])]
    assert sort_faces.keep_numbers(groups, old, 21) == ["person_003", "person_020", "person_021"]


@pytest.mark.fast
@pytest.mark.parametrize("damage", [
    "{not json", '{"format": "something else", "version": 1, "decisions": []}',
    '{"format": "face-sets people decisions", "version": 99, "decisions": []}',
    "bad verb", "bad id", "bad sha", "undo twice", "empty name"])
def test_a_damaged_decisions_file_is_one_clear_error(tmp_path, damage):
    path = tmp_path / "c.npz.people.json"
    good = decided({"verb": "name", "faces": keys(1), "name": "Alice"},
                   {"verb": "undo", "undoes": 1})
    sort_faces.write_decisions(path, good)
    assert sort_faces.load_decisions(path) == good
    data = json.loads(path.read_text())
    edits = {"bad verb": lambda d: d["decisions"][0].update(verb="forget"),
             "bad id": lambda d: d["decisions"][1].update(id=7),
             "bad sha": lambda d: d["decisions"][0]["faces"][0].update(sha256="../../x"),
             "undo twice": lambda d: d["decisions"].append(dict(d["decisions"][1], id=3)),
             "empty name": lambda d: d["decisions"][0].update(name=" ")}
    if damage in edits:
        edits[damage](data)
        path.write_text(json.dumps(data))
    else:
        path.write_text(damage)
    with pytest.raises(sort_faces.UserError, match="people|decisions"):
        sort_faces.load_decisions(path)


# --- the model tier: decisions on a real cluster output ----------------------------


@pytest.fixture()
def clustered(celebs_cache, tmp_path):
    cache = tmp_path / "cache" / "c.npz"
    cache.parent.mkdir()
    shutil.copy2(celebs_cache, cache)
    sort_faces.cluster(cache, tmp_path / "raw", quiet=True)
    return cache, tmp_path / "raw"


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def person_of(manifest: dict) -> dict:
    return {f["face"]: entry["name"] for entry in manifest["clusters"] for f in entry["faces"]}


def run_cli(*args):
    done = subprocess.run([sys.executable, str(Path(sort_faces.__file__)), *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


def test_decisions_hold_through_rebuilds_at_any_threshold(clustered):
    cache, out = clustered
    before = manifest_of(out)
    first, second, third = (e["name"] for e in before["clusters"][:3])
    sort_faces.people(out, "name", people_named=[third], name="Zoë", quiet=True)
    assert manifest_of(out)["clusters"][2]["label"] == "Zoë"
    sort_faces.people(out, "merge", people_named=[second, third], quiet=True)
    merged = manifest_of(out)
    owner = person_of(merged)
    moved_faces = [f["face"] for f in before["clusters"][2]["faces"]]
    assert {owner[f] for f in moved_faces} == {second}  # the lowest number kept
    assert third not in {e["name"] for e in merged["clusters"]}
    assert next(e for e in merged["clusters"] if e["name"] == second)["label"] == "Zoë"
    face = before["clusters"][0]["faces"][0]["face"]
    sort_faces.people(out, "move", faces_named=[str(face)], to=second, quiet=True)
    assert person_of(manifest_of(out))[face] == second
    stranger = before["clusters"][0]["faces"][1]["face"]
    sort_faces.people(out, "reject", faces_named=[str(stranger)], quiet=True)
    rejected = manifest_of(out)
    assert stranger not in person_of(rejected)
    assert stranger not in {f["face"] for f in rejected["singletons"]["faces"]}
    assert [f["face"] for f in rejected["rejected"]["faces"]] == [stranger]
    for threshold in (0.40, 0.55, 0.75):  # every later cluster, whatever its threshold
        manifest = sort_faces.cluster(cache, out, threshold=threshold, quiet=True)
        owner = person_of(manifest)
        assert owner[face] == second and stranger not in owner
        assert {owner[f] for f in moved_faces} == {second}
        assert owner.get(before["clusters"][0]["faces"][2]["face"]) != second
        named = [e for e in manifest["clusters"] if e.get("label") == "Zoë"]
        assert [e["name"] for e in named] == [second]
    sort_faces.people(out, "undo", quiet=True)  # the reject
    assert stranger in person_of(manifest_of(out)) or stranger in {
        f["face"] for f in manifest_of(out)["singletons"]["faces"]}
    decisions = sort_faces.load_decisions(sort_faces.people_path(cache))
    assert [d["verb"] for d in decisions] == ["name", "merge", "move", "reject", "undo"]


def test_refine_honours_the_decisions_made_on_the_cluster_output(clustered, tmp_path):
    from conftest import REFINE

    cache, out = clustered
    before = manifest_of(out)
    first, second = before["clusters"][0], before["clusters"][1]
    sort_faces.people(out, "name", people_named=[first["name"]], name="Alice", quiet=True)
    sort_faces.people(out, "merge", people_named=[first["name"], second["name"]], quiet=True)
    stranger = first["faces"][0]["face"]
    sort_faces.people(out, "reject", faces_named=[str(stranger)], quiet=True)
    refined = sort_faces.refine(cache, tmp_path / "refined", quiet=True, **REFINE)
    owner = {f["face"]: e["name"] for e in refined["facesets"] for f in e["faces"]}
    merged = [f["face"] for f in first["faces"] + second["faces"] if f["face"] in owner]
    assert merged and len({owner[f] for f in merged}) == 1  # one faceset, whatever the gates kept
    alice = next(e for e in refined["facesets"] if e["name"] == owner[merged[0]])
    assert alice["label"] == "Alice"
    assert stranger not in owner
    assert next(d for d in refined["dropped"] if d["face"] == stranger)["stage"] == "rejected"


def test_new_photos_join_a_named_person_through_extend(tmp_path):
    cache = tmp_path / "c.npz"
    held_back = tmp_path / "src"
    shutil.copytree(DATA / "five_celebs", held_back)
    later = tmp_path / "later"
    later.mkdir()
    for person in sorted(p for p in held_back.iterdir() if p.is_dir()):
        photos = sorted(person.iterdir())
        (later / person.name).mkdir()
        for photo in photos[len(photos) * 2 // 3:]:
            photo.rename(later / person.name / photo.name)
    embed_quiet(held_back, cache)
    out = tmp_path / "raw"
    sort_faces.cluster(cache, out, quiet=True)
    first = manifest_of(out)["clusters"][0]
    sort_faces.people(out, "name", people_named=[first["name"]], name="Alice", quiet=True)
    embed_quiet(later, cache)
    sort_faces.extend(cache, out, quiet=True)
    manifest = manifest_of(out)
    alice = next(e for e in manifest["clusters"] if e.get("label") == "Alice")
    assert alice["name"] == first["name"] and alice["size"] > first["size"]


def test_split_gives_the_largest_piece_the_old_number(clustered):
    cache, out = clustered
    sort_faces.people(out, "merge", people_named=["person_001", "person_002"], quiet=True)
    merged = manifest_of(out)
    big = next(e for e in merged["clusters"] if e["name"] == "person_001")
    with pytest.raises(sort_faces.UserError, match="stays one person"):
        sort_faces.people(out, "split", people_named=["person_003"], split_threshold=1.99,
                          quiet=True)
    sort_faces.people(out, "split", people_named=["person_001"], quiet=True)
    split = manifest_of(out)
    owner = person_of(split)
    pieces = {owner[f["face"]] for f in big["faces"]}
    assert len(pieces) >= 2 and "person_001" in pieces
    sizes = {e["name"]: e["size"] for e in split["clusters"]}
    assert max(pieces, key=lambda n: sizes[n]) == "person_001"
    assert min(int(n[7:]) for n in pieces - {"person_001"}) >= merged["next_number"]
    for threshold in (0.55, 0.8):  # the pieces stay apart even where they would join
        again = person_of(sort_faces.cluster(cache, out, threshold=threshold, quiet=True))
        assert len({again[f["face"]] for f in big["faces"]}) == len(pieces)


def test_suggestions_come_with_their_command_and_respect_decisions(clustered):
    cache, out = clustered
    result = sort_faces.people(out, "suggest", quiet=True)
    suggestions = result["suggestions"]
    assert suggestions and [s["distance"] for s in suggestions] == sorted(
        s["distance"] for s in suggestions)
    threshold = manifest_of(out)["parameters"]["threshold"]
    assert all(threshold - 1e-6 <= s["distance"] < threshold + sort_faces.SUGGEST_BAND
               for s in suggestions if s["kind"] == "merge")
    assert sum(row["suggestions"] for row in result["people"]) == sum(
        len(s["people"]) for s in suggestions)
    merge = next(s for s in suggestions if s["kind"] == "merge")
    words = merge["command"].split()
    assert words[:3] == ["sort_faces.py", "people", str(out)]
    code, _out, err = run_cli(*words[1:])
    assert code == 0, err
    kept, gone = merge["people"]
    assert gone not in {e["name"] for e in manifest_of(out)["clusters"]}
    # split the merged person again: its pieces are kept apart, so never suggested together
    merged_faces = [f["face"] for f in next(e for e in manifest_of(out)["clusters"]
                                            if e["name"] == kept)["faces"]]
    sort_faces.people(out, "split", people_named=[kept], split_threshold=threshold, quiet=True)
    owner = person_of(manifest_of(out))
    pieces = {owner[f] for f in merged_faces}
    assert len(pieces) >= 2
    for suggestion in sort_faces.people(out, "suggest", quiet=True)["suggestions"]:
        if suggestion["kind"] == "merge":
            assert not set(suggestion["people"]) <= pieces, suggestion


def test_bad_people_commands_are_one_line_and_change_nothing(clustered):
    cache, out = clustered
    path = sort_faces.people_path(cache)
    code, listing, _err = run_cli("people", out)
    assert code == 0 and listing.count("person_") == len(manifest_of(out)["clusters"])
    first, second = (e["name"] for e in manifest_of(out)["clusters"][:2])
    assert run_cli("people", out, "name", first, "Alice")[0] == 0
    saved = path.read_bytes()
    for args, said in [(("name", "person_999", "Bob"), "not a person"),
                       (("name", second, "alice"), "already named"),
                       (("merge", first, first), "itself"),
                       (("move", "99999999", "--to", first), "not a face id"),
                       (("reject", "-3"), "not a face id"),
                       (("name", first, "bad\x07name"), "control")]:
        code, _out, err = run_cli("people", out, *args)
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, (args, err)
        assert path.read_bytes() == saved
    path.write_text(path.read_text()[:-20])  # damaged by hand
    code, _out, err = run_cli("people", out, "undo")
    assert code == 2 and "people decisions" in err and len(err.strip().splitlines()) == 1
    code, _out, err = run_cli("cluster", cache, out)
    assert code == 2 and "people decisions" in err
