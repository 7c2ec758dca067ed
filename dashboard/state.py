"""What the dashboard holds: its database file, that file's Store and SweepService, the run selector.

DuckDB lets one process hold a file read-write, so the file is a process-wide choice: every tab
sees the same one, and a browser reload finds it (and its sweep) again. The Store and the
SweepService live in `st.cache_resource`, keyed by the file's path. Sessions keep UI state only:
the selected run (`run_id`) and the outcome of the last Start (`sweep_feedback`).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager

from dashboard import safe, uploads
from db import queries
from db.store import Store, StoreError
from runner.errors import SweepBusy, ThoughtSweepError
from runner.service import SweepService
from runner.sweep import SweepConfig

DEFAULT_DB = "thoughtsweep.duckdb"
DB_SUFFIXES = (".duckdb", ".db")
# Errors whose message is written for a person: shown as they are, never as a traceback.
EXPLAINED = (ThoughtSweepError, StoreError)


def launch_db(argv: list[str] | None = None) -> str:
    """`streamlit run app.py -- --db PATH`, else $THOUGHTSWEEP_DB, else thoughtsweep.duckdb; absolute."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--db")
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)  # pytest's own argv passes through
    return str(Path(args.db or os.environ.get("THOUGHTSWEEP_DB") or DEFAULT_DB).expanduser().resolve())


def _close(service: SweepService) -> None:
    service.store.close()  # releases the file, so that a CLI sweep may open it


@st.cache_resource(show_spinner="Opening the database…", on_release=_close)
def open_service(path: str) -> SweepService:
    """The Store of one database file and the one sweep thread that writes into it."""
    return SweepService(Store(path))


@dataclass
class HeldFile:
    """The database file this dashboard process holds (mutable: the sidebar can switch it)."""
    path: str
    lock: threading.Lock


@st.cache_resource(show_spinner=False)
def held_file(launch: str) -> HeldFile:
    return HeldFile(launch, threading.Lock())


def db_path() -> str:
    return held_file(launch_db()).path


def service() -> SweepService:
    """This process's service for the held file; StoreError (e.g. locked by a CLI sweep) if it cannot open."""
    return open_service(db_path())


def open_page() -> SweepService:
    """The first line of every page: make sure app.py frames this run, then the service.

    Streamlit treats a `pages/` folder beside the entry point as a legacy (v1) multipage app until
    app.py has called st.navigation once in this process: a first request straight to /importance
    after a restart (a reload, a bookmark, AppTest's switch_page) would run the page alone, without
    the sidebar. Leave that mode and rerun, so that app.py runs and st.navigation picks the page.
    """
    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        rerun_app()
    return service()


# --- one-time messages ------------------------------------------------------------------------------
# The outcome of a click (Start, Open, ...) is shown once: the next full run pops it. But a full run may
# itself rerun the app (a polling fragment sees a status change, e.g. the new run going from 'stopped' to
# 'running' as its thread starts): the message it popped must survive into that rerun, or the user never
# sees it. Every app rerun goes through `rerun_app`, which puts back what this full run took.

def nothing_taken() -> None:
    """app.py, first and last: a full run starts having taken nothing, and a later fragment-only rerun
    must put nothing back."""
    st.session_state["taken_this_run"] = {}


def take_once(key: str, default=None):
    """Pop a one-time message, remembering it in case this full run reruns the app."""
    if key not in st.session_state:
        return default
    value = st.session_state.pop(key)
    st.session_state.setdefault("taken_this_run", {})[key] = value
    return value


def rerun_app() -> None:
    """st.rerun(scope='app'), keeping the one-time messages this full run has shown so far."""
    for key, value in st.session_state.pop("taken_this_run", {}).items():
        st.session_state[key] = value
    st.rerun(scope="app")


def switch_database(requested: str) -> str | None:
    """Hold another database file; returns why not, or None. Refused while a sweep runs."""
    target = Path(requested.strip()).expanduser().resolve()
    if target.suffix not in DB_SUFFIXES:
        return f"{target} is not a DuckDB file name: use a path ending in .duckdb"
    held = held_file(launch_db())
    with held.lock:
        if str(target) == held.path:
            return None
        try:
            current = open_service(held.path)
        except StoreError:
            current = None  # the held file never opened: nothing to protect
        if current is not None and current.running:
            progress = current.status()
            return (f"run {progress.run_id if progress else '?'} is sweeping into {held.path}: "
                    f"stop it (Run or Progress page) before switching files")
        try:
            open_service(str(target))
        except StoreError as error:
            return str(error)
        if current is not None:
            open_service.clear(held.path)
        held.path = str(target)
    return None


