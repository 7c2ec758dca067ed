"""Bad input, each case a clear message and nothing stored lost.

Most cases go through the real CLI in a child process (forkserver.py runs `runner.__main__.main`, what
`python -m runner` runs): a non-zero exit, exactly one line on stderr starting "error: " that names the
problem, no traceback, and the database file that already holds a finished sweep and an imported run
unchanged byte for byte (file and WAL) and row for row. The rest reach the query layer, the export
writers and the dashboard (AppTest) with text meant to break out of SQL or out of the export folder.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from db import queries, report
from db.queries import Filters
from db.seed import SCORES, VALIDATION, import_seed
from db.store import Store
from runner.sweep import Sweep
from tests.checkpoints import build_codi, save_checkpoint
from tests.reliability.support import REPO, file_digest, sweep_config, table_dump

SEED_FILES = REPO / "tests" / "fixtures" / "seed"
GOOD = b'{"question": "Ann has 2 apples and buys 3. How many?", "answer": "2+3=<<2+3=5>>5\\n#### 5"}\n'
DATASETS = {  # file name -> bytes
    "empty.jsonl": b"",
    "blank.jsonl": b"\n  \n\t\n",
    "truncated.jsonl": GOOD + b'{"question": "Ben has 4 pens and lo',
    "malformed.jsonl": GOOD + b"{question: 'single quotes'}\n",
    "wrong_types.jsonl": b'{"question": 12, "answer": ["5"]}\n',
    "gold_not_a_number.jsonl": b'{"question": "How many?", "answer": "five apples"}\n',
    "huge_field.jsonl": json.dumps({"question": "apples " * 20_000, "answer": "5"}).encode() + b"\n",
    "not_utf8.jsonl": GOOD + b'{"question": "caf\xe9 \xff costs", "answer": "5"}\n',
    "not_utf8.csv": b"question,answer\ncaf\xe9 costs 5,5\n",
    "object.json": b'{"question": "How many?", "answer": "5"}',
    "numbers.json": b"[1, 2, 3]",
    "nested.jsonl": b"[" * 100_000 + b"\n",
    "dataset.txt": GOOD,
    "columns.csv": b"q,a\nHow many?,5\n",
    "fake.parquet": b"PAR1 this is not a parquet file",
    "duplicate_ids.jsonl": b'{"id": "p1", "question": "A?", "answer": "1"}\n{"id": "p1", "question": "B?", "answer": "2"}\n',
    "negative_steps.jsonl": b'{"question": "How many?", "answer": "5", "reasoning_steps": -2}\n',
    "infinite_gold.json": b'[{"question": "How many?", "answer": 1e999}]',
}


class Payload:
    """Unpickling this creates `path`: proof that a checkpoint's pickle ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@dataclass
class Kept:
    """A database file that must come out of every case exactly as it went in."""
    path: Path
    digest: str
    rows: dict

    def assert_unchanged(self) -> None:
        assert file_digest(self.path) == self.digest, f"{self.path} changed on disk"
        assert table_dump(self.path) == self.rows, f"{self.path} changed its rows"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, tiny_reasoner) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("bad-input")
    db = root / "finished.duckdb"
    store = Store(db)
    config = sweep_config(tiny_model_dir, limit=6, batch_size=3)
    sweep_id = Sweep.create(store, tiny_reasoner, config)
    assert Sweep(store, tiny_reasoner, config, sweep_id).run() == "finished"
    seed_id = import_seed(store, SEED_FILES / SCORES, SEED_FILES / VALIDATION, name="seed import")
    store.close()
    kept = Kept(db, file_digest(db), table_dump(db))

    data = root / "data"
    data.mkdir()
    for name, content in DATASETS.items():
        (data / name).write_bytes(content)
    (data / "folder.jsonl").mkdir()

    models = root / "models"
    codi = build_codi("gpt2")
    (models / "config_only").mkdir(parents=True)
    codi.config.save_pretrained(models / "config_only")
    pickled = save_checkpoint(codi, models / "pickle", weights="bin")
    torch.save(codi.state_dict() | {"prj.extra": Payload(root / "code-ran")}, pickled / "pytorch_model.bin")
    corrupt = shutil.copytree(tiny_model_dir, models / "corrupt_weights")
    (corrupt / "model.safetensors").write_bytes((corrupt / "model.safetensors").read_bytes()[:100])
    bad_options = shutil.copytree(tiny_model_dir, models / "bad_codi_config")
    (bad_options / "codi_config.json").write_text("{num_latent: 6,")
    foreign = save_checkpoint(codi, models / "foreign_keys", state={"encoder.weight": torch.zeros(4, 4)})

    files = root / "files"
    files.mkdir()
    (files / "text.duckdb").write_text("a text file with a database's name\n")
    (files / "truncated.duckdb").write_bytes(db.read_bytes()[:65536])
    (files / "afile").write_text("not a folder\n")
    return SimpleNamespace(root=root, db=db, kept=kept, sweep_id=sweep_id, seed_id=seed_id, tiny=tiny_model_dir,
                           data=data, models=models, files=files, foreign=foreign)


