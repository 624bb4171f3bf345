"""Manifests are typed records read by one loader: every field the code reads
is checked (removed, or of the wrong type: one line naming it), the fields
later versions added take their defaults, and the manifests earlier versions
wrote (schema 1, tests/data/manifests_v1: a real cluster, refine and export
output, people named, merged and extended, made by face-sets 0.5.0) read as
they are."""

import copy
import json
import re

import pytest

import sort_faces
from conftest import ROOT

pytestmark = pytest.mark.fast

V1 = ROOT / "tests" / "data" / "manifests_v1"
KINDS = {"cluster": "manifest.json", "refine": "refine_manifest.json",
         "export-swap": "export_manifest.json"}
N_FACES, EMBEDDING_SIZE = 38, 512  # of the cache they were made from
# Parts the code keeps as they are (it reads none of their fields, or reads them
# as option values): checked to be objects, not walked into.
OPAQUE = {"model", "parameters", "clustering", "stages.clustering", "extend_runs[0]",
          "stages.quality_gates", "quality_weights", "terms"}
# What the loader requires of each kind's parameters (the options the code reads).
PARAMETERS = {"cluster": ["threshold", "link"], "refine": list(sort_faces.REFINE_DEFAULTS),
              "export-swap": ["out_size", "top_n"]}
# Fields later versions added: a manifest without them reads, with their default.
OPTIONAL = {"face_sets_version", "former", "next_number", "rejected", "extend_runs", "label",
            "faceset", "stages.quality_gates", "stages.initial_single_faces",
            "stages.dropped_rejected", "stages.size_filter", "summary.singleton_files"}


def v1(kind: str) -> dict:
    return json.loads((V1 / KINDS[kind]).read_text("utf-8"))


def fields(value, path: str = ""):
    """The path of every field under `value` (the first item of each list), in
    the loader's notation: clusters[0].faces[0].bbox."""
    items = value.items() if isinstance(value, dict) else \
        [("[0]", value[0])] if isinstance(value, list) and value else []
    for key, item in items:
        here = path + key if key == "[0]" else f"{path}.{key}" if path else key
        if isinstance(value, dict):
            yield here
        if here not in OPAQUE and here.rsplit(".", 1)[-1] not in OPAQUE:
            yield from fields(item, here)


def locate(data, path: str):
    """(the object holding the field at `path`, its key)."""
    steps = [int(s[1:-1]) if s.startswith("[") else s for s in re.findall(r"\[\d+\]|[^.\[]+", path)]
    for step in steps[:-1]:
        data = data[step]
    return data, steps[-1]


def wrong(value):
    """A value of another type than `value`."""
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, (int, float)):
        return "7"
    if isinstance(value, str):
        return 7
    if isinstance(value, list):
        return {"a": 1}
    if isinstance(value, dict):
        return [1]
    return "seven"  # None: where a name or a number goes


def cases():
    for kind in KINDS:
        data = v1(kind)
        paths = list(fields(data)) + [f"parameters.{name}" for name in PARAMETERS[kind]]
        for path in paths:
            yield kind, path


def parse(kind: str, data) -> sort_faces.Manifest:
    return sort_faces.parse_manifest(data, kind, V1 / KINDS[kind], N_FACES, EMBEDDING_SIZE)


def refused(kind: str, data) -> str:
    with pytest.raises(sort_faces.UserError) as caught:
        parse(kind, data)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"manifest {V1 / KINDS[kind]}: "), message
    return message


def optional(path: str) -> bool:
    return re.sub(r"^[a-z_]+\[0\]\.", "", path) in OPTIONAL or path in OPTIONAL


@pytest.mark.parametrize("kind, path", list(cases()))
def test_each_field_removed_or_of_the_wrong_type_is_one_line_naming_it(kind, path):
    data = v1(kind)
    holder, key = locate(data, path)
    changed = copy.deepcopy(data)
    place, field = locate(changed, path)
    place[field] = wrong(holder[key])
    assert f"{path}: " in refused(kind, changed)
    if isinstance(key, int):
        return
    changed = copy.deepcopy(data)
    place, field = locate(changed, path)
    del place[field]
    if optional(path):
        parse(kind, changed)  # a field later versions added: its default
    else:
        parent = path.rsplit(".", 1)[0] if "." in path else "the manifest"
        assert f"{parent}: has no {key!r}" in refused(kind, changed)


