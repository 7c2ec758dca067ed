"""The dashboard in a real headless Chromium: demo sweep, live progress, a chart, a download, a screenshot per page.

`streamlit run app.py -- --db TMP` runs as a subprocess on a free port; playwright drives Debian's
/usr/bin/chromium. The demo is shrunk to 240 problems (THOUGHTSWEEP_DEMO_LIMIT): long enough to watch
the live count change a few times, about a minute on a laptop CPU. Screenshots land in test-output/screenshots/ (gitignored).
"""
from __future__ import annotations

import json
import os
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
DEMO_LIMIT = 240

pytestmark = pytest.mark.browser


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
    time.sleep(1.0)


def screenshot(page, name: str) -> Path:
    """The whole page: Streamlit scrolls inside its main block, so grow the viewport to its height first."""
    height = page.evaluate("document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": 1440, "height": max(900, min(height + 40, 8000))})
    time.sleep(1.0)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": 1440, "height": 900})
    return path


def open_page(page, url: str, title: str) -> None:
    """Through the sidebar navigation, as a user would: no reload."""
    page.locator("[data-testid='stSidebarNavLink']", has_text=title).first.click()
    page.wait_for_url(f"{url}/{PAGES[title]}", timeout=30_000)  # the Run page is the default: url/
    settle(page)


def test_demo_sweep_live_progress_chart_download_and_screenshots(tmp_path):
    _require_browser()
    from playwright.sync_api import expect, sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    port, log = _free_port(), tmp_path / "streamlit.log"
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "THOUGHTSWEEP_DEMO_LIMIT": str(DEMO_LIMIT), "PYTHONUNBUFFERED": "1"}
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
                demo.click()
                expect(page.get_by_text("Run #1 started")).to_be_visible(timeout=300_000)

                open_page(page, url, "Progress")
                seen, running_shot = set(), None
                finished = page.get_by_text(f"Finished: all {DEMO_LIMIT} problems are stored.")
                end = time.time() + 900  # a loaded 2-core machine; about a minute on an idle one
                while time.time() < end and not finished.is_visible():
                    metric = page.locator("[data-testid='stMetric']", has_text="Problems")
                    if metric.count():
                        seen.add(metric.first.inner_text().split("\n")[-1].strip())
                    if len(seen) == 2 and not running_shot:
                        running_shot = screenshot(page, "2-progress-running")
                    time.sleep(0.5)
                expect(finished).to_be_visible(timeout=5_000)
                assert len(seen) >= 2, f"the live fragment never changed the count without a reload: {seen}"
                selector = page.locator("[data-testid='stSidebar'] [data-testid='stSelectbox'] input")
                expect(selector).to_have_value("#1 · demo")
                run_status = page.locator("[data-testid='stSidebar'] [data-testid='stCaptionContainer']").first
                expect(run_status).to_contain_text("finished", timeout=30_000)  # the full rerun at the end
                settle(page)
                screenshot(page, "2-progress")

                open_page(page, url, "Importance")
                charts = page.locator("[data-testid='stPlotlyChart']")
                expect(charts.first.locator(".main-svg").first).to_be_visible(timeout=60_000)
                assert charts.count() == 3  # prefix, single, suffix
                expect(page.get_by_text("Cumulative by construction")).to_be_visible()
                screenshot(page, "3-importance")

                for number, title in enumerate(["Difficulty", "Problems", "Compare"], start=4):
                    open_page(page, url, title)
                    expect(page.locator("[data-testid='stException']")).to_have_count(0)
                    screenshot(page, f"{number}-{title.lower()}")

                open_page(page, url, "Export")
                with page.expect_download(timeout=60_000) as download:
                    page.get_by_role("button", name="Summary stats (JSON)").click()
                summary = json.loads(Path(download.value.path()).read_text())
                assert download.value.suggested_filename == "step_importance_summary_stats.json"
                assert {"n_problems", "baseline_accuracy", "position_importance"} <= set(summary)
                assert summary["n_problems"] == DEMO_LIMIT and "0" in summary["position_importance"]
                screenshot(page, "7-export")

                open_page(page, url, "Run")
                expect(page.get_by_text("Runs in this database")).to_be_visible()
                screenshot(page, "1-run")
                assert "Traceback" not in log.read_text()
            finally:
                browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
