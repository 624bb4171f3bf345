#!/usr/bin/env python3
"""embed before and after the second look for faces that fill the frame
(issue 26), side by side in one run: whole `sort_faces.py embed` processes,
the version of a git revision (default: the commit before the second look)
and this checkout's, taken in turn (A B A B ...), on photos without
close-ups: the shared photos, and 12 MP phone photos made from them.

    .venv/bin/python tests/benchmarks/bench_second_look.py [--base REV] [--rounds 3]
        [--phone 60] [--phone-dir DIR]

Each run embeds into a fresh cache (pool start and model load included) with
the default workers. Prints each side's wall seconds per run (median, min-max),
the median of the after/before ratios of the pairs, and both sides' face
counts. Only temp folders are written. Not collected by pytest.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
BASE = "4f657af"  # issue 25's last change to embed, before the second look


def embed_seconds(script: Path, src: Path, cache: Path) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(script), "embed", str(src), str(cache),
                           "--model", "buffalo_s"], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, FACESETS_LOG_DIR=str(cache.parent / "logs")))
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        sys.exit(f"{script}: exit {done.returncode}: {done.stderr[-2000:]}")
    line = next((l for l in done.stdout.splitlines() if l.startswith("embed done:")), "")
    return seconds, line


def faces(line: str) -> str:
    return next((part.strip() for part in line.split(",") if part.strip().endswith("faces")), "?")


def compare(name: str, src: Path, before: Path, rounds: int, tmp: Path) -> None:
    times = {"before": [], "after": []}
    said = {}
    for round_ in range(rounds):
        for side, script in (("before", before), ("after", ROOT / "sort_faces.py")):
            cache = tmp / f"{side}-{round_}.npz"
            seconds, line = embed_seconds(script, src, cache)
            times[side].append(seconds)
            said[side] = faces(line)
    ratios = [a / b for a, b in zip(times["after"], times["before"])]
    print(f"{name}:")
    for side in ("before", "after"):
        values = times[side]
        print(f"  {side:6}: {statistics.median(values):6.1f} s ({min(values):.1f}-"
              f"{max(values):.1f}), {said[side]}")
    print(f"  after/before: median {statistics.median(ratios):.3f} "
          f"({min(ratios):.3f}-{max(ratios):.3f}) over {rounds} pairs")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default=BASE, help="the git revision to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phone", type=int, default=60, help="12 MP phone photos (0: none)")
    parser.add_argument("--phone-dir", help="keep the phone photos here (made once, reused)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before = tmp / "before" / "sort_faces.py"
        before.parent.mkdir()
        before.write_bytes(subprocess.run(["git", "show", f"{args.base}:sort_faces.py"],
                                          cwd=ROOT, capture_output=True, check=True).stdout)
        print(f"before: sort_faces.py at {args.base}; after: this checkout")
        compare("the shared photos", ROOT.parent / "shared" / "data" / "faces", before,
                args.rounds, tmp)
        if args.phone:
            from phone_photos import make_phone_photos

            keep = Path(args.phone_dir or tmp / "phone")
            make_phone_photos(keep, args.phone)
            compare(f"{args.phone} phone photos (12 MP)", keep, before, args.rounds, tmp)


if __name__ == "__main__":
    main()
