"""Compare: two runs, validation vs full, or two variant groups, overlaid, with the difference per position."""
import pandas as pd
import streamlit as st

from dashboard import charts, data, state, widgets
from db import queries
from db.queries import Curve, Filters

svc = state.open_page()
run = state.require_results(svc)
db, run_id, version = state.db_path(), int(run["id"]), state.version(run)
T = int(svc.store.run_row(run_id)["num_latent"])
MODES = ["two runs", "validation vs full", "two variant groups"]

st.title("Compare")
widgets.run_caption(run)
mode = st.segmented_control("Compare", MODES, default=MODES[1], key="compare_mode") or MODES[1]
measure = widgets.measure("compare_measure")
groups = data.variant_groups(db, run_id, version)
left, right = st.columns(2)

if mode == "two runs":
    runs = queries.runs(svc.store)
    others = runs[(runs["id"] != run_id) & (runs["done"] > 0)].to_dict("records")
    if not others:
        st.info("This database has one run with results: start another, or compare phases or variant groups.")
        st.stop()
    with left:
        group_a = widgets.pick_group(groups, "compare_group_a", f"Run #{run_id} (a): variant group")
    other = right.selectbox("Run b", others, key="compare_run_b", format_func=lambda r: f"#{r['id']} · {r['name']}")
    with right:
        group_b = widgets.pick_group(data.variant_groups(db, int(other["id"]), state.version(other)),
                                     "compare_group_b", f"Run #{other['id']} (b): variant group",
                                     scheme=group_a["scheme"] if group_a else None)
    if group_a is None or group_b is None:
        st.info(f"Run #{other['id']} has no {group_a['scheme'] if group_a else ''} variants to compare with.")
        st.stop()
    a = Curve(run_id, Filters(), group_a["scheme"], group_a["method"], group_a["site"], group_a["mode"])
    b = Curve(int(other["id"]), Filters(), group_b["scheme"], group_b["method"], group_b["site"], group_b["mode"])
    label_a, label_b = f"run #{run_id} · {group_a['method']}", f"run #{other['id']} · {group_b['method']}"
    versions = (version, state.version(other))
elif mode == "validation vs full":
    if not data.has_validation(db, run_id, version):
        st.info("This run has no validation subset: compare two runs or two variant groups instead.")
        st.stop()
    with left:
        group = widgets.pick_group(groups, "compare_group")
    keys = (group["scheme"], group["method"], group["site"], group["mode"])
    a, b = Curve(run_id, Filters(phase="validation"), *keys), Curve(run_id, Filters(), *keys)
    label_a, label_b, versions = "validation subset", "full run (all problems)", (version,)
else:
    if len(groups) < 2:
        st.info("This run has a single variant group: sweep more schemes or methods to compare them.")
        st.stop()
    with left:
        group_a = widgets.pick_group(groups, "compare_group_a", "Group a")
    with right:
        group_b = widgets.pick_group(groups, "compare_group_b", "Group b", index=1)
    a = Curve(run_id, Filters(), group_a["scheme"], group_a["method"], group_a["site"], group_a["mode"])
    b = Curve(run_id, Filters(), group_b["scheme"], group_b["method"], group_b["site"], group_b["mode"])
    label_a, label_b, versions = widgets.group_label(group_a), widgets.group_label(group_b), (version,)
    if group_a["scheme"] != group_b["scheme"]:
        st.caption(":material/warning: Different schemes: the same k ablates different latents in a and b; "
                   "the x axis follows a.")

table = data.compare(db, versions, a, b, measure)
if table["value_a"].isna().all() or table["value_b"].isna().all():
    st.info("Nothing to compare for this measure: one side has no values (imported runs have no log-probs).")
    st.stop()
st.plotly_chart(charts.compare_figure(table, label_a, label_b, a.scheme, measure, T), key="compare_chart")
apart = int((~table["overlap"].fillna(True)).sum())
st.caption(f"Bands: 95% intervals. Bottom: a − b per position, black where the two intervals do not overlap "
           f"({apart} of {len(table)} positions), grey where they do.")
pct = charts.is_rate(measure)
st.dataframe(pd.DataFrame({
    "latents ablated": [charts.ablated(a.scheme, int(k), T) for k in table["k"]],
    f"a: {label_a}": [widgets.ci(r.value_a, r.lo_a, r.hi_a, pct) for r in table.itertuples()],
    f"b: {label_b}": [widgets.ci(r.value_b, r.lo_b, r.hi_b, pct) for r in table.itertuples()],
    "a − b": ["–" if widgets.missing(r.diff) else f"{100 * r.diff:+.1f} pp" if pct else f"{r.diff:+.3f}"
              for r in table.itertuples()],
    "intervals overlap": ["yes" if r.overlap else "no" for r in table.itertuples()],
    "problems (a / b)": [" / ".join("–" if widgets.missing(n) else f"{n:.0f}" for n in (r.n_a, r.n_b))
                         for r in table.itertuples()]}), hide_index=True)
