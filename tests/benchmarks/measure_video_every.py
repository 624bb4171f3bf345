"""What the sampling interval (embed --video-every) buys and costs, to choose
its default (issue 14).

    .venv/bin/python tests/benchmarks/measure_video_every.py [--every 0.25 0.5 1 2 4]

For each interval: embeds the shared clip (9.2 s of real footage) beside
Lin-Manuel Miranda's photo, clusters at the defaults, and prints the frames
sampled, the faces, the frames that join his photo's person, the people found
(2 faces or more), the wall time, and, on a synthetic 720p video of the shared
photos in 3-second shots, the shots that reach a person with faces from at
least two samples of the shot (a shot seen once is a singleton at any
threshold) and the wall time. Not collected by pytest.
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import sort_faces  # noqa: E402
import videos  # noqa: E402

LIN = videos.FACES / "face_recognition" / "lin_manuel_miranda"


def clip_run(tmp: Path, every: float) -> str:
    src = tmp / f"clip_{every}"
    src.mkdir()
    shutil.copy2(videos.CLIP, src / videos.CLIP.name)
    for photo in LIN.iterdir():
        shutil.copy2(photo, src / photo.name)
    cache = tmp / f"clip_{every}.npz"
    started = time.perf_counter()
    summary = sort_faces.embed(src, cache, model="buffalo_s", quiet=True, video_every=every)
    wall = time.perf_counter() - started
    manifest = sort_faces.cluster(cache, tmp / f"raw_{every}", quiet=True)
    lin = next((e for e in manifest["clusters"] if any(f["file"].endswith(".png")
                                                       for f in e["faces"])), None)
    frames = sum(1 for f in (lin or {"faces": []})["faces"] if "#t=" in f["file"])
    return (f"clip: {summary['frames']} frames, {summary['faces']} faces, {frames} frames join "
            f"his photo, {len(manifest['clusters'])} people, {wall:.1f} s")


def shots_run(tmp: Path, every: float, video: Path, shots: int) -> str:
    src = tmp / f"shots_{every}"
    src.mkdir()
    (src / video.name).symlink_to(video)
    cache = tmp / f"shots_{every}.npz"
    started = time.perf_counter()
    summary = sort_faces.embed(src, cache, model="buffalo_s", quiet=True, video_every=every)
    wall = time.perf_counter() - started
    manifest = sort_faces.cluster(cache, tmp / f"shots_raw_{every}", quiet=True)
    seen = set()
    for entry in manifest["clusters"]:
        times = [float(f["file"].rsplit("#t=", 1)[1]) for f in entry["faces"]]
        by_shot = {}
        for t in times:
            by_shot.setdefault(int(t // 3), set()).add(t)
        seen |= {shot for shot, ts in by_shot.items() if len(ts) >= 2}
    return (f"shots: {summary['frames']} frames, {len(seen)} of {shots} shots in a person "
            f"from 2+ samples, {wall:.1f} s")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--every", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--shots", type=int, default=20)
    args = parser.parse_args()
    import logging
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = sorted(p for p in (videos.FACES / "five_celebs").rglob("*.jpg"))
        step = max(1, len(photos) // args.shots)
        video = videos.make_video(tmp / "shots.mp4", [(p, 3) for p in photos[::step][:args.shots]],
                                  fps=30, size=(1280, 720))
        for every in args.every:
            print(f"every {every:g} s: {clip_run(tmp, every)}; "
                  f"{shots_run(tmp, every, video, args.shots)}")


if __name__ == "__main__":
    main()
