"""db/exports.py, db/report.py, db/status_page.py: CSV/Parquet exports, the experiment report and the live
status page, on the run of test_queries.py."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from db import exports, report, seed, status_page
from db.scope import Scope
from db.store import Store
from test_queries import build_run  # the hand-built 10-problem run (numbers known)

REQUIRED = ["run_id", "problem_id", "difficulty", "phase", "scheme", "k", "method", "site", "mode", "answer_text",
            "answer_value", "correct", "changed", "flip", "harm", "help", "gold_logprob"]
FIXTURES = Path(__file__).parent / "fixtures" / "seed"


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "r.duckdb")
    yield s
    s.close()


@pytest.fixture
def run_id(store):
    return build_run(store)


def test_csv_has_one_row_per_problem_and_variant(store, run_id, tmp_path):
    path = exports.export_csv(store, run_id, tmp_path / "new" / "dir")
    assert path == tmp_path / "new" / "dir" / "results.csv"
    frame = pd.read_csv(path)
    assert list(frame.columns[:4]) == ["run_id", "problem_id", "difficulty", "phase"] and set(REQUIRED) <= set(frame)
    assert len(frame) == 10 * 19 and not frame.duplicated(["problem_id", "variant"]).any()
    first = frame.iloc[0]
    assert (first["problem_id"], first["scheme"], first["k"], first["method"]) == ("p0", "baseline", 0, "none")
    k3 = frame[(frame.problem_id == "p8") & (frame.variant == "prefix:3/zero/latent/recompute")].iloc[0]
    assert (bool(k3["flip"]), bool(k3["help"]), bool(k3["correct"]), k3["difficulty"]) == (True, True, True, 6)
    only = pd.read_csv(exports.export_csv(store, run_id, tmp_path / "v", Scope(run_id, phase="validation")))
    assert len(only) == 4 * 19 and set(only["phase"]) == {"validation"}


def test_parquet_matches_csv(store, run_id, tmp_path):
    csv = pd.read_csv(exports.export_csv(store, run_id, tmp_path))
    parquet = pd.read_parquet(exports.export_parquet(store, run_id, tmp_path))
    assert list(parquet.columns) == list(csv.columns) and len(parquet) == len(csv)
    assert parquet["gold_logprob"].tolist() == pytest.approx(csv["gold_logprob"].tolist())


@pytest.mark.parametrize("name", ["../results.csv", "sub/results.csv", "..", "results.txt", "/etc/passwd"])
def test_export_names_cannot_escape(store, run_id, tmp_path, name):
    with pytest.raises(ValueError, match="export name"):
        exports.export_csv(store, run_id, tmp_path / "out", name=name)
    assert not (tmp_path / "results.csv").exists()


def test_export_dispatch(store, run_id, tmp_path):
    names = {fmt: [p.name for p in exports.export(store, run_id, fmt, tmp_path / fmt)] for fmt in exports.FORMATS}
    assert names == {"seed-json": [seed.SCORES, seed.SUMMARY, seed.VALIDATION], "csv": ["results.csv"],
                     "parquet": ["results.parquet"], "markdown": ["report.md"]}
    with pytest.raises(ValueError, match="format"):
        exports.export(store, run_id, "xlsx", tmp_path)


def test_markdown_report_holds_the_numbers(store, run_id):
    text = report.markdown_report(store, run_id)
    for expected in ("# ThoughtSweep run", "## Setup", "| schemes |", "8/10 = 0.800 [0.490, 0.943]",
                     "validation subset: 4/4", "### prefix · zero · latent · recompute", "### single · zero",
                     "| 3 | 0–2 | 10 | 0.300 [0.108, 0.603] | 0.200 [", "## By difficulty (prefix · zero",
                     "| 1-2 | 4 |", "## Early vs late", "cumulative by construction", "Wilson"):
        assert expected in text, expected
    assert "\n| 1 | 0 | 10 | 0.000 [0.000, 0.278] |" in text  # prefix k=1 ablates latent 0 only
    summary = next(line for line in text.splitlines() if line.startswith("Old-script summary"))
    assert "flip rate, 95% Wilson): 0: 0.000, 1: 0.000 [0.000, 0.278], 2: " in summary  # the baseline has none
    assert ", 3: 0.300 [0.108, 0.603], " in summary  # the old numbering: position 3 = prefix k = 3


def test_report_of_an_imported_run(store):
    run_id = seed.import_seed(store, FIXTURES / seed.SCORES, FIXTURES / seed.VALIDATION)
    text = report.markdown_report(store, run_id)
    assert "imported from the seed" in text and "3/4 = 0.750" in text


def test_durations_keep_two_digits_under_ten_seconds_where_a_fast_sweep_spends_its_time_per_problem():
    cases = {0: "0s", 0.0004: "<0.001s", 0.0072: "0.0072s", 0.38: "0.38s", 2: "2s", 5.26: "5.3s", 9.6: "10s",
             42.4: "42s", 187: "3m 07s", 3725: "1h 02m", None: "–", float("nan"): "–"}
    assert {seconds: report.duration(seconds) for seconds in cases} == cases


def test_status_page_of_a_running_sweep(store, run_id):
    store.insert_problems(run_id, [{"problem_id": f"q{i}", "ord": 10 + i, "question": "?", "gold": "1",
                                    "gold_value": 1.0, "difficulty": 2, "solution": "", "phase": "full"}
                                   for i in range(10)])
    store.update_run(run_id, total=20, phase="full", status="running")
    text = status_page.status_markdown(store, run_id)
    for expected in ("— running (phase full)", "10/20 problems (50.0%)", "1,800 problems/hour", "2s per problem",
                     "ETA: 20s", "| validation | 4/4 | 8s |", "| full (the other problems) | 6/16 | 32s | 20s so far | "
                     "running |", "RSS (the process that ran the batch) now 510 MB, peak 510 MB",
                     "the sweep's processes together (PSS) now 890 MB, peak 895 MB", "## Validation vs full run so far",
                     "| baseline accuracy | 1.000 [", f"python -m runner sweep --resume {run_id} --db {store.path}",
                     "kill -INT"):
        assert expected in text, expected
    store.update_run(run_id, status="stopped")
    stopped = status_page.status_markdown(store, run_id)
    assert "kill -INT" not in stopped and "ETA: –" in stopped and "| stopped |" in stopped


def test_unknown_run(store):
    with pytest.raises(ValueError, match="no run 42"):
        report.markdown_report(store, 42)


def test_pages_of_a_run_that_has_just_started(store, tmp_path):
    run_id = store.create_run(name="new", model="toy", dataset="builtin", config={}, num_latent=6, n_variants=7,
                              total=5)
    assert "# ThoughtSweep run" in report.markdown_report(store, run_id)
    status = status_page.status_markdown(store, run_id)
    assert "0/5 problems" in status and "No batch stored yet" in status and "--resume" in status
    assert pd.read_csv(exports.export_csv(store, run_id, tmp_path)).empty


def test_generated_tokens_are_exported_and_old_databases_migrate(tmp_path, tiny_reasoner, tiny_model_dir):
    """Migration 2 adds results.tokens / prefix_value to a schema-1 file; a sweep fills them; both exports hold them."""
    import duckdb

    from db import migrations
    from runner.sweep import Sweep, SweepConfig
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:  # a file written before migration 2 existed
        con.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                    "applied TIMESTAMP DEFAULT current_timestamp)")
        migrations._initial_schema(con)
        con.execute("INSERT INTO schema_migrations (version, name) VALUES (1, 'initial schema')")
        con.execute("INSERT INTO results (run_id, problem_id, variant, scheme, k, method, site, mode, correct, "
                    "changed, flip, harm, help) VALUES (99, 'p', 'baseline:0', 'baseline', 0, 'none', 'latent', "
                    "'recompute', true, false, false, false, false)")
    store = Store(path)
    try:
        assert store.query("SELECT max(version) FROM schema_migrations")[0][0] >= 2
        assert store.query("SELECT tokens, prefix_value FROM results WHERE run_id = 99") == [(None, None)]
        config = SweepConfig(model=str(tiny_model_dir), limit=4, schemes=("prefix",), batch_size=2)
        run_id = Sweep.create(store, tiny_reasoner, config)
        assert Sweep(store, tiny_reasoner, config, run_id).run() == "finished"
        stored = store.query("SELECT answer_text, tokens FROM results WHERE run_id = ? ORDER BY problem_id, variant",
                             [run_id])
        assert all(text == tiny_reasoner.decode(list(tokens)) for text, tokens in stored)
        assert any(len(tokens) > 1 for _, tokens in stored)
        parquet = pd.read_parquet(exports.export_parquet(store, run_id, tmp_path / "out"))
        csv = pd.read_csv(exports.export_csv(store, run_id, tmp_path / "out"), keep_default_na=False)
        assert [list(t) for t in parquet["tokens"]] == [s.split() and list(map(int, s.split())) for s in csv["tokens"]]
        assert {tuple(t) for t in parquet["tokens"]} == {tuple(t) for _, t in stored}
        assert "prefix_value" in csv and "prefix_value" in parquet
    finally:
        store.close()


def test_an_interval_without_an_upper_bound_says_so_in_the_report_and_the_dashboard():
    """A ratio whose denominator's interval reaches 0 (db/stats.py) has a lower bound only: both formatters
    say so instead of dropping the interval; a value without any bound stays bare."""
    from dashboard import widgets
    nan = float("nan")
    assert report.ci(0.25, 0.1, nan, 2) == "0.25 [0.10, no upper bound]"
    assert widgets.ci(0.25, 0.1, None, percent=False) == "0.25 [0.10, no upper bound]"
    assert report.ci(0.25) == "0.250" and widgets.ci(0.25, percent=False) == "0.25"
    assert report.ci(0.25, 0.1, 0.4, 2) == "0.25 [0.10, 0.40]"
