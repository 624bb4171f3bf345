"""Model tasks that misbehave as a decoder or a model may: one kills its worker
process on files named CRASH*, as a segfault would; one never returns
(importable by the spawned workers, shipped to Ray's)."""

import os
from pathlib import Path

import sort_faces


def embed_or_crash(batch, data=None):
    if any(Path(entry[0]).name.startswith("CRASH") for entry in batch):
        os._exit(3)
    return sort_faces.embed_task(batch, data)


def worker_pid(batch):
    """A model task that answers each file with the pid of the worker that ran it."""
    return [os.getpid() for _entry in batch]


def stall(batch):
    """A model task that writes its worker's pid into the file its entry names,
    then does not return: a model call on some input that takes an hour."""
    import time

    Path(batch[0][0]).write_text(str(os.getpid()))
    time.sleep(3600)
