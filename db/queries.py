"""Every read of the database behind a page, the report or `stats`: SQL only, one function per read.

Functions take a `Store` and a `db.scope.Scope` (or plain values) and return DataFrames or plain
dicts; db/figures.py turns them into figures, db/stats.py holds the interval arithmetic. Rates
carry 95% Wilson intervals computed in SQL. What a variant ablated comes from the row itself
(`ablated_positions`, `latents_fed`, `position`: migration 3, written from runner.ablation.Variant),
never from its scheme and k. SQL text is constant: values arrive as named `$name` parameters
(db.scope.bind), measure and ordering names are checked against whitelists.
"""
from __future__ import annotations

import datetime as dt
import json
import math

import numpy as np
import pandas as pd

from db.scope import GROUP, PROBLEMS, QueryError, Scope, bind
from db.stats import BUCKET_EDGES, BUCKET_REST, wilson_sql

RATE_MEASURES = ("flip", "harm", "help", "changed")
MEASURES = RATE_MEASURES + ("logprob_drop",)
SCHEME_ORDER = "list_position(['baseline', 'prefix', 'single', 'suffix', 'exit'], scheme)"
# difficulty -1: none could be derived (runner.data.UNKNOWN_DIFFICULTY), its own bucket.
BUCKET = (f"CASE WHEN s.difficulty < 1 THEN 'unknown' "
          f"{' '.join(f'WHEN s.difficulty <= {e} THEN {n!r}' for e, n in BUCKET_EDGES)} ELSE {BUCKET_REST!r} END")
PROBLEM_ORDER = {"ord": "ord", "problem_id": "problem_id", "difficulty": "difficulty", "n_flips": "n_flips",
                 "baseline_correct": "baseline_correct"}


def check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise QueryError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")


def _df(store, sql: str, scope: Scope | None = None, **extra) -> pd.DataFrame:
    return store.query_df(sql, bind(sql, scope, **extra))


def plain(value):
    """JSON-safe copy: numpy scalars -> Python, NaN/inf -> None, timestamps -> ISO text."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return [plain(row) for row in value.to_dict("records")]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(value) else float(value)
    if value is None or value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    return value


# --- runs and their variant groups ---------------------------------------------------------------------
RUNS = ("SELECT id, name, status, phase, done, total, problems_per_hour, created, model, dataset, source, notes, "
        "tags, n_variants, elapsed_s, error, batch_size, peak_rss_mb, peak_gpu_mb, positions, "
        "(SELECT count(*) FROM problems p WHERE p.run_id = runs.id AND p.skip_reason IS NOT NULL) AS skipped "
        "FROM runs ORDER BY created DESC, id DESC")


def runs(store) -> pd.DataFrame:
    """Every run, newest first."""
    return store.query_df(RUNS)


def runs_json(store) -> list[dict]:
    """Every run as `runner status --json` prints it and the status file holds it: JSON values, times as ISO
    text to the millisecond, non-finite numbers as null. Without pandas: the sweep's thread writes the status
    file after every batch, and a DataFrame's round trip cost twice the query."""
    return [{name: _json_value(value) for name, value in row.items()} for row in store.query_records(RUNS)]


def _json_value(value):
    if isinstance(value, dt.datetime):
        return value.isoformat(timespec="milliseconds")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_statuses(store) -> dict[int, str]:
    """{run id: status}: what the sidebar's run labels show, polled to notice when they went stale."""
    return dict(store.query("SELECT id, status FROM runs"))


def latest_run_id(store) -> int | None:
    """The newest run's id, or None in an empty database."""
    rows = store.query("SELECT id FROM runs ORDER BY created DESC, id DESC LIMIT 1")
    return rows[0][0] if rows else None


def variant_groups(store, run_id: int) -> pd.DataFrame:
    """The distinct (scheme, method, site, mode) of a run's ablations (not the baseline), first stored first."""
    return _df(store, "SELECT scheme, method, site, mode, count(DISTINCT k) AS n_k FROM results "
                      "WHERE run_id = $run AND scheme <> 'baseline' GROUP BY ALL ORDER BY min(rowid)", run=run_id)


def first_group(store, scope: Scope) -> Scope | None:
    """`scope` with its group completed by the run's first stored group that matches it; None if none does."""
    if None not in scope.keys:
        return scope  # fully named: nothing to look up (an absent group gives empty figures)
    sql = (f"SELECT r.scheme, r.method, r.site, r.mode FROM results r WHERE {GROUP} "
           "GROUP BY ALL ORDER BY min(r.rowid) LIMIT 1")
    rows = store.query(sql, bind(sql, scope))
    return scope.group(*rows[0]) if rows else None


