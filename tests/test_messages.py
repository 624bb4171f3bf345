"""What a run tells the user: every command it prints runs as pasted, counts
are said in number, an empty or small result says why where the user looks
(the terminal, the top of its page), a re-run never replaces a result with a
much smaller one without being told to, and a result records the version that
made it and says what its summary counts (issues 12 and 27)."""

import html
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest

import sort_faces
from conftest import EXPORT, REFINE, ROOT, copy_outputs, last_log, run_cli, run_pasted

REFINED = "refine_manifest.json"


# --- fast tier: the pure pieces -----------------------------------------------------


@pytest.mark.fast
def test_a_printed_command_is_this_interpreter_and_this_file_quoted(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    command = sort_faces.tool_command("people", tmp_path / "a b", "name", "person_001", "Zoë's")
    words = shlex.split(command)
    assert words[0] == os.path.relpath(sys.executable) if sys.executable.startswith(str(ROOT)) \
        else words[0] == sys.executable
    assert words[1] == "sort_faces.py"  # below the folder the run started in: as typed there
    assert words[2:] == ["people", str(tmp_path / "a b"), "name", "person_001", "Zoë's"]
    absolute = shlex.split(sort_faces.tool_command("people", Path("out"), absolute=True))
    assert absolute[1] == str(ROOT / "sort_faces.py") and absolute[3] == str(ROOT / "out")
    monkeypatch.chdir(tmp_path)  # from elsewhere: the file by its absolute path
    assert shlex.split(sort_faces.tool_command())[1] == str(ROOT / "sort_faces.py")
    code, out, err = run_pasted(sort_faces.tool_command("--version"), cwd=tmp_path)
    assert code == 0 and sort_faces.__version__ in out + err


@pytest.mark.fast
def test_a_printed_word_pastes_back_as_itself_whatever_its_characters():
    import subprocess

    words = ["plain", "a b", "it's", "a\nb", "tab\there", "\x1b[31mred", "Zoë", "back\\slash",
             "caf" + b"\xe9".decode("utf-8", "surrogateescape"), "$HOME", "*", ""]
    line = " ".join(sort_faces.shell_word(w) for w in words)
    assert "\n" not in line and all(ch.isprintable() for ch in line)  # one line, as shown
    done = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True)
    assert done.stdout.split(b"\0")[:-1] == [os.fsencode(w) for w in words]


@pytest.mark.fast
def test_counts_are_said_in_number():
    assert sort_faces.counted(1, "no-face image") == "1 no-face image"
    assert sort_faces.counted(3, "no-face image") == "3 no-face images"
    assert sort_faces.counted(1, "person") == "1 person"
    assert sort_faces.counted(22, "person") == "22 people"
    assert sort_faces.counted(0, "faceset") == "0 facesets"


@pytest.mark.fast
def test_the_size_filter_suggests_one_value_and_never_a_chain():
    first = sort_faces.size_filter_summary([8, 8, 7, 3, 1], min_faces=15)
    assert first["suggested_min_faces"] == sort_faces.SMALL_LIBRARY_MIN_FACES
    assert first["kept_at_suggestion"] == 3
    # the re-run at the suggestion drops those under it: nothing lower is offered
    again = sort_faces.size_filter_summary([4, 3, 1], min_faces=first["suggested_min_faces"])
    assert again["suggested_min_faces"] is None
    small = sort_faces.size_filter_summary([3, 2, 1], min_faces=15)
    assert small["suggested_min_faces"] == 3
    assert sort_faces.size_filter_summary([3, 1], min_faces=3)["suggested_min_faces"] is None
    assert sort_faces.size_filter_summary([1, 1], min_faces=15)["suggested_min_faces"] is None


@pytest.mark.fast
def test_changed_options_are_written_as_flags():
    words = sort_faces.option_words({"min_faces": 5, "min_blur": 40.0, "min_short": 60,
                                     "link": "hardlink", "candidates": True},
                                    {**sort_faces.REFINE_DEFAULTS, "link": "copy",
                                     "candidates": False})
    assert words == ["--min-faces", "5", "--min-short", "60", "--link", "hardlink",
                     "--candidates"]


