"""Benchmark ``agglomerative_labels`` on synthetic ArcFace-like embeddings,
or on faces of real structure (``--real``).

Usage::

    python tests/benchmarks/bench_cluster.py [N ...] [--threshold T] [--sklearn]
                                             [--max-component M]
    python tests/benchmarks/bench_cluster.py --real [N ...] [--method auto|exact|ann]
                                             [--compare] [--threshold 0.55]
                                             [--grid LISTS:NPROBE ...]
    python tests/benchmarks/bench_cluster.py [--real] [N ...] --same-photo [--method ...]
    python tests/benchmarks/bench_cluster.py --real --library [N ...] [--compare] [--method ...]

``--real``: the embeddings of the shared photos (five_celebs, lfw10 and
face_recognition, embedded once with buffalo_s into the cache given by
``--real-cache``, default /tmp/face-sets-bench-real.npz), each face labelled by
its photo's folder, multiplied by random orthogonal 512 x 512 matrices: each
copy keeps every real distance among its own faces and becomes a new set of
people. Copies are stacked to N faces. Prints time, peak memory, BCubed
precision/recall/F against the labels, the method and its candidate recall.
``--compare`` runs the exact path and the approximate one on the same faces
(each in its own process) and prints the pairwise F of one partition against
the other and their cluster counts; ``--grid 1:32 4:128 ...`` does so for the
index at each lists-per-sqrt(N) : nprobe.

N defaults to 10000 100000 300000. Each size runs in a fresh subprocess so
``ru_maxrss`` (peak resident memory) is separate per size. ``--sklearn`` also
checks the partition against scikit-learn for N <= 20000. ``--max-component``
lowers the exact-linkage limit to exercise the fallback.

``--real --library`` (issue 31): the copies have a library's shape
(LIBRARY_KEEP: each person of a copy keeps 1, 2, 3 or all of their faces, so
that 31 % of the faces are people seen once, as in the public face set the
issue names), the faces are put into photos as ``--same-photo`` does (a
copy's people one circle), and clustering gets the same-photo rule's pairs.
Prints each stage's seconds and the resident memory after it.

``--same-photo`` (issue 30): the faces are put into photos as a family
library has them (PHOTO_SIZES: 60 % of photos with one face, 22 % two, 10 %
three, the rest 4-12; a photo's people from one circle of about 20
identities, look-alike "siblings" in their partner's circle, each identity at
most once a photo), and each size is clustered without the same-photo rule
and with it (the cannot-link pairs of sort_faces.same_photo_pairs, their
building timed too), in one process a size, ``--rounds`` times a side in
alternating order (the quickest kept): time, peak memory, BCubed, the pairs
that share a cluster without the rule, the merges it prevented.

Synthetic data (512-d, unit rows): Zipf-sized identities, 10 % singletons,
one identity holding 5 % of all faces, and 10 % of identities given a
look-alike "sibling" centre (cos ~0.6) so some components span identities.
Faces are ``normalize(centre + sigma * z)`` with ``z ~ N(0, I/512)``; sigma
in [0.65, 1.0] for most faces gives intra-identity cosine distances of
0.3-0.5, a 12 % tail up to sigma 1.5 gives harder faces (up to ~0.6).
Identity centres share a weak common direction, so unrelated faces sit at
cosine distance ~0.9-1.0.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIM = 512


def load_agglomerative_labels():
    sys.path.insert(0, ROOT)
    import sort_faces

    return sort_faces.agglomerative_labels


def make_faces(n, dim=DIM, seed=0, chunk=20000, circles=False):
    """Synthetic unit-norm embeddings (float32) and their identity labels
    (and with `circles` the circle of each identity: look-alikes share one)."""
    rng = np.random.default_rng(seed)
    sizes = [max(2, n // 20)]  # one very large identity
    n_single = n // 10
    remaining = n - sizes[0] - n_single
    while remaining > 0:
        s = int(min(rng.zipf(1.7), max(2, n // 100), remaining))
        sizes.append(s)
        remaining -= s
    sizes = np.array(sizes + [1] * n_single)
    n_id = len(sizes)

    common = rng.standard_normal(dim)
    common /= np.linalg.norm(common)
    centres = rng.standard_normal((n_id, dim)).astype(np.float32) / np.sqrt(dim)
    centres += np.float32(0.35) * common.astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    multi = np.flatnonzero(sizes > 1)
    sib = rng.choice(multi[1:], size=len(multi) // 10, replace=False)
    partner = rng.choice(multi, size=sib.size)
    noise = rng.standard_normal((sib.size, dim)).astype(np.float32) / np.sqrt(dim)
    centres[sib] = centres[partner] + np.float32(1.3) * noise
    centres[sib] /= np.linalg.norm(centres[sib], axis=1, keepdims=True)

    truth = rng.permutation(np.repeat(np.arange(n_id), sizes))
    X = np.empty((n, dim), np.float32)
    for c0 in range(0, n, chunk):
        t = truth[c0:c0 + chunk]
        hard = rng.random(t.size) < 0.12
        sigma = np.where(hard, rng.uniform(1.0, 1.5, t.size), rng.uniform(0.65, 1.0, t.size))
        x = rng.standard_normal((t.size, dim), dtype=np.float32)
        x *= (sigma / np.sqrt(dim)).astype(np.float32)[:, None]
        x += centres[t]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        X[c0:c0 + chunk] = x
    if circles:
        circle = rng.permutation(n_id) // CIRCLE_SIZE
        circle[sib] = circle[partner]  # siblings are photographed together
        return X, truth, circle
    return X, truth


# How many faces a photo holds, and how often (issue 30's benchmark): most
# photos of a family library show one face, a third two or three, a few more.
PHOTO_SIZES = {1: 0.60, 2: 0.22, 3: 0.10, 4: 0.03, 5: 0.02, 6: 0.015, 8: 0.01, 12: 0.005}
CIRCLE_SIZE = 20  # identities photographed together (a family, friends)


def photos_of(truth, circle, seed=0):
    """A photo id for each face: within each circle, photos of PHOTO_SIZES
    faces of as many distinct identities (drawn by their faces left), until
    every face has its photo."""
    rng = np.random.default_rng(seed)
    sizes, weights = np.array(list(PHOTO_SIZES)), np.array(list(PHOTO_SIZES.values()))
    photo = np.empty(len(truth), np.int64)
    faces_of = {}
    for face in rng.permutation(len(truth)):
        faces_of.setdefault(int(truth[face]), []).append(int(face))
    members = {}
    for identity in faces_of:
        members.setdefault(int(circle[identity]), []).append(identity)
    next_photo = 0
    for ids in members.values():
        left = {i: faces_of[i] for i in ids}
        while left:
            alive = list(left)
            k = min(int(rng.choice(sizes, p=weights)), len(alive))
            counts = np.array([len(left[i]) for i in alive], np.float64)
            for pick in rng.choice(len(alive), k, replace=False, p=counts / counts.sum()):
                identity = alive[pick]
                photo[left[identity].pop()] = next_photo
                if not left[identity]:
                    del left[identity]
            next_photo += 1
    return photo


REAL_SETS = ("five_celebs", "lfw10", "face_recognition")


def real_faces(cache_path):
    """(embeddings, labels) of the shared photos' faces, embedded once."""
    sys.path.insert(0, ROOT)
    import sort_faces
    from pathlib import Path

    data = Path(ROOT).parent / "shared" / "data" / "faces"
    cache_path = Path(cache_path)
    if not cache_path.exists():
        import logging
        logging.disable(logging.WARNING)
        for name in REAL_SETS:
            sort_faces.embed(data / name, cache_path, model="buffalo_s", quiet=True)
    cache = sort_faces.load_cache(cache_path)
    folders = np.array([Path(f).parent.name for f in cache["files"]])
    return np.asarray(cache["embeddings"], np.float32), folders[cache["face_file"]]


