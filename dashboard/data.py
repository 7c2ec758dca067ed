"""The pages' reads: db/queries.py (and the export builders) behind `st.cache_data`.

Every function is keyed by plain arguments: the database path, the run id, the run's `version`
(its done count and status, see state.version, so a sweep that writes a batch never leaves a
page on stale numbers) and the query's own arguments: the page's `Scope` (a frozen dataclass of
plain values, built once per page) and the measure. The Store itself comes from the path via `state.open_service`.
"""
from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from dashboard.state import open_service
from db import exports, figures, overview, queries, report, seed
from db.paired import paired_difference
from db.scope import Scope
from runner import data as datasets
from runner.ablation import POSITIONS

CACHE = dict(show_spinner=False, max_entries=128)


def _store(db: str):
    return open_service(db).store


@st.cache_data(**CACHE)
def variant_groups(db: str, run_id: int, version: tuple) -> pd.DataFrame:
    return queries.variant_groups(_store(db), run_id)


@st.cache_data(**CACHE)
def difficulties(db: str, run_id: int, version: tuple) -> list[int]:
    """The step counts of the run's stored problems, for the difficulty filter."""
    table = queries.accuracy_by(_store(db), Scope(run_id), "steps")
    return sorted(int(d) for d in table["difficulty"].unique())


@st.cache_data(**CACHE)
def has_validation(db: str, run_id: int, version: tuple) -> bool:
    return queries.baseline_accuracy(_store(db), Scope(run_id, phase="validation"))["n"] > 0


@st.cache_data(**CACHE)
def positions(db: str, run_id: int) -> tuple[str, str]:
    """How the run numbers positions, and what that means (runner.ablation.POSITIONS): fixed at creation."""
    name = queries.positions(_store(db), run_id)
    return name, POSITIONS.get(name, name)


@st.cache_data(**CACHE)
def baseline_accuracy(db: str, version: tuple, scope: Scope) -> dict:
    return queries.baseline_accuracy(_store(db), scope)


@st.cache_data(**CACHE)
def position_curve(db: str, version: tuple, scope: Scope, measure: str) -> pd.DataFrame:
    """Per-k curves of one measure: every variant group the scope leaves open (all, or one group)."""
    return figures.position_curve(_store(db), scope, measure)


@st.cache_data(**CACHE)
def early_late(db: str, version: tuple, scope: Scope, measure: str) -> dict:
    return figures.early_late(_store(db), scope, measure)


@st.cache_data(**CACHE)
def difficulty_table(db: str, version: tuple, scope: Scope, by: str) -> pd.DataFrame:
    return figures.difficulty_table(_store(db), scope, by)


@st.cache_data(**CACHE)
def named_figures(db: str, version: tuple, scope: Scope, by: str) -> dict:
    """The old script's and the per-latent early/late per step count or bucket (db.figures.FIGURES)."""
    return figures.named_figures(_store(db), scope, by)


@st.cache_data(**CACHE)
def difficulty_heatmap(db: str, version: tuple, scope: Scope, measure: str) -> pd.DataFrame:
    return figures.difficulty_heatmap(_store(db), scope, measure)


@st.cache_data(**CACHE)
def paired(db: str, versions: tuple, a: Scope, b: Scope, measure: str) -> pd.DataFrame:
    """a − b per k on the problems both share, with the paired bootstrap interval (db/paired.py)."""
    store = _store(db)
    return paired_difference(queries.curve_values(store, a, measure), queries.curve_values(store, b, measure),
                             rate=measure in queries.RATE_MEASURES)


@st.cache_data(**CACHE)
def run_settings(db: str, run_ids: tuple) -> dict:
    return overview.run_settings(_store(db), list(run_ids))


@st.cache_data(**CACHE)
def problems_table(db: str, version: tuple, scope: Scope, any_flip: bool | None, search: str,
                   order_by: str) -> pd.DataFrame:
    return queries.problems_table(_store(db), scope, any_flip, search or None, order_by, limit=5000)


@st.cache_data(**CACHE)
def problem_detail(db: str, run_id: int, version: tuple, problem_id: str) -> dict | None:
    return queries.problem_detail(_store(db), run_id, problem_id)


@st.cache_data(**CACHE)
def metrics(db: str, run_id: int, version: tuple) -> pd.DataFrame:
    return queries.metrics(_store(db), run_id)


@st.cache_data(**CACHE)
def latest_results(db: str, run_id: int, version: tuple) -> pd.DataFrame:
    return queries.latest_results(_store(db), run_id, 12)


@st.cache_data(**CACHE)
def skipped_problems(db: str, run_id: int, version: tuple) -> pd.DataFrame:
    return queries.skipped_problems(_store(db), run_id)


# --- exports (the old script's JSON schema, tables, report) -----------------------------------------
@st.cache_data(**CACHE)
def seed_overview(db: str, version: tuple, scope: Scope) -> dict:
    """What the export page shows of the old script's files: their summary and the validation problem count."""
    store = _store(db)
    return {"summary": figures.old_script_summary(store, scope),
            "n_validation": queries.baseline_accuracy(store, scope.replace(phase="validation"))["n"]}


def seed_file(db: str, scope: Scope, name: str) -> str:
    """Deferred download of one of the old script's three files, for the problems in scope."""
    return to_json(seed.seed_documents(_store(db), scope, names=(name,))[name])


def to_json(document) -> str:
    """JSON as the old script's json.dump(indent=2) wrote it."""
    return json.dumps(document, indent=2)


def results_csv(db: str, scope: Scope, raw: bool = False) -> bytes:
    """Deferred download (runs on the download's own thread, so it opens its own cursor): the CLI's CSV,
    formula-like text cells neutralised unless `raw`."""
    return exports.results_csv(_store(db), scope, raw=raw)


def results_parquet(db: str, scope: Scope) -> bytes:
    return exports.results_parquet(_store(db), scope)


def markdown_report(db: str, run_id: int) -> str:
    return report.markdown_report(_store(db), run_id)


def stats_json(db: str, run_id: int) -> str:
    return json.dumps(report.stats_json(_store(db), run_id), indent=2)


# --- datasets ---------------------------------------------------------------------------------------
@st.cache_data(show_spinner="Checking the dataset…", max_entries=16)
def validate_dataset(source: str, modified: float | None) -> dict:
    """validate-data for the Run page's panel; `modified` (the file's mtime) re-checks an edited file.

    Returns {"report": DatasetReport.to_json()} or {"error": the DatasetError's message}.
    """
    try:
        return {"report": datasets.validate_dataset(source).to_json()}
    except datasets.DatasetError as error:
        return {"error": str(error)}


@st.cache_data(**CACHE)
def validation_shortfall(source: str, modified: float | None, limit: int | None, shuffle_seed: int | None,
                         n: int, seed: int) -> str | None:
    """runner/data.py's validation_shortfall for the problems a run of these options would hold (the CLI's
    warning); `modified` as validate_dataset's. Only for a dataset that validated."""
    problems = datasets.load_problems(source, limit=limit, seed=shuffle_seed)
    return datasets.validation_shortfall(problems, n, seed)


# --- the runs table ------------------------------------------------------------------------------
def runs_version(runs: pd.DataFrame) -> tuple:
    """Changes whenever a run's row does (a batch, a status, an edit): the runs table's cache key."""
    return tuple(runs[["id", "done", "status", "name", "notes", "tags"]].itertuples(index=False, name=None))


@st.cache_data(**CACHE)
def runs_overview(db: str, version: tuple) -> pd.DataFrame:
    return overview.runs_overview(_store(db))


