"""Export: the selected run (and filters) as the old script's JSON files, CSV, Parquet and a Markdown report."""
from functools import partial

import pandas as pd
import streamlit as st

from dashboard import data, state, widgets
from db.figures import FIGURES
from db.seed import SCORES, SUMMARY, VALIDATION

svc = state.open_page()
run = state.require_results(svc)
db, run_id, version = state.db_path(), int(run["id"]), state.version(run)

st.title("Export")
widgets.run_caption(run)
scope = widgets.filters(db, run, version, key="export")
groups = data.variant_groups(db, run_id, version)

st.subheader("The old script's files")
with st.columns(2)[0]:
    group = widgets.pick_group(groups, "export_group", "Prefix variant group", scheme="prefix")
if group is None:
    st.info("This run has no prefix variants, and the old script's files describe the prefix scheme only. "
            "The tables and the report below cover every scheme.")
else:
    prefix = scope.group("prefix", group["method"], group["site"], group["mode"])
    overview = data.seed_overview(db, version, prefix)
    summary = overview["summary"]
    cells = st.columns(3)
    cells[0].metric("n_problems", summary["n_problems"])
    cells[1].metric("baseline_accuracy", widgets.ci(summary["baseline_accuracy"]))
    cells[2].metric("validation problems", overview["n_validation"])
    importance = pd.DataFrame({"position": list(summary["position_importance"]),
                               "importance (mean importance_score)": list(summary["position_importance"].values())})
    st.dataframe(importance.set_index("position").T, column_config={
        p: st.column_config.NumberColumn(f"{p} (baseline)" if p == "0" else p, format="%.3f")
        for p in summary["position_importance"]})
    old = FIGURES["old_script_early_late"]
    st.dataframe(pd.DataFrame([{"steps": d, **v} for d, v in summary["by_difficulty"].items()]), hide_index=True,
                 column_config={"early_importance": st.column_config.NumberColumn(format="%.3f", help=old[1]),
                                "late_importance": st.column_config.NumberColumn(format="%.3f", help=old[1]),
                                "baseline_accuracy": st.column_config.NumberColumn(format="%.3f")})
    st.caption(f"by_difficulty holds the **{old[0]}** (early_importance, late_importance, pattern_validated): "
               f"{old[1]}.")
    st.caption("The old script's numbering: position 0 is the baseline, position p is prefix k = p (latents 0…p−1 "
               f"ablated). File names are the old script's, prefixed with the run (run{run_id}_…), so downloads of "
               "several runs never overwrite each other; drop the prefix for the old tooling.")
    seed_file = partial(data.seed_file, db, prefix)
    with st.container(horizontal=True):
        st.download_button("Summary stats (JSON)", partial(seed_file, SUMMARY), f"run{run_id}_{SUMMARY}",
                           "application/json", icon=":material/download:", on_click="ignore", type="primary")
        st.download_button("Scores (JSON)", partial(seed_file, SCORES), f"run{run_id}_{SCORES}",
                           "application/json", icon=":material/download:", on_click="ignore")
        st.download_button("Validation (JSON)", partial(seed_file, VALIDATION), f"run{run_id}_{VALIDATION}",
                           "application/json", icon=":material/download:", on_click="ignore",
                           disabled=not overview["n_validation"])

st.subheader("Every variant")
st.caption("One row per (problem, variant), baseline first, for the problems the filters keep: the columns of "
           "`python -m runner export --format csv`.")
raw = st.checkbox("CSV cells as stored (for code, not spreadsheets)", key="export_csv_raw",
                  help="By default a text cell starting with = + - @ gets a leading apostrophe, so that a spreadsheet "
                       "shows it instead of running it as a formula. Tick to write the cells exactly as stored.")
with st.container(horizontal=True):
    st.download_button("results.csv", partial(data.results_csv, db, scope, raw), f"run{run_id}_results.csv",
                       "text/csv", icon=":material/table:", on_click="ignore")
    st.download_button("results.parquet", partial(data.results_parquet, db, scope),
                       f"run{run_id}_results.parquet", "application/vnd.apache.parquet", icon=":material/table:",
                       on_click="ignore")

st.subheader("Report")
st.caption("The whole run (filters do not apply): setup, baseline accuracy, per-position effects with intervals, "
           "difficulty, early vs late; and `stats --json`, the summary keys plus every figure with its interval.")
with st.container(horizontal=True):
    st.download_button("report.md", partial(data.markdown_report, db, run_id), f"run{run_id}_report.md",
                       "text/markdown", icon=":material/description:", on_click="ignore")
    st.download_button("stats.json", partial(data.stats_json, db, run_id), f"run{run_id}_stats.json",
                       "application/json", icon=":material/data_object:", on_click="ignore")
