#!/usr/bin/env python3
"""embed throughput against a bare single-process InsightFace loop.

    .venv/bin/python tests/benchmarks/bench_embed.py [PHOTO_FOLDER ...] [--repeat N] [--full-decode]
    .venv/bin/python tests/benchmarks/bench_embed.py --phone 240 [--phone-dir DIR] [--full-decode]
    .venv/bin/python tests/benchmarks/bench_embed.py --ray local [--repeat N] [--no-bare]

Default photos: every set under ../shared/data/faces. `--phone N` times N 12 MP
phone-like JPEGs made from the shared photos instead (phone_photos.py; kept in
--phone-dir to be reused). The bare loop is what a user would write first: one
FaceAnalysis (default threads), `app.get(cv2.imread(f))` over the same files.
embed runs into a fresh temp cache each time (hashing, decoding, phash, blur
and the journal included); `--full-decode` also times `embed --full-decode`;
`--ray ADDRESS` also times `embed --ray ADDRESS` beside the local pool, with as
many actors as the pool has workers (starting a local instance is included,
and also given apart: the seconds until the first file is recorded).
Then the CPU seconds of each stage per photo, as embed recorded them (the
workers' stages in their own threads, this process's scan, sha256 and journal).
Not collected by pytest.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import sort_faces  # noqa: E402


def timed_bare_loop(pack_dir, files):
    from bare_loop import bare_loop

    started = time.perf_counter()
    faces = bare_loop(pack_dir, files)
    return time.perf_counter() - started, faces


def timed_embed(src: Path, cache: Path, **options):
    """(seconds, summary); summary["after_first_seconds"]: the seconds from the
    first result to the end (pool or cluster start and model load left out)."""
    first = []
    on_result = sort_faces.EmbedRun.on_result

    def timed_on_result(run, batch, results):
        if not first:
            first.append(time.perf_counter())
        return on_result(run, batch, results)

    sort_faces.EmbedRun.on_result = timed_on_result
    try:
        started = time.perf_counter()
        summary = sort_faces.embed(src, cache, model="buffalo_s", quiet=True, **options)
        ended = time.perf_counter()
    finally:
        sort_faces.EmbedRun.on_result = on_result
    summary["after_first_seconds"] = ended - first[0] if first else float("nan")
    return ended - started, summary


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folders", nargs="*", default=[str(ROOT.parent / "shared/data/faces")])
    parser.add_argument("--repeat", type=int, default=2, help="passes over the photos per timing")
    parser.add_argument("--phone", type=int, metavar="N",
                        help="time N 12 MP phone photos made from the shared ones instead")
    parser.add_argument("--phone-dir", help="keep the phone photos here (made once, reused)")
    parser.add_argument("--full-decode", action="store_true", help="also time embed --full-decode")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare loop")
    parser.add_argument("--ray", metavar="ADDRESS", help="also time embed --ray ADDRESS")
    args = parser.parse_args()
    import logging
    logging.disable(logging.WARNING)
    pack_name, pack_dir = sort_faces.resolve_model("buffalo_s")
    if args.phone:
        from phone_photos import make_phone_photos

        keep = Path(args.phone_dir or tempfile.mkdtemp(prefix="phone-photos-"))
        photos = [str(p) for p in make_phone_photos(keep, args.phone)]
        args.repeat = 1
    else:
        photos = [p for folder in args.folders for p in sort_faces.scan_images(Path(folder))[0]]
    n = len(photos) * args.repeat
    with tempfile.TemporaryDirectory() as tmp:
        # embed dedups identical content, so each pass gets distinct copies: a
        # trailing byte changes the sha256, not the pixels
        for rep in range(args.repeat):
            folder = Path(tmp) / "src" / f"r{rep}"
            folder.mkdir(parents=True)
            for i, photo in enumerate(photos):
                data = Path(photo).read_bytes() + b"\0" * (rep + 1)
                (folder / f"{i}_{Path(photo).name}").write_bytes(data)
        print(f"images: {n} ({args.repeat} passes over {len(photos)} photos)")
        bare_seconds = None
        if not args.no_bare:
            bare_seconds, bare_faces = timed_bare_loop(pack_dir, sorted((Path(tmp) / "src").rglob("*.*")))
            print(f"bare single-process loop: {bare_seconds:6.1f} s  {n / bare_seconds:6.1f} img/s  "
                  f"{bare_faces} faces")
        runs = [("sort_faces embed", {})]
        if args.full_decode:
            runs.append(("embed --full-decode", {"full_decode": True}))
        if args.ray:
            workers = sort_faces.worker_setup(None, None)[1]
            runs = [("sort_faces embed", {"workers": workers}),
                    (f"embed --ray {args.ray}", {"ray": args.ray, "workers": workers})]
        for index, (label, options) in enumerate(runs):
            seconds, summary = timed_embed(Path(tmp) / "src", Path(tmp) / f"cache{index}.npz",
                                           **options)
            ratio = f"  {bare_seconds / seconds:.2f}x the bare loop" if bare_seconds else ""
            print(f"{label:24}: {seconds:6.1f} s  {n / seconds:6.1f} img/s  {summary['faces']} "
                  f"faces (pool start and model load included){ratio}")
            if args.ray:
                print(f"    after the first file: {summary['after_first_seconds']:6.1f} s  "
                      f"{(n - 1) / summary['after_first_seconds']:6.1f} img/s")
            stages = summary["stage_seconds"]
            print("    CPU ms per photo: " + ", ".join(
                f"{stage} {value * 1000 / n:.1f}" for stage, value in stages.items()))
            print(f"    workers' CPU {sum(v for k, v in stages.items() if k not in ('scan', 'sha256', 'journal')) * 1000 / n:.1f} ms a photo; "
                  f"this process's scan + sha256 + journal "
                  f"{sum(stages.get(k, 0) for k in ('scan', 'sha256', 'journal')) * 1000 / n:.1f} ms")


if __name__ == "__main__":
    main()
