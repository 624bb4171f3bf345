#!/usr/bin/env python3
"""HNSW against the inverted lists, by recall of the true pairs under the
threshold (issue 15 B: choose the index by that recall).

    .venv/bin/python tests/benchmarks/measure_hnsw.py [N] [--k 32 64] [--ef 64 128 256]

Faces of real structure (bench_cluster.py --real: the shared photos'
embeddings turned by random orthogonal matrices, stacked to N). faiss's
IndexHNSWFlat (inner product, M 32) finds each face's k nearest at each
efSearch; a true pair (cosine similarity >= 1 - threshold, exact products
from a sample of faces against all) is found when either face has the other
among its k nearest. Prints build and search seconds and the recall, beside
the inverted lists' candidate recall as agglomerative_labels measures it.
Not collected by pytest.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))


def true_pairs(X, sample, sim_min):
    """(q, c): the sample's pairs at similarity >= sim_min, exact."""
    rows, cols = [], []
    for c0 in range(0, len(X), 65536):
        qi, cj = np.nonzero(X[sample] @ X[c0:c0 + 65536].T >= sim_min)
        keep = sample[qi] != cj + c0
        rows.append(sample[qi[keep]])
        cols.append(cj[keep] + c0)
    return np.concatenate(rows), np.concatenate(cols)


def main():
    import faiss

    import sort_faces
    from bench_cluster import make_real

    parser = argparse.ArgumentParser()
    parser.add_argument("n", nargs="?", type=int, default=100_000)
    parser.add_argument("--threshold", type=float, default=0.55)
    parser.add_argument("--k", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--ef", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--real-cache", default="/tmp/face-sets-bench-real.npz")
    args = parser.parse_args()
    X, _ = make_real(args.n, args.real_cache)
    sim_min = np.float32(1.0 - args.threshold - sort_faces.CLUSTER_EDGE_MARGIN)
    sample = np.sort(np.random.default_rng(0).choice(args.n, 1000, replace=False))
    q, c = true_pairs(X, sample, sim_min)
    print(f"{args.n} faces, {len(q)} true pairs from 1000 sampled faces")
    started = time.perf_counter()
    index = faiss.IndexHNSWFlat(X.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.add(X)
    print(f"HNSW (M 32, efConstruction 80): built in {time.perf_counter() - started:.1f} s")
    rows = np.unique(np.concatenate([sample, c]))  # the faces whose neighbours decide
    at = np.full(args.n, -1)
    at[rows] = np.arange(len(rows))
    for k in args.k:
        for ef in args.ef:
            index.hnsw.efSearch = max(ef, k)
            started = time.perf_counter()
            _sims, found = index.search(X[rows], k)
            seconds = (time.perf_counter() - started) * args.n / len(rows)
            hit = (found[at[q]] == c[:, None]).any(axis=1) | \
                (found[at[c]] == q[:, None]).any(axis=1)
            print(f"  k {k:3} efSearch {index.hnsw.efSearch:4}: search of every face "
                  f"{seconds:6.1f} s (from {len(rows)}), recall of the true pairs {hit.mean():.4f}")
    lists = int(sort_faces.CLUSTER_ANN["lists_per_sqrt"] * math.sqrt(args.n))
    print(f"inverted lists for comparison: bench_cluster.py --real {args.n} --compare "
          f"(nlist {lists}, nprobe {sort_faces.CLUSTER_ANN['nprobe']})")


if __name__ == "__main__":
    main()
