"""Faces that share a photo are different people (issue 30): what the rule
gains on group photos of look-alikes, what it costs on the shared photos as
they are, and where a mirror pair (one face seen twice in one photo) lies.

    .venv/bin/python tests/benchmarks/measure_same_photo.py [--work DIR]
        [--composites N] [--thresholds 0.55 0.65 0.75]

All in a temporary folder (or DIR, kept, so a second run reuses its caches),
every image embedded with the real model (`sort_faces.py embed`, buffalo_s):

1. The labeled sets (five_celebs, lfw10, face_recognition) as they are; each
   photo's main face (its largest) carries its folder's identity.
   Distinct people: the cosine similarity of every pair of main faces of two
   identities (the highest is the bar a mirror must clear).
2. The look-alikes clustering merges today: the main faces clustered at the
   loosest threshold; in each cluster holding two identities, the most
   similar pair of faces of two identities. Each such pair (and, where a
   third identity's face is nearest, a third face) is cut out of its photos
   and pasted side by side into one composite: a group photo of look-alikes.
   The corpus: every single photo but the composites' sources, and the
   composites; each person is also in their single photos. Clustered before
   (no rule) and after, at each threshold: BCubed precision and recall of
   the labeled faces (single photos' main faces and every composite face),
   and how many composite faces share a person with their look-alike.
3. The shared photos as they are (the three sets and group_photos): the same,
   before and after, scored on the main faces and on every face labelled by
   its folder (as docs/benchmarks.md's quality table).
4. Mirror pairs: each main face beside its horizontal flip, smaller and
   dimmer (a mirror), beside itself again a little smaller (a collage of one
   picture, a screen), and beside a small, turned, blurred, re-compressed
   print of itself (a photo of a photo): the similarity of the two faces.
   Two faces of one composite (distinct people in one photo) for contrast.

Prints every figure; SAME_PHOTO_MIRROR_SIMILARITY is chosen from them (the
rule takes a pair at or above it for one face seen twice). Not collected by
pytest.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "faces"
SETS = ("five_celebs", "lfw10", "face_recognition")
sys.path.insert(0, str(ROOT))
import sort_faces  # noqa: E402

CROP_HEIGHT = 224  # px: each face of a mirror image, padded (a composite's: --crop-px)
PAD = 0.55  # share of the face box's longer side added on each side of a crop


def embed(src: Path, cache: Path) -> None:
    """`sort_faces.py embed SRC CACHE` with the offline model (new images only)."""
    subprocess.run([sys.executable, str(ROOT / "sort_faces.py"), "embed", str(src), str(cache),
                    "--model", "buffalo_s", "--quiet"], cwd=ROOT, check=True)


def copy_sets(target: Path, skip=frozenset()) -> None:
    """The labeled sets' photos under target/<set>/<identity>/, but those of
    `skip` (paths as set/identity/name)."""
    for name in SETS:
        for photo in sorted((DATA / name).glob("*/*")):
            if photo.suffix.lower() in sort_faces.IMAGE_EXTENSIONS and \
                    f"{name}/{photo.parent.name}/{photo.name}" not in skip:
                folder = target / name / photo.parent.name
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copy2(photo, folder / photo.name)


def main_faces(cache) -> tuple[np.ndarray, list[str], list[str]]:
    """Each photo's largest face: (face indexes, identities, source paths)."""
    boxes = cache["bbox"]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    best: dict[int, int] = {}
    for face, row in enumerate(cache["face_file"]):
        if int(row) not in best or area[face] > area[best[int(row)]]:
            best[int(row)] = face
    faces = np.array(sorted(best.values()), np.int64)
    paths = [str(cache["files"][cache["face_file"][f]]) for f in faces]
    return faces, [Path(p).parent.name for p in paths], paths


