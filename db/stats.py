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

    Each replicate is a row of resample counts, so all replicates are one matrix product.
    """
    n, groups = values.shape
    out = np.full((n_boot, groups), np.nan)
    if n == 0:
        return out
    present = ~np.isnan(values)
    filled = np.where(present, values, 0.0)
    complete = bool(present.all())  # then every replicate averages exactly n values
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, 4_000_000 // n))  # bounds the (chunk, n) count matrix at ~32 MB
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        picks = rng.integers(0, n, size=(rows, n)) + n * np.arange(rows)[:, None]
        counts = np.bincount(picks.ravel(), minlength=rows * n).reshape(rows, n).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + rows] = (counts @ filled) / (n if complete else counts @ present.astype(float))
    return out


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
