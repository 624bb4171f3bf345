"""The pipeline as users run it: the recipe scripts, and the README's two
commands on a fresh clone."""

import json
import os
import re
import shutil
import subprocess
import zipfile

import cv2
import numpy as np
import pytest

import sort_faces
from conftest import DATA, ROOT, run_pasted

GATES = {"REFINE_ARGS": "--min-short 40 --min-faces 5 --min-blur 20",
         "EXPORT_ARGS": "--min-face-short 60 --top-n 8", "LINK": "hardlink"}


def run_script(script, *args, env=None, cwd=ROOT):
    environment = dict(os.environ, **(env or {}))
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=environment, timeout=1200)


def assert_hard_links(out, *sources):
    """LINK=hardlink: both outputs say so, and every photo of raw_full/ and
    facesets_full/ is one of the source photos, not a copy (where the two lie
    on one file system; across devices a hard link falls back to a copy)."""
    raw = json.loads((out / "raw_full" / "manifest.json").read_text())
    refined = json.loads((out / "facesets_full" / "refine_manifest.json").read_text())
    assert raw["parameters"]["link"] == refined["parameters"]["link"] == "hardlink"
    folders = [f for pattern in ("raw_full/person_*", "raw_full/_singletons",
                                 "raw_full/_noface", "facesets_full/faceset_*")
               for f in out.glob(pattern)]
    photos = [p for f in folders for p in f.iterdir() if p.suffix.lower() in (".jpg", ".png")]
    assert photos and any(f.parent.name == "facesets_full" for f in folders)
    if all(os.stat(s).st_dev == os.stat(out).st_dev for s in sources):
        originals = {(p.stat().st_dev, p.stat().st_ino) for s in sources for p in s.rglob("*")}
        assert {(p.stat().st_dev, p.stat().st_ino) for p in photos} <= originals


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipe")
    src = tmp / "photos"
    for name in ("five_celebs", "group_photos"):
        shutil.copytree(DATA / name, src / name, ignore=shutil.ignore_patterns("*.csv"))
    name = f"recipe-test-{os.getpid()}"
    first = run_script("pipeline.sh", src, name, env=GATES)
    out = ROOT / "work" / "out" / name
    cache = ROOT / "work" / "cache" / f"{name}.npz"
    yield {"tmp": tmp, "src": src, "name": name, "first": first, "out": out, "cache": cache}
    shutil.rmtree(out, ignore_errors=True)
    for path in cache.parent.glob(f"{name}.*"):
        path.unlink()


def test_pipeline_recipe_produces_every_output(recipe_run):
    result, out = recipe_run["first"], recipe_run["out"]
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("cache:", "duplicates:", "raw_full:", "facesets_full:", "facesets_swap_ready:"):
        assert line in result.stdout
    assert recipe_run["cache"].is_file()
    assert recipe_run["cache"].with_name(f"{recipe_run['name']}.duplicates.json").is_file()
    raw = json.loads((out / "raw_full" / "manifest.json").read_text())
    refined = json.loads((out / "facesets_full" / "refine_manifest.json").read_text())
    export = json.loads((out / "facesets_swap_ready" / "export_manifest.json").read_text())
    assert raw["clusters"] and refined["facesets"] and export["facesets"]
    # every faceset in the export came from the refine manifest, with its members
    members = {s["name"]: {f["face"] for f in s["faces"]} for s in refined["facesets"]}
    for entry in export["facesets"]:
        assert entry["name"] in members
        assert {c["face"] for c in entry["crops"]} <= members[entry["name"]]
        for bundle in entry["bundles"]:
            with zipfile.ZipFile(out / "facesets_swap_ready" / bundle["file"]) as archive:
                names = archive.namelist()
                assert names and all(re.fullmatch(r"\d{4}\.png", n) for n in names)
                for n in names:
                    image = cv2.imdecode(np.frombuffer(archive.read(n), np.uint8), cv2.IMREAD_COLOR)
                    assert image.shape == (512, 512, 3)
    # --candidates (the recipe passes it): singletons of raw_full near a faceset, each in
    # its faceset's candidates folder
    candidates = export["candidates"]
    assert candidates and {e["name"] for e in candidates} <= set(members)
    singles = {f["face"] for f in raw["singletons"]["faces"]}
    for entry in candidates:
        folder = out / "facesets_swap_ready" / sort_faces.candidates_folder(entry["name"],
                                                                             entry.get("label"))
        assert entry["crops"] and {c["face"] for c in entry["crops"]} <= singles
        assert sorted(p.name for p in folder.iterdir()) == [c["png"] for c in entry["crops"]]
    assert export["summary"]["candidates"] == sum(len(e["crops"]) for e in candidates)
    assert_hard_links(out, recipe_run["src"])


