"""embed's model stage on Ray (embed --ray ADDRESS; issue 15, part A).

The fast tier checks the flag and its errors without starting Ray; the model
tier starts a local Ray instance and compares its rows with the local pool's
on the shared photos, a video, a damaged file and a copy, and kills an actor
in the middle of a run."""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import psutil
import pytest

import sort_faces
import videos
from conftest import (DATA, ROOT, copy_photos, embed_process, embed_quiet, left_running,
                      run_cli, wait_for_chunks)


# --- fast tier: the flag and its errors, no Ray started -------------------------


@pytest.mark.fast
@pytest.mark.parametrize("address", ["auto", "local", "10.0.0.5:6379", "head.lan:6379",
                                     "ray://head.lan:10001", "[::1]:6379"])
def test_a_ray_address_is_accepted(address):
    assert sort_faces.check_ray_address(address) == address


@pytest.mark.fast
@pytest.mark.parametrize("address", ["", "bogus", "auto;rm -rf /", "head:", ":6379",
                                     "head:123456", "http://head:6379", "local\n", 6379])
def test_a_bad_ray_address_is_one_line_before_anything_is_written(tmp_path, address):
    with pytest.raises(sort_faces.UserError, match="--ray must be auto, local, HOST:PORT"):
        sort_faces.embed(DATA / "group_photos", tmp_path / "c.npz", ray=address)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.fast
def test_without_ray_the_flag_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(sort_faces.UserError, match="requirements-ray.txt"):
        sort_faces.embed(DATA / "group_photos", tmp_path / "c.npz", ray="local")
    assert list(tmp_path.iterdir()) == []
    code = ("import sys; sys.modules['ray'] = None; sys.path.insert(0, sys.argv[1]); "
            "import sort_faces; sys.exit(sort_faces.main(sys.argv[2:]))")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT), "embed",
                           str(DATA / "group_photos"), str(tmp_path / "c.npz"), "--ray", "auto"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "requirements-ray.txt" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.fast
def test_an_address_that_does_not_answer_is_one_line(tmp_path):
    with socket_closed_port() as port:
        started = time.time()
        code, _out, err = run_cli("embed", DATA / "group_photos", tmp_path / "c.npz", "--model",
                                  "buffalo_s", "--ray", f"127.0.0.1:{port}", timeout=120)
    assert code == 2 and time.time() - started < 60
    assert err.strip().count("\n") == 0, err
    assert f"cannot join the Ray cluster at 127.0.0.1:{port}" in err
    assert not (tmp_path / "c.npz").exists()


@pytest.mark.fast
def test_an_address_where_no_ray_cluster_answers_is_one_line(monkeypatch):
    """An HTTP server, or a listener that says nothing, is refused at once
    (Ray itself would retry such an address for many minutes)."""
    import socket

    monkeypatch.setattr(sort_faces, "RAY_CONNECT_S", 1)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]

        def answer_http():
            conn, _ = server.accept()
            conn.recv(100)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.close()

        threading.Thread(target=answer_http, daemon=True).start()
        assert "not a Ray cluster" in sort_faces.grpc_problem(f"127.0.0.1:{port}")
        assert "nothing answered within 1 s" == sort_faces.grpc_problem(f"127.0.0.1:{port}")


@pytest.mark.fast
def test_the_scripts_tasks_reach_the_actors_as_the_modules_records():
    """Run as a script, embed's task records are __main__'s, which Ray would
    copy by value, so that the actors' embed_task would not know a segment
    for a VideoSegment: they are sent as the module sort_faces's records."""
    fields = [(field.name, field.type) for field in dataclasses.fields(sort_faces.VideoSegment)]
    scripts = dataclasses.make_dataclass("VideoSegment", fields, frozen=True)
    scripts.__module__ = "__main__"
    segment = scripts("v.mp4", 10, 20, "ab", 3, ((0.0, 0, 0, 0.0),))
    [shipped] = sort_faces.ray_shipped_tasks([segment])
    assert type(shipped) is sort_faces.VideoSegment
    assert dataclasses.astuple(shipped) == dataclasses.astuple(segment)
    photo = sort_faces.PhotoTask("a.jpg", 10, 20, "cd")
    assert sort_faces.ray_shipped_tasks([photo])[0] is photo  # the module's own: as it is


