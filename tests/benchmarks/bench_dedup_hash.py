"""Benchmark ``hamming_pairs`` + ``group_pairs`` on synthetic 64-bit hashes.

Usage::

    python tests/benchmarks/bench_dedup_hash.py [--n N] [--max-distance D ...]
        [--identical K] [--groups G] [--no-full] [--seed S]

Synthetic data (defaults): N = 100 000 hashes in total, of which K = 10 000
are one identical value (like many blank frames), G = 2 000 planted
near-duplicate groups of 2-6 hashes each (a random seed plus copies with
1..D//2 random bits flipped, so every pair in a group is within D), and the
rest uniformly random 64-bit values. The order is shuffled.

For each D (default 8 10 12) it times, in seconds:

* ``connectivity``: ``hamming_pairs(h, D, connectivity_only=True)`` +
  ``group_pairs`` (what a dedup step needs);
* ``full``: ``hamming_pairs(h, D)`` listing every pair, including the
  K*(K-1)/2 pairs of the identical block (~50 M pairs, ~0.8 GB for K = 10 000;
  skip with ``--no-full``) + ``group_pairs``;

checks that every planted group lies inside one found group and that both
modes give the same groups, and prints peak resident memory.

"""

import argparse
import os
import resource
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_functions():
    sys.path.insert(0, ROOT)
    import sort_faces

    return sort_faces.hamming_pairs, sort_faces.group_pairs, "sort_faces"


def make_hashes(n, n_identical, n_groups, max_distance, rng):
    """Random uint64 hashes with planted groups; returns (hashes, groups).

    ``groups`` lists index arrays (into the shuffled hashes) of the planted
    near-duplicate groups, the identical block last.
    """
    sizes = rng.integers(2, 7, size=n_groups)
    n_planted = int(sizes.sum()) + n_identical
    if n_planted > n:
        raise ValueError("n too small for the planted groups")
    values = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    label = np.full(n, -1, dtype=np.int64)
    pos = 0
    half = max(1, max_distance // 2)
    for g, size in enumerate(sizes):
        seed = values[pos]
        label[pos] = g
        for k in range(1, size):
            n_flip = int(rng.integers(1, half + 1))
            bits = rng.choice(64, size=n_flip, replace=False).astype(np.uint64)
            mask = np.bitwise_or.reduce(np.uint64(1) << bits)
            values[pos + k] = seed ^ mask
            label[pos + k] = g
        pos += size
    values[pos:pos + n_identical] = values[pos]
    label[pos:pos + n_identical] = n_groups
    perm = rng.permutation(n)
    values, label = values[perm], label[perm]
    order = np.argsort(label, kind="stable")
    cuts = np.flatnonzero(np.diff(label[order])) + 1
    groups = [grp for grp in np.split(order, cuts) if label[grp[0]] >= 0]
    return values, groups


def check(found, planted, n):
    """Number of planted groups not contained in a single found group."""
    where = np.full(n, -1, dtype=np.int64)
    for k, grp in enumerate(found):
        where[grp] = k
    return sum(1 for grp in planted
               if where[grp[0]] < 0 or np.any(where[grp] != where[grp[0]]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--max-distance", type=int, nargs="+", default=[8, 10, 12])
    parser.add_argument("--identical", type=int, default=10_000)
    parser.add_argument("--groups", type=int, default=2_000)
    parser.add_argument("--no-full", action="store_true",
                        help="skip the all-pairs mode (quadratic in --identical)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    hamming_pairs, group_pairs, source = load_functions()
    print(f"functions from {source}; n={args.n}, identical block={args.identical}, "
          f"planted groups={args.groups}, cpus={os.cpu_count()}")
    # warm-up (imports, first-call allocations)
    group_pairs(2000, hamming_pairs(np.arange(2000, dtype=np.uint64), 2))

    print(f"{'D':>3} {'mode':>12} {'pairs':>11} {'groups':>7} {'pairs_s':>8} "
          f"{'group_s':>8} {'total_s':>8} {'missed':>6}")
    for d in args.max_distance:
        rng = np.random.default_rng(args.seed)
        hashes, planted = make_hashes(args.n, args.identical, args.groups, d, rng)
        results = {}
        for mode in ("connectivity", "full"):
            if mode == "full" and args.no_full:
                continue
            t0 = time.perf_counter()
            pairs = hamming_pairs(hashes, d, connectivity_only=(mode == "connectivity"))
            t1 = time.perf_counter()
            groups = group_pairs(len(hashes), pairs)
            t2 = time.perf_counter()
            results[mode] = groups
            print(f"{d:3d} {mode:>12} {len(pairs):11d} {len(groups):7d} {t1 - t0:8.2f} "
                  f"{t2 - t1:8.2f} {t2 - t0:8.2f} {check(groups, planted, len(hashes)):6d}",
                  flush=True)
            del pairs
        if len(results) == 2:
            same = len(results["full"]) == len(results["connectivity"]) and all(
                np.array_equal(a, b) for a, b in zip(results["full"], results["connectivity"]))
            print(f"    both modes give the same groups: {same}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {peak:.0f} MB")


if __name__ == "__main__":
    main()
