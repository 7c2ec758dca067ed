"""The dashboard in a real headless Chromium: demo sweep, live refresh, layout at 800 and 1920 px, a download.

`streamlit run app.py -- --db TMP` runs as a subprocess on a free port; playwright drives Debian's
/usr/bin/chromium. The demo is grown to all 1,200 built-in problems (THOUGHTSWEEP_DEMO_LIMIT; the dashboard's own
demo is 120) so that it is still sweeping while the test visits Progress, Importance, Difficulty
and Run and sees each redraw itself; then it is stopped (the test's length does not depend on the
machine's speed). Every page is then checked at 800 and 1920 px: no metric value,
selectbox value or label cut, charts at least MIN_CHART px wide. Screenshots land in
test-output/screenshots/ (gitignored).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "test-output" / "screenshots"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
PAGES = {"Run": "", "Progress": "progress", "Importance": "importance", "Difficulty": "difficulty",
         "Problems": "problems", "Compare": "compare", "Export": "export"}
DEMO_LIMIT = 1200  # the whole built-in set: still sweeping while the live pages are checked
WIDTHS = (800, 1920)
MIN_CHART = 300  # px: at 800 px wide the Importance charts used to shrink to ~110 px

pytestmark = pytest.mark.browser

# Elements whose text must never be cut: [selector, what]. Checked with scrollWidth <= clientWidth.
UNCUT = [("[data-testid='stMetricValue']", "metric value"), ("[data-testid='stMetricLabel']", "metric label"),
         ("[data-testid='stSelectbox'] [data-baseweb='select'] [value], "
          "[data-testid='stSelectbox'] [data-baseweb='select'] div[title]", "selectbox value")]
# Words broken across lines ("Limi t"): a word whose range has more than one client rectangle.
BROKEN_WORDS = """(selector) => {
  const broken = [];
  for (const label of document.querySelectorAll(selector)) {
    const walker = document.createTreeWalker(label, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const match of node.textContent.matchAll(/\\S+/g)) {
        const range = document.createRange();
        range.setStart(node, match.index); range.setEnd(node, match.index + match[0].length);
        const lines = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
        if (lines.size > 1) broken.push(match[0]);
      }
    }
  }
  return broken;
}"""
CUT = """(selector) => [...document.querySelectorAll(selector)]
  .filter(e => e.offsetParent !== null && e.scrollWidth > e.clientWidth + 1)
  .map(e => e.textContent.trim() + ' (' + e.scrollWidth + ' > ' + e.clientWidth + ')')"""


def _require_browser() -> None:
    try:
        import playwright.sync_api  # noqa: F401
        missing = None if CHROMIUM.exists() else f"{CHROMIUM} is missing (apt-get install chromium)"
    except ImportError:
        missing = "the playwright Python package is missing (pip install playwright)"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing}; CI must provide it")
        pytest.skip(missing)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if server.poll() is not None:
            raise AssertionError(f"streamlit exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"streamlit did not answer at {url} within {timeout}s:\n{log.read_text()[-3000:]}")


def settle(page, timeout: float = 120) -> None:
    """Wait until the script run is over and every element has rendered (no skeletons)."""
    end = time.time() + timeout
    time.sleep(1.0)
    while time.time() < end:
        busy = page.locator("[data-testid='stStatusWidget']").count()
        skeletons = page.locator("[data-testid*='Skeleton']").count()
        if not busy and not skeletons:
            break
        time.sleep(0.4)
    time.sleep(0.8)


def screenshot(page, name: str) -> Path:
    """The whole page: Streamlit scrolls inside its main block, so grow the viewport to its height first."""
    width = page.viewport_size["width"]
    height = page.evaluate("document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": width, "height": max(900, min(height + 40, 8000))})
    time.sleep(1.0)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": width, "height": 900})
    return path


def open_page(page, url: str, title: str) -> None:
    """Through the sidebar navigation, as a user would: no reload."""
    page.locator("[data-testid='stSidebarNavLink']", has_text=title).first.click()
    page.wait_for_url(f"{url}/{PAGES[title]}", timeout=30_000)  # the Run page is the default: url/
    settle(page)


def changes(read, what: str, timeout: float = 120) -> set:
    """Poll `read()` until it has shown two different values (a live redraw, no reload)."""
    seen, end = set(), time.time() + timeout
    while time.time() < end and len(seen) < 2:
        value = read()
        if value:
            seen.add(value)
        time.sleep(0.5)
    assert len(seen) >= 2, f"{what} never changed without a reload while the sweep ran: {seen}"
    print(f"{what}: {sorted(seen)}")
    return seen


def stored_count(page) -> str | None:
    """'123/480 problems' from the run caption the analysis pages redraw with their numbers."""
    caption = page.locator("[data-testid='stMain'] [data-testid='stCaptionContainer']",
                           has_text=re.compile(rf"\d+/{DEMO_LIMIT} problems"))
    found = re.search(rf"(\d+)/{DEMO_LIMIT} problems", caption.first.inner_text()) if caption.count() else None
    return found.group(1) if found else None


def check_layout(page, where: str) -> None:
    """Nothing cut, no word broken, every chart usable."""
    for selector, what in UNCUT:
        cut = page.evaluate(CUT, selector)
        assert not cut, f"{where}: {what} cut off: {cut}"
    broken = page.evaluate(BROKEN_WORDS, "[data-testid='stWidgetLabel'], [data-testid='stMetricLabel']")
    assert not broken, f"{where}: labels broken mid-word: {broken}"
    widths = page.evaluate("[...document.querySelectorAll('[data-testid=stPlotlyChart]')]"
                           ".map(e => e.getBoundingClientRect().width)")
    assert all(w >= MIN_CHART for w in widths), f"{where}: charts narrower than {MIN_CHART} px: {widths}"


def test_demo_sweep_live_pages_layout_at_two_widths_and_a_download(tmp_path):
    _require_browser()
    from playwright.sync_api import TimeoutError as PlaywrightTimeout, expect, sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    port, log = _free_port(), tmp_path / "streamlit.log"
    url = f"http://127.0.0.1:{port}"
    # One torch thread, so one worker: two worker processes (runner/workers.py) sweep the whole demo in about
    # a minute, less than the visits below take on a 2-core machine (tests/test_app.py sweeps with two).
    env = {**os.environ, "THOUGHTSWEEP_DEMO_LIMIT": str(DEMO_LIMIT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "THOUGHTSWEEP_UPLOADS": str(tmp_path / "uploads")}
    env.pop("THOUGHTSWEEP_DB", None)
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless",
             "true", "--", "--db", str(tmp_path / "browser.duckdb")], cwd=REPO, env=env, stdout=out,
            stderr=subprocess.STDOUT)
    try:
        _wait_healthy(url, server, log)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                context = browser.new_context(viewport={"width": 1440, "height": 900}, accept_downloads=True)
                page = context.new_page()
                page.goto(url)
                demo = page.get_by_role("button", name="Run the demo sweep")
                expect(demo).to_be_visible(timeout=120_000)
                settle(page)
                screenshot(page, "0-empty-database")
                started = time.time()
                demo.click()
                expect(page).to_have_url(f"{url}/progress", timeout=300_000)  # the demo takes the user to Progress
                expect(page.get_by_role("heading", name="Progress")).to_be_visible(timeout=60_000)

                problems = page.locator("[data-testid='stMetric']", has_text="Problems")
                changes(lambda: problems.first.inner_text().split("\n")[-1].strip() if problems.count() else None,
                        "Progress's problem count")
                eta = page.locator("[data-testid='stMetric']", has_text="ETA").first.inner_text().split("\n")[-1]
                sidebar = page.locator("[data-testid='stSidebar']").inner_text()
                assert f"ETA {eta.strip()}" in sidebar or "ETA" in sidebar  # one status object, one format
                screenshot(page, "2-progress-running")

                # The runs table first: its caption changes while the run sweeps, and once more when it ends.
                open_page(page, url, "Run")
                table = page.locator("[data-testid='stCaptionContainer']", has_text="runs ·")
                changes(lambda: table.first.inner_text() if table.count() else None, "the runs table")
                open_page(page, url, "Importance")
                changes(lambda: stored_count(page), "Importance's numbers")
                open_page(page, url, "Difficulty")
                changes(lambda: stored_count(page), "Difficulty's numbers")

                open_page(page, url, "Progress")  # enough seen live: stop, so the test's length does not
                with contextlib.suppress(PlaywrightTimeout):  # depend on the machine's speed; a fast machine
                    page.get_by_role("button", name="Stop").click(timeout=5_000)  # may have finished already
                ending = page.get_by_text(re.compile(rf"Stopped after \d+ of {DEMO_LIMIT} problems|"
                                                     rf"Finished: all {DEMO_LIMIT} problems are stored"))
                expect(ending).to_be_visible(timeout=300_000)
                stopped = re.search(r"after (\d+) of", ending.inner_text())
                done = int(stopped.group(1)) if stopped else DEMO_LIMIT
                selector = page.locator("[data-testid='stSidebar'] [data-testid='stSelectbox'] input")
                expect(selector).to_have_value("#1 · demo")
                run_status = page.locator("[data-testid='stSidebar'] [data-testid='stCaptionContainer']").first
                ended = "stopped" if stopped else "finished"
                expect(run_status).to_contain_text(ended, timeout=30_000)  # the full rerun at the end
                sidebar = page.locator("[data-testid='stSidebar']")
                expect(sidebar).to_contain_text(f"{done:,} / {DEMO_LIMIT:,} problems")

                for width in WIDTHS:
                    page.set_viewport_size({"width": width, "height": 900})
                    for number, title in enumerate(PAGES):
                        open_page(page, url, title)
                        expect(page.locator("[data-testid='stException']")).to_have_count(0)
                        if title == "Importance":
                            expect(page.locator("[data-testid='stPlotlyChart']")).to_have_count(3)  # 3 schemes
                            expect(page.get_by_text("Cumulative by construction")).to_be_visible()
                        if title == "Run":
                            for name, value in (("Device", "cpu"), ("Dtype", "float32")):
                                box = page.locator("[data-testid='stSelectbox']", has_text=name)
                                expect(box.first.locator("input")).to_have_value(value)  # shown, not cut
                        check_layout(page, f"{title} at {width} px")
                        screenshot(page, f"{number}-{title.lower()}-{width}")

                with page.expect_download(timeout=60_000) as download:  # the Export page, at 1920 px
                    page.get_by_role("button", name="Summary stats (JSON)").click()
                summary = json.loads(Path(download.value.path()).read_text())
                assert download.value.suggested_filename == "run1_step_importance_summary_stats.json"
                assert {"n_problems", "baseline_accuracy", "position_importance"} <= set(summary)
                assert summary["n_problems"] == done and "0" in summary["position_importance"]
                assert "Traceback" not in log.read_text()
                print(f"{done} demo problems stored {time.time() - started:.0f} s after the click")
            finally:
                browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
