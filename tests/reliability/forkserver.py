"""A fork server for the suite's child processes: `python tests/reliability/forkserver.py [--warm MODEL_DIR]`.

It imports torch, transformers, peft and ThoughtSweep once (and with --warm loads a model once, so the
lazy imports behind `load` are paid too), then reads one JSON request per line,
{"run": "cli" | "service", "argv": [...], "out": PATH, "err": PATH, "fsize": BYTES | null, "die_at": null |
{"points": "store" | "files", "at": N | null, "tally": PATH}}, forks, and in the child (with RLIMIT_FSIZE at
`fsize` when given: no file it writes may grow past it, a full disk; with `die_at`, SIGKILLed by itself just
before its N-th write point, and the number of points it passed written to `tally` if it lives) runs
`runner.__main__.main(argv)` (what `python -m runner ARGV` runs) or `service_child.main(argv)` with
stdout and stderr on those files. It answers {"pid": N} at once, so the test can SIGKILL the child
wherever it is, and {"rc": N} when the child has exited.

Why: a fresh `python -m runner` spends ~5-15 s of CPU importing torch and transformers before it reads
an argument; thirty bad inputs and five kill-and-resume rounds would spend minutes importing on a
2-core CI machine. Each child is still its own process: its own exit status, DuckDB file lock, stderr,
and death by SIGKILL. The server opens no database and starts no thread before it forks; the suite
still runs `python -m runner` itself where the entry point matters (the kill test's last resume).
"""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import runner.__main__ as cli  # noqa: E402
from db.store import Store  # noqa: E402
from tests.reliability import service_child  # noqa: E402


def _warm(model_dir: str) -> None:
    """Pay every import `load` and a sweep make, once, in the server."""
    import db.queries  # noqa: F401
    import db.report  # noqa: F401
    import db.seed  # noqa: F401
    import runner.sweep  # noqa: F401
    from runner.model import ModelSpec, load
    load(ModelSpec(model=model_dir))


def _cli(argv: list[str]) -> int:
    return cli.main(argv)  # which closes every store it opened, as `python -m runner` does when it exits


# A statement that changes the file: each is a point where a crash leaves the database as it then is.
WRITE = re.compile(r"\s*(BEGIN|COMMIT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP)\b", re.IGNORECASE)


class _WritePoints:
    """Counts write points; SIGKILL (no handler, no finally, no atexit: a crash) just before number `at`."""

    def __init__(self, at: int | None, tally: str):
        self.n, self.at, self.tally = 0, at, tally

    def hit(self) -> None:
        self.n += 1
        if self.n == self.at:
            os.kill(os.getpid(), signal.SIGKILL)

    def save(self) -> None:
        Path(self.tally).write_text(str(self.n))


class _DyingCursor:
    """A Store's DuckDB cursor, passing through, that counts each statement that writes."""

    def __init__(self, cursor, points: _WritePoints):
        self._cursor, self._points = cursor, points

    def execute(self, sql, *args, **kwargs):
        if isinstance(sql, str) and WRITE.match(sql):
            self._points.hit()
        return self._cursor.execute(sql, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._cursor, name)


class _DyingOs:
    """`os` as db/files.py sees it, counting the steps of an atomic write: open, fsync, rename, fsync of the folder."""

    def __init__(self, points: _WritePoints):
        self._points = points

    def __getattr__(self, name):
        return getattr(os, name)

    def fdopen(self, *args, **kwargs):
        self._points.hit()
        return os.fdopen(*args, **kwargs)

    def fsync(self, fd):
        self._points.hit()
        return os.fsync(fd)

    def replace(self, source, target):
        self._points.hit()
        return os.replace(source, target)


def _die_at(spec: dict) -> _WritePoints:
    points = _WritePoints(spec["at"], spec["tally"])
    if spec["points"] == "store":
        cursor = Store.cursor
        Store.cursor = lambda self: _DyingCursor(cursor(self), points)
    else:
        import db.files
        db.files.os = _DyingOs(points)
    return points


def _child(request: dict) -> None:
    points = _die_at(request["die_at"]) if request.get("die_at") else None
    if request.get("fsize") is not None:  # Python ignores SIGXFSZ, so writes past it fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    for fd, path in ((1, request["out"]), (2, request["err"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    argv = request["argv"]
    sys.argv = ["python -m runner" if request["run"] == "cli" else "service_child.py", *argv]
    try:
        code = _cli(argv) if request["run"] == "cli" else service_child.main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # whatever escapes `main` is a bug the test must see, as a traceback
        traceback.print_exc()
        code = 1
    if points is not None:
        points.save()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--warm":
        _warm(sys.argv[2])
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
