"""How long `review OUT` takes from a click to the updated page, on a cluster
output of about 1,000 people (issue 29).

    .venv/bin/python tests/benchmarks/measure_review_app.py [--people 1000] [--merges 5]
        [--keep DIR]

Builds a cache of the shared photos (five_celebs and lfw10, embedded once)
copied until it holds about --people people: each copy's photos are hard
links in a folder of their own, given an identity of their own (the sha256
of the copy's name and the photo's), and each copy's faces are turned by a
random orthogonal matrix of their own (a new set of people with the same
inner distances, as bench_cluster.py --real makes them). Clusters it at the
defaults (--link copy, as a user's; --link symlink for an output of links), starts `review OUT`
as a user does, opens the page in headless Chromium and merges two people
--merges times, by keys (select their rows' buttons, then m), each time
timing from the keypress to the page showing the rebuilt output: the
decision's POST (`people`: the rebuild), the page's fetch (the app's page of
the new build) and the swap of <main> in the browser. Not collected by pytest.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "faces"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import sort_faces  # noqa: E402

SETS = ("five_celebs", "lfw10")


def real_cache(folder: Path) -> Path:
    cache = folder / "real.npz"
    if not cache.exists():
        for name in SETS:
            sort_faces.embed(DATA / name, cache, model="buffalo_s", quiet=True)
    return cache


def copied_cache(real: Path, copies: int, folder: Path) -> Path:
    """`copies` copies of the real cache's photos and faces in one cache (see
    the module's docstring)."""
    cache = sort_faces.load_cache(real)
    files, faces, paths = ({key: cache[key] for key in table}
                           for table in sort_faces.TABLES.values())
    rng = np.random.default_rng(0)
    size = cache.embedding_size
    made = sort_faces.FaceCache(dict(cache.meta))
    made.meta.pop("journal_applied", None)
    for copy in range(copies):
        root = folder / "photos" / f"copy_{copy:03d}"
        rename, sha = {}, {}
        for path, digest in zip(files["files"], files["sha256"]):
            target = root / Path(path).relative_to(DATA)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.link(path, target)
            rename[path] = str(target)
            sha[digest] = hashlib.sha256(f"{copy}:{digest}".encode()).hexdigest()
        q, r = np.linalg.qr(rng.standard_normal((size, size)))
        turn = (q * np.sign(np.diag(r))).astype(np.float32)
        made.append({**files, "files": np.array([rename[p] for p in files["files"]]),
                     "sha256": np.array([sha[s] for s in files["sha256"]])})
        made.append({**faces, "embeddings": faces["embeddings"] @ turn,
                     "face_file": faces["face_file"] + copy * len(files["files"])})
        made.append({**paths, "path_seen": np.array([rename.get(p, p) for p in paths["path_seen"]]),
                     "path_sha256": np.array([sha.get(s, s) for s in paths["path_sha256"]])})
    out = folder / "copies.npz"
    sort_faces.save_cache(out, made)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", type=int, default=1000)
    parser.add_argument("--merges", type=int, default=5)
    parser.add_argument("--keep", type=Path, default=None, help="work here, and keep it")
    parser.add_argument("--link", default="copy", choices=("copy", "symlink", "hardlink"),
                        help="the output's --link (copy: the default a user gets)")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="measure-review-"))
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FACESETS_LOG_DIR", str(folder / "logs"))
    real = real_cache(folder)
    per_copy = len(sort_faces.cluster(real, folder / "one", quiet=True)["clusters"])
    copies = max(1, round(args.people / per_copy))
    cache = copied_cache(real, copies, folder)
    out = folder / "raw"
    started = time.perf_counter()
    manifest = sort_faces.cluster(cache, out, link=args.link, quiet=True)
    built = time.perf_counter() - started
    page = (out / "index.html").stat().st_size
    print(f"output: {len(manifest['clusters'])} people, {manifest['summary']['faces']} faces "
          f"({copies} copies of {', '.join(SETS)}, --link {args.link}); first cluster with "
          f"thumbnails {built:.1f} s; "
          f"index.html {page / 1e6:.1f} MB")
    from browser import selenium_chromium
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = subprocess.Popen([sys.executable, str(ROOT / "sort_faces.py"), "review", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    url = re.search(r"(http://\S+)", server.stdout.readline()).group(1)
    driver = selenium_chromium(tempfile.mkdtemp(prefix="measure-review-profile-"))
    try:
        started = time.perf_counter()
        driver.get(url)
        WebDriverWait(driver, 300).until(lambda d: d.execute_script(
            "return document.readyState") == "complete")
        print(f"first load of the app's page: {time.perf_counter() - started:.2f} s")
        driver.execute_script("""
            window.__clicked = 0; window.__shown = 0;
            document.addEventListener('keydown', function(){ window.__clicked = performance.now(); },
                                      true);
            new MutationObserver(function(){
              if (document.getElementById('app-status').className === 'ok')
                window.__shown = performance.now();
            }).observe(document.getElementById('app-status'), {attributes: true, childList: true});
        """)
        rows = []
        names = [e["name"] for e in manifest["clusters"]]
        for merge in range(args.merges):
            pair = names[100 + 2 * merge:102 + 2 * merge]  # two people in the middle of the page
            driver.execute_script("performance.clearResourceTimings(); window.__shown = 0;")
            for name in pair:
                driver.execute_script("arguments[0].click()", driver.find_element(
                    By.CSS_SELECTOR, f'main button.pick[data-person="{name}"]'))
            driver.find_element(By.TAG_NAME, "body").send_keys("m")
            WebDriverWait(driver, 600, 0.02).until(lambda d: d.execute_script(
                "return window.__shown > 0"))
            timing = driver.execute_script("""
                var r = performance.getEntriesByType('resource');
                function took(path){ var e = r.filter(function(x){
                  return new URL(x.name).pathname === path; }).pop();
                  return e ? e.duration : null; }
                return {total: window.__shown - window.__clicked, post: took('/api/decide'),
                        page: took('/')};""")
            timing["swap"] = timing["total"] - timing["post"] - timing["page"]
            rows.append(timing)
            print(f"merge {' '.join(pair)}: click to updated page {timing['total'] / 1000:.2f} s "
                  f"(decision: the rebuild {timing['post'] / 1000:.2f} s, the new page "
                  f"{timing['page'] / 1000:.2f} s, its swap {timing['swap'] / 1000:.2f} s)")
            driver.find_element(By.TAG_NAME, "body").send_keys("\ue00c")  # Escape
        total = sorted(r["total"] for r in rows)
        print(f"median click to updated page over {len(rows)} merges: "
              f"{total[len(total) // 2] / 1000:.2f} s")
    finally:
        driver.quit()
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
