"""Progress: the selected run live (a fragment polls once a second while it sweeps), or how it ended."""
import pandas as pd
import streamlit as st

from dashboard import charts, data, safe, state
from dashboard.widgets import missing, status_badge
from db.report import duration

svc = state.open_page()
run = state.selected_run(svc)
st.title("Progress")
if run is None:
    state.empty_database(svc)
    st.stop()
db, run_id = state.db_path(), int(run["id"])
ENDINGS = {"finished": st.success, "stopped": st.warning, "interrupted": st.warning, "failed": st.error}
SERIES = {"throughput": ("problems_per_hour", "Throughput per batch", "problems/hour", charts.COLORS[0]),
          "rss": ("rss_mb", "Memory of the process that ran the batch (RSS)", "MB", charts.COLORS[2]),
          "sweep": ("sweep_pss_mb", "Memory of the sweep's processes together (PSS)", "MB", charts.COLORS[5]),
          "cpu": ("cpu_pct", "CPU", "% of one core", charts.COLORS[3]),
          "gpu": ("gpu_mem_mb", "GPU memory allocated", "MB", charts.COLORS[4])}


@st.cache_resource(max_entries=4, show_spinner=False)
def metric_charts(db: str, run_id: int, version: tuple) -> dict:
    """Built once per stored batch, not once per poll: plotly figures cost ~0.1 s of GIL each, and the
    sweep thread in this process needs the GIL between its small torch ops."""
    series = data.metrics(db, run_id, version)
    return {name: charts.time_series(series, *spec) for name, spec in SERIES.items()
            if series[spec[0]].notna().any()}


@st.fragment(run_every=1.0 if run["status"] == "running" else None)
def live_view() -> None:
    row = svc.store.run_row(run_id)
    if row is None:
        st.info(f"Run #{run_id} was deleted.")
        return
    shown = state.run_status(svc, run_id)  # the sidebar shows the same object, in the same format
    status, done, total = shown.status, shown.done, shown.total
    version = (done, status)
    st.markdown(f"#### Run #{run_id} {status_badge(status)}")
    st.text(row["name"])
    if status == "running":
        st.caption(f"Sweeping the **{safe.md(row['phase'] or '…')}** phase; this page updates itself every second.")
    elif status in ENDINGS:
        message = {"finished": f"Finished: all {total} problems are stored.",
                   "stopped": f"Stopped after {done} of {total} problems. Resume continues where it stopped.",
                   "interrupted": f"Interrupted after {done} of {total} problems: the process sweeping it ended "
                                  "(a crash, a kill or a closed terminal). Resume continues where it stopped.",
                   "failed": f"Failed after {done} of {total} problems: {row['error']}"}[status]
        ENDINGS[status](safe.md(message))  # a failed run's message quotes its stored error

    rate = shown.problems_per_hour
    with st.container(horizontal=True):  # cards as wide as their values; they wrap on a narrow window
        for label, value, help in (
                ("Phase", safe.md(row["phase"] or "–"), None),
                ("Problems", f"{done:,} / {total:,}", None),
                ("Throughput", "–" if not rate else f"{rate:,.0f} /h", "problems per hour"),
                ("ETA", duration(shown.eta_s) if status == "running" else "–", "at the current throughput"),
                ("Elapsed", duration(shown.elapsed_s), "Time spent sweeping, summed over resumes"),
                ("Batch size", "–" if missing(row["batch_size"]) else int(row["batch_size"]),
                 f"{int(row['n_variants'])} variants per problem, so {int(row['n_variants'])}× as many rows")):
            st.metric(label, value, help=help, width="content", border=True)
    st.progress(done / total if total else 0.0, text=f"{done / total:.0%}" if total else "no problems")

    series = data.metrics(db, run_id, version)
    if row["source"] == "import":
        st.caption("Imported from the old script's files: there are no timings or resource measurements.")
    elif series.empty:
        st.caption("No batch stored yet: the charts start with the first batch.")
    else:
        figures = metric_charts(db, run_id, version)
        for name in SERIES:  # full width, one under the other: readable from 800 px up
            if name in figures:
                st.plotly_chart(figures[name], key=f"chart_{name}")
        st.caption("RSS and CPU are those of the process that rolled out each batch: on a CPU with more than "
                   "one core, one of the sweep's worker processes; on Ray, that batch's actor. The sweep's memory "
                   "together is the PSS of the sweep's process and its worker processes on this machine, read when "
                   "a batch is stored, at most once a second and at a phase's last batch: PSS splits each shared "
                   "page (the model's, shared with the forked workers) between the processes that map it, so it "
                   "counts once. Ray's actors are not in it (not charted for a Ray run), nor is anything on a "
                   "system without PSS (Linux has it).")
        if "gpu" not in figures:
            st.info(f"No GPU memory to chart: this run sweeps on {safe.md(row['device'] or 'the CPU')}.",
                          icon=":material/memory:")

    st.markdown("##### Latest problems")
    progress = svc.status()
    live = progress if progress is not None and progress.run_id == run_id and status == "running" else None
    if live and live.latest:
        latest = pd.DataFrame(list(live.latest))[["problem_id", "question", "gold", "answer", "correct", "flips"]]
    else:
        latest = data.latest_results(db, run_id, version)
        latest = latest.rename(columns={"answer_text": "answer", "n_flips": "flips"})[
            ["problem_id", "difficulty", "phase", "gold", "answer", "correct", "flips"]]
    st.dataframe(latest, hide_index=True, column_config={
        "question": st.column_config.TextColumn("question", width="large"),
        "correct": st.column_config.CheckboxColumn("baseline right"),
        "flips": st.column_config.NumberColumn("variants flipped", help="variants whose correctness differs")})

    skipped = data.skipped_problems(db, run_id, version)
    if len(skipped):
        st.markdown("##### Skipped problems")
        st.caption(f"{len(skipped)} problem(s) the model cannot run were recorded with the reason and left out; "
                   "the sweep went on without them (a resume does not retry them).")
        st.dataframe(skipped, hide_index=True, column_config={
            "question": st.column_config.TextColumn("question", width="large"),
            "reason": st.column_config.TextColumn("why skipped", width="large")})

    state.rerun_if_stale(svc)  # when the run ends: stop polling, and the other pages' numbers are final


live_view()
if run["source"] == "import":
    st.stop()
with st.container(horizontal=True):
    st.button("Stop", icon=":material/stop:", on_click=state.stop_sweep, disabled=not svc.running)
    resumable = not svc.running and run["source"] == "sweep" and run["status"] in ("stopped", "interrupted", "failed")
    st.button(f"Resume run #{run_id}", icon=":material/replay:", on_click=state.resume_sweep, args=(run_id,),
              disabled=not resumable)
state.show_feedback()
