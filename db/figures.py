"""Every figure a page, the report, `stats` and the exports show, from db/queries.py's reads and db/stats.py's
intervals: one definition each, so that they never disagree.

A figure with two common definitions has two names (FIGURES), shown with it wherever it appears:
- the *old script's* early/late: the old script's prefix curve numbered its way (position 0 = the
  baseline, p = prefix k = p, i.e. how many positions a row ablated), early = mean of positions 0-2
  (baseline included), late = 3-5, pattern_validated = early >= late; no interval (it had none);
- the *per-latent* early/late: the single-position scheme, mean flip with latent 0..T/2-1 ablated vs
  T/2..T-1 (0-2 vs 3-5 for T = 6), their ratio, 95% bootstrap intervals over problems.
`early_late` of any one group (its rows' own `position`: a prefix k sits at k-1, the last latent it
removes) remains for the Importance cards and the per-group tables, named by its group.
"""
from __future__ import annotations

import pandas as pd

from db import queries
from db.scope import Scope
from db.stats import (EARLY_LATE, GROUP_KEYS, UNANIMOUS, bucket, drop_intervals, early_late_table,
                      old_script_early_late, wilson)

FIGURES = {
    "old_script_early_late": (
        "old script's early/late",
        "the old script's definition, on its prefix curve numbered its way (position 0 = the baseline, position p "
        "= prefix k = p): early = mean of positions 0-2 (the baseline's 0 included), late = mean of positions "
        "3-5, pattern_validated = early >= late; 95% bootstrap intervals over problems (each problem's mean over "
        f"those positions; {UNANIMOUS}), which the old script did not give"),
    "per_latent_early_late": (
        "per-latent early/late",
        "single-position scheme (one latent ablated at a time): early = mean flip rate with latent 0, 1 or 2 "
        "ablated, late = with latent 3, 4 or 5, ratio = early / late; 95% bootstrap intervals over problems "
        f"({UNANIMOUS})"),
}
CURVE_COLUMNS = [*GROUP_KEYS, "k", "position", "ablated_positions", "latents_fed", "n", "value", "value_lo", "value_hi"]


def position_curve(store, scope: Scope, measure: str = "flip", seed: int = 0, n_boot: int = 1000) -> pd.DataFrame:
    """Per (group, k) in scope: position, what it ablated, n, value, value_lo, value_hi of one measure.

    Rates (flip, harm, help, changed) are over all problems in scope with 95% Wilson intervals;
    logprob_drop is the mean over problems with a stored log-prob, 95% percentile bootstrap
    (`n_boot` resamples of problems, numpy default_rng(seed)).
    """
    queries.check_measure(measure)
    if measure in queries.RATE_MEASURES:
        frame, n = queries.rates(store, scope), "n"
    else:
        frame, n = drop_intervals(queries.drop_cells(store, scope), seed, n_boot), "n_logprob"
    frame = frame[[*CURVE_COLUMNS[:8], n, measure, f"{measure}_lo", f"{measure}_hi"]]
    return frame.set_axis(CURVE_COLUMNS, axis=1)


def early_late(store, scope: Scope, measure: str = "flip", seed: int = 0, n_boot: int = 1000) -> dict:
    """One group's (the scope's, completed by first_group) mean `measure` over early / late positions and their ratio.

    Early is the mean over problems of each problem's mean over its early positions (= the mean of the
    per-position rates when every problem has every variant); intervals: paired bootstrap.
    """
    group = queries.first_group(store, scope)
    named = dict(zip(GROUP_KEYS, (group or scope).keys)) | {"measure": measure}
    table = (early_late_table(queries.scores(store, group, measure), None, seed, n_boot, rate=measure != "logprob_drop")
             if group else pd.DataFrame())
    return named | {"n": 0} if table.empty else {**queries.plain(table.to_dict("records")[0]), "measure": measure}


def difficulty_table(store, scope: Scope, by: str = "steps", seed: int = 0, n_boot: int = 1000) -> pd.DataFrame:
    """Per step count (by='steps') or bucket 1-2/3-4/5+ (by='bucket'): n, baseline accuracy, the group's early/late.

    Accuracy has a Wilson interval; early/late/ratio (as in `early_late`) have bootstrap intervals over the
    stratum's problems. `n` counts the stratum's problems in scope.
    """
    accuracy = queries.accuracy_by(store, scope, by)
    key = "difficulty" if by == "steps" else "bucket"
    group = queries.first_group(store, scope)
    scores = queries.scores(store, group) if group else pd.DataFrame()
    table = early_late_table(scores, key, seed, n_boot)[[key, *EARLY_LATE]]
    return accuracy.merge(table, on=key, how="left").astype({c: float for c in EARLY_LATE})


