"""Model tasks that misbehave as a decoder or a model may: one kills its worker
process on files named CRASH*, as a segfault would (and, in the GPU's shape, its
model server on files named KILLSERVER*, as a model that crashes on them would);
one never returns (importable by the spawned workers, shipped to Ray's)."""

import os
from pathlib import Path

import sort_faces


def embed_or_crash(batch, data=None):
    if any(Path(task.path).name.startswith("CRASH") for task in batch):
        os._exit(3)
    if any(Path(task.path).name.startswith("KILLSERVER") for task in batch):
        kill_model_server()
    return sort_faces.embed_task(batch, data)


def kill_model_server():
    """kill -9 of the model server this decode worker calls: the process beside
    it that listens on a multiprocessing socket (listener-*)."""
    import psutil

    me = psutil.Process()
    for sibling in me.parent().children():
        if sibling.pid != me.pid and any("listener-" in (c.laddr or "")
                                         for c in sibling.net_connections(kind="unix")):
            sibling.kill()  # (its parent reaps it)


def worker_pid(batch):
    """A model task that answers each file with the pid of the worker that ran it."""
    return [os.getpid() for _task in batch]


def worker_environment(batch):
    """A model task that answers each file with its worker's FACESETS_TEST_PROBE."""
    return [os.environ.get("FACESETS_TEST_PROBE") for _task in batch]


def stall(batch):
    """A model task that writes its worker's pid into the file its task names,
    then does not return: a model call on some input that takes an hour."""
    import time

    Path(batch[0].path).write_text(str(os.getpid()))
    time.sleep(3600)
