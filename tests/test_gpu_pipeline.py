"""The GPU's shape of a model step (decode workers feeding a model server:
ModelServerPool), run on the CPU with FACESETS_PIPELINE=server: its rows are
the CPU pool's, through a killed decode worker and a killed model server; a
killed run leaves none of its processes. The pure pieces: how waiting calls
are batched, what a run says it runs on, and onnxruntime's reason when CUDA
falls back to the CPU (its real lines, as onnxruntime-gpu writes them on a
machine without a GPU: the real fallback runs in .ci/run's GPU build check)."""

import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import sort_faces
from conftest import DATA, copy_photos, embed_process, left_running
from same_faces import cache_faces, compare, summary_line

CPU = ["CPUExecutionProvider"]


# ---------------------------------------------------------------------------
# The pure pieces
# ---------------------------------------------------------------------------


def crops(count: int) -> list:
    return [np.zeros((112, 112, 3), np.uint8)] * count


@pytest.mark.fast
def test_the_recognizers_waiting_calls_run_together_within_the_limit():
    calls = [("recognition", "get_feat", (crops(3),)), ("detection", "forward", (None, 0.5)),
             ("recognition", "get_feat", (crops(4),)), ("recognition", "get_feat", (crops(2),)),
             ("landmark_2d_106", "run", (["out"], {})), ("recognition", "get_feat", (crops(9),))]
    assert sort_faces.call_groups(calls, limit=8) == [[1], [0, 2], [4], [3], [5]]
    assert sort_faces.call_groups(calls, limit=100) == [[1], [4], [0, 2, 3, 5]]
    # a call bigger than the limit runs alone; nothing batches what is not listed
    assert sort_faces.call_groups(calls[5:], limit=4) == [[0]]
    assert sort_faces.call_groups(calls, batched=()) == [[i] for i in range(6)]
    rows = np.arange(10)[:, None]
    assert [part[:, 0].tolist() for part in sort_faces.split_rows(rows, [3, 0, 7])] == \
        [[0, 1, 2], [], [3, 4, 5, 6, 7, 8, 9]]


@pytest.mark.fast
def test_a_models_plain_settings_travel_without_its_session():
    class Session:
        pass

    settings = sort_faces.plain_settings({
        "det_thresh": 0.5, "input_size": (640, 640), "input_sizes": [(640, 640)],
        "input_dtype": np.float32, "mean_lmk": np.zeros((68, 3)), "use_kps": True,
        "taskname": "detection", "center_cache": {(80, 80, 8): np.zeros((2, 2))},
        "session": Session(), "_lock": Session(), "factory": len, "model_file": None})
    assert set(settings) == {"det_thresh", "input_size", "input_sizes", "input_dtype", "mean_lmk",
                             "use_kps", "taskname", "center_cache", "model_file"}


@pytest.mark.fast
@pytest.mark.parametrize("setting, providers, shape", [
    (None, ["CUDAExecutionProvider", "CPUExecutionProvider"], "server"),
    ("auto", CPU, "pool"), ("server", CPU, "server"), (" Pool ", ["CUDAExecutionProvider"], "pool")])
def test_the_pipeline_shape_is_the_server_on_cuda_unless_set(setting, providers, shape):
    assert sort_faces.pipeline_shape(setting, providers) == shape


@pytest.mark.fast
def test_a_wrong_pipeline_setting_is_one_line_before_any_work(tmp_path):
    from conftest import one_line_error, run_cli

    code, _out, err = run_cli("embed", DATA / "lfw10", tmp_path / "c.npz", "--model", "buffalo_s",
                              env=dict(os.environ, FACESETS_PIPELINE="gpu"))
    one_line_error(code, err, "FACESETS_PIPELINE='gpu'", "auto, server, pool")
    assert not (tmp_path / "c.npz").exists()


@pytest.mark.fast
def test_the_model_line_names_the_provider_and_the_processes():
    line = sort_faces.model_line(["CUDAExecutionProvider", "CPUExecutionProvider"], "server", 16, 2)
    assert line == "model: CUDAExecutionProvider in 2 model processes (one a GPU), fed by " \
                   "16 decode workers"
    assert sort_faces.model_line(CPU, "server", 1, 1) == \
        "model: CPUExecutionProvider in 1 model process, fed by 1 decode worker"
    assert sort_faces.model_line(CPU, "pool", 2, 1) == \
        "model: CPUExecutionProvider in 2 workers (each decodes and runs the model)"


