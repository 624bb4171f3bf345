"""`people OUT apart`, "not this person" (issue 29): faces kept apart from a
person (`apart FACE... --from PERSON`) leave it and never join it again, and
people kept apart (`apart PERSON PERSON...`) are never merged nor suggested
together, at any threshold, until a later decision puts them together or an
undo takes it back. The decisions file is of version 2; version 1 files
(tests/data/people_v1, written by face-sets 0.5.0) still read."""

import collections
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import sort_faces
from conftest import (REFINE, ROOT, decided, faceset_faces, keys, manifest_of, rows_of,
                      run_cli, tree_fingerprint)

V1_DECISIONS = ROOT / "tests" / "data" / "people_v1" / "five_celebs.npz.people.json"


def groups(folded) -> list[tuple]:
    """The pinned groups, and the apart pairs as pairs of groups."""
    together = [tuple(g) for g in folded["together"]]
    return sorted(together), sorted(tuple(sorted((together[a], together[b])))
                                    for a, b in folded["apart"])


# --- fast tier: the records and their constraints, no model -------------------------


@pytest.mark.fast
def test_faces_kept_apart_leave_the_person_each_alone_until_a_move_brings_one_back():
    merge = {"verb": "merge", "people": [keys(1, 2, 3), keys(4, 5)]}
    apart = {"verb": "apart", "faces": keys(4, 5), "from": keys(1, 2, 3)}
    folded = sort_faces.fold_decisions(decided(merge, apart), rows_of)
    together, pairs = groups(folded)
    # released from the merge, each alone (not asserted to be one person), each
    # apart from the person's other faces, pinned as one
    assert together == [(1, 2, 3), (4,), (5,)]
    assert pairs == [((1, 2, 3), (4,)), ((1, 2, 3), (5,))]
    assert folded["apart_only"] == [4, 5]
    # a later move of one back into the person wins: no pair keeps it out any more
    back = {"verb": "move", "faces": keys(5), "to": keys(1, 2, 3), "away": []}
    folded = sort_faces.fold_decisions(decided(merge, apart, back), rows_of)
    assert groups(folded) == ([(1, 2, 3, 5), (4,)], [((1, 2, 3, 5), (4,))])
    assert folded["apart_only"] == [4]
    # a later merge of the person it was moved into wins too, and it is someone then
    elsewhere = {"verb": "move", "faces": keys(4), "to": keys(8, 9), "away": []}
    again = {"verb": "merge", "people": [keys(1, 2, 3, 5), keys(4, 8, 9)]}
    folded = sort_faces.fold_decisions(decided(merge, apart, elsewhere, again), rows_of)
    assert groups(folded) == ([(1, 2, 3, 4, 5, 8, 9)], [])
    assert folded["apart_only"] == []
    # undo takes the apart back: the merge alone
    undo = {"verb": "undo", "undoes": 2}
    folded = sort_faces.fold_decisions(decided(merge, apart, undo), rows_of)
    assert groups(folded) == ([(1, 2, 3, 4, 5)], []) and folded["apart_only"] == []
    # a face rejected since is in no group, and a face the cache lacks is left out
    reject = {"verb": "reject", "faces": keys(4)}
    folded = sort_faces.fold_decisions(decided(merge, apart, reject), rows_of)
    assert groups(folded) == ([(1, 2, 3), (5,)], [((1, 2, 3), (5,))])
    assert folded["rejected"] == [4] and folded["apart_only"] == [5]
    gone = sort_faces.fold_decisions(decided(apart), lambda ks: np.array([-1] * len(ks)))
    assert gone["together"] == [] and gone["apart"] == [] and gone["apart_only"] == []


@pytest.mark.fast
def test_people_kept_apart_stay_apart_pairwise_until_a_merge_joins_them():
    apart = {"verb": "apart", "people": [keys(1, 2), keys(3), keys(4, 5)]}
    folded = sort_faces.fold_decisions(decided(apart), rows_of)
    assert groups(folded) == ([(1, 2), (3,), (4, 5)],
                              [((1, 2), (3,)), ((1, 2), (4, 5)), ((3,), (4, 5))])
    assert folded["apart_only"] == []  # each is asserted to be one person
    merge = {"verb": "merge", "people": [keys(1, 2), keys(3)]}
    folded = sort_faces.fold_decisions(decided(apart, merge), rows_of)
    assert groups(folded) == ([(1, 2, 3), (4, 5)], [((1, 2, 3), (4, 5))])
    # people merged before are taken apart: each keeps only its own faces
    earlier = {"verb": "merge", "people": [keys(1, 2), keys(3), keys(6)]}
    folded = sort_faces.fold_decisions(decided(earlier, apart), rows_of)
    assert groups(folded)[0] == [(1, 2), (3,), (4, 5), (6,)]
    assert len(folded["apart"]) == 3
    folded = sort_faces.fold_decisions(decided(apart, {"verb": "undo", "undoes": 1}), rows_of)
    assert groups(folded) == ([], [])