def open_database() -> None:
    """on_click of the sidebar's Open: switch files, or leave the refusal for the sidebar to show."""
    refusal = switch_database(st.session_state.get("db_new_path", ""))
    if refusal:
        st.session_state["db_refusal"] = refusal


# --- the selected run ------------------------------------------------------------------------------
def run_selector(runs) -> int | None:
    """Sidebar selectbox over the runs (newest first, default the newest); the selected id or None."""
    st.session_state["shown_statuses"] = {int(r.id): str(r.status) for r in runs.itertuples()}
    if runs.empty:
        return None
    ids = [int(i) for i in runs["id"]]
    pending = st.session_state.pop("pending_run_id", None)
    if pending in ids:
        st.session_state["run_id"] = pending
    if st.session_state.get("run_id") not in ids:
        st.session_state["run_id"] = ids[0]
    # No status in the option labels: Chromium kept showing a closed selectbox's old label ("running")
    # after a rerun changed only the label text. app.py puts the status in a caption every full run redraws.
    labels = {int(r.id): f"#{r.id} · {r.name}" for r in runs.itertuples()}
    return st.selectbox("Run", ids, key="run_id", format_func=labels.get,
                        help="Every page shows this run. Newest first; imported seed runs are listed too.")


def rerun_if_stale(svc: SweepService) -> None:
    """From a polling fragment: a full rerun when the runs' statuses differ from what the last full run drew.

    The run labels and every page's numbers are drawn by full runs only. Comparing with the file on every
    poll, rather than catching the moment a sweep ends once, also heals an app rerun that got lost while
    another fragment's rerun was in flight (seen in Chromium: the sidebar kept "running" for good).
    """
    if queries.run_statuses(svc.store) != st.session_state.get("shown_statuses"):
        rerun_app()


def select(run_id: int) -> None:
    """Select a run from anywhere (the sidebar widget picks it up on the next rerun)."""
    st.session_state["pending_run_id"] = int(run_id)


def select_runs(run_ids: list[int]) -> None:
    """Rows chosen in the Run page's table: the first is shown on every page, all of them go to Compare."""
    select(run_ids[0])
    st.session_state["compare_runs"] = [int(i) for i in run_ids]


def selected_run(svc: SweepService) -> dict | None:
    """The selected run's row (queries.runs columns), or None when the database has no runs."""
    runs = queries.runs(svc.store)
    if runs.empty:
        return None
    wanted = st.session_state.get("pending_run_id", st.session_state.get("run_id"))
    chosen = runs[runs["id"] == wanted] if wanted is not None else runs.iloc[:0]
    return (chosen if len(chosen) else runs.iloc[:1]).iloc[0].to_dict()


@dataclass(frozen=True)
class RunStatus:
    """One run's status as every place shows it (sidebar, Progress, Run table): the file's row, and while
    this process sweeps it, the sweep's live snapshot (its throughput, ETA and elapsed time are newer)."""
    run_id: int
    name: str
    status: str
    phase: str | None
    done: int
    total: int
    problems_per_hour: float | None
    eta_s: float | None
    elapsed_s: float | None


def run_status(svc: SweepService, run_id: int) -> RunStatus | None:
    row = svc.store.run_row(run_id)
    if row is None:
        return None
    progress = svc.status()
    live = progress if progress is not None and progress.run_id == run_id and row["status"] == "running" else None
    rate = live.problems_per_hour if live and live.problems_per_hour else row["problems_per_hour"]
    rate = None if rate is None or rate != rate or not rate else float(rate)
    elapsed = live.elapsed_s if live else (row["elapsed_s"] or None)
    eta = None
    if row["status"] == "running" and rate:
        eta = live.eta_s if live and live.eta_s is not None else (int(row["total"]) - int(row["done"])) / rate * 3600
    return RunStatus(int(run_id), str(row["name"]), str(row["status"]), row["phase"], int(row["done"]),
                     int(row["total"]), rate, eta, elapsed)


def version(run: dict) -> tuple[int, str]:
    """The cache key part that changes whenever the run's stored numbers can change."""
    return int(run["done"]), str(run["status"])


def require_results(svc: SweepService) -> dict:
    """The selected run for an analysis page; stops the page with an empty state when there is nothing to show."""
    run = selected_run(svc)
    if run is None:
        empty_database(svc)
        st.stop()
    if int(run["done"]) == 0:
        st.info(f"Run #{run['id']} ({safe.md(run['name'])}) has no stored results yet: it is "
                f"**{safe.md(run['status'])}**. "
                "Results appear here as soon as its first batch is written.", icon=":material/hourglass_empty:")
        st.page_link("pages/progress.py", label="Follow it on Progress", icon=":material/monitoring:")
        st.stop()
    return run


