"""extend: new photos fold into an existing result without renumbering."""

import json
import shutil
from collections import Counter

import pytest

import sort_faces
from conftest import DATA, embed_quiet, identity_of, tree_fingerprint

NEW_ONLY = "five_celebs/madonna"  # appears only in the second half
REFINE = {"min_short": 40, "min_faces": 4, "min_blur": 20.0}


def split_sources(tmp_path):
    """First half: half of each five_celebs person (none of NEW_ONLY) plus lfw10.
    Second half: the rest of five_celebs."""
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(DATA / "lfw10", first / "lfw10", ignore=shutil.ignore_patterns("*.csv"))
    for person in sorted((DATA / "five_celebs").iterdir()):
        if not person.is_dir():
            continue
        photos = sorted(person.iterdir())
        cut = 0 if f"five_celebs/{person.name}" == NEW_ONLY else len(photos) // 2
        for index, photo in enumerate(photos):
            target = (first if index < cut else second) / "five_celebs" / person.name
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(photo, target / photo.name)
    return first, second


def identity(cache, face):
    return identity_of(cache["files"][cache["face_file"][face]])


def members(entries):
    return {e["name"]: [f["face"] for f in e["faces"]] for e in entries}


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extend")
    first, second = split_sources(tmp)
    cache = tmp / "cache.npz"
    embed_quiet(first, cache)
    raw, refined = tmp / "out" / "raw", tmp / "out" / "refined"
    before_raw = sort_faces.cluster(cache, raw, quiet=True)
    before_refined = sort_faces.refine(cache, refined, quiet=True, **REFINE)
    embed_quiet(second, cache)
    result = sort_faces.extend(cache, raw, refined, quiet=True)
    return {"cache": cache, "raw": raw, "refined": refined, "before_raw": before_raw,
            "before_refined": before_refined, "result": result,
            "after_raw": json.loads((raw / "manifest.json").read_text()),
            "after_refined": json.loads((refined / "refine_manifest.json").read_text())}


def test_no_number_changes_and_no_member_moves(extended):
    for before, after, key in ((extended["before_raw"], extended["after_raw"], "clusters"),
                               (extended["before_refined"], extended["after_refined"], "facesets")):
        old, new = members(before[key]), members(after[key])
        for name, faces in old.items():
            assert new[name][: len(faces)] == faces, name  # same members, new ones appended
        for name in old:  # and the files of old members are all still there
            folder = (extended["raw"] if key == "clusters" else extended["refined"]) / name
            entry = next(e for e in before[key] if e["name"] == name)
            assert all((folder / output).exists() for output in entry["outputs"])


def test_new_faces_of_known_people_join_their_person(extended):
    cache = sort_faces.load_cache(extended["cache"])
    before = extended["before_raw"]
    majority = {e["name"]: Counter(identity(cache, f["face"]) for f in e["faces"]).most_common(1)[0][0]
                for e in before["clusters"]}
    joined = extended["result"]["extend_raw"]["joined"]
    known_people = set(majority.values())
    old_faces = sort_faces.manifest_face_ids(before["clusters"] + [before["singletons"]])
    new_known = [f for f in range(cache.n_faces)
                 if f not in old_faces and identity(cache, f) in known_people]
    right = sum(1 for name, faces in joined.items() for f in faces
                if identity(cache, f) == majority[name])
    wrong = sum(1 for name, faces in joined.items() for f in faces
                if identity(cache, f) != majority[name])
    share = right / len(new_known)
    # measured here: 45 of 51 (0.88) new faces of known people joined the right
    # person and none a wrong one; the rest stay unassigned (small, hard faces)
    assert share >= 0.80 and wrong <= 1, (share, wrong)


def test_a_new_person_gets_a_number_after_the_highest(extended):
    cache = sort_faces.load_cache(extended["cache"])
    before, after = extended["before_raw"], extended["after_raw"]
    highest = max(int(e["name"].split("_")[1]) for e in before["clusters"])
    created = extended["result"]["extend_raw"]["new_people"]
    assert created and all(int(n.split("_")[1]) > highest for n in created)
    new_entries = [e for e in after["clusters"] if e["name"] in created]
    made_of = Counter(identity(cache, f["face"]) for e in new_entries for f in e["faces"])
    assert made_of.most_common(1)[0][0] == NEW_ONLY
    for entry in new_entries:
        assert sorted(p.name for p in (extended["raw"] / entry["name"]).iterdir()) == \
               sorted(entry["outputs"])
    # refine: a new faceset for the new person too, after the highest
    refined_new = extended["result"]["extend_refine"]["new_facesets"]
    highest_set = max(int(e["name"].split("_")[1]) for e in extended["before_refined"]["facesets"])
    assert refined_new and all(int(n.split("_")[1]) > highest_set for n in refined_new)
    assert len(after["extend_runs"]) == 1


def test_extend_again_changes_nothing(extended):
    raw_before = tree_fingerprint(extended["raw"])
    refined_before = tree_fingerprint(extended["refined"])
    result = sort_faces.extend(extended["cache"], extended["raw"], extended["refined"], quiet=True)
    assert result == {"extend_raw": None, "extend_refine": None}
    assert tree_fingerprint(extended["raw"]) == raw_before
    assert tree_fingerprint(extended["refined"]) == refined_before


def test_extend_refuses_another_models_cache(extended, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(extended["raw"], raw)
    manifest = json.loads((raw / "manifest.json").read_text())
    manifest["model"]["recognition_sha256"] = "0" * 64
    (raw / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(sort_faces.UserError, match="two models"):
        sort_faces.extend(extended["cache"], raw, quiet=True)
