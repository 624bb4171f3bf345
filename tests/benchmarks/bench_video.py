"""Video seconds embedded per wall second, at the default sampling, on 720p
H.264 made with PyAV from the shared photos (issue 14: at least 10x real time
at one sample a second on this 2-core machine), with the time split between
decoding and the model; and the decoding strategies compared alone.

    .venv/bin/python tests/benchmarks/bench_video.py [--seconds 120] [--gop 250]
        [--every 1.0] [--size 1280x720] [--keep DIR] [--no-embed]
        [--strategy all|default|on-screen]

1. Makes a video of --seconds at 30 fps (each shared photo of five_celebs and
   lfw10 shown for 3 s, slowly zooming in, so that every frame differs as in
   real footage; libx264's default keyframe interval, 250 frames, unless
   --gop), or reuses the one in --keep.
2. Indexes the video (every packet's timestamp, nothing decoded: what the
   parent plans a video's samples from) and decodes the planned samples alone
   (no model), two ways: the default plan (a keyframe within
   VIDEO_KEYFRAME_TOLERANCE_S of a sample stands for it) and the frame on
   screen at every sample. Prints samples per second for each.
3. Embeds the video into a new cache with the default workers (`embed`, the
   same pool as photos) and prints the wall time, video seconds per wall
   second, and the workers' CPU seconds by stage (decode vs the model).
Not collected by pytest.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import sort_faces  # noqa: E402
import videos  # noqa: E402


def shared_photos() -> list[Path]:
    photos = []
    for collection in ("five_celebs", "lfw10"):
        photos += sorted(p for p in (videos.FACES / collection).rglob("*")
                         if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return photos


def make(path: Path, seconds: float, gop: int | None, size) -> Path:
    photos = shared_photos()
    spans = [(photos[i % len(photos)], 3) for i in range(int(seconds // 3))]
    started = time.perf_counter()
    videos.make_video(path, spans, fps=30, size=size, gop=gop, motion=True)
    print(f"made {path.name}: {seconds:.0f} s at 30 fps, {size[0]}x{size[1]}, H.264, each shot "
          f"zooming in (every frame differs), gop "
          f"{gop or 'default (250)'}, {path.stat().st_size / 1e6:.1f} MB in "
          f"{time.perf_counter() - started:.0f} s")
    return path


STRATEGIES = {  # name: (what it does, keyframe_tolerance)
    "default": (f"default (a keyframe within {sort_faces.VIDEO_KEYFRAME_TOLERANCE_S:g} s stands "
                "for a sample)", sort_faces.VIDEO_KEYFRAME_TOLERANCE_S),
    "on-screen": ("the frame on screen at every sample", 0.0)}


def decode_only(path: Path, every: float, strategies) -> None:
    started = time.perf_counter()
    index = sort_faces.index_video(str(path))
    wall = time.perf_counter() - started
    duration = float(index.times[-1])
    print(f"index: {len(index.pts)} frames ({int(index.keyframes.sum())} keyframes) in "
          f"{wall:.2f} s")
    for name, tolerance in (STRATEGIES[s] for s in strategies):
        started = time.perf_counter()
        plan = sort_faces.video_plan(index, every, tolerance)
        count = sum(bgr is not None for _pts, bgr, _damage in sort_faces.video_frames_at(
            str(path), [(pts, key) for _t, pts, key, _s in plan]))
        wall = time.perf_counter() - started
        print(f"decode only, {name}: {count} samples in {wall:.1f} s = {count / wall:.1f} "
              f"samples/s = {duration / wall:.1f}x real time on one core")


def embed(path: Path, every: float) -> None:
    duration = sort_faces.probe_video(str(path))["duration"]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        (src / path.name).symlink_to(path)
        started = time.perf_counter()
        summary = sort_faces.embed(src, Path(tmp) / "c.npz", model="buffalo_s", quiet=True,
                                   video_every=every)
        wall = time.perf_counter() - started
    stages = summary["stage_seconds"]
    model = sum(stages.get(k, 0) for k in ("detect", "face views", "recognize"))
    print(f"embed: {duration:.0f} s of video, {summary['frames']} frames, {summary['faces']} "
          f"faces in {wall:.1f} s wall = {duration / wall:.1f}x real time "
          f"({summary['frames'] / wall:.1f} frames/s)")
    print(f"  workers' CPU seconds: decode {stages.get('decode', 0):.1f}, model {model:.1f} "
          f"(detect {stages.get('detect', 0):.1f}, face views {stages.get('face views', 0):.1f}, "
          f"recognize {stages.get('recognize', 0):.1f}), perceptual hash "
          f"{stages.get('perceptual hash', 0):.1f}; parent: sha256 {stages.get('sha256', 0):.1f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--gop", type=int, default=None)
    parser.add_argument("--every", type=float, default=sort_faces.DEFAULT_VIDEO_EVERY)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--keep", type=Path, default=None,
                        help="a folder to keep the made video in (and reuse it)")
    parser.add_argument("--no-embed", action="store_true")
    parser.add_argument("--strategy", choices=["all", *STRATEGIES], default="all",
                        help="the decoding strategies to time alone")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    import logging
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"zoom_{int(args.seconds)}s_{size[1]}p_gop{args.gop or 250}.mp4"
        if not path.exists():
            make(path, args.seconds, args.gop, size)
        decode_only(path, args.every, list(STRATEGIES) if args.strategy == "all"
                    else [args.strategy])
        if not args.no_embed:
            embed(path, args.every)


if __name__ == "__main__":
    main()