def positions(store, run_id: int) -> str:
    """How the run numbers latent positions (runner.ablation.POSITIONS)."""
    rows = _df(store, "SELECT positions FROM runs WHERE id = $run", run=run_id)
    return str(rows["positions"].iloc[0]) if len(rows) else "latent"


# --- accuracy and per-position rows --------------------------------------------------------------------------
def baseline_accuracy(store, scope: Scope) -> dict:
    """Baseline accuracy over the problems in scope: n, correct, accuracy and its 95% Wilson lo/hi."""
    frame = _df(store, f"WITH {PROBLEMS}, c AS (SELECT count(*) AS n, count(*) FILTER (WHERE baseline_correct) AS x "
                       f"FROM scope) SELECT n, x AS correct, {wilson_sql('x', 'n', 'accuracy')} FROM c", scope)
    row = plain(frame.to_dict("records")[0])
    return {"n": row["n"], "correct": row["correct"], "accuracy": row["accuracy"], "lo": row["accuracy_lo"],
            "hi": row["accuracy_hi"]}


# Per (group, k) cell: what its rows ablated, as they say themselves.
CELL = ("r.scheme, r.method, r.site, r.mode, r.k, any_value(r.position) AS position, "
        "any_value(r.ablated_positions) AS ablated_positions, any_value(r.latents_fed) AS latents_fed")
CELL_ORDER = f"ORDER BY {SCHEME_ORDER}, method, site, mode, k"


def rates(store, scope: Scope) -> pd.DataFrame:
    """Per (group, k): position, what it ablated, n and, per rate measure m, m, m_lo, m_hi (95% Wilson); one scan."""
    counts = ", ".join(f"count(*) FILTER (WHERE r.{m}) AS x_{m}" for m in RATE_MEASURES)
    wilsons = ", ".join(wilson_sql(f"x_{m}", "n", m) for m in RATE_MEASURES)
    return _df(store, f"WITH {PROBLEMS}, c AS (SELECT {CELL}, count(*) AS n, {counts} FROM results r "
                      f"JOIN scope s USING (problem_id) WHERE {GROUP} GROUP BY ALL) "
                      f"SELECT scheme, method, site, mode, k, position, ablated_positions, latents_fed, n, {wilsons} "
                      f"FROM c {CELL_ORDER}", scope)


def drop_cells(store, scope: Scope) -> pd.DataFrame:
    """Per (group, k): n_logprob, the mean gold log-prob drop, and its problems' ords and drops as lists."""
    stored = "FILTER (WHERE r.logprob_drop IS NOT NULL)"  # an imported old run stores no log-probs
    return _df(store, f"WITH {PROBLEMS} SELECT {CELL}, count(r.logprob_drop) AS n_logprob, "
                      f"avg(r.logprob_drop) AS logprob_drop, coalesce(list(s.ord) {stored}, []) AS ords, "
                      f"coalesce(list(r.logprob_drop) {stored}, []) AS drops FROM results r "
                      f"JOIN scope s USING (problem_id) WHERE {GROUP} "
                      f"GROUP BY r.scheme, r.method, r.site, r.mode, r.k {CELL_ORDER}", scope)


def scores(store, scope: Scope, measure: str = "flip") -> pd.DataFrame:
    """Per group: its problems in scope as lists: ords, difficulties, mean `measure` over early / late positions.

    Early = positions 0..T/2-1, late = T/2..T-1 (the row's own `position`). Lists per group, not a row
    per (problem, group): one scan, and no group names repeated per problem. A problem without an
    early (or late) position in the group has NaN there.
    """
    check_measure(measure)
    value = f"r.{measure}::DOUBLE"  # a whitelisted column name
    return _df(store, (
        f"WITH {PROBLEMS}, t AS (SELECT num_latent AS T FROM runs WHERE id = $run), per_problem AS ("
        f"SELECT r.scheme, r.method, r.site, r.mode, s.ord, s.difficulty, "
        f"coalesce(avg({value}) FILTER (WHERE r.position < t.T // 2), 'NaN') AS early, "
        f"coalesce(avg({value}) FILTER (WHERE r.position >= t.T // 2 AND r.position < t.T), 'NaN') AS late "
        f"FROM scope s JOIN results r USING (problem_id) CROSS JOIN t WHERE {GROUP} GROUP BY ALL) "
        f"SELECT scheme, method, site, mode, list(ord) AS ords, list(difficulty) AS difficulties, "
        f"list(early) AS early, list(late) AS late FROM per_problem GROUP BY scheme, method, site, mode "
        f"ORDER BY {SCHEME_ORDER}, method, site, mode"), scope)


