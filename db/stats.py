"""Interval arithmetic behind every figure: Wilson score intervals in SQL, a vectorised seeded bootstrap,
early/late tables with paired bootstrap intervals, and the difficulty buckets.

Kept apart from db/queries.py (SQL) so that the statistics can be read (and checked) on their own.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

GROUP_KEYS = ["scheme", "method", "site", "mode"]
EARLY_LATE = ("early", "early_lo", "early_hi", "late", "late_lo", "late_hi", "ratio", "ratio_lo", "ratio_hi")
BUCKET_EDGES, BUCKET_REST = ((2, "1-2"), (4, "3-4")), "5+"  # buckets: step counts up to each edge, then the rest

Z = 1.959963984540054  # two-sided 95% normal quantile
# Said wherever early/late intervals are: early_late_table's rule for a side without spread.
UNANIMOUS = ("where every problem of a side scored 0 (or 1) the bootstrap has no spread: that side's interval is "
             "Wilson's for that many problems, and the ratio's the one its sides' intervals bound")


def wilson_sql(x: str, n: str, name: str = "value") -> str:
    """SQL columns `name, name_lo, name_hi`: x/n and its 95% Wilson score interval (x, n: column names)."""
    p, z2, m = f"({x}::DOUBLE / NULLIF({n}, 0))", Z * Z, f"NULLIF({n}, 0)"
    centre, denom = f"({p} + {z2} / (2.0 * {m}))", f"(1 + {z2} / {m})"
    half = f"({Z} * sqrt({p} * (1 - {p}) / {m} + {z2} / (4.0 * {m} * {m})))"
    # greatest/least: at x = 0 or x = n the bounds are 0 and 1 up to round-off (and they skip NULLs: n = 0)
    lo = f"CASE WHEN {n} > 0 THEN greatest(0.0, ({centre} - {half}) / {denom}) END"
    hi = f"CASE WHEN {n} > 0 THEN least(1.0, ({centre} + {half}) / {denom}) END"
    return f"{p} AS {name}, {lo} AS {name}_lo, {hi} AS {name}_hi"


def wilson(x: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """wilson_sql's 95% interval of x/n, in numpy (the same formula); NaN where n = 0."""
    x, n = np.asarray(x, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = x / n
        centre, denom = p + Z * Z / (2 * n), 1 + Z * Z / n
        half = Z * np.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
        lo, hi = np.maximum(0.0, (centre - half) / denom), np.minimum(1.0, (centre + half) / denom)
    return np.where(n > 0, lo, np.nan), np.where(n > 0, hi, np.nan)


def unanimous(values: np.ndarray) -> np.ndarray:
    """(G,) whether a column of per-problem rates (n, G) is all 0 or all 1 (NaN = missing): the bootstrap's
    replicates are then that value too, and its interval [0, 0] would claim a certainty n problems do not give."""
    present = ~np.isnan(values)
    zeros, ones = (present & (values == 0)).sum(axis=0), (present & (values == 1)).sum(axis=0)
    n = present.sum(axis=0)
    return (n > 0) & ((zeros == n) | (ones == n))


def bootstrap_means(values: np.ndarray, seed: int, n_boot: int) -> np.ndarray:
    """(n_boot, G) column means over resampled rows (problems) of `values` (n, G); NaN = missing.

    Each replicate is a vector of resample counts, so all replicates are one matrix product. When
    many problems share one row of values (flip-based scores take a handful of values), the counts
    are drawn per distinct row from a multinomial with the rows' frequencies: the same resampling
    distribution as drawing n problems with replacement, at a fraction of the draws.
    """
    n, groups = values.shape
    if n == 0:
        return np.full((n_boot, groups), np.nan)
    present, rng = ~np.isnan(values), np.random.default_rng(seed)
    distinct = _distinct_rows(values, limit=n // 4)  # past n/4 rows a multinomial costs as much as resampling
    if distinct is None:
        return _bootstrap_problems(values, present, rng, n_boot)
    first, frequency = distinct
    rows, rows_present = values[first], present[first]
    counts = rng.multinomial(n, frequency / n, size=n_boot).astype(float)  # (n_boot, distinct rows)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts @ np.where(rows_present, rows, 0.0)) / (counts @ rows_present.astype(float))


def _distinct_rows(values: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(index of each distinct row's first occurrence, how often it occurs), or None past `limit` distinct rows.

    Rows are coded column by column as integers (NaN is one level), re-densified after each column
    so codes stay below n: a few 1-D sorts instead of a lexicographic sort of the whole matrix.
    """
    codes = np.zeros(len(values), dtype=np.int64)
    for column in values.T:
        levels, level = np.unique(column, return_inverse=True)
        _, codes = np.unique(codes * len(levels) + level, return_inverse=True)
        if codes.max(initial=-1) >= limit:
            return None
    _, first, frequency = np.unique(codes, return_index=True, return_counts=True)
    return first, frequency


def _bootstrap_problems(values: np.ndarray, present: np.ndarray, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """bootstrap_means by resampling the n problems themselves."""
    n, groups = values.shape
    out = np.empty((n_boot, groups))
    filled = np.where(present, values, 0.0)
    complete = bool(present.all())  # then every replicate averages exactly n values
    chunk = max(1, min(n_boot, 4_000_000 // n))  # bounds the (chunk, n) draws at ~8-32 MB
    for start in range(0, n_boot, chunk):
        counts = _resample_counts(rng, n, min(chunk, n_boot - start))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + len(counts)] = (counts @ filled) / (n if complete else counts @ present.astype(float))
    return out


def _resample_counts(rng: np.random.Generator, n: int, replicates: int) -> np.ndarray:
    """(replicates, n) float counts: how often each of n problems is drawn in n draws with replacement.

    One bincount per replicate, its n counters in cache: twice as fast as one bincount over all replicates.
    """
    picks = rng.integers(0, n, size=(replicates, n), dtype=np.uint16 if n <= 1 << 16 else np.int64)
    counts = np.empty((replicates, n))
    for replicate, drawn in enumerate(picks):
        counts[replicate] = np.bincount(drawn, minlength=n)
    return counts


def percentile_interval(replicates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the 2.5th and 97.5th percentiles ignoring NaN (np.percentile's linear rule, vectorised)."""
    ordered = np.sort(replicates, axis=0)  # NaN sorts last
    valid = (~np.isnan(replicates)).sum(axis=0)
    columns = np.arange(replicates.shape[1])
    bounds = []
    for q in (0.025, 0.975):
        position = q * np.maximum(valid - 1, 0)
        below = np.floor(position).astype(int)
        above = np.ceil(position).astype(int)
        low, high = ordered[below, columns], ordered[above, columns]
        with np.errstate(invalid="ignore"):
            bound = low + (high - low) * (position - below)
        bounds.append(np.where(valid > 0, bound, np.nan))
    return bounds[0], bounds[1]


def bucket(difficulty: np.ndarray) -> np.ndarray:
    """Difficulty buckets ('unknown' below 1 step, 1-2, 3-4, 5+) of step counts; db.queries.BUCKET in SQL."""
    return np.select([difficulty < 1] + [difficulty <= edge for edge, _ in BUCKET_EDGES],
                     ["unknown"] + [name for _, name in BUCKET_EDGES], BUCKET_REST).astype(object)


def drop_intervals(cells: pd.DataFrame, seed: int, n_boot: int) -> pd.DataFrame:
    """db.queries.drop_cells with logprob_drop_lo/hi: a percentile bootstrap of problems, one for every cell."""
    cells = cells.copy()
    cells["logprob_drop_lo"] = cells["logprob_drop_hi"] = np.nan
    if cells["n_logprob"].sum() > 0:
        ords = np.concatenate(cells["ords"].to_list())
        column = np.repeat(np.arange(len(cells)), cells["n_logprob"].to_numpy())
        _, problem = np.unique(ords, return_inverse=True)
        matrix = np.full((problem.max() + 1, len(cells)), np.nan)  # (problems, cells)
        matrix[problem, column] = np.concatenate(cells["drops"].to_list()).astype(float)
        cells["logprob_drop_lo"], cells["logprob_drop_hi"] = percentile_interval(bootstrap_means(matrix, seed, n_boot))
    return cells.drop(columns=["ords", "drops"])


def early_late_table(scores: pd.DataFrame, by: str | None, seed: int, n_boot: int, rate: bool = True) -> pd.DataFrame:
    """Per (stratum `by`, group): n, early, late, ratio, each with a 95% bootstrap interval over the stratum's problems.

    `scores` comes from db.queries.scores; `by` is None, 'difficulty' or 'bucket'. One bootstrap per
    stratum serves every group (the same resampled problems), so ratios are paired. For a rate
    (`rate`; not a log-prob drop) whose problems all scored 0, or all 1, the bootstrap has no spread:
    that side's interval is then Wilson's for that many problems (0 of n: [0, ~3.8/n]), and the ratio's
    is the one its two sides' intervals bound, [early_lo / late_hi, early_hi / late_lo] (no upper
    bound, NaN, where late_lo is 0).
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
    strata = {None: np.zeros(len(ords), dtype=int), "difficulty": difficulty, "bucket": bucket(difficulty)}[by]
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
        if rate and (same := unanimous(values)).any():
            n = (~np.isnan(values)).sum(axis=0)
            bounded = wilson(np.nan_to_num(means) * n, n)
            lo, hi = np.where(same, bounded[0], lo), np.where(same, bounded[1], hi)
            with np.errstate(invalid="ignore", divide="ignore"):
                outer_lo, outer_hi = lo[:G] / hi[G:], hi[:G] / lo[G:]
            either = same[:G] | same[G:]
            ratio_lo = np.where(either, np.where(np.isfinite(outer_lo), outer_lo, np.nan), ratio_lo)
            ratio_hi = np.where(either, np.where(np.isfinite(outer_hi), outer_hi, np.nan), ratio_hi)
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


def old_script_early_late(means: dict[int, float]) -> dict:
    """The old script's early/late from its per-position means (0 = the baseline, p = prefix k = p).

    Exactly its arithmetic: early = np.mean of positions 0, 1, 2 (the baseline's 0 included), late =
    positions 3, 4, 5; pattern_validated = early >= late; a missing side is None (and not validated).
    """
    early = [means[i] for i in (0, 1, 2) if i in means]
    late = [means[i] for i in (3, 4, 5) if i in means]
    early_imp = float(np.mean(early)) if early else None
    late_imp = float(np.mean(late)) if late else None
    return {"early_importance": early_imp, "late_importance": late_imp,
            "pattern_validated": bool(early_imp is not None and late_imp is not None and early_imp >= late_imp)}
