"""Compare: several curves (runs, variant groups, validation subset vs all), paired by problem id."""
import pandas as pd
import streamlit as st

from dashboard import charts, comparison, data, state, widgets
from dashboard.comparison import Side
from db import queries
from db.paired import NO_SPREAD

svc = state.open_page()
run = state.require_results(svc)
db, run_id = state.db_path(), int(run["id"])
runs = queries.runs(svc.store)
runs = runs[runs["done"] > 0]
versions = {int(r.id): state.version(r._asdict()) for r in runs.itertuples()}

st.title("Compare")
widgets.run_caption(run)
measure = widgets.measure("compare_measure")

options: list[Side] = []
for other in runs.itertuples():
    for group in data.variant_groups(db, int(other.id), versions[int(other.id)]).to_dict("records"):
        keys = (int(other.id), group["scheme"], group["method"], group["site"], group["mode"])
        options.append(Side(*keys))
        if data.has_validation(db, int(other.id), versions[int(other.id)]):
            options.append(Side(*keys, phase="validation"))
mine = [o for o in options if o.run_id == run_id]
if not mine:
    st.info("This run has no ablation variants to compare.")
    st.stop()
picked_runs = [r for r in st.session_state.get("compare_runs", []) if r in versions]
if len(picked_runs) > 1:  # rows selected in the Run page's table: each run's first group of the first's scheme
    scheme = next(o.scheme for o in options if o.run_id == picked_runs[0])
    default = [next((o for o in options if o.run_id == r and o.scheme == scheme and o.phase == "all"), None)
               for r in picked_runs]
    default = [d for d in default if d is not None]
elif any(o.phase == "validation" for o in mine):
    default = [next(o for o in mine if o.phase == "all"), next(o for o in mine if o.phase == "validation")]
else:
    default = [o for o in mine if o.phase == "all"][:2]
if st.session_state.get("compare_default") != default:  # a new run or table selection resets the choice
    st.session_state["compare_default"] = default
    st.session_state["compare_sides"] = default
sides = st.multiselect("Curves to compare (the first is the reference)", options, key="compare_sides",
                       format_func=Side.option, max_selections=6, placeholder="choose runs and variant groups",
                       help="A run's variant group over all its problems, or over its validation subset. "
                            "Rows selected in the Run page's table come here.")
if len(sides) < 2:
    st.info("Choose at least two curves: more runs (select rows in the Run page's table), variant groups, or a "
            "validation subset against its full run.")
    st.stop()

T = int(svc.store.run_row(sides[0].run_id)["num_latent"])
settings = data.run_settings(db, tuple(sorted({s.run_id for s in sides})))
names, differ = comparison.labels(sides, settings)
curves = [data.position_curve(db, versions[s.run_id], s.scope(), measure) for s in sides]
if all(c["value"].isna().all() for c in curves[1:]) or curves[0]["value"].isna().all():
    st.info("Nothing to compare for this measure: a side has no values (imported runs have no log-probs).")
    st.stop()
apart = comparison.mixed_positions(sides, settings)  # runs whose position k means another thing than the first's
pairs = [data.paired(db, (versions[sides[0].run_id], versions[s.run_id]), sides[0].scope(), s.scope(), measure)
         for s in sides[1:]]
if apart:
    old_run = next((r for r in [sides[0].run_id, *apart] if settings.get(r, {}).get("positions") == "old-script"),
                   sides[0].run_id)
    _, meaning = data.positions(db, old_run)
    st.warning(f"**Positions differ in meaning.** Run{'s' if len(apart) > 1 else ''} "
               f"{', '.join(f'#{r}' for r in apart)} number{'' if len(apart) > 1 else 's'} positions otherwise than "
               f"the first curve; one of them uses the old script's numbering: {meaning}. The curves share the "
               "k axis only as a count of ablated positions, not as the same latents: no paired difference is "
               "computed between them.", icon=":material/warning:")
if len({s.scheme for s in sides}) > 1:
    st.warning("Different schemes: the same k ablates different latents; the x axis follows the first curve.",
               icon=":material/warning:")
st.text("Legend: " + (", ".join(differ) if differ else "nothing differs but the run") + " (the settings that differ)")
drawn = [(n, p) for n, p, s in zip(names[1:], pairs, sides[1:])
         if s.run_id not in apart and not comparison.same_group(s, sides[0])]  # no difference to draw
st.plotly_chart(charts.compare_figure(list(zip(names, curves)), drawn, sides[0].scheme, measure, T),
                key="compare_chart")
ticks = charts.ticks(curves[0], T)

pct = charts.is_rate(measure)
fmt = (lambda v: "–" if widgets.missing(v) else f"{100 * v:+.1f} pp") if pct else \
    (lambda v: "–" if widgets.missing(v) else f"{v:+.3f}")
rows = []
for name, pair, side in zip(names[1:], pairs, sides[1:]):
    for r in pair.itertuples():
        only = "only in the first" if r.n_b == 0 else "only in this one" if r.n_a == 0 else \
            "positions differ in meaning" if side.run_id in apart else \
            "0 by construction" if comparison.same_group(side, sides[0]) else None
        rows.append({"compared with": name, "latents ablated": ticks.get(int(r.k), str(r.k)),
                     "shared problems": r.shared, "unpaired (first / this)": f"{r.only_a} / {r.only_b}",
                     "first − this (shared)": only or fmt(r.diff),
                     "95% paired interval": "–" if only or not r.shared else f"[{fmt(r.diff_lo)}, {fmt(r.diff_hi)}]",
                     "excludes 0": "–" if only or not r.shared else
                     "yes" if r.diff_lo > 0 or r.diff_hi < 0 else "no"})
table = pd.DataFrame(rows, columns=["compared with", "latents ablated", "shared problems", "unpaired (first / this)",
                                    "first − this (shared)", "95% paired interval", "excludes 0"])
st.dataframe(table, hide_index=True)
both = table[table["excludes 0"] != "–"]
st.caption(f"Problems are paired by id: differences use the shared problems only, with a 95% percentile "
           f"bootstrap interval resampling the pairs (for every measure; {NO_SPREAD}). "
           f"{int((both['excludes 0'] == 'yes').sum())} of {len(both)} positions present on both sides differ "
           f"(interval excludes 0); positions present on one side only are listed, not counted. "
           "Top: each curve with its 95% band (Wilson for rates, bootstrap for log-prob drops).")
if any(comparison.same_group(s, sides[0]) for s in sides[1:]):
    st.caption("A validation subset against its own run: the shared problems are the subset itself, so their "
               "paired difference is 0 by construction; compare the bands instead.")