class socket_closed_port:
    """A local TCP port nothing listens on."""

    def __enter__(self):
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    def __exit__(self, *exc):
        return False


# --- model tier: a local Ray instance against the local pool --------------------


@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory):
    """The shared celebrities and group photos, the shared clip, a damaged
    file and a byte-identical copy (an alias)."""
    src = tmp_path_factory.mktemp("ray") / "src"
    shutil.copytree(DATA / "five_celebs", src / "celebs")
    shutil.copytree(DATA / "group_photos", src / "groups")
    shutil.copy(videos.CLIP, src / "clip.mp4")
    (src / "broken.jpg").write_bytes((DATA / "group_photos" / "couple.jpg").read_bytes()[:200])
    shutil.copy(DATA / "group_photos" / "couple.jpg", src / "copy of couple.jpg")
    # a tight crop, the face filling the frame: found by the second look (issue 26)
    photo = cv2.imread(str(DATA / "lfw10" / "Colin_Powell" / "Colin_Powell_0001.jpg"))
    cv2.imwrite(str(src / "tight crop.jpg"), cv2.resize(photo[70:180, 75:175], (200, 220)))
    return src


@pytest.fixture(scope="module")
def local_cache(mixed_tree, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ray-local") / "local.npz"
    embed_quiet(mixed_tree, cache, workers=2)
    return sort_faces.load_cache(cache)


def rows_by_file(cache):
    """{sha256: (status, reason, faces: [(box, embedding)] in box order)}."""
    faces = {}
    for face, file in enumerate(cache["face_file"]):
        faces.setdefault(int(file), []).append(face)
    rows = {}
    for file, sha in enumerate(cache["sha256"]):
        ids = sorted(faces.get(file, []), key=lambda f: tuple(np.round(cache["bbox"][f], 0)))
        rows[sha] = (cache["file_status"][file], cache["file_reason"][file],
                     [(cache["bbox"][f], cache["embeddings"][f]) for f in ids])
    return rows


def assert_same_rows(got, want):
    """The same files, statuses, reasons and faces; embeddings at cosine >= 0.9999."""
    got_rows, want_rows = rows_by_file(got), rows_by_file(want)
    assert set(got_rows) == set(want_rows)
    assert sorted(zip(got["path_seen"], got["path_sha256"])) == \
        sorted(zip(want["path_seen"], want["path_sha256"]))
    cosines = []
    for sha, (status, reason, faces) in want_rows.items():
        got_status, got_reason, got_faces = got_rows[sha]
        assert (got_status, got_reason) == (status, reason), sha
        assert len(got_faces) == len(faces), sha
        for (box, embedding), (got_box, got_embedding) in zip(faces, got_faces):
            assert np.abs(box - got_box).max() < 1.0
            cosines.append(float(embedding @ got_embedding))
    assert len(cosines) == want.n_faces and min(cosines) >= 0.9999


def ray_actor_processes():
    return [p for p in psutil.process_iter(["cmdline"])
            if "RayModelWorker" in " ".join(p.info["cmdline"] or [])]


def test_ray_gives_the_local_pools_rows_even_with_an_actor_killed_mid_run(
        mixed_tree, local_cache, tmp_path, caplog):
    """A Ray run equals the local pool's, with one of its actors killed once
    work is saved: the actor is replaced and the run ends complete (one run
    checks both: a Ray start is the slow part)."""
    cache = tmp_path / "ray.npz"
    killed = []

    def kill_one_actor_once_work_is_saved():
        journal = sort_faces.journal_dir(cache)
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            actors = ray_actor_processes()
            if actors and len(list(journal.glob("*.npz"))) >= 2:
                os.kill(actors[0].pid, signal.SIGKILL)
                killed.append(actors[0].pid)
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_one_actor_once_work_is_saved, daemon=True)
    watcher.start()
    with caplog.at_level("WARNING", logger="face-sets"):
        summary = embed_quiet(mixed_tree, cache, ray="local", workers=2, flush_every=10)
    watcher.join(timeout=5)
    assert killed, "no actor was running once work was saved"
    assert any("a Ray actor was lost" in record.getMessage() for record in caplog.records)
    got = sort_faces.load_cache(cache)
    assert_same_rows(got, local_cache)
    assert summary["videos"] == 1 and summary["frames"] > 0 and summary["aliases"] == 1
    assert summary["unreadable"] == 1 and summary["crashed"] == 0
    assert (got["file_status"] == "ok").sum() > 100
    tight = [row for row, path in enumerate(got["files"]) if path.endswith("tight crop.jpg")]
    assert (got["face_file"] == tight[0]).sum() == 1
    # nothing is left running: the local instance stops with the run
    assert not ray_actor_processes()


