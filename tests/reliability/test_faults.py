"""Faults a sweep must survive: kills, a full disk, a model that raises, CUDA out of memory, a server restart.

Every test compares the recovered run with an uninterrupted run of the same config, row for row
(every column of `results` but run_id), and checks the invariants a commit keeps (support.whole_batches).
Kills are timed from the CLI's `--checkpoint-every 2 --checkpoint-dir DIR`: checkpoint_N.json appears
right after the batch ending at problem N commits (the child holds the DuckDB lock, so the parent cannot
read the file itself), and the kill lands a seeded random delay later, in the next rollout, commit or
checkpoint write. The killed sweeps are CLI children of the fork server (forkserver.py: `runner`'s own
`main`, without re-importing torch each round); the last resume is a plain `python -m runner`.
The disk fills through RLIMIT_FSIZE: writes past the limit fail with EFBIG inside DuckDB, the same
failed write() a full or read-only file system gives (a chmod cannot make an already open file
read-only, and as root it changes nothing at all).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from db.store import Store
from runner.service import SweepService
from runner.sweep import Sweep
from tests.reliability.support import (PYTHON, REPO, FlakyReasoner, assert_same_results, child_env, reference_rows,
                                       result_rows, sweep_config, whole_batches)

KILL_SEED = 8  # issue 8
KILLS = 5
PROBLEMS = 40  # every run here sweeps the first 40 built-in problems, 2 a batch, prefix zero-ablations
WAL_LIMIT = 48 * 1024  # bytes the CLI may write to any one file: a few batches of the tiny model, then "disk full"


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for the fork server to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_for(ready, pid: int, log, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert _alive(pid), f"the child exited before {what}: {log.read_text()}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s: {log.read_text()}"
        time.sleep(0.005)


def _created_run(db: Path, reasoner, config) -> int:
    """A run registered in a fresh file and left for a child process to sweep: its id."""
    store = Store(db)
    try:
        return Sweep.create(store, reasoner, config)
    finally:
        store.close()


def _checkpointed_ids(folder) -> set[str]:
    """Problem ids in every checkpoint file that was written whole (a kill may cut the last one short)."""
    ids: set[str] = set()
    for path in folder.glob("checkpoint_*.json"):
        try:
            ids |= {str(record["problem_id"]) for record in json.loads(path.read_text())}
        except json.JSONDecodeError:
            continue
    return ids


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return sweep_config(tiny_model_dir, limit=PROBLEMS)


@pytest.fixture(scope="module")
def expected(tmp_path_factory, tiny_reasoner, config) -> list[tuple]:
    """The rows of an uninterrupted run of `config`."""
    return reference_rows(tmp_path_factory.mktemp("reference") / "reference.duckdb", tiny_reasoner, config)


def test_sigkill_at_five_seeded_points_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, config,
                                                                            expected, forkserver, ledger):
    rng = random.Random(KILL_SEED)
    db, checkpoints = tmp_path / "killed.duckdb", tmp_path / "checkpoints"
    first = ["sweep", "--model", tiny_model_dir, "--db", db, "--limit", PROBLEMS, "--batch-size", 2,
             "--schemes", "prefix", "--checkpoint-every", 2, "--checkpoint-dir", checkpoints, "--quiet"]
    resume = ["sweep", "--db", str(db), "--resume", "1", "--quiet"]
    kills, done = [], 0
    for number in range(1, KILLS + 1):
        target = done + 2  # kill once the next batch has committed (its checkpoint file appears)...
        delay = rng.uniform(0.0, 0.1)  # ...and this much later: mid-rollout, mid-commit or mid-checkpoint
        pid, _, log = forkserver.spawn("cli", first if number == 1 else resume)
        marker = checkpoints / f"checkpoint_{target}.json"
        _wait_for(marker.exists, pid, log, marker.name)
        time.sleep(delay)
        assert _alive(pid), f"kill {number}: the sweep ended before the kill; lower the delays"
        os.kill(pid, signal.SIGKILL)
        assert forkserver.wait() == -signal.SIGKILL
        kills.append(ledger.tried("fault", f"SIGKILL {number}/{KILLS}: {delay * 1000:.0f} ms after the batch "
                                           f"ending at problem {target} committed, then resume"))
        store = Store(db)  # opens without repair: DuckDB replays the WAL and drops a torn tail
        try:
            numbers = whole_batches(store, 1)
            assert store.run_row(1)["status"] == "interrupted"
            assert numbers["done"] >= target, f"kill {number}: batch up to {target} committed, {numbers['done']} stored"
            assert _checkpointed_ids(checkpoints) <= store.stored_problem_ids(1), "a checkpointed problem was lost"
            done = numbers["done"]
        finally:
            store.close()
        assert done < PROBLEMS, "the run finished before the last kill: use more problems"

    final = subprocess.run([PYTHON, "-m", "runner", *resume], cwd=REPO, env=child_env(), capture_output=True,
                           text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    store = Store(db)
    try:
        numbers = whole_batches(store, 1)
        assert (numbers["status"], numbers["done"], numbers["batches"]) == ("finished", PROBLEMS, PROBLEMS // 2)
        assert_same_results(result_rows(store, 1), expected)
    finally:
        store.close()
    for case in kills:
        ledger.ok(case)


def test_disk_full_mid_run_fails_the_run_with_its_reason_and_keeps_what_was_committed(tmp_path, tiny_reasoner,
                                                                                      config, expected, forkserver,
                                                                                      ledger):
    db = tmp_path / "full.duckdb"
    run_id = _created_run(db, tiny_reasoner, config)

    with ledger.fault(f"disk full mid-run under the CLI (no file may grow past {WAL_LIMIT // 1024} KiB)"):
        code, _, stderr = forkserver.cli("sweep", "--db", db, "--resume", run_id, "--quiet", fsize=WAL_LIMIT)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1, stderr
        assert lines[0].startswith("error: ") and "File too large" in lines[0], lines
        store = Store(db)
        numbers = whole_batches(store, run_id)
        row = store.run_row(run_id)
        assert row["status"] == "failed" and "storing a batch" in row["error"] and "File too large" in row["error"]
        assert 0 < numbers["done"] < PROBLEMS, f"the disk should fill mid-run: {numbers['done']} stored"
        assert Sweep(store, tiny_reasoner, config, run_id).run() == "finished"  # room again: resume
        assert_same_results(result_rows(store, run_id), expected)
        store.close()


def test_disk_full_under_the_dashboard_service_shows_failed_when_the_file_cannot_say_it(tmp_path, tiny_reasoner,
                                                                                        config, expected, forkserver,
                                                                                        ledger):
    db = tmp_path / "full.duckdb"
    run_id = _created_run(db, tiny_reasoner, config)

    with ledger.fault("disk full after 6 problems under SweepService: the failure itself cannot be written"):
        _, out, err = forkserver.spawn("service", ["--db", db, "--resume", run_id, "--fill-after", 6])
        assert forkserver.wait() == 0, err.read_text()
        report = json.loads(out.read_text().strip().splitlines()[-1])
        progress = report["final"]
        assert progress["status"] == "failed" and "File too large" in progress["error"], progress
        assert report["running"] is False and report["sweep_threads"] == []  # the thread is gone
        store = Store(db)  # what was committed opens and reads
        numbers = whole_batches(store, run_id)
        assert 6 <= numbers["done"] < PROBLEMS
        assert store.run_row(run_id)["status"] == "interrupted"  # the file could not take 'failed'
        assert Sweep(store, tiny_reasoner, config, run_id).run() == "finished"
        assert_same_results(result_rows(store, run_id), expected)
        store.close()


def test_a_model_error_mid_run_fails_the_run_frees_the_service_and_a_new_run_starts(tmp_path, tiny_model_dir,
                                                                                   tiny_reasoner, ledger):
    config = sweep_config(tiny_model_dir, limit=12)
    store = Store(tmp_path / "model.duckdb")
    flaky = FlakyReasoner(tiny_reasoner, {3}, RuntimeError("injected: the model raised in rollout 3"))
    service = SweepService(store, loader=lambda spec: flaky)

    with ledger.fault("the model raises in its 3rd rollout (batch 3 of 6)"):
        run_id = service.start(config)
        service.join(timeout=120)
        progress = service.status()
        assert progress.status == "failed" and "injected: the model raised in rollout 3" in progress.error
        row = store.run_row(run_id)
        assert row["status"] == "failed" and "injected: the model raised in rollout 3" in row["error"]
        assert not service.running
        assert not [t for t in threading.enumerate() if t.name == f"sweep-run-{run_id}"]
        assert whole_batches(store, run_id)["done"] == 4  # batches 1 and 2 committed
        second = service.start(config)  # a new run can start
        service.join(timeout=120)
        assert second != run_id and service.status().status == "finished"
        service.resume(run_id)  # and the failed one resumes to the same rows
        service.join(timeout=120)
        assert service.status().status == "finished"
        assert result_rows(store, run_id) == result_rows(store, second)

    flaky = FlakyReasoner(tiny_reasoner, {1}, RuntimeError("injected: the model raised in the reference phase"))
    service = SweepService(store, loader=lambda spec: flaky)
    with ledger.fault("the model raises in the reference phase (method mean), before any problem is read"):
        run_id = service.start(sweep_config(tiny_model_dir, limit=4, methods=("zero", "mean")))
        service.join(timeout=120)
        progress = service.status()
        assert progress.status == "failed" and "reference phase" in progress.error, progress
        assert store.run_row(run_id)["status"] == "failed" and not service.running
    store.close()


def test_cuda_out_of_memory_halves_the_batch_and_records_it_through_the_service(tmp_path, tiny_model_dir,
                                                                               tiny_reasoner, ledger):
    """tests/test_sweep.py halves once inside Sweep; here twice, through the service, with the metrics."""
    store = Store(tmp_path / "oom.duckdb")
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    config = sweep_config(tiny_model_dir, limit=12, batch_size=8)
    expected = reference_rows(tmp_path / "reference.duckdb", tiny_reasoner, sweep_config(tiny_model_dir, limit=12))

    with ledger.fault("CUDA out of memory twice: batch 8 -> 4 -> 2"):
        service = SweepService(store, loader=lambda spec: FlakyReasoner(tiny_reasoner, {1, 2}, oom))
        run_id = service.start(config)
        service.join(timeout=120)
        progress = service.status()
        assert (progress.status, progress.batch_size) == ("finished", 2)
        assert store.run_row(run_id)["batch_size"] == 2
        sizes = store.query("SELECT DISTINCT batch_size, batch_problems FROM run_metrics WHERE run_id = ?", [run_id])
        assert sizes == [(2, 2)]
        assert whole_batches(store, run_id)["batches"] == 6
        assert_same_results(result_rows(store, run_id), expected)  # nothing lost, nothing computed twice

    with ledger.fault("CUDA out of memory at a batch of 1: nothing left to halve"):
        service = SweepService(store, loader=lambda spec: FlakyReasoner(tiny_reasoner, {1}, oom))
        run_id = service.start(sweep_config(tiny_model_dir, limit=4, batch_size=1))
        service.join(timeout=120)
        progress = service.status()
        assert progress.status == "failed" and "out of memory with a batch of 1 problem" in progress.error
        assert "out of memory" in store.run_row(run_id)["error"] and whole_batches(store, run_id)["done"] == 0
    store.close()


def test_a_server_restart_mid_sweep_leaves_the_run_interrupted_and_resumable_from_the_dashboard(
        tmp_path, config, expected, forkserver, ledger, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from dashboard import state
    db = (tmp_path / "server.duckdb").resolve()
    pid, out, err = forkserver.spawn("service", ["--db", db, "--start", json.dumps(config.to_json())])

    def progress() -> list[dict]:
        return [json.loads(line) for line in out.read_text().split("\n")[:-1]]  # whole lines only

    _wait_for(lambda: any(p.get("done", 0) >= 8 for p in progress()), pid, err, "8 problems stored")
    os.kill(pid, signal.SIGKILL)  # the server dies with the sweep thread in it
    assert forkserver.wait() == -signal.SIGKILL
    run_id = progress()[0]["run_id"]

    with ledger.fault("the dashboard's server is SIGKILLed mid-sweep and restarted"):
        monkeypatch.setenv("THOUGHTSWEEP_DB", str(db))
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180).run()
        at.switch_page("pages/progress.py").run()
        assert not at.exception, [e.message for e in at.exception]
        assert any("Interrupted after" in w.value for w in at.warning), [w.value for w in at.warning]
        resume = next(b for b in at.button if b.label == f"Resume run #{run_id}")
        assert not resume.disabled
        resume.click().run()
        assert not at.exception, [e.message for e in at.exception]
        service = state.open_service(str(db))
        try:
            service.join(timeout=180)
            assert service.status().status == "finished"
            assert whole_batches(service.store, run_id)["done"] == PROBLEMS
            assert_same_results(result_rows(service.store, run_id), expected)
        finally:
            state.open_service.clear(str(db))
