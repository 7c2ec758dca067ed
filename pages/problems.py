"""Problems: a filterable, sortable table of the run's problems, and one problem's every variant side by side."""
from functools import partial

import streamlit as st

from dashboard import charts, data, safe, state, widgets
from db.figures import ablated_label

svc = state.open_page()
run = state.require_results(svc)
db, run_id, version = state.db_path(), int(run["id"]), state.version(run)
T = int(svc.store.run_row(run_id)["num_latent"])
FLIPPED = {"any": None, "flipped by some variant": True, "flipped by none": False}
ORDERS = {"run order": "ord", "most flips first": "-n_flips", "hardest first": "-difficulty",
          "easiest first": "difficulty", "problem id": "problem_id"}
HARM, HELP, CHANGED = "background-color: #fde2e1", "background-color: #dcfce7", "background-color: #fef9c3"

st.title("Problems")
widgets.run_caption(run)
scope = widgets.filters(db, run, version, key="problems")
left, middle, right = st.columns([3, 2, 2])
search = left.text_input("Search the questions", key="problems_search", placeholder="e.g. apples")
flipped = middle.selectbox("Flips", list(FLIPPED), key="problems_flipped")
order = right.selectbox("Sort", list(ORDERS), key="problems_order")
table = data.problems_table(db, version, scope, FLIPPED[flipped], search, ORDERS[order])
if table.empty:
    st.info("No stored problem passes these filters.", icon=":material/filter_alt_off:")
    st.stop()

ids = tuple(table["problem_id"])


def open_selected_row(shown: tuple) -> None:
    rows = st.session_state["problems_table"].selection.rows
    if rows:
        st.session_state["problem_id"] = shown[rows[0]]


st.caption(f"{len(table)} problems · click a row to open it below")
st.dataframe(table[["problem_id", "difficulty", "phase", "gold", "baseline_answer", "baseline_correct", "n_flips",
                    "n_variants", "question"]], key="problems_table", hide_index=True,
             on_select=partial(open_selected_row, ids), selection_mode="single-row",
             column_config={"difficulty": st.column_config.NumberColumn("steps", width="small"),
                            "baseline_answer": st.column_config.TextColumn("baseline answer"),
                            "baseline_correct": st.column_config.CheckboxColumn("baseline right"),
                            "n_flips": st.column_config.NumberColumn("flips", help="variants whose correctness "
                                                                     "differs from the baseline's"),
                            "n_variants": st.column_config.NumberColumn("variants"),
                            "question": st.column_config.TextColumn("question", width="large")})

if st.session_state.get("problem_id") not in ids:
    st.session_state["problem_id"] = ids[0]
problem_id = st.selectbox("Problem", ids, key="problem_id")
detail = data.problem_detail(db, run_id, version, problem_id)
problem, variants = detail["problem"], detail["variants"]
base = variants[variants["scheme"] == "baseline"].iloc[0]

def answer(row) -> str:
    value = row["answer_value"]
    if widgets.missing(value):
        return (row["answer_text"] or "–")[:24]
    return f"{value:.0f}" if float(value).is_integer() else f"{value:g}"


steps = int(problem["difficulty"])
st.subheader(f"{safe.md(problem_id)} · {steps} step{'s' if steps != 1 else ''} · {safe.md(problem['phase'])} phase")
left, right = st.columns([3, 2])
with left.container(border=True):
    safe.text(problem["question"])
    if problem["solution"]:
        with st.expander("Worked solution"):
            st.text(problem["solution"])
gold, baseline = right.columns(2)
gold.metric("Gold answer", safe.md(problem["gold"]))
baseline.metric("Baseline answer", safe.md(answer(base)), delta="right" if base["correct"] else "wrong",
                delta_color="normal" if base["correct"] else "inverse", delta_arrow="off")
right.caption(f"Baseline output: “{safe.md(base['answer_text'])}”")


def column(row) -> str:
    """The latents a variant ablates (exit: how many it feeds), as its row says."""
    if row.scheme == "baseline":
        return ""
    label = ablated_label(row.ablated_positions, int(row.latents_fed), T, short=True)
    return f"{label} fed" if not len(row.ablated_positions) and row.latents_fed < T else label


variants["column"] = [column(r) for r in variants.itertuples()]
variants["label"] = ["baseline" if r.scheme == "baseline" else f"{r.scheme} {r.column} · {r.method}"
                     for r in variants.itertuples()]
ablations = variants[variants["scheme"] != "baseline"].copy()
ablations["cell"] = [answer(r) for _, r in ablations.iterrows()]
ablations["style"] = [HARM if r.harm else HELP if r.help else CHANGED if r.changed else ""
                      for r in ablations.itertuples()]
st.markdown("##### Every variant's answer")
st.caption("Columns: the latents each variant ablates. :red-background[right → wrong] · "
           ":green-background[wrong → right] · :orange-background[answer changed, correctness kept]")
for scheme, part in ablations.groupby("scheme", sort=False):
    grid = part.pivot(index="method", columns="column", values="cell")
    styles = part.pivot(index="method", columns="column", values="style").fillna("")
    order = list(dict.fromkeys(part.sort_values("k")["column"]))
    st.dataframe(grid[order].style.apply(lambda _: styles[order], axis=None),
                 column_config={"method": st.column_config.TextColumn(charts.SCHEME_TITLES.get(scheme, scheme))})

if variants["gold_logprob"].notna().any():
    st.markdown("##### Gold log-probability per variant")
    st.plotly_chart(charts.logprob_figure(variants, list(variants["label"])), key="logprob")
    st.caption("Log-probability of the gold answer under teacher forcing (higher is better). Red: the variant flips "
               "the answer's correctness; dashed line: the baseline.")

st.markdown("##### Logit lens of each latent")
with_lens = variants[variants["lens"].notna()]
if with_lens.empty:
    st.info("No logit lens stored for this problem (runs imported from the old script's files have none).")
else:
    labels = dict(zip(with_lens["variant"], with_lens["label"]))
    shown = st.selectbox("Variant", list(labels), key="lens_variant", format_func=labels.get)
    chosen = with_lens.set_index("variant").loc[shown]
    marked = charts.lens_marks(chosen["ablated_positions"], chosen["latents_fed"], T)
    unfed = not len(chosen["ablated_positions"]) and chosen["latents_fed"] < T
    how = "not fed" if unfed else f"ablated ({chosen['method']})"
    st.plotly_chart(charts.lens_figure(chosen["lens"], marked, how), key="lens")
    verb = "never feeds" if unfed else "replaced"
    st.caption("Each latent's final hidden state read through the model's unembedding: its most likely tokens. "
               + (f"Framed in red: the latents this variant {verb} ({', '.join(map(str, sorted(marked)))})."
                  if marked else "The baseline ablates nothing."))

with st.expander("All variants as a table"):
    st.dataframe(variants.drop(columns=["lens", "column", "label"]), hide_index=True)