@pytest.mark.fast
def test_a_person_a_face_was_kept_apart_from_keeps_it_apart_when_split_or_kept_apart():
    """Splitting a person, or keeping it apart from another, pins its faces
    anew: each new group keeps the apart pairs of the groups its faces were in
    (they were lost: the face kept apart came back into the person)."""
    face = {"verb": "apart", "faces": keys(9), "from": keys(1, 2, 3, 4)}
    people = {"verb": "apart", "people": [keys(1, 2, 3, 4), keys(7, 8)]}
    folded = sort_faces.fold_decisions(decided(face, people), rows_of)
    assert groups(folded) == ([(1, 2, 3, 4), (7, 8), (9,)],
                              [((1, 2, 3, 4), (7, 8)), ((1, 2, 3, 4), (9,))])
    split = {"verb": "split", "pieces": [keys(1, 2), keys(3, 4)]}
    folded = sort_faces.fold_decisions(decided(face, split), rows_of)
    assert groups(folded) == ([(1, 2), (3, 4), (9,)],
                              [((1, 2), (3, 4)), ((1, 2), (9,)), ((3, 4), (9,))])


@pytest.mark.fast
def test_clustering_keeps_faces_only_kept_apart_out_of_their_person():
    rng = np.random.default_rng(0)
    centre = rng.normal(size=64)
    points = centre + rng.normal(0, 0.05, (8, 64))
    X = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)
    folded = sort_faces.fold_decisions(
        decided({"verb": "apart", "faces": keys(6, 7), "from": keys(0, 1, 2, 3, 4, 5)}),
        lambda ks: rows_of(ks))
    together = [np.array(g) for g in folded["together"]]
    for threshold in (0.5, 1.9):  # however loose
        labels, _ = sort_faces.agglomerative_labels(X, threshold, together=together,
                                                    apart=folded["apart"])
        assert len(set(labels[:6])) == 1 and labels[6] != labels[0] and labels[7] != labels[0]
        assert labels[6] == labels[7]  # nothing keeps the two apart from each other


@pytest.mark.fast
def test_apart_records_are_checked_and_version_1_files_still_read(tmp_path):
    path = tmp_path / "c.npz.people.json"
    good = decided({"verb": "apart", "faces": keys(1), "from": keys(2, 3)},
                   {"verb": "apart", "people": [keys(2, 3), keys(4)]},
                   {"verb": "undo", "undoes": 2})
    sort_faces.write_decisions(path, good)
    written = json.loads(path.read_text())
    assert written["version"] == sort_faces.PEOPLE_VERSION == 2
    assert sort_faces.load_decisions(path) == good
    for edit, said in [(lambda d: d[0].pop("from"), "decision 1: has no 'from'"),
                       (lambda d: d[0].update(faces=[]), "decision 1.faces: names no face"),
                       (lambda d: d[0].update({"from": [{"sha256": "x", "box": [0] * 4}]}),
                        r"decision 1.from\[0\].sha256: is not a sha256"),
                       (lambda d: d[1].update(people=[keys(2)]), "two people or more"),
                       (lambda d: d[1].pop("people"), "decision 2: has no 'people'")]:
        data = json.loads(json.dumps(written))
        edit(data["decisions"])
        path.write_text(json.dumps(data))
        with pytest.raises(sort_faces.UserError, match=said):
            sort_faces.load_decisions(path)
    # version 1 had no apart: a file that says 1 and holds one is damaged
    path.write_text(json.dumps(dict(written, version=1)))
    with pytest.raises(sort_faces.UserError, match="'apart' is not a verb of version 1"):
        sort_faces.load_decisions(path)
    # a file version 1 wrote (face-sets 0.5.0) reads as it is
    old = sort_faces.load_decisions(V1_DECISIONS)
    assert json.loads(V1_DECISIONS.read_text())["version"] == 1
    assert [d["verb"] for d in old] == ["name", "merge", "move", "reject", "split", "undo"]
    assert sort_faces.fold_decisions(old, lambda ks: np.arange(len(ks)))["names"]