# --- starting sweeps -------------------------------------------------------------------------------
def demo_config() -> SweepConfig:
    """The embedded model on the built-in problems with the default variants, DEMO_BATCH problems a batch.

    THOUGHTSWEEP_DEMO_LIMIT shrinks it (the browser test, a slow laptop); validation is a quarter, at most 30.
    """
    limit = int(os.environ.get("THOUGHTSWEEP_DEMO_LIMIT", "120"))
    return SweepConfig(run_name="demo", limit=limit, validation=min(30, limit // 4), batch_size=DEMO_BATCH)


# The demo is watched: its pages redraw after every batch. `auto` would take 53 problems a batch on a CPU
# (runner/memory.py: the embedded model's rows are cheap), three batches for the whole demo.
DEMO_BATCH = 12


def start_sweep(config: SweepConfig) -> int | None:
    """on_click of Start: start the sweep, select its run, leave the outcome in `sweep_feedback`.

    A second click while a sweep runs (a double click included) gets SweepBusy: one warning, no second run.
    """
    try:
        run_id = service().start(replace(config, dataset=uploads.keep(config.dataset)))
    except SweepBusy as error:
        st.session_state["sweep_feedback"] = ("warning", f"Not started: {error}.")
    except EXPLAINED as error:
        st.session_state["sweep_feedback"] = ("error", f"Not started: {uploads.shown(str(error))}")
    except Exception as error:  # e.g. a transformers OSError on a broken checkpoint: the text, not a traceback
        st.session_state["sweep_feedback"] = ("error", f"Not started: {type(error).__name__}: {error}")
    else:
        st.session_state["loaded_models"] = [*st.session_state.get("loaded_models", []), config.model_spec()]
        if run_id is None:  # Stop came from another tab while the model loaded: no run was created
            st.session_state["sweep_feedback"] = ("info", "Not started: stopped while the model was loading.")
            return None
        select(run_id)
        st.session_state["sweep_feedback"] = ("success", f"Run #{run_id} started.")
        st.session_state["run_name"] = ""  # the next run gets its own name, not this one's
        return run_id
    return None


def start_demo(config: SweepConfig) -> None:
    """on_click of the demo button: start it, and have app.py move on to Progress, where the user watches it."""
    st.session_state["demo_started"] = start_sweep(config) is not None


def follow_demo() -> None:
    """From app.py, before any page: a demo just started goes to Progress (its feedback shows there)."""
    if st.session_state.pop("demo_started", False):
        st.switch_page("pages/progress.py")


def resume_sweep(run_id: int) -> None:
    """on_click of Resume: continue a stopped / interrupted / failed run where it stopped."""
    try:
        resumed = service().resume(run_id)
    except SweepBusy as error:
        st.session_state["sweep_feedback"] = ("warning", f"Not resumed: {error}.")
    except EXPLAINED as error:
        st.session_state["sweep_feedback"] = ("error", f"Not resumed: {error}")
    except Exception as error:  # the model may fail to load again: the text, not a traceback
        st.session_state["sweep_feedback"] = ("error", f"Not resumed: {type(error).__name__}: {error}")
    else:
        select(run_id)
        st.session_state["sweep_feedback"] = ("success", f"Run #{run_id} resumed.") if resumed is not None else \
            ("info", f"Run #{run_id} not resumed: stopped while the model was loading.")


def stop_sweep() -> None:
    if service().stop():
        st.session_state["sweep_feedback"] = ("info", "Stopping after the batch in flight; stored batches are kept.")


def show_feedback() -> None:
    """The outcome of the last Start / Resume / Stop, shown once: plain text (it quotes names and errors)."""
    kind, text = take_once("sweep_feedback", (None, None))
    if kind is not None:
        getattr(st, kind)(safe.md(text))


def empty_database(svc: SweepService) -> None:
    """No runs yet: say so and offer the one-click demo."""
    config = demo_config()
    with st.container(border=True):
        st.subheader("No runs yet")
        st.markdown(f"{safe.code(svc.store.path)} holds no sweeps. The demo runs the embedded model on "
                    f"{config.limit} built-in problems ({config.validation} of them as a validation subset) "
                    f"with the prefix, single and suffix zero-ablations: a few minutes on a laptop CPU, "
                    f"followed live on the Progress page.")
        st.button("Run the demo sweep", type="primary", icon=":material/rocket_launch:", disabled=svc.running,
                  on_click=start_demo, args=(config,))
        show_feedback()
        st.caption("Or choose a model, dataset and variants on the **Run** page, where you can also import the old "
                   "script's JSON results (*Import the old script's results*).")
