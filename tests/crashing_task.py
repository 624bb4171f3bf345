"""Model tasks that misbehave as a decoder or a model may: one kills its worker
process on files named CRASH*, as a segfault would; one never returns
(importable by the spawned workers, shipped to Ray's)."""

import os
from pathlib import Path

import sort_faces


def embed_or_crash(batch, data=None):
    if any(Path(task.path).name.startswith("CRASH") for task in batch):
        os._exit(3)
    return sort_faces.embed_task(batch, data)


def worker_pid(batch):
    """A model task that answers each file with the pid of the worker that ran it."""
    return [os.getpid() for _task in batch]


def stall(batch):
    """A model task that writes its worker's pid into the file its task names,
    then does not return: a model call on some input that takes an hour."""
    import time

    Path(batch[0].path).write_text(str(os.getpid()))
    time.sleep(3600)
