"""A sweep in a container is PID 1 every time: a killed one must not stay "running" because the next is PID 1 too.

`unshare -pf --mount-proc` gives the sweep its own PID namespace, as a container runtime does: it runs as
PID 1 on the same host name, is SIGKILLed mid-run, and the resume runs as PID 1 again. Holding DuckDB's
exclusive lock on the file is what tells the resume that the "running" row is stale, not PID and host.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from db.store import Store
from tests.reliability.support import (PYTHON, REPO, assert_same_results, child_env, reference_rows, result_rows,
                                       sweep_config, whole_batches)

PROBLEMS = 24


def _in_container(*argv) -> list[str]:
    return ["unshare", "-pf", "--mount-proc", PYTHON, *map(str, argv)]


@pytest.fixture(scope="module")
def containers():
    if os.geteuid() != 0:
        pytest.skip("unshare -p needs root (CAP_SYS_ADMIN) to make a PID namespace")
    probe = subprocess.run(_in_container("-c", "import os; print(os.getpid())"), capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -pf --mount-proc is not available here: {probe.stderr.strip()}")
    assert probe.stdout.strip() == "1", f"the child is not PID 1 in its namespace: {probe.stdout!r}"


def _child_of(pid: int) -> int:
    """The process unshare forked (PID 1 inside), by its PID out here."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise AssertionError("unshare started no child")


def test_a_killed_sweep_that_was_pid_1_resumes_as_pid_1(tmp_path, containers, tiny_model_dir, tiny_reasoner, ledger):
    db, checkpoints = tmp_path / "container.duckdb", tmp_path / "checkpoints"
    sweep = ["-m", "runner", "sweep", "--model", tiny_model_dir, "--db", db, "--limit", PROBLEMS, "--batch-size", 2,
             "--schemes", "prefix", "--checkpoint-every", 2, "--checkpoint-dir", checkpoints, "--quiet"]
    log = open(tmp_path / "first.err", "w")
    first = subprocess.Popen(_in_container(*sweep), cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=log)
    inner = _child_of(first.pid)
    deadline = time.monotonic() + 240
    while not (checkpoints / "checkpoint_4.json").exists():  # two batches committed
        assert first.poll() is None, (tmp_path / "first.err").read_text()
        assert time.monotonic() < deadline, "no batch committed in 240 s"
        time.sleep(0.01)
    os.kill(inner, signal.SIGKILL)  # PID 1 of the namespace: the namespace ends with it
    first.wait(timeout=60)
    log.close()

    with ledger.fault("SIGKILL of a sweep running as PID 1 in a PID namespace, resumed as PID 1 on the same host"):
        snapshot = json.loads((db.parent / f"{db.name}.status.json").read_text())  # what the killed holder wrote
        assert snapshot["runs"][0]["status"] == "running", snapshot["runs"]
        assert "`kill -INT 1`" in snapshot["markdown"]["1"], "the sweep did not run as PID 1"
        resume = subprocess.run(_in_container("-m", "runner", "sweep", "--db", db, "--resume", 1, "--quiet"),
                                cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
        assert resume.returncode == 0, resume.stderr
        store = Store(db)
        try:
            numbers = whole_batches(store, 1)
            assert (numbers["status"], numbers["done"]) == ("finished", PROBLEMS)
            expected = reference_rows(tmp_path / "reference.duckdb", tiny_reasoner,
                                      sweep_config(tiny_model_dir, limit=PROBLEMS))
            assert_same_results(result_rows(store, 1), expected)
        finally:
            store.close()
