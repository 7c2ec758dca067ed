"""db/queries.py, db/figures.py and stats_json against a hand-built run whose numbers are known (a real DuckDB
file in tmp_path).

The run: 10 problems p0..p9, T = 6, baseline right on p0..p7 and wrong on p8, p9, p0..p3 in the
validation phase; variants prefix k=1..6 and single k=0..5 (zero/latent/recompute) and prefix k=1..6
with method mean. Prefix (zero) flips are nested (PREFIX_FLIPS); single k flips problem k only.
Gold log-prob: baseline -1, a prefix-k variant of problem i is 0.1 k + 0.01 i below it.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from db import figures, queries, report
from db.scope import Scope
from db.stats import _distinct_rows, bootstrap_means, percentile_interval
from db.store import Store

T = 6
DIFFICULTY = [1, 1, 2, 2, 3, 3, 4, 5, 6, 7]
BASELINE_RIGHT = [True] * 8 + [False] * 2
PREFIX_FLIPS = {1: set(), 2: {0}, 3: {0, 1, 8}, 4: {0, 1, 2, 8}, 5: {0, 1, 2, 3, 8, 9}, 6: {0, 1, 2, 3, 4, 5, 8, 9}}
QUESTIONS = ["Janet's ducks lay 16 eggs.", "Tom says \"hi\" twice."] + [f"Question number {i}" for i in range(2, 10)]


def result(i: int, scheme: str, k: int, flip: bool, method: str = "zero", drop: float | None = None) -> dict:
    base = BASELINE_RIGHT[i]
    correct = base != flip
    logprob = -1.0 if drop is None else -1.0 - drop
    return {"problem_id": f"p{i}", "variant": f"{scheme}:{k}/{method}/latent/recompute", "scheme": scheme, "k": k,
            "method": method, "site": "latent", "mode": "recompute",
            "answer_text": f"The answer is: {i if correct else 99}",
            "answer_value": float(i if correct else 99), "extraction": "codi", "correct": correct, "changed": flip,
            "flip": flip, "harm": base and not correct, "help": correct and not base, "gold_logprob": logprob,
            "logprob_drop": drop, "lens": json.dumps([[["7", 0.5]]]) if scheme == "baseline" else None}


def build_run(store: Store, name: str = "hand") -> int:
    """The run described in the module docstring, written through the Store as a sweep would."""
    run_id = store.create_run(name=name, model="toy", dataset="builtin", config={"schemes": ["prefix", "single"]},
                              num_latent=T, n_variants=25, total=10, status="running")
    store.insert_problems(run_id, [{"problem_id": f"p{i}", "ord": i, "question": QUESTIONS[i], "gold": str(i),
                                    "gold_value": float(i), "difficulty": DIFFICULTY[i], "solution": "",
                                    "phase": "validation" if i < 4 else "full"} for i in range(10)])
    for batch in (range(0, 5), range(5, 10)):
        rows = []
        for i in batch:
            rows.append(result(i, "baseline", 0, False, method="none", drop=0.0))
            rows += [result(i, "prefix", k, i in PREFIX_FLIPS[k], drop=0.1 * k + 0.01 * i) for k in range(1, T + 1)]
            rows += [result(i, "single", k, i == k) for k in range(T)]
            rows += [result(i, "prefix", k, False, method="mean", drop=0.0) for k in range(1, T + 1)]
        store.write_batch(run_id, rows, {"elapsed_s": 10.0 * (batch.stop // 5), "phase": "full", "done": batch.stop,
                                         "problems_per_hour": 1800.0, "rss_mb": 500.0 + batch.stop,
                                         "sweep_pss_mb": 900.0 - batch.stop},
                          done=batch.stop, problems_per_hour=1800.0)
    return run_id


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "q.duckdb")
    yield s
    s.close()


@pytest.fixture
def run_id(store):
    return build_run(store)


def wilson(x: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = x / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def row(frame: pd.DataFrame, **match) -> pd.Series:
    mask = pd.Series(True, index=frame.index)
    for column, value in match.items():
        mask &= frame[column] == value
    assert mask.sum() == 1, f"{mask.sum()} rows match {match}"
    return frame[mask].iloc[0]


def test_wilson_for_three_of_ten_is_the_hand_value(store, run_id):
    curve = figures.position_curve(store, Scope(run_id, scheme="prefix", method="zero"), "flip")
    k3 = row(curve, k=3)
    assert (k3["n"], k3["value"]) == (10, 0.3)
    assert k3["value_lo"] == pytest.approx(0.1078, abs=1e-4) and k3["value_hi"] == pytest.approx(0.6032, abs=1e-4)
    assert k3["position"] == 2  # prefix k ablates 0..k-1: position k-1
    assert list(curve["value"]) == [len(PREFIX_FLIPS[k]) / 10 for k in range(1, 7)]


def test_a_side_where_every_problem_scored_the_same_gets_wilsons_interval_not_zero_width(store, run_id):
    """The mean method flips nothing: a bootstrap of ten zeros is [0, 0], which ten problems cannot promise.
    Flip-based sides get Wilson's 0-of-10 interval (the same formula as the SQL's), the ratio the bound its
    sides give; a log-prob drop of exactly 0 everywhere keeps its bootstrap (no rate to bound)."""
    from db.stats import wilson as wilson_np
    mean = figures.early_late(store, Scope(run_id, scheme="prefix", method="mean"))
    assert (mean["n"], mean["early"], mean["late"]) == (10, 0.0, 0.0)
    assert (mean["early_lo"], mean["early_hi"]) == pytest.approx(wilson(0, 10)) != (0.0, 0.0)
    assert (mean["late_lo"], mean["late_hi"]) == pytest.approx(wilson(0, 10))
    assert mean["ratio"] is None and mean["ratio_hi"] is None  # 0 / 0: no ratio, no upper bound
    drop = figures.early_late(store, Scope(run_id, scheme="prefix", method="mean"), measure="logprob_drop")
    assert (drop["early"], drop["early_lo"], drop["early_hi"]) == (0.0, 0.0, 0.0)
    # Difficulty 1 (p0, p1): every prefix k >= 4 flips both, late = 1 for each: Wilson's 2 of 2.
    one = row(figures.difficulty_table(store, Scope(run_id, scheme="prefix", method="zero")), difficulty=1)
    assert (one["late"], one["late_lo"], one["late_hi"]) == pytest.approx((1.0, *wilson(2, 2)))
    assert one["early_lo"] < one["early"] < one["early_hi"]  # p0 2/3, p1 1/3: the bootstrap's own
    assert (one["ratio_lo"], one["ratio_hi"]) == pytest.approx((one["early_lo"] / one["late_hi"],
                                                                one["early_hi"] / one["late_lo"]))
    lo, hi = wilson_np(np.array([0, 3, 10, 4]), np.array([10, 10, 10, 0]))
    hand = [wilson(0, 10), wilson(3, 10), wilson(10, 10)]  # (lo, hi) each; flat lists: approx is not nested
    assert [*lo[:3], *hi[:3]] == pytest.approx([low for low, _ in hand] + [high for _, high in hand])
    assert math.isnan(lo[3]) and math.isnan(hi[3])
    sql = store.query(f"SELECT {queries.wilson_sql('x', 'n')} FROM (VALUES (0, 10), (3, 10), (10, 10)) t(x, n)")
    assert [r[1] for r in sql] + [r[2] for r in sql] == pytest.approx([*lo[:3], *hi[:3]])


def test_a_paired_difference_without_spread_gets_the_interval_wilson_bounds_not_zero_width(store, run_id):
    """Zero against mean (which flips nothing) on the same ten problems: at k = 1 no pair disagrees, and the
    bootstrap's [0, 0] would promise that no other problem does. Its interval is the one Wilson's intervals of
    the two kinds of disagreement bound (0 of 10 each way); where every pair differs one way, from Wilson's
    10 of 10; with spread it stays the bootstrap. Log-prob drops keep the bootstrap (no count to bound)."""
    from db.paired import disagreement_interval, paired_difference
    zero, mean = Scope(run_id, scheme="prefix", method="zero"), Scope(run_id, scheme="prefix", method="mean")
    flips = paired_difference(queries.curve_values(store, zero, "flip"), queries.curve_values(store, mean, "flip"),
                              rate=True)
    at = {int(r.k): r for r in flips.itertuples()}
    _, none_hi = wilson(0, 10)
    assert (at[1].shared, at[1].diff) == (10, 0.0)
    assert (at[1].diff_lo, at[1].diff_hi) == pytest.approx((-none_hi, none_hi)) and none_hi > 0.25
    differences = np.array([1.0 if i in PREFIX_FLIPS[3] else 0.0 for i in range(10)])  # zero flips 3, mean none
    (lo,), (hi,) = percentile_interval(bootstrap_means(differences[:, None], 0, 1000))
    assert (at[3].diff, at[3].diff_lo, at[3].diff_hi) == pytest.approx((0.3, lo, hi)) and lo < 0.3 < hi
    all_lo, _ = wilson(10, 10)
    ones, zeros = np.ones(10), np.zeros(10)
    assert disagreement_interval(ones, zeros) == pytest.approx((all_lo - none_hi, 1.0))
    assert disagreement_interval(zeros, ones) == pytest.approx((-1.0, none_hi - all_lo))
    drops = paired_difference(queries.curve_values(store, mean, "logprob_drop"),
                              queries.curve_values(store, mean, "logprob_drop"), rate=False)
    assert (drops["diff"] == 0).all() and (drops["diff_lo"] == 0).all() and (drops["diff_hi"] == 0).all()


def test_the_old_scripts_early_late_keeps_its_value_and_gains_a_bootstrap_interval(store, run_id):
    """Per problem, the old early is its flip rate over the baseline row and prefix k = 1, 2 (p0: 1/3, the rest 0),
    the old late over k = 3, 4, 5 (p0, p1 and p8: 1; p2: 2/3; p3 and p9: 1/3). Difficulty 1 holds p0 and p1:
    early is the bootstrap of [1/3, 0], late (both 1) Wilson's 2 of 2; the values stay the old script's."""
    group = Scope(run_id, scheme="prefix", method="zero", site="latent", mode="recompute")
    rows = {r["difficulty"]: r["old_script_early_late"] for r in figures.named_figures(store, group)["rows"]}
    one = rows[1]
    assert (one["early_importance"], one["late_importance"]) == pytest.approx((1 / 6, 1.0))
    (lo,), (hi,) = percentile_interval(bootstrap_means(np.array([[1 / 3], [0.0]]), 0, 1000))
    assert (one["early_importance_lo"], one["early_importance_hi"]) == pytest.approx((lo, hi)) and lo < hi
    assert (one["late_importance_lo"], one["late_importance_hi"]) == pytest.approx(wilson(2, 2))
    assert rows[4]["early_importance"] == 0.0 and rows[4]["early_importance_hi"] == pytest.approx(wilson(0, 1)[1])
    summary = figures.old_script_summary(store, group)["by_difficulty"]
    assert {d: {k: v[k] for k in ("early_importance", "late_importance")} for d, v in summary.items()} == \
        {str(d): {k: v[k] for k in ("early_importance", "late_importance")} for d, v in rows.items()}


def test_baseline_accuracy_and_filters(store, run_id):
    acc = queries.baseline_accuracy(store, Scope(run_id))
    assert (acc["n"], acc["correct"], acc["accuracy"]) == (10, 8, 0.8)
    assert (acc["lo"], acc["hi"]) == pytest.approx(wilson(8, 10))
    assert queries.baseline_accuracy(store, Scope(run_id, phase="full")) == acc  # full = every problem
    val = queries.baseline_accuracy(store, Scope(run_id, phase="validation"))
    assert (val["n"], val["correct"]) == (4, 4)
    hard = queries.baseline_accuracy(store, Scope(run_id, difficulties=(6, 7, 5)))
    assert (hard["n"], hard["correct"]) == (3, 1)
    wrong = queries.baseline_accuracy(store, Scope(run_id, baseline_correct=False))
    assert (wrong["n"], wrong["correct"], wrong["accuracy"]) == (2, 0, 0.0)
    with pytest.raises(ValueError, match="phase"):
        Scope(run_id, phase="everything")


def test_rates_change_with_filters(store, run_id):
    k3 = dict(scheme="prefix", method="zero", k=3)
    right = row(figures.position_curve(store, Scope(run_id, baseline_correct=True), "flip"), **k3)
    assert (right["n"], right["value"]) == (8, 2 / 8)
    harm = row(figures.position_curve(store, Scope(run_id), "harm"), **k3)
    help_ = row(figures.position_curve(store, Scope(run_id), "help"), **k3)
    assert (harm["value"], help_["value"]) == (0.2, 0.1)
    assert (harm["value_lo"], harm["value_hi"]) == pytest.approx(wilson(2, 10))
    val = row(figures.position_curve(store, Scope(run_id, phase="validation"), "flip"), **k3)
    assert (val["n"], val["value"]) == (4, 0.5)
    easy = row(figures.position_curve(store, Scope(run_id, difficulties=(1,)), "changed"), **k3)
    assert (easy["n"], easy["value"]) == (2, 1.0)
    singles = figures.position_curve(store, Scope(run_id, scheme="single"), "flip")
    assert set(singles["scheme"]) == {"single"} and list(singles["position"]) == list(range(6))
    assert all(singles["value"] == 0.1)


def test_logprob_drop_mean_and_seeded_bootstrap(store, run_id):
    curve = figures.position_curve(store, Scope(run_id, scheme="prefix", method="zero"), "logprob_drop")
    k3 = row(curve, k=3)
    assert k3["n"] == 10 and k3["value"] == pytest.approx(0.3 + 0.01 * 4.5)
    assert k3["value_lo"] < k3["value"] < k3["value_hi"]
    assert k3["value_lo"] >= 0.3 and k3["value_hi"] <= 0.39  # drops range over 0.30..0.39
    again = figures.position_curve(store, Scope(run_id, scheme="prefix", method="zero"), "logprob_drop")
    pd.testing.assert_frame_equal(curve, again)
    other = figures.position_curve(store, Scope(run_id, scheme="prefix", method="zero"), "logprob_drop", seed=1)
    assert not other["value_lo"].equals(curve["value_lo"])
    flat = row(figures.position_curve(store, Scope(run_id, scheme="prefix", method="mean"), "logprob_drop"), k=2)
    assert (flat["value"], flat["value_lo"], flat["value_hi"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="measure"):
        figures.position_curve(store, Scope(run_id), "flip; DROP TABLE results")


def test_early_late_by_hand(store, run_id):
    # Prefix k -> position k-1. Per-problem early = mean flip over k=1..3, late over k=4..6.
    el = figures.early_late(store, Scope(run_id, scheme="prefix"))
    assert (el["method"], el["site"], el["mode"], el["n"]) == ("zero", "latent", "recompute", 10)
    assert el["early"] == pytest.approx(4 / 3 / 10) and el["late"] == pytest.approx(0.6)
    assert el["ratio"] == pytest.approx((4 / 30) / 0.6)
    assert el["early_lo"] <= el["early"] <= el["early_hi"] and el["late_lo"] <= el["late"] <= el["late_hi"]
    assert el["ratio_lo"] <= el["ratio"] <= el["ratio_hi"]
    single = figures.early_late(store, Scope(run_id, scheme="single"))
    assert single["early"] == pytest.approx(0.1) and single["late"] == pytest.approx(0.1)
    assert figures.early_late(store, Scope(run_id, scheme="suffix"))["n"] == 0  # no such variants


def test_difficulty_table_steps_and_buckets(store, run_id):
    steps = figures.difficulty_table(store, Scope(run_id, scheme="prefix"), by="steps")
    assert list(steps["difficulty"]) == [1, 2, 3, 4, 5, 6, 7] and list(steps["n"]) == [2, 2, 2, 1, 1, 1, 1]
    one = row(steps, difficulty=1)  # p0: early 2/3, late 1; p1: early 1/3, late 1
    assert (one["early"], one["late"], one["accuracy"]) == pytest.approx((0.5, 1.0, 1.0))
    assert one["ratio"] == pytest.approx(0.5)
    six = row(steps, difficulty=6)  # p8, baseline wrong
    assert (six["accuracy"], six["early"], six["late"]) == pytest.approx((0.0, 1 / 3, 1.0))
    buckets = figures.difficulty_table(store, Scope(run_id, scheme="prefix"), by="bucket")
    assert list(buckets["bucket"]) == ["1-2", "3-4", "5+"] and list(buckets["n"]) == [4, 3, 3]
    low = row(buckets, bucket="1-2")  # p0..p3: early (2/3+1/3+0+0)/4, late (1+1+1+2/3)/4
    assert (low["early"], low["late"]) == pytest.approx((0.25, 11 / 12))
    assert (low["accuracy_lo"], low["accuracy_hi"]) == pytest.approx(wilson(4, 4))
    narrowed = figures.difficulty_table(store, Scope(run_id, difficulties=(1, 2), scheme="prefix"), by="bucket")
    assert list(narrowed["bucket"]) == ["1-2"]
    with pytest.raises(ValueError):
        figures.difficulty_table(store, Scope(run_id), by="size")


def test_heatmap_is_difficulty_by_k(store, run_id):
    heat = figures.difficulty_heatmap(store, Scope(run_id).group("prefix", "zero", "latent", "recompute"), "flip")
    assert list(heat.index) == [1, 2, 3, 4, 5, 6, 7] and list(heat.columns) == [1, 2, 3, 4, 5, 6]
    assert heat.loc[1, 3] == 1.0 and heat.loc[3, 6] == 1.0 and heat.loc[4, 6] == 0.0 and heat.loc[2, 5] == 1.0
    row, column = list(heat.index).index(1), list(heat.columns).index(3)  # difficulty 1 = p0, p1: both flip at k = 3
    cell = [heat.attrs[key][row][column] for key in ("n", "lo", "hi")]
    assert cell == pytest.approx([2, *wilson(2, 2)])  # each cell's count and its 95% Wilson interval
    four = list(heat.index).index(4), list(heat.columns).index(6)  # p6 alone, no flip
    assert [heat.attrs[key][four[0]][four[1]] for key in ("n", "lo", "hi")] == pytest.approx([1, *wilson(0, 1)])


def test_problems_table_search_is_a_parameter(store, run_id):
    table = queries.problems_table(store, Scope(run_id), None, None, "ord", 100)
    assert list(table["problem_id"]) == [f"p{i}" for i in range(10)]
    p0 = row(table, problem_id="p0")  # prefix k=2..6 and single k=0
    assert (p0["n_flips"], p0["baseline_correct"], p0["baseline_answer"]) == (6, True, "The answer is: 0")
    assert list(queries.problems_table(store, Scope(run_id), search="janet's")["problem_id"]) == ["p0"]
    assert list(queries.problems_table(store, Scope(run_id), search='says "hi"')["problem_id"]) == ["p1"]
    for hostile in ("'; DROP TABLE results; --", "%", "_", "\\", "' OR 1=1 --"):
        assert queries.problems_table(store, Scope(run_id), search=hostile).empty
    assert store.query("SELECT count(*) FROM results")[0][0] == 10 * 19
    flipped = queries.problems_table(store, Scope(run_id), any_flip=True)
    assert set(flipped["problem_id"]) == {f"p{i}" for i in (0, 1, 2, 3, 4, 5, 8, 9)}
    calm = queries.problems_table(store, Scope(run_id), any_flip=False)
    assert set(calm["problem_id"]) == {"p6", "p7"}
    by_flips = queries.problems_table(store, Scope(run_id), order_by="-n_flips", limit=2)
    assert list(by_flips["problem_id"]) == ["p0", "p1"] and list(by_flips["n_flips"]) == [6, 5]
    for bad in ("question; DROP TABLE results", "ord DESC", "-"):
        with pytest.raises(ValueError, match="order_by"):
            queries.problems_table(store, Scope(run_id), order_by=bad)


def test_problem_detail_latest_and_metrics(store, run_id):
    detail = queries.problem_detail(store, run_id, "p8")
    assert detail["problem"]["difficulty"] == 6 and detail["problem"]["phase"] == "full"
    variants = detail["variants"]
    assert len(variants) == 19 and variants.iloc[0]["scheme"] == "baseline"
    assert variants.iloc[0]["lens"] == [[["7", 0.5]]]
    assert row(variants, variant="prefix:3/zero/latent/recompute")["correct"]  # p8 wrong at baseline: help
    assert queries.problem_detail(store, run_id, "nope") is None
    latest = queries.latest_results(store, run_id, 3)
    assert list(latest["problem_id"]) == ["p9", "p8", "p7"] and list(latest["n_flips"]) == [2, 4, 0]
    series = queries.metrics(store, run_id)
    assert list(series["done"]) == [5, 10] and list(series["rss_mb"]) == [505.0, 510.0]
    assert list(series["sweep_pss_mb"]) == [895.0, 890.0]


def test_runs_groups_and_latest(store, run_id):
    second = build_run(store, "second")
    listing = queries.runs(store)
    assert list(listing["id"]) == [second, run_id] and queries.latest_run_id(store) == second
    assert {"problems_per_hour", "n_variants", "peak_rss_mb", "tags"} <= set(listing.columns)
    groups = queries.variant_groups(store, run_id)
    assert [tuple(g) for g in groups[["scheme", "method"]].itertuples(index=False)] == [
        ("prefix", "zero"), ("single", "zero"), ("prefix", "mean")]
    assert queries.first_group(store, Scope(run_id, scheme="prefix")).keys == ("prefix", "zero", "latent", "recompute")
    assert queries.first_group(store, Scope(run_id, scheme="prefix", method="mean")).keys == \
        ("prefix", "mean", "latent", "recompute")
    assert queries.latest_run_id(Store(store.path.with_name("empty.duckdb"))) is None


def test_runs_json_holds_what_the_runs_frame_holds(store, run_id):
    """`status --json` and the status file list runs without pandas: the same values as the frame's own JSON
    (times to the millisecond, NaN and NULL as null), a NULL batch size beside a set one included."""
    second = build_run(store, "second")
    store.update_run(second, batch_size=36, problems_per_hour=float("nan"), elapsed_s=2.5)
    expected = json.loads(queries.runs(store).to_json(orient="records", date_format="iso"))
    listed = queries.runs_json(store)
    assert [r["id"] for r in listed] == [second, run_id] and listed[0]["problems_per_hour"] is None
    assert listed == expected and json.loads(json.dumps(listed)) == listed
    assert isinstance(listed[0]["created"], str) and len(listed[0]["created"]) == len("2026-12-02T09:47:26.774")


def test_compare_validation_against_full(store, run_id):
    both = figures.compare(store, Scope(run_id, phase="validation", scheme="prefix"), Scope(run_id, scheme="prefix"))
    k3 = row(both, k=3)
    assert (k3["value_a"], k3["value_b"], k3["diff"]) == pytest.approx((0.5, 0.3, 0.2))
    assert k3["overlap"]
    assert (k3["lo_a"], k3["hi_a"]) == pytest.approx(wilson(2, 4))
    methods = figures.compare(store, Scope(run_id, scheme="prefix", method="zero"),
                              Scope(run_id, scheme="prefix", method="mean"))
    k6 = row(methods, k=6)
    assert (k6["value_a"], k6["value_b"]) == (0.8, 0.0) and not k6["overlap"]


def test_stats_json_is_plain_json_with_seed_keys(store, run_id):
    stats = report.stats_json(store, run_id)
    text = json.dumps(stats, allow_nan=False)
    assert json.loads(text) == stats
    assert stats["n_problems"] == 10 and stats["baseline_accuracy"] == 0.8
    # Seed numbering: "0" is the baseline, "k" the prefix variant k.
    assert stats["position_importance"] == {"0": 0.0, **{str(k): len(PREFIX_FLIPS[k]) / 10 for k in range(1, 7)}}
    one = stats["by_difficulty"]["1"]  # p0, p1: positions 0,1,2 = 0, 0, 0.5; 3,4,5 = 1, 1, 1
    assert one == {"n_problems": 2, "baseline_accuracy": 1.0, "early_importance": pytest.approx(0.5 / 3),
                   "late_importance": 1.0, "pattern_validated": False}
    extras = stats["extras"]
    assert extras["baseline_accuracy"]["accuracy"] == 0.8 and extras["summary_group"]["method"] == "zero"
    assert [(g["scheme"], g["method"]) for g in extras["groups"]] == [("prefix", "zero"), ("single", "zero"),
                                                                      ("prefix", "mean")]
    k3 = extras["groups"][0]["positions"][2]
    assert k3["k"] == 3 and k3["flip"]["value"] == 0.3 and k3["flip"]["lo"] == pytest.approx(0.1078, abs=1e-4)
    assert {"flip", "harm", "help", "changed", "logprob_drop"} <= set(k3)
    assert extras["groups"][0]["early_late"]["late"] == pytest.approx(0.6)
    assert [r["bucket"] for r in extras["groups"][0]["by_difficulty"]["bucket"]] == ["1-2", "3-4", "5+"]
    mean = report.stats_json(store, run_id, method="mean")
    assert mean["position_importance"]["6"] == 0.0 and mean["extras"]["summary_group"]["method"] == "mean"


def test_runs_do_not_mix(store, run_id):
    other = store.create_run(name="all flips", model="toy", dataset="builtin", config={}, num_latent=T, n_variants=7)
    store.insert_problems(other, [{"problem_id": f"p{i}", "ord": i, "question": "?", "gold": "1", "gold_value": 1.0,
                                   "difficulty": 1, "solution": "", "phase": "full"} for i in range(3)])
    store.write_batch(other, [result(i, "baseline", 0, False, method="none") for i in range(3)]
                      + [result(i, "prefix", k, True) for i in range(3) for k in range(1, T + 1)])
    assert list(figures.position_curve(store, Scope(other), "flip")["value"]) == [1.0] * 6
    zero = figures.position_curve(store, Scope(run_id, scheme="prefix", method="zero"), "flip")
    assert row(zero, k=1)["value"] == 0.0
    assert queries.baseline_accuracy(store, Scope(run_id))["n"] == 10


def test_a_run_with_nothing_stored_yet(store):
    empty = store.create_run(name="new", model="toy", dataset="builtin", config={}, num_latent=T, n_variants=7)
    assert queries.baseline_accuracy(store, Scope(empty)) == {"n": 0, "correct": 0, "accuracy": None, "lo": None,
                                                         "hi": None}
    assert figures.position_curve(store, Scope(empty), "logprob_drop").empty
    assert figures.difficulty_table(store, Scope(empty)).empty and queries.problems_table(store, Scope(empty)).empty
    assert figures.early_late(store, Scope(empty))["n"] == 0 and figures.difficulty_heatmap(store, Scope(empty)).empty
    stats = report.stats_json(store, empty)
    assert stats["n_problems"] == 0 and stats["extras"]["groups"] == [] and json.dumps(stats, allow_nan=False)


def test_interval_matches_numpy_percentiles():
    rng = np.random.default_rng(3)
    replicates = rng.normal(size=(1000, 5))
    replicates[rng.random((1000, 5)) < 0.1] = np.nan
    replicates[:, 4] = np.nan
    lo, hi = percentile_interval(replicates)
    expected = np.array([np.nanpercentile(replicates[:, j], [2.5, 97.5]) for j in range(4)])
    assert np.allclose(lo[:4], expected[:, 0]) and np.allclose(hi[:4], expected[:, 1])
    assert np.isnan(lo[4]) and np.isnan(hi[4])


def test_bootstrap_over_repeated_rows_draws_like_resampling_each_problem():
    """Flip scores repeat: bootstrap_means then draws counts per distinct row (a multinomial), which must
    give the resampling distribution of drawing problems one by one (the path continuous values take)."""
    rng = np.random.default_rng(5)
    discrete = rng.choice([0, 1 / 3, 2 / 3, 1], size=(4000, 2))
    discrete[rng.random(discrete.shape) < 0.1] = np.nan
    distinct = discrete + rng.normal(0, 1e-9, discrete.shape)  # no row repeats
    assert _distinct_rows(discrete, 1000) is not None and _distinct_rows(distinct, 1000) is None
    by_row, by_problem = bootstrap_means(discrete, 0, 2000), bootstrap_means(distinct, 0, 2000)
    means = np.nanmean(discrete, axis=0)
    assert np.allclose(by_row.mean(axis=0), means, atol=1e-3) and np.allclose(by_problem.mean(axis=0), means, atol=1e-3)
    assert np.allclose(by_row.std(axis=0), by_problem.std(axis=0), rtol=0.1)  # Monte Carlo error ~2%
    assert np.allclose(by_row.std(axis=0), np.nanstd(discrete, axis=0) / np.sqrt(3600), rtol=0.1)
    assert np.array_equal(bootstrap_means(discrete, 0, 2000), by_row)  # seeded


def test_migration_3_describes_the_rows_of_an_older_file(tmp_path):
    """A schema-2 file (a sweep of ours and an imported old run) gains what each row ablated, from Variant."""
    import duckdb

    from db import migrations
    path = tmp_path / "v2.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                    "applied TIMESTAMP DEFAULT current_timestamp)")
        for version, name, step in migrations.MIGRATIONS[:2]:
            step(con)
            con.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [version, name])
        for run_id, source in ((1, "sweep"), (2, "import")):
            con.execute("INSERT INTO runs (id, name, model, dataset, config, source, status, num_latent) "
                        "VALUES (?, 'r', 'm', 'd', '{}', ?, 'finished', 6)", [run_id, source])
        keys = ["baseline:0/none/latent/recompute", "prefix:3/zero/latent/recompute", "single:2/mean/resid:8/frozen",
                "suffix:4/zero/latent/recompute", "exit:2/none/latent/recompute"]
        for key in keys:
            scheme, k = key.split("/")[0].split(":")
            con.execute("INSERT INTO results (run_id, problem_id, variant, scheme, k, method, site, mode, correct, "
                        "changed, flip, harm, help) VALUES (1, 'p', ?, ?, ?, 'zero', 'latent', 'recompute', true, "
                        "false, false, false, false)", [key, scheme, int(k)])
    store = Store(path)
    try:
        rows = store.query("SELECT variant, ablated_positions, latents_fed, position FROM results ORDER BY variant")
        assert rows == [("baseline:0/none/latent/recompute", [], 6, None), ("exit:2/none/latent/recompute", [], 2, 2),
                        ("prefix:3/zero/latent/recompute", [0, 1, 2], 6, 2),
                        ("single:2/mean/resid:8/frozen", [2], 6, 2), ("suffix:4/zero/latent/recompute", [4, 5], 6, 4)]
        assert store.query("SELECT id, positions FROM runs ORDER BY id") == [(1, "latent"), (2, "old-script")]
        assert store.query("SELECT max(version) FROM schema_migrations")[0][0] == migrations.MIGRATIONS[-1][0]
        assert store.skipped_problems(1) == {}  # migration 4: problems.skip_reason, NULL for what ran before it
    finally:
        store.close()


def test_rows_are_described_when_stored(store, run_id):
    """write_batch stores each row's ablated positions, latents fed and position from runner.ablation.Variant."""
    from runner.ablation import Variant
    rows = store.query("SELECT DISTINCT variant, ablated_positions, latents_fed, position FROM results "
                       "WHERE run_id = ?", [run_id])
    assert len(rows) == 19
    for key, ablated, fed, position in rows:
        stored = {"ablated_positions": ablated, "latents_fed": fed, "position": position}
        assert stored == Variant.from_key(key).describe(T)
    assert ("prefix:4/zero/latent/recompute", [0, 1, 2, 3], 6, 3) in rows