# What onnxruntime-gpu 1.31.1 writes to standard error while FaceAnalysis makes its
# sessions with CUDA first on a machine without a GPU (this one): installed as
# requirements-gpu.txt has it (CUDA's libraries there, the driver's libcuda not), and
# without the CUDA extras (preload_dlls' lines first). One session's line of each:
# the other sessions repeat it.
ORT_LINE = ("\x1b[1;31m2026-12-07 12:00:20.545731748 [E:onnxruntime:Default, "
            "provider_bridge_ort.cc:2458 operator()] /onnxruntime_src/onnxruntime/core/session/"
            "provider_bridge_ort.cc:2043 onnxruntime::Provider& onnxruntime::ProviderLibrary::"
            "Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library /tmp/gpuvenv/lib/"
            "python3.11/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so with "
            "error: {missing}: cannot open shared object file: No such file or directory\n"
            "\x1b[m\n")
ORT_NO_GPU = ORT_LINE.format(missing="libcuda.so.1") * 2
ORT_NO_CUDA_LIBRARIES = (
    "Failed to load libcublasLt.so.13: libcublasLt.so.13: cannot open shared object file: No "
    "such file or directory\nFailed to load libcurand.so.10: libcurand.so.10: cannot open "
    "shared object file: No such file or directory\nPlease follow https://onnxruntime.ai/docs/"
    "install/#cuda-and-cudnn to install CUDA.\n" + ORT_LINE.format(missing="libcublasLt.so.13"))
REASON = ("Failed to load library libonnxruntime_providers_cuda.so with error: {missing}: cannot "
          "open shared object file: No such file or directory")


@pytest.mark.fast
@pytest.mark.parametrize("log, reason", [
    (ORT_NO_GPU, REASON.format(missing="libcuda.so.1")),
    (ORT_NO_CUDA_LIBRARIES, REASON.format(missing="libcublasLt.so.13"))])
def test_onnxruntimes_reason_for_falling_back_is_one_line(log, reason):
    found, rest = sort_faces.ort_provider_log("an unrelated line\n" + log)
    assert found == reason and rest == "an unrelated line"
    line = sort_faces.fallback_line(["CUDAExecutionProvider", "CPUExecutionProvider"], CPU, found)
    assert line == f"CUDA was asked for, but the model runs on CPUExecutionProvider: {reason}"
    assert "\n" not in line


@pytest.mark.fast
def test_no_fallback_line_unless_cuda_was_asked_for_and_not_used():
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert sort_faces.fallback_line(CPU, CPU, "") == ""
    assert sort_faces.fallback_line(cuda, cuda, "") == ""
    assert sort_faces.fallback_line(cuda, CPU, "").endswith("onnxruntime gave no reason "
                                                            "(no GPU, or no NVIDIA driver?)")
    assert sort_faces.ort_provider_log("just a line\n") == ("", "just a line")


# ---------------------------------------------------------------------------
# The server's shape on the CPU
# ---------------------------------------------------------------------------


class Answers:
    """A decode worker's end of its connection, as the model server sees it:
    what the server sends it."""

    def __init__(self):
        self.sent = []

    def send(self, answer):
        self.sent.append(answer)


