"""What opening a database file repairs: runs no live process is sweeping, and runs left without problems.

DuckDB gives one process a file read-write, so while a Store holds it no other process can be sweeping
into it: a 'running' row is live only if a thread of this process claimed it (`claim`, on a start or
a resume) and that thread is still alive. Every other one is stale and becomes 'interrupted'. PID and
host name cannot tell: a container's sweep is PID 1 after every restart, on the same host.

A run whose problems were never stored (before a run and its problems were one transaction, a crash
between the two writes left one) would resume to a false "finished 0/0": it becomes 'failed', with
DAMAGED as the reason, and Store.claim_run refuses it.
"""
from __future__ import annotations

import threading

DAMAGED = ("its problems were never stored (the process creating it ended first): nothing to resume; "
           "start the run again")

# {(resolved database path, run id): the thread that claimed the run}. Process-wide on purpose: the lock
# DuckDB holds is the process's, and two Stores of one process on one file share it.
_claimed: dict[tuple[str, int], threading.Thread] = {}
_claimed_lock = threading.Lock()


def claim(store, run_id: int) -> None:
    """This thread sweeps `run_id` now: its 'running' row is live while the thread is."""
    with _claimed_lock:
        _claimed[str(store.path.resolve()), run_id] = threading.current_thread()


def release(store, run_id: int) -> None:
    """The run left 'running' (finished, stopped, failed): no thread sweeps it any more."""
    with _claimed_lock:
        _claimed.pop((str(store.path.resolve()), run_id), None)


def live_runs(store) -> list[int]:
    """Runs of this file that a live thread of this process claimed."""
    key = str(store.path.resolve())
    with _claimed_lock:
        for (path, run_id), thread in list(_claimed.items()):
            if not thread.is_alive():
                del _claimed[path, run_id]
        return [run_id for (path, run_id) in _claimed if path == key]


def repair(store) -> dict[str, list[int]]:
    """Mark stale 'running' runs interrupted and runs without problems failed; returns the ids of each."""
    live = live_runs(store)
    interrupted = store.query("UPDATE runs SET status = 'interrupted', pid = NULL WHERE status = 'running' "
                              "AND NOT list_contains($live, id) RETURNING id", {"live": live})
    damaged = store.query("UPDATE runs SET status = 'failed', pid = NULL, error = $reason WHERE status <> 'failed' "
                          "AND NOT EXISTS (SELECT 1 FROM problems p WHERE p.run_id = runs.id) "
                          "AND NOT list_contains($live, id) RETURNING id", {"reason": DAMAGED, "live": live})
    return {"interrupted": [r[0] for r in interrupted], "damaged": [r[0] for r in damaged]}
