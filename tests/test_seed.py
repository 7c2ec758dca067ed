"""db/seed.py: the seed's files in and out, and the stats of an imported run equal the seed's summary.

Two sources: the hand-made trio in tests/fixtures/seed (4 problems, summary computed by hand) and a
generated ~50-problem scores file whose summary comes from `reference_summary` below, a plain-loop
rewrite of the seed's `compute_statistics` that shares no code with db/seed.py.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from db import figures, queries, report, seed
from db.scope import Scope
from db.seed import SeedFormatError, export_seed, import_seed, seed_summary
from db.store import Store

FIXTURES = Path(__file__).parent / "fixtures" / "seed"
SEED_KEYS = ("n_problems", "baseline_accuracy", "position_importance", "by_difficulty")


def reference_summary(scores: list[dict]) -> dict:
    """The seed's summary, recomputed with plain loops (position 0 = baseline, early = positions 0-2)."""
    correct = 0
    sums, counts = {}, {}
    groups = {}
    for record in scores:
        correct += 1 if record["baseline_correct"] else 0
        groups.setdefault(record["difficulty"], []).append(record)
        for result in record["position_results"]:
            p = result["position"]
            sums[p] = sums.get(p, 0.0) + result["importance_score"]
            counts[p] = counts.get(p, 0) + 1
    by_difficulty = {}
    for difficulty, records in groups.items():
        d_sums, d_counts = {}, {}
        for record in records:
            for result in record["position_results"]:
                p = result["position"]
                d_sums[p] = d_sums.get(p, 0.0) + result["importance_score"]
                d_counts[p] = d_counts.get(p, 0) + 1
        early = [d_sums[p] / d_counts[p] for p in (0, 1, 2) if p in d_sums]
        late = [d_sums[p] / d_counts[p] for p in (3, 4, 5) if p in d_sums]
        early_mean, late_mean = sum(early) / len(early), sum(late) / len(late)
        by_difficulty[str(difficulty)] = {
            "n_problems": len(records),
            "baseline_accuracy": sum(1 for r in records if r["baseline_correct"]) / len(records),
            "early_importance": early_mean, "late_importance": late_mean,
            "pattern_validated": early_mean >= late_mean}
    return {"n_problems": len(scores), "baseline_accuracy": correct / len(scores),
            "position_importance": {str(p): sums[p] / counts[p] for p in sums}, "by_difficulty": by_difficulty}


def generate_scores(n: int = 50, rng_seed: int = 7) -> list[dict]:
    """A seed-format scores list: difficulties 1..8 (each present), random correctness per position."""
    rng = random.Random(rng_seed)
    records = []
    for i in range(n):
        difficulty = 1 + i % 8
        gold = rng.randint(1, 500)
        baseline_correct = rng.random() < 0.85
        baseline = f"The answer is: {gold if baseline_correct else gold + 1}"
        position_results = [{"position": 0, "ablated_answer": baseline, "ablated_correct": baseline_correct,
                             "importance_score": 0.0,
                             "baseline_to_ablated": f"{int(baseline_correct)} \u2192 {int(baseline_correct)}"}]
        for p in range(1, 6):
            correct = rng.random() < 0.9 - 0.15 * p
            position_results.append({
                "position": p, "ablated_answer": f"The answer is: {gold if correct else gold + p}",
                "ablated_correct": correct, "importance_score": 0.0 if correct == baseline_correct else 1.0,
                "baseline_to_ablated": f"{int(baseline_correct)} \u2192 {int(correct)}"})
        records.append({"problem_id": f"gsm8k_{1000 + i}", "question": f"Problem {i}: what's {gold}? It's \"easy\".",
                        "expected_answer": gold, "baseline_answer": baseline, "baseline_correct": baseline_correct,
                        "difficulty": difficulty, "position_results": position_results})
    return records


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "seed.duckdb")
    yield s
    s.close()


@pytest.fixture
def scores_file(tmp_path):
    path = tmp_path / "in" / seed.SCORES
    path.parent.mkdir()
    path.write_text(json.dumps(generate_scores(), indent=2))
    return path


def top_level(stats: dict) -> dict:
    return {key: stats[key] for key in SEED_KEYS}