def difficulty_heatmap(store, scope: Scope, measure: str = "flip") -> pd.DataFrame:
    """Difficulty (rows) x k (columns) of a measure's rate (or mean log-prob drop) for the scope's group.

    `attrs['ablated']`: {k: (ablated positions, latents fed)} as the rows say, for the axis labels;
    `attrs['n']`, and for a rate `attrs['lo']` / `attrs['hi']` (its 95% Wilson interval), each cell's, as
    nested lists in the matrix's order.
    """
    group = queries.first_group(store, scope)
    if group is None:
        return pd.DataFrame()
    long = queries.heatmap_cells(store, group, measure)
    if measure in queries.RATE_MEASURES:
        long["lo"], long["hi"] = wilson(long["total"].to_numpy(), long["n"].to_numpy())

    def cells(column: str) -> pd.DataFrame:
        return long.pivot(index="difficulty", columns="k", values=column).sort_index().sort_index(axis=1)
    matrix = cells("value")
    matrix.attrs["ablated"] = {int(r.k): ([int(p) for p in r.ablated_positions], int(r.latents_fed))
                               for r in long.drop_duplicates("k").itertuples()}
    for column in ("n", "lo", "hi"):
        if column in long:
            matrix.attrs[column] = cells(column).reindex_like(matrix).to_numpy(dtype=float).tolist()
    return matrix


def compare(store, a: Scope, b: Scope, measure: str = "flip", seed: int = 0, n_boot: int = 1000) -> pd.DataFrame:
    """Per k: both curves' value and interval, the difference a - b, and whether the intervals overlap."""
    columns = ["k", "position", "n", "value", "value_lo", "value_hi"]
    sides = []
    for scope in (a, b):
        group = queries.first_group(store, scope)
        frame = pd.DataFrame(columns=columns) if group is None else position_curve(store, group, measure, seed, n_boot)
        sides.append(frame[columns])
    both = sides[0].merge(sides[1], on=["k", "position"], how="outer", suffixes=("_a", "_b"))
    both = both.rename(columns={"value_lo_a": "lo_a", "value_hi_a": "hi_a", "value_lo_b": "lo_b",
                                "value_hi_b": "hi_b"})
    both["diff"] = both["value_a"] - both["value_b"]
    both["overlap"] = (both["lo_a"] <= both["hi_b"]) & (both["lo_b"] <= both["hi_a"])
    return both.sort_values("k").reset_index(drop=True)


# --- the two named early/late figures -----------------------------------------------------------------------
def _named_group(store, scope: Scope, scheme: str) -> Scope | None:
    """The run's first `scheme` group with the scope's method, site and mode (None = any); None if it has none:
    a figure is never silently taken from another method."""
    return queries.first_group(store, scope.group(scheme, scope.method, scope.site, scope.mode))


def old_script_summary(store, scope: Scope) -> dict:
    """The old script's summary keys (DESIGN.md section 7) for the scope's problems and prefix group, in SQL.

    Equal to `db.seed.seed_summary` of the same problems' records (the export page shows it without
    building 10,000 records). by_difficulty holds the old script's early/late.
    """
    cells = _old_script_cells(store, scope)
    base = queries.accuracy_by(store, scope.problems(), "steps")
    n_total, correct = int(base["n"].sum()), int(base["correct"].sum())
    totals = _old_script_totals(cells)
    summary = {"n_problems": n_total, "baseline_accuracy": correct / n_total if n_total else None,
               "position_importance": {str(p): int(r.flips) / int(r.n) for p, r in totals.iterrows()},
               "by_difficulty": {}}
    for d in _first_seen(cells, base):
        mine = cells[cells["difficulty"] == d]
        row = base[base["difficulty"] == d].iloc[0]
        summary["by_difficulty"][str(d)] = {
            "n_problems": int(row.n), "baseline_accuracy": int(row.correct) / int(row.n),
            **old_script_early_late({int(c.old_position): int(c.flips) / int(c.n) for c in mine.itertuples()})}
    return summary


