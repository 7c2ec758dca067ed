"""Format versions: a file from every earlier schema opens and is migrated; a newer file is refused in one line.

A file "at version N" is built the way that version's code built it: MIGRATIONS[:N] applied to an empty
file and recorded, then the rows of a finished database in the columns version N has. It is opened three
ways: with its record, with no record (a file from before schema_migrations, or one whose record was
lost) and with a record cut short. Each must come out at the current version with every migration after
N applied and recorded in order, its rows intact and writable. Migrations added later are covered by
the same loop without a new test.
"""
from __future__ import annotations

import duckdb
import pytest

from db import report
from db.migrations import LATEST, MIGRATIONS, RECORD, schema_at
from db.store import Store, StoreError
from runner.sweep import Sweep
from tests.reliability.support import file_digest, sweep_config

RECORDS = ("recorded", "no record", "record cut short")


def _rows(store: Store, version: int) -> dict[str, list[tuple]]:
    """The rows of every table of `version`, in that version's columns, in a fixed order."""
    return {table: store.query(f"SELECT {', '.join(columns)} FROM {table} ORDER BY ALL")  # names from the catalog
            for table, columns in schema_at(version).items()}


def _file_at(path, version: int, record: str, rows: dict[str, list[tuple]]) -> None:
    conn = duckdb.connect(str(path))
    try:
        conn.execute(RECORD)
        for number, name, step in MIGRATIONS[:version]:
            step(conn)
            conn.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [number, name])
        for table, columns in schema_at(version).items():
            if rows[table]:
                conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                                 f"({', '.join('?' * len(columns))})", rows[table])
        top = max((r[0] for r in conn.execute("SELECT id FROM runs").fetchall()), default=0)
        for _ in range(top):  # the sequence where the old code would have left it
            conn.execute("SELECT nextval('run_ids')")
        if record == "no record":
            conn.execute("DROP TABLE schema_migrations")
        elif record == "record cut short":
            conn.execute("DELETE FROM schema_migrations WHERE version > 1")
    finally:
        conn.close()


@pytest.fixture(scope="module")
def old_rows(finished_db) -> dict[int, dict[str, list[tuple]]]:
    """The finished database's rows as each earlier version held them."""
    store = Store(finished_db.path, read_only=True)
    try:
        return {version: _rows(store, version) for version in range(1, LATEST + 1)}
    finally:
        store.close()


@pytest.mark.parametrize("record", RECORDS)
@pytest.mark.parametrize("version", range(1, LATEST + 1))
def test_a_file_from_every_earlier_schema_is_migrated_in_order_and_keeps_its_rows(
        tmp_path, version, record, old_rows, finished_db, tiny_model_dir, tiny_reasoner, ledger):
    path = tmp_path / f"v{version}.duckdb"
    _file_at(path, version, record, old_rows[version])
    with ledger.bad_input(f"a file at schema version {version} of {LATEST}, {record}"):
        if version < LATEST:  # read-only it cannot be migrated: one line saying so, and nothing written
            before = file_digest(path)
            with pytest.raises(StoreError, match=f"schema version {version} of {LATEST}"):
                Store(path, read_only=True)
            assert file_digest(path) == before
        store = Store(path)
        try:
            applied = store.query("SELECT version, applied FROM schema_migrations ORDER BY version")
            assert [v for v, _ in applied] == list(range(1, LATEST + 1)), applied
            times = [t for _, t in applied]
            assert times == sorted(times), f"migrations not recorded in order: {applied}"
            tables = {t: c for t, c in store_columns(store).items() if t in schema_at(LATEST)}
            assert tables == schema_at(LATEST)
            assert _rows(store, version) == old_rows[version], "rows changed in the columns the old file had"
            assert store.run_row(finished_db.sweep_id)["status"] == "finished"
            stats = report.stats_json(store, finished_db.sweep_id)
            assert stats["n_problems"] == 6
            config = sweep_config(tiny_model_dir, limit=2)
            run_id = Sweep.create(store, tiny_reasoner, config)  # and it takes new runs
            assert run_id > max(finished_db.sweep_id, finished_db.seed_id)
            assert Sweep(store, tiny_reasoner, config, run_id).run() == "finished"
        finally:
            store.close()


def store_columns(store: Store) -> dict[str, dict[str, str]]:
    tables: dict[str, dict[str, str]] = {}
    for table, column, data_type in store.query(
            "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = 'main' "
            "AND table_name <> 'schema_migrations'"):
        tables.setdefault(table, {})[column] = data_type
    return tables


NEWER = {
    "a version above ours in schema_migrations": f"INSERT INTO schema_migrations (version, name) VALUES "
                                                 f"({LATEST + 1}, 'from the future')",
    "an unknown column": "ALTER TABLE results ADD COLUMN confidence DOUBLE",
    "a renamed column": "ALTER TABLE results RENAME COLUMN answer_text TO answer",
}


@pytest.mark.parametrize("change", NEWER)
def test_a_file_written_by_a_newer_thoughtsweep_is_refused_in_one_line_and_left_as_it_was(
        tmp_path, change, finished_db, forkserver, ledger):
    path = tmp_path / "newer.duckdb"
    path.write_bytes(finished_db.path.read_bytes())
    conn = duckdb.connect(str(path))
    conn.execute(NEWER[change])
    conn.close()
    before = file_digest(path)
    with ledger.bad_input(f"a file from a newer ThoughtSweep: {change}"):
        for read_only in (False, True):
            with pytest.raises(StoreError) as refused:
                Store(path, read_only=read_only)
            message = str(refused.value)
            assert "newer ThoughtSweep" in message and str(path) in message and "\n" not in message, message
        code, out, err = forkserver.cli("status", "--db", path)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "newer ThoughtSweep" in err, err
        assert file_digest(path) == before, "a refused file was written to"
