"""A database file copied from elsewhere is data: its views cannot read local files through us.

The minimal guard of issue 14's first case (the rest of that issue is still open): every Store
connection runs with DuckDB's external access off, so a `problems` view that calls read_text on a
local file fails instead of leaking the file into a page.
"""
from __future__ import annotations

import duckdb
import pytest

from db.store import Store, StoreError

SECRET = "the-contents-of-a-private-file"


def _hostile_file(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    path = tmp_path / "hostile.duckdb"
    Store(path).close()  # our schema, then one table swapped for a view that reads the local file
    conn = duckdb.connect(str(path))
    conn.execute("DROP TABLE problems")
    conn.execute(f"CREATE VIEW problems AS SELECT 1 AS run_id, 'p' AS problem_id, 0 AS ord, "
                 f"(SELECT content FROM read_text('{secret}')) AS question, '1' AS gold, 1.0 AS gold_value, "
                 f"1 AS difficulty, '' AS solution, 'full' AS phase")
    conn.close()
    return path


def test_a_view_that_reads_a_local_file_reads_nothing(tmp_path):
    with pytest.raises(StoreError) as refused:  # a view is not one of our tables: the file is refused at open
        Store(_hostile_file(tmp_path))
    message = str(refused.value)
    assert SECRET not in message and "problems is not a table" in message and "\n" not in message, message
    store = Store(tmp_path / "plain.duckdb")
    try:
        with pytest.raises(StoreError):
            store.query("SELECT content FROM read_text(?)", [str(tmp_path / "secret.txt")])
    finally:
        store.close()


def test_the_connection_cannot_be_talked_out_of_it(tmp_path):
    store = Store(tmp_path / "plain.duckdb")
    try:
        with pytest.raises(StoreError):  # lock_configuration: a file's macro or a query cannot turn it back on
            store.query("SET enable_external_access = true")
        assert store.query("SELECT current_setting('enable_external_access')")[0][0] is False
    finally:
        store.close()
