"""Importance: per-position curves of each scheme x method, with 95% intervals, for a chosen measure and filters."""
import streamlit as st

from dashboard import charts, data, state, widgets

svc = state.open_page()
run = state.require_results(svc)
db, run_id, version = state.db_path(), int(run["id"]), state.version(run)
T = int(svc.store.run_row(run_id)["num_latent"])

st.title("Which latent thoughts matter?")
widgets.run_caption(run)
filters = widgets.filters(db, run, version, key="importance")
measure = widgets.measure("importance_measure")

accuracy = data.baseline_accuracy(db, run_id, version, filters)
if accuracy["n"] == 0:
    st.info("No stored problem passes these filters.", icon=":material/filter_alt_off:")
    st.stop()
curves = data.position_curves(db, run_id, version, filters, measure)
groups = data.variant_groups(db, run_id, version)
first = groups.iloc[0] if len(groups) else None
early_late = data.early_late(db, run_id, version, filters, first["scheme"], first["method"], first["site"],
                             first["mode"]) if first is not None else {"n": 0}

cells = st.columns(4)
cells[0].metric("Problems in scope", accuracy["n"])
cells[1].metric("Baseline accuracy", widgets.ci(accuracy["accuracy"]),
                help=f"95% Wilson interval {widgets.ci(accuracy['accuracy'], accuracy['lo'], accuracy['hi'])}")
if early_late.get("n"):
    label = f"{early_late['scheme']} · {early_late['method']}"
    cells[2].metric(f"Flip rate early (0–{T // 2 - 1}) vs late ({T // 2}–{T - 1})",
                    f"{widgets.ci(early_late['early'])} vs {widgets.ci(early_late['late'])}",
                    help=f"{label}: mean flip over the early / late latent positions, 95% bootstrap intervals "
                         f"{widgets.ci(early_late['early'], early_late['early_lo'], early_late['early_hi'])} and "
                         f"{widgets.ci(early_late['late'], early_late['late_lo'], early_late['late_hi'])}")
    cells[3].metric("Early / late ratio", widgets.ci(early_late["ratio"], percent=False),
                    help="95% bootstrap interval " + widgets.ci(early_late["ratio"], early_late["ratio_lo"],
                                                                early_late["ratio_hi"], percent=False))
st.caption(f"{charts.MEASURE_LABELS[measure]}: {charts.MEASURE_HELP[measure]}. Shaded bands: 95% "
           + ("Wilson intervals." if charts.is_rate(measure) else "bootstrap intervals over problems."))

schemes = [s for s in ("prefix", "single", "suffix", "exit") if s in set(curves["scheme"])]
if curves["value"].isna().all():
    st.info("This run stored no gold log-probs (runs imported from the old script's files have none): "
            "choose another measure.", icon=":material/info:")
    st.stop()
y_range = charts.value_range([curves[curves["scheme"] == s] for s in schemes], measure)
columns = st.columns(2 if len(schemes) in (2, 4) else min(len(schemes), 3), gap="medium")
for i, scheme in enumerate(schemes):
    with columns[i % len(columns)]:
        st.markdown(f"##### {charts.SCHEME_TITLES[scheme]}")
        st.plotly_chart(charts.position_figure(curves, scheme, measure, T, y_range), key=f"curve_{scheme}")
        if scheme == "prefix":
            st.info("**Cumulative by construction.** Prefix k ablates latents 0…k−1, so every point includes the "
                    "damage of all earlier latents: the curve says how much damage accumulates, not which latent "
                    "matters. " + ("For one latent at a time, see the *Single position* chart."
                                   if "single" in schemes else "For one latent at a time, sweep the *single* scheme."),
                    icon=":material/info:")
