"""A command's writes are all or nothing; a file an older version left half-written is repaired on open.

Creating a run stores its problems in the same transaction, and an import is one transaction, so text
that DuckDB cannot store (a lone surrogate from a JSON escape) leaves no run behind. A file written
before that (a run row without its problems: the old two-step create cut by a crash) opens with the
run marked failed and why, instead of resuming to a false "finished 0/N".
"""
from __future__ import annotations

import pytest

from db.recovery import DAMAGED
from db.store import Store, StoreError
from runner.sweep import Sweep
from tests.reliability.support import sweep_config

LONE_SURROGATE = '{"question": "Tom has \\ud800 3 apples and buys 2. How many?", "answer": "#### 5"}\n'


def test_a_dataset_with_a_lone_surrogate_gets_one_clear_line_and_leaves_no_run(tmp_path, forkserver, tiny_model_dir,
                                                                             tiny_reasoner, ledger):
    dataset = tmp_path / "surrogate.jsonl"
    dataset.write_text('{"question": "A box holds 6 eggs. How many in 2 boxes?", "answer": "#### 12"}\n'
                       + LONE_SURROGATE)
    db = tmp_path / "surrogate.duckdb"
    with ledger.bad_input('a dataset whose question holds a lone surrogate "\\ud800"'):
        code, _, err = forkserver.cli("sweep", "--model", tiny_model_dir, "--db", db, "--dataset", dataset,
                                      "--schemes", "prefix", "--quiet")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "surrogate" in lines[-1] and "question" in lines[-1], err
        store = Store(db)
        try:
            assert store.query("SELECT count(*) FROM runs")[0][0] == 0
            assert store.query("SELECT count(*) FROM problems")[0][0] == 0
            with pytest.raises(StoreError, match="surrogate"):  # the same through the dashboard's path
                Sweep.create(store, tiny_reasoner, sweep_config(tiny_model_dir, dataset=str(dataset), limit=None))
            assert store.query("SELECT count(*) FROM runs")[0][0] == 0
        finally:
            store.close()


def test_a_run_left_without_its_problems_is_marked_failed_on_open_and_refuses_to_resume(tmp_path, forkserver,
                                                                                       ledger):
    db = tmp_path / "damaged.duckdb"
    store = Store(db)
    config = sweep_config("default", limit=300).to_json()
    # What the old two-step writes left after a crash between them: a run row, no problems.
    sweep = store.create_run(name="cut sweep", model="default", dataset="builtin", config=config, num_latent=6,
                             n_variants=7, total=300, status="stopped")
    imported = store.create_run(name="cut import", model="old", dataset="scores.json", config={}, num_latent=6,
                                n_variants=6, total=4, status="finished", source="import")
    store.close()
    with ledger.bad_input("a file holding a sweep 'stopped 0/300' and an import 'finished 0/4', neither with "
                          "problems"):
        store = Store(db)
        try:
            for run_id in (sweep, imported):
                row = store.run_row(run_id)
                assert (row["status"], row["error"]) == ("failed", DAMAGED), row
        finally:
            store.close()
        code, _, err = forkserver.cli("sweep", "--db", db, "--resume", sweep, "--quiet")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "never stored" in err, err
        for args in (["--json"], []):  # no TypeError: one line saying there is nothing to summarise
            code, out, err = forkserver.cli("stats", "--db", db, "--run", sweep, *args)
            assert code == 2 and len(err.strip().splitlines()) == 1 and "no results" in err, err
        store = Store(db)
        try:
            row = store.run_row(sweep)
            assert row["status"] == "failed" and row["done"] == 0, row  # not "finished 0/0"
        finally:
            store.close()


@pytest.mark.parametrize("bad", [{"answer_text": "7 \ud800"}, {"answer_value": "seven"}],
                         ids=["lone surrogate in an answer", "a text among the numbers of a column"])
def test_a_batch_whose_rows_cannot_be_stored_is_refused_whole_and_the_run_keeps_what_it_had(tmp_path, bad):
    """db/rows.py builds the batch's table before the transaction: a row that cannot be stored refuses the
    batch in one StoreError, and neither its results, its metrics nor the run's progress are written."""
    store = Store(tmp_path / "rows.duckdb")
    try:
        run_id = store.create_run(name="r", model="m", dataset="d", config={}, num_latent=6, n_variants=1, total=2)
        good = {"problem_id": "p1", "variant": "baseline:0/none/latent/recompute", "scheme": "baseline",
                "k": 0, "method": "none", "site": "latent", "mode": "recompute", "answer_text": "7",
                "answer_value": 7.0, "correct": True, "changed": False, "flip": False, "harm": False, "help": False}
        store.write_batch(run_id, [good], {"elapsed_s": 1.0, "done": 1}, done=1)
        with pytest.raises(StoreError, match="nothing was stored"):
            store.write_batch(run_id, [dict(good, problem_id="p2"), dict(good, problem_id="p3", **bad)],
                              {"elapsed_s": 2.0, "done": 3}, done=3)
        assert store.query("SELECT problem_id FROM results") == [("p1",)]
        assert store.query("SELECT count(*) FROM run_metrics")[0][0] == 1 and store.run_row(run_id)["done"] == 1
    finally:
        store.close()