# --- the model tier: on a real cluster output of five_celebs ------------------------


def owners(manifest: dict, groups_key: str = "clusters") -> dict:
    return {f["face"]: e["name"] for e in manifest[groups_key] for f in e["faces"]}


def faces_of(manifest: dict, name: str, groups_key: str = "clusters") -> list[int]:
    return [f["face"] for e in manifest[groups_key] if e["name"] == name for f in e["faces"]]


def said(capsys, *argv) -> tuple[int, str, str]:
    """`sort_faces.py ARGV` in this process (quicker than a fresh one)."""
    code = sort_faces.main([str(a) for a in argv])
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def offered_moves(suggestions) -> set:
    return {(face, s["people"][0]) for s in suggestions if s["kind"] == "move"
            for face in s["faces"]}


def offered_merges(suggestions) -> set:
    return {tuple(s["people"]) for s in suggestions if s["kind"] == "merge"}


def test_a_face_kept_apart_leaves_its_person_for_good(clustered, tmp_path, capsys):
    cache, out = clustered
    data = sort_faces.load_cache(cache)
    embeddings = data["embeddings"]
    person = manifest_of(out)["clusters"][0]
    name, faces = person["name"], [f["face"] for f in person["faces"]]

    def distance(face) -> float:  # from the rest of its person, on average
        return 1.0 - float(embeddings[face] @ embeddings[[f for f in faces if f != face]].mean(0))

    face = max(faces, key=distance)  # the likeliest stranger in it
    rest = [f for f in faces if f != face]
    code, printed, err = run_cli("people", out, "apart", face, "--from", name)
    assert code == 0, err
    assert f"decision 1: apart {face} --from {name} (kept in" in printed, printed
    kept = json.loads(sort_faces.people_path(cache).read_text())
    assert kept["version"] == 2
    (decision,) = kept["decisions"]
    assert decision["verb"] == "apart"
    assert list(sort_faces.face_rows(data, decision["faces"])) == [face]
    assert sorted(sort_faces.face_rows(data, decision["from"])) == sorted(rest)
    after = manifest_of(out)
    owner = owners(after)
    assert owner.get(face) != name and all(owner[f] == name for f in rest)
    # only kept apart, it is no one yet: a single face, not a person of its own
    assert face in {f["face"] for f in after["singletons"]["faces"]} or \
        len(faces_of(after, owner[face])) >= 2
    # suggest would offer it back to its person but for the decision
    view = sort_faces.people_view(sort_faces.load_manifest(out / "manifest.json", "cluster"),
                                  "cluster")
    plain = sort_faces.people_suggestions(view, out, data, {"together": [], "apart": []})
    assert (face, name) in offered_moves(plain)
    code, listed, _err = said(capsys, "people", out, "suggest")
    assert code == 0 and listed.count("\n") >= 2
    for line in listed.splitlines()[1:]:  # `0.552  .../sort_faces.py people OUT move 7 9 --to P`
        words = line.split()
        if "move" in words and words[-1] == name:
            assert str(face) not in words[words.index("move") + 1:-2], line
    # a fresh cluster at a looser threshold keeps it out too
    loose = owners(sort_faces.cluster(cache, tmp_path / "loose", threshold=0.75, quiet=True))
    assert loose.get(face) != loose[rest[0]] and len({loose[f] for f in rest}) == 1
    # a later move back into the person wins; undo of it keeps the face apart again
    assert said(capsys, "people", out, "move", face, "--to", name)[0] == 0
    assert owners(manifest_of(out))[face] == name
    assert said(capsys, "people", out, "undo")[0] == 0
    assert owners(manifest_of(out)).get(face) != name
    # undo of the apart restores the person as it was, and says what it undid
    code, printed, _err = said(capsys, "people", out, "undo")
    assert code == 0 and f"undid decision 1: apart {face} --from {name} (kept as" in printed, printed
    assert sorted(faces_of(manifest_of(out), name)) == sorted(faces)