def make_real(n, cache_path, seed=0):
    """n faces: copies of the real faces, each turned by its own random
    orthogonal matrix (a new set of people with the same inner distances)."""
    base, names = real_faces(cache_path)
    _, base_labels = np.unique(names, return_inverse=True)
    people = int(base_labels.max()) + 1
    rng = np.random.default_rng(seed)
    X = np.empty((n, base.shape[1]), np.float32)
    labels = np.empty(n, np.int64)
    for copy, r0 in enumerate(range(0, n, len(base))):
        q, r = np.linalg.qr(rng.standard_normal((base.shape[1], base.shape[1])))
        q *= np.sign(np.diag(r))  # a uniformly random orthogonal matrix
        rows = min(len(base), n - r0)
        X[r0:r0 + rows] = base[:rows] @ q.astype(np.float32)
        labels[r0:r0 + rows] = base_labels[:rows] + copy * people
    return X, labels


# --library (issue 31): how many of a person's faces a copy keeps, by share of
# people: as in the public face set the issue names (5,744 people for 13,213
# faces, 4,069 of them seen once: 71% of people, 31% of faces), 71% of a
# copy's people keep one face, 12% two, 8% three, 9% all they have (12 on
# average here): 31% of the faces are people seen once.
LIBRARY_KEEP = {1: 0.71, 2: 0.12, 3: 0.08, 0: 0.09}  # 0: every face
LIBRARY_ROTATIONS = 64  # random rotations, each taken with a signed permutation a copy


