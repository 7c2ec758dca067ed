"""A small JSON snapshot of the runs beside the database, for readers that cannot open the file.

DuckDB lets one process hold a database file; while the dashboard (or a CLI sweep) holds it,
`python -m runner status` in a second terminal cannot open it, not even read-only. The process
that writes the file therefore also replaces `<db>.status.json` after every committed batch and
every change of a run's status: the runs as `status --json` lists them, and the `--markdown`
page of each run it touched (rebuilt at most every PAGE_EVERY_S seconds while a run's status stays
the same: the page's queries are not free, and they would run on the sweep's own thread).
Written to a temporary file and `os.replace`d, so a reader sees the old snapshot or the new one,
never half of one.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
from pathlib import Path

SUFFIX = ".status.json"
PAGE_EVERY_S = 10.0  # a markdown page costs 0.1-0.3 s of queries: rebuilt at most this often, or on a new status
_pages_built: dict[tuple[str, int], tuple[float, str]] = {}  # (db, run) -> (when, status) of the last page


def path_for(db_path: str | Path) -> Path:
    db_path = Path(db_path)
    return db_path.with_name(db_path.name + SUFFIX)


def publish(store, run_id: int | None = None) -> None:
    """Rewrite the snapshot: every run's row, and run_id's markdown page (the others' pages are kept)."""
    from db import queries, status_page  # queries imports pandas: here, which keeps store.py light
    target = path_for(store.path)
    previous = read(store.path) or {}
    runs = queries.runs_json(store)
    ids = {str(r["id"]) for r in runs}
    pages = {k: v for k, v in (previous.get("markdown") or {}).items() if k in ids}
    status = next((r["status"] for r in runs if str(r["id"]) == str(run_id)), None)
    built = _pages_built.get((str(store.path), run_id))
    stale = built is None or built[1] != status or time.monotonic() - built[0] >= PAGE_EVERY_S
    if status is not None and (stale or str(run_id) not in pages):
        pages[str(run_id)] = status_page.status_markdown(store, run_id)
        _pages_built[(str(store.path), run_id)] = (time.monotonic(), status)
    snapshot = {"db": str(store.path), "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "writer_pid": os.getpid(), "runs": runs, "markdown": pages}
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):  # a read-only folder: readers fall back to nothing, the sweep goes on
        tmp.write_text(json.dumps(snapshot, indent=1))
        os.replace(tmp, target)


def read(db_path: str | Path) -> dict | None:
    """The last snapshot written for this database, or None."""
    try:
        return json.loads(path_for(db_path).read_text())
    except (OSError, ValueError):
        return None
