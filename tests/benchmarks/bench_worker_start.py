#!/usr/bin/env python3
"""How long a model step's workers take to start: spawned (each imports
sort_faces and the model's libraries itself) against forked by the fork
server (worker_context: those imported once a run).

    .venv/bin/python tests/benchmarks/bench_worker_start.py [--workers 2] [--pools 5]

Each pool of W workers (buffalo_s, detection + recognition + landmarks, as
embed loads them) is started and every worker answers pool_canary once; a
pool is then shut down and the next started, as the steps of one run do,
and as the tests that call the steps in one process do. Prints, for each
start method: the first pool (the fork server starts with it), the median
of the later pools, and the CPU seconds all the processes used (psutil,
this process's children, the fork server's included). Not collected by pytest.
"""

import argparse
import concurrent.futures
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import sort_faces  # noqa: E402


def children_cpu(seen: dict) -> float:
    """CPU seconds of every process under this one, each counted at its
    last sight (`seen`, by pid and start time, kept across calls)."""
    for process in psutil.Process().children(recursive=True):
        try:
            with process.oneshot():
                times = process.cpu_times()
                seen[(process.pid, process.create_time())] = times.user + times.system
        except psutil.Error:
            pass
    return sum(seen.values())


def start_pools(method: str, workers: int, pools: int) -> dict:
    context = multiprocessing.get_context("spawn") if method == "spawn" else \
        sort_faces.worker_context()
    sort_faces.worker_context = lambda: context
    pack_dir = sort_faces.offline_pack_dir()
    step = sort_faces.ModelStep(
        lambda batch: [], pack_dir, ["detection", "recognition", "landmark_2d_106"],
        sort_faces.model_identity("buffalo_s", pack_dir, 640),
        on_result=lambda batch, result: None, crash_result=lambda reason: None)
    seconds, seen = [], {}
    for _ in range(pools):
        started = time.perf_counter()
        pool = sort_faces.model_pool(step, ["CPUExecutionProvider"], workers)
        answers = [pool.submit(sort_faces.pool_canary) for _ in range(workers)]
        concurrent.futures.wait(answers)
        assert len(pool._processes) == workers, "every worker started"
        seconds.append(time.perf_counter() - started)
        children_cpu(seen)
        pool.shutdown()
    return {"first": seconds[0], "later": statistics.median(seconds[1:]) if pools > 1 else None,
            "cpu": children_cpu(seen)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pools", type=int, default=5)
    parser.add_argument("--method", choices=["spawn", "forkserver"], default=None,
                        help="one start method (default: each, each in a fresh process)")
    args = parser.parse_args()
    if args.method:
        result = start_pools(args.method, args.workers, args.pools)
        later = f"{result['later']:.2f} s" if result["later"] is not None else "-"
        print(f"{args.method:10s} {args.pools} pools of {args.workers}: first {result['first']:.2f}"
              f" s, later (median) {later}, CPU of all processes {result['cpu']:.1f} s",
              flush=True)
        return
    import subprocess

    for method in ("spawn", "forkserver"):  # each in a process of its own: one fork server each
        subprocess.run([sys.executable, __file__, "--method", method, "--workers",
                        str(args.workers), "--pools", str(args.pools)], check=True)


if __name__ == "__main__":
    main()
