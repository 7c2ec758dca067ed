"""Difficulty: baseline accuracy and early vs late importance per step count or bucket; a difficulty x k heatmap."""
import pandas as pd
import streamlit as st

from dashboard import charts, data, safe, state, widgets

svc = state.open_page()
run = state.require_results(svc)
db, run_id = state.db_path(), int(run["id"])
T = int(svc.store.run_row(run_id)["num_latent"])

st.title("Difficulty")
filters = widgets.filters(db, run, state.version(run), key="difficulty")
groups = data.variant_groups(db, run_id, state.version(run))
prefix_first = next((i for i, g in enumerate(groups.to_dict("records")) if g["scheme"] == "prefix"), 0)
with st.container(horizontal=True, vertical_alignment="bottom"):
    by = st.segmented_control("Rows", ["per step count", "per bucket"], default="per step count",
                              key="difficulty_by") or "per step count"
    group = widgets.pick_group(groups, key="difficulty_group", index=prefix_first)
if group is None:
    st.info("This run has no ablation variants.")
    st.stop()
keys = (group["scheme"], group["method"], group["site"], group["mode"])


@st.fragment(run_every=2 if run["status"] == "running" else None)
def results() -> None:
    """Redrawn every 2 s while the run sweeps (cached per stored batch)."""
    now = state.selected_run(svc)
    version = state.version(now)
    widgets.run_caption(now)
    table = data.difficulty_table(db, run_id, version, filters, "steps" if by == "per step count" else "bucket", *keys)
    if table.empty:
        st.info("No stored problem passes these filters.", icon=":material/filter_alt_off:")
        return

    st.markdown(f"##### Early vs late flip rate · {safe.md(widgets.group_label(group))}")
    label = "difficulty" if by == "per step count" else "bucket"
    shown = pd.DataFrame({
        "steps" if label == "difficulty" else "bucket": table[label],
        "problems": table["n"],
        "baseline accuracy": [widgets.ci(r.accuracy, r.accuracy_lo, r.accuracy_hi) for r in table.itertuples()],
        f"early (latents 0–{T // 2 - 1})": [widgets.ci(r.early, r.early_lo, r.early_hi) for r in table.itertuples()],
        f"late (latents {T // 2}–{T - 1})": [widgets.ci(r.late, r.late_lo, r.late_hi) for r in table.itertuples()],
        "early / late": [widgets.ci(r.ratio, r.ratio_lo, r.ratio_hi, percent=False) for r in table.itertuples()],
        "early ≥ late": ["–" if widgets.missing(r.early) or widgets.missing(r.late) else "yes" if r.early >= r.late
                         else "no" for r in table.itertuples()]})
    st.dataframe(shown, hide_index=True)
    st.caption("Values with their 95% intervals: Wilson for accuracy, bootstrap over the row's problems for early, "
               "late and their ratio. A variant's position is the last latent it ablates (prefix k → k−1). "
               "'early ≥ late' is the old script's pattern_validated.")

    st.markdown(f"##### Difficulty × position · {safe.md(widgets.group_label(group))}")
    measure = widgets.measure("difficulty_measure")
    matrix = data.difficulty_heatmap(db, run_id, version, filters, measure, *keys)
    counts = data.difficulty_table(db, run_id, version, filters, "steps", *keys).set_index("difficulty")["n"].to_dict()
    if matrix.empty or matrix.isna().all().all():
        st.info("Nothing to show for this measure (runs imported from the old script's files have no log-probs).")
    else:
        st.plotly_chart(charts.difficulty_heatmap(matrix, counts, group["scheme"], measure, T), key="heatmap")
    state.rerun_if_stale(svc)


results()