def crop(path: str, box, side_px: int = CROP_HEIGHT) -> np.ndarray:
    """The face with its surroundings in a square `side_px` px wide (BGR)."""
    bgr, width, _height = sort_faces.decode_image(path)
    scale = bgr.shape[1] / width
    x1, y1, x2, y2 = (float(v) * scale for v in box)
    half = max(x2 - x1, y2 - y1) * (0.5 + PAD)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    padded = cv2.copyMakeBorder(bgr, 400, 400, 400, 400, cv2.BORDER_CONSTANT,
                                value=(150, 160, 170))  # a wall: a reflection would copy the face
    left, top = int(round(cx - half)) + 400, int(round(cy - half)) + 400
    side = int(round(2 * half))
    return cv2.resize(padded[top:top + side, left:left + side], (side_px, side_px),
                      interpolation=cv2.INTER_AREA)


def side_by_side(parts: list[np.ndarray], gap: int = 40) -> tuple[np.ndarray, list[tuple]]:
    """One image of the parts in a row on a grey wall, bottoms aligned, and
    each part's x range."""
    height = max(p.shape[0] for p in parts) + 2 * gap
    width = sum(p.shape[1] for p in parts) + gap * (len(parts) + 1)
    canvas = np.full((height, width, 3), (150, 160, 170), np.uint8)
    x, ranges = gap, []
    for part in parts:
        top = height - gap - part.shape[0]
        canvas[top:top + part.shape[0], x:x + part.shape[1]] = part
        ranges.append((x, x + part.shape[1]))
        x += part.shape[1] + gap
    return canvas, ranges


def mirror_of(face: np.ndarray) -> np.ndarray:
    """The face as a mirror shows it: flipped, a little smaller and dimmer."""
    flipped = cv2.flip(face, 1)
    small = cv2.resize(flipped, None, fx=0.85, fy=0.85, interpolation=cv2.INTER_AREA)
    return np.clip(small.astype(np.float32) * 0.82 + 8, 0, 255).astype(np.uint8)


def copy_of(face: np.ndarray) -> np.ndarray:
    """The same shot again, a little smaller (a collage of one picture, a screen)."""
    small = cv2.resize(face, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 75])
    return cv2.imdecode(jpeg, cv2.IMREAD_COLOR)


