"""A crash at every write point, not at random moments (as SQLite and DuckDB test themselves).

A first pass runs the command to the end and counts its write points: each statement a Store runs that
changes the file (BEGIN, INSERT, UPDATE, COMMIT, ...) for a sweep and an import; each step of the atomic
file write (open, fsync, rename, fsync of the folder) for an export. Then, for every i, a fresh child
runs the same command and SIGKILLs itself just before point i (forkserver.py: a real process death, no
handler runs). After each death the file is reopened and must hold:
- no false record: no run still "running", none "finished" with fewer than all its rows, none without
  its problems; no orphan rows (results, problems, metrics, reference latents without their run, results
  without their problem); every committed batch whole (support.whole_batches);
- a sweep resumes to exactly the rows of the uninterrupted run; an import is all there or not there;
- each exported file is its previous content or the new one, byte for byte, never a mix.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from db.store import Store
from runner.sweep import Sweep, SweepConfig
from tests.reliability.support import REPO, assert_same_results, result_rows, whole_batches

SWEEP = ["--model", "default", "--limit", 6, "--validation", 2, "--batch-size", 2, "--schemes", "prefix", "--quiet"]
SEED = REPO / "tests" / "fixtures" / "seed"
ORPHANS = """
    SELECT 'results without a run', count(*) FROM results WHERE run_id NOT IN (SELECT id FROM runs)
    UNION ALL SELECT 'problems without a run', count(*) FROM problems WHERE run_id NOT IN (SELECT id FROM runs)
    UNION ALL SELECT 'metrics without a run', count(*) FROM run_metrics WHERE run_id NOT IN (SELECT id FROM runs)
    UNION ALL SELECT 'reference latents without a run', count(*) FROM reference_latents
        WHERE run_id NOT IN (SELECT id FROM runs)
    UNION ALL SELECT 'results without their problem', count(*) FROM results r
        WHERE NOT EXISTS (SELECT 1 FROM problems p WHERE p.run_id = r.run_id AND p.problem_id = r.problem_id)"""


def _points(forkserver, tmp_path, argv: list, kind: str) -> int:
    """Run argv to the end once, counting its write points."""
    tally = tmp_path / "tally"
    code, _, err = forkserver.cli(*argv, die_at={"points": kind, "at": None, "tally": str(tally)})
    assert code == 0, err
    return int(tally.read_text())


def _killed_at(forkserver, argv: list, kind: str, at: int, folder: Path) -> None:
    code, _, err = forkserver.cli(*argv, die_at={"points": kind, "at": at, "tally": str(folder / "tally")})
    assert code == -9, f"write point {at}: the child was not killed (exit {code}): {err}"


def _no_false_record(store: Store) -> list[tuple]:
    """The invariants every file keeps whatever the crash; returns its runs (id, status, source)."""
    orphans = [(what, n) for what, n in store.query(ORPHANS) if n]
    assert not orphans, orphans
    runs = store.query("SELECT id, status, source, done, total, n_variants, "
                       "(SELECT count(*) FROM problems WHERE run_id = runs.id), "
                       "(SELECT count(*) FROM results WHERE run_id = runs.id) FROM runs ORDER BY id")
    for run_id, status, source, done, total, n_variants, problems, results in runs:
        assert status != "running", f"run {run_id} still 'running' after its process died"
        assert problems == total > 0, f"run {run_id}: {problems} problems stored of {total}"
        if status == "finished":
            assert done == total and results == total * n_variants, f"run {run_id} 'finished' with {results} rows"
        if source == "sweep":
            whole_batches(store, run_id)
    return [(run_id, status, source) for run_id, status, source, *_ in runs]


def test_a_sweep_killed_at_each_write_point_reopens_clean_and_resumes_to_the_same_rows(
        tmp_path, forkserver, default_reasoner, ledger):
    reference = tmp_path / "reference.duckdb"
    n = _points(forkserver, tmp_path, ["sweep", "--db", reference, *SWEEP], "store")
    store = Store(reference)
    expected = result_rows(store, 1)
    store.close()
    assert n >= 20, f"only {n} write points counted: the wrapper missed the store's statements"
    for at in range(1, n + 1):
        db = tmp_path / f"killed{at}.duckdb"
        _killed_at(forkserver, ["sweep", "--db", db, *SWEEP], "store", at, tmp_path)
        with ledger.fault(f"CLI sweep SIGKILLed before write point {at}/{n}, reopened and resumed"):
            store = Store(db)
            try:
                runs = _no_false_record(store)
                assert len(runs) <= 1, runs
                if runs:
                    config = SweepConfig.from_json(json.loads(store.run_row(1)["config"]))
                    assert Sweep(store, default_reasoner, config, 1).run() == "finished"
                    assert_same_results(result_rows(store, 1), expected)
                    _no_false_record(store)
            finally:
                store.close()


def test_an_import_killed_at_each_write_point_leaves_the_whole_run_or_none(tmp_path, forkserver, ledger):
    argv = ["import-seed", SEED / "step_importance_scores.json", SEED / "step_importance_validation.json"]
    reference = tmp_path / "reference.duckdb"
    n = _points(forkserver, tmp_path, [*argv, "--db", reference], "store")
    store = Store(reference)
    expected = result_rows(store, 1)
    store.close()
    assert n >= 5, f"only {n} write points counted"
    for at in range(1, n + 1):
        db = tmp_path / f"killed{at}.duckdb"
        _killed_at(forkserver, [*argv, "--db", db], "store", at, tmp_path)
        with ledger.fault(f"import-seed SIGKILLed before write point {at}/{n}"):
            store = Store(db)
            try:
                runs = _no_false_record(store)
                assert runs in ([], [(1, "finished", "import")]), runs
                if runs:
                    assert result_rows(store, 1) == expected
            finally:
                store.close()


def test_an_export_killed_at_each_write_point_leaves_every_file_old_or_new(tmp_path, forkserver, finished_db, ledger):
    db = tmp_path / "export.duckdb"
    shutil.copy(finished_db.path, db)
    out = tmp_path / "out"
    argv = ["export", "--db", db, "--run", finished_db.sweep_id, "--format", "seed-json", "--out", out]
    n = _points(forkserver, tmp_path, argv, "files")
    new = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
    assert len(new) == 3 and n >= 9, (sorted(new), n)
    old = {name: b"[]\n" for name in new}  # an earlier export, different from the new one
    for at in range(1, n + 1):
        shutil.rmtree(out)
        out.mkdir()
        for name, data in old.items():
            (out / name).write_bytes(data)
        _killed_at(forkserver, argv, "files", at, tmp_path)
        with ledger.fault(f"export --format seed-json SIGKILLed before file write point {at}/{n}"):
            for name in new:
                assert (out / name).read_bytes() in (old[name], new[name]), f"{name} is neither old nor new"
            store = Store(db)
            try:
                runs = _no_false_record(store)
                assert (finished_db.sweep_id, "finished", "sweep") in runs
            finally:
                store.close()