def accuracy_by(store, scope: Scope, by: str) -> pd.DataFrame:
    """Per step count (by='steps') or bucket: n, correct and baseline accuracy with its Wilson interval."""
    if by not in ("steps", "bucket"):
        raise QueryError(f"by must be 'steps' or 'bucket', got {by!r}")
    key, key_sql = ("difficulty", "s.difficulty") if by == "steps" else ("bucket", BUCKET)  # constants
    return _df(store, f"WITH {PROBLEMS}, c AS (SELECT {key_sql} AS {key}, min(s.difficulty) AS d, count(*) AS n, "
                      f"count(*) FILTER (WHERE s.baseline_correct) AS x FROM scope s GROUP BY 1) "
                      f"SELECT {key}, n, x AS correct, {wilson_sql('x', 'n', 'accuracy')} FROM c ORDER BY d", scope)


def heatmap_cells(store, scope: Scope, measure: str) -> pd.DataFrame:
    """Per (difficulty, k) of the scope's group: the measure's rate (or mean log-prob drop), over n problems
    (`total` = its sum: a rate's count), and what k ablated."""
    check_measure(measure)
    value = f"r.{measure}::DOUBLE"  # a whitelisted measure name
    return _df(store, f"WITH {PROBLEMS} SELECT s.difficulty, {CELL}, avg({value}) AS value, count({value}) AS n, "
                      f"sum({value}) AS total FROM results r JOIN scope s USING (problem_id) WHERE {GROUP} "
                      "GROUP BY ALL", scope)


def old_script_cells(store, scope: Scope) -> pd.DataFrame:
    """Per (difficulty, the old script's position): n and flips, over the baseline rows and the scope's group.

    The old script's position of a row is how many positions it ablated (0 = the baseline, p = prefix
    k = p), read from the row; `first` orders difficulties as the old script met them.
    """
    return _df(store, f"WITH {PROBLEMS} SELECT s.difficulty, len(r.ablated_positions) AS old_position, count(*) AS n, "
                      f"count(*) FILTER (WHERE r.flip) AS flips, min(s.ord) AS first FROM results r "
                      f"JOIN scope s USING (problem_id) WHERE r.run_id = $run AND (r.scheme = 'baseline' OR ({GROUP})) "
                      f"GROUP BY ALL ORDER BY first, old_position", scope)


def old_script_scores(store, scope: Scope) -> pd.DataFrame:
    """`scores`' shape for the old script's early/late of the scope's group: each problem's flip rate over the old
    positions 0-2 (the baseline row's 0 included) and 3-5 (old position = how many positions a row ablated)."""
    return _df(store, f"WITH {PROBLEMS}, per_problem AS (SELECT s.ord, s.difficulty, "
                      "coalesce(avg(r.flip::DOUBLE) FILTER (WHERE len(r.ablated_positions) <= 2), 'NaN') AS early, "
                      "coalesce(avg(r.flip::DOUBLE) FILTER (WHERE len(r.ablated_positions) BETWEEN 3 AND 5), 'NaN') "
                      "AS late FROM results r JOIN scope s USING (problem_id) "
                      f"WHERE r.run_id = $run AND (r.scheme = 'baseline' OR ({GROUP})) GROUP BY ALL) "
                      "SELECT $scheme AS scheme, $method AS method, $site AS site, $mode AS mode, list(ord) AS ords, "
                      "list(difficulty) AS difficulties, list(early) AS early, list(late) AS late FROM per_problem "
                      "HAVING count(*) > 0", scope)


def curve_values(store, scope: Scope, measure: str) -> pd.DataFrame:
    """One group's per-(problem, k) values of a measure (0/1 for rates; NaN-free: missing log-probs dropped)."""
    check_measure(measure)
    return _df(store, f"WITH {PROBLEMS} SELECT r.problem_id, r.k, r.{measure}::DOUBLE AS value FROM results r "
                      f"JOIN scope s USING (problem_id) WHERE {GROUP} AND r.{measure} IS NOT NULL "
                      f"ORDER BY r.k, r.problem_id", scope)


