"""A small JSON snapshot of the runs beside the database, for readers that cannot open the file.

DuckDB lets one process hold a database file; while the dashboard (or a CLI sweep) holds it,
`python -m runner status` in a second terminal cannot open it, not even read-only. The process
that writes the file therefore also replaces `<db>.status.json` after every committed batch and
every change of a run's status: the runs as `status --json` lists them (written before `publish`
returns), and the `--markdown` page of each run it touched (rebuilt on a new status, else at most
every PAGE_EVERY_S seconds). A page costs ~25 ms of queries, three times a run at least: it is built
on a thread of its own (`Pages`), never on the sweep's, and lands in the snapshot moments later;
`Store.close` (and `Pages.flush`) waits for the pages asked for. Written to a temporary file and
`os.replace`d under one lock, so a reader sees the old snapshot or the new one, never half of one.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import os
import threading
import time
import weakref
from pathlib import Path

SUFFIX = ".status.json"
PAGE_EVERY_S = 10.0  # a markdown page costs 0.1-0.3 s of queries: rebuilt at most this often, or on a new status
_pages_built: dict[tuple[str, int], tuple[float, str]] = {}  # (db, run) -> (when, status) of the last page


def path_for(db_path: str | Path) -> Path:
    db_path = Path(db_path)
    return db_path.with_name(db_path.name + SUFFIX)


def publish(store, run_id: int | None = None) -> None:
    """Rewrite the snapshot: every run's row now, and run_id's markdown page soon (the others' pages are kept)."""
    from db import queries  # queries imports pandas: here, which keeps store.py light
    runs = queries.runs_json(store)
    ids = {str(r["id"]) for r in runs}
    status = next((r["status"] for r in runs if str(r["id"]) == str(run_id)), None)
    with store.pages.lock:
        previous = read(store.path) or {}
        pages = {k: v for k, v in (previous.get("markdown") or {}).items() if k in ids}
        _write(store, runs, pages)
    built = _pages_built.get((str(store.path), run_id))
    stale = built is None or built[1] != status or time.monotonic() - built[0] >= PAGE_EVERY_S
    if status is not None and (stale or str(run_id) not in pages):
        _pages_built[(str(store.path), run_id)] = (time.monotonic(), status)
        store.pages.ask(run_id)


def _write(store, runs: list[dict], pages: dict[str, str]) -> None:
    target = path_for(store.path)
    snapshot = {"db": str(store.path), "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "writer_pid": os.getpid(), "runs": runs, "markdown": pages}
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):  # a read-only folder: readers fall back to nothing, the sweep goes on
        tmp.write_text(json.dumps(snapshot, indent=1))
        os.replace(tmp, target)


_every: "weakref.WeakSet[Pages]" = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """A process that ends without closing its store (the CLI) still writes the pages it asked for (its last
    status): atexit runs while daemon threads still do."""
    for pages in list(_every):
        pages.flush()


class Pages:
    """A store's markdown pages, built on a thread of its own and written into the snapshot; `lock` serialises
    the snapshot's read-modify-write with `publish`'s. The thread runs while pages are asked for, then ends,
    and holds the store only while it builds (a store nobody holds still closes its file as it goes)."""

    def __init__(self, store):
        self._store, self.lock = weakref.ref(store), threading.Lock()
        self.wanted: list[int] = []  # runs whose page is asked for, oldest first
        self.running = self.closed = False
        self.changed = threading.Condition()
        _every.add(self)

    def ask(self, run_id: int) -> None:
        with self.changed:
            if self.closed:
                return
            if run_id not in self.wanted:
                self.wanted.append(run_id)
            if not self.running:  # a daemon: a process that exits without close() loses a page, never hangs
                self.running = True
                threading.Thread(target=self._build, name="status-pages", daemon=True).start()

    def flush(self) -> None:
        """Wait until every page asked for is in the snapshot."""
        with self.changed:
            self.changed.wait_for(lambda: not self.running)

    def close(self) -> None:
        self.flush()
        with self.changed:
            self.closed = True

    def _build(self) -> None:
        from db import status_page
        while True:
            with self.changed:
                store = self._store() if self.wanted else None
                if store is None:
                    self.wanted, self.running = [], False
                    self.changed.notify_all()
                    return
                run_id = self.wanted.pop(0)
            try:
                page = status_page.status_markdown(store, run_id)  # this thread's cursor: committed data only
                with self.lock:
                    snapshot = read(store.path)
                    if snapshot is not None and any(r["id"] == run_id for r in snapshot["runs"]):
                        _write(store, snapshot["runs"], {**snapshot["markdown"], str(run_id): page})
            except Exception:  # noqa: BLE001 - the run deleted meanwhile, the file closed: the old page stays
                pass
            store.release_cursor()  # this thread ends soon; the file must close on close()'s thread, not here
            del store


def read(db_path: str | Path) -> dict | None:
    """The last snapshot written for this database, or None."""
    try:
        return json.loads(path_for(db_path).read_text())
    except (OSError, ValueError):
        return None
