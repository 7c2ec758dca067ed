"""Rows into DuckDB: row dicts (or a frame) as an Arrow table, the variants' descriptions, one INSERT.

db/store.py's writes of problems and results go through here. DuckDB reads an Arrow table in place,
and one built column by column from a batch's 896 row dicts takes ~1.5 ms; a pandas frame of them,
merged with the variants' descriptions, made the whole write of a 128 x 7 batch 36 ms instead of 25
(`python bench/breakdown.py`, "storing them").
"""
from __future__ import annotations

import contextlib

import duckdb
import pandas as pd
import pyarrow

from db.migrations import DESCRIBED, describe_key


class UnstorableRows(ValueError):
    """Rows that cannot become a table (text that is not Unicode, a column of mixed types): nothing was stored."""


def table_of(rows: list[dict] | pd.DataFrame) -> pyarrow.Table:
    """The rows as an Arrow table; a column is every key any row has (None where a row lacks it)."""
    try:
        if isinstance(rows, pd.DataFrame):
            return pyarrow.Table.from_pandas(rows, preserve_index=False)
        names = dict.fromkeys(name for row in rows for name in row)
        return pyarrow.table({name: [row.get(name) for row in rows] for name in names})
    except UnicodeEncodeError:
        raise UnstorableRows(_not_unicode(rows)) from None
    except pyarrow.ArrowException as error:  # one column of mixed types, say: said, and nothing half-stored
        raise UnstorableRows(f"rows that cannot be stored ({error}): nothing was stored") from None


def described(cursor: duckdb.DuckDBPyConnection, run_id: int, table: pyarrow.Table) -> pyarrow.Table:
    """Result rows with what their variant ablated (migration 3's columns, describe_key), in place of any given."""
    ((num_latent,),) = cursor.execute("SELECT num_latent FROM runs WHERE id = $run", {"run": run_id}).fetchall()
    keys = table.column("variant").to_pylist()
    descriptions = {key: describe_key(key, num_latent) for key in set(keys)}
    table = table.drop_columns([name for name in DESCRIBED if name in table.column_names])
    for name in DESCRIBED:
        table = table.append_column(name, pyarrow.array([descriptions[key].get(name) for key in keys]))
    return table


def append(cursor: duckdb.DuckDBPyConnection, table: str, rows: pyarrow.Table, columns: list[str], run_id: int) -> None:
    """rows into `table`'s `columns`, with run_id; a column the rows lack takes its default (NULL where it has
    none), one they add is left out. `table` and `columns` are ours (db/store.py's names), never a caller's."""
    # A registered table is inserted in one statement; executemany would run row by row.
    given = set(rows.column_names)
    columns = [c for c in columns if c == "run_id" or c in given]
    values = ", ".join("$run" if c == "run_id" else c for c in columns)
    cursor.register("_incoming", rows)
    try:
        cursor.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT {values} FROM _incoming", {"run": run_id})
    finally:
        with contextlib.suppress(duckdb.Error):  # fails in an aborted transaction; keep the first error
            cursor.unregister("_incoming")


def _not_unicode(rows) -> str:
    """Which row and field hold text that UTF-8 cannot store (a lone surrogate such as "\\ud800" from a JSON escape)."""
    records = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else rows
    for record in records:
        for field, value in record.items():
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as error:
                    return (f"problem {record.get('problem_id')!r}: {field} is not valid Unicode text "
                            f"({value[error.start]!r} at character {error.start}, a lone surrogate): "
                            f"fix the dataset; nothing was stored")
    return "text that is not valid Unicode: nothing was stored"