def print_of(face: np.ndarray) -> np.ndarray:
    """The face as a photo of it shows it: a small print with a white border,
    turned, blurred, re-compressed, colour cast."""
    small = cv2.resize(face, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    framed = cv2.copyMakeBorder(small, 8, 8, 8, 8, cv2.BORDER_CONSTANT, value=(245, 245, 245))
    h, w = framed.shape[:2]
    turn = cv2.getRotationMatrix2D((w / 2, h / 2), 7, 1.0)
    turned = cv2.warpAffine(framed, turn, (w, h), borderMode=cv2.BORDER_CONSTANT,
                            borderValue=(150, 160, 170))
    blurred = cv2.GaussianBlur(turned, (0, 0), 0.9)
    cast = np.clip(blurred.astype(np.float32) * (0.92, 0.97, 1.05) + 4, 0, 255).astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", cast, [cv2.IMWRITE_JPEG_QUALITY, 40])
    return cv2.imdecode(jpeg, cv2.IMREAD_COLOR)


KINDS = (("mirror", mirror_of), ("copy", copy_of), ("print", print_of))


def look_alike_pairs(X, who, faces, loosest: float, wanted: int) -> list[tuple[int, ...]]:
    """Composites' faces (indexes into `faces`): in each cluster of the main
    faces at `loosest` holding several identities, its most similar pairs of
    faces of two identities (each photo used once), most similar first; every
    third composite, the face of a third identity nearest the pair joins."""
    labels, _ = sort_faces.agglomerative_labels(X, loosest)
    S = X @ X.T
    candidates = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len({who[m] for m in members}) < 2:
            continue
        for i in members:
            for j in members:
                if i < j and who[i] != who[j]:
                    candidates.append((float(S[i, j]), int(i), int(j)))
    used, chosen = set(), []
    for similarity, i, j in sorted(candidates, reverse=True):
        if i in used or j in used or len(chosen) >= wanted:
            continue
        group = [i, j]
        others = [k for k in range(len(faces)) if k not in used and k not in group
                  and who[k] not in (who[i], who[j])]
        if len(chosen) % 3 == 2 and others:  # every third composite: three people
            third = max(others, key=lambda k: S[i, k] + S[j, k])
            group.append(third)
        used.update(group)
        chosen.append(tuple(group))
    return chosen


def labelled_composite_faces(cache, layout: dict) -> dict[int, str]:
    """{face: identity} of the composites' faces: in each pasted part, the
    largest face whose box centre lies in it (a smaller one is someone beside
    the person in the source photo: not scored)."""
    best: dict[tuple, tuple[float, int, str]] = {}
    for face, row in enumerate(cache["face_file"]):
        path = str(Path(str(cache["files"][row])).resolve())
        x1, y1, x2, y2 = (float(v) for v in cache["bbox"][face])
        for part, ((x0, x_end), identity) in enumerate(layout.get(path, [])):
            if x0 <= (x1 + x2) / 2 < x_end:
                area = (x2 - x1) * (y2 - y1)
                if (path, part) not in best or area > best[(path, part)][0]:
                    best[(path, part)] = (area, face, identity)
    return {face: identity for _area, face, identity in best.values()}


def merged_from(X, group, steps) -> str:
    """The lowest threshold of `steps` at which clustering the main faces `X`
    today puts two faces of the group in one person."""
    for threshold in steps:
        labels, _ = sort_faces.agglomerative_labels(X, threshold)
        if len({int(labels[k]) for k in group}) < len(group):
            return f"merged today from {threshold:.2f}"
    return f"not merged today up to {steps[-1]:.2f}"


def partition(cache, threshold: float, same_photo: bool) -> tuple[np.ndarray, dict]:
    """Each face's person (a singleton its own) as `cluster` makes them."""
    none = {"together": [], "apart": [], "apart_only": [], "rejected": [], "names": []}
    people, singles, _rejected, info = sort_faces.constrained_people(cache, threshold, none,
                                                                     same_photo=same_photo)
    labels = np.empty(cache.n_faces, np.int64)
    for index, faces in enumerate(people):
        labels[faces] = index
    labels[singles] = len(people) + np.arange(len(singles))
    return labels, info


def scores(cache, scored: dict[int, str], thresholds, extra=None) -> None:
    """BCubed before and after at each threshold (and `extra`: a line's more)."""
    faces = np.array(sorted(scored), np.int64)
    truth = [scored[f] for f in faces]

    def canonical(labels):  # a partition of the scored faces, whatever its numbers
        _, first, inverse = np.unique(labels[faces], return_index=True, return_inverse=True)
        return np.argsort(np.argsort(first))[inverse.ravel()]

    for threshold in thresholds:
        row, partitions = [], []
        for same_photo in (False, True):
            labels, info = partition(cache, threshold, same_photo)
            partitions.append(canonical(labels))
            precision, recall = sort_faces.bcubed(truth, labels[faces])
            more = f", {extra(labels)}" if extra else ""
            row.append(f"P/R {precision:.3f}/{recall:.3f}{more}"
                       + (f", {info['same_photo_apart']} prevented" if same_photo else ""))
        same = "the same partition" if np.array_equal(*partitions) else "partitions differ"
        print(f"  {threshold:.2f}: before {row[0]}   after {row[1]}   ({same})")


def quantiles(values) -> str:
    values = np.sort(np.asarray(values))
    if not len(values):
        return "none"
    pick = lambda q: values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]  # noqa: E731
    return (f"n {len(values)}, min {values[0]:.3f}, 1% {pick(0.01):.3f}, 5% {pick(0.05):.3f}, "
            f"median {pick(0.5):.3f}, 99% {pick(0.99):.3f}, max {values[-1]:.3f}")