def _sweep(*argv) -> list:
    return ["sweep", "--model", "{tiny}", *argv, "--db", "{db}", "--quiet"]


# name -> (argv with {placeholders}, text the one stderr line must contain)
CLI_CASES = {f"dataset {name}": (_sweep("--dataset", f"{{data}}/{name}"), message) for name, message in {
    "empty.jsonl": "the file is empty",
    "blank.jsonl": "the file is empty",
    "truncated.jsonl": "line 2: truncated",
    "malformed.jsonl": "line 2: malformed JSON",
    "wrong_types.jsonl": "field 'question' should be text, got int",
    "gold_not_a_number.jsonl": "neither a number nor a solution",
    "huge_field.jsonl": "over the 20,000 limit",
    "not_utf8.jsonl": "line 2: bytes that are not UTF-8",
    "not_utf8.csv": "line 2: bytes that are not UTF-8",
    "object.json": "expected a JSON list of problems",
    "numbers.json": "item 1: expected a JSON object",
    "nested.jsonl": "nested too deeply",
    "dataset.txt": "unknown format '.txt'",
    "columns.csv": "no column 'question' or 'answer'",
    "fake.parquet": "not a readable Parquet file",
    "duplicate_ids.jsonl": "duplicate id 'p1'",
    "negative_steps.jsonl": "reasoning_steps should be a whole number of steps >= 1",
    "infinite_gold.json": "is inf, not a number",
    "folder.jsonl": "is a directory",
    "missing.jsonl": "no such file",
}.items()}
CLI_CASES |= {
    "model folder missing": (["sweep", "--model", "{models}/nowhere", "--db", "{db}"], "no such folder"),
    "model folder without weights": (["sweep", "--model", "{models}/config_only", "--db", "{db}"],
                                     "not a CODI checkpoint"),
    "model pickle that runs code": (["sweep", "--model", "{models}/pickle", "--db", "{db}"],
                                    "refused by weights_only=True"),
    "model weights truncated": (["sweep", "--model", "{models}/corrupt_weights", "--db", "{db}"],
                                "not a readable safetensors file"),
    "model codi_config.json broken": (["sweep", "--model", "{models}/bad_codi_config", "--db", "{db}"],
                                      "codi_config.json is not valid JSON"),
    "model weights of another architecture": (["sweep", "--model", "{models}/foreign_keys", "--db", "{db}"],
                                              "unexpected keys outside codi.* and prj.*"),
    "model path is a file": (["sweep", "--model", "{tiny}/config.json", "--db", "{db}"], "is a file"),
    "option --limit -1": (_sweep("--limit", "-1"), "--limit must be at least 1, got -1"),
    "option --limit 0": (_sweep("--limit", "0"), "--limit must be at least 1, got 0"),
    "option --limit ten": (_sweep("--limit", "ten"), "invalid int value: 'ten'"),
    "option --batch-size 0": (_sweep("--batch-size", "0"), "--batch-size must be a positive integer"),
    "option --batch-size -4": (_sweep("--batch-size", "-4"), "--batch-size must be a positive integer"),
    "option --batch-size big": (_sweep("--batch-size", "big"), "expected a positive integer or 'auto'"),
    "option unknown scheme": (_sweep("--schemes", "prefix,sideways"), "unknown or missing scheme ['sideways']"),
    "option no method": (_sweep("--methods", ","), "unknown or missing method"),
    "option unknown method": (_sweep("--methods", "zero,shuffle"), "shuffle"),
    "option unknown mode": (_sweep("--mode", "backwards"), "unknown mode 'backwards'"),
    "option layer out of range": (_sweep("--site", "resid:9"), "layer must be in 0..1, the model has 2 blocks"),
    "option layer not a number": (_sweep("--site", "resid:x"), "resid:x"),
    "option --device tpu": (_sweep("--device", "tpu"), "--device must be cpu or cuda"),
    "option --dtype float8": (_sweep("--dtype", "float8"), "invalid choice: 'float8'"),
    "option --validation -2": (_sweep("--validation", "-2"), "--validation must be 0 or more"),
    "option --max-new-tokens 0": (_sweep("--max-new-tokens", "0"), "--max-new-tokens must be at least 1"),
    "option --checkpoint-every 0": (_sweep("--checkpoint-every", "0"), "--checkpoint-every must be at least 1"),
    "option --resume of a missing run": (["sweep", "--resume", "999", "--db", "{db}"], "no run 999"),
    "option --resume of an imported run": (["sweep", "--resume", "{seed_id}", "--db", "{db}"],
                                           "imported from the old script's files"),
    "stats of a missing run": (["stats", "--run", "999", "--db", "{db}"], "no run 999"),
    "status --run abc": (["status", "--run", "abc", "--db", "{db}"], "invalid int value: 'abc'"),
    "export --format xml": (["export", "--format", "xml", "--out", "{root}/out", "--db", "{db}"],
                            "invalid choice: 'xml'"),
    "export --out is a file": (["export", "--format", "csv", "--out", "{files}/afile", "--db", "{db}"],
                               "is a file: give a folder"),
    "import-seed of malformed JSON": (["import-seed", "{data}/malformed.jsonl", "--db", "{db}"], "not JSON"),
    "import-seed of a list of numbers": (["import-seed", "{data}/numbers.json", "--db", "{db}"],
                                         "expected an object, got int"),
    "import-seed of two scores files": (["import-seed", "{data}/object.json", "{data}/numbers.json", "--db", "{db}"],
                                        "one scores file"),
    "unknown command": (["frobnicate", "--db", "{db}"], "invalid choice: 'frobnicate'"),
    "database that is a text file": (["status", "--db", "{files}/text.duckdb"], "not a valid DuckDB database file"),
    "database truncated": (["status", "--db", "{files}/truncated.duckdb"], "truncated.duckdb"),
    "database is a folder": (["status", "--db", "{data}"], "Is a directory"),
    "database in a missing folder": (["sweep", "--model", "{tiny}", "--db", "{root}/no/such/folder/new.duckdb"],
                                     "does not exist"),
    "status of a missing database": (["status", "--db", "{root}/missing.duckdb"], "does not exist"),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_the_cli_refuses_bad_input_in_one_line_and_loses_nothing(name, world, forkserver, ledger):
    template, message = CLI_CASES[name]
    argv = [part.format(**vars(world)) for part in template]
    untouched = {p: file_digest(p) for p in world.files.iterdir()}
    with ledger.bad_input(f"CLI: {name}"):
        code, out, err = forkserver.cli(*argv)
        lines = err.strip().splitlines()
        assert code != 0, f"exit 0 for {argv}: {out}{err}"
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert message in lines[0], lines[0]
        assert "Traceback" not in out + err
        world.kept.assert_unchanged()
        assert {p: file_digest(p) for p in world.files.iterdir()} == untouched  # the bad files too
        assert not (world.root / "code-ran").exists(), "a checkpoint's pickle ran code"
        assert not (world.root / "no").exists() and not (world.root / "missing.duckdb").exists()


def test_the_cli_refuses_a_database_another_process_holds(world, forkserver, ledger):
    with ledger.bad_input("CLI: database held by another process (the dashboard)"):
        holder = Store(world.db)
        try:
            code, out, err = forkserver.cli("status", "--db", world.db)
        finally:
            holder.close()
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "in use by process" in lines[0], err
        world.kept.assert_unchanged()


# --- the query layer: filters arrive as parameters, names through whitelists ---------------------------
SEARCHES = ["'", "''", '"', "'; DROP TABLE results; --", "' OR '1'='1", "x') OR TRUE OR ('", "%", "_", "\\",
            "?", "$1", "apples' UNION SELECT * FROM runs --", "😀'\u202e"]


@pytest.fixture(scope="module")
def query_store(world, tmp_path_factory):
    path = tmp_path_factory.mktemp("queries") / "copy.duckdb"
    shutil.copy(world.db, path)
    store = Store(path)
    yield store
    store.close()


def _rows(store) -> dict:
    tables = [t for (t,) in store.query("SELECT table_name FROM information_schema.tables "
                                        "WHERE table_schema = 'main' ORDER BY 1")]
    return {t: store.query(f"SELECT * FROM {t} ORDER BY ALL") for t in tables}  # names from the catalog


@pytest.mark.parametrize("search", SEARCHES)
def test_problem_search_text_is_a_parameter_never_sql(search, world, query_store, ledger):
    with ledger.bad_input(f"query: problem search {search!r}"):
        before = _rows(query_store)
        table = queries.problems_table(query_store, world.sweep_id, Filters(), search=search)
        problems = query_store.run_problems(world.sweep_id)
        literal = [p["problem_id"] for p in problems
                   if search.lower() in p["question"].lower() or search.lower() in p["problem_id"].lower()]
        assert sorted(table["problem_id"]) == sorted(literal)  # matched as text: no wildcard, no escape
        assert _rows(query_store) == before


@pytest.mark.parametrize("name, call, message", [
    ("problem order", lambda s, r: queries.problems_table(s, r, order_by="ord; DROP TABLE runs"), "order_by"),
    ("measure", lambda s, r: queries.position_curve(s, r, measure="flip FROM results; --"), "measure"),
    ("phase filter", lambda s, r: Filters(phase="full' OR '1'='1"), "phase filter"),
    ("difficulty filter", lambda s, r: Filters(difficulties=("1) OR (1=1",)), "invalid literal"),
])
def test_names_that_reach_sql_text_come_from_whitelists(name, call, message, world, query_store, ledger):
    with ledger.bad_input(f"query: {name} with SQL in it"):
        before = _rows(query_store)
        with pytest.raises(ValueError, match=message):
            call(query_store, world.sweep_id)
        assert _rows(query_store) == before


def test_notes_tags_and_names_are_stored_as_text(world, query_store, ledger):
    text = "'); DELETE FROM results; --"
    with ledger.bad_input("store: run name, notes and tags with SQL in them"):
        before = _rows(query_store)
        query_store.update_run(world.seed_id, name=text, notes=text, tags=text)
        row = query_store.run_row(world.seed_id)
        assert (row["name"], row["notes"], row["tags"]) == (text, text, text)
        after = _rows(query_store)
        assert {t: r for t, r in after.items() if t != "runs"} == {t: r for t, r in before.items() if t != "runs"}
        assert [r for r in after["runs"] if r[0] != world.seed_id] == [r for r in before["runs"]
                                                                     if r[0] != world.seed_id]


# --- exports: fixed file names inside the folder asked for ---------------------------------------------
@pytest.mark.parametrize("name", ["../results.csv", "/tmp/results.csv", "sub/results.csv", "..", "results.csv/..",
                                  "..\\results.csv", "report.md\x00.csv"])
def test_export_names_cannot_leave_the_export_folder(name, world, query_store, tmp_path, ledger):
    with ledger.bad_input(f"export: file name {name!r}"):
        with pytest.raises(ValueError, match="export name"):
            report.export_csv(query_store, world.sweep_id, tmp_path / "out", name=name)
        assert not list(tmp_path.rglob("*.csv")) and not Path("/tmp/results.csv").exists()


@pytest.mark.parametrize("fmt", ["seed-json", "csv", "parquet", "markdown"])
def test_cli_export_of_a_run_named_like_a_path_writes_only_inside_out(fmt, world, forkserver, tmp_path, ledger):
    db = tmp_path / "renamed.duckdb"
    shutil.copy(world.db, db)
    store = Store(db)
    store.update_run(world.sweep_id, name="../../../escape/run")
    store.close()
    with ledger.bad_input(f"export: --format {fmt} of a run named '../../../escape/run'"):
        code, out, err = forkserver.cli("export", "--db", db, "--run", world.sweep_id, "--format", fmt,
                                        "--out", tmp_path / "out")
        assert code == 0, err
        written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
        assert written == sorted(["renamed.duckdb", *[f"out/{Path(p).name}" for p in out.split()]])
        assert all(Path(p).parent == tmp_path / "out" for p in out.split())


# --- the dashboard ------------------------------------------------------------------------------------
UPLOAD_NAMES = ["../../escape.jsonl", "/etc/cron.d/escape.jsonl", "..\\..\\escape.jsonl", "a/../../../escape.jsonl",
                "....//....//escape.jsonl", "", "名前 with spaces.jsonl"]


@pytest.mark.parametrize("name", UPLOAD_NAMES)
def test_an_uploaded_dataset_is_saved_inside_the_uploads_folder(name, tmp_path, ledger):
    from dashboard.sweep_form import _saved_upload
    upload = SimpleNamespace(name=name, getvalue=lambda: GOOD)
    with ledger.bad_input(f"upload: dataset file name {name!r}"):
        saved = Path(_saved_upload(upload, tmp_path))
        assert saved.parent == tmp_path / "uploads" and saved.resolve().parent == (tmp_path / "uploads").resolve()
        assert saved.read_bytes() == GOOD
        assert [p for p in tmp_path.rglob("*") if p.is_file()] == [saved]


def test_the_problems_page_search_box_takes_sql_as_text(world, tmp_path, monkeypatch, ledger):
    from streamlit.testing.v1 import AppTest

    from dashboard import state
    db = (tmp_path / "ui.duckdb").resolve()
    shutil.copy(world.db, db)
    monkeypatch.setenv("THOUGHTSWEEP_DB", str(db))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180).run()
    at.sidebar.selectbox(key="run_id").set_value(world.sweep_id).run()
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
