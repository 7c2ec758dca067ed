"""Bad input through the real CLI: datasets, model paths, options, commands and database files.

Each case runs in a child process (forkserver.py runs `runner.__main__.main`, what `python -m runner`
runs) and must give a non-zero exit, exactly one line on stderr starting "error: " that names the
problem, no traceback, and leave the database that already holds a finished sweep and an imported run
unchanged byte for byte (file and WAL) and row for row. test_bad_queries.py takes the query layer, the
export writers and the dashboard.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from db.store import Store
from tests.checkpoints import build_codi, save_checkpoint
from tests.test_checkpoint import BROKEN, broken_default
from tests.reliability.support import file_digest, table_dump

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
def world(tmp_path_factory, tiny_model_dir, finished_db) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("bad-input")
    db = finished_db.path
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
    save_checkpoint(codi, models / "foreign_keys", state={"encoder.weight": torch.zeros(4, 4)})
    broken = {name: broken_default(models / f"broken{i}", name) for i, name in enumerate(BROKEN)}

    files = root / "files"
    files.mkdir()
    (files / "text.duckdb").write_text("a text file with a database's name\n")
    (files / "truncated.duckdb").write_bytes(db.read_bytes()[:65536])
    (files / "afile").write_text("not a folder\n")
    return SimpleNamespace(root=root, db=db, kept=kept, sweep_id=finished_db.sweep_id, seed_id=finished_db.seed_id,
                           tiny=tiny_model_dir, data=data, models=models, files=files, broken=broken)


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
    "option --workers 0": (_sweep("--workers", "0"), "--workers: expected a positive integer, got 0"),
    "option --workers -2": (_sweep("--workers", "-2"), "--workers: expected a positive integer, got -2"),
    "option --resume with another --limit": (["sweep", "--resume", "{sweep_id}", "--limit", "99", "--db", "{db}"],
                                             "--limit 99 (run {sweep_id}: 6)"),
    "stats --method typo": (["stats", "--run", "{sweep_id}", "--method", "typo", "--db", "{db}"],
                            "it has method 'zero'"),
    "stats --site of another run": (["stats", "--run", "{sweep_id}", "--site", "resid:1", "--db", "{db}"],
                                    "it has site 'latent'"),
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
    "database that is a text file": (["status", "--db", "{files}/text.duckdb"], "is not a DuckDB database file"),
    "database truncated": (["status", "--db", "{files}/truncated.duckdb"], "truncated.duckdb"),
    "database is a folder": (["status", "--db", "{data}"], "Is a directory"),
    "database in a missing folder": (["sweep", "--model", "{tiny}", "--db", "{root}/no/such/folder/new.duckdb"],
                                     "does not exist"),
    "status of a missing database": (["status", "--db", "{root}/missing.duckdb"], "does not exist"),
}
CLI_CASES |= {f"checkpoint {name}": (["sweep", "--model", f"{{broken[{name}]}}", "--db", "{db}", "--quiet"], message)
              for name, (_, message) in BROKEN.items()}


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
        assert message.format(**vars(world)) in lines[0], lines[0]
        assert "Traceback" not in out + err
        world.kept.assert_unchanged()
        assert {p: file_digest(p) for p in world.files.iterdir()} == untouched  # the bad files too
        assert not (world.root / "code-ran").exists(), "a checkpoint's pickle ran code"
        assert not (world.root / "no").exists() and not (world.root / "missing.duckdb").exists()


def test_the_cli_refuses_a_database_another_process_holds(world, forkserver, ledger):
    with ledger.bad_input("CLI: database held by another process (the dashboard)"):
        holder = Store(world.db)
        try:
            code, out, err = forkserver.cli("stats", "--db", world.db)
            status = forkserver.cli("status", "--db", world.db, "--json")  # reads the holder's status file
        finally:
            holder.close()
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "in use by process" in lines[0], err
        assert status[0] == 0 and "held by process" in status[2], status
        world.kept.assert_unchanged()