def make_library(n, cache_path, seed=0):
    """n faces of a library's shape: copies of the real faces, each person of
    a copy keeping 1, 2, 3 or all of their faces (LIBRARY_KEEP), each copy
    turned by its own orthogonal matrix (one of LIBRARY_ROTATIONS random
    rotations, then a random signed permutation of the coordinates: tens of
    thousands of copies without as many QR decompositions). Returns the
    faces, their person labels and each person's copy (a circle of people
    photographed together)."""
    base, names = real_faces(cache_path)
    _, base_labels = np.unique(names, return_inverse=True)
    people = int(base_labels.max()) + 1
    rng = np.random.default_rng(seed)
    turned = []
    for _ in range(LIBRARY_ROTATIONS):
        q, r = np.linalg.qr(rng.standard_normal((base.shape[1], base.shape[1])))
        turned.append(base @ (q * np.sign(np.diag(r))).astype(np.float32))
    faces_of = [np.flatnonzero(base_labels == p) for p in range(people)]
    keeps, shares = np.array(list(LIBRARY_KEEP)), np.array(list(LIBRARY_KEEP.values()))
    X = np.empty((n, base.shape[1]), np.float32)
    labels = np.empty(n, np.int64)
    face_copy = np.empty(n, np.int64)
    r0, copy = 0, 0
    while r0 < n:
        keep = rng.choice(keeps, size=people, p=shares)
        rows = np.concatenate([rng.permutation(f)[:k or len(f)] for f, k in zip(faces_of, keep)])
        rows = rows[:n - r0]
        sign = rng.choice(np.float32([-1, 1]), base.shape[1])
        X[r0:r0 + len(rows)] = turned[copy % LIBRARY_ROTATIONS][rows][:, rng.permutation(
            base.shape[1])] * sign
        labels[r0:r0 + len(rows)] = base_labels[rows] + copy * people
        face_copy[r0:r0 + len(rows)] = copy
        r0, copy = r0 + len(rows), copy + 1
    _, labels = np.unique(labels, return_inverse=True)
    circle = np.empty(int(labels.max()) + 1, np.int64)
    circle[labels] = face_copy
    return X, labels, circle


def library_shape(labels):
    """Shares of faces in people of one, two, three faces and more."""
    size = np.bincount(labels)[labels]
    return {k: float(np.mean(size == k)) for k in (1, 2, 3)} | {"4+": float(np.mean(size >= 4))}


