"""Every read behind a figure: one function per figure, statistics in SQL (DESIGN.md section 4).

Functions take a `Store` and plain hashable arguments (`st.cache_data` keys on them) and return
DataFrames or plain dicts. Rates carry 95% Wilson intervals computed in SQL; means (gold log-prob
drop, early/late importance, their ratio) carry seeded percentile-bootstrap intervals over problems.

Conventions, shared by every function here:
- A problem counts once its baseline row is stored (a batch writes all of a problem's variants).
- `Filters.phase` None or 'full' = every problem (validation problems are part of the full run);
  'validation' = the validation subset only.
- A variant's *position* (for early/late): prefix k ablates latents 0..k-1, so its position is
  k-1, the last latent it removes (position p <-> prefix k = p+1); single, suffix and exit use
  position = k. Early = positions 0..T/2-1 (0-2 for T = 6), late = T/2..T-1 (3-5).
  The seed numbered positions differently (0 = baseline, p = prefix k = p): only `stats_json`'s
  top-level keys (and db/seed.py) use the seed's numbering.
- SQL text is constant: filters arrive as `?` parameters (`? IS NULL OR col = ?`), measure and
  ordering names are checked against whitelists. Every statement filters `run_id = ?` first:
  DuckDB skips the row groups of other runs by their min/max.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from db.stats import bootstrap_means, percentile_interval, wilson_sql

RATE_MEASURES = ("flip", "harm", "help", "changed")
MEASURES = RATE_MEASURES + ("logprob_drop",)
EARLY_LATE = ("early", "early_lo", "early_hi", "late", "late_lo", "late_hi", "ratio", "ratio_lo", "ratio_hi")
SCHEME_ORDER = "list_position(['baseline', 'prefix', 'single', 'suffix', 'exit'], scheme)"
POSITION = "CASE WHEN r.scheme = 'prefix' THEN r.k - 1 ELSE r.k END"
BUCKET_EDGES, BUCKET_REST = ((2, "1-2"), (4, "3-4")), "5+"  # buckets: step counts up to each edge, then the rest
# difficulty -1: none could be derived (runner.data.UNKNOWN_DIFFICULTY), its own bucket.
BUCKET = (f"CASE WHEN s.difficulty < 1 THEN 'unknown' "
          f"{' '.join(f'WHEN s.difficulty <= {e} THEN {n!r}' for e, n in BUCKET_EDGES)} ELSE {BUCKET_REST!r} END")
GROUP_KEYS = ["scheme", "method", "site", "mode"]
PROBLEM_ORDER = {"ord": "ord", "problem_id": "problem_id", "difficulty": "difficulty", "n_flips": "n_flips",
                 "baseline_correct": "baseline_correct"}


@dataclass(frozen=True)
class Filters:
    """Which problems a figure counts; every query applies it the same way."""
    phase: str | None = None  # None or 'full': all problems; 'validation': the validation subset
    difficulties: tuple[int, ...] = ()  # step counts to keep; empty keeps all
    baseline_correct: bool | None = None  # keep problems whose baseline is right / wrong; None keeps all

    def __post_init__(self):
        if self.phase not in (None, "full", "validation"):
            raise ValueError(f"phase filter must be None, 'full' or 'validation', got {self.phase!r}")
        object.__setattr__(self, "difficulties", tuple(sorted(int(d) for d in self.difficulties)))


@dataclass(frozen=True)
class Curve:
    """One side of `compare`: a run, its problems in scope, and a variant group (None = the run's first)."""
    run_id: int
    filters: Filters = Filters()
    scheme: str = "prefix"
    method: str | None = None
    site: str | None = None
    mode: str | None = None


# The problems in scope: stored (baseline row present) and passing the filters.
SCOPE = """scope AS (
    SELECT p.problem_id, p.ord, p.difficulty, p.phase, p.gold, p.question, b.correct AS baseline_correct,
           b.answer_text AS baseline_answer, b.answer_value AS baseline_value
    FROM problems p JOIN results b ON b.problem_id = p.problem_id
    WHERE p.run_id = ? AND b.run_id = ? AND b.scheme = 'baseline'
      AND (? IS NULL OR p.phase = ?) AND (? OR list_contains(?, p.difficulty))
      AND (? IS NULL OR b.correct = ?))"""
GROUP = "(? IS NULL OR r.scheme = ?) AND (? IS NULL OR r.method = ?) AND (? IS NULL OR r.site = ?) " \
        "AND (? IS NULL OR r.mode = ?)"


def scope_params(run_id: int, filters: Filters) -> list:
    """The `?` values of SCOPE, in order (db/report.py builds its export on SCOPE too)."""
    phase = None if filters.phase in (None, "full") else filters.phase
    return [run_id, run_id, phase, phase, not filters.difficulties, list(filters.difficulties) or [0],
            filters.baseline_correct, filters.baseline_correct]


def _group_params(scheme, method, site, mode) -> list:
    return [scheme, scheme, method, method, site, site, mode, mode]


def _check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")


def _plain(value):
    """JSON-safe copy: numpy scalars -> Python, NaN/inf -> None, timestamps -> ISO text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return [_plain(row) for row in value.to_dict("records")]
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


# --- runs -----------------------------------------------------------------------------------------
def runs(store) -> pd.DataFrame:
    """Every run, newest first."""
    return store.query_df(
        "SELECT id, name, status, phase, done, total, problems_per_hour, created, model, dataset, source, notes, "
        "tags, n_variants, elapsed_s, error, batch_size, peak_rss_mb, peak_gpu_mb FROM runs "
        "ORDER BY created DESC, id DESC")


def run_statuses(store) -> dict[int, str]:
    """{run id: status}: what the sidebar's run labels show, polled to notice when they went stale."""
    return dict(store.query("SELECT id, status FROM runs"))


def latest_run_id(store) -> int | None:
    """The newest run's id, or None in an empty database."""
    rows = store.query("SELECT id FROM runs ORDER BY created DESC, id DESC LIMIT 1")
    return rows[0][0] if rows else None


def variant_groups(store, run_id: int) -> pd.DataFrame:
    """The distinct (scheme, method, site, mode) of a run's ablations (not the baseline), first stored first."""
    return store.query_df(
        "SELECT scheme, method, site, mode, count(DISTINCT k) AS n_k FROM results "
        "WHERE run_id = ? AND scheme <> 'baseline' GROUP BY ALL ORDER BY min(rowid)", [run_id])


def first_group(store, run_id: int, scheme: str, method=None, site=None, mode=None) -> tuple[str, str, str] | None:
    """The run's first stored (method, site, mode) of `scheme` matching those given (None = any); None if absent."""
    if None not in (method, site, mode):
        return method, site, mode  # fully named: nothing to look up (an absent group gives empty figures)
    rows = store.query(
        f"SELECT r.method, r.site, r.mode FROM results r WHERE r.run_id = ? AND {GROUP} "
        "GROUP BY ALL ORDER BY min(r.rowid) LIMIT 1", [run_id, *_group_params(scheme, method, site, mode)])
    return rows[0] if rows else None


# --- accuracy and per-position curves ----------------------------------------------------------------
def baseline_accuracy(store, run_id: int, filters: Filters = Filters()) -> dict:
    """Baseline accuracy over the problems in scope: n, correct, accuracy and its 95% Wilson lo/hi."""
    frame = store.query_df(
        f"WITH {SCOPE}, c AS (SELECT count(*) AS n, count(*) FILTER (WHERE baseline_correct) AS x FROM scope) "
        f"SELECT n, x AS correct, {wilson_sql('x', 'n', 'accuracy')} FROM c", scope_params(run_id, filters))
    row = _plain(frame.to_dict("records")[0])
    return {"n": row["n"], "correct": row["correct"], "accuracy": row["accuracy"], "lo": row["accuracy_lo"],
            "hi": row["accuracy_hi"]}


def _rates(store, run_id: int, filters: Filters, scheme=None, method=None, site=None, mode=None) -> pd.DataFrame:
    """Per (group, k): position, n and, per rate measure m, columns m, m_lo, m_hi (95% Wilson), in one scan."""
    counts = ", ".join(f"count(*) FILTER (WHERE r.{m}) AS x_{m}" for m in RATE_MEASURES)
    wilsons = ", ".join(wilson_sql(f"x_{m}", "n", m) for m in RATE_MEASURES)
    return store.query_df(
        f"WITH {SCOPE}, c AS (SELECT r.scheme, r.method, r.site, r.mode, r.k, {POSITION} AS position, "
        f"count(*) AS n, {counts} FROM results r JOIN scope s USING (problem_id) "
        f"WHERE r.run_id = ? AND r.scheme <> 'baseline' AND {GROUP} GROUP BY ALL) "
        f"SELECT scheme, method, site, mode, k, position, n, {wilsons} FROM c "
        f"ORDER BY {SCHEME_ORDER}, method, site, mode, k",
        [*scope_params(run_id, filters), run_id, *_group_params(scheme, method, site, mode)])


def _drops(store, run_id: int, filters: Filters, scheme=None, method=None, site=None, mode=None, seed: int = 0,
           n_boot: int = 1000) -> pd.DataFrame:
    """Per (group, k): n_logprob, the mean gold log-prob drop and its bootstrap interval (problems resampled)."""
    stored = "FILTER (WHERE r.logprob_drop IS NOT NULL)"  # an imported seed run stores no log-probs
    # One row per cell with its problems' values as lists: one scan, and no text repeated per problem.
    cells = store.query_df(
        f"WITH {SCOPE} SELECT r.scheme, r.method, r.site, r.mode, r.k, {POSITION} AS position, "
        f"count(r.logprob_drop) AS n_logprob, avg(r.logprob_drop) AS logprob_drop, "
        f"coalesce(list(s.ord) {stored}, []) AS ords, coalesce(list(r.logprob_drop) {stored}, []) AS drops "
        f"FROM results r JOIN scope s USING (problem_id) WHERE r.run_id = ? AND r.scheme <> 'baseline' AND {GROUP} "
        f"GROUP BY r.scheme, r.method, r.site, r.mode, r.k ORDER BY {SCHEME_ORDER}, method, site, mode, k",
        [*scope_params(run_id, filters), run_id, *_group_params(scheme, method, site, mode)])
    cells["logprob_drop_lo"] = cells["logprob_drop_hi"] = np.nan
    if cells["n_logprob"].sum() > 0:
        ords = np.concatenate(cells["ords"].to_list())
        column = np.repeat(np.arange(len(cells)), cells["n_logprob"].to_numpy())
        _, problem = np.unique(ords, return_inverse=True)
        matrix = np.full((problem.max() + 1, len(cells)), np.nan)  # (problems, cells)
        matrix[problem, column] = np.concatenate(cells["drops"].to_list()).astype(float)
        cells["logprob_drop_lo"], cells["logprob_drop_hi"] = percentile_interval(bootstrap_means(matrix, seed, n_boot))
    return cells.drop(columns=["ords", "drops"])


def position_curve(store, run_id: int, filters: Filters = Filters(), measure: str = "flip", scheme=None,
                   method=None, site=None, mode=None, seed: int = 0, n_boot: int = 1000) -> pd.DataFrame:
    """Per (scheme, method, site, mode, k): position, n, value, value_lo, value_hi of one measure.

    Rates (flip, harm, help, changed) are over all problems in scope with 95% Wilson intervals;
    logprob_drop is the mean over problems with a stored log-prob, 95% percentile bootstrap
    (`n_boot` resamples of problems, numpy default_rng(seed)).
    """
    _check_measure(measure)
    if measure in RATE_MEASURES:
        frame, n = _rates(store, run_id, filters, scheme, method, site, mode), "n"
    else:
        frame, n = _drops(store, run_id, filters, scheme, method, site, mode, seed, n_boot), "n_logprob"
    frame = frame[[*GROUP_KEYS, "k", "position", n, measure, f"{measure}_lo", f"{measure}_hi"]]
    return frame.set_axis([*GROUP_KEYS, "k", "position", "n", "value", "value_lo", "value_hi"], axis=1)


def _scores(store, run_id: int, filters: Filters, scheme=None, method=None, site=None, mode=None) -> pd.DataFrame:
    """Per group (scheme order): its problems in scope as lists: ords, difficulties, mean flip over early / late positions.

    Lists per group, not a row per (problem, group): one scan, and no group names repeated per problem.
    A problem without an early (or late) position in the group has NaN there.
    """
    per_problem = (
        f"WITH {SCOPE}, t AS (SELECT num_latent AS T FROM runs WHERE id = ?), per_problem AS ("
        f"SELECT r.scheme, r.method, r.site, r.mode, s.ord, s.difficulty, "
        f"coalesce(avg(r.flip::DOUBLE) FILTER (WHERE {POSITION} < t.T // 2), 'NaN') AS early, "
        f"coalesce(avg(r.flip::DOUBLE) FILTER (WHERE {POSITION} >= t.T // 2 AND {POSITION} < t.T), 'NaN') AS late "
        f"FROM scope s JOIN results r USING (problem_id) CROSS JOIN t "
        f"WHERE r.run_id = ? AND r.scheme <> 'baseline' AND {GROUP} GROUP BY ALL) ")
    return store.query_df(
        per_problem + "SELECT scheme, method, site, mode, list(ord) AS ords, list(difficulty) AS difficulties, "
        f"list(early) AS early, list(late) AS late FROM per_problem GROUP BY scheme, method, site, mode "
        f"ORDER BY {SCHEME_ORDER}, method, site, mode",
        [*scope_params(run_id, filters), run_id, run_id, *_group_params(scheme, method, site, mode)])


def _bucket(difficulty: np.ndarray) -> np.ndarray:
    """BUCKET, for step counts in numpy."""
    return np.select([difficulty < 1] + [difficulty <= edge for edge, _ in BUCKET_EDGES],
                     ["unknown"] + [name for _, name in BUCKET_EDGES], BUCKET_REST).astype(object)


def _early_late_table(scores: pd.DataFrame, by: str | None, seed: int, n_boot: int) -> pd.DataFrame:
    """Per (stratum `by`, group): n, early, late, ratio, each with a 95% bootstrap interval over the stratum's problems.

    `scores` comes from _scores; `by` is None, 'difficulty' or 'bucket'. One bootstrap per stratum
    serves every group (the same resampled problems), so ratios are paired.
    """
    columns = ([by] if by else []) + [*GROUP_KEYS, "n", *EARLY_LATE]
    if scores.empty:
        return pd.DataFrame(columns=columns)
    names = scores[GROUP_KEYS].to_numpy()
    group = np.repeat(np.arange(len(scores)), scores["ords"].map(len).to_numpy())  # (rows,) group code 0..G-1
    ords = np.concatenate(scores["ords"].to_list())
    difficulty = np.concatenate(scores["difficulties"].to_list())
    early = np.concatenate(scores["early"].to_list()).astype(float)
    late = np.concatenate(scores["late"].to_list()).astype(float)
    strata = {None: np.zeros(len(ords), dtype=int), "difficulty": difficulty, "bucket": _bucket(difficulty)}[by]
    G, found = len(names), {c: [] for c in columns}
    for stratum in sorted(set(strata.tolist())):
        rows = strata == stratum
        _, problem = np.unique(ords[rows], return_inverse=True)
        values = np.full((problem.max() + 1, 2 * G), np.nan)  # (problems, early per group | late per group)
        values[problem, group[rows]] = early[rows]
        values[problem, G + group[rows]] = late[rows]
        replicates = bootstrap_means(values, seed, n_boot)
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # a group absent from the stratum: all-NaN column
            means = np.nanmean(values, axis=0)
            ratio_reps = replicates[:, :G] / replicates[:, G:]
            ratio = means[:G] / means[G:]
        ratio_reps[~np.isfinite(ratio_reps)] = np.nan  # a replicate without late flips has no ratio
        ratio[~np.isfinite(ratio)] = np.nan
        lo, hi = percentile_interval(replicates)
        ratio_lo, ratio_hi = percentile_interval(ratio_reps)
        counts = (~np.isnan(values[:, :G])).sum(axis=0)
        kept = counts > 0
        stats = {"n": counts, "early": means[:G], "early_lo": lo[:G], "early_hi": hi[:G], "late": means[G:],
                 "late_lo": lo[G:], "late_hi": hi[G:], "ratio": ratio, "ratio_lo": ratio_lo, "ratio_hi": ratio_hi}
        stats.update({key: names[:, i] for i, key in enumerate(GROUP_KEYS)})
        if by:
            stats[by] = np.full(G, stratum, dtype=object)
        for column in columns:
            found[column].append(stats[column][kept])
    return pd.DataFrame({column: np.concatenate(parts) for column, parts in found.items()})


def early_late(store, run_id: int, filters: Filters = Filters(), scheme: str = "prefix", method=None, site=None,
               mode=None, seed: int = 0, n_boot: int = 1000) -> dict:
    """Mean flip over early (positions 0..T/2-1) and late (T/2..T-1) latents, their ratio, bootstrap intervals.

    Prefix k sits at position k-1 (the last latent it ablates), other schemes at position k. Early is
    the mean over problems of each problem's mean flip over the early positions (= the mean of the
    per-position rates when every problem has every variant).
    """
    group = first_group(store, run_id, scheme, method, site, mode)
    if group is None:
        return {"scheme": scheme, "method": method, "site": site, "mode": mode, "n": 0}
    table = _early_late_table(_scores(store, run_id, filters, scheme, *group), None, seed, n_boot)
    if table.empty:
        return {"scheme": scheme, "method": group[0], "site": group[1], "mode": group[2], "n": 0}
    return _plain(table.to_dict("records")[0])


def _accuracy_by(store, run_id: int, filters: Filters, by: str) -> pd.DataFrame:
    """Per step count or bucket: n and baseline accuracy with its Wilson interval."""
    if by not in ("steps", "bucket"):
        raise ValueError(f"by must be 'steps' or 'bucket', got {by!r}")
    key, key_sql = ("difficulty", "s.difficulty") if by == "steps" else ("bucket", BUCKET)  # constants
    return store.query_df(
        f"WITH {SCOPE}, c AS (SELECT {key_sql} AS {key}, min(s.difficulty) AS d, count(*) AS n, "
        f"count(*) FILTER (WHERE s.baseline_correct) AS x FROM scope s GROUP BY 1) "
        f"SELECT {key}, n, {wilson_sql('x', 'n', 'accuracy')} FROM c ORDER BY d", scope_params(run_id, filters))


def difficulty_table(store, run_id: int, filters: Filters = Filters(), scheme: str = "prefix", method=None,
                     site=None, mode=None, by: str = "steps", seed: int = 0, n_boot: int = 1000) -> pd.DataFrame:
    """Per step count (by='steps') or bucket 1-2/3-4/5+ (by='bucket'): n, baseline accuracy, early, late, ratio.

    Accuracy has a Wilson interval; early/late/ratio (as in `early_late`: prefix k is position k-1,
    the last latent it ablates; early = positions 0-2, late = 3-5) have bootstrap intervals over the
    stratum's problems. `n` counts the stratum's problems in scope.
    """
    accuracy = _accuracy_by(store, run_id, filters, by)
    key = "difficulty" if by == "steps" else "bucket"
    group = first_group(store, run_id, scheme, method, site, mode)
    scores = _scores(store, run_id, filters, scheme, *group) if group else pd.DataFrame()
    table = _early_late_table(scores, key, seed, n_boot)[[key, *EARLY_LATE]]
    return accuracy.merge(table, on=key, how="left").astype({c: float for c in EARLY_LATE})


def difficulty_heatmap(store, run_id: int, filters: Filters = Filters(), scheme: str = "prefix", method=None,
                       site=None, mode=None, measure: str = "flip") -> pd.DataFrame:
    """Difficulty (rows) x k (columns) matrix of a measure's rate (or mean log-prob drop) for one variant group."""
    _check_measure(measure)
    group = first_group(store, run_id, scheme, method, site, mode)
    if group is None:
        return pd.DataFrame()
    value = f"avg(r.{measure}::DOUBLE)"  # a whitelisted measure name
    long = store.query_df(
        f"WITH {SCOPE} SELECT s.difficulty, r.k, {value} AS value FROM results r JOIN scope s USING (problem_id) "
        f"WHERE r.run_id = ? AND r.scheme = ? AND r.method = ? AND r.site = ? AND r.mode = ? GROUP BY ALL",
        [*scope_params(run_id, filters), run_id, scheme, *group])
    return long.pivot(index="difficulty", columns="k", values="value").sort_index().sort_index(axis=1)


def compare(store, a: Curve, b: Curve, measure: str = "flip", seed: int = 0, n_boot: int = 1000) -> pd.DataFrame:
    """Per k: both curves' value and interval, the difference a - b, and whether the intervals overlap."""
    columns = ["k", "position", "n", "value", "value_lo", "value_hi"]
    sides = []
    for curve in (a, b):
        group = first_group(store, curve.run_id, curve.scheme, curve.method, curve.site, curve.mode)
        frame = pd.DataFrame(columns=columns) if group is None else position_curve(
            store, curve.run_id, curve.filters, measure, curve.scheme, *group, seed=seed, n_boot=n_boot)
        sides.append(frame[columns])
    both = sides[0].merge(sides[1], on=["k", "position"], how="outer", suffixes=("_a", "_b"))
    both = both.rename(columns={"value_lo_a": "lo_a", "value_hi_a": "hi_a", "value_lo_b": "lo_b",
                                "value_hi_b": "hi_b"})
    both["diff"] = both["value_a"] - both["value_b"]
    both["overlap"] = (both["lo_a"] <= both["hi_b"]) & (both["lo_b"] <= both["hi_a"])
    return both.sort_values("k").reset_index(drop=True)


# --- problems --------------------------------------------------------------------------------------
def problems_table(store, run_id: int, filters: Filters = Filters(), any_flip: bool | None = None,
                   search: str | None = None, order_by: str = "ord", limit: int = 500) -> pd.DataFrame:
    """One row per problem in scope: baseline answer, flip count; `order_by` a PROBLEM_ORDER key, '-key' descending."""
    name = order_by.lstrip("-")
    if name not in PROBLEM_ORDER:
        raise ValueError(f"order_by must be one of {', '.join(PROBLEM_ORDER)} (optionally '-name'), got {order_by!r}")
    direction = "DESC" if order_by.startswith("-") else "ASC"
    search = search or None
    return store.query_df(
        f"WITH {SCOPE}, f AS (SELECT problem_id, count(*) FILTER (WHERE flip) AS n_flips, count(*) AS n_variants "
        f"FROM results WHERE run_id = ? AND scheme <> 'baseline' GROUP BY problem_id) "
        f"SELECT * FROM (SELECT s.problem_id, s.ord, s.difficulty, s.phase, s.gold, s.baseline_answer, "
        f"s.baseline_value, s.baseline_correct, coalesce(f.n_flips, 0) AS n_flips, "
        f"coalesce(f.n_variants, 0) AS n_variants, s.question FROM scope s LEFT JOIN f USING (problem_id)) "
        f"WHERE (? IS NULL OR (n_flips > 0) = ?) "
        f"AND (? IS NULL OR contains(lower(question), lower(?)) OR contains(lower(problem_id), lower(?))) "
        f"ORDER BY {PROBLEM_ORDER[name]} {direction}, ord LIMIT ?",
        [*scope_params(run_id, filters), run_id, any_flip, any_flip, search, search, search, int(limit)])


def problem_detail(store, run_id: int, problem_id: str) -> dict | None:
    """{'problem': its row, 'variants': each variant's answer, correct, flip, gold_logprob, lens}; None if absent."""
    problem = store.query_df("SELECT problem_id, ord, question, gold, gold_value, difficulty, solution, phase "
                             "FROM problems WHERE run_id = ? AND problem_id = ?", [run_id, problem_id])
    if problem.empty:
        return None
    variants = store.query_df(
        "SELECT variant, scheme, k, method, site, mode, answer_text, answer_value, extraction, correct, changed, "
        "flip, harm, help, gold_logprob, logprob_drop, lens FROM results WHERE run_id = ? AND problem_id = ? "
        f"ORDER BY {SCHEME_ORDER}, method, site, mode, k", [run_id, problem_id])
    variants["lens"] = [json.loads(v) if isinstance(v, str) else None for v in variants["lens"]]
    return {"problem": _plain(problem.to_dict("records")[0]), "variants": variants}


def latest_results(store, run_id: int, n: int = 20) -> pd.DataFrame:
    """The `n` most recently stored problems (highest problems.ord first) with their baseline answers."""
    return store.query_df(
        "WITH f AS (SELECT problem_id, count(*) FILTER (WHERE flip) AS n_flips FROM results "
        "WHERE run_id = ? AND scheme <> 'baseline' GROUP BY problem_id) "
        "SELECT p.ord, p.problem_id, p.difficulty, p.phase, p.gold, b.answer_text, b.answer_value, b.correct, "
        "coalesce(f.n_flips, 0) AS n_flips FROM problems p JOIN results b ON b.problem_id = p.problem_id "
        "LEFT JOIN f ON f.problem_id = p.problem_id "
        "WHERE p.run_id = ? AND b.run_id = ? AND b.scheme = 'baseline' ORDER BY p.ord DESC LIMIT ?",
        [run_id, run_id, run_id, int(n)])


def metrics(store, run_id: int) -> pd.DataFrame:
    """The run's metrics time series (one row per stored batch), oldest first."""
    return store.query_df(
        "SELECT t, elapsed_s, phase, done, batch_problems, batch_size, problems_per_hour, rss_mb, cpu_pct, "
        "gpu_mem_mb, gpu_peak_mb FROM run_metrics WHERE run_id = ? ORDER BY elapsed_s, t", [run_id])


# --- the CLI's `stats --json` -------------------------------------------------------------------------
def seed_keys(store, run_id: int, group: tuple[str, str, str] | None, filters: Filters = Filters()) -> dict:
    """The seed summary's keys (DESIGN.md section 7) from the database, with the seed's arithmetic.

    Equal to `db.seed.seed_summary` of the same problems' records, computed in SQL (the export page
    shows it without building 10,000 records).

    Seed numbering: position 0 = the baseline row, position p >= 1 = prefix k = p. Early/late are
    np.mean over positions 0,1,2 / 3,4,5 of the per-position means, exactly as the seed's loop.
    """
    method, site, mode = group or (None, None, None)
    cells = store.query_df(
        f"WITH {SCOPE} SELECT s.difficulty, CASE WHEN r.scheme = 'baseline' THEN 0 ELSE r.k END AS position, "
        f"count(*) AS n, count(*) FILTER (WHERE r.flip) AS flips, min(s.ord) AS first "
        f"FROM results r JOIN scope s USING (problem_id) WHERE r.run_id = ? AND (r.scheme = 'baseline' OR "
        f"(r.scheme = 'prefix' AND r.method = ? AND r.site = ? AND r.mode = ?)) GROUP BY ALL ORDER BY first, position",
        [*scope_params(run_id, filters), run_id, method, site, mode])
    base = store.query_df(f"WITH {SCOPE} SELECT difficulty, count(*) AS n, count(*) FILTER (WHERE baseline_correct) "
                          f"AS correct FROM scope GROUP BY 1 ORDER BY min(ord)", scope_params(run_id, filters))
    n_total, correct = int(base["n"].sum()), int(base["correct"].sum())
    totals = cells.groupby("position")[["n", "flips"]].sum().sort_index()
    summary = {"n_problems": n_total, "baseline_accuracy": correct / n_total if n_total else None,
               "position_importance": {str(p): int(row.flips) / int(row.n) for p, row in totals.iterrows()},
               "by_difficulty": {}}
    for row in base.itertuples():
        mine = cells[cells["difficulty"] == row.difficulty]
        means = {int(c.position): int(c.flips) / int(c.n) for c in mine.itertuples()}
        early = [means[i] for i in (0, 1, 2) if i in means]
        late = [means[i] for i in (3, 4, 5) if i in means]
        early_imp = float(np.mean(early)) if early else None
        late_imp = float(np.mean(late)) if late else None
        summary["by_difficulty"][str(row.difficulty)] = {
            "n_problems": int(row.n), "baseline_accuracy": int(row.correct) / int(row.n),
            "early_importance": early_imp, "late_importance": late_imp,
            "pattern_validated": bool(early_imp is not None and late_imp is not None and early_imp >= late_imp)}
    return summary


def stats_json(store, run_id: int, method=None, site=None, mode=None, seed: int = 0, n_boot: int = 1000) -> dict:
    """`stats --json`: the seed summary keys for the run's prefix group, every section-4 figure under 'extras'."""
    run = store.run_row(run_id)
    if run is None:
        raise ValueError(f"no run {run_id} in {store.path}")
    group = first_group(store, run_id, "prefix", method, site, mode)
    result = seed_keys(store, run_id, group)
    # Every group at once: one scan per figure instead of one per group.
    curves = _rates(store, run_id, Filters()).merge(
        _drops(store, run_id, Filters(), seed=seed, n_boot=n_boot), on=[*GROUP_KEYS, "k", "position"], how="left")
    scores = _scores(store, run_id, Filters())
    overall = _early_late_table(scores, None, seed, n_boot)
    by_difficulty = {by: _accuracy_by(store, run_id, Filters(), by).merge(
        _early_late_table(scores, key, seed, n_boot), on=key, how="left")
        for by, key in (("steps", "difficulty"), ("bucket", "bucket"))}

    def point(row: dict, measure: str) -> dict:
        n = row["n_logprob"] if measure == "logprob_drop" else row["n"]
        return {"value": row[measure], "lo": row[f"{measure}_lo"], "hi": row[f"{measure}_hi"], "n": n}

    def by_group(frame: pd.DataFrame, drop=()) -> dict:
        """Records keyed by their (scheme, method, site, mode), in frame order."""
        parted = {}
        for record in frame.to_dict("records"):
            parted.setdefault(tuple(record.pop(k) for k in GROUP_KEYS), []).append(
                {k: v for k, v in record.items() if k not in drop})
        return parted

    positions = {key: [{"k": r["k"], "position": r["position"], "n": r["n"],
                        **{measure: point(r, measure) for measure in MEASURES}} for r in records]
                 for key, records in by_group(curves).items()}
    strata = {by: by_group(table.rename(columns={"n_x": "n"}), drop=("n_y",)) for by, table in by_difficulty.items()}
    summaries = by_group(overall)
    groups = []
    for g in variant_groups(store, run_id).itertuples(index=False):
        key = (g.scheme, g.method, g.site, g.mode)
        groups.append({"scheme": g.scheme, "method": g.method, "site": g.site, "mode": g.mode,
                       "positions": positions.get(key, []),
                       "by_difficulty": {by: parted.get(key, []) for by, parted in strata.items()},
                       "early_late": summaries.get(key, [{"n": 0}])[0]})
    result["extras"] = {
        "run": {k: run[k] for k in ("id", "name", "status", "model", "dataset", "source", "num_latent", "done",
                                    "total")},
        "summary_group": dict(zip(("scheme", "method", "site", "mode"), ("prefix", *(group or (None,) * 3)))),
        "baseline_accuracy": baseline_accuracy(store, run_id),
        "baseline_accuracy_validation": baseline_accuracy(store, run_id, Filters(phase="validation")),
        "groups": groups,
        "conventions": "top level: seed numbering (position 0 = baseline, p = prefix k = p); extras: "
                       "position = k - 1 for prefix (last latent ablated), k otherwise; early = positions "
                       "0..T/2-1, late = T/2..T-1; rates: 95% Wilson; means and early/late/ratio: 95% "
                       f"percentile bootstrap over problems ({n_boot} resamples, seed {seed})",
    }
    return _plain(result)


# --- issue 16: the runs table, early/late of any measure, paired comparisons ---------------------------
# Named parameters throughout. A scope like SCOPE, one per side of a comparison ($run, $phase, ...).
NAMED_SCOPE = """scope AS (
    SELECT p.problem_id, p.difficulty, b.correct AS baseline_correct
    FROM problems p JOIN results b ON b.problem_id = p.problem_id
    WHERE p.run_id = $run AND b.run_id = $run AND b.scheme = 'baseline'
      AND ($phase IS NULL OR p.phase = $phase) AND (len($steps) = 0 OR list_contains($steps, p.difficulty))
      AND ($correct IS NULL OR b.correct = $correct))"""
RUN_SETTINGS = ("model", "dataset", "schemes", "methods", "site", "mode", "limit", "validation", "batch_size",
                "device", "dtype", "seed")


def _named_scope(run_id: int, filters: Filters) -> dict:
    phase = None if filters.phase in (None, "full") else filters.phase
    return {"run": int(run_id), "phase": phase, "steps": [int(d) for d in filters.difficulties],
            "correct": filters.baseline_correct}


def runs_overview(store) -> pd.DataFrame:
    """Every run (newest first) with the settings that tell runs apart and its key results.

    Results: baseline accuracy (95% Wilson), and the flip rate with every latent ablated: prefix at
    its largest k (the imported old runs' largest is their last position), else suffix k = 0, for the
    run's first method, site and mode; `all_ablated` names that variant. Duration is the time spent
    sweeping (summed over resumes), throughput the run's problems per hour.
    """
    frame = store.query_df(
        "WITH base AS (SELECT run_id, count(*) AS n, count(*) FILTER (WHERE correct) AS x FROM results "
        "  WHERE scheme = 'baseline' GROUP BY run_id), "
        "first_group AS (SELECT run_id, arg_min(method, rowid) AS method, arg_min(site, rowid) AS site, "
        "  arg_min(mode, rowid) AS mode FROM results WHERE scheme <> 'baseline' GROUP BY run_id), "
        "widest AS (SELECT r.run_id, max(r.k) FILTER (WHERE r.scheme = 'prefix') AS prefix_k, "
        "  bool_or(r.scheme = 'suffix' AND r.k = 0) AS has_suffix0 FROM results r GROUP BY r.run_id), "
        "everything AS (SELECT r.run_id, any_value(r.variant) AS variant, count(*) AS n, "
        "  count(*) FILTER (WHERE r.flip) AS x FROM results r JOIN first_group g USING (run_id) "
        "  JOIN widest w USING (run_id) WHERE r.method = g.method AND r.site = g.site AND r.mode = g.mode "
        "  AND ((w.prefix_k IS NOT NULL AND r.scheme = 'prefix' AND r.k = w.prefix_k) "
        "   OR (w.prefix_k IS NULL AND w.has_suffix0 AND r.scheme = 'suffix' AND r.k = 0)) GROUP BY r.run_id) "
        "SELECT u.id, u.name, u.status, u.phase, u.done, u.total, u.created, u.source, u.notes, u.tags, u.model, "
        "u.dataset, u.config, u.num_latent, u.device, u.batch_size AS batch_in_use, u.elapsed_s, "
        f"u.problems_per_hour, {wilson_sql('base.x', 'base.n', 'accuracy')}, "
        f"e.variant AS all_ablated, {wilson_sql('e.x', 'e.n', 'flip_all')} "
        "FROM runs u LEFT JOIN base ON base.run_id = u.id LEFT JOIN everything e ON e.run_id = u.id "
        "ORDER BY u.created DESC, u.id DESC", {})
    configs = [json.loads(c) if isinstance(c, str) else dict(c or {}) for c in frame.pop("config")]
    for name in RUN_SETTINGS[2:]:
        values = [c.get(name) for c in configs]
        frame[name] = [", ".join(v) if isinstance(v, list) else v for v in values]
    frame["device"] = [c.get("device") or d for c, d in zip(configs, frame["device"])]
    frame["batch_size"] = [c.get("batch_size") for c in configs]
    return frame


def early_late_of(store, run_id: int, filters: Filters, measure: str, scheme: str, method: str, site: str,
                  mode: str, seed: int = 0, n_boot: int = 1000) -> dict:
    """early_late for any measure: per problem the mean of `measure` over early / late positions, bootstrapped."""
    _check_measure(measure)
    value = f"r.{measure}::DOUBLE"  # a whitelisted column name
    scores = store.query_df(
        f"WITH {NAMED_SCOPE}, t AS (SELECT num_latent AS T FROM runs WHERE id = $run), per_problem AS ("
        f"SELECT p.ord, s.difficulty, "
        f"coalesce(avg({value}) FILTER (WHERE {POSITION} < t.T // 2), 'NaN') AS early, "
        f"coalesce(avg({value}) FILTER (WHERE {POSITION} >= t.T // 2 AND {POSITION} < t.T), 'NaN') AS late "
        f"FROM scope s JOIN results r USING (problem_id) JOIN problems p ON p.run_id = $run "
        f"AND p.problem_id = s.problem_id CROSS JOIN t WHERE r.run_id = $run AND r.scheme = $scheme "
        f"AND r.method = $method AND r.site = $site AND r.mode = $mode GROUP BY ALL) "
        f"SELECT $scheme AS scheme, $method AS method, $site AS site, $mode AS mode, list(ord) AS ords, "
        f"list(difficulty) AS difficulties, list(early) AS early, list(late) AS late FROM per_problem "
        f"HAVING count(*) > 0",
        {**_named_scope(run_id, filters), "scheme": scheme, "method": method, "site": site, "mode": mode})
    table = _early_late_table(scores, None, seed, n_boot) if len(scores) else pd.DataFrame()
    if table.empty:
        return {"scheme": scheme, "method": method, "site": site, "mode": mode, "measure": measure, "n": 0}
    return {**_plain(table.to_dict("records")[0]), "measure": measure}


def curve_values(store, curve: Curve, measure: str) -> pd.DataFrame:
    """One curve's per-(problem, k) values of a measure (0/1 for rates; NaN-free: missing log-probs dropped)."""
    _check_measure(measure)
    return store.query_df(
        f"WITH {NAMED_SCOPE} SELECT r.problem_id, r.k, r.{measure}::DOUBLE AS value FROM results r "
        f"JOIN scope s USING (problem_id) WHERE r.run_id = $run AND r.scheme = $scheme AND r.method = $method "
        f"AND r.site = $site AND r.mode = $mode AND r.{measure} IS NOT NULL ORDER BY r.k, r.problem_id",
        {**_named_scope(curve.run_id, curve.filters), "scheme": curve.scheme, "method": curve.method,
         "site": curve.site, "mode": curve.mode})


def run_settings(store, run_ids: list[int]) -> dict[int, dict]:
    """{run id: its settings (RUN_SETTINGS)} for the legend of a comparison."""
    frame = store.query_df("SELECT id, model, dataset, config FROM runs WHERE list_contains($ids, id)",
                           {"ids": [int(i) for i in run_ids]})
    out = {}
    for row in frame.itertuples():
        config = json.loads(row.config) if isinstance(row.config, str) else dict(row.config or {})
        out[int(row.id)] = {"model": row.model, "dataset": row.dataset,
                            **{k: config.get(k) for k in RUN_SETTINGS[2:]}}
    return out