def run(work: Path, wanted: int, thresholds, choose_at: float, crop_px: int) -> None:
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FACESETS_LOG_DIR", str(work / "logs"))  # embed's logs: not in work/
    sets_cache = work / "sets.npz"
    if not sets_cache.exists():
        copy_sets(work / "sets")
        embed(work / "sets", sets_cache)
    cache = sort_faces.load_cache(sets_cache)
    faces, who, paths = main_faces(cache)
    X = np.asarray(cache["embeddings"], np.float32)[faces]
    who_arr = np.array(who)
    S = X @ X.T
    upper = np.triu(np.ones_like(S, bool), 1)
    distinct = S[upper & (who_arr[:, None] != who_arr[None, :])]
    same = S[upper & (who_arr[:, None] == who_arr[None, :])]
    print(f"1. labeled sets: {len(faces)} photos' main faces of {len(set(who))} identities")
    print(f"   distinct people (every pair): {quantiles(distinct)}")
    print(f"   one person, two photos:       {quantiles(same)}")
    print("   one person, two photos, at or above: " + ", ".join(
        f"{100 * np.mean(same >= t):.1f}% at {t}" for t in (0.7, 0.8, 0.85, 0.9)))
    top = sorted(((S[i, j], who[i], who[j], Path(paths[i]).name, Path(paths[j]).name)
                  for i, j in zip(*np.nonzero(upper & (who_arr[:, None] != who_arr[None, :])))),
                 reverse=True)[:5]
    for s, a, b, pa, pb in top:
        print(f"     {s:.3f} {a}/{pa} ~ {b}/{pb}")

    # 2. composites of look-alikes
    steps = [round(0.55 + 0.05 * k, 2) for k in range(int(round((choose_at - 0.55) / 0.05)) + 1)]
    loosest = choose_at
    groups = look_alike_pairs(X, who, faces, loosest, wanted)
    corpus = work / f"corpus-{crop_px}"
    corpus_cache = work / f"corpus-{crop_px}.npz"
    layout: dict[str, list] = {}
    sets_root = (work / "sets").resolve()
    sources = {Path(paths[k]).resolve().relative_to(sets_root).as_posix()
               for g in groups for k in g}
    if not corpus_cache.exists():
        copy_sets(corpus / "singles", skip=sources)
    (corpus / "composites").mkdir(parents=True, exist_ok=True)
    print(f"\n2. {len(groups)} composites of the look-alikes clustering merges today "
          f"(main faces at {loosest}), each face in a {crop_px} px square:")
    for number, group in enumerate(groups):
        parts = [crop(paths[k], cache["bbox"][faces[k]], crop_px) for k in group]
        image, ranges = side_by_side(parts)
        target = corpus / "composites" / f"composite_{number:02d}.jpg"
        if not target.exists():
            cv2.imwrite(str(target), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
        layout[str(target)] = list(zip(ranges, [who[k] for k in group]))
        pairs = ", ".join(f"{S[a, b]:.3f}" for a, b in zip(group, group[1:]))
        print(f"   composite_{number:02d}: {' + '.join(who[k] for k in group)} (similarity "
              f"{pairs}; {merged_from(X, group, steps)})")
    if not corpus_cache.exists():
        embed(corpus, corpus_cache)
    ccache = sort_faces.load_cache(corpus_cache)
    layout = {str(Path(p).resolve()): v for p, v in layout.items()}
    composite_faces = labelled_composite_faces(ccache, layout)
    cfaces, cwho, _cpaths = main_faces(ccache)
    scored = {int(f): w for f, w, p in zip(cfaces, cwho, _cpaths)
              if str(Path(p).resolve()) not in layout}
    scored.update(composite_faces)
    by_photo: dict[int, list[int]] = {}
    for face in composite_faces:
        by_photo.setdefault(int(ccache["face_file"][face]), []).append(face)
    found = sum(len(v) for v in by_photo.values())
    print(f"   corpus: {ccache.n_files} photos, {ccache.n_faces} faces; composites' faces found "
          f"{found} of {sum(len(g) for g in groups)}; scored faces {len(scored)}")
    E = np.asarray(ccache["embeddings"], np.float32)
    inside = [float(E[a] @ E[b]) for faces_ in by_photo.values()
              for i, a in enumerate(faces_) for b in faces_[i + 1:]]
    print(f"   two faces of one composite (distinct people in one photo): {quantiles(inside)}")

    def with_look_alike(labels):
        joined = sum(1 for faces_ in by_photo.values() for f in faces_
                     if any(labels[g] == labels[f] for g in faces_ if g != f))
        return f"{joined} composite faces with their look-alike"

    scores(ccache, scored, thresholds, with_look_alike)

    # 3. the shared photos as they are
    asis_cache = work / "asis.npz"
    if not asis_cache.exists():
        shutil.copy2(sets_cache, asis_cache)
        embed(DATA / "group_photos", asis_cache)
    acache = sort_faces.load_cache(asis_cache)
    afaces, awho, apaths = main_faces(acache)
    labelled = {int(f): w for f, w, p in zip(afaces, awho, apaths) if "group_photos" not in p}
    every = {f: Path(str(acache["files"][acache["face_file"][f]])).parent.name
             for f in range(acache.n_faces)
             if "group_photos" not in str(acache["files"][acache["face_file"][f]])}
    pairs, counts = sort_faces.same_photo_pairs(acache["face_file"], acache["embeddings"])
    print(f"\n3. the shared photos as they are: {acache.n_files} photos, {acache.n_faces} faces; "
          f"{counts['photos']} photos with several faces, {counts['pairs']} pairs kept apart, "
          f"{counts['mirror_pairs']} taken for mirrors")
    print(f"   main faces ({len(labelled)}):")
    scores(acache, labelled, thresholds)
    print(f"   every face of the labeled sets, by folder ({len(every)}):")
    scores(acache, every, thresholds)

    # 4. mirror pairs
    mirror_cache = work / "mirrors.npz"
    if not mirror_cache.exists():
        for kind, make in KINDS:
            folder = work / "mirrors" / kind
            folder.mkdir(parents=True, exist_ok=True)
            for k, face in enumerate(faces):
                part = crop(paths[k], cache["bbox"][face])
                image, _ = side_by_side([part, make(part)])
                cv2.imwrite(str(folder / f"{kind}_{k:03d}.jpg"), image,
                            [cv2.IMWRITE_JPEG_QUALITY, 92])
        embed(work / "mirrors", mirror_cache)
    mcache = sort_faces.load_cache(mirror_cache)
    M = np.asarray(mcache["embeddings"], np.float32)
    per_file = sort_faces.faces_by_file(mcache["face_file"], mcache.n_files)
    print(f"\n4. one face seen twice in one photo ({mcache.n_files} images):")
    threshold = sort_faces.SAME_PHOTO_MIRROR_SIMILARITY
    for kind, _make in KINDS:
        sims, missing = [], 0
        for row, found_faces in enumerate(per_file):
            if Path(str(mcache["files"][row])).parent.name != kind:
                continue
            if len(found_faces) < 2:
                missing += 1
                continue
            boxes = mcache["bbox"][found_faces]
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            a, b = found_faces[np.argsort(-area)[:2]]
            sims.append(float(M[a] @ M[b]))
        at = ", ".join(f"{100 * np.mean(np.array(sims) >= t):.1f}% at {t}"
                       for t in (0.6, 0.7, 0.8, 0.85, 0.9))
        print(f"   {kind:6s}: {quantiles(sims)}; {missing} images with one face found")
        print(f"           taken for one face seen twice: {at}; at "
              f"SAME_PHOTO_MIRROR_SIMILARITY {threshold}: "
              f"{100 * np.mean(np.array(sims) >= threshold):.1f}%")
    print(f"   distinct people: highest {max(distinct.max(), max(inside, default=-1)):.3f} "
          f"(every pair of the labeled sets' main faces, and in the composites)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="keep the images and caches here")
    ap.add_argument("--composites", type=int, default=18)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.55, 0.65, 0.75, 0.85, 0.9])
    ap.add_argument("--crop-px", type=int, default=160,
                    help="side of each composite face's square (its face about half of it)")
    ap.add_argument("--choose-at", type=float, default=0.95,
                    help="the look-alikes: people the main faces' clustering merges at this")
    args = ap.parse_args()
    if args.work is not None:
        run(args.work, args.composites, args.thresholds, args.choose_at, args.crop_px)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp), args.composites, args.thresholds, args.choose_at, args.crop_px)


if __name__ == "__main__":
    main()