def test_pipeline_rerun_is_quick_and_keeps_numbers(recipe_run):
    out = recipe_run["out"]
    before = json.loads((out / "raw_full" / "manifest.json").read_text())
    again = run_script("pipeline.sh", recipe_run["src"], recipe_run["name"], env=GATES)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 new" in again.stdout and "0 faces in 0 images" in again.stdout
    after = json.loads((out / "raw_full" / "manifest.json").read_text())
    assert [(c["name"], c["size"]) for c in after["clusters"]] == \
           [(c["name"], c["size"]) for c in before["clusters"]]


def test_merge_recipe_folds_new_photos_without_renumbering(recipe_run):
    out = recipe_run["out"]
    before = json.loads((out / "raw_full" / "manifest.json").read_text())
    before_sets = json.loads((out / "facesets_full" / "refine_manifest.json").read_text())
    new = recipe_run["tmp"] / "new"
    shutil.copytree(DATA / "lfw10", new / "lfw10", ignore=shutil.ignore_patterns("*.csv"))
    result = run_script("merge.sh", new, recipe_run["name"], env=GATES)
    assert result.returncode == 0, result.stderr[-3000:]
    after = json.loads((out / "raw_full" / "manifest.json").read_text())
    after_sets = json.loads((out / "facesets_full" / "refine_manifest.json").read_text())
    for old, new_manifest, key in ((before, after, "clusters"), (before_sets, after_sets, "facesets")):
        now = {e["name"]: [f["face"] for f in e["faces"]] for e in new_manifest[key]}
        for entry in old[key]:
            faces = [f["face"] for f in entry["faces"]]
            assert now[entry["name"]][: len(faces)] == faces
    highest = max(int(c["name"].split("_")[1]) for c in before["clusters"])
    created = after["extend_runs"][-1]["new_people"]
    assert created and min(int(n.split("_")[1]) for n in created) == highest + 1
    export = json.loads((out / "facesets_swap_ready" / "export_manifest.json").read_text())
    assert {e["name"] for e in export["facesets"]} == {s["name"] for s in after_sets["facesets"]}
    assert_hard_links(out, recipe_run["src"], new)  # extend keeps the outputs' LINK


def test_recipe_refuses_a_missing_folder():
    result = run_script("pipeline.sh", "/no/such/photos")
    assert result.returncode == 2 and "not found" in result.stderr


@pytest.mark.fast
def test_recipe_refuses_an_unknown_link_before_any_step(tmp_path):
    result = run_script("pipeline.sh", tmp_path, env={"LINK": "reflink"})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "error: LINK must be copy, hardlink or symlink, not 'reflink'\n"


@pytest.mark.fast
@pytest.mark.parametrize("env, said", [({"REFINE_ARGS": "--min-faces 0"}, "argument --min-faces:"),
                                       ({"EXPORT_ARGS": "--top-n abc"}, "argument --top-n:"),
                                       ({"REFINE_ARGS": "--min-faces 5 --bogus"},
                                        "unrecognized arguments: --bogus")])
def test_recipe_checks_the_steps_options_before_any_step(tmp_path, env, said):
    """A bad value or an unknown word in REFINE_ARGS or EXPORT_ARGS stops the
    pipeline before embed, with the step's one line and the variable named,
    and nothing is written."""
    name = f"check-args-{os.getpid()}"
    result = run_script("pipeline.sh", tmp_path, name, env=env)
    assert (result.returncode, result.stdout) == (2, "")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and said in lines[0], result.stderr
    assert lines[1] == f"(those are the words of {next(iter(env))})"
    assert not list((ROOT / "work").glob(f"*/{name}*"))