def test_waiting_recognizer_calls_run_as_one_batch_and_each_gets_its_own_rows(pack_dir):
    """ModelServer.run_group on the real recognizer: three workers' calls in
    one session.run give each the rows of its crops alone; a call that fails
    fails alone (the batch is run again call by call)."""
    import cv2

    app = sort_faces.load_face_analysis(str(pack_dir), ["detection", "recognition"], CPU, 640)
    server = sort_faces.ModelServer(app, None, {})
    photo = cv2.imread(str(DATA / "group_photos" / "couple.jpg"))
    crops = [np.ascontiguousarray(photo[y:y + 112, x:x + 112])
             for y in (40, 200, 360) for x in (60, 300)]
    calls = [crops[:3], crops[3:4], crops[4:]]
    alone = [app.models["recognition"].get_feat(c) for c in calls]
    answers = [Answers() for _ in calls]
    server.run_group([(a, ("recognition", "get_feat", (c,))) for a, c in zip(answers, calls)])
    for answer, rows in zip(answers, alone):
        (status, got), = answer.sent
        assert status == "ok" and got.shape == rows.shape
        cosine = np.sum(sort_faces.unit_rows(got) * sort_faces.unit_rows(rows), axis=1)
        assert np.all(cosine > 0.9999), cosine
    broken = [Answers() for _ in range(3)]
    server.run_group([(broken[0], ("recognition", "get_feat", (calls[0],))),
                      (broken[1], ("recognition", "get_feat", ([np.zeros((0, 0, 3), np.uint8)],))),
                      (broken[2], ("recognition", "get_feat", (calls[2],)))])
    assert [a.sent[0][0] for a in broken] == ["ok", "error", "ok"]
    assert broken[1].sent[0][1].startswith("error: OpenCV")  # cv2.error: the empty crop's own


def test_the_servers_shape_gives_the_pools_rows_through_a_killed_worker_and_server(
        faces_cache, tmp_path, capsys, monkeypatch):
    """The group photos (many faces a photo: the recognizer's calls batch
    across workers) and a portrait, embedded in the server's shape on the
    CPU, beside a file that kills its decode worker (CRASH_) and one that
    kills the model server (KILLSERVER_): those two are the crashed ones
    (tried again next run), and every other file's rows are the CPU pool's
    (faces_cache), each recorded once; the first line says what ran."""
    from crashing_task import embed_or_crash

    src = tmp_path / "src"
    shutil.copytree(DATA / "group_photos", src)
    portraits = sorted((DATA / "face_recognition").rglob("*.jpg"))[:3]
    shutil.copy2(portraits[0], src / portraits[0].name)
    shutil.copy2(portraits[1], src / f"CRASH_{portraits[1].name}")
    shutil.copy2(portraits[2], src / f"KILLSERVER_{portraits[2].name}")
    monkeypatch.setenv("FACESETS_PIPELINE", "server")
    monkeypatch.setattr(sort_faces, "embed_task", embed_or_crash)
    cache = tmp_path / "c.npz"
    summary = sort_faces.embed(src, cache, model="buffalo_s", workers=2, flush_every=2)
    assert capsys.readouterr().out.splitlines()[1] == \
        "model: CPUExecutionProvider in 1 model process, fed by 2 decode workers"
    assert summary["crashed"] == 2 and summary["new"] == 7 and summary["unreadable"] == 0
    crashed = sort_faces.load_cache(cache).meta["crash_suspects"].values()
    assert sorted(Path(c["path"]).name.split("_")[0] for c in crashed) == ["CRASH", "KILLSERVER"]
    problems, compared = compare(cache_faces(faces_cache), cache_faces(cache))
    assert [p for p in problems if "only in the first" not in p] == [], \
        summary_line(problems, compared)
    assert compared["files"] == 7 and compared["faces"] >= 15  # the group photos'


def test_kill_9_of_a_run_in_the_servers_shape_leaves_no_process(tmp_path, monkeypatch):
    """kill -9 of embed alone, once its model server and decode workers run:
    they end within seconds (exit_with_run)."""
    import psutil

    src = copy_photos(tmp_path / "src", 12)
    monkeypatch.setenv("FACESETS_PIPELINE", "server")
    process = embed_process(src, tmp_path / "c.npz", 100, "--workers", "2")
    deadline, started, working = time.time() + 60, [], []
    while time.time() < deadline and len(working) < 3:  # the server and two decode workers
        time.sleep(0.1)
        started = psutil.Process(process.pid).children(recursive=True)
        working = [p for p in started  # not multiprocessing's resource tracker, fork server
                   if p.ppid() != process.pid or not any(  # (whose forks share its command)
                       helper in " ".join(p.cmdline())
                       for helper in ("resource_tracker", "forkserver"))]
    assert len(working) >= 3, started
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert left_running(started, within=5) == []
