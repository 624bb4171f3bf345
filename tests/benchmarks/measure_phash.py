"""Measure perceptual-hash distances on real photos to choose a default threshold.

For every photo under ``<data-dir>/{five_celebs,lfw10,face_recognition}/<identity>/``
(jpg/png; the folder name is the identity) this script

* writes edited variants to a temporary directory and reads them back
  (JPEG quality 30 re-encode, half-size resize, 3 % crop in total i.e. 1.5 %
  per side, 3 % crop on every side, 3 % crop of the left edge only, PNG round
  trip, brightness x1.1 and +25 levels), and reports the Hamming distance
  from the original's hash to each variant's hash (max, 99th percentile,
  mean, per variant and overall);
* reports the distances between different photos of the same identity and
  between photos of different identities (min, 1st percentile, 5th
  percentile, median) and lists the closest pairs;
* prints, per threshold, the fraction of variants caught and of
  different-photo pairs wrongly caught, and recommends the default
  threshold: the middle of the widest gap between the variants' 99th
  percentile and the smallest different-identity distance.

The data directory is only read.  Usage::

    .venv/bin/python tests/benchmarks/measure_phash.py [--data-dir DIR]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data" / "faces"
SUBSETS = ("five_celebs", "lfw10", "face_recognition")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def load_hash_module():
    sys.path.insert(0, str(PROJECT_ROOT))
    import sort_faces

    return sort_faces, "sort_faces"


def list_photos(data_dir):
    """Return sorted (path, identity) pairs of the labelled photos."""
    photos = []
    for subset in SUBSETS:
        for path in sorted((data_dir / subset).glob("*/*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                photos.append((path, f"{subset}/{path.parent.name}"))
    return photos


def crop(img, top, bottom, left, right):
    """Crop fractions of the height/width from each side."""
    h, w = img.shape[:2]
    return img[int(round(h * top)):h - int(round(h * bottom)),
               int(round(w * left)):w - int(round(w * right))]


def write_variants(img, tmp, stem):
    """Write edited copies of img into tmp; return {name: path}.

    Geometric and brightness edits are saved as PNG so that each variant
    isolates one edit; the JPEG variant isolates compression.
    """
    h, w = img.shape[:2]
    edits = {
        "jpeg_q30": (img, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 30]),
        "half_size": (cv2.resize(img, (max(1, w // 2), max(1, h // 2)),
                                 interpolation=cv2.INTER_AREA), ".png", []),
        "crop_3pct_total": (crop(img, .015, .015, .015, .015), ".png", []),
        "crop_3pct_each_side": (crop(img, .03, .03, .03, .03), ".png", []),
        "crop_3pct_left": (crop(img, 0, 0, .03, 0), ".png", []),
        "png_roundtrip": (img, ".png", []),
        "brightness_x1.1": (np.clip(img.astype(np.float32) * 1.1, 0, 255)
                            .astype(np.uint8), ".png", []),
        "brightness_+25": (cv2.add(img, np.full_like(img, 25)), ".png", []),
    }
    paths = {}
    for name, (data, suffix, params) in edits.items():
        path = Path(tmp) / f"{stem}__{name}{suffix}"
        if not cv2.imwrite(str(path), data, params):
            raise RuntimeError(f"could not write {path}")
        paths[name] = path
    return paths


def popcount(values):
    """Number of set bits of each uint64."""
    values = np.asarray(values, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values).astype(np.int64)
    return np.array([bin(int(v)).count("1") for v in values.ravel()],
                    dtype=np.int64).reshape(values.shape)


def describe_upper(d):
    d = np.asarray(d)
    return (f"n={len(d):6d}  max={d.max():3d}  p99={np.percentile(d, 99):5.1f}"
            f"  p95={np.percentile(d, 95):5.1f}  mean={d.mean():5.2f}")


def describe_lower(d):
    d = np.asarray(d)
    return (f"n={len(d):6d}  min={d.min():3d}  p1={np.percentile(d, 1):5.1f}"
            f"  p5={np.percentile(d, 5):5.1f}  median={np.median(d):5.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--closest", type=int, default=8,
                        help="how many closest different-photo pairs to list")
    args = parser.parse_args(argv)

    mod, label = load_hash_module()
    phash = mod.perceptual_hash
    photos = list_photos(args.data_dir)
    if not photos:
        sys.exit(f"no photos found under {args.data_dir}")
    print(f"perceptual_hash from {label}; {len(photos)} photos, "
          f"{len({i for _, i in photos})} identities")

    hashes = np.zeros(len(photos), dtype=np.uint64)
    variant_d = {}
    with tempfile.TemporaryDirectory(prefix="measure_phash_") as tmp:
        for k, (path, _) in enumerate(photos):
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if img is None:
                sys.exit(f"cannot read {path}")
            hashes[k] = phash(img)
            for name, vpath in write_variants(img, tmp, f"{k:04d}").items():
                vimg = cv2.imread(str(vpath), cv2.IMREAD_COLOR)
                d = int(popcount(hashes[k] ^ np.uint64(phash(vimg))))
                variant_d.setdefault(name, []).append(d)
                vpath.unlink()

    print("\nDistance original -> edited variant")
    for name, d in variant_d.items():
        print(f"  {name:22s} {describe_upper(d)}")
    all_variants = np.concatenate([np.asarray(v) for v in variant_d.values()])
    mild = np.concatenate([np.asarray(v) for k, v in variant_d.items()
                           if k != "crop_3pct_each_side"])
    print(f"  {'ALL variants':22s} {describe_upper(all_variants)}")
    print(f"  {'ALL but 3% each side':22s} {describe_upper(mild)}")

    ids = np.array([i for _, i in photos])
    iu, ju = np.triu_indices(len(photos), 1)
    dist = popcount(hashes[iu] ^ hashes[ju])
    same = ids[iu] == ids[ju]
    print("\nDistance between different photos")
    print(f"  {'same identity':22s} {describe_lower(dist[same])}")
    print(f"  {'different identity':22s} {describe_lower(dist[~same])}")

    def name(k):
        return str(photos[k][0].relative_to(args.data_dir))

    for title, sel in (("same identity", same), ("different identity", ~same)):
        idx = np.flatnonzero(sel)
        idx = idx[np.argsort(dist[idx], kind="stable")][:args.closest]
        print(f"  closest {title} pairs:")
        for q in idx:
            print(f"    {dist[q]:3d}  {name(iu[q])}  {name(ju[q])}")

    print("\nThreshold t: % variants <= t (all / 3%-each-side crop) | "
          "% different-photo pairs <= t (same id / different id)")
    crop_each = np.asarray(variant_d["crop_3pct_each_side"])
    for t in range(0, 25, 2):
        print(f"  t={t:2d}  {100 * np.mean(all_variants <= t):6.2f} / "
              f"{100 * np.mean(crop_each <= t):6.2f}  |  "
              f"{100 * np.mean(dist[same] <= t):6.3f} / "
              f"{100 * np.mean(dist[~same] <= t):6.3f}")

    low = float(np.percentile(all_variants, 99))
    high = int(dist[~same].min())
    if low < high:
        default = int(np.floor((low + high - 1) / 2.0))
        default = max(default, int(np.ceil(low)))
        print(f"\nGap: variants p99 = {low:g} < smallest different-identity "
              f"distance = {high}; recommended default max_distance = "
              f"{default}")
    else:
        default = int(np.ceil(low))
        print(f"\nNo gap: variants p99 = {low:g} >= smallest "
              f"different-identity distance = {high}; using the variants' "
              f"p99, default max_distance = {default}")
    caught_same = np.flatnonzero(same & (dist <= default))
    print(f"At {default}: {100 * np.mean(all_variants <= default):.2f} % of "
          f"all variants caught, {np.sum(~same & (dist <= default))} "
          f"different-identity pairs and {len(caught_same)} same-identity "
          f"pairs within it:")
    for q in caught_same:
        print(f"    {dist[q]:3d}  {name(iu[q])}  {name(ju[q])}")
    current = getattr(mod, "PHASH_DEFAULT_MAX_DISTANCE", None)
    if current is not None:
        print(f"PHASH_DEFAULT_MAX_DISTANCE in {label} = {current}")


if __name__ == "__main__":
    main()