@pytest.mark.fast
def test_an_empty_refine_says_why_naming_the_gates():
    stages = sort_faces.Stages(
        initial_clusters=20, clustering={}, after_merge=18, dropped_quality=116,
        quality_gates={"min_short": 110, "min_blur": 20, "min_det_score": 0, "damaged": 1},
        after_quality=18, dropped_outlier=0, dropped_size=67, facesets=0,
        size_filter=sort_faces.SizeFilter(**sort_faces.size_filter_summary([9, 6, 2], 15)))
    manifest = sort_faces.RefineManifest(
        schema_version=sort_faces.MANIFEST_VERSION, step="refine", created="", cache="/x/c.npz",
        model=None, parameters={**sort_faces.REFINE_DEFAULTS, "link": "copy"}, stages=stages,
        facesets=[], dropped=[], next_number=1,
        summary=sort_faces.RefineSummary(facesets=0, faces=183, faces_kept=0, seconds=0.1))
    lines = sort_faces.refine_shortfalls(manifest, Path("/x/out"))
    quality, size = lines
    assert quality[0].startswith("the quality gate dropped 116 of 183 faces")
    assert "110 faces under --min-short 90" in quality[0] and "1 in damaged photos" in quality[0]
    assert "--min-det-score" not in quality[0]
    assert "dropped 3 people" in size[0] and size[1][:3] == ["refine", Path("/x/c.npz"),
                                                            Path("/x/out")]
    assert size[1][3:] == ["--min-faces", "5"]
    page = sort_faces.render_review_page({"title": "t", "groups": [],
                                          "notice": sort_faces.shortfall_notice(lines)})
    assert page.index('id="notice"') < page.index("<main>") + 200
    assert f"<code>{sort_faces.tool_command(*size[1], absolute=True)}</code>" in page.replace(
        "&#x27;", "'")


# --- on the real photos ---------------------------------------------------------------


def test_empty_refine_and_export_say_why_and_their_commands_run(labeled_export, tmp_path,
                                                                capsys):
    """The defaults on the shared photos (faces of 55-110 px) keep no faceset: the
    terminal and both pages say why, and the printed re-run command works."""
    cache = labeled_export["cache"]
    out = tmp_path / "refined"
    manifest = sort_faces.refine(cache, out)
    said = capsys.readouterr().out
    assert manifest["facesets"] == [] or manifest["stages"]["size_filter"]["dropped_people"]
    assert "the quality gate dropped" in said and "under --min-short 90" in said
    assert "cluster counts them" in said  # the same people as cluster's
    page = (out / "index.html").read_text()
    assert 'id="notice"' in page and "the quality gate dropped" in page
    assert "<figcaption>face short edge" in page  # the reason, not only on hover
    reruns = [line.split(" re-run: ", 1)[1] for line in said.splitlines()
              if " re-run: " in line]
    assert len(reruns) == 1, said
    size = manifest["stages"]["size_filter"]
    on_page = sort_faces.tool_command("refine", Path(manifest["cache"]), out, "--min-faces",
                                      size["suggested_min_faces"], absolute=True)
    assert f"<code>{html.escape(on_page)}</code>" in page  # runs from anywhere
    code, stdout, err = run_pasted(reruns[0])
    assert code == 0, err
    again = json.loads((out / REFINED).read_text())
    assert len(again["facesets"]) >= size["kept_at_suggestion"] > 0
    assert again["stages"]["size_filter"]["suggested_min_faces"] is None  # no chain
    # an export of a refine output without facesets says why, with both commands
    empty = tmp_path / "empty"
    sort_faces.refine(cache, empty, min_faces=10**6)
    capsys.readouterr()
    sort_faces.export_swap(cache, empty / REFINED, tmp_path / "swap", **EXPORT)
    said = capsys.readouterr().out
    assert "nothing to export" in said and "in refine, the size filter" in said
    export_page = (tmp_path / "swap" / "index.html").read_text()
    assert 'id="notice"' in export_page and "nothing to export" in export_page
    assert "then export again" in export_page