def test_readme_commands_work_on_a_fresh_clone(tmp_path):
    """A newcomer: clone, then the README's first command, with no .venv yet.
    The second, `bash scripts/test.sh`, is what CI runs on a fresh clone
    (.ci/run): checked here only to be the README's second command."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(bash scripts/\S+\.sh.*)$", readme.split("## ")[0], re.MULTILINE)
    assert [c.split()[1] for c in commands] == ["scripts/pipeline.sh", "scripts/test.sh"]
    clone = tmp_path / "face-sets"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    (tmp_path / "shared").symlink_to(ROOT.parent / "shared")
    assert not (clone / ".venv").exists()
    photos = tmp_path / "photos"
    shutil.copytree(DATA / "face_recognition", photos, ignore=shutil.ignore_patterns("*.csv"))
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("FACESETS_LOG_DIR", None)
    first = subprocess.run(["bash", "scripts/pipeline.sh", str(photos)], cwd=clone, env=env,
                           capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (clone / ".venv" / "bin" / "python").exists()
    assert (clone / "work" / "out" / "photos" / "raw_full" / "manifest.json").is_file()
    assert list((clone / "work" / "logs").glob("embed-*.log"))


def test_a_small_library_is_told_why_it_has_no_facesets_and_how_to_get_them(tmp_path):
    """Five people with 8 photos each: the default --min-faces 15 keeps no one, and
    refine, export-swap and the pipeline all say so, with the command that helps.
    The pipeline is run from another folder than the project's: the commands it
    prints run as pasted there."""
    src = tmp_path / "family"
    for person in sorted(p.name for p in (DATA / "five_celebs").iterdir() if p.is_dir()):
        shutil.copytree(DATA / "five_celebs" / person, src / person,
                        ignore=lambda folder, names: sorted(names)[8:])
    name = f"small-test-{os.getpid()}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    try:
        result = run_script("pipeline.sh", src, name, cwd=elsewhere)
        assert result.returncode == 0, result.stderr[-3000:]
        assert not (elsewhere / "work").exists()  # logs and models beside sort_faces.py
        out = ROOT / "work" / "out" / name
        refined = json.loads((out / "facesets_full" / "refine_manifest.json").read_text())
        size = refined["stages"]["size_filter"]
        assert refined["facesets"] == [] and size["dropped_people"] >= 2
        keep = size["suggested_min_faces"]
        assert keep == min(5, size["largest_images"]) and size["kept_at_suggestion"] >= 1
        assert "the size filter (--min-faces 15) dropped" in result.stdout
        assert "nothing to export" in result.stdout
        refine_again = next(line.split(": ", 2)[2] for line in result.stdout.splitlines()
                            if line.startswith("refine: the size filter"))
        assert f"--min-faces {keep}" in refine_again  # refine's own command, as pasted there
        code, _out, err = run_pasted(refine_again, cwd=elsewhere)
        assert code == 0, err
        rerun = (f'REFINE_ARGS="--min-faces {keep}" bash {ROOT}/scripts/pipeline.sh {src} '
                 f'{name}')
        assert rerun in result.stdout
        code, out_text, err = run_pasted(rerun, cwd=elsewhere, timeout=1200)
        again = subprocess.CompletedProcess(rerun, code, out_text, err)
        assert again.returncode == 0, again.stderr[-3000:]
        refined = json.loads((out / "facesets_full" / "refine_manifest.json").read_text())
        export = json.loads((out / "facesets_swap_ready" / "export_manifest.json").read_text())
        assert len(refined["facesets"]) == size["kept_at_suggestion"] and export["facesets"]
        assert "REFINE_ARGS=" not in again.stdout
        # a plain re-run (back to --min-faces 15) does not silently empty the result
        kept = {part: (out / part / manifest).read_bytes() for part, manifest in
                (("facesets_full", "refine_manifest.json"),
                 ("facesets_swap_ready", "export_manifest.json"))}
        plain = run_script("pipeline.sh", src, name)
        assert plain.returncode == 2
        assert f"holds {sort_faces.counted(len(refined['facesets']), 'faceset')}" in plain.stderr
        assert f"--min-faces {keep}" in plain.stderr and "--replace-smaller" in plain.stderr
        assert f"REFINE_ARGS='--min-faces {keep}' bash scripts/pipeline.sh {src} " \
            f"{name}" in plain.stderr  # the pipeline's own command (run from the project here)
        assert "add --replace-smaller to REFINE_ARGS" in plain.stderr
        assert all((out / part / manifest).read_bytes() == before for (part, before), manifest in
                   zip(kept.items(), ("refine_manifest.json", "export_manifest.json")))
    finally:
        shutil.rmtree(ROOT / "work" / "out" / name, ignore_errors=True)
        for path in (ROOT / "work" / "cache").glob(f"{name}.*"):
            path.unlink()
