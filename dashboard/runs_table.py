"""The Run page's table of runs: what tells runs apart, their key results, filters and the shown columns.

Pure pandas on db.overview.runs_overview's frame: the page draws it, AppTest checks it.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from dashboard.widgets import ci, missing


@dataclass(frozen=True)
class RunFilter:
    statuses: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    text: str = ""  # searched in names and notes, case-insensitive


def tags_of(value) -> list[str]:
    return [t.strip() for t in str(value or "").split(",") if t.strip()]


def apply(runs: pd.DataFrame, chosen: RunFilter) -> pd.DataFrame:
    keep = pd.Series(True, index=runs.index)
    for column, values in (("status", chosen.statuses), ("model", chosen.models), ("dataset", chosen.datasets)):
        if values:
            keep &= runs[column].isin(values)
    if chosen.tags:
        keep &= runs["tags"].map(lambda t: bool(set(tags_of(t)) & set(chosen.tags)))
    if chosen.text.strip():
        needle = chosen.text.strip().lower()
        keep &= (runs["name"].fillna("").str.lower().str.contains(needle, regex=False)
                 | runs["notes"].fillna("").str.lower().str.contains(needle, regex=False))
    return runs[keep].reset_index(drop=True)


def _number(value, fmt: str) -> str:
    return "–" if missing(value) else format(value, fmt)


def shown(runs: pd.DataFrame) -> pd.DataFrame:
    """The table's columns: identity and progress, settings, results (numbers sortable, intervals beside them)."""
    return pd.DataFrame({
        "id": runs["id"], "name": runs["name"], "status": runs["status"],
        "progress": runs["done"] / runs["total"].where(runs["total"] > 0),
        "problems": [f"{d:,} / {t:,}" for d, t in zip(runs["done"], runs["total"])],
        "model": runs["model"], "dataset": runs["dataset"], "schemes": runs["schemes"], "methods": runs["methods"],
        "site": runs["site"], "mode": runs["mode"],
        "batch": ["–" if missing(b) else str(b) for b in runs["batch_size"]],
        "device": [" · ".join(str(v) for v in (d, t) if not missing(v)) or "–"
                   for d, t in zip(runs["device"], runs["dtype"])],
        "seed": [_number(s, ".0f") for s in runs["seed"]],
        "baseline acc.": runs["accuracy"],
        "acc. 95% CI": [ci(a, lo, hi).split(" ", 1)[-1] if not missing(a) else "–"
                        for a, lo, hi in zip(runs["accuracy"], runs["accuracy_lo"], runs["accuracy_hi"])],
        "flip, all ablated": runs["flip_all"],
        "flip 95% CI": [ci(f, lo, hi).split(" ", 1)[-1] if not missing(f) else "–"
                        for f, lo, hi in zip(runs["flip_all"], runs["flip_all_lo"], runs["flip_all_hi"])],
        "minutes": runs["elapsed_s"].where(runs["elapsed_s"] > 0) / 60,
        "problems/h": runs["problems_per_hour"],
        "created": runs["created"], "notes": runs["notes"], "tags": runs["tags"],
    })