def test_a_rerun_never_silently_replaces_a_result_with_a_much_smaller_one(labeled_export,
                                                                         tmp_path, capsys):
    cache = labeled_export["cache"]
    out = tmp_path / "refined"
    made = sort_faces.refine(cache, out, quiet=True, **REFINE)
    assert len(made["facesets"]) >= 2
    before = (out / REFINED).read_bytes()
    with pytest.raises(sort_faces.UserError) as refused:
        sort_faces.refine(cache, out, quiet=True)  # the defaults: no faceset
    message = str(refused.value)
    assert f"holds {len(made['facesets'])} facesets" in message and "would leave 0" in message
    assert "--min-faces 5" in message and "--min-short 40" in message
    assert "--replace-smaller" in message
    assert (out / REFINED).read_bytes() == before  # nothing replaced
    # the command line: one line, exit 2, the output kept
    code, _out, err = run_pasted(sort_faces.tool_command("refine", cache, out))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--replace-smaller" in err
    assert (out / REFINED).read_bytes() == before
    # export-swap too: an export of facesets is not replaced by an empty one
    swap = tmp_path / "swap"
    shutil.copytree(labeled_export["tmp"] / "plain", swap, symlinks=True)
    empty = tmp_path / "empty"
    sort_faces.refine(cache, empty, quiet=True, min_faces=10**6)
    with pytest.raises(sort_faces.UserError, match="--replace-smaller"):
        sort_faces.export_swap(cache, empty / REFINED, swap, quiet=True, **EXPORT)
    assert json.loads((swap / "export_manifest.json").read_text())["facesets"]
    # told to, both replace
    assert sort_faces.refine(cache, out, quiet=True, replace_smaller=True)["facesets"] == []
    replaced = sort_faces.export_swap(cache, empty / REFINED, swap, quiet=True,
                                      replace_smaller=True, **EXPORT)
    assert replaced["facesets"] == []


def test_versions_are_recorded_and_summaries_say_what_they_count(small_run, tmp_path):
    cache = copy_outputs(small_run, tmp_path)
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
    log = last_log("cluster")
    assert " INFO cluster: " in log  # the summary is in the log at INFO, not DEBUG


@pytest.mark.fast
def test_usage_errors_and_wrong_folders_say_so_in_one_runnable_line(tmp_path):
    """A usage error's hint is a command that runs as pasted (this interpreter,
    this file); a cache given as a folder (a trailing /) is refused before
    anything is written; an export output given to `people` is named as one;
    extend given a refine output as RAW_OUT says what extend takes."""
    code, _out, err = run_cli("export-swap", "--bogus")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    hint = err.strip().rsplit("(see ", 1)[1].rstrip(")")
    assert hint.endswith("export-swap --help")
    code, out, _err = run_pasted(hint)
    assert code == 0 and "usage:" in out
    code, _out, err = run_cli("cluster", "c.npz", "out", "--bogus")  # after the subcommand's words
    assert code == 2 and "unrecognized arguments: --bogus" in err
    assert err.strip().endswith("sort_faces.py cluster --help)")
    code, _out, err = run_cli("people", "out", "undo", "now")  # after a verb: the verb's help
    hint = err.strip().rsplit("(see ", 1)[1].rstrip(")")
    assert code == 2 and hint.endswith("people OUT undo --help")
    code, out, _err = run_pasted(hint)
    assert code == 0 and "usage:" in out and "undo" in out
    (tmp_path / "photos").mkdir()
    code, _out, err = run_cli("embed", tmp_path / "photos", f"{tmp_path / 'cache'}/")
    assert code == 2 and "ends in /, as a folder does" in err and "library.npz" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]
    export = tmp_path / "swap"
    export.mkdir()
    sort_faces.write_marker(export, "export-swap")
    code, _out, err = run_cli("people", export)
    assert code == 2 and "not a cluster or refine output (a face-sets export-swap output)" in err
    refined = tmp_path / "refined"
    refined.mkdir()
    sort_faces.write_marker(refined, "refine")
    with pytest.raises(sort_faces.UserError, match="is a face-sets refine output; extend takes "
                       "a cluster output as RAW_OUT"):
        sort_faces.claim_output(refined, "cluster", "extend takes a cluster output as RAW_OUT "
                                "and a refine one as --refine-out")


@pytest.mark.fast
def test_a_faceset_without_a_crop_names_the_gate_that_took_its_faces():
    """export-swap's line for a faceset with no crop counts its faces by the
    gate that took them (it blamed refine when --min-face-short had)."""
    assert sort_faces.export_gate("face short edge 67 px < 100") == "under --min-face-short"
    assert sort_faces.export_gate("distance 0.61 from the faceset centroid > 0.45") == \
        "past --outlier-threshold"
    assert sort_faces.export_gate("near-duplicate photo of /p/a.jpg") == \
        "a near-duplicate of a better photo"
    reason = "the photo has moved, changed or vanished since embed"
    assert sort_faces.export_gate(reason) == reason