def old_script_position_intervals(store, scope: Scope) -> dict:
    """{old position: {n, lo, hi}}: the 95% Wilson interval of each `position_importance` value (its flips of n)."""
    totals = _old_script_totals(_old_script_cells(store, scope))
    lo, hi = wilson(totals["flips"].to_numpy(), totals["n"].to_numpy())
    return {str(p): {"n": int(r.n), "lo": float(low), "hi": float(high)}
            for (p, r), low, high in zip(totals.iterrows(), lo, hi)}


def _old_script_cells(store, scope: Scope) -> pd.DataFrame:
    group = _named_group(store, scope, "prefix")
    return queries.old_script_cells(store, group or scope.group("prefix", "", "", ""))


def _old_script_totals(cells: pd.DataFrame) -> pd.DataFrame:
    return cells.groupby("old_position")[["n", "flips"]].sum().sort_index()


def _first_seen(cells: pd.DataFrame, base: pd.DataFrame) -> list[int]:
    """Step counts in the order the old script met them (its dict kept first-insertion order)."""
    seen = list(dict.fromkeys(int(d) for d in cells.sort_values("first")["difficulty"]))
    return seen + [int(d) for d in base["difficulty"] if int(d) not in seen]


def named_figures(store, scope: Scope, by: str = "steps", seed: int = 0, n_boot: int = 1000) -> dict:
    """Per step count or bucket: the old script's and the per-latent early/late, with the groups they use.

    {'rows': [{key, n, old_script_early_late: {...}, per_latent_early_late: {...}}], 'groups': {name: group}}.
    """
    key = "difficulty" if by == "steps" else "bucket"
    prefix, single = _named_group(store, scope, "prefix"), _named_group(store, scope, "single")
    accuracy = queries.accuracy_by(store, scope.problems(), by)
    old = {}
    if prefix is not None:
        cells = queries.old_script_cells(store, prefix)
        cells["stratum"] = cells["difficulty"] if by == "steps" else bucket(cells["difficulty"].to_numpy())
        spread = early_late_table(queries.old_script_scores(store, prefix), key, seed, n_boot).set_index(key)
        for stratum, part in cells.groupby("stratum", sort=False):
            # The old script's per-position mean over the stratum's rows (not a mean of per-step means).
            totals = part.groupby("old_position")[["n", "flips"]].sum()
            old[stratum] = old_script_early_late({int(p): int(r.flips) / int(r.n) for p, r in totals.iterrows()})
            if stratum in spread.index:  # the value stays the old script's arithmetic; the interval is ours
                old[stratum] |= {f"{side}_importance_{end}": spread.at[stratum, f"{side}_{end}"]
                                 for side in ("early", "late") for end in ("lo", "hi")}
    latent = {}
    if single is not None:
        table = early_late_table(queries.scores(store, single), key, seed, n_boot)
        latent = {r[key]: {m: r[m] for m in EARLY_LATE} for r in table.to_dict("records")}
    missing_old = {"early_importance": None, "late_importance": None, "pattern_validated": None}
    rows = [{key: r[key], "n": int(r["n"]), "baseline_accuracy": r["accuracy"],
             "old_script_early_late": old.get(r[key], missing_old),
             "per_latent_early_late": latent.get(r[key], {m: None for m in EARLY_LATE})}
            for r in accuracy.to_dict("records")]
    groups = {name: None if g is None else dict(zip(GROUP_KEYS, g.keys))
              for name, g in (("old_script_early_late", prefix), ("per_latent_early_late", single))}
    return queries.plain({"rows": rows, "groups": groups})


def ablated_label(ablated, latents_fed: int, num_latent: int, short: bool = False) -> str:
    """What a row ablated, as it says itself: '0–2', '3', '1, 4'; 'none (EOT after 2 latents)' (short: '2')."""
    positions = sorted(int(p) for p in ablated)
    if not positions:
        if latents_fed < num_latent:
            return str(latents_fed) if short else f"none (EOT after {latents_fed} latents)"
        return "none"
    spans, start = [], positions[0]
    for previous, current in zip(positions, positions[1:] + [None]):
        if current != previous + 1 if current is not None else True:
            spans.append(str(start) if start == previous else f"{start}–{previous}")
            start = current
    return ", ".join(spans)
