"""Open a review page (index.html) in headless Chromium and report what it showed.

The page's own inline script does the counting: opened as
``file://.../index.html?check=1`` it switches every thumbnail to eager loading,
waits for each one's load or error event, then writes a JSON summary into
``<pre id="review-check">``. Chromium runs with ``--dump-dom`` and
``--virtual-time-budget``: virtual time does not advance while file loads are
pending, so the DOM is dumped after the script finished; the summary is parsed
back out of the dump. (Waiting on ``img.decode()`` instead does not work: the
virtual clock does not wait for decoding and the dump comes first.)

Chromium is Debian's ``chromium`` package (``apt-get install -y chromium``).
It runs as root here, hence ``--no-sandbox``. Set CHROMIUM to a binary to use
another one.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable",
                  "chrome", "chrome-headless-shell")
# No network, no first-run UI, nothing but the page; a fresh profile each run.
CHROMIUM_FLAGS = (
    "--no-sandbox",  # required as root (and in most containers)
    "--disable-gpu",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-crash-reporter",
    "--mute-audio",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    # Headless Chromium turns lazy image loading off (every loading="lazy"
    # image loads at once); this turns it back on, as in a desktop browser.
    "--blink-settings=lazyLoadEnabled=true",
)
# Virtual milliseconds the page may run; pending file loads do not count.
CHECK_BUDGET_MS = 15000
SCREENSHOT_BUDGET_MS = 5000
SCREENSHOT_WINDOW = "1280,2000"
_CHECK_RE = re.compile(r'<pre id="review-check"[^>]*>(.*?)</pre>', re.S)


def require_chromium() -> None:
    """Skip a browser test, saying so, where Chromium is not installed; in CI
    (FACESETS_REQUIRE_BROWSER set, as .ci/run does) fail instead: there it is
    coverage, not optional."""
    import os

    import pytest

    if chromium_path():
        return
    message = "Chromium is not installed (apt-get install -y chromium): browser test not run"
    if os.environ.get("FACESETS_REQUIRE_BROWSER"):
        pytest.fail(message)
    pytest.skip(message)


def chromium_path() -> str | None:
    """The Chromium (or Chrome) binary to use, or None when none is installed."""
    override = os.environ.get("CHROMIUM")
    if override:
        return shutil.which(override) or (override if os.access(override, os.X_OK) else None)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium_version(binary: str | None = None) -> str:
    """``chromium --version``, e.g. "Chromium 156.0.8078.79 built on Debian ..."."""
    binary = binary or chromium_path()
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def _run_chromium(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run Chromium with a fresh profile; on timeout kill its whole process group
    (the browser leaves renderer, GPU and zygote children behind otherwise)."""
    binary = chromium_path()
    if binary is None:
        raise RuntimeError("Chromium is not installed (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="review-chromium-", ignore_cleanup_errors=True) as profile:
        cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        finally:
            # Children still alive after the browser exited: end them too.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _file_url(path: Path, query: str = "") -> str:
    return Path(path).resolve().as_uri() + query


def check_page(html_path: Path, screenshot: Path | None = None, timeout=60) -> dict:
    """Load a review page in headless Chromium and count what it shows.

    Parameters
    ----------
    html_path : Path
        The index.html written by write_review_page.
    screenshot : Path, optional
        Also save a 1280x2000 PNG of the page as a person sees it (lazy
        thumbnails, no query string), from a second run.
    timeout : float, default=60
        Seconds each Chromium run may take.

    Returns
    -------
    result : dict
        ``rows`` (elements with data-row), ``thumbs`` (img with data-thumb),
        ``decoded`` (thumbnails with naturalWidth > 0 after all loads),
        ``failed`` (up to 20 src of thumbnails that did not decode),
        ``title``, ``headless`` (the flag that worked) and ``seconds``.

    Raises
    ------
    RuntimeError
        If Chromium is missing or the page never wrote its summary.
    """
    import time

    url = _file_url(html_path, "?check=1")
    errors = []
    for headless in ("--headless", "--headless=new"):
        started = time.monotonic()
        run = _run_chromium([headless, "--window-size=1280,2000",
                             f"--virtual-time-budget={CHECK_BUDGET_MS}", "--dump-dom", url], timeout)
        match = _CHECK_RE.search(run.stdout)
        text = html.unescape(match.group(1)).strip() if match else ""
        if text:
            result = json.loads(text)
            result["headless"] = headless
            result["seconds"] = round(time.monotonic() - started, 2)
            break
        errors.append(f"{headless}: exit {run.returncode}, "
                      f"{'no summary in the DOM' if match else 'no <pre id=review-check>'}; "
                      f"stderr tail: {run.stderr[-600:]!r}")
    else:
        raise RuntimeError("the review page wrote no check summary:\n" + "\n".join(errors))
    if screenshot is not None:
        screenshot = Path(screenshot).resolve()
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        _run_chromium([result["headless"], f"--window-size={SCREENSHOT_WINDOW}",
                       f"--virtual-time-budget={SCREENSHOT_BUDGET_MS}",
                       f"--screenshot={screenshot}", _file_url(html_path)], timeout)
        if not screenshot.is_file():
            raise RuntimeError(f"Chromium wrote no screenshot at {screenshot}")
    return result


def require_webdriver() -> str:
    """The ChromeDriver binary (Debian's chromium-driver) and Selenium, or skip
    (fail in CI, as require_chromium)."""
    import importlib.util

    import pytest

    require_chromium()
    driver = shutil.which("chromedriver")
    if driver and importlib.util.find_spec("selenium"):
        return driver
    message = ("ChromeDriver or Selenium is missing (apt-get install -y chromium-driver; "
               "pip install selenium): browser test not run")
    if os.environ.get("FACESETS_REQUIRE_BROWSER"):
        pytest.fail(message)
    pytest.skip(message)


def selenium_chromium(profile: str):
    """A Selenium WebDriver on headless Debian Chromium with the flags above."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium_path()
    for flag in (*CHROMIUM_FLAGS, "--headless=new", f"--user-data-dir={profile}",
                 "--window-size=1280,2000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(require_webdriver()), options=options)
