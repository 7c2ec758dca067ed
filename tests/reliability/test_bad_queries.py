"""Bad input that aims past the CLI: SQL in filters and names, paths in export and upload names.

A Scope reaches SQL as `$name` parameters and names through whitelists (db/queries.py); export files get
fixed names inside the folder asked for (db/exports.py, db/seed.py); uploads are saved under
uploads/ beside the database (dashboard/sweep_form.py). Every case also checks that the database's
rows are what they were.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from db import exports, figures, queries
from db.scope import Scope
from db.store import Store
from tests.reliability.support import REPO

GOOD = b'{"question": "Ann has 2 apples and buys 3. How many?", "answer": "2+3=<<2+3=5>>5\\n#### 5"}\n'
ABSOLUTE = "/tmp/thoughtsweep-export-escape"  # an export name pointing here must never create it
SEARCHES = ["'", "''", '"', "'; DROP TABLE results; --", "' OR '1'='1", "x') OR TRUE OR ('", "%", "_", "\\",
            "?", "$1", "apples' UNION SELECT * FROM runs --", "😀'\u202e"]


# --- the query layer: filters arrive as parameters, names through whitelists ---------------------------
@pytest.fixture(scope="module")
def query_store(finished_db, tmp_path_factory):
    path = tmp_path_factory.mktemp("queries") / "copy.duckdb"
    shutil.copy(finished_db.path, path)
    store = Store(path)
    yield store
    store.close()


def _rows(store) -> dict:
    tables = [t for (t,) in store.query("SELECT table_name FROM information_schema.tables "
                                        "WHERE table_schema = 'main' ORDER BY 1")]
    return {t: store.query(f"SELECT * FROM {t} ORDER BY ALL") for t in tables}  # names from the catalog


@pytest.mark.parametrize("search", SEARCHES)
def test_problem_search_text_is_a_parameter_never_sql(search, finished_db, query_store, ledger):
    with ledger.bad_input(f"query: problem search {search!r}"):
        before = _rows(query_store)
        table = queries.problems_table(query_store, Scope(finished_db.sweep_id), search=search)
        problems = query_store.run_problems(finished_db.sweep_id)
        literal = [p["problem_id"] for p in problems
                   if search.lower() in p["question"].lower() or search.lower() in p["problem_id"].lower()]
        assert sorted(table["problem_id"]) == sorted(literal)  # matched as text: no wildcard, no escape
        assert _rows(query_store) == before


@pytest.mark.parametrize("name, call, message", [
    ("problem order", lambda s, r: queries.problems_table(s, Scope(r), order_by="ord; DROP TABLE runs"), "order_by"),
    ("measure", lambda s, r: figures.position_curve(s, Scope(r), measure="flip FROM results; --"), "measure"),
    ("phase filter", lambda s, r: Scope(r, phase="full' OR '1'='1"), "phase filter"),
    ("difficulty filter", lambda s, r: Scope(r, difficulties=("1) OR (1=1",)), "invalid literal"),
])
def test_names_that_reach_sql_text_come_from_whitelists(name, call, message, finished_db, query_store, ledger):
    with ledger.bad_input(f"query: {name} with SQL in it"):
        before = _rows(query_store)
        with pytest.raises(ValueError, match=message):
            call(query_store, finished_db.sweep_id)
        assert _rows(query_store) == before


def test_notes_tags_and_names_are_stored_as_text(finished_db, query_store, ledger):
    text = "'); DELETE FROM results; --"
    with ledger.bad_input("store: run name, notes and tags with SQL in them"):
        before = _rows(query_store)
        query_store.update_run(finished_db.seed_id, name=text, notes=text, tags=text)
        row = query_store.run_row(finished_db.seed_id)
        assert (row["name"], row["notes"], row["tags"]) == (text, text, text)
        after = _rows(query_store)
        assert {t: r for t, r in after.items() if t != "runs"} == {t: r for t, r in before.items() if t != "runs"}
        assert [r for r in after["runs"] if r[0] != finished_db.seed_id] == [r for r in before["runs"]
                                                                     if r[0] != finished_db.seed_id]


# --- exports: fixed file names inside the folder asked for ---------------------------------------------
@pytest.mark.parametrize("name", ["../results.csv", f"{ABSOLUTE}/results.csv", "sub/results.csv", "..",
                                  "results.csv/..", "..\\results.csv", "report.md\x00.csv"])
def test_export_names_cannot_leave_the_export_folder(name, finished_db, query_store, tmp_path, ledger):
    with ledger.bad_input(f"export: file name {name!r}"):
        with pytest.raises(ValueError, match="export name"):
            exports.export_csv(query_store, finished_db.sweep_id, tmp_path / "out", name=name)
        assert not list(tmp_path.rglob("*.csv")) and not Path(ABSOLUTE).exists()


@pytest.mark.parametrize("fmt", ["seed-json", "csv", "parquet", "markdown"])
def test_cli_export_of_a_run_named_like_a_path_writes_only_inside_out(fmt, finished_db, forkserver, tmp_path, ledger):
    db = tmp_path / "renamed.duckdb"
    shutil.copy(finished_db.path, db)
    store = Store(db)
    store.update_run(finished_db.sweep_id, name="../../../escape/run")
    store.close()
    with ledger.bad_input(f"export: --format {fmt} of a run named '../../../escape/run'"):
        code, out, err = forkserver.cli("export", "--db", db, "--run", finished_db.sweep_id, "--format", fmt,
                                        "--out", tmp_path / "out")
        assert code == 0, err
        written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
        # the database, its status snapshot (db/status_file.py) and the exports, nothing else
        assert written == sorted(["renamed.duckdb", "renamed.duckdb.status.json",
                                  *[f"out/{Path(p).name}" for p in out.split()]])
        assert all(Path(p).parent == tmp_path / "out" for p in out.split())


# --- the dashboard ------------------------------------------------------------------------------------
UPLOAD_NAMES = ["../../escape.jsonl", "/etc/cron.d/escape.jsonl", "..\\..\\escape.jsonl", "a/../../../escape.jsonl",
                "....//....//escape.jsonl", "", "名前 with spaces.jsonl"]


@pytest.mark.parametrize("name", UPLOAD_NAMES)
def test_an_uploaded_dataset_is_saved_inside_the_uploads_folder(name, tmp_path, monkeypatch, ledger):
    import tempfile

    from dashboard import uploads
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("THOUGHTSWEEP_UPLOADS", str(tmp_path / "uploads"))
    with ledger.bad_input(f"upload: dataset file name {name!r}"):
        staged = uploads.stage(name, GOOD)  # checked from here
        assert staged.parent == tmp_path / "tmp" / "thoughtsweep-staging" == staged.resolve().parent
        kept = Path(uploads.keep(str(staged)))  # a run uses it
        assert kept.parent == tmp_path / "uploads" and kept.resolve().parent == (tmp_path / "uploads").resolve()
        assert kept.read_bytes() == staged.read_bytes() == GOOD
        assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted([staged, kept])


def test_the_problems_page_search_box_takes_sql_as_text(finished_db, tmp_path, monkeypatch, ledger):
    from streamlit.testing.v1 import AppTest

    from dashboard import state
    db = (tmp_path / "ui.duckdb").resolve()
    shutil.copy(finished_db.path, db)
    monkeypatch.setenv("THOUGHTSWEEP_DB", str(db))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180).run()
    at.sidebar.selectbox(key="run_id").set_value(finished_db.sweep_id).run()
    at.switch_page("pages/problems.py").run()
    assert not at.exception, [e.message for e in at.exception]
    store = state.open_service(str(db)).store
    try:
        before = _rows(store)
        for search in ("'; DROP TABLE results; --", "' OR '1'='1", "%"):
            with ledger.bad_input(f"dashboard: Problems search box {search!r}"):
                at.text_input(key="problems_search").input(search).run()
                assert not at.exception, [e.message for e in at.exception]
                assert any("No stored problem passes these filters" in i.value for i in at.info)
                assert _rows(store) == before
    finally:
        state.open_service.clear(str(db))