@pytest.mark.parametrize("kind", KINDS)
def test_a_version_1_manifest_reads_as_it_is_and_is_written_as_version_2(kind, tmp_path):
    data = v1(kind)
    assert data["schema_version"] == 1
    manifest = sort_faces.load_manifest(V1 / KINDS[kind], kind, N_FACES, EMBEDDING_SIZE)
    assert isinstance(manifest, {"cluster": sort_faces.ClusterManifest,
                                 "refine": sort_faces.RefineManifest,
                                 "export-swap": sort_faces.ExportManifest}[kind])
    assert manifest.schema_version == 1 and manifest.cache == data["cache"]
    written = json.loads(sort_faces.write_manifest(tmp_path, manifest).read_text("utf-8"))
    assert written["schema_version"] == sort_faces.MANIFEST_VERSION == 2
    # as it was, but for the schema and a dropped face's faceset, now always there
    for drop in data.get("dropped", []):
        drop.setdefault("faceset", None)
    assert written == dict(data, schema_version=2)
    assert list(written) == list(data)  # the fields in the order they were written
    assert sort_faces.load_manifest(tmp_path / KINDS[kind], kind).to_json() == written


def test_records_give_what_the_steps_read():
    raw, refined = parse("cluster", v1("cluster")), parse("refine", v1("refine"))
    exported = parse("export-swap", v1("export-swap"))
    assert raw.entries is raw.clusters and refined.entries is refined.facesets
    person = raw.clusters[0]
    assert person.size == len(person.faces) and person.face_ids() == [f.face for f in person.faces]
    assert raw.former and raw.next_number > max(int(e.name[-3:]) for e in raw.clusters)
    assert raw.extend_runs and raw.summary.faces == N_FACES
    named = next(e for e in refined.facesets if e.label)
    assert named.folder == f"{named.name}_{named.label}" and named.title == f"{named.name} " \
        f"{named.label}" and len(named.centroid) == EMBEDDING_SIZE
    assert {d.stage for d in refined.dropped} <= set(sort_faces.REFINE_DROP_STAGES)
    assert refined.stages.size_filter.min_faces == refined.parameters["min_faces"]
    faceset = exported.facesets[0]
    assert faceset.bundles and all(b.file.startswith(faceset.folder) for b in faceset.bundles)
    assert [c.rank for c in faceset.crops] == list(range(len(faceset.crops)))
    assert exported.candidates and exported.candidates[0].bundles is None


def test_a_manifest_without_the_fields_later_versions_added_takes_their_defaults():
    data = v1("refine")
    for key in ("face_sets_version", "former", "next_number", "extend_runs"):
        del data[key]
    for drop in data["dropped"]:
        drop.pop("faceset", None)
    for stage in ("quality_gates", "initial_single_faces", "dropped_rejected", "size_filter"):
        del data["stages"][stage]
    manifest = parse("refine", data)
    assert manifest.former == [] and manifest.extend_runs == []
    assert manifest.next_number == max(int(e.name[-3:]) for e in manifest.facesets) + 1
    assert manifest.stages.size_filter is None and manifest.stages.quality_gates is None
    assert sort_faces.refine_shortfalls(manifest, V1) is not None  # what a page reads of it
    assert "former" not in data and manifest.to_json()["former"] == []


@pytest.mark.parametrize("kind, change, words", [
    ("cluster", lambda m: m["clusters"][0].update(name="person_1"), "clusters[0].name"),
    ("cluster", lambda m: m["clusters"][0]["faces"].clear(), "a person without faces"),
    ("cluster", lambda m: m["clusters"][0]["faces"][0].update(face=N_FACES), "out of range"),
    ("cluster", lambda m: m["clusters"][1]["faces"].append(m["clusters"][0]["faces"][0]),
     "listed twice"),
    ("cluster", lambda m: m.update(next_number=1), "next_number: 1 is out of range"),
    ("refine", lambda m: m["facesets"][0].update(centroid=[0.1] * 3), "has 3 numbers, not 512"),
    ("refine", lambda m: m["dropped"][0].update(stage="gone"), "dropped[0].stage"),
    ("refine", lambda m: m["facesets"][0].update(label="person_007"), "would read as"),
    ("export-swap", lambda m: m["facesets"][0]["bundles"][0].update(file="faceset_999_all.fsz"),
     "is not a bundle of"),
    ("export-swap", lambda m: m["facesets"][0]["crops"][0].update(png="../x.png"),
     "facesets[0].crops[0].png: '../x.png' is not a plain file name"),
    ("export-swap", lambda m: m["facesets"][0]["crops"][0].update(score=float("inf")),
     "facesets[0].crops[0].score: is not a finite number"),
])
def test_what_is_not_of_the_tools_own_form_is_refused(kind, change, words):
    data = v1(kind)
    change(data)
    assert words in refused(kind, data)
