"""A stop is honoured in every phase, the model load included, without blocking status reads; and a
SIGKILLed `auto` run, resumed, stores every column bit for bit as an uninterrupted one (issue 14,
cases 10 and 12). Children run in the fork server (one thread each, as the CLI runs)."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

from db import status_file
from db.store import Store
from runner.sweep import Sweep
from tests.reliability.support import sweep_config

EVERY_COLUMN = "SELECT * EXCLUDE (run_id) FROM results WHERE run_id = ? ORDER BY problem_id, variant"


def test_stop_during_the_model_load_is_honoured_and_status_reads_do_not_wait_for_the_load(
        tmp_path, tiny_model_dir, forkserver, ledger):
    db = tmp_path / "load.duckdb"
    config = sweep_config(tiny_model_dir, limit=12)
    with ledger.fault("Stop pressed while the service loads the model (another tab polling status)"):
        _, out, err = forkserver.spawn("service", ["--db", db, "--start", json.dumps(config.to_json()),
                                                   "--stop-during-load"])
        assert forkserver.wait() == 0, err.read_text()
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        during = next(line["during_load"] for line in lines if "during_load" in line)
        assert during == {"status_returned": True, "stop_accepted": True, "status": "starting", "phase": "load"}
        assert next(line["run_id"] for line in lines if "run_id" in line) is None  # nothing was created
        final = lines[-1]
        assert final["final"]["status"] == "stopped" and final["running"] is False and final["sweep_threads"] == []
        store = Store(db)
        assert store.query("SELECT count(*) FROM runs")[0][0] == 0
        store.close()


def test_stop_in_the_reference_phase_stops_before_any_problem_and_resume_finishes(tmp_path, tiny_reasoner,
                                                                                  tiny_model_dir, ledger):
    store = Store(tmp_path / "reference.duckdb")
    config = sweep_config(tiny_model_dir, limit=8, methods=("zero", "mean"))
    with ledger.fault("Stop pressed in the reference phase"):
        run_id, stop = Sweep.create(store, tiny_reasoner, config), threading.Event()

        def on_progress(progress):
            if progress.phase == "reference":
                stop.set()
        assert Sweep(store, tiny_reasoner, config, run_id, stop=stop, on_progress=on_progress).run() == "stopped"
        assert store.query("SELECT count(*) FROM results WHERE run_id = ?", [run_id])[0][0] == 0
        assert store.load_reference(run_id, "latent") is not None  # computed once, kept for the resume
        assert Sweep(store, tiny_reasoner, config, run_id).run() == "finished"
    store.close()


def _wait_for_batches(db, pid: int, err, at_least: int) -> None:
    deadline = time.monotonic() + 300
    while True:
        snapshot = status_file.read(db)
        runs = snapshot["runs"] if snapshot else []
        if runs and runs[0]["done"] >= at_least and runs[0]["status"] == "running":
            return
        assert runs == [] or runs[0]["status"] in ("running", "stopped"), runs
        assert time.monotonic() < deadline, f"no {at_least} problems after 300 s: {err.read_text()}"
        os.kill(pid, 0)  # still alive (ProcessLookupError otherwise)
        time.sleep(0.002)


def test_a_sigkilled_auto_run_resumed_equals_an_uninterrupted_one_bit_for_bit(tmp_path, forkserver, ledger):
    """The embedded model, `--batch-size auto` (53 problems of 19 variants a batch), SIGKILLed after its
    second batch; the CLI's --resume finishes it. Every stored column equals the uninterrupted run's."""
    argv = ["sweep", "--limit", "120", "--validation", "20", "--quiet"]
    whole, parted = tmp_path / "whole.duckdb", tmp_path / "parted.duckdb"
    code, _, err = forkserver.cli(*argv, "--db", whole)
    assert code == 0, err
    with ledger.fault("SIGKILL of an auto-batch CLI sweep after its second batch, then --resume"):
        pid, _, err = forkserver.spawn("cli", [*argv, "--db", parted])
        auto = Store(whole, read_only=True)
        size = auto.run_row(1)["batch_size"]
        auto.close()
        _wait_for_batches(parted, pid, err, 20)  # the validation phase's batches are in: killed in 'full'
        os.kill(pid, signal.SIGKILL)
        assert forkserver.wait() == -signal.SIGKILL
        code, _, err = forkserver.cli("sweep", "--resume", "1", "--quiet", "--db", parted)
        assert code == 0, err
        a, b = Store(whole, read_only=True), Store(parted, read_only=True)
        try:
            assert b.run_row(1)["status"] == "finished" and b.run_row(1)["batch_size"] == size
            assert b.query(EVERY_COLUMN, [1]) == a.query(EVERY_COLUMN, [1])
        finally:
            a.close()
            b.close()