def test_people_kept_apart_are_never_merged_nor_suggested(clustered, tmp_path, capsys):
    cache, out = clustered
    data = sort_faces.load_cache(cache)
    embeddings = data["embeddings"]
    people = {e["name"]: [f["face"] for f in e["faces"]] for e in manifest_of(out)["clusters"]}

    def apart(a, b) -> float:  # average linkage's distance between two people
        return 1.0 - float((embeddings[people[a]] @ embeddings[people[b]].T).mean())

    a, b = min(((a, b) for a in people for b in people if a < b), key=lambda p: apart(*p))
    # the looser threshold at which the two would be one person
    looser = next(t for t in (0.6, 0.65, 0.7, 0.75, 0.8)
                  if len(set(sort_faces.agglomerative_labels(embeddings, t)[0][
                      people[a] + people[b]])) == 1)
    assert (a, b) in offered_merges(sort_faces.people(out, "suggest", quiet=True)["suggestions"])
    code, printed, err = said(capsys, "people", out, "apart", a, b)
    assert code == 0 and f"decision 1: apart {a} {b} (kept in" in printed, (printed, err)
    kept = json.loads(sort_faces.people_path(cache).read_text())
    assert kept["version"] == 2
    assert [sorted(sort_faces.face_rows(data, k)) for k in kept["decisions"][0]["people"]] == \
        [sorted(people[a]), sorted(people[b])]
    after = manifest_of(out)
    assert sorted(faces_of(after, a)) == sorted(people[a])
    assert sorted(faces_of(after, b)) == sorted(people[b])
    assert (a, b) not in offered_merges(sort_faces.people(out, "suggest", quiet=True)[
        "suggestions"])
    loose = owners(sort_faces.cluster(cache, tmp_path / "loose", threshold=looser, quiet=True))
    assert {loose[f] for f in people[a]}.isdisjoint(loose[f] for f in people[b])
    # a later merge of the two wins; undo of it keeps them apart again
    assert said(capsys, "people", out, "merge", a, b)[0] == 0
    assert set(people[a] + people[b]) <= set(faces_of(manifest_of(out), a))
    assert said(capsys, "people", out, "undo")[0] == 0
    assert sorted(faces_of(manifest_of(out), b)) == sorted(people[b])
    code, printed, _err = said(capsys, "people", out, "undo")
    assert code == 0 and f"undid decision 1: apart {a} {b} (kept as" in printed, printed
    loose = owners(sort_faces.cluster(cache, tmp_path / "loose", threshold=looser, quiet=True))
    assert len({loose[f] for f in people[a] + people[b]}) == 1  # undone: free to join


def test_apart_on_a_refine_output(clustered, tmp_path):
    """On a refine output, through the Python API the review page calls: a face
    kept apart from a faceset leaves it, is not offered back, and stays out
    when refine runs again at a looser threshold; facesets kept apart are
    kept; undo restores the output as it was."""
    cache, _raw = clustered
    out = tmp_path / "refined"
    sort_faces.refine(cache, out, quiet=True, **REFINE)
    path = out / "refine_manifest.json"
    sets = lambda: faceset_faces(out)  # noqa: E731
    start = sets()
    first, second = sorted(start)[:2]
    embeddings = sort_faces.load_cache(cache)["embeddings"]
    centroid = sort_faces.unit_rows(embeddings[start[first]].mean(0))
    face = max(start[first], key=lambda f: 1.0 - float(embeddings[f] @ centroid))
    rest = [f for f in start[first] if f != face]
    result = sort_faces.people(out, "apart", faces_named=[str(face)], apart_from=first,
                               quiet=True)
    assert result["decision"]["verb"] == "apart" and "from" in result["decision"]
    assert face not in sets()[first] and set(rest) <= set(sets()[first])
    suggestions = sort_faces.people(out, "suggest", quiet=True)["suggestions"]
    assert (face, first) not in offered_moves(suggestions)
    loose = owners(sort_faces.refine(cache, tmp_path / "loose", quiet=True,
                                     **dict(REFINE, initial_threshold=0.75)), "facesets")
    held = collections.Counter(loose[f] for f in rest if f in loose).most_common(1)[0][0]
    assert loose.get(face) != held
    kept_apart = sets()
    sort_faces.people(out, "apart", people_named=[first, second], quiet=True)
    assert sets() == kept_apart  # apart already: nothing moves
    decisions = sort_faces.load_decisions(sort_faces.people_path(cache))
    assert [sorted(d) for d in decisions[-1:]] == [["id", "people", "time", "verb"]]
    sort_faces.people(out, "undo", quiet=True)
    sort_faces.people(out, "undo", quiet=True)
    assert sets() == start


