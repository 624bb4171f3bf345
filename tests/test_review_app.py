"""`review OUT` (issue 29): every people decision by clicking, in real Chromium
against the server started as a user starts it, each checked in the
manifest, the folders and the decisions file, and kept by a later `cluster`;
then the server's guards, each tried against a running server with nothing
written: the token, the Host header, the origin, state changes only by POST,
files only inside OUT, bad requests, a locked cache, a stale page; SIGTERM
stops it with exit 130."""

import html
import http.client
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sort_faces
from conftest import ROOT


class Server:
    """`sort_faces.py review OUT --port 0` in a process of its own session, as a
    user starts it; the address it prints, and requests made to it as a
    browser (or an attacker) would make them."""

    def __init__(self, out: Path):
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "sort_faces.py"), "review", str(out), "--port", "0"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        line = self.printed(within=60)
        found = re.fullmatch(r"review: .* at (http://127\.0\.0\.1:(\d+)/\?token=([\w-]+))", line)
        assert found, line
        self.url, self.port, self.token = found.group(1), int(found.group(2)), found.group(3)
        self.origin = f"http://127.0.0.1:{self.port}"
        self.cookie = f"facesets_review_{self.port}={self.token}"

    def printed(self, within: float) -> str:
        ready, _, _ = select.select([self.process.stdout], [], [], within)
        if not ready:
            self.process.kill()
            raise AssertionError(f"review printed nothing in {within} s: "
                                 f"{self.process.stderr.read()}")
        return self.process.stdout.readline().strip()

    def request(self, method: str, path: str, body: bytes | None = None, headers=None,
                host: str | None = None, cookie: str | None = "") -> tuple[int, dict, bytes]:
        """(status, headers, body) of one request, sent as written (no path
        normalised; `host` for the Host header; `cookie` None: no cookie,
        "": the right one)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            connection.putheader("Host", host or f"127.0.0.1:{self.port}")
            if cookie is not None:
                connection.putheader("Cookie", cookie or self.cookie)
            for name, value in (headers or {}).items():
                connection.putheader(name, value)
            if body is not None:
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def decide(self, request: dict, headers=None, **options) -> tuple[int, dict]:
        """POST a decision as the page does (same origin, the token in the
        header and the cookie), `headers` overriding; (status, answer)."""
        sent = {"Content-Type": "application/json", "Origin": self.origin,
                "X-Review-Token": self.token, **(headers or {})}
        status, _headers, body = self.request("POST", "/api/decide", json.dumps(request).encode(),
                                              {k: v for k, v in sent.items() if v is not None},
                                              **options)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {"text": body.decode()}

    def fingerprint(self) -> str:
        status, _headers, body = self.request("GET", "/api/state")
        assert status == 200, body
        return json.loads(body)["fingerprint"]

    def stop(self, signum=signal.SIGTERM) -> tuple[int, str, str]:
        self.process.send_signal(signum)
        out, err = self.process.communicate(timeout=60)
        return self.process.returncode, out, err

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.communicate()


def cache_copy(celebs_cache, folder: Path) -> Path:
    """five_celebs' shared cache copied into `folder` (the tests change its
    decisions)."""
    cache = folder / "cache" / "c.npz"
    cache.parent.mkdir(parents=True)
    shutil.copy2(celebs_cache, cache)
    return cache


def clustered_copy(celebs_cache, folder: Path) -> tuple[Path, Path]:
    """cache_copy, clustered in `folder`."""
    cache = cache_copy(celebs_cache, folder)
    sort_faces.cluster(cache, folder / "raw", quiet=True)
    return cache, folder / "raw"


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def owners(manifest: dict) -> dict[int, str]:
    return {f["face"]: e["name"] for e in manifest["clusters"] for f in e["faces"]}


def faces_of(manifest: dict, name: str) -> list[int]:
    return next([f["face"] for f in e["faces"]] for e in manifest["clusters"] if e["name"] == name)


def decided(cache: Path) -> list[dict]:
    return sort_faces.load_decisions(sort_faces.people_path(cache))


def as_decided(out: Path, cache: Path, verbs: list[str]) -> dict:
    """The output after the decisions `verbs`: the decisions file holds them,
    in order; OUT's folders are its people's (named ones named), each with
    the photos its manifest lists, and no other; its manifest is returned."""
    assert [d["verb"] for d in decided(cache)] == verbs
    manifest = manifest_of(out)
    folders = {sort_faces.entry_folder(e["name"], e.get("label")): e for e in manifest["clusters"]}
    assert {p.name for p in out.glob("person_*")} == set(folders)
    for folder, entry in folders.items():
        assert {p.name for p in (out / folder).iterdir()} == set(entry["outputs"]), folder
    return manifest


# --- every decision by clicking, in real Chromium ------------------------------------


def test_every_decision_by_clicking_in_chromium(celebs_cache, tmp_path):
    """name (inline), merge (keys; scroll position kept), accept a suggestion
    (progress shown while the server works), not the same person, move to a
    person (selection kept) and to a new one, name unassigned faces as a new
    person, assign one to its nearest person, reject, not this person (a
    face, two people), split, undo; a rebuild by another run is noticed;
    then a fresh `cluster` keeps every decision."""
    from browser import require_webdriver, selenium_chromium
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    require_webdriver()
    cache, out = clustered_copy(celebs_cache, tmp_path)
    start = manifest_of(out)
    server = Server(out)
    driver = selenium_chromium(str(tmp_path / "profile"))
    verbs: list[str] = []
    find = lambda css: driver.find_element(By.CSS_SELECTOR, css)  # noqa: E731
    finds = lambda css: driver.find_elements(By.CSS_SELECTOR, css)  # noqa: E731
    click = lambda el: driver.execute_script("arguments[0].click()", el)  # noqa: E731  (no scroll)

    def status() -> tuple[str, str]:
        line = find("#app-status")
        return line.text, line.get_attribute("class")

    def settled() -> tuple[str, str]:
        WebDriverWait(driver, 60, 0.05).until(
            lambda d: "busy" not in d.find_element(By.TAG_NAME, "body").get_attribute("class"))
        return status()

    def decided_ok(*made: str) -> dict:
        text, kind = settled()
        assert kind == "ok", text
        verbs.extend(made)
        manifest = as_decided(out, cache, verbs)
        assert f"decision {len(verbs)}" in text or f"undid decision" in text, text
        shown = {b.get_attribute("data-person") for b in finds("main button.pick[data-person]")}
        assert shown == {e["name"] for e in manifest["clusters"]}  # the page is the rebuilt OUT
        return manifest

    def press(key: str) -> None:
        find("body").send_keys(key)

    def select_person(name: str) -> None:
        click(find(f'main button.pick[data-person="{name}"]'))

    def select_face(face: int, where: str = "main") -> None:
        click(find(f'{where} [data-face="{face}"]'))

    def selected() -> tuple[set, set]:
        return ({int(el.get_attribute("data-face")) for el in finds("main [data-face].sel")},
                {el.get_attribute("data-person") for el in finds("main button.pick.sel")})

    try:
        driver.get(server.url)
        assert driver.current_url == server.origin + "/"  # the token went into a cookie
        help_text = find("#app-help").text
        for _verb, (label, key, _help) in sort_faces.REVIEW_ACTIONS.items():  # keys on the page
            assert ("Esc" if key == "Escape" else key) in help_text and label.lower() in help_text

        # name, inline in the person's row
        click(find('[data-rename="person_001"]'))
        find("input.app-name").send_keys("Alice", Keys.ENTER)
        manifest = decided_ok("name")
        assert next(e for e in manifest["clusters"] if e["name"] == "person_001")["label"] == "Alice"
        assert "person_001 Alice" in find("main").text

        # merge two people by keys; the row first in view stays where it was
        select_person("person_002")
        select_person("person_009")
        at = lambda: driver.execute_script(  # noqa: E731
            "return document.querySelector('main button.pick[data-person=\"person_001\"]')"
            ".closest('[data-row]').getBoundingClientRect().top")
        driver.execute_script("window.scrollBy(0, arguments[0])", at() - 200)
        assert abs(at() - 200) <= 1 and driver.execute_script("return window.scrollY") > 500
        press("m")
        manifest = decided_ok("merge")
        assert set(faces_of(start, "person_009")) <= set(faces_of(manifest, "person_002"))
        assert abs(at() - 200) <= 2
        assert selected() == (set(), {"person_002"})  # the one merged away is gone
        press(Keys.ESCAPE)
        assert selected() == (set(), set())

        # accept a suggested merge; a rebuild that takes a while shows its progress
        accept = next(b for b in finds("#app-suggestions button.app-do.yes")
                      if json.loads(b.get_attribute("data-decide"))["verb"] == "merge")
        pair = json.loads(accept.get_attribute("data-decide"))["people"]
        os.kill(server.process.pid, signal.SIGSTOP)  # the server, held in the middle of it
        try:
            click(accept)
            WebDriverWait(driver, 10, 0.05).until(
                lambda d: re.fullmatch(r"rebuilding… [1-9] s", status()[0]))
            assert "busy" in find("body").get_attribute("class")
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        manifest = decided_ok("merge")
        assert set(faces_of(start, pair[1])) <= set(faces_of(manifest, pair[0]))

        # not the same person: a suggested merge declined stays declined
        declined = next(b for b in finds("#app-suggestions button.app-do:not(.yes)")
                        if "people" in json.loads(b.get_attribute("data-decide")))
        apart_pair = json.loads(declined.get_attribute("data-decide"))["people"]
        before = {p: sorted(faces_of(manifest, p)) for p in apart_pair}
        click(declined)
        manifest = decided_ok("apart")
        assert decided(cache)[-1]["people"] and all(
            sorted(faces_of(manifest, p)) == before[p] for p in apart_pair)
        assert apart_pair not in [json.loads(b.get_attribute("data-decide")).get("people")
                                  for b in finds("#app-suggestions [data-decide]")]

        # not the same person on a suggested move: its loose faces stay out of that person
        declined = next(b for b in finds("#app-suggestions button.app-do:not(.yes)")
                        if "from" in json.loads(b.get_attribute("data-decide")))
        request = json.loads(declined.get_attribute("data-decide"))
        click(declined)
        manifest = decided_ok("apart")
        assert decided(cache)[-1]["from"]
        assert {int(f) for f in request["faces"]} <= {f["face"] for f in
                                                      manifest["singletons"]["faces"]}
        assert request not in [json.loads(b.get_attribute("data-decide"))
                               for b in finds("#app-suggestions [data-decide]")]

        # move a face to another person: the selection survives the rebuild
        moved = faces_of(start, "person_003")[-1]
        select_face(moved, "main [data-row]")
        select_person("person_004")
        press("v")
        manifest = decided_ok("move")
        assert owners(manifest)[moved] == "person_004"
        assert selected() == ({moved}, {"person_004"})
        press(Keys.ESCAPE)

        # move a face to a new person
        alone = faces_of(start, "person_001")[-1]
        select_face(alone, "main [data-row]")
        press("v")
        manifest = decided_ok("move")
        assert owners(manifest)[alone] not in {e["name"] for e in start["clusters"]}
        assert faces_of(manifest, owners(manifest)[alone]) == [alone]
        press(Keys.ESCAPE)

        # two unassigned faces named as a new person
        bob = [int(el.get_attribute("data-face")) for el in finds("#app-unassigned [data-face]")[:2]]
        for face in bob:
            select_face(face, "#app-unassigned")
        press("n")
        find("input.app-name").send_keys("Bob", Keys.ENTER)
        manifest = decided_ok("move", "name")
        named = next(e for e in manifest["clusters"] if e.get("label") == "Bob")
        assert sorted(f["face"] for f in named["faces"]) == sorted(bob)
        assert selected() == (set(bob), set())  # still selected: cleared by hand
        press(Keys.ESCAPE)

        # an unassigned face to its nearest person, by the button under it
        assign = finds("#app-unassigned [data-decide]")[0]
        given = json.loads(assign.get_attribute("data-decide"))
        click(assign)
        manifest = decided_ok("move")
        assert owners(manifest)[int(given["faces"][0])] == given["to"]

        # reject a stranger
        stranger = faces_of(manifest, "person_003")[0]
        select_face(stranger, "main [data-row]")
        press("r")
        manifest = decided_ok("reject")
        assert stranger in [f["face"] for f in manifest["rejected"]["faces"]]

        # not this person: a face out of the person it is in
        doubtful = faces_of(manifest, "person_004")[-1]
        select_face(doubtful, "main [data-row]")
        press("a")
        manifest = decided_ok("apart")
        assert owners(manifest).get(doubtful) != "person_004" and decided(cache)[-1]["faces"]
        press(Keys.ESCAPE)

        # split, then undo it
        whole = sorted(faces_of(manifest, "person_001"))
        select_person("person_001")
        press("s")
        manifest = decided_ok("split")
        assert len({owners(manifest)[f] for f in whole}) >= 2
        press(Keys.ESCAPE)
        press("u")
        manifest = decided_ok("undo")
        assert sorted(faces_of(manifest, "person_001")) == whole

        # a rebuild by another run: the page notices, shows it, and clears the selection
        select_person("person_003")
        sort_faces.people(out, "name", people_named=["person_003"], name="Carol", quiet=True)
        verbs.append("name")
        WebDriverWait(driver, 30, 0.1).until(lambda d: "person_003 Carol" in find("main").text)
        text, kind = settled()
        assert kind == "error" and "rebuilt by another run" in text, text
        assert selected() == (set(), set())
    finally:
        driver.quit()
        server.close()

    # every decision holds through a fresh cluster
    again = sort_faces.cluster(cache, out, quiet=True)
    owner = owners(again)
    label = {e["name"]: e.get("label") for e in again["clusters"]}
    assert label["person_001"] == "Alice" and label["person_003"] == "Carol"
    assert {owner[f] for f in faces_of(start, "person_009")} == {"person_002"}
    assert {owner[f] for f in faces_of(start, pair[1])} == {pair[0]}
    assert {owner[f] for f in before[apart_pair[0]]}.isdisjoint(
        owner[f] for f in before[apart_pair[1]])
    assert owner[moved] == "person_004" and owner.get(doubtful) != "person_004"
    assert [f for f, n in owner.items() if n == owner[alone]] == [alone]
    assert {owner[f] for f in bob} == {next(n for n, v in label.items() if v == "Bob")}
    assert owner[int(given["faces"][0])] == given["to"]
    assert stranger not in owner and stranger in [f["face"] for f in again["rejected"]["faces"]]
    assert sorted(f for f, n in owner.items() if n == "person_001") == whole


def test_a_refine_output_is_served_and_decided_on(celebs_cache, tmp_path):
    """A refine output's facesets are its people: its page is served with the
    app, its loose faces (dropped as outliers or by the size filter) are the
    unassigned ones, and a decision (a name; a loose face moved by the button
    under it) rebuilds it."""
    from conftest import REFINE

    cache, out = cache_copy(celebs_cache, tmp_path), tmp_path / "refined"
    sort_faces.refine(cache, out, quiet=True, **REFINE)
    server = Server(out)
    try:
        status, _headers, body = server.request("GET", "/")
        page = body.decode()
        assert status == 200 and "faces left out of every faceset" in page
        assert 'data-person="faceset_002"' in page and 'id="app-bar"' in page
        before = server.fingerprint()
        status, answer = server.decide({"verb": "name", "people": ["faceset_002"],
                                        "name": "Alice", "fingerprint": before})
        assert status == 200 and answer["ok"] and "name faceset_002 Alice (kept in" in answer["message"]
        assert answer["fingerprint"] == server.fingerprint() != before
        refined = json.loads((out / "refine_manifest.json").read_text())
        assert next(e for e in refined["facesets"] if e["name"] == "faceset_002")["label"] == \
            "Alice" and (out / "faceset_002_Alice").is_dir()
        page = server.request("GET", "/")[2].decode()
        unassigned = page[page.index('id="app-unassigned"'):]
        move = json.loads(html.unescape(re.search(r'data-decide="([^"]*)"', unassigned).group(1)))
        status, answer = server.decide({**move, "fingerprint": server.fingerprint()})
        assert status == 200 and answer["ok"], answer
        refined = json.loads((out / "refine_manifest.json").read_text())
        assert int(move["faces"][0]) in [f["face"] for e in refined["facesets"]
                                         if e["name"] == move["to"] for f in e["faces"]]
        assert [d["verb"] for d in decided(cache)] == ["name", "move"]
    finally:
        server.close()


# --- the server's guards -------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(celebs_cache, tmp_path_factory):
    """A review server on a copy of five_celebs' cluster output, and what
    must not change: the decisions file (none) and the manifest."""
    cache, out = clustered_copy(celebs_cache, tmp_path_factory.mktemp("guarded"))
    server = Server(out)
    yield {"server": server, "cache": cache, "out": out,
           "manifest": (out / "manifest.json").read_bytes()}
    server.close()


def nothing_written(guarded) -> None:
    assert not sort_faces.people_path(guarded["cache"]).exists()
    assert (guarded["out"] / "manifest.json").read_bytes() == guarded["manifest"]


def test_the_page_is_the_static_page_and_the_app(guarded):
    server, out = guarded["server"], guarded["out"]
    status, headers, body = server.request("GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    served = body.decode()
    static = (out / "index.html").read_text()
    main = static[static.index("<main>\n") + len("<main>\n"):static.index("</main>")]
    assert main in served and main.count("data-face=") > 50  # every row, as written
    assert static[static.index("<header>"):static.index("</header>")] in served
    assert "app-bar" in served and "app-data" in served and 'id="app-unassigned"' in served
    assert served.count("<script>") == 1 and "people-mode" in served  # the app's, not the page's
    data = json.loads(re.search(r'id="app-data">(.*?)</script>', served).group(1))
    assert data["fingerprint"] == server.fingerprint() and data["token"] == server.token
    status, headers, _body = server.request("GET", f"/?token={server.token}", cookie=None)
    assert status == 303 and headers["Location"] == "/"
    assert headers["Set-Cookie"] == (f"{server.cookie}; Path=/; HttpOnly; SameSite=Strict")
    nothing_written(guarded)


def test_requests_without_the_token_or_from_elsewhere_are_refused(guarded):
    server = guarded["server"]
    merge = {"verb": "merge", "people": ["person_001", "person_002"],
             "fingerprint": server.fingerprint()}
    wrong = f"facesets_review_{server.port}={'x' * len(server.token)}"
    for method, path, options in [
            ("GET", "/", {"cookie": None}),                                  # no token
            ("GET", "/", {"cookie": wrong}),                                 # a wrong token
            ("GET", f"/?token={'x' * len(server.token)}", {"cookie": None}),
            ("GET", f"/?token={server.token[:-1]}", {"cookie": None}),
            ("GET", "/manifest.json", {"cookie": None}),
            ("GET", "/api/state", {"cookie": wrong}),
            ("GET", "/", {"host": "attacker.example"}),                      # DNS rebinding
            ("GET", "/", {"host": f"attacker.example:{server.port}"}),
            ("GET", f"/?token={server.token}", {"host": "attacker.example", "cookie": None}),
            ("GET", "/", {"host": "127.0.0.1:1"})]:
        status, _headers, body = server.request(method, path, **options)
        assert status == 403 and b"refused" in body, (path, options, status, body)
    for headers, options in [
            ({}, {"cookie": None}),                                         # no token
            ({}, {"cookie": wrong}),
            ({"X-Review-Token": None}, {}),                                 # the cookie alone
            ({"X-Review-Token": "x" * len(server.token)}, {}),
            ({"Origin": "http://attacker.example"}, {}),                    # cross-origin
            ({"Origin": None}, {}),
            ({"Origin": f"http://localhost:{server.port}"}, {}),            # another origin
            ({"Sec-Fetch-Site": "cross-site"}, {}),
            ({}, {"host": f"attacker.example:{server.port}"})]:
        status, answer = server.decide(merge, headers, **options)
        assert status == 403 and "refused" in answer["text"], (headers, options, answer)
    # state changes only by POST, as JSON
    status, _headers, _body = server.request(
        "GET", "/api/decide?verb=merge&people=person_001&people=person_002")
    assert status == 405
    status, answer = server.decide(merge, {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        status, headers, _body = server.request(method, "/api/decide", json.dumps(merge).encode())
        assert (status, headers["Allow"]) == (405, "GET, HEAD, POST"), method
    status, _headers, _body = server.request("BREW", "/api/decide", json.dumps(merge).encode())
    assert status == 501  # not a method at all
    # HEAD: GET's status and headers, no body; refused without the token as GET is
    status, headers, body = server.request("HEAD", "/")
    assert (status, body) == (200, b"") and int(headers["Content-Length"]) > 1000
    assert server.request("HEAD", "/", cookie=None)[0] == 403
    nothing_written(guarded)


def test_only_files_inside_out_are_served(guarded, tmp_path):
    server, out = guarded["server"], guarded["out"]
    secret = out.parent / "secret.txt"
    secret.write_text("not for the page")
    (out / "leak.txt").symlink_to(secret)
    (out / "leak_folder").symlink_to(out.parent)
    thumb = next((out / "_thumbs").iterdir()).name
    status, headers, body = server.request("GET", f"/_thumbs/{thumb}")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    for path in ["/../secret.txt", "/_thumbs/../../secret.txt", "/%2e%2e/secret.txt",
                 "/%2E%2E%2Fsecret.txt", "/_thumbs/..%2f..%2fsecret.txt", "/..%5csecret.txt",
                 "//etc/passwd", "/%2fetc%2fpasswd", f"/{secret}", f"/{secret.as_posix()[1:]}",
                 "/leak.txt", "/leak_folder/secret.txt", "/leak_folder/cache/c.npz",
                 "/_thumbs/", "/_thumbs", "/person_001", "/%00", "/_thumbs/%ff",
                 f"http://127.0.0.1:{server.port}/../secret.txt"]:
        status, _headers, body = server.request("GET", path)
        assert status == 404 and b"not for the page" not in body, (path, status)
    (out / "leak.txt").unlink()
    (out / "leak_folder").unlink()
    nothing_written(guarded)


def test_bad_decisions_are_one_line_and_write_nothing(guarded):
    server, out = guarded["server"], guarded["out"]
    fingerprint = server.fingerprint()
    first = manifest_of(out)["clusters"][0]["faces"][0]["face"]
    for request, words in [
            ({"verb": "forget"}, "not a decision"),
            ({"verb": "suggest"}, "not a decision"),
            ({"verb": "merge", "people": ["person_001"]}, "two people or more"),
            ({"verb": "merge", "people": ["person_001", "person_999"]}, "'person_999' is not a"),
            ({"verb": "merge", "people": ["person_001", "person_001"]}, "itself"),
            ({"verb": "move", "faces": ["99999999"], "to": "person_001"}, "not a face id"),
            ({"verb": "move", "faces": [str(first)], "to": "person_001"}, "already in"),
            ({"verb": "move", "faces": [str(first)], "to": "person_002", "name": "Bob"},
             "only a new person is named"),
            ({"verb": "reject", "faces": ["-3"]}, "not a face id"),
            ({"verb": "name", "people": ["person_001"], "name": "bad\x07name"}, "control"),
            ({"verb": "name", "people": ["person_001"], "name": "3"}, "would read as"),
            ({"verb": "move", "faces": ["2"], "to": "new", "name": "new"}, "would read as"),
            ({"verb": "name", "people": ["person_001", "person_002"], "name": "A"}, "one person"),
            ({"verb": "split", "people": []}, "one person"),
            ({"verb": "apart", "faces": [str(first)]}, "apart takes"),
            ({"verb": "undo"}, "nothing to undo"),
            ({"verb": "undo", "faces": ["1"]}, "undo takes no faces"),
            ({"verb": "reject", "faces": ["1"] * 6000}, "at most"),
            ({"verb": "name", "people": ["person_001"], "name": "A", "path": "/etc"}, "no field")]:
        status, answer = server.decide({**request, "fingerprint": fingerprint})
        assert status == 400 and not answer["ok"] and words in answer["error"], (request, answer)
        assert "\n" not in answer["error"] and answer["fingerprint"] == fingerprint
    status, answer = server.decide({"verb": "undo"})  # no fingerprint
    assert status == 400 and "fingerprint" in answer["error"]
    status, _headers, body = server.request(
        "POST", "/api/decide", b"{not json", {"Content-Type": "application/json",
                                              "Origin": server.origin,
                                              "X-Review-Token": server.token})
    assert status == 400 and b"JSON object" in body
    nothing_written(guarded)


def raw_request(server: Server, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """(status, body) of a POST to /api/decide sent byte for byte as written
    (the page's headers, then `head`'s lines, then `body`), as no browser
    sends it."""
    import socket

    lines = (f"POST /api/decide HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
             f"Cookie: {server.cookie}\r\nOrigin: {server.origin}\r\n"
             f"X-Review-Token: {server.token}\r\nContent-Type: application/json\r\n{head}\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(lines.encode() + body)
        sock.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    status, _, rest = answer.partition(b"\r\n")
    return int(status.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_a_body_without_one_content_length_is_refused_and_a_slow_one_stalls_nothing(guarded):
    """A decision sent chunked, with no length or with two lengths (which is
    the body's?) is refused, 411; a client that sends less than its length
    and waits holds only its own connection: the server answers others."""
    import socket

    server = guarded["server"]
    decision = json.dumps({"verb": "undo", "fingerprint": server.fingerprint()}).encode()
    chunked = f"{len(decision):x}\r\n".encode() + decision + b"\r\n0\r\n\r\n"
    for head, body in [("Transfer-Encoding: chunked\r\n", chunked), ("", decision),
                       (f"Content-Length: 2\r\nContent-Length: {len(decision)}\r\n",
                        b"{}" + decision)]:
        status, text = raw_request(server, head, body)
        assert status == 411 and b"one Content-Length" in text, (head, text)
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as slow:
        slow.sendall(f"POST /api/decide HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                     f"Cookie: {server.cookie}\r\nOrigin: {server.origin}\r\n"
                     f"X-Review-Token: {server.token}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 100\r\n\r\n{{".encode())
        started = time.monotonic()
        assert server.fingerprint() and time.monotonic() - started < 5
    nothing_written(guarded)


def test_a_locked_cache_or_output_and_a_stale_page_write_nothing(guarded):
    server, cache, out = guarded["server"], guarded["cache"], guarded["out"]
    name = {"verb": "name", "people": ["person_001"], "name": "Alice",
            "fingerprint": server.fingerprint()}
    with sort_faces.exclusive_lock(cache, "cache"):  # another run deciding, or an extend
        status, answer = server.decide(name)
    assert status == 400 and "in use by another run" in answer["error"] and not answer["stale"]
    with sort_faces.output_lock(out):  # a cluster rebuilding OUT
        status, answer = server.decide(name)
    assert status == 400 and "in use by another run" in answer["error"]
    nothing_written(guarded)
    status, answer = server.decide({**name, "fingerprint": "0" * 32})  # a page of another build
    assert status == 409 and answer["stale"] and "rebuilt since it was shown" in answer["error"]
    nothing_written(guarded)


def test_sigterm_stops_it_with_exit_130(guarded):
    server = Server(guarded["out"])
    try:
        assert server.request("GET", "/api/state")[0] == 200
        code, _out, err = server.stop(signal.SIGTERM)
    finally:
        server.close()
    assert code == sort_faces.EXIT_INTERRUPTED and err.strip().splitlines()[-1] == "interrupted"
    with pytest.raises(ConnectionRefusedError):
        server.request("GET", "/api/state")
    nothing_written(guarded)