def test_a_file_that_crashes_an_actor_is_retried_once_then_recorded(tmp_path, monkeypatch):
    from crashing_task import embed_or_crash

    src = tmp_path / "src"
    src.mkdir()
    for photo in sorted((DATA / "lfw10").rglob("*.jpg"))[:5]:
        shutil.copy(photo, src / photo.name)
    crasher = sorted(src.iterdir())[2]
    crasher.rename(src / f"CRASH_{crasher.name}")
    monkeypatch.setattr(sort_faces, "embed_task", embed_or_crash)  # shipped to the actors
    cache = tmp_path / "c.npz"
    first = embed_quiet(src, cache, ray="local", workers=2)
    assert first["crashed"] == 1 and first["new"] == 4 and first["unreadable"] == 0
    assert len(sort_faces.load_cache(cache).meta["crash_suspects"]) == 1
    # tried again (by the local pool: the suspects are embed's, not Ray's): crashes again
    second = embed_quiet(src, cache, workers=2)
    assert second["new"] == 1 and second["unreadable"] == 1 and second["crashed"] == 0
    loaded = sort_faces.load_cache(cache)
    row = list(loaded["files"]).index(str(src / f"CRASH_{crasher.name}"))
    assert loaded["file_status"][row] == "unreadable" and "two runs" in loaded["file_reason"][row]


def test_sigterm_in_a_ray_run_saves_the_work_and_leaves_nothing_running(tmp_path):
    """Ray installs its own SIGTERM handler, which would end the run without
    saving: embed keeps its own (a stop saves what is done, exit 130)."""
    src = copy_photos(tmp_path / "src", 50)
    cache = tmp_path / "c.npz"
    command = [sys.executable, str(ROOT / "sort_faces.py"), "embed", str(src), str(cache),
               "--model", "buffalo_s", "--workers", "2", "--flush-every", "5", "--ray", "local"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    journal = sort_faces.journal_dir(cache)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(journal.glob("*.npz"))) < 2:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=120)
    assert process.returncode == sort_faces.EXIT_INTERRUPTED, err
    assert err.strip().splitlines() == ["error: interrupted: the work done so far is saved; run "
                                        "the same command to go on"]
    saved = sort_faces.load_cache(cache)
    assert 10 <= saved.n_files < len(list(src.rglob("*.jpg")))
    assert not (tmp_path / "c.npz.lock").exists()
    assert not ray_actor_processes()
    summary = embed_quiet(src, cache, workers=2)  # the rest, by the local pool
    assert summary["new"] == len(list(src.rglob("*.jpg"))) - saved.n_files


def test_kill_9_of_a_local_ray_run_leaves_nothing_running(tmp_path):
    """kill -9 of the driver alone: the local instance it started (GCS, raylet,
    its agents, the actors) ends within seconds, not a minute later."""
    src = tmp_path / "src"
    shutil.copytree(DATA / "lfw10", src)
    cache = tmp_path / "c.npz"
    process = embed_process(src, cache, 5, "--workers", "1", "--ray", "local")
    wait_for_chunks(cache, 1)
    started = psutil.Process(process.pid).children(recursive=True)
    assert any(p in started for p in ray_actor_processes())
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert left_running(started, within=5) == []
