"""ThoughtSweep dashboard: `streamlit run app.py [-- --db PATH]`.

The entry point lists the pages (st.navigation) and draws the sidebar every page shares: the run
selector, a live status of the sweep (a fragment that polls while a sweep runs, on every page and
after a reload) and the database file switcher.
"""
import streamlit as st

from dashboard import safe, state
from dashboard.widgets import status_badge
from db import queries
from db.report import duration
from db.store import StoreError

st.set_page_config(page_title="ThoughtSweep", page_icon=":material/psychology:", layout="wide")
state.nothing_taken()

PAGES = {
    "Sweep": [st.Page("pages/run.py", title="Run", icon=":material/play_circle:", default=True),
              st.Page("pages/progress.py", title="Progress", icon=":material/monitoring:")],
    "Results": [st.Page("pages/importance.py", title="Importance", icon=":material/show_chart:"),
                st.Page("pages/difficulty.py", title="Difficulty", icon=":material/stairs:"),
                st.Page("pages/problems.py", title="Problems", icon=":material/list_alt:"),
                st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:")],
    "Share": [st.Page("pages/export.py", title="Export", icon=":material/download:")],
}
page = st.navigation(PAGES)


@st.fragment(run_every=2)
def live_status() -> None:
    """The selected run's status (state.run_status: the one the pages show), live while it sweeps; a full
    rerun when any run's status changes refreshes every number."""
    try:
        svc = state.service()
    except StoreError:
        return
    shown = state.run_status(svc, st.session_state["run_id"]) if st.session_state.get("run_id") else None
    if shown is not None:
        share = shown.done / shown.total if shown.total else 0.0
        st.progress(share, text=f"{shown.done:,} / {shown.total:,} problems")
        if shown.status == "running":
            rate = f" · {shown.problems_per_hour:,.0f} problems/h" if shown.problems_per_hour else ""
            st.caption(f"{safe.md(shown.phase or '…')} phase{rate} · ETA {duration(shown.eta_s)}")
    progress = svc.status()
    if svc.running and progress is not None and (shown is None or progress.run_id != shown.run_id):
        if progress.run_id is None:  # a start loading its model: the run is created once it has loaded
            st.caption("A sweep is starting in this dashboard: its model is loading.")
        else:
            st.caption(f"Run #{progress.run_id} is sweeping in this dashboard ({progress.done:,} / {progress.total:,}).")
    state.rerun_if_stale(svc)


with st.sidebar:
    try:
        svc = state.service()
        runs = queries.runs(svc.store)
    except StoreError as error:
        svc, runs = None, None
        st.error(safe.md(error))
    if runs is not None:
        chosen = state.run_selector(runs)
        if chosen is not None:
            row = runs[runs["id"] == chosen].iloc[0]
            st.caption(f"{status_badge(str(row.status))} {safe.md(row.model)} on {safe.md(row.dataset)}")
    live_status()
    with st.expander("Database file", icon=":material/database:"):
        st.caption(safe.code(state.db_path()))
        st.text_input("Open another .duckdb file", key="db_new_path", placeholder="/path/to/other.duckdb",
                      help="A new name creates an empty database. Refused while a sweep runs.")
        st.button("Open", on_click=state.open_database, disabled=not st.session_state.get("db_new_path"))
        if "db_refusal" in st.session_state:
            st.error(safe.md(state.take_once("db_refusal")))

if svc is None:
    st.title("ThoughtSweep")
    st.error("The dashboard could not open its database; open another file in the sidebar (*Database file*).")
    st.stop()
state.follow_demo()
try:
    page.run()
finally:
    state.nothing_taken()
