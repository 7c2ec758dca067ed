"""Ordered, numbered schema migrations, recorded in the database (after simonw/llm's migrations.py).

Append new migrations at the end; never edit or reorder one that has shipped: a database file
copied from a GPU server months ago must still open and be brought up to date.

What a file holds is read from its tables, not only from its `schema_migrations` record: the columns
of our tables are compared with those that MIGRATIONS[:N] give an empty database, for each N. A file
whose tables match version N (a file from before the record existed, or with a record cut short)
gets N recorded and the migrations after N applied in order; one with a version or columns that this
code does not know was written by a newer ThoughtSweep and is refused before anything is written.
"""
from __future__ import annotations

import functools
from pathlib import Path

import duckdb
import pandas as pd

SCHEMA = Path(__file__).with_name("schema.sql")


def _initial_schema(cursor: duckdb.DuckDBPyConnection) -> None:
    cursor.execute(SCHEMA.read_text())


def _generated_tokens(cursor: duckdb.DuckDBPyConnection) -> None:
    # The ids a rollout generated (EOS excluded): exact reproduction can be checked id by id.
    # prefix_value: the number after "The answer is:", beside answer_value (CODI's official last number).
    # Rows stored before this migration have neither: NULL.
    cursor.execute("ALTER TABLE results ADD COLUMN tokens INTEGER[]")
    cursor.execute("ALTER TABLE results ADD COLUMN prefix_value DOUBLE")


def _self_describing_rows(cursor: duckdb.DuckDBPyConnection) -> None:
    # What each row ablated (latent positions, latents fed before EOT) and where it is plotted,
    # written by Store.write_batch from runner.ablation.Variant, so that no reader derives them from
    # scheme and k; and how the run numbers positions (runner.ablation.POSITIONS): the imported old
    # script's runs are 'old-script'. Rows stored before this migration are described here, once.
    cursor.execute("ALTER TABLE results ADD COLUMN ablated_positions INTEGER[]")
    cursor.execute("ALTER TABLE results ADD COLUMN latents_fed INTEGER")
    cursor.execute("ALTER TABLE results ADD COLUMN position INTEGER")
    cursor.execute("ALTER TABLE runs ADD COLUMN positions TEXT DEFAULT 'latent'")
    cursor.execute("UPDATE runs SET positions = CASE WHEN source = 'import' THEN 'old-script' ELSE 'latent' END")
    variants = cursor.execute("SELECT DISTINCT r.run_id, r.variant, u.num_latent FROM results r "
                              "JOIN runs u ON u.id = r.run_id").fetchall()
    if variants:
        described = describe_variants(variants)
        cursor.register("_described", described)
        try:
            cursor.execute("UPDATE results SET ablated_positions = d.ablated_positions, latents_fed = d.latents_fed, "
                           "position = d.position FROM _described d "
                           "WHERE results.run_id = d.run_id AND results.variant = d.variant")
        finally:
            cursor.unregister("_described")


def _skip_reason(cursor: duckdb.DuckDBPyConnection) -> None:
    # Why the model cannot run a problem (its prompt does not fit the model's positions, its question is
    # empty once tokenised): written with the batch it was cut in, so the sweep goes on and a resume does
    # not retry it. NULL: the problem ran (or has not yet).
    cursor.execute("ALTER TABLE problems ADD COLUMN skip_reason TEXT")


DESCRIBED = ("ablated_positions", "latents_fed", "position")  # migration 3's columns, from the variant key


def _sweep_memory(cursor: duckdb.DuckDBPyConnection) -> None:
    # rss_mb is the memory of the process that ran a batch: one worker's, when batches run in forked worker
    # processes. sweep_pss_mb is what the sweep's processes on that machine hold together (runner/batch.py's
    # sweep_pss_mb), at the batch's commit; NULL where it was not measured (earlier rows, Ray, no PSS).
    cursor.execute("ALTER TABLE run_metrics ADD COLUMN sweep_pss_mb DOUBLE")


def describe_key(key: str, num_latent: int) -> dict:
    """What the variant `key` ablated (DESCRIBED, from runner.ablation.Variant); {} for a key ThoughtSweep
    never wrote: its rows stay undescribed (NULL), never guessed."""
    from runner.ablation import Variant  # torch: only a writer needs it, and only here

    try:
        return Variant.from_key(key).describe(int(num_latent))
    except ValueError:
        return {}


def describe_variants(variants) -> pd.DataFrame:
    """(run_id, variant key, num_latent) triples -> what each variant ablated (describe_key)."""
    rows = [{"run_id": run_id, "variant": key, **describe_key(key, num_latent)} for run_id, key, num_latent in variants]
    frame = pd.DataFrame(rows, columns=["run_id", "variant", *DESCRIBED])
    return frame.astype({"position": "Int64", "latents_fed": "Int64"})


MIGRATIONS = [
    (1, "initial schema", _initial_schema),
    (2, "results.tokens and results.prefix_value", _generated_tokens),
    (3, "self-describing result rows: ablated_positions, latents_fed, position; runs.positions", _self_describing_rows),
    (4, "problems.skip_reason", _skip_reason),
    (5, "run_metrics.sweep_pss_mb", _sweep_memory),
]