def test_reference_loop_agrees_with_seed_summary():
    scores = generate_scores()
    assert {r["difficulty"] for r in scores} == set(range(1, 9))
    ours, theirs = seed_summary(scores), reference_summary(scores)
    assert ours["position_importance"] == pytest.approx(theirs["position_importance"])
    assert ours["by_difficulty"].keys() == theirs["by_difficulty"].keys()
    for key, cell in theirs["by_difficulty"].items():
        assert ours["by_difficulty"][key] == pytest.approx(cell)


def test_imported_stats_equal_the_seed_summary(store, scores_file):
    scores = json.loads(scores_file.read_text())
    run_id = import_seed(store, scores_file)
    stats = top_level(report.stats_json(store, run_id))
    expected = reference_summary(scores)
    assert stats["n_problems"] == 50 and stats["baseline_accuracy"] == pytest.approx(expected["baseline_accuracy"])
    assert stats["position_importance"] == pytest.approx(expected["position_importance"])
    assert stats["by_difficulty"].keys() == expected["by_difficulty"].keys()
    for key, cell in expected["by_difficulty"].items():
        assert stats["by_difficulty"][key] == pytest.approx(cell), key
    assert stats == seed_summary(scores)  # same arithmetic: equal, not only close


def test_export_round_trips_the_scores_file(store, scores_file, tmp_path):
    run_id = import_seed(store, scores_file)
    written = export_seed(store, run_id, tmp_path / "out" / "nested")
    assert [p.name for p in written] == [seed.SCORES, seed.SUMMARY, seed.VALIDATION]
    assert json.loads(written[0].read_text()) == json.loads(scores_file.read_text())
    assert "\\u2192" in written[0].read_text()  # escaped like the seed's json.dump
    assert json.loads(written[1].read_text()) == seed_summary(json.loads(scores_file.read_text()))
    assert json.loads(written[2].read_text())["n_samples"] == 0  # no validation file was imported


def test_hand_fixture_trio(store, tmp_path):
    run_id = import_seed(store, FIXTURES / seed.SCORES, FIXTURES / seed.VALIDATION, name="fixture")
    summary = json.loads((FIXTURES / seed.SUMMARY).read_text())
    assert top_level(report.stats_json(store, run_id)) == summary
    assert seed_summary(json.loads((FIXTURES / seed.SCORES).read_text())) == summary
    run = store.run_row(run_id)
    assert (run["source"], run["status"], run["name"], run["done"], run["total"]) == ("import", "finished", "fixture",
                                                                                      4, 4)
    phases = {p["problem_id"]: p["phase"] for p in store.run_problems(run_id)}
    assert phases == {"gsm8k_0": "validation", "gsm8k_1": "full", "gsm8k_2": "validation", "gsm8k_3": "full"}
    gold = {p["problem_id"]: (p["gold"], p["gold_value"]) for p in store.run_problems(run_id)}
    assert gold["gsm8k_2"] == ("2.5", 2.5)
    for path in export_seed(store, run_id, tmp_path / "out"):  # all three files come back as they were
        assert json.loads(path.read_text()) == json.loads((FIXTURES / path.name).read_text()), path.name
    variants = {r[0] for r in store.query("SELECT variant FROM results WHERE run_id = ?", [run_id])}
    assert variants == {"baseline:0/none/latent/recompute"} | {f"prefix:{k}/zero/latent/recompute" for k in range(1, 6)}
    d3 = store.query("SELECT flip, harm, help, answer_value, changed FROM results WHERE run_id = ? AND "
                     "problem_id = 'gsm8k_3' AND k = 3", [run_id])[0]
    assert d3 == (True, False, True, 7.0, True)


def test_site_argument_and_native_group_choice(store, tmp_path):
    run_id = import_seed(store, FIXTURES / seed.SCORES, site="resid:8")
    assert queries.first_group(store, Scope(run_id, scheme="prefix")).keys == ("prefix", "zero", "resid:8", "recompute")
    summary = json.loads((FIXTURES / seed.SUMMARY).read_text())
    assert top_level(report.stats_json(store, run_id, site="resid:8")) == summary
    with pytest.raises(ValueError, match="site"):
        import_seed(store, FIXTURES / seed.SCORES, site="resid:8; DROP TABLE runs")


