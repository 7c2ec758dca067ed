"""Ordered, numbered schema migrations, recorded in the database (after simonw/llm's migrations.py).

Append new migrations at the end; never edit or reorder one that has shipped: a database file
copied from a GPU server months ago must still open and be brought up to date.
"""
from __future__ import annotations

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


def describe_variants(variants) -> pd.DataFrame:
    """(run_id, variant key, num_latent) triples -> what each variant ablated, from runner.ablation.Variant."""
    from runner.ablation import Variant  # torch: only a writer needs it, and only here

    rows = []
    for run_id, key, num_latent in variants:
        try:
            variant = Variant.from_key(key)
        except ValueError:  # not a key ThoughtSweep wrote: the row stays undescribed (NULL), never guessed
            rows.append({"run_id": run_id, "variant": key})
            continue
        rows.append({"run_id": run_id, "variant": key, **variant.describe(int(num_latent))})
    frame = pd.DataFrame(rows, columns=["run_id", "variant", "ablated_positions", "latents_fed", "position"])
    return frame.astype({"position": "Int64", "latents_fed": "Int64"})


MIGRATIONS = [
    (1, "initial schema", _initial_schema),
    (2, "results.tokens and results.prefix_value", _generated_tokens),
    (3, "self-describing result rows: ablated_positions, latents_fed, position; runs.positions", _self_describing_rows),
    (4, "problems.skip_reason", _skip_reason),
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