# --- problems ---------------------------------------------------------------------------------------------
def problems_table(store, scope: Scope, any_flip: bool | None = None, search: str | None = None,
                   order_by: str = "ord", limit: int = 500) -> pd.DataFrame:
    """One row per problem in scope: baseline answer, flip count; `order_by` a PROBLEM_ORDER key, '-key' descending."""
    name = order_by.lstrip("-")
    if name not in PROBLEM_ORDER:
        raise QueryError(f"order_by must be one of {', '.join(PROBLEM_ORDER)} (optionally '-name'), got {order_by!r}")
    direction = "DESC" if order_by.startswith("-") else "ASC"
    return _df(store, (
        f"WITH {PROBLEMS}, f AS (SELECT problem_id, count(*) FILTER (WHERE flip) AS n_flips, count(*) AS n_variants "
        f"FROM results WHERE run_id = $run AND scheme <> 'baseline' GROUP BY problem_id) "
        f"SELECT * FROM (SELECT s.problem_id, s.ord, s.difficulty, s.phase, s.gold, s.baseline_answer, "
        f"s.baseline_value, s.baseline_correct, coalesce(f.n_flips, 0) AS n_flips, "
        f"coalesce(f.n_variants, 0) AS n_variants, s.question FROM scope s LEFT JOIN f USING (problem_id)) "
        f"WHERE ($flipped IS NULL OR (n_flips > 0) = $flipped) AND ($search IS NULL "
        f"OR contains(lower(question), lower($search)) OR contains(lower(problem_id), lower($search))) "
        f"ORDER BY {PROBLEM_ORDER[name]} {direction}, ord LIMIT $limit"),
        scope.problems(), flipped=any_flip, search=search or None, limit=int(limit))


def problem_detail(store, run_id: int, problem_id: str) -> dict | None:
    """{'problem': its row, 'variants': each variant's answer, what it ablated, correct, flip, gold_logprob, lens}."""
    where = {"run": run_id, "problem": problem_id}
    problem = _df(store, "SELECT problem_id, ord, question, gold, gold_value, difficulty, solution, phase "
                         "FROM problems WHERE run_id = $run AND problem_id = $problem", **where)
    if problem.empty:
        return None
    variants = _df(store, "SELECT variant, scheme, k, method, site, mode, ablated_positions, latents_fed, position, "
                          "answer_text, answer_value, extraction, correct, changed, flip, harm, help, gold_logprob, "
                          "logprob_drop, lens FROM results WHERE run_id = $run AND problem_id = $problem "
                          f"{CELL_ORDER}", **where)
    variants["lens"] = [json.loads(v) if isinstance(v, str) else None for v in variants["lens"]]
    variants["ablated_positions"] = [[] if v is None else [int(p) for p in v] for v in variants["ablated_positions"]]
    return {"problem": plain(problem.to_dict("records")[0]), "variants": variants}


def latest_results(store, run_id: int, n: int = 20) -> pd.DataFrame:
    """The `n` most recently stored problems (highest problems.ord first) with their baseline answers."""
    return _df(store, "WITH f AS (SELECT problem_id, count(*) FILTER (WHERE flip) AS n_flips FROM results "
                      "WHERE run_id = $run AND scheme <> 'baseline' GROUP BY problem_id) "
                      "SELECT p.ord, p.problem_id, p.difficulty, p.phase, p.gold, b.answer_text, b.answer_value, "
                      "b.correct, coalesce(f.n_flips, 0) AS n_flips FROM problems p JOIN results b "
                      "ON b.problem_id = p.problem_id LEFT JOIN f ON f.problem_id = p.problem_id "
                      "WHERE p.run_id = $run AND b.run_id = $run AND b.scheme = 'baseline' ORDER BY p.ord DESC "
                      "LIMIT $n", run=run_id, n=int(n))


def skipped_problems(store, run_id: int) -> pd.DataFrame:
    """The problems the model could not run (problem_id, question, reason), in run order."""
    return _df(store, "SELECT problem_id, question, skip_reason AS reason FROM problems "
                      "WHERE run_id = $run AND skip_reason IS NOT NULL ORDER BY ord", run=run_id)


def metrics(store, run_id: int) -> pd.DataFrame:
    """The run's metrics time series (one row per stored batch), oldest first."""
    return _df(store, "SELECT t, elapsed_s, phase, done, batch_problems, batch_size, problems_per_hour, rss_mb, "
                      "sweep_pss_mb, cpu_pct, gpu_mem_mb, gpu_peak_mb FROM run_metrics WHERE run_id = $run "
                      "ORDER BY elapsed_s, t",
               run=run_id)
