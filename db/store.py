"""The DuckDB file: opening it (one process at a time), migrations, and every write.

DuckDB lets one process hold a database file read-write. Inside that process any number of
threads share one `Store`, each through its own cursor (`Store.cursor()` is per thread). The
sweep thread writes a whole batch (results, progress, metrics) in one transaction, so readers
in other threads never see half a batch and a crash loses at most the batch in flight.
A command that writes several things (a run and its problems, an import) writes them in one
transaction: `transaction()` blocks nest, the outermost commits. Opening a file read-write repairs
what a dead process left (db/recovery.py). Every `duckdb.Error` leaves this
module as a `StoreError` whose message says what to do.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow

from db import recovery, status_file
from db import rows as rows_to_db
from db.migrations import SchemaError, migrate
from runner.errors import ThoughtSweepError

RESULT_COLUMNS = ["run_id", "problem_id", "variant", "scheme", "k", "method", "site", "mode", "answer_text",
                  "answer_value", "extraction", "correct", "changed", "flip", "harm", "help", "gold_logprob",
                  "logprob_drop", "lens", "tokens", "prefix_value", "ablated_positions", "latents_fed", "position"]
PROBLEM_COLUMNS = ["run_id", "problem_id", "ord", "question", "gold", "gold_value", "difficulty", "solution", "phase"]
METRIC_COLUMNS = ["run_id", "elapsed_s", "phase", "done", "batch_problems", "batch_size", "problems_per_hour",
                  "rss_mb", "cpu_pct", "gpu_mem_mb", "gpu_peak_mb", "sweep_pss_mb"]
RUN_FIELDS = {"name", "status", "phase", "done", "total", "started", "finished", "elapsed_s", "problems_per_hour",
              "peak_rss_mb", "peak_gpu_mb", "batch_size", "device", "pid", "host", "error", "notes", "tags",
              "n_variants", "config"}
STATUSES = ("running", "finished", "stopped", "interrupted", "failed")


# A database file is data, never code: a view or macro in a copied file must not read local files or the
# network (read_text, read_csv, httpfs), and opening a foreign file must not fetch an extension.
# One thread: DuckDB's worker threads call glibc's malloc_trim after their tasks, which hands every free page
# of every malloc arena of the process back to the system, those the sweep's CPU batches keep for the next one
# (runner/memory.py) included: after each committed batch the next one faulted ~30,000 pages in again, 5-10%
# of its rollout's time (the embedded model, 128 x 7, one worker). With one thread DuckDB runs a query on the
# caller's thread, has no worker and no such call; the dashboard's queries on 1.6M rows ran as fast
# (bench/queries.py, medians within 10% either way).
CONNECT_CONFIG = {"enable_external_access": False, "autoinstall_known_extensions": False,
                  "autoload_known_extensions": False, "allow_community_extensions": False,
                  "threads": 1, "lock_configuration": True}


class StoreError(ThoughtSweepError, RuntimeError):
    """A database problem, phrased so that a person can act on it."""


class DatabaseLocked(StoreError):
    """Another process holds the database file."""


def _locked_message(path: Path, error: Exception) -> str:
    pid = re.search(r"PID (\d+)", str(error))
    holder = f"process {pid.group(1)}" if pid else "another process"
    return (f"database {path} is in use by {holder}: DuckDB allows one process per file. "
            f"Stop that process, or pass --db with another file (the dashboard and a CLI sweep cannot share one)")


def _params(params):
    return params if isinstance(params, dict) else list(params)


def _plain(value):
    """A numpy scalar as the Python value DuckDB binds."""
    return value.item() if isinstance(value, np.generic) else value


class Store:
    """One DuckDB file for this process; threads get their own cursors."""

    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = Path(path).expanduser()
        self.read_only = read_only
        if read_only and not self.path.exists():
            raise StoreError(f"database {self.path} does not exist")
        if not read_only and not self.path.parent.exists():
            raise StoreError(f"cannot create database {self.path}: folder {self.path.parent} does not exist")
        from db import trust  # here, not at the top: trust's error class is a StoreError
        trust.check_file(self.path)
        try:
            config = CONNECT_CONFIG
            self._conn = duckdb.connect(str(self.path), read_only=read_only, config=config)  # enable_external_access=false
        except duckdb.IOException as error:
            if "lock" in str(error).lower():
                raise DatabaseLocked(_locked_message(self.path, error)) from None
            raise StoreError(f"cannot open database {self.path}: {error}") from None
        except duckdb.Error as error:
            raise StoreError(f"cannot open database {self.path}: {error} (is it a DuckDB file?)") from None
        try:
            trust.check_catalog(self._conn, self.path)  # before any table is read or migrated
        except BaseException:
            self._conn.close()
            raise
        self._local = threading.local()
        self.pages = status_file.Pages(self)  # the status file's markdown pages, built off the caller's thread
        try:
            with self._errors("checking the schema"):
                migrate(self._conn.cursor(), self.path, read_only=read_only)  # refuses a newer file in one line
        except (SchemaError, StoreError) as error:
            self.close()  # never keep a file we refused to read
            raise StoreError(str(error)) from None
        if not read_only:
            recovery.repair(self)  # stale 'running' rows, runs without problems (db/recovery.py)
            self.publish_status()

    # --- plumbing ---------------------------------------------------------------------------------
    def cursor(self) -> duckdb.DuckDBPyConnection:
        """This thread's cursor (DuckDB connections are not shared between threads)."""
        cursor = getattr(self._local, "cursor", None)
        if cursor is None:
            cursor = self._local.cursor = self._conn.cursor()
        return cursor

    def release_cursor(self) -> None:
        """Close this thread's cursor: every thread of ours that used the store calls this before it says it is
        done. Otherwise the cursor goes when the thread ends, and if that is while `close()` runs, the file shuts
        down on the ending thread after `close()` returned: its WAL still on disk, its checkpoint moments later
        (and a process exiting then aborts in DuckDB)."""
        cursor = self._local.__dict__.pop("cursor", None)
        if cursor is not None:
            with contextlib.suppress(duckdb.Error):
                cursor.close()

    @contextlib.contextmanager
    def _errors(self, doing: str):
        try:
            yield
        except duckdb.Error as error:
            raise StoreError(f"{self.path}: {doing} failed: {error}") from None

    @contextlib.contextmanager
    def transaction(self, doing: str):
        """BEGIN ... COMMIT on this thread's cursor; ROLLBACK and StoreError on any failure.

        Inside another `transaction()` on this thread it joins that one: the outermost block commits
        or rolls back everything, so a command of several writes is all or nothing.
        """
        cursor = self.cursor()
        if getattr(self._local, "in_transaction", False):
            with self._errors(doing):
                yield cursor
            return
        with self._errors(doing):
            cursor.execute("BEGIN TRANSACTION")
            self._local.in_transaction = True
            try:
                yield cursor
                cursor.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    cursor.execute("ROLLBACK")
                raise
            finally:
                self._local.in_transaction = False

    def query(self, sql: str, params: list | tuple | dict = ()) -> list[tuple]:
        with self._errors("a query"):
            return self.cursor().execute(sql, _params(params)).fetchall()

    def query_df(self, sql: str, params: list | tuple | dict = ()) -> pd.DataFrame:
        """`params`: a list for `?`, or a dict for named `$name` parameters."""
        with self._errors("a query"):
            return self.cursor().execute(sql, _params(params)).df()

    def query_arrow(self, sql: str, params: list | tuple | dict = ()) -> pyarrow.Table:
        with self._errors("a query"):
            return self.cursor().sql(sql, params=_params(params)).to_arrow_table()

    def query_records(self, sql: str, params: list | tuple | dict = ()) -> list[dict]:
        """Rows as {column: Python value} dicts."""
        with self._errors("a query"):
            cursor = self.cursor().execute(sql, _params(params))
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def query_columns(self, sql: str, params: list | tuple | dict = ()) -> dict[str, list]:
        """{column: Python values, None for NULL}: twice as fast as fetchall for rows that become Python objects."""
        with self._errors("a query"):
            return {name: values.tolist() for name, values in
                    self.cursor().execute(sql, _params(params)).fetchnumpy().items()}

    def close(self) -> None:
        self.pages.close()  # the pages asked for are written first: they read this connection
        with contextlib.suppress(duckdb.Error):
            self._conn.close()

    def publish_status(self, run_id: int | None = None) -> None:
        """The snapshot that `runner status` reads while this process holds the file (db/status_file.py)."""
        if not self.read_only and not getattr(self._local, "in_transaction", False):  # never an uncommitted view
            status_file.publish(self, run_id)

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"database {self.path} is open read-only")

    # --- runs --------------------------------------------------------------------------------------
    def create_run(self, *, name: str, model: str, dataset: str, config: dict, num_latent: int, n_variants: int,
                   total: int = 0, status: str = "running", source: str = "sweep", device: str | None = None,
                   batch_size: int | None = None, positions: str = "latent",
                   problems: list[dict] | pd.DataFrame | None = None) -> int:
        """A new runs row and, when given, its problems (PROBLEM_COLUMNS), in one transaction.

        `positions`: how its rows number latent positions (runner.ablation.POSITIONS).
        """
        self._check_writable()
        table = None if problems is None else self._table(problems)
        with self.transaction("creating a run") as cursor:
            (run_id,) = cursor.execute(
                "INSERT INTO runs (name, model, dataset, config, source, status, num_latent, n_variants, total, "
                "device, batch_size, pid, host, positions, started) VALUES ($name, $model, $dataset, $config, "
                "$source, $status, $num_latent, $n_variants, $total, $device, $batch_size, $pid, $host, $positions, "
                "current_timestamp) RETURNING id",
                {"name": name, "model": model, "dataset": dataset, "config": json.dumps(config), "source": source,
                 "status": status, "num_latent": num_latent, "n_variants": n_variants, "total": total,
                 "device": device, "batch_size": batch_size, "pid": os.getpid() if status == "running" else None,
                 "host": socket.gethostname(), "positions": positions}).fetchone()
            if table is not None:
                rows_to_db.append(cursor, "problems", table, PROBLEM_COLUMNS, run_id)
        if status == "running":
            recovery.claim(self, run_id)
        self.publish_status(run_id)
        return run_id

    def update_run(self, run_id: int, **fields) -> None:
        """Set run columns by name (see RUN_FIELDS); `finished=True` stamps the current time."""
        self._update_run(run_id, **fields)
        self.publish_status(run_id)

    def _update_run(self, run_id: int, **fields) -> None:
        self._check_writable()
        unknown = set(fields) - RUN_FIELDS
        assert not unknown, f"unknown run fields {sorted(unknown)}"
        if "status" in fields:
            assert fields["status"] in STATUSES, f"status {fields['status']!r} not in {STATUSES}"
        sets, params = [], {"id": run_id}
        for column, value in fields.items():
            if column == "finished" and value is True:
                sets.append("finished = current_timestamp")
                continue
            if column == "config" and not isinstance(value, str):
                value = json.dumps(value)
            sets.append(f"{column} = ${column}")  # column names come from RUN_FIELDS, never from input
            params[column] = value
        with self._errors(f"updating run {run_id}"):
            self.cursor().execute(f"UPDATE runs SET {', '.join(sets)} WHERE id = $id", params)
        if fields.get("status", "running") != "running":
            recovery.release(self, run_id)

    def claim_run(self, run_id: int, batch_size: int | None, device: str | None) -> None:
        """Mark a run as running in this process (a start or a resume)."""
        self._check_writable()
        if not self.query("SELECT 1 FROM problems WHERE run_id = ? LIMIT 1", [run_id]):
            raise StoreError(f"run {run_id}: {recovery.DAMAGED}")  # else it would 'finish' with 0 of 0 problems
        with self._errors(f"resuming run {run_id}"):
            self.cursor().execute(
                "UPDATE runs SET status = 'running', pid = $pid, host = $host, error = NULL, finished = NULL, "
                "batch_size = $batch_size, device = $device WHERE id = $id",
                {"pid": os.getpid(), "host": socket.gethostname(), "batch_size": batch_size, "device": device,
                 "id": run_id})
        recovery.claim(self, run_id)
        self.publish_status(run_id)

    def delete_run(self, run_id: int) -> None:
        self._check_writable()
        with self.transaction(f"deleting run {run_id}") as cursor:
            for table in ("results", "problems", "run_metrics", "reference_latents"):
                cursor.execute(f"DELETE FROM {table} WHERE run_id = $run", {"run": run_id})  # fixed table names
            cursor.execute("DELETE FROM runs WHERE id = ?", [run_id])
        self.publish_status()

    # --- problems and results -------------------------------------------------------------------------
    @staticmethod
    def _table(rows: list[dict] | pd.DataFrame) -> pyarrow.Table:
        try:
            return rows_to_db.table_of(rows)
        except rows_to_db.UnstorableRows as error:
            raise StoreError(str(error)) from None

    def insert_problems(self, run_id: int, problems: list[dict] | pd.DataFrame) -> None:
        """Rows with PROBLEM_COLUMNS (run_id filled in), in one transaction."""
        self._check_writable()
        table = self._table(problems)
        with self.transaction(f"storing the problems of run {run_id}") as cursor:
            rows_to_db.append(cursor, "problems", table, PROBLEM_COLUMNS, run_id)

    def write_batch(self, run_id: int, results: list[dict] | pd.DataFrame, metrics: dict | None = None,
                    skipped: dict[str, str] | None = None, **run_fields) -> None:
        """One batch in one transaction: its results, a metrics row, the run's progress, and the problems
        of the batch the model cannot run (`skipped`: problem id -> why, into problems.skip_reason)."""
        self._check_writable()
        table = self._table(results)
        with self.transaction(f"storing a batch of run {run_id}") as cursor:
            if table.num_rows:
                rows_to_db.append(cursor, "results", rows_to_db.described(cursor, run_id, table), RESULT_COLUMNS, run_id)
            for problem_id, reason in (skipped or {}).items():
                cursor.execute("UPDATE problems SET skip_reason = $reason WHERE run_id = $run AND problem_id = $problem",
                               {"reason": reason, "run": run_id, "problem": problem_id})
            if metrics is not None:  # one row: named parameters (a registered frame costs ~4 ms)
                cursor.execute(f"INSERT INTO run_metrics ({', '.join(METRIC_COLUMNS)}) VALUES "
                               f"({', '.join('$' + c for c in METRIC_COLUMNS)})",
                               {c: _plain(metrics.get(c)) for c in METRIC_COLUMNS} | {"run_id": run_id})
            if run_fields:
                self._update_run(run_id, **run_fields)
        self.publish_status(run_id)  # after COMMIT: the snapshot never shows a batch that could roll back

    def stored_problem_ids(self, run_id: int) -> set[str]:
        """Problems whose batch was committed (the baseline row is written with all variants), those the
        model cannot run (skipped) included: a resume runs neither again."""
        rows = self.query("SELECT problem_id FROM results WHERE run_id = $run AND scheme = 'baseline' UNION "
                          "SELECT problem_id FROM problems WHERE run_id = $run AND skip_reason IS NOT NULL",
                          {"run": run_id})
        return {r[0] for r in rows}

    def skipped_problems(self, run_id: int) -> dict[str, str]:
        """{problem id: why the model cannot run it}, in run order."""
        return dict(self.query("SELECT problem_id, skip_reason FROM problems WHERE run_id = $run "
                               "AND skip_reason IS NOT NULL ORDER BY ord", {"run": run_id}))

    def run_problems(self, run_id: int) -> list[dict]:
        """The run's problems in run order."""
        frame = self.query_df(f"SELECT {', '.join(PROBLEM_COLUMNS)} FROM problems WHERE run_id = $run ORDER BY ord",
                              {"run": run_id})
        return frame.to_dict("records")

    def run_row(self, run_id: int) -> dict | None:
        frame = self.query_df("SELECT * FROM runs WHERE id = ?", [run_id])
        return None if frame.empty else frame.iloc[0].to_dict()

    # --- reference latents (mean / noise / resample) ---------------------------------------------------
    def save_reference(self, run_id: int, site: str, problem_ids: list[str], values: np.ndarray) -> None:
        self._check_writable()
        values = np.ascontiguousarray(values, dtype=np.float32)
        with self.transaction(f"storing reference latents of run {run_id}") as cursor:
            cursor.execute("DELETE FROM reference_latents WHERE run_id = ? AND site = ?", [run_id, site])
            cursor.execute("INSERT INTO reference_latents (run_id, site, problem_ids, shape, data) "
                           "VALUES ($run, $site, $ids, $shape, $data)",
                           {"run": run_id, "site": site, "ids": json.dumps(problem_ids),
                            "shape": json.dumps(list(values.shape)), "data": values.tobytes()})

    def load_reference(self, run_id: int, site: str) -> tuple[list[str], np.ndarray] | None:
        rows = self.query("SELECT problem_ids, shape, data FROM reference_latents WHERE run_id = ? AND site = ?",
                          [run_id, site])
        if not rows:
            return None
        problem_ids, shape, data = rows[0]
        return json.loads(problem_ids), np.frombuffer(data, dtype=np.float32).reshape(json.loads(shape)).copy()
