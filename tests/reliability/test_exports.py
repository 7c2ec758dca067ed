"""What leaves the database as files: CSV cells that are not formulas, and exports that a full disk cannot truncate.

The disk is really full: a small tmpfs mounted as the export folder (root only; elsewhere the same write
fails through RLIMIT_FSIZE in a fork-server child, EFBIG instead of ENOSPC). The database stays on the
ordinary disk; only the export's write fails, as when `--out` points at a full volume.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from db.store import Store
from runner.sweep import Sweep
from tests.reliability.support import sweep_config

HOSTILE = [  # problem ids and questions a spreadsheet would run
    {"id": '=HYPERLINK("http://attacker.example/?x","click")', "question": "@SUM(1) Tom has 3 apples and buys 2 more. "
     "How many apples does he have?", "answer": "3 + 2 = 5\n#### 5"},
    {"id": "+cmd|' /C calc'!A0", "question": "-2+3 Ann had 9 pens and lost 4. How many are left?",
     "answer": "9 - 4 = 5\n#### 5"},
    {"id": "@SUM(A1:A9)", "question": "A box holds 6 eggs. How many eggs are in 2 boxes?", "answer": "#### 12"},
    {"id": "-7", "question": "The temperature was 3 and fell by 10. What is it now?", "answer": "#### -7"},
]


@pytest.fixture(scope="module")
def hostile_db(tmp_path_factory, tiny_model_dir, tiny_reasoner):
    folder = tmp_path_factory.mktemp("hostile")
    dataset = folder / "hostile.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in HOSTILE))
    path = folder / "hostile.duckdb"
    store = Store(path)
    try:
        config = sweep_config(tiny_model_dir, dataset=str(dataset), limit=None)
        run_id = Sweep.create(store, tiny_reasoner, config)
        assert Sweep(store, tiny_reasoner, config, run_id).run() == "finished"
    finally:
        store.close()
    return path


def _cells(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def _check_neutralised(rows: list[dict]) -> None:
    ids = {r["problem_id"] for r in rows}
    assert ids == {"'" + r["id"] for r in HOSTILE[:3]} | {"-7"}, ids  # "-7" is a number, not a formula
    for row in rows:
        for column, cell in row.items():
            assert not cell or cell[0] not in "=+-@\t\r" or _number(cell), f"{column} cell {cell!r} is a formula"
    logprobs = [float(r["gold_logprob"]) for r in rows]  # numeric columns stay numbers, negative ones included
    assert all(lp < 0 for lp in logprobs)
    assert "-7" in {r["gold"] for r in rows}  # gold is text, and "-7" is a number to a spreadsheet


def _number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised_by_default_and_raw_on_request(
        tmp_path, hostile_db, forkserver, ledger):
    with ledger.bad_input("problem ids =HYPERLINK(...), +cmd|..., @SUM(...) exported to CSV by the CLI"):
        code, out, err = forkserver.cli("export", "--db", hostile_db, "--format", "csv", "--out", tmp_path / "safe")
        assert code == 0, err
        _check_neutralised(_cells(Path(out.strip()).read_text()))
        code, out, err = forkserver.cli("export", "--db", hostile_db, "--format", "csv", "--csv-raw",
                                        "--out", tmp_path / "raw")
        assert code == 0, err
        assert {r["problem_id"] for r in _cells(Path(out.strip()).read_text())} == {r["id"] for r in HOSTILE}


def test_the_dashboards_csv_download_is_neutralised_unless_the_box_is_ticked(hostile_db, ledger, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from dashboard import data, state
    from db.scope import Scope
    from tests.reliability.support import REPO
    db = str(hostile_db.resolve())
    with ledger.bad_input("the same ids in the dashboard's results.csv download"):
        monkeypatch.setenv("THOUGHTSWEEP_DB", db)
        try:
            at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180).run()
            at.switch_page("pages/export.py").run()
            assert not at.exception, [e.message for e in at.exception]
            box = at.checkbox(key="export_csv_raw")
            assert box.value is False and "results.csv" in {b.label for b in at.download_button}
            box.check().run()
            assert not at.exception, [e.message for e in at.exception]
            _check_neutralised(_cells(data.results_csv(db, Scope(1)).decode()))  # what the button serves
            raw = _cells(data.results_csv(db, Scope(1), True).decode())
            assert {r["problem_id"] for r in raw} == {r["id"] for r in HOSTILE}
        finally:
            state.open_service.clear(db)


def _small_disk(folder: Path, kib: int) -> bool:
    folder.mkdir()
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@pytest.mark.parametrize("fmt, name", [("csv", "results.csv"), ("seed-json", "step_importance_scores.json")])
def test_a_full_disk_keeps_the_previous_export_and_names_the_file_and_the_space_it_needed(
        tmp_path, fmt, name, finished_db, forkserver, ledger):
    out = tmp_path / "out"
    mounted = _small_disk(out, 256)
    try:
        code, _, err = forkserver.cli("export", "--db", finished_db.path, "--format", fmt, "--out", out)
        assert code == 0, err
        previous = (out / name).read_bytes()
        (out / name).write_bytes(previous + b" ")  # a marker: the old file must survive byte for byte
        previous += b" "
        fsize = None
        if mounted:  # fill what is left, so that the new file cannot be written
            with open(out / "filler", "wb", buffering=0) as f, pytest.raises(OSError) as full:
                while True:
                    f.write(b"\0" * 4096)
            assert full.value.errno == errno.ENOSPC
        else:
            fsize = len(previous) // 2  # no file may grow past half the old one
        how = "a full tmpfs" if mounted else "RLIMIT_FSIZE (not root: no tmpfs)"
        with ledger.fault(f"export --format {fmt} onto {how}"):
            code, _, err = forkserver.cli("export", "--db", finished_db.path, "--format", fmt, "--out", out,
                                          fsize=fsize)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1, err
            assert str(out / name) in lines[0] and "it needs" in lines[0] and "free on" in lines[0], lines[0]
            assert (out / name).read_bytes() == previous, "the previous export was damaged"
            assert not [p.name for p in out.iterdir() if p.name.endswith(".partial")], list(out.iterdir())
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], check=True)


def test_an_export_removes_what_a_killed_export_of_the_same_file_left_and_nothing_else(tmp_path):
    """A SIGKILL mid-write leaves a hidden `.name.PID.xxxx.partial` beside the file: the next write of that
    file removes it, but not a live writer's, nor another file's."""
    import signal
    import sys
    import time

    from db.files import write_text
    target = tmp_path / "report.md"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); import db.files as f, os\n"
        "f.os.fsync = lambda fd: time.sleep(3600)  # killed in the middle of the write\n"
        "f.write_text(sys.argv[2], 'x' * 100000)"), str(Path(__file__).resolve().parents[2]), str(target)])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".report.md.*.partial")):
        assert time.monotonic() < deadline and writer.poll() is None, "the writer left no temporary file"
        time.sleep(0.01)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    try:
        kept = [tmp_path / f".report.md.{live.pid}.abc.partial", tmp_path / f".other.md.{writer.pid}.abc.partial"]
        for path in kept:
            path.write_text("in flight")
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
        (killed,) = [p for p in tmp_path.glob(f".report.md.{writer.pid}.*.partial")]
        write_text(target, "new")
        assert target.read_text() == "new"
        assert not killed.exists(), "the killed writer's temporary file is still there"
        assert all(path.exists() for path in kept), "a live writer's, or another file's, temporary file went"
        assert not [p for p in tmp_path.glob(f".report.md.{os.getpid()}.*.partial")]
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("fmt", ["seed-json", "csv", "parquet", "markdown"])
def test_an_export_gets_the_mode_a_new_file_would_and_keeps_the_mode_of_the_file_it_replaces(hostile_db, tmp_path, fmt):
    """Exports are written to a temporary file (mode 0600) and renamed: a new one gets 0666 less the umask, as
    `open` would give it (colleagues sharing the folder can read it), and one written over keeps its own mode."""
    import sys
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-m", "runner", "export", "--db", str(hostile_db), "--run", "1", "--format", fmt,
               "--out", str(out)]
    root = Path(__file__).resolve().parents[2]
    written = subprocess.run(command, cwd=root, umask=0o002, capture_output=True, text=True, check=True)
    paths = [Path(line) for line in written.stdout.splitlines()]  # the CLI prints each file it wrote
    assert paths and all(p.is_file() for p in paths), written.stdout
    assert {oct(p.stat().st_mode & 0o777) for p in paths} == {oct(0o664)}
    for path in paths:
        path.chmod(0o640)
    subprocess.run(command, cwd=root, umask=0o002, capture_output=True, check=True)
    assert {oct(p.stat().st_mode & 0o777) for p in paths} == {oct(0o640)}
    assert not list(out.glob(".*.partial"))
