"""A run that dies, crashes or is stopped loses nothing and misplaces nothing:
a journal chunk damaged, missing or out of order never puts a face on a wrong
photo, a reader never sees a half-folded cache, a model pool that cannot start
records nothing, a file that crashes a worker is retried once and then
recorded, SIGTERM and SIGHUP save and stop the workers, the pool starts no more
workers than it has tasks, and the lock never signals a process. (Each test
reproduces one way earlier code lost data, issue 17.)"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import sort_faces
from conftest import (DATA, ROOT, copy_photos, embed_quiet, left_running, one_line_error, run_cli,
                      wait_for_chunks)


def face_places(cache) -> set:
    """Each face as (its photo's path, its box rounded): what must never shift."""
    return {(str(cache["files"][f]), tuple(np.round(cache["bbox"][f]).astype(int).tolist()))
            for f in range(cache.n_faces)}


# ---------------------------------------------------------------------------
# The journal never shifts rows; readers never see a half fold.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def journal_run(tmp_path_factory):
    """16 photos embedded in chunks of 4 whose journal was never folded (as a run
    killed after its last flush leaves it), and a clean run for reference."""
    tmp = tmp_path_factory.mktemp("journal")
    src = copy_photos(tmp / "src", 16, sets=("lfw10", "five_celebs"))
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
    # private, as the seam: the one read between two chunks, where a writer's fold can land
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


# ---------------------------------------------------------------------------
# A pool that cannot run is a run error; a file that crashes is retried once;
# no more workers than tasks.
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
    src = copy_photos(tmp_path / "src", 6)
    cache = tmp_path / "c.npz"
    code, _out, err = run_cli("embed", src, cache, "--model", broken_pack(tmp_path, pack_dir),
                              "--workers", "2")
    one_line_error(code, err, "could not load the model")
    assert not cache.exists() or sort_faces.load_cache(cache).n_files == 0
    summary = embed_quiet(src, cache)  # a good model: every file embedded, none unreadable
    assert summary["new"] == 6 and summary["unreadable"] == 0


def test_a_file_that_crashes_a_worker_is_retried_once_then_recorded(tmp_path, monkeypatch):
    from crashing_task import embed_or_crash

    src = copy_photos(tmp_path / "src", 5)
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


def test_the_pool_never_starts_more_workers_than_tasks(tmp_path, pack_dir, caplog):
    from crashing_task import worker_pid

    pids = []
    identity = sort_faces.model_identity("buffalo_s", pack_dir, 640)
    tasks = [sort_faces.PhotoTask(str(p), 0, 0, "")
             for p in sorted((DATA / "lfw10").rglob("*.jpg"))[:8]]
    step = sort_faces.ModelStep(worker_pid, pack_dir, ["detection"], identity,
                                on_result=lambda batch, result: pids.extend(result),
                                crash_result=lambda reason: None)
    sort_faces.run_model_step(step, sort_faces.in_batches(tasks, 4),
                              providers=["CPUExecutionProvider"], workers=40, n_tasks=2)
    assert len(pids) == 8 and len(set(pids)) <= 2
    caplog.set_level("WARNING", logger="face-sets")
    sort_faces.worker_setup("CPUExecutionProvider", 64)
    assert any("more than the" in r.getMessage() for r in caplog.records)


def test_workers_take_the_runs_environment_as_each_step_starts(pack_dir, monkeypatch):
    """The workers of a step are forked from a fork server that started with
    the run's first pool; each step's workers still see the run's environment
    as it is when that step starts, as spawned workers did."""
    from crashing_task import worker_environment

    seen = []
    step = sort_faces.ModelStep(worker_environment, pack_dir, ["detection"],
                                sort_faces.model_identity("buffalo_s", pack_dir, 640),
                                on_result=lambda batch, result: seen.extend(result),
                                crash_result=lambda reason: None)
    for value in ("first", "second"):
        monkeypatch.setenv("FACESETS_TEST_PROBE", value)
        sort_faces.run_model_step(step, [[sort_faces.PhotoTask("a.jpg", 0, 0, "")]],
                                  providers=["CPUExecutionProvider"], workers=1)
    monkeypatch.delenv("FACESETS_TEST_PROBE")
    sort_faces.run_model_step(step, [[sort_faces.PhotoTask("a.jpg", 0, 0, "")]],
                              providers=["CPUExecutionProvider"], workers=1)
    assert seen == ["first", "second", None]


# ---------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_save_stop_the_pool_and_exit_130(tmp_path, signum):
    src = copy_photos(tmp_path / "src", 40, sets=("lfw10", "five_celebs"))
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
    assert embed_quiet(src, cache)["new"] == 40 - saved.n_files


def fork_server_of(run: psutil.Process, within: float = 60) -> psutil.Process:
    """The fork server `run` starts with its first pool (its child whose
    command is multiprocessing's forkserver), once it is there."""
    deadline = time.time() + within
    while time.time() < deadline:
        for child in run.children():
            with contextlib.suppress(psutil.Error):
                if "forkserver" in " ".join(child.cmdline()):
                    return child
        time.sleep(0.02)
    raise AssertionError("the run started no fork server")


@pytest.mark.parametrize("signum,to,when", [
    (signal.SIGINT, "group", "importing"),   # Ctrl-C while the fork server imports
    (signal.SIGHUP, "group", "running"),     # the terminal closed, mid-run
    (signal.SIGTERM, "run", "forking")])     # `kill PID` while a worker is being forked
def test_a_stop_signal_at_the_pools_start_or_to_the_group_is_one_line(tmp_path, signum, to,
                                                                      when):
    """A stop signal to the run (or, as a terminal sends it, to its whole
    process group, multiprocessing's own processes included) while the fork
    server imports, while a worker is being forked, or mid-run: exit 130 with
    one line, no traceback from any process, nothing left running, and the
    next run finishes the work."""
    src = copy_photos(tmp_path / "src", 12, sets=("lfw10",))
    cache = tmp_path / "c.npz"
    # (Ctrl-C at its default, as in a terminal: a suite run in the background by a
    # shell without job control has it ignored, and so would the run)
    process = subprocess.Popen([sys.executable, str(ROOT / "sort_faces.py"), "embed", str(src),
                                str(cache), "--model", "buffalo_s", "--flush-every", "2",
                                "--workers", "2"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run = psutil.Process(process.pid)
    server = fork_server_of(run)
    if when == "forking":
        deadline = time.time() + 60
        while time.time() < deadline and not server.children():
            time.sleep(0.005)
    elif when == "running":
        wait_for_chunks(cache, 1)
    started = run.children(recursive=True)
    if to == "group":
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == sort_faces.EXIT_INTERRUPTED, err
    assert "Traceback" not in err and "Error" not in err.replace("error: interrupted", ""), err
    assert left_running(started, within=5) == []
    embed_quiet(src, cache)
    assert sort_faces.load_cache(cache).n_files == 12


# ---------------------------------------------------------------------------
# The lock is portable
# ---------------------------------------------------------------------------


@pytest.mark.fast
def test_one_folder_named_two_ways_is_one_lock(tmp_path):
    """An output (or cache) named through a link, or by another path, takes
    the lock of the folder it names: a second run is refused, as by name."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "link").symlink_to(out)
    with sort_faces.output_lock(out):
        for other in (tmp_path / "link", tmp_path / "." / "link" / ".." / "out"):
            with pytest.raises(sort_faces.UserError, match="in use by another run"):
                with sort_faces.output_lock(other):
                    pass


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
        lock.write_text(f"{socket.gethostname()} {holder.pid} {started:.3f}")
        with pytest.raises(sort_faces.UserError, match="in use by another run"):
            with sort_faces.exclusive_lock(target, "cache"):
                pass
        # the same pid with another start time is a later process: the lock is stale
        lock.write_text(f"{socket.gethostname()} {holder.pid} {started - 100:.3f}")
        with sort_faces.exclusive_lock(target, "cache"):
            assert str(holder.pid) not in lock.read_text()
    finally:
        holder.kill()
        holder.wait()
