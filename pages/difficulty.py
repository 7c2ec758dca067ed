"""Difficulty: baseline accuracy and the two named early/late figures per step count or bucket; a difficulty x k
heatmap."""
import pandas as pd
import streamlit as st

from dashboard import charts, data, safe, state, widgets
from db.figures import FIGURES
from db.report import NAMED_HEADER, named_rows
from db.stats import UNANIMOUS

svc = state.open_page()
run = state.require_results(svc)
db, run_id = state.db_path(), int(run["id"])
T = int(svc.store.run_row(run_id)["num_latent"])

st.title("Difficulty")
scope = widgets.filters(db, run, state.version(run), key="difficulty")
groups = data.variant_groups(db, run_id, state.version(run))
prefix_first = next((i for i, g in enumerate(groups.to_dict("records")) if g["scheme"] == "prefix"), 0)
with st.container(horizontal=True, vertical_alignment="bottom"):
    by = st.segmented_control("Rows", ["per step count", "per bucket"], default="per step count",
                              key="difficulty_by") or "per step count"
    group = widgets.pick_group(groups, key="difficulty_group", index=prefix_first)
if group is None:
    st.info("This run has no ablation variants.")
    st.stop()
scope = scope.group(group["scheme"], group["method"], group["site"], group["mode"])
OLD, LATENT = FIGURES["old_script_early_late"], FIGURES["per_latent_early_late"]


@st.fragment(run_every=2 if run["status"] == "running" else None)
def results() -> None:
    """Redrawn every 2 s while the run sweeps (cached per stored batch)."""
    now = state.selected_run(svc)
    version = state.version(now)
    widgets.run_caption(now)
    key = "difficulty" if by == "per step count" else "bucket"
    table = data.difficulty_table(db, version, scope, "steps" if key == "difficulty" else "bucket")
    if table.empty:
        st.info("No stored problem passes these filters.", icon=":material/filter_alt_off:")
        return
    named = data.named_figures(db, version, scope, "steps" if key == "difficulty" else "bucket")

    st.markdown("##### Early vs late: the two named figures")
    cells = named_rows(named, key)
    shown = pd.DataFrame([[c[0], c[1], widgets.ci(r.accuracy, r.accuracy_lo, r.accuracy_hi), *c[2:]]
                          for c, r in zip(cells, table.itertuples())],
                         columns=["steps" if key == "difficulty" else "bucket", "problems", "baseline accuracy",
                                  *NAMED_HEADER])
    st.dataframe(shown, hide_index=True, column_config={
        column: st.column_config.TextColumn(help=(OLD if i < 3 else LATENT)[1])
        for i, column in enumerate(NAMED_HEADER)})
    used = {name: safe.md(widgets.group_label(g)) if g else "not in this run" for name, g in named["groups"].items()}
    st.caption(f"**{OLD[0]}** ({used['old_script_early_late']}): {OLD[1]}. **{LATENT[0]}** "
               f"({used['per_latent_early_late']}): {LATENT[1]}. Accuracy: 95% Wilson interval.")

    st.markdown(f"##### Early vs late positions of {safe.md(widgets.group_label(group))}")
    own = pd.DataFrame({
        key if key == "bucket" else "steps": table[key], "problems": table["n"],
        f"early (positions 0–{T // 2 - 1})": [widgets.ci(r.early, r.early_lo, r.early_hi) for r in table.itertuples()],
        f"late (positions {T // 2}–{T - 1})": [widgets.ci(r.late, r.late_lo, r.late_hi) for r in table.itertuples()],
        "early / late": [widgets.ci(r.ratio, r.ratio_lo, r.ratio_hi, percent=False) for r in table.itertuples()]})
    st.dataframe(own, hide_index=True)
    st.caption("The chosen group's own positions (a prefix k sits at k−1, the last latent it ablates), 95% "
               f"bootstrap intervals over the row's problems ({UNANIMOUS}): neither named figure unless the group is "
               "single.")

    st.markdown(f"##### Difficulty × position · {safe.md(widgets.group_label(group))}")
    measure = widgets.measure("difficulty_measure")
    matrix = data.difficulty_heatmap(db, version, scope, measure)
    counts = data.difficulty_table(db, version, scope, "steps").set_index("difficulty")["n"].to_dict()
    if matrix.empty or matrix.isna().all().all():
        st.info("Nothing to show for this measure (runs imported from the old script's files have no log-probs).")
    else:
        st.plotly_chart(charts.difficulty_heatmap(matrix, counts, group["scheme"], measure, T), key="heatmap")
    state.rerun_if_stale(svc)


results()