class SchemaError(RuntimeError):
    """A file whose schema this code cannot open (newer, or not ours); one line saying which and why."""


RECORD = ("CREATE TABLE IF NOT EXISTS schema_migrations "
          "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied TIMESTAMP DEFAULT current_timestamp)")
COLUMNS = ("SELECT c.table_name, c.column_name, c.data_type FROM information_schema.columns c "
           "JOIN information_schema.tables t USING (table_catalog, table_schema, table_name) "
           "WHERE t.table_type = 'BASE TABLE' AND c.table_schema = 'main' AND c.table_catalog = current_database() "
           "AND c.table_name <> 'schema_migrations'")
LATEST = MIGRATIONS[-1][0]


def _columns(cursor) -> dict[str, dict[str, str]]:
    """{table: {column: type}} of the base tables in the file (views are not tables of ours)."""
    tables: dict[str, dict[str, str]] = {}
    for table, column, data_type in cursor.execute(COLUMNS).fetchall():
        tables.setdefault(table, {})[column] = data_type
    return tables


@functools.cache
def schema_at(version: int) -> dict[str, dict[str, str]]:
    """The tables and columns that MIGRATIONS[:version] give an empty database."""
    with duckdb.connect(":memory:", config={"enable_external_access": False}) as memory:  # nothing but our own DDL
        for number, _, step in MIGRATIONS:
            if number <= version:
                step(memory)
        return _columns(memory)


def _recorded(cursor) -> list[int]:
    exists = cursor.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'main' "
                            "AND table_catalog = current_database() AND table_name = 'schema_migrations'").fetchone()
    return [v for (v,) in cursor.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()] \
        if exists[0] else []


def _version_of(path, tables: dict, recorded: list[int]) -> int:
    """The schema version the file's tables are at (0: none of our tables); SchemaError if none fits."""
    ours = {name: columns for name, columns in tables.items() if name in schema_at(LATEST)}
    if not ours:
        return 0
    matches = [v for v, _, _ in MIGRATIONS if {n: c for n, c in ours.items()} == schema_at(v)]
    if recorded and recorded == list(range(1, recorded[-1] + 1)) and recorded[-1] in matches:
        return recorded[-1]  # a migration that changes rows, not columns, leaves two versions looking alike
    if matches:
        return matches[0]
    latest = schema_at(LATEST)
    unknown = sorted(f"{t}.{c}" for t, cols in ours.items() for c in cols if c not in latest[t])
    if unknown:
        raise SchemaError(f"database {path} was written by a newer ThoughtSweep (columns {', '.join(unknown)} are "
                          f"unknown to this one): upgrade ThoughtSweep to open it; nothing was changed")
    absent = [t for t in latest if t not in ours]
    if absent:
        raise SchemaError(f"database {path} is not a ThoughtSweep file: {', '.join(absent)} "
                          f"{'is' if len(absent) == 1 else 'are'} not a table (missing, or a view); nothing was read")
    wrong = sorted(f"{t}.{c}" for t in latest for c in latest[t] if ours[t].get(c) != latest[t][c])
    raise SchemaError(f"database {path} is not a ThoughtSweep file of any version (columns missing or of another "
                      f"type: {', '.join(wrong[:5])}{', ...' if len(wrong) > 5 else ''}); nothing was changed")


def migrate(cursor: duckdb.DuckDBPyConnection, path="database", read_only: bool = False) -> list[int]:
    """Bring the file to the current schema: the versions applied, in order. Refuses a newer file first."""
    recorded = _recorded(cursor)
    newer = [v for v in recorded if v > LATEST]
    if newer:
        raise SchemaError(f"database {path} was written by a newer ThoughtSweep (schema version {max(newer)}; this "
                          f"one knows up to {LATEST}): upgrade ThoughtSweep to open it; nothing was changed")
    version = _version_of(path, _columns(cursor), recorded)
    if read_only:
        if 0 < version < LATEST:  # its queries would fail on the columns it lacks, each with a multi-line error
            raise SchemaError(f"database {path} is at schema version {version} of {LATEST} and is open read-only: "
                              f"open it once read-write (or a writable copy of it) to bring it up to date")
        return []
    cursor.execute(RECORD)
    cursor.execute("BEGIN TRANSACTION")  # the record made true to the tables: what they hold is recorded, nothing more
    try:
        cursor.execute("DELETE FROM schema_migrations WHERE version > ?", [version])
        for number, name, _ in MIGRATIONS[:version]:
            if number not in recorded:
                cursor.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [number, name])
        cursor.execute("COMMIT")
    except Exception:
        cursor.execute("ROLLBACK")
        raise
    applied = []
    for number, name, step in MIGRATIONS[version:]:
        cursor.execute("BEGIN TRANSACTION")
        try:
            step(cursor)
            cursor.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [number, name])
            cursor.execute("COMMIT")
        except Exception:
            cursor.execute("ROLLBACK")
            raise
        applied.append(number)
    return applied
