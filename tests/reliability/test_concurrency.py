"""Several dashboard sessions at once while a sweep runs: whole batches only, one sweep, a shared Stop.

Sessions are threads that do what the pages do (SweepService.status/running/start/stop and the
db.queries reads, each thread through its own cursor of the one Store), and two AppTest sessions
on the Progress page. Readers check the commit invariants in one statement (support.SNAPSHOT), so
a reader between two commits sees one or the other, never half a batch.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from db import queries
from db.scope import Scope
from db.store import Store
from runner.service import SweepBusy, SweepService
from tests.reliability.support import REPO, sweep_config, whole_batches

LONG = 400  # problems: the sweep is stopped long before it could end
SCHEMES = ("prefix", "single")  # 13 variants a problem


@pytest.mark.parametrize("sessions", [2, 5])
def test_sessions_during_a_sweep_see_whole_batches_one_sweep_and_each_others_stop(sessions, tmp_path, tiny_model_dir,
                                                                                   tiny_reasoner, ledger):
    store = Store(tmp_path / "shared.duckdb")
    service = SweepService(store, loader=lambda spec: tiny_reasoner)
    config = sweep_config(tiny_model_dir, limit=LONG, schemes=SCHEMES)
    with ledger.fault(f"{sessions} sessions at once during a sweep: reads, Start again, Stop from one of them"):
        run_id = service.start(config)
        n_variants = store.run_row(run_id)["n_variants"]
        all_refused = threading.Barrier(sessions, timeout=120)
        failures: list[str] = []
        reads_while_running = [0] * sessions

        def session(i: int) -> None:
            try:
                try:
                    service.start(config)  # a second Start, from every tab, while the sweep runs
                    failures.append(f"session {i}: a second sweep started")
                except SweepBusy:
                    pass
                all_refused.wait()
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    numbers = whole_batches(store, run_id)  # raises on a torn batch
                    runs = queries.runs(store)
                    table = queries.problems_table(store, Scope(run_id), limit=LONG)
                    assert (table["n_variants"] == n_variants - 1).all(), "a problem with some variants missing"
                    assert len(table) >= numbers["done"], "a stored problem disappeared"  # read after: only more
                    queries.latest_results(store, run_id)
                    progress = service.status()
                    if numbers["status"] == "running":
                        reads_while_running[i] += 1
                    if i == 0 and reads_while_running[0] >= 3 and numbers["done"] >= 4 and service.running:
                        service.stop()  # Stop in one tab...
                    row = runs[runs["id"] == run_id].iloc[0]
                    if progress.status == "stopped" and not service.running and row["status"] == "stopped":
                        return  # ...seen in every tab: the service's status and the runs row
                    time.sleep(0.01)
                failures.append(f"session {i}: never saw the stop")
            except Exception as error:  # noqa: BLE001  reported below with the session number
                failures.append(f"session {i}: {type(error).__name__}: {error}")

        threads = [threading.Thread(target=session, args=(i,)) for i in range(sessions)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
        service.join(timeout=60)
        assert not failures, failures
        assert all(reads_while_running), f"reads while the sweep ran, per session: {reads_while_running}"
        numbers = whole_batches(store, run_id)
        assert numbers["status"] == "stopped" and 0 < numbers["done"] < LONG
        assert store.query("SELECT count(*) FROM runs")[0][0] == 1  # every second Start was refused
    store.close()


def test_two_dashboard_sessions_share_the_sweep_and_a_stop_in_one_shows_in_the_other(tmp_path, tiny_model_dir,
                                                                                     monkeypatch, ledger):
    from streamlit.testing.v1 import AppTest

    from dashboard import state
    db = (tmp_path / "tabs.duckdb").resolve()
    monkeypatch.setenv("THOUGHTSWEEP_DB", str(db))
    service = state.open_service(str(db))
    try:
        with ledger.fault("two dashboard sessions during a sweep: Stop in one, seen in the other"):
            run_id = service.start(sweep_config(tiny_model_dir, limit=LONG, schemes=SCHEMES))
            tabs = [AppTest.from_file(str(REPO / "app.py"), default_timeout=180).run() for _ in range(2)]
            for tab in tabs:
                tab.switch_page("pages/progress.py").run()
                assert not tab.exception, [e.message for e in tab.exception]
                stop = next(b for b in tab.button if b.label == "Stop")
                assert not stop.disabled and service.running
            next(b for b in tabs[0].button if b.label == "Stop").click().run()
            service.join(timeout=120)
            other = tabs[1].run()
            assert not other.exception, [e.message for e in other.exception]
            assert any("Stopped after" in w.value for w in other.warning), [w.value for w in other.warning]
            assert next(b for b in other.button if b.label == "Stop").disabled
            assert not next(b for b in other.button if b.label == f"Resume run #{run_id}").disabled
            whole_batches(service.store, run_id)
    finally:
        service.stop()
        service.join(timeout=120)
        state.open_service.clear(str(db))


def test_the_status_pages_thread_holds_no_connection_once_its_pages_are_flushed(tmp_path):
    """CI failed once because a file closed moments after `Store.close()` returned. The status-pages thread's
    cursor went only when that thread ended, so when the thread ended while `close()` ran, the file shut down
    on the ending thread: the WAL was still on disk when `close()` returned, and the checkpoint that rewrote
    the file came later. A profile hook stands for a busy machine: the thread lingers after its work is done."""
    path = tmp_path / "pages.duckdb"
    store = Store(path)
    connections = store.query("SELECT count FROM duckdb_connection_count()")[0][0]  # the store's and this thread's
    lingered = []

    def linger(frame, event, arg):
        if event == "return" and frame.f_code.co_name == "_build":
            lingered.append(frame.f_code.co_name)
            time.sleep(1.0)

    threading.setprofile(linger)  # threads started from now on: the pages thread
    try:
        store.create_run(name="pages", model="m", dataset="d", config={}, num_latent=6, n_variants=1)  # asks a page
        store.pages.flush()
        assert lingered, "no status page was built"
        assert store.query("SELECT count FROM duckdb_connection_count()")[0][0] == connections
        store.close()
    finally:
        threading.setprofile(None)
    assert not Path(f"{path}.wal").exists(), "close() returned with the WAL on disk"
    opened = subprocess.run([sys.executable, "-c", f"import duckdb; duckdb.connect({str(path)!r}).close()"],
                            capture_output=True, text=True, timeout=60)
    assert opened.returncode == 0, opened.stderr  # the lock went with close()