def test_native_run_exports_positions_up_to_T(store, tmp_path):
    from test_queries import build_run  # the hand-built sweep run of test_queries.py
    run_id = build_run(store)
    scores_path = export_seed(store, run_id, tmp_path / "out")[0]
    scores = json.loads(scores_path.read_text())
    assert [r["problem_id"] for r in scores] == [f"p{i}" for i in range(10)]
    assert [r["position"] for r in scores[0]["position_results"]] == list(range(7))
    assert scores[8]["position_results"][3]["baseline_to_ablated"] == "0 \u2192 1"
    assert scores[0]["expected_answer"] == 0 and isinstance(scores[0]["expected_answer"], int)
    assert top_level(report.stats_json(store, run_id)) == seed_summary(scores)
    again = import_seed(store, scores_path)
    assert top_level(report.stats_json(store, again)) == seed_summary(scores)


def test_filtered_seed_files_and_their_summary_in_sql(store, scores_file):
    """The export page's summary (SQL) equals the seed's arithmetic over the filtered records it would download."""
    run_id = import_seed(store, scores_file)
    group = queries.first_group(store, Scope(run_id, scheme="prefix"))
    everything = seed.seed_scores(store, Scope(run_id))
    for filters in (group, group.replace(difficulties=(2, 5, 7)), group.replace(baseline_correct=True),
                    group.replace(difficulties=(3,), baseline_correct=False)):
        documents = seed.seed_documents(store, filters)
        kept = [r for r in everything if (not filters.difficulties or r["difficulty"] in filters.difficulties)
                and filters.baseline_correct in (None, r["baseline_correct"])]
        assert documents[seed.SCORES] == kept and kept
        assert figures.old_script_summary(store, filters) == seed_summary(kept) == documents[seed.SUMMARY]
        for name in (seed.SUMMARY, seed.VALIDATION):  # one file per download click: the same document
            assert seed.seed_documents(store, filters, names=(name,)) == {name: documents[name]}


def broken(tmp_path, edit) -> Path:
    records = json.loads((FIXTURES / seed.SCORES).read_text())
    document = edit(records)
    path = tmp_path / "broken.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


def set_in(records, index, key, value, position=None):
    target = records[index] if position is None else records[index]["position_results"][position]
    if value is KeyError:
        del target[key]
    else:
        target[key] = value
    return records


@pytest.mark.parametrize("edit, message", [
    (lambda r: "[{not json", "not JSON"),
    (lambda r: {"results": r}, "validation file"),
    (lambda r: set_in(r, 1, "baseline_correct", KeyError), "missing baseline_correct"),
    (lambda r: set_in(r, 2, "difficulty", "unknown"), "difficulty must be an integer"),
    (lambda r: set_in(r, 0, "importance_score", 1.0, position=2), "disagrees"),
    (lambda r: set_in(r, 0, "importance_score", 0.5, position=2), "0.0 or 1.0"),
    (lambda r: set_in(r, 3, "position", 4, position=2), "position 4"),
    (lambda r: r + [r[0]], "more than once"),
    (lambda r: [dict(rec, position_results=rec["position_results"][1:]) for rec in r], "no position 0"),
    (lambda r: set_in(r, 0, "ablated_answer", "The answer is: 1", position=0), "position 0"),
    (lambda r: set_in(r, 1, "expected_answer", None), "expected_answer"),
])
def test_malformed_files_give_one_clear_error_and_no_run(store, tmp_path, edit, message):
    path = broken(tmp_path, edit)
    with pytest.raises(SeedFormatError, match=message) as error:
        import_seed(store, path)
    assert str(path) in str(error.value)
    assert store.query("SELECT count(*) FROM runs")[0][0] == 0


def test_missing_and_wrong_validation_file(store, tmp_path):
    with pytest.raises(SeedFormatError, match="cannot read"):
        import_seed(store, tmp_path / "absent.json")
    with pytest.raises(SeedFormatError, match="validation object"):
        import_seed(store, FIXTURES / seed.SCORES, FIXTURES / seed.SCORES)
    copy = tmp_path / "v.json"
    shutil.copy(FIXTURES / seed.VALIDATION, copy)
    assert import_seed(store, FIXTURES / seed.SCORES, copy)


def test_an_imported_run_keeps_the_old_scripts_positions(store):
    """The old loop fed BOT as its first "latent": the run says so, its rows say what each position ablated."""
    run_id = import_seed(store, FIXTURES / seed.SCORES)
    assert store.run_row(run_id)["positions"] == "old-script"
    rows = dict(store.query("SELECT k, ablated_positions FROM results WHERE run_id = ? AND scheme = 'prefix' "
                            "GROUP BY ALL", [run_id]))
    assert rows == {k: list(range(k)) for k in range(1, 6)}