def test_a_declined_move_suggestion_keeps_the_loose_face_apart(clustered, capsys):
    """Not the same person on a move suggestion: its loose faces are kept apart
    from the person (all of whose faces stay), and it is never offered again,
    whatever the faces' nearest person then is."""
    cache, out = clustered
    suggestions = sort_faces.people(out, "suggest", quiet=True)["suggestions"]
    move = next(s for s in suggestions if s["kind"] == "move")
    (person,), faces = move["people"], move["faces"]
    before = manifest_of(out)
    code, _out, err = said(capsys, "people", out, "apart", *faces, "--from", person)
    assert code == 0, err
    after = manifest_of(out)
    assert faces_of(after, person) == faces_of(before, person)
    assert set(faces) <= {f["face"] for f in after["singletons"]["faces"]}
    decision = sort_faces.load_decisions(sort_faces.people_path(cache))[-1]
    assert len(decision["faces"]) == len(faces)
    assert len(decision["from"]) == len(faces_of(before, person))
    offered = offered_moves(sort_faces.people(out, "suggest", quiet=True)["suggestions"])
    assert not {(face, person) for face in faces} & offered


def test_bad_apart_commands_are_one_line_and_change_nothing(clustered, capsys):
    cache, out = clustered
    path = sort_faces.people_path(cache)
    clusters = manifest_of(out)["clusters"]
    first, second = clusters[0]["name"], clusters[1]["name"]
    in_first, in_second = clusters[0]["faces"][0]["face"], clusters[1]["faces"][0]["face"]
    pair = next(e for e in clusters[:-2] if e["size"] == 2)  # not one merged below
    merged_away = clusters[-1]["name"]
    assert said(capsys, "people", out, "merge", clusters[-2]["name"], merged_away)[0] == 0
    saved, before = path.read_bytes(), tree_fingerprint(out)
    for args, words in [
            ((first,), "two people or more"),
            ((first, first), f"{first} is named twice"),
            ((first, "person_999"), "'person_999' is not a person"),
            ((first, in_second), "give --from PERSON"),  # face ids read as people without it
            ((merged_away, first), f"{merged_away} was merged into"),
            ((in_second, "--from", first), f"face {in_second} is in {second}, not {first}"),
            ((in_first, in_first, "--from", first), "a face is named twice"),
            ((in_first, "--from", "person_999"), "'person_999' is not a person"),
            ((first, "--from", second), "is not a face id"),
            ((*(f["face"] for f in pair["faces"]), "--from", pair["name"]),
             f"those are all the faces of {pair['name']}")]:
        code, _out, err = said(capsys, "people", out, "apart", *args)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (args, err)
        assert path.read_bytes() == saved and tree_fingerprint(out) == before
    with pytest.raises(SystemExit) as stopped:  # argparse's: no face named
        sort_faces.main(["people", str(out), "apart", "--from", first])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "arguments are required" in err
    assert len(err.strip().splitlines()) == 1
    assert path.read_bytes() == saved and tree_fingerprint(out) == before


def test_a_version_1_decisions_file_is_honoured_and_grows_into_version_2(celebs_cache, tmp_path,
                                                                        capsys):
    """The decisions face-sets 0.5.0 wrote on five_celebs (name, merge, move,
    reject, split, undo) hold on a fresh cluster of the same photos; the
    next decision is appended and the file rewritten as version 2, the old
    decisions as they were."""
    cache = tmp_path / "cache" / "c.npz"
    cache.parent.mkdir()
    shutil.copy2(celebs_cache, cache)
    shutil.copy2(V1_DECISIONS, sort_faces.people_path(cache))
    old = json.loads(V1_DECISIONS.read_text())["decisions"]
    data = sort_faces.load_cache(cache)
    rows = lambda keys: sorted(sort_faces.face_rows(data, keys))  # noqa: E731
    out = tmp_path / "raw"
    manifest = sort_faces.cluster(cache, out, quiet=True)
    owner = owners(manifest)
    named = next(e for e in manifest["clusters"] if e.get("label") == old[0]["name"])
    assert set(rows(old[0]["faces"])) <= set(faces_of(manifest, named["name"]))
    assert len({owner[f] for keys in old[1]["people"] for f in rows(keys)}) == 1  # merged
    assert [f["face"] for f in manifest["rejected"]["faces"]] == rows(old[3]["faces"])
    other = next(e["name"] for e in manifest["clusters"] if e["name"] != named["name"])
    assert said(capsys, "people", out, "apart", named["name"], other)[0] == 0
    grown = json.loads(sort_faces.people_path(cache).read_text())
    assert grown["version"] == 2 and grown["decisions"][:len(old)] == old
    assert grown["decisions"][-1]["verb"] == "apart" and len(grown["decisions"]) == len(old) + 1
