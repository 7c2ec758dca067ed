"""Differences between two curves on the problems they share, with a paired bootstrap interval.

Two runs (or two variant groups) are compared problem by problem: a problem id present on both
sides is a pair, the others are counted as unpaired and left out of the difference. For each k,
the difference is mean(a - b) over the pairs; its 95% interval is a percentile bootstrap that
resamples the pairs (so the correlation between the two sides is kept: narrower than comparing
two independent intervals). Rates and log-prob drops are treated alike, but for one case: where
every pair differs by the same amount the bootstrap has no spread, and for rates its [d, d] would
claim a certainty that n pairs do not give (NO_SPREAD says what replaces it).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from db.stats import bootstrap_means, percentile_interval, wilson

NO_SPREAD = ("where every pair of a rate differs alike (all agree, or all differ one way) the bootstrap has no "
             "spread: the interval is then the one Wilson's intervals of the two kinds of disagreement bound")
COLUMNS = ["k", "n_a", "n_b", "shared", "only_a", "only_b", "mean_a", "mean_b", "diff", "diff_lo", "diff_hi"]


def paired_difference(a: pd.DataFrame, b: pd.DataFrame, rate: bool, seed: int = 0, n_boot: int = 1000) -> pd.DataFrame:
    """a, b: (problem_id, k, value) rows, values 0/1 scores if `rate` (flip, harm, help, changed), else log-prob
    drops; per k of either side: counts, the paired mean difference, its interval.

    A k present on one side only has shared = 0 and no difference (it is not a disagreement).
    """
    rows = []
    for k in sorted(set(a["k"]) | set(b["k"])):
        left = a[a["k"] == k].set_index("problem_id")["value"]
        right = b[b["k"] == k].set_index("problem_id")["value"]
        shared = left.index.intersection(right.index)
        row = {"k": int(k), "n_a": len(left), "n_b": len(right), "shared": len(shared),
               "only_a": len(left) - len(shared), "only_b": len(right) - len(shared),
               "mean_a": np.nan, "mean_b": np.nan, "diff": np.nan, "diff_lo": np.nan, "diff_hi": np.nan}
        if len(shared):
            x, y = left.loc[shared].to_numpy(float), right.loc[shared].to_numpy(float)
            replicates = bootstrap_means((x - y)[:, None], seed, n_boot)
            (lo,), (hi,) = percentile_interval(replicates)
            if rate and np.ptp(x - y) == 0:
                lo, hi = disagreement_interval(x, y)
            row.update(mean_a=x.mean(), mean_b=y.mean(), diff=(x - y).mean(), diff_lo=lo, diff_hi=hi)
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def disagreement_interval(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """mean(x - y) = P(x=1, y=0) - P(x=0, y=1) over n pairs of 0/1 scores: the interval its two terms'
    95% Wilson intervals bound, [lo10 - hi01, hi10 - lo01] (0 of 20 pairs each way: [-16.1%, +16.1%])."""
    counts = np.array([((x == 1) & (y == 0)).sum(), ((x == 0) & (y == 1)).sum()])
    lo, hi = wilson(counts, np.full(2, len(x)))
    return float(lo[0] - hi[1]), float(hi[0] - lo[1])
