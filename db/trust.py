"""What a database file must be before ThoughtSweep reads it: a DuckDB file of plain tables, holding nothing that runs.

The README invites opening files copied from other machines, so a file is untrusted input. Every
connection already runs with external access off (store.CONNECT_CONFIG); on top of that a file is
refused, with one line, when
- it is not a DuckDB file at all (a SQLite file would make DuckDB reach for its sqlite extension);
- it holds a view or a macro: code that runs when a page reads `problems` (ThoughtSweep creates
  neither, so a `problems` view is never ours), or a schema other than `main`;
- a table holds a generated column, or a column default that ThoughtSweep's schema does not use:
  expressions DuckDB evaluates on every read or on our own inserts.
What remains is data: base tables, sequences, types. The text in them is still shown as text only
(dashboard/safe.py).
"""
from __future__ import annotations

import functools
from pathlib import Path

import duckdb

from db.migrations import migrate
from db.store import StoreError

DUCKDB_MAGIC = b"DUCK"  # bytes 8..11 of every DuckDB database file (its main header)
SQLITE_MAGIC = b"SQLite format 3\x00"
NOT_OURS = ("ThoughtSweep opens only files shaped as it writes them (plain tables in schema main, no views, macros "
            "or expressions of their own), so that reading one runs nothing it holds")


class UntrustedDatabase(StoreError):
    """A file that is not a ThoughtSweep database: not DuckDB, or holding code besides its tables."""


def check_file(path: Path) -> None:
    """Before DuckDB sees the file: refuse anything that is not a DuckDB database (a new, absent file is fine)."""
    if not path.is_file():
        return
    with path.open("rb") as file:
        head = file.read(16)
    if head.startswith(SQLITE_MAGIC):
        raise UntrustedDatabase(f"{path} is a SQLite database, not a DuckDB file: ThoughtSweep opens only the "
                                ".duckdb files it writes (choose another file, or a new name for an empty one)")
    if head[8:12] != DUCKDB_MAGIC:
        raise UntrustedDatabase(f"{path} is not a DuckDB database file ({_size(path)}): choose another file, "
                                "or a new name for an empty database")


def check_catalog(conn: duckdb.DuckDBPyConnection, path: Path) -> None:
    """After connecting, before any table is read: refuse views, macros, other schemas and foreign expressions."""
    try:
        found = _code_in(conn)
    except duckdb.Error as error:
        raise UntrustedDatabase(f"{path}: its catalog cannot be read ({str(error).splitlines()[0]})") from None
    if found:
        raise UntrustedDatabase(f"{path} holds {found}: {NOT_OURS}")


def _code_in(conn: duckdb.DuckDBPyConnection) -> str | None:
    """The first object that can run code, named for the message; None when the file holds data only.

    Every function here is called as system.main.*: a file's own macro named duckdb_views() or
    current_database() would otherwise answer in its place (DuckDB looks in the file's schema first),
    and no `||`, which is a function too.
    """
    here = "database_name = system.main.current_database()"
    checks = [
        (f"SELECT schema_name, view_name FROM system.main.duckdb_views() WHERE {here} AND NOT internal", "view"),
        (f"SELECT schema_name, function_name FROM system.main.duckdb_functions() WHERE {here} AND NOT internal "
         "AND function_type IN ('macro', 'table_macro')", "macro"),
        (f"SELECT schema_name, NULL FROM system.main.duckdb_schemas() WHERE {here} AND NOT internal", "schema"),
        (f"SELECT table_name, column_name FROM system.main.duckdb_columns() WHERE {here} AND is_generated",
         "generated column"),
    ]
    for sql, what in checks:
        row = conn.execute(sql).fetchone()
        if row is not None:
            return f"{what} {'.'.join(str(part) for part in row if part is not None)}"
    defaults = conn.execute(f"SELECT table_name, column_name, column_default FROM system.main.duckdb_columns() "
                            f"WHERE {here} AND column_default IS NOT NULL").fetchall()
    foreign = [(f"{table}.{column}", default) for table, column, default in defaults
               if default not in _our_defaults()]
    if foreign:
        column, default = foreign[0]
        return f"column {column} with a default ThoughtSweep never writes ({default[:60]})"
    return None


@functools.cache
def _our_defaults() -> frozenset[str]:
    """Every column default our schema uses (literals, nextval('run_ids'), current_timestamp), as DuckDB prints it."""
    conn = duckdb.connect(config={"enable_external_access": False})  # in memory: the schema every migration builds
    try:
        migrate(conn.cursor())
        rows = conn.execute("SELECT DISTINCT column_default FROM duckdb_columns() "
                            "WHERE database_name = current_database() AND column_default IS NOT NULL").fetchall()
    finally:
        conn.close()
    return frozenset(default for (default,) in rows)


def _size(path: Path) -> str:
    size = path.stat().st_size
    return "empty" if size == 0 else f"{size:,} bytes with no DuckDB header"
