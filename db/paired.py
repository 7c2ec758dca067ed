"""Differences between two curves on the problems they share, with a paired bootstrap interval.

Two runs (or two variant groups) are compared problem by problem: a problem id present on both
sides is a pair, the others are counted as unpaired and left out of the difference. For each k,
the difference is mean(a - b) over the pairs; its 95% interval is a percentile bootstrap that
resamples the pairs (so the correlation between the two sides is kept: narrower than comparing
two independent intervals). Rates and log-prob drops are treated alike.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from db.stats import bootstrap_means, percentile_interval

COLUMNS = ["k", "n_a", "n_b", "shared", "only_a", "only_b", "mean_a", "mean_b", "diff", "diff_lo", "diff_hi"]


def paired_difference(a: pd.DataFrame, b: pd.DataFrame, seed: int = 0, n_boot: int = 1000) -> pd.DataFrame:
    """a, b: (problem_id, k, value) rows; per k of either side: counts, the paired mean difference, its interval.

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
            lo, hi = percentile_interval(replicates)
            row.update(mean_a=x.mean(), mean_b=y.mean(), diff=(x - y).mean(), diff_lo=lo[0], diff_hi=hi[0])
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)
