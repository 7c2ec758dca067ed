"""Importance: per-position curves of each scheme x method, with 95% intervals, for a chosen measure and filters."""
import streamlit as st

from dashboard import charts, data, safe, state, widgets
from db.stats import UNANIMOUS

svc = state.open_page()
run = state.require_results(svc)
db, run_id = state.db_path(), int(run["id"])
T = int(svc.store.run_row(run_id)["num_latent"])

st.title("Which latent thoughts matter?")
scope = widgets.filters(db, run, state.version(run), key="importance")
measure = widgets.measure("importance_measure")


@st.fragment(run_every=2 if run["status"] == "running" else None)
def results() -> None:
    """Redrawn every 2 s while the run sweeps: each new batch moves the numbers (cached per version)."""
    now = state.selected_run(svc)
    version = state.version(now)
    widgets.run_caption(now)
    accuracy = data.baseline_accuracy(db, version, scope)
    if accuracy["n"] == 0:
        st.info("No stored problem passes these filters.", icon=":material/filter_alt_off:")
        return
    curves = data.position_curve(db, version, scope, measure)
    groups = data.variant_groups(db, run_id, version)
    first = groups.iloc[0] if len(groups) else None
    name, pct = charts.MEASURE_LABELS[measure], charts.is_rate(measure)
    split = data.early_late(db, version, scope.group(first["scheme"], first["method"], first["site"],
                                                     first["mode"]), measure) if first is not None else {"n": 0}

    with st.container(horizontal=True):  # cards wrap instead of cutting their values
        st.metric("Problems in scope", f"{accuracy['n']:,}", width="content", border=True)
        widgets.card("Baseline accuracy", accuracy["accuracy"], accuracy["lo"], accuracy["hi"],
                     help="95% Wilson interval")
        if split.get("n") and not widgets.missing(split.get("early")):
            where = safe.md(f"{split['scheme']} · {split['method']} · {split['site']} · {split['mode']}")
            unanimous = f" ({UNANIMOUS})" if pct else ""
            for part, span in (("early", f"0–{T // 2 - 1}"), ("late", f"{T // 2}–{T - 1}")):
                widgets.card(f"{name}, {part} latents ({span})", split[part], split[part + "_lo"],
                             split[part + "_hi"], pct, help=f"{where}: mean {name.lower()} over the {part} latent "
                             f"positions, 95% bootstrap interval{unanimous}")
            widgets.card(f"{name}: early / late", split["ratio"], split["ratio_lo"], split["ratio_hi"], False,
                         help=f"95% bootstrap interval{unanimous}")
    st.caption(f"{name}: {charts.MEASURE_HELP[measure]}. Shaded bands: 95% "
               + ("Wilson intervals." if pct else "bootstrap intervals over problems."))
    numbering, meaning = data.positions(db, run_id)
    if numbering != "latent":
        st.warning(f"**This run numbers positions the old script's way**: {meaning}. Its position k is not a "
                   "sweep's latent k; compare it with a sweep of ours on *Compare*, which keeps the two apart.",
                   icon=":material/warning:")

    if curves["value"].isna().all():
        st.info("This run stored no gold log-probs (runs imported from the old script's files have none): "
                "choose another measure.", icon=":material/info:")
        return
    schemes = [s for s in ("prefix", "single", "suffix", "exit") if s in set(curves["scheme"])]
    y_range = charts.value_range([curves[curves["scheme"] == s] for s in schemes], measure)
    for scheme in schemes:  # one chart per row: full width keeps the legend and ticks readable at 800 px
        st.markdown(f"##### {charts.SCHEME_TITLES[scheme]}")
        st.plotly_chart(charts.position_figure(curves, scheme, measure, T, y_range), key=f"curve_{scheme}")
        if scheme == "prefix":
            st.info("**Cumulative by construction.** Prefix k ablates latents 0…k−1, so every point includes the "
                    "damage of all earlier latents: the curve says how much damage accumulates, not which latent "
                    "matters. " + ("For one latent at a time, see the *Single position* chart."
                                   if "single" in schemes else "For one latent at a time, sweep the *single* scheme."),
                    icon=":material/info:")
    state.rerun_if_stale(svc)


results()
