"""Interval arithmetic behind every figure: Wilson score intervals in SQL, a vectorised seeded bootstrap.

Kept apart from db/queries.py so that the statistics can be read (and checked) on their own.
"""
from __future__ import annotations

import numpy as np

Z = 1.959963984540054  # two-sided 95% normal quantile


def wilson_sql(x: str, n: str, name: str = "value") -> str:
    """SQL columns `name, name_lo, name_hi`: x/n and its 95% Wilson score interval (x, n: column names)."""
    p, z2, m = f"({x}::DOUBLE / NULLIF({n}, 0))", Z * Z, f"NULLIF({n}, 0)"
    centre, denom = f"({p} + {z2} / (2.0 * {m}))", f"(1 + {z2} / {m})"
    half = f"({Z} * sqrt({p} * (1 - {p}) / {m} + {z2} / (4.0 * {m} * {m})))"
    # greatest/least: at x = 0 or x = n the bounds are 0 and 1 up to round-off (and they skip NULLs: n = 0)
    lo = f"CASE WHEN {n} > 0 THEN greatest(0.0, ({centre} - {half}) / {denom}) END"
    hi = f"CASE WHEN {n} > 0 THEN least(1.0, ({centre} + {half}) / {denom}) END"
    return f"{p} AS {name}, {lo} AS {name}_lo, {hi} AS {name}_hi"


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
