"""A process that holds a database file through a SweepService, as the dashboard's server does.

    python tests/reliability/service_child.py --db FILE (--start CONFIG_JSON | --resume RUN_ID) [--fill-after N]
                                              [--stop-during-load]

(the suite forks it from forkserver.py, which calls `main(argv)`)

It starts (or resumes) one sweep on the service's background thread and prints one JSON line each
time the published Progress changes ({"done": N, "status": S}), then a final line
{"final": {...Progress...}, "running": bool, "sweep_threads": [...]} once the thread is gone.
`--fill-after N`: once N problems are stored, the disk "fills up": RLIMIT_FSIZE drops to the WAL's
current size, so the next write of any kind (the batch, and the 'failed' status after it) fails
inside DuckDB with EFBIG, the errno a full or read-only file system gives a write too.
`--stop-during-load`: while the model loads (inside the real loader), another thread reads the status
(as a browser tab polls) and then presses Stop; one line {"during_load": {...}} says what it read and
whether the read returned while the load was under way.
The parent may SIGKILL it at any moment (a server restart).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from db.store import Store  # noqa: E402
from runner.model import load  # noqa: E402
from runner.service import SweepService  # noqa: E402
from runner.sweep import SweepConfig  # noqa: E402


def fill_the_disk(db: Path) -> None:
    wal = Path(f"{db}.wal")
    size = wal.stat().st_size if wal.exists() else 0
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (max(size, 1), hard))  # Python ignores SIGXFSZ: writes get EFBIG


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--start", default=None)
    parser.add_argument("--resume", type=int, default=None)
    parser.add_argument("--fill-after", type=int, default=None)
    parser.add_argument("--stop-during-load", action="store_true")
    args = parser.parse_args(argv)
    service = None

    def loader(spec):
        if args.stop_during_load:  # a tab polls status, then another presses Stop, before the load is done
            seen = {}
            poll = threading.Thread(target=lambda: seen.update(progress=asdict(service.status())))
            poll.start()
            poll.join(timeout=120)  # a status read that waits on the load would deadlock here, not pass
            stopped = service.stop()
            print(json.dumps({"during_load": {"status_returned": not poll.is_alive(), "stop_accepted": stopped,
                                              **{k: seen.get("progress", {}).get(k) for k in ("status", "phase")}}}),
                  flush=True)
        return load(spec)

    service = SweepService(Store(args.db), loader=loader)
    if args.start is not None:
        run_id = service.start(SweepConfig.from_json(json.loads(args.start)))
    else:
        run_id = service.resume(args.resume)
    print(json.dumps({"run_id": run_id, "pid": os.getpid()}), flush=True)
    last, filled = None, False
    while service.running:
        progress = service.status()
        seen = (progress.done, progress.status)
        if seen != last:
            print(json.dumps({"done": progress.done, "status": progress.status}), flush=True)
            last = seen
        if args.fill_after is not None and not filled and progress.done >= args.fill_after:
            fill_the_disk(Path(args.db))
            filled = True
        time.sleep(0.002)
    service.join()
    final = {k: v for k, v in asdict(service.status()).items() if k != "latest"}
    threads = [t.name for t in threading.enumerate() if t.name.startswith("sweep-")]
    print(json.dumps({"final": final, "running": service.running, "sweep_threads": threads}), flush=True)
    if not filled:  # on a full disk no checkpoint either: the parent reads the file as the failure left it
        service.store.close()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # no interpreter teardown: it would retry the checkpoint on a full disk
