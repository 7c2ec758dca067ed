"""Ordered, numbered schema migrations, recorded in the database (after simonw/llm's migrations.py).

Append new migrations at the end; never edit or reorder one that has shipped: a database file
copied from a GPU server months ago must still open and be brought up to date.
"""
from __future__ import annotations

from pathlib import Path

import duckdb

SCHEMA = Path(__file__).with_name("schema.sql")


def _initial_schema(cursor: duckdb.DuckDBPyConnection) -> None:
    cursor.execute(SCHEMA.read_text())


def _generated_tokens(cursor: duckdb.DuckDBPyConnection) -> None:
    # The ids a rollout generated (EOS excluded): exact reproduction can be checked id by id.
    # prefix_value: the number after "The answer is:", beside answer_value (CODI's official last number).
    # Rows stored before this migration have neither: NULL.
    cursor.execute("ALTER TABLE results ADD COLUMN tokens INTEGER[]")
    cursor.execute("ALTER TABLE results ADD COLUMN prefix_value DOUBLE")


MIGRATIONS = [
    (1, "initial schema", _initial_schema),
    (2, "results.tokens and results.prefix_value", _generated_tokens),
]


def migrate(cursor: duckdb.DuckDBPyConnection) -> list[int]:
    """Apply every migration the database has not recorded; returns the versions applied."""
    cursor.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                   "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied TIMESTAMP DEFAULT current_timestamp)")
    done = {row[0] for row in cursor.execute("SELECT version FROM schema_migrations").fetchall()}
    applied = []
    for version, name, step in MIGRATIONS:
        if version in done:
            continue
        cursor.execute("BEGIN TRANSACTION")
        try:
            step(cursor)
            cursor.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [version, name])
            cursor.execute("COMMIT")
        except Exception:
            cursor.execute("ROLLBACK")
            raise
        applied.append(version)
    return applied
