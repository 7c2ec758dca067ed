"""Widgets several pages share: the problem filters, the variant-group picker, interval text, run headers."""
from __future__ import annotations

import math

import pandas as pd
import streamlit as st

from dashboard import data, safe
from dashboard.charts import MEASURE_HELP, MEASURE_LABELS
from db.queries import MEASURES
from db.scope import Scope

CORRECTNESS = {"all problems": None, "baseline right": True, "baseline wrong": False}


def filters(db: str, run: dict, version: tuple, key: str) -> Scope:
    """The page's Scope: the run, and difficulty, baseline correctness and phase picked in one row (`key`
    keeps each page's choice apart). The page narrows it to a variant group with `Scope.group`."""
    steps = data.difficulties(db, int(run["id"]), version)
    held = st.session_state.get(f"{key}_difficulty")
    if held and not set(held) <= set(steps):  # kept from another run: keep what this run has
        st.session_state[f"{key}_difficulty"] = [d for d in held if d in steps]
    left, middle, right = st.columns([3, 2, 2])
    chosen = left.multiselect("Difficulty (reasoning steps)", steps, key=f"{key}_difficulty", persist_state="session",
                              format_func=lambda d: f"{d} step{'s' if d != 1 else ''}",
                              placeholder="all difficulties")
    correctness = middle.selectbox("Baseline", list(CORRECTNESS), key=f"{key}_correct", persist_state="session",
                                   help="Keep the problems the unablated model answers right, or wrong")
    validation = data.has_validation(db, int(run["id"]), version)
    phase = right.selectbox("Problems", ["all (full run)", "validation subset"], key=f"{key}_phase",
                            persist_state="session", disabled=not validation,
                            help="The validation subset is part of the full run" if validation
                            else "This run has no validation subset")
    return Scope(int(run["id"]), phase="validation" if phase == "validation subset" else None,
                 difficulties=tuple(chosen), baseline_correct=CORRECTNESS[correctness])


def measure(key: str, default: str = "flip") -> str:
    chosen = st.segmented_control("Measure", MEASURES, default=default, key=key, format_func=MEASURE_LABELS.get,
                                  help="; ".join(f"**{MEASURE_LABELS[m]}**: {MEASURE_HELP[m]}" for m in MEASURES))
    return chosen or default  # a segmented control can be clicked off


def group_label(group) -> str:
    return f"{group['scheme']} · {group['method']} · {group['site']} · {group['mode']}"


def pick_group(groups: pd.DataFrame, key: str, label: str = "Variant group", scheme: str | None = None,
               index: int = 0) -> dict | None:
    """A (scheme, method, site, mode) of the run, optionally of one scheme; None if the run has none."""
    rows = [g for g in groups.to_dict("records") if scheme is None or g["scheme"] == scheme]
    if not rows:
        return None
    if len(rows) == 1:
        return rows[0]
    return st.selectbox(label, rows, index=min(index, len(rows) - 1), key=key, format_func=group_label)


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def ci(value, lo=None, hi=None, percent: bool = True) -> str:
    """'42.0% [30.1, 54.9]' or '0.31 [0.20, 0.44]'; '–' when there is no value."""
    if missing(value):
        return "–"
    if percent:
        text = f"{100 * value:.1f}%"
        return text if missing(lo) or missing(hi) else f"{text} [{100 * lo:.1f}, {100 * hi:.1f}]"
    text = f"{value:.2f}"
    if not missing(lo) and missing(hi):  # a ratio whose denominator's interval reaches 0 (db/stats.py)
        return f"{text} [{lo:.2f}, no upper bound]"
    return text if missing(lo) or missing(hi) else f"{text} [{lo:.2f}, {hi:.2f}]"


def interval(value, lo, hi, percent: bool = True) -> str | None:
    """ci's bracket alone, '95% interval [30.1, 54.9]', for a card's grey line under its value; None if none."""
    bracket = ci(value, lo, hi, percent)[len(ci(value, percent=percent)):].strip()
    return f"95% interval {bracket}" if bracket else None


def card(label: str, value, lo=None, hi=None, percent: bool = True, help: str | None = None) -> None:
    """A bordered st.metric whose value carries its interval in plain sight (grey, no arrow), not only in help."""
    st.metric(label, ci(value, percent=percent), delta=interval(value, lo, hi, percent), delta_color="off",
              delta_arrow="off", help=help, width="content", border=True)


def run_caption(run: dict) -> None:
    """Which run a page shows, and whether its numbers may still move."""
    live = " · **still running**: numbers cover the problems stored so far" if run["status"] == "running" else ""
    source = " · imported from the old script's files" if run["source"] == "import" else ""
    st.caption(f"Run #{run['id']} · {safe.md(run['name'])} · {safe.md(run['model'])} on {safe.md(run['dataset'])} · "
               f"{int(run['done'])}/{int(run['total'])} problems{source}{live}")


STATUS_COLORS = {"running": "blue", "finished": "green", "stopped": "orange", "interrupted": "orange",
                 "failed": "red"}


def status_badge(status: str) -> str:
    """A Markdown badge; the status is the file's text, so it is escaped inside the directive."""
    return f":{STATUS_COLORS.get(status, 'gray')}-badge[{safe.md(status)}]"