def pairwise_f(a, b):
    """Pairwise F of partition b against partition a (pairs counted exactly)."""
    def pairs(counts):
        counts = counts.astype(np.float64)
        return float((counts * (counts - 1) / 2).sum())

    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    _, joint = np.unique(ia.astype(np.int64) * (int(ib.max()) + 1) + ib, return_counts=True)
    both = pairs(joint)
    precision = both / max(pairs(np.bincount(ib)), 1.0)
    recall = both / max(pairs(np.bincount(ia)), 1.0)
    return 2 * precision * recall / max(precision + recall, 1e-12)


def child_result(cmd: list[str], what: str) -> dict | None:
    """Run a child of this script (`cmd`): its RESULT line's JSON, or None
    after saying why it has none (its exit status and the end of its stderr)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(f"{what}: failed (rc={proc.returncode})\n{proc.stderr[-2000:]}")
        return None
    return json.loads(lines[-1][7:])


def same_photo_child(n, threshold, method, real, cache_path, rounds):
    """--same-photo at one size, in one process: N faces in photos, clustered
    without the rule and with it, `rounds` times each, alternating which goes
    first (the machine's other work moves a single time by half); prints a
    RESULT line with each side's quickest run and the peak memory after each
    side's first run (the rule's first: a rise is its own memory)."""
    sys.path.insert(0, ROOT)
    import sort_faces

    if real:
        X, truth = make_real(n, cache_path)
        circle = np.arange(int(truth.max()) + 1) // 21  # a copy's 21 people: one circle
    else:
        X, truth, circle = make_faces(n, circles=True)
    photo = photos_of(truth, circle)
    sides = {False: [], True: []}
    base_mb, peaks = peak_mb(), {}
    for round_ in range(rounds):
        for rule in ((False, True) if round_ % 2 == 0 else (True, False)):
            t0, c0 = time.perf_counter(), time.process_time()
            pairs, counts = sort_faces.same_photo_pairs(photo, X)
            pairs_s = time.perf_counter() - t0
            if not rule:  # without the rule: the clustering's time alone
                t0, c0 = time.perf_counter(), time.process_time()
            labels, info = sort_faces.agglomerative_labels(X, threshold, method=method,
                                                           cannot_link=pairs if rule else None)
            sides[rule].append((time.perf_counter() - t0, time.process_time() - c0, pairs_s,
                                labels, info))
            peaks.setdefault(rule, peak_mb())
    out = {"n": n, "base_mb": base_mb, "photos": int(photo.max()) + 1,
           "multi_face_photos": counts["photos"], "pairs": counts["pairs"],
           "faces_in_multi": int(np.isin(photo, np.flatnonzero(np.bincount(photo) > 1)).sum()),
           "loadavg": os.getloadavg()[0], "rounds": rounds}
    for rule, runs in sides.items():
        wall, cpu, pairs_s, labels, info = min(runs, key=lambda r: r[0])
        precision, recall = sort_faces.bcubed(truth, labels)
        out["with" if rule else "without"] = {
            "seconds": wall, "cpu_seconds": cpu, "all_seconds": [round(r[0], 1) for r in runs],
            "pairs_seconds": pairs_s, "seconds_edges": info["seconds_edges"],
            "seconds_linkage": info["seconds_linkage"], "peak_mb": peaks[rule],
            "bcubed_p": precision, "bcubed_r": recall, "n_clusters": info["n_clusters"],
            "largest_component": info["largest_component"], "method": info["method"],
            "fallback": len(info["fallback_components"]),
            "pairs_in_one_cluster": int((labels[pairs[:, 0]] == labels[pairs[:, 1]]).sum()),
            "kept_apart": info.get("cannot_link", {}).get("kept_apart"),
            "component_pairs": info.get("cannot_link", {}).get("pairs")}
    print("RESULT " + json.dumps(out))


def run_same_photo(args):
    """--same-photo: each size in its own process, without the rule and with it."""
    for n in args.sizes:
        cmd = [sys.executable, os.path.abspath(__file__), str(n), "--same-photo", "--child",
               "--threshold", str(args.threshold), "--method", args.method,
               "--real-cache", args.real_cache, "--rounds", str(args.rounds)] + \
            ["--real"] * args.real
        r = child_result(cmd, f"N={n}")
        if r is None:
            continue
        print(f"N={n:>7}: {r['photos']} photos, {r['multi_face_photos']} with several faces "
              f"({r['faces_in_multi']} faces), {r['pairs']} pairs of faces of one photo; "
              f"threshold {args.threshold}, quickest of {r['rounds']} runs a side, load "
              f"{r['loadavg']:.2f}", flush=True)
        for side in ("without", "with"):
            s = r[side]
            print(f"  {side:>7} the rule: {s['seconds']:6.1f} s (cpu {s['cpu_seconds']:.0f} s; "
                  + (f"the pairs {s['pairs_seconds']:.2f} s, " if side == "with" else "")
                  + f"pairs under the threshold {s['seconds_edges']:.1f} s, linkage "
                  f"{s['seconds_linkage']:.1f} s; runs {s['all_seconds']}), peak "
                  f"{s['peak_mb']:.0f} MB (faces alone {r['base_mb']:.0f} MB), BCubed P/R "
                  f"{s['bcubed_p']:.4f}/{s['bcubed_r']:.4f}, {s['n_clusters']} clusters, "
                  f"largest component {s['largest_component']}, {s['fallback']} by the fallback, "
                  f"{s['method'].split(';')[0]}; "
                  f"{s['pairs_in_one_cluster']} pairs in one cluster"
                  + (f"; {s['component_pairs']} pairs in one component, {s['kept_apart']} "
                     "merges prevented" if side == "with" else ""), flush=True)


def real_child(n, threshold, method, cache_path, save, ann=None, library=False):
    sys.path.insert(0, ROOT)
    import sort_faces

    if ann:  # lists per sqrt(N) : nprobe
        lists, probes = ann.split(":")
        sort_faces.CLUSTER_ANN.update(lists_per_sqrt=float(lists), nprobe=int(probes))
    pairs, extra = None, {}
    if library:  # a library's shape, in photos: the same-photo rule at work
        X, truth, circle = make_library(n, cache_path)
        photo = photos_of(truth, circle)
        t0 = time.perf_counter()
        pairs, counts = sort_faces.same_photo_pairs(photo, X)
        extra = {"shape": library_shape(truth), "photos": int(photo.max()) + 1,
                 "multi_face_photos": counts["photos"], "pairs": counts["pairs"],
                 "pairs_seconds": time.perf_counter() - t0}
        del photo
    else:
        X, truth = make_real(n, cache_path)
    base_mb = peak_mb()
    t0 = time.perf_counter()
    labels, info = sort_faces.agglomerative_labels(X, threshold, method=method, cannot_link=pairs)
    wall = time.perf_counter() - t0
    precision, recall = sort_faces.bcubed(truth, labels)
    if save:
        np.save(save, labels)
    out = {"n": n, "threshold": threshold, "seconds": wall, "base_mb": base_mb,
           "peak_mb": peak_mb(), "bcubed_p": precision, "bcubed_r": recall,
           "bcubed_f": 2 * precision * recall / (precision + recall), "method": info["method"],
           "candidate_recall": info.get("candidate_recall"), "n_clusters": info["n_clusters"],
           "seconds_edges": info["seconds_edges"], "seconds_linkage": info["seconds_linkage"],
           "largest_component": info["largest_component"], "loadavg": os.getloadavg()[0],
           "stages": info.get("stages", []), "cannot_link": info.get("cannot_link"), **extra}
    if pairs is not None:
        out["pairs_in_one_cluster"] = int((labels[pairs[:, 0]] == labels[pairs[:, 1]]).sum())
    print("RESULT " + json.dumps(out))


def run_real(args):
    import tempfile

    for n in args.sizes:
        methods = ["exact", *(f"ann={g}" for g in args.grid)] if args.grid else \
            ["exact", "ann"] if args.compare else [args.method]
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            for method in methods:
                save = os.path.join(tmp, f"{method.replace(':', '_')}.npy")
                cmd = [sys.executable, os.path.abspath(__file__), str(n), "--real", "--child",
                       "--threshold", str(args.threshold), "--method", method.split("=")[0],
                       "--real-cache", args.real_cache, "--save", save]
                cmd += ["--ann-params", method.split("=")[1]] if "=" in method else []
                cmd += ["--library"] if args.library else []
                r = child_result(cmd, f"N={n} {method}")
                if r is None:
                    continue
                results[method] = r
                r["labels"] = np.load(save)
                print(f"N={n:>8} {method:>5}: {r['seconds']:7.1f} s (pairs {r['seconds_edges']:.1f}"
                      f" s, linkage {r['seconds_linkage']:.1f} s), peak {r['peak_mb']:6.0f} MB "
                      f"(faces alone {r['base_mb']:.0f} MB), BCubed P/R/F {r['bcubed_p']:.4f}/"
                      f"{r['bcubed_r']:.4f}/{r['bcubed_f']:.4f}, {r['n_clusters']} clusters, "
                      f"largest component {r['largest_component']}, load {r['loadavg']:.2f}; "
                      f"{r['method']}"
                      + (f", candidate recall {r['candidate_recall']:.5f}"
                         if r["candidate_recall"] is not None else ""), flush=True)
                if "shape" in r:
                    print(f"    library: faces in people of 1/2/3/4+: " + "/".join(
                        f"{v:.3f}" for v in r["shape"].values()) + f"; {r['photos']} photos, "
                        f"{r['multi_face_photos']} with several faces, {r['pairs']} same-photo "
                        f"pairs ({r['pairs_seconds']:.1f} s), {r['cannot_link']['pairs']} in one "
                        f"component, {r['cannot_link']['kept_apart']} merges prevented, "
                        f"{r['pairs_in_one_cluster']} in one cluster", flush=True)
                if r["stages"]:
                    print("    stages: " + ", ".join(f"{st['stage']} {st['seconds']:.1f} s "
                                                      f"(RSS {st['rss_mb']:.0f} MB)"
                                                      for st in r["stages"]), flush=True)
        for name, b in results.items():
            if name == "exact" or "exact" not in results:
                continue
            a = results["exact"]
            print(f"N={n:>8} {name} against exact: pairwise F "
                  f"{pairwise_f(a['labels'], b['labels']):.6f}, clusters {b['n_clusters']} vs "
                  f"{a['n_clusters']} "
                  f"({100 * abs(b['n_clusters'] - a['n_clusters']) / a['n_clusters']:.3f}% apart)",
                  flush=True)


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(n, threshold, check_sklearn, max_component):
    agglomerative_labels = load_agglomerative_labels()
    t0 = time.perf_counter()
    X, truth = make_faces(n)
    gen_s = time.perf_counter() - t0
    base_mb = peak_mb()
    t0 = time.perf_counter()
    kwargs = {"max_component": max_component} if max_component else {}
    labels, info = agglomerative_labels(X, threshold, **kwargs)
    wall = time.perf_counter() - t0
    cluster_peak = peak_mb()
    out = {"n": n, "threshold": threshold, "seconds": wall, "gen_seconds": gen_s,
           "base_mb": base_mb, "peak_mb": cluster_peak,
           "cpu_seconds": time.process_time(), "loadavg": os.getloadavg()[0]}
    out.update({k: v for k, v in info.items() if k != "seconds"})
    from sklearn.metrics import adjusted_rand_score

    out["ari_vs_truth"] = adjusted_rand_score(truth, labels)
    if check_sklearn and n <= 20000:
        from sklearn.cluster import AgglomerativeClustering

        t0 = time.perf_counter()
        ref = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                      distance_threshold=threshold).fit_predict(X)
        out["sklearn_seconds"] = time.perf_counter() - t0
        out["ari_vs_sklearn"] = adjusted_rand_score(ref, labels)
    print("RESULT " + json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sizes", nargs="*", type=int, default=[10000, 100000, 300000])
    ap.add_argument("--threshold", type=float, default=0.6)
    ap.add_argument("--sklearn", action="store_true")
    ap.add_argument("--max-component", type=int, default=0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--real", action="store_true", help="faces of real structure (see above)")
    ap.add_argument("--method", default="auto", choices=["auto", "exact", "ann"])
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--real-cache", default="/tmp/face-sets-bench-real.npz")
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ann-params", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--same-photo", action="store_true",
                    help="faces in photos: clustered without the same-photo rule and with it")
    ap.add_argument("--library", action="store_true",
                    help="with --real: a library's shape (LIBRARY_KEEP: 31%% of faces people "
                         "seen once), in photos, clustered with the same-photo rule")
    ap.add_argument("--rounds", type=int, default=2,
                    help="with --same-photo: runs a side (the quickest is kept)")
    ap.add_argument("--grid", nargs="+", default=None, metavar="LISTS:NPROBE",
                    help="with --real: the exact path, then the index at each lists-per-sqrt(N)"
                         ":nprobe, each against exact")
    args = ap.parse_args()
    if args.same_photo:
        if args.threshold == 0.6 and "--threshold" not in sys.argv and args.real:
            args.threshold = 0.55  # cluster's default
        if args.child:
            same_photo_child(args.sizes[0], args.threshold, args.method, args.real,
                             args.real_cache, args.rounds)
        else:
            if args.real:
                real_faces(args.real_cache)  # embedded once, before the timed children
            run_same_photo(args)
        return
    if args.real:
        if args.child:
            real_child(args.sizes[0], args.threshold, args.method, args.real_cache, args.save,
                       args.ann_params, args.library)
        else:
            if args.threshold == 0.6 and "--threshold" not in sys.argv:
                args.threshold = 0.55  # cluster's default
            real_faces(args.real_cache)  # embedded once, before the timed children
            run_real(args)
        return
    if args.child:
        child(args.sizes[0], args.threshold, args.sklearn, args.max_component)
        return
    for n in args.sizes:
        cmd = [sys.executable, os.path.abspath(__file__), str(n), "--child",
               "--threshold", str(args.threshold), "--max-component", str(args.max_component)]
        cmd += ["--sklearn"] if args.sklearn else []
        r = child_result(cmd, f"N={n}")
        if r is None:
            continue
        fb = "; ".join(f"{f['size']} faces -> {f['method']} (exact={f['exact']}, "
                       f"{f['rnn_rounds']} rnn rounds, {f['groups']} dense groups)"
                       for f in r["fallback_components"]) or "none"
        print(f"N={n:>7}  t={r['threshold']}  time {r['seconds']:7.1f} s "
              f"(edges {r['seconds_edges']:.1f} s, linkage {r['seconds_linkage']:.1f} s)  "
              f"peak {r['peak_mb']:7.0f} MB (after data {r['base_mb']:.0f} MB)  "
              f"cpu {r['cpu_seconds']:.0f} s  load {r['loadavg']:.2f}")
        print(f"         clusters {r['n_clusters']}  components {r['n_components']}  "
              f"largest {r['largest_component']}  edges {r['n_edges']}  "
              f"ARI vs truth {r['ari_vs_truth']:.4f}"
              + (f"  ARI vs sklearn {r['ari_vs_sklearn']:.6f} (sklearn {r['sklearn_seconds']:.1f} s)"
                 if "ari_vs_sklearn" in r else "")
              + f"  fallback: {fb}", flush=True)


if __name__ == "__main__":
    main()
