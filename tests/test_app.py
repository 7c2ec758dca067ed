"""The dashboard through AppTest: every page on a real DuckDB file holding a real sweep and an imported seed run.

The module's database: a sweep of the tiny CODI model over 24 built-in problems (8 of them a
validation subset; prefix, single, suffix zero-ablations) and the hand-made seed trio imported
from tests/fixtures/seed. app.py finds it through THOUGHTSWEEP_DB (AppTest passes no script args).
Store and SweepService sit in st.cache_resource, which is process-wide: every AppTest here shares them.
"""
from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from db import queries
from db.figures import early_late
from db.scope import Scope
from db.seed import SCORES, VALIDATION, import_seed
from db.store import Store
from runner.sweep import Sweep, SweepConfig
from tests.displayed import displayed

APP = Path(__file__).resolve().parents[1] / "app.py"
SEED_FILES = Path(__file__).parent / "fixtures" / "seed"
PAGES = ["pages/run.py", "pages/progress.py", "pages/importance.py", "pages/difficulty.py", "pages/problems.py",
         "pages/compare.py", "pages/export.py"]


@dataclass(frozen=True)
class Database:
    path: Path
    sweep_id: int
    seed_id: int
    model_dir: Path
    difficulties: dict[int, int]  # step count -> problems of the sweep


@pytest.fixture(scope="module")
def database(tmp_path_factory, tiny_model_dir, tiny_reasoner) -> Database:
    path = tmp_path_factory.mktemp("dashboard") / "app.duckdb"
    store = Store(path)
    config = SweepConfig(model=str(tiny_model_dir), dataset="builtin", limit=24, validation=8, batch_size=8,
                         run_name="tiny sweep")
    sweep_id = Sweep.create(store, tiny_reasoner, config)
    assert Sweep(store, tiny_reasoner, config, sweep_id).run() == "finished"
    seed_id = import_seed(store, SEED_FILES / SCORES, SEED_FILES / VALIDATION, name="seed import")
    table = queries.problems_table(store, Scope(sweep_id))
    difficulties = table["difficulty"].value_counts().to_dict()
    store.close()  # the dashboard opens it through its own cached Store
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("THOUGHTSWEEP_DB", str(path))
        yield Database(path, sweep_id, seed_id, tiny_model_dir, {int(k): int(v) for k, v in difficulties.items()})


def open_app(run_id: int | None = None, page: str | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=180).run()
    assert not at.exception, [e.message for e in at.exception]
    if run_id is not None:
        at.sidebar.selectbox(key="run_id").set_value(run_id).run()
    if page is not None:
        at.switch_page(page).run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def metric(at: AppTest, label: str) -> str:
    values = [m.value for m in at.metric if m.label == label]
    assert values, f"no metric {label!r} among {[m.label for m in at.metric]}"
    return values[0]


def figures(at: AppTest) -> list[dict]:
    """Every Plotly chart on the page, as its figure JSON."""
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def array(value) -> list:
    """A Plotly JSON array: a list, or (Plotly 6+) base64 'bdata' with a dtype and an optional shape."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        return flat.reshape([int(n) for n in str(value["shape"]).split(",")]).tolist() if "shape" in value \
            else flat.tolist()
    return list(value)


def texts(at: AppTest) -> str:
    return "\n".join(displayed(e.value) for kind in ("markdown", "caption", "info", "warning", "error", "success")
                     for e in getattr(at, kind))


def test_every_page_renders_both_runs(database):
    for run_id in (database.sweep_id, database.seed_id):
        at = open_app(run_id)
        for page in PAGES:
            at.switch_page(page).run()
            assert not at.exception, (page, run_id, [e.message for e in at.exception])
            assert at.title, f"{page} has no title"
            assert at.sidebar.selectbox(key="run_id").value == run_id  # app.py framed the page


def test_run_selector_defaults_to_the_newest_run(database):
    at = open_app(page="pages/importance.py")
    assert at.sidebar.selectbox(key="run_id").value == database.seed_id  # imported last
    assert metric(at, "Problems in scope") == "4"
    at.sidebar.selectbox(key="run_id").set_value(database.sweep_id).run()
    assert metric(at, "Problems in scope") == "24"


def test_importance_curves_intervals_and_the_difficulty_filter(database):
    at = open_app(database.sweep_id, "pages/importance.py")
    shown = figures(at)
    assert len(shown) == 3  # prefix, single, suffix
    lines = [t for t in shown[0]["data"] if t.get("mode") == "lines+markers"]
    bands = [t for t in shown[0]["data"] if t.get("fill") == "toself"]
    assert len(lines) == 1 and len(bands) == 1 and len(array(lines[0]["y"])) == 6
    assert shown[0]["layout"]["yaxis"]["tickformat"] == ".0%"
    assert "Cumulative by construction" in texts(at) and "Single position" in texts(at)

    steps, count = min(database.difficulties.items())
    at.multiselect(key="importance_difficulty").set_value([steps]).run()
    assert metric(at, "Problems in scope") == str(count) != "24"

    at.segmented_control(key="importance_measure").set_value("logprob_drop").run()
    assert not at.exception
    assert figures(at)[0]["layout"]["yaxis"]["title"]["text"].startswith("Drop in gold log-prob")


def test_each_method_keeps_its_colour_in_every_chart(tmp_path, tiny_model_dir, tiny_reasoner, monkeypatch):
    """zero and mean swept together: the curves follow runner/ablation.py's method order and colours (zero
    blue, mean red) in every scheme's chart, whatever order the query gives (it sorts mean first)."""
    from dashboard.charts import COLORS
    path = tmp_path / "methods.duckdb"
    store = Store(path)
    config = SweepConfig(model=str(tiny_model_dir), dataset="builtin", limit=6, batch_size=6, methods=("zero", "mean"),
                         schemes=("prefix", "single"), run_name="two methods")
    run_id = Sweep.create(store, tiny_reasoner, config)
    assert Sweep(store, tiny_reasoner, config, run_id).run() == "finished"
    store.close()
    monkeypatch.setenv("THOUGHTSWEEP_DB", str(path))
    at = open_app(run_id, "pages/importance.py")
    shown = figures(at)
    assert len(shown) == 2
    for figure in shown:
        lines = [(t["name"], t["line"]["color"]) for t in figure["data"] if t.get("mode") == "lines+markers"]
        assert lines == [("zero", COLORS[0]), ("mean", COLORS[1])]


def test_imported_run_has_curves_but_no_logprobs(database):
    at = open_app(database.seed_id, "pages/importance.py")
    assert len(figures(at)) == 1  # the seed swept prefix only
    at.segmented_control(key="importance_measure").set_value("logprob_drop").run()
    assert "no gold log-probs" in texts(at)


def test_difficulty_table_per_step_and_per_bucket(database):
    at = open_app(database.sweep_id, "pages/difficulty.py")
    table = at.dataframe[0].value
    assert list(table["steps"]) == sorted(database.difficulties)
    assert list(table["problems"]) == [database.difficulties[d] for d in sorted(database.difficulties)]
    assert table["baseline accuracy"].str.contains(r"%").all()
    heatmap = figures(at)[0]["data"][0]
    assert heatmap["type"] == "heatmap" and len(array(heatmap["z"])) == len(database.difficulties)
    z, cells = np.array(array(heatmap["z"]), dtype=float), np.array(array(heatmap["customdata"]), dtype=float)
    counts = [database.difficulties[d] for d in sorted(database.difficulties)]  # one row per problem and k
    assert cells.shape == (*z.shape, 3) and (cells[..., 0] == np.array(counts)[:, None]).all()
    assert ((cells[..., 1] <= z) & (z <= cells[..., 2])).all() and "95% Wilson" in heatmap["hovertemplate"]
    at.segmented_control(key="difficulty_by").set_value("per bucket").run()
    buckets = at.dataframe[0].value
    assert set(buckets["bucket"]) <= {"1-2", "3-4", "5+"} and buckets["problems"].sum() == 24
    from db.stats import UNANIMOUS
    assert UNANIMOUS in texts(at)  # the intervals' rule where a side has no spread, with the table


def test_problems_filters_search_and_drill_down(database):
    at = open_app(database.sweep_id, "pages/problems.py")
    table = at.dataframe[0].value
    assert len(table) == 24
    word = table["question"].iloc[0].split()[1]
    at.text_input(key="problems_search").input(word).run()
    narrowed = at.dataframe[0].value
    assert 1 <= len(narrowed) <= 24 and narrowed["question"].str.lower().str.contains(word.lower()).all()

    problem_id = narrowed["problem_id"].iloc[-1]
    at.selectbox(key="problem_id").set_value(problem_id).run()
    assert any(problem_id in displayed(h.value) for h in at.subheader)
    grids = [d.value for d in at.dataframe[1:4]]
    assert [g.shape[1] for g in grids] == [6, 6, 6]  # prefix, single, suffix: one column per k
    kinds = [f["data"][0]["type"] for f in figures(at)]
    assert kinds == ["scatter", "heatmap"]  # gold log-prob per variant, logit lens
    assert len(array(figures(at)[0]["data"][0]["y"])) == 19  # baseline + 18 variants


def test_compare_validation_vs_full_and_two_runs(database):
    from dashboard.comparison import Side
    at = open_app(database.sweep_id, "pages/compare.py")
    sides = at.multiselect(key="compare_sides")
    assert [s.phase for s in sides.value] == ["all", "validation"]  # a run with a validation subset: that first
    assert "Legend: problems" in at.text[0].value  # the one setting that differs
    assert [t["name"] for t in figures(at)[0]["data"] if t.get("mode") == "lines+markers"] == \
        ["all problems", "validation subset"]
    table = at.dataframe[0].value
    assert len(table) == 6 and set(table["shared problems"]) == {8}  # the subset is shared, the rest unpaired
    assert set(table["unpaired (first / this)"]) == {"16 / 0"}
    assert set(table["first − this (shared)"]) == {"0 by construction"} and set(table["excludes 0"]) == {"–"}
    layout = figures(at)[0]["layout"]
    assert "yaxis2" not in layout and layout["xaxis"]["title"]["text"].startswith("Latents ablated")  # no empty panel
    from db.paired import NO_SPREAD
    assert NO_SPREAD in texts(at)

    seed = Side(database.seed_id, "prefix", "zero", "latent", "recompute")
    sides.set_value([sides.value[0], seed]).run()
    assert not at.exception
    legend = at.text[0].value
    assert "model" in legend and "dataset" in legend and "problems" not in legend  # exactly what differs
    table = at.dataframe[0].value
    assert list(table["latents ablated"]) == ["0", "0–1", "0–2", "0–3", "0–4", "0–5"]
    assert (table["shared problems"] == 0).all()  # different problem ids: nothing is paired, nothing differs
    assert table["first − this (shared)"].iloc[-1] == "only in the first"  # k = 6: the old runs stop at 5
    assert "0 of 0 positions present on both sides differ" in texts(at)
    lines = [t for t in figures(at)[0]["data"] if t.get("mode") == "lines+markers"]
    assert [len(array(t["x"])) for t in lines] == [6, 5]  # each curve over its own positions: no sliver band
    bands = [t for t in figures(at)[0]["data"] if t.get("fill") == "toself"]
    assert all(not any(v is None for v in array(b["y"])) for b in bands)


def test_compare_pairs_problems_and_names_the_differing_setting(database, tiny_reasoner):
    from dashboard import state
    from dashboard.comparison import Side
    store = state.open_service(str(database.path.resolve())).store
    config = SweepConfig(model=str(database.model_dir), dataset="builtin", limit=24, batch_size=8, mode="frozen",
                         schemes=("prefix",), run_name="frozen twin")
    twin = Sweep.create(store, tiny_reasoner, config)
    assert Sweep(store, tiny_reasoner, config, twin).run() == "finished"
    try:
        at = open_app(twin, "pages/compare.py")
        at.multiselect(key="compare_sides").set_value(
            [Side(database.sweep_id, "prefix", "zero", "latent", "recompute"),
             Side(twin, "prefix", "zero", "latent", "frozen")]).run()
        assert not at.exception
        assert "Legend: mode, validation" in at.text[0].value  # mode, and the twin has no validation subset
        names = [t["name"] for t in figures(at)[0]["data"] if t.get("mode") == "lines+markers"]
        assert names == ["recompute · validation 8", "frozen · validation 0"]
        table = at.dataframe[0].value
        assert (table["shared problems"] == 24).all() and set(table["unpaired (first / this)"]) == {"0 / 0"}
        assert table["95% paired interval"].str.startswith("[").all()
        assert "percentile bootstrap interval resampling the pairs" in texts(at)
    finally:
        store.delete_run(twin)


def test_export_summary_follows_the_filters(database):
    at = open_app(database.sweep_id, "pages/export.py")
    assert metric(at, "n_problems") == "24"
    labels = {b.label for b in at.download_button}
    assert {"Summary stats (JSON)", "Scores (JSON)", "results.csv", "results.parquet", "report.md"} <= labels
    steps, count = max(database.difficulties.items())
    at.multiselect(key="export_difficulty").set_value([steps]).run()
    assert metric(at, "n_problems") == str(count)


def test_progress_of_a_finished_run(database):
    at = open_app(database.sweep_id, "pages/progress.py")
    assert metric(at, "Problems") == "24 / 24"
    assert any("Finished" in displayed(s.value) for s in at.success)
    titles = {f["layout"]["title"]["text"] for f in figures(at)}
    assert {"Throughput per batch", "Memory of the process that ran the batch (RSS)",
            "Memory of the sweep's processes together (PSS)", "CPU"} <= titles
    for figure in figures(at):  # every marker inside the plot: filled traces get no autorange padding
        xs, ys = array(figure["data"][0]["x"]), np.array(array(figure["data"][0]["y"]), dtype=float)
        assert figure["layout"]["xaxis"]["range"][1] > max(xs) and figure["layout"]["yaxis"]["range"][1] > np.nanmax(ys)
    assert any("No GPU memory" in displayed(i.value) for i in at.info)
    # One definition of a duration and a rate: the CLI's status page shows the same strings.
    from dashboard import state
    from db import report, status_page
    row = state.open_service(str(database.path.resolve())).store.run_row(database.sweep_id)
    page = status_page.status_markdown(state.open_service(str(database.path.resolve())).store, database.sweep_id)
    elapsed, rate = metric(at, "Elapsed"), metric(at, "Throughput")
    assert elapsed == report.duration(row["elapsed_s"]) and f"time sweeping: {elapsed};" in page
    assert rate.endswith(" /h") and f"throughput: {rate[:-3]} problems/hour" in page


@pytest.mark.parametrize("status, shown", [("failed", "Failed after 0 of 5 problems: CUDA out of memory (test)"),
                                           ("interrupted", "Interrupted after 0 of 5 problems"),
                                           ("stopped", "Stopped after 0 of 5 problems")])
def test_progress_explains_how_a_run_ended_and_empty_runs_say_so(database, tiny_reasoner, status, shown):
    from dashboard import state
    store = state.open_service(str(database.path.resolve())).store
    config = SweepConfig(model=str(database.model_dir), limit=5, schemes=("prefix",))
    run_id = Sweep.create(store, tiny_reasoner, config)
    store.update_run(run_id, status=status, error="CUDA out of memory (test)" if status == "failed" else None)
    try:
        at = open_app(run_id, "pages/progress.py")
        ended = [displayed(e.value) for e in [*at.error, *at.warning]]
        assert any(shown in e for e in ended), ended
        assert not next(b for b in at.button if b.label == f"Resume run #{run_id}").disabled
        at.switch_page("pages/importance.py").run()
        assert any("no stored results yet" in displayed(i.value) for i in at.info) and not at.get("plotly_chart")
    finally:
        store.delete_run(run_id)


def test_run_list_edits_notes_and_tags(database):
    at = open_app(database.sweep_id)
    runs = at.data_editor[0].value
    row = list(runs["id"]).index(database.sweep_id)
    at.session_state["runs_editor"] = {"edited_rows": {row: {"notes": "looks cumulative", "tags": "tiny , demo"}},
                                       "added_rows": [], "deleted_rows": []}
    at.run()
    save = next(b for b in at.button if b.label.startswith("Save"))
    save.click().run()
    assert not at.exception
    from dashboard import state
    stored = state.open_service(str(database.path.resolve())).store.run_row(database.sweep_id)
    assert (stored["notes"], stored["tags"]) == ("looks cumulative", "tiny, demo")


def test_invalid_options_are_explained_and_start_nothing(database):
    at = open_app(database.sweep_id)
    before = len(at.data_editor[0].value)
    at.multiselect(key="methods").set_value([]).run()
    errors = [displayed(e.value) for e in at.error]
    assert any("method" in e for e in errors), errors
    start = next(b for b in at.button if b.label == "Start")
    assert start.disabled
    at.multiselect(key="methods").set_value(["zero"]).run()
    at.radio(key="dataset_choice").set_value("GSM8K .jsonl file").run()
    at.text_input(key="dataset_path").input(str(database.path.parent / "missing.jsonl")).run()
    assert any("no such file" in displayed(e.value) for e in at.error)
    assert next(b for b in at.button if b.label == "Start").disabled
    at.radio(key="model_choice").set_value("Local CODI checkpoint").run()
    at.text_input(key="model_path").input(str(database.path.parent)).run()  # a folder, but no checkpoint
    next(b for b in at.button if b.label == "Load model").click().run()
    assert any(displayed(e.value).startswith("Model not loaded:") for e in at.error) and not at.exception
    assert len(at.data_editor[0].value) == before


def test_a_validation_subset_that_holds_fewer_than_asked_is_warned_before_start(database, gsm8k_path):
    """The CLI's warning (tests/test_cli.py), the same line, on the Run page; the run may still start."""
    at = open_app(database.sweep_id)
    at.radio(key="dataset_choice").set_value("GSM8K .jsonl file").run()
    at.text_input(key="dataset_path").input(str(gsm8k_path)).run()
    at.number_input(key="limit").set_value(20).run()
    assert not [w.value for w in at.warning if "Validation" in displayed(w.value)]
    at.number_input(key="validation").set_value(30).run()
    warnings = [displayed(w.value) for w in at.warning if "Validation" in displayed(w.value)]
    assert warnings == ["Validation: a validation subset of 30 holds 19 problem(s) (by solution steps 1-2: 5, 3-4: "
                        "10, 5+: 4): each difficulty bucket gives at most an equal share (10), and some have fewer."]
    assert not next(b for b in at.button if b.label == "Start").disabled
    at.number_input(key="validation").set_value(12).run()
    assert not [w.value for w in at.warning if "Validation" in displayed(w.value)]


def test_the_seed_preset_sets_prefix_zero_at_mid_depth(database):
    at = open_app(database.sweep_id)
    at.radio(key="model_choice").set_value("Local CODI checkpoint").run()
    at.text_input(key="model_path").input(str(database.model_dir)).run()
    preset = next(b for b in at.button if b.label == "Old script's setup")
    assert "prefix scheme" in preset.help and "zeroing" in preset.help and "block 8" in preset.help
    preset.click().run()
    assert not at.exception
    assert at.multiselect(key="schemes").value == ["prefix"] and at.multiselect(key="methods").value == ["zero"]
    assert (at.radio(key="site_kind").value, at.number_input(key="site_layer").value) == ("residual stream", 1)
    # the tiny GPT-2 has 2 blocks: not Llama, so the middle
    assert any("resid:1" in displayed(i.value) for i in at.info)
    assert any(displayed(c.value).startswith("Model loaded: gpt2, 2 blocks") for c in at.caption)


def test_a_second_start_while_a_sweep_runs_is_refused(database):
    from dashboard import state
    first, second = open_app(database.sweep_id), open_app(database.sweep_id)  # two tabs, or a double click
    for at in (first, second):
        at.radio(key="model_choice").set_value("Local CODI checkpoint").run()
        at.text_input(key="model_path").input(str(database.model_dir)).run()
        assert not next(b for b in at.button if b.label == "Start").disabled
    service = state.open_service(str(database.path.resolve()))
    try:
        next(b for b in first.button if b.label == "Start").click().run()  # all 1,200 built-in problems: minutes
        assert any("started" in s.value for s in first.success), {kind: [e.value for e in getattr(first, kind)]
                                                                  for kind in ("error", "warning", "info")}
        assert service.running
        assert next(b for b in first.button if b.label == "Start").disabled
        next(b for b in second.button if b.label == "Start").click().run()
        warnings = [w.value for w in second.warning]
        assert any("already running" in w for w in warnings), warnings
        runs = service.store.query("SELECT count(*) FROM runs")[0][0]
        assert runs == 3  # the module's two and this one
        refusal = state.switch_database(str(database.path.parent / "other.duckdb"))
        assert refusal and "stop it" in refusal
    finally:
        service.stop()
        service.join(timeout=120)
    assert not service.running
    new_id = service.status().run_id
    assert service.store.run_row(new_id)["status"] == "stopped"
    service.store.delete_run(new_id)


def _feedback_then_an_app_rerun():
    """A full run that shows the Start outcome, then reruns the app (as a polling fragment does when the new
    run's status turns 'running' in the same moment), once."""
    import streamlit as st

    from dashboard import state
    state.nothing_taken()
    try:
        state.show_feedback()
        st.session_state.setdefault("reruns", 0)
        if st.session_state["reruns"] == 0:
            st.session_state["reruns"] += 1
            state.rerun_app()
    finally:
        state.nothing_taken()


def test_a_start_outcome_survives_an_app_rerun_in_the_same_run():
    """The second-start test once saw no outcome at all: the fragment's rerun had dropped the popped message."""
    at = AppTest.from_function(_feedback_then_an_app_rerun, default_timeout=30)
    at.session_state["sweep_feedback"] = ("success", "Run #7 started.")
    at.run()
    assert at.session_state["reruns"] == 1
    assert [s.value for s in at.success] == ["Run \\#7 started\\."]  # safe.md escapes punctuation
    at.run()  # the next rerun (a click elsewhere): shown once, not again
    assert not at.success


def test_cached_numbers_follow_the_data_version(database, tiny_reasoner):
    """Pages cache by the run's (done, status): a batch written since is never hidden behind old numbers."""
    import threading

    from dashboard import data, state
    db = str(database.path.resolve())
    store = state.open_service(db).store
    config = SweepConfig(model=str(database.model_dir), limit=8, batch_size=4, schemes=("prefix",))
    run_id = Sweep.create(store, tiny_reasoner, config)
    stop = threading.Event()
    Sweep(store, tiny_reasoner, config, run_id, stop=stop,
          on_progress=lambda p: p.done >= 4 and stop.set()).run()  # stopped after the first batch
    try:
        half = state.version(store.run_row(run_id))
        assert half == (4, "stopped")
        assert data.baseline_accuracy(db, half, Scope(run_id))["n"] == 4
        Sweep(store, tiny_reasoner, config, run_id).run()  # resumed to the end
        full = state.version(store.run_row(run_id))
        assert full == (8, "finished")
        assert data.baseline_accuracy(db, half, Scope(run_id))["n"] == 4  # that key is cached...
        assert data.baseline_accuracy(db, full, Scope(run_id))["n"] == 8  # ...and the new one is fresh
    finally:
        store.delete_run(run_id)


def test_an_empty_database_offers_the_demo(tmp_path, monkeypatch):
    monkeypatch.setenv("THOUGHTSWEEP_DB", str(tmp_path / "empty.duckdb"))
    for page in (None, "pages/importance.py", "pages/progress.py"):
        at = open_app(page=page)
        assert any(b.label == "Run the demo sweep" for b in at.button), page
        assert "No runs yet" in [h.value for h in at.subheader]


def test_a_dataset_upload_is_validated_before_start(database, tmp_path, monkeypatch):
    from dashboard import state, uploads
    monkeypatch.setenv("THOUGHTSWEEP_UPLOADS", str(tmp_path / "kept"))
    at = open_app(database.sweep_id)
    at.radio(key="dataset_choice").set_value("Upload a file").run()
    lines = [json.dumps({"question": "Ann has 2 apples and buys 3. How many?", "answer": "2+3=<<2+3=5>>5\n#### 5"}),
             json.dumps({"question": "Bo has 4 pens and loses 1. How many?", "answer": "4-1=<<4-1=3>>3\n#### 3"}),
             '{"question": "cut off']
    at.file_uploader[0].set_value(("mine.jsonl", "\n".join(lines).encode(), "application/json")).run()
    assert not at.exception
    panel = next(e for e in at.expander if e.label.startswith("Dataset check"))
    assert panel.label == "Dataset check: 2 usable problems, 1 rejected"
    rejected = panel.dataframe[0].value
    assert list(rejected["line"]) == [3] and rejected["reason"].iloc[0]
    start = next(b for b in at.button if b.label == "Start")
    assert start.disabled  # a sweep reads every record: refused now, not after the run exists
    assert any("1 record(s) rejected" in displayed(e.value) for e in at.error)
    at.file_uploader[0].set_value(("mine.jsonl", "\n".join(lines[:2]).encode(), "application/json")).run()
    assert not next(b for b in at.button if b.label == "Start").disabled  # two usable problems can run
    repo = Path(__file__).resolve().parents[1]
    assert not (repo / "uploads").exists() and not (database.path.parent / "uploads").exists()
    assert not (tmp_path / "kept").exists()  # checked, but kept only once a run uses it
    at.text_input(key="run_name").input("my upload").run()
    service = state.open_service(str(database.path.resolve()))
    try:
        next(b for b in at.button if b.label == "Start").click().run()
        service.join(timeout=120)
        assert any("started" in displayed(m.value) for m in at.success), \
            [displayed(m.value) for m in [*at.error, *at.warning]]
        run_id = at.sidebar.selectbox(key="run_id").value
        row = service.store.run_row(run_id)
        assert row["name"] == "my upload" and row["total"] == 2
        assert Path(row["dataset"]).parent == tmp_path / "kept" and Path(row["dataset"]).is_file()
        assert at.text_input(key="run_name").value == ""  # the next run is not named after this one
        assert uploads.uploads_dir() == tmp_path / "kept"
    finally:
        service.store.delete_run(service.status().run_id)


def test_an_upload_maps_its_fields_and_one_without_problems_is_refused(database):
    from dashboard import state
    at = open_app(database.sweep_id)
    runs_before = len(state.open_service(str(database.path.resolve())).store.query("SELECT id FROM runs"))
    at.radio(key="dataset_choice").set_value("Upload a file").run()
    rows = "prompt,target\nAnn has 2 apples and buys 3. How many?,5\nBo has 4 pens and loses 1. How many?,3\n"
    at.file_uploader[0].set_value(("exam.csv", rows.encode(), "text/csv")).run()
    errors = [displayed(e.value) for e in at.error]
    assert any("exam.csv has no field named 'question' or 'answer' (its fields: prompt, target)" in e
               and "Question field" in e for e in errors), errors
    assert not any("thoughtsweep-staging" in e or "/tmp" in e for e in errors)  # no internal path
    assert at.selectbox(key="question_field").options == ["prompt", "target"]
    at.selectbox(key="question_field").set_value("prompt").run()
    at.selectbox(key="answer_field").set_value("target").run()
    assert not at.exception and not at.error
    assert next(e for e in at.expander if e.label.startswith("Dataset check")).label == \
        "Dataset check: 2 usable problems, 0 rejected"
    nothing = b'{"question": "How many?", "answer": "none"}\n{"question": "", "answer": "#### 3"}\n'
    at.file_uploader[0].set_value(("empty.jsonl", nothing, "application/json")).run()
    assert any("no usable problem" in displayed(e.value) for e in at.error), [displayed(e.value) for e in at.error]
    assert next(b for b in at.button if b.label == "Start").disabled  # refused before a run exists
    assert len(state.open_service(str(database.path.resolve())).store.query("SELECT id FROM runs")) == runs_before


def test_importing_the_old_scripts_files_from_the_run_page(database):
    from dashboard import state
    store = state.open_service(str(database.path.resolve())).store
    at = open_app(database.sweep_id)
    uploads = [(name, (SEED_FILES / name).read_bytes(), "application/json") for name in (SCORES, VALIDATION)]
    at.file_uploader(key="seed_files").set_value(uploads).run()
    next(b for b in at.button if b.label == "Import").click().run()
    assert not at.exception
    assert any("Imported as run" in displayed(s.value) for s in at.success)
    new_id = at.sidebar.selectbox(key="run_id").value
    assert new_id not in (database.sweep_id, database.seed_id)
    row = store.run_row(new_id)
    assert (row["name"], row["dataset"], row["model"]) == (f"old script: {SCORES}", SCORES,
                                                           "not recorded (old script)")
    store.delete_run(new_id)
    at.text_input(key="seed_name").input("MECH-02 on Llama, March").run()
    next(b for b in at.button if b.label == "Import").click().run()
    new_id = at.sidebar.selectbox(key="run_id").value
    assert store.run_row(new_id)["name"] == "MECH-02 on Llama, March"
    store.delete_run(new_id)


def test_switching_the_database_file(database, tmp_path):
    from dashboard import state
    at = open_app(database.sweep_id)
    other = tmp_path / "other.duckdb"
    at.sidebar.text_input(key="db_new_path").input(str(other)).run()
    next(b for b in at.sidebar.button if b.label == "Open").click().run()
    try:
        assert state.db_path() == str(other.resolve())
        assert "No runs yet" in [h.value for h in at.subheader]
        at.sidebar.text_input(key="db_new_path").input(str(tmp_path / "notes.txt")).run()
        next(b for b in at.sidebar.button if b.label == "Open").click().run()
        assert any("not a DuckDB file name" in displayed(e.value) for e in at.sidebar.error)
    finally:
        assert state.switch_database(str(database.path)) is None
    assert state.db_path() == str(database.path.resolve())


def _store(database):
    from dashboard import state
    return state.open_service(str(database.path.resolve())).store


def test_runs_table_settings_results_filters_and_selection(database):
    at = open_app(database.sweep_id)
    table = at.dataframe[0].value
    assert {"model", "dataset", "schemes", "methods", "site", "mode", "batch", "device", "seed", "baseline acc.",
            "acc. 95% CI", "flip, all ablated", "flip 95% CI", "minutes", "problems/h"} <= set(table.columns)
    sweep = table[table["id"] == database.sweep_id].iloc[0]
    accuracy = queries.baseline_accuracy(_store(database), Scope(database.sweep_id))
    assert sweep["baseline acc."] == pytest.approx(accuracy["accuracy"])
    assert sweep["acc. 95% CI"] == f"[{100 * accuracy['lo']:.1f}, {100 * accuracy['hi']:.1f}]"
    assert (sweep["schemes"], sweep["methods"], sweep["site"], sweep["mode"]) == \
        ("prefix, single, suffix", "zero", "latent", "recompute")
    assert sweep["device"] == "cpu · float32" and sweep["problems"] == "24 / 24"
    all_ablated = _store(database).query(
        "SELECT avg(flip::DOUBLE) FROM results WHERE run_id = ? AND variant = 'prefix:6/zero/latent/recompute'",
        [database.sweep_id])[0][0]
    assert sweep["flip, all ablated"] == pytest.approx(all_ablated)
    seed = table[table["id"] == database.seed_id].iloc[0]
    assert seed["model"] == "not recorded (old script)" and 0 <= seed["flip, all ablated"] <= 1

    at.multiselect(key="runs_model").set_value(["not recorded (old script)"]).run()
    assert list(at.dataframe[0].value["id"]) == [database.seed_id]
    at.multiselect(key="runs_model").set_value([]).run()
    at.multiselect(key="runs_status").set_value(["finished"]).run()
    assert len(at.dataframe[0].value) == 2
    at.text_input(key="runs_search").input("TINY").run()  # names and notes, any case
    assert list(at.dataframe[0].value["id"]) == [database.sweep_id]
    at.text_input(key="runs_search").input("").run()

    # Rows selected (as the browser sends them): the first is the run every page shows, all go to Compare.
    shown = list(at.dataframe[0].value["id"])
    at.session_state["runs_table"] = {"selection": {"rows": [shown.index(database.sweep_id),
                                                             shown.index(database.seed_id)], "columns": [],
                                                    "cells": []}}
    at.run()
    assert not at.exception
    assert at.sidebar.selectbox(key="run_id").value == database.sweep_id
    at.switch_page("pages/compare.py").run()
    assert [s.run_id for s in at.multiselect(key="compare_sides").value] == [database.sweep_id, database.seed_id]


def test_importance_cards_follow_the_measure(database):
    at = open_app(database.sweep_id, "pages/importance.py")
    labels = [m.label for m in at.metric]
    assert "Flip rate, early latents (0–2)" in labels and "Flip rate: early / late" in labels
    store = _store(database)
    for measure, label in (("harm", "Harm rate (right → wrong)"), ("logprob_drop", "Drop in gold log-prob (nats)")):
        at.segmented_control(key="importance_measure").set_value(measure).run()
        expected = early_late(store, Scope(database.sweep_id, scheme="prefix", method="zero", site="latent",
                                           mode="recompute"), measure)
        shown = metric(at, f"{label}, early latents (0–2)")
        assert shown == (f"{100 * expected['early']:.1f}%" if measure == "harm" else f"{expected['early']:.2f}")
        lo, hi = expected["early_lo"], expected["early_hi"]
        card = next(m for m in at.metric if m.label == f"{label}, early latents (0–2)")  # the interval in sight
        assert card.delta == (f"95% interval [{100 * lo:.1f}, {100 * hi:.1f}]" if measure == "harm" else
                              f"95% interval [{lo:.2f}, {hi:.2f}]")
        assert not any(m.label.startswith("Flip rate") for m in at.metric)
    accuracy = next(m for m in at.metric if m.label == "Baseline accuracy")
    assert re.fullmatch(r"95% interval \[\d+\.\d, \d+\.\d\]", accuracy.delta), accuracy.delta


def test_the_logit_lens_marks_the_ablated_latents(database):
    at = open_app(database.sweep_id, "pages/problems.py")
    at.selectbox(key="lens_variant").set_value("prefix:3/zero/latent/recompute").run()
    lens = figures(at)[-1]
    rows = array(lens["data"][0]["y"])
    assert rows[:4] == ["latent 0 · ablated (zero)", "latent 1 · ablated (zero)", "latent 2 · ablated (zero)",
                        "latent 3"]
    assert len(lens["layout"]["shapes"]) == 3
    assert "the latents this variant replaced (0, 1, 2)" in texts(at)


def test_the_sidebar_shows_the_selected_runs_status(database):
    at = open_app(database.seed_id)
    assert "4 / 4 problems" in at.sidebar.get("progress")[0].proto.text
    at.sidebar.selectbox(key="run_id").set_value(database.sweep_id).run()
    assert "24 / 24 problems" in at.sidebar.get("progress")[0].proto.text


def test_the_demo_button_goes_to_progress(tmp_path, monkeypatch):
    from dashboard import state
    monkeypatch.setenv("THOUGHTSWEEP_DB", str(tmp_path / "demo.duckdb"))
    monkeypatch.setenv("THOUGHTSWEEP_DEMO_LIMIT", "8")
    at = open_app()
    next(b for b in at.button if b.label == "Run the demo sweep").click().run()
    service = state.open_service(str((tmp_path / "demo.duckdb").resolve()))
    service.join(timeout=300)
    assert not at.exception
    assert at.title[0].value == "Progress"
    assert service.store.run_row(1)["total"] == 8


def test_checkpoint_options_on_the_run_page_reach_the_loaded_model(database):
    """The Run page's checkpoint options go into the model spec; the loaded model and the selected run show theirs."""
    at = open_app(database.sweep_id)
    captions = [displayed(c.value) for c in at.caption]
    assert any(c.startswith(f"Run #{database.sweep_id} checkpoint options: num_latent=6 (codi_config.json)")
               for c in captions), captions
    at.radio(key="model_choice").set_value("Local CODI checkpoint").run()
    at.text_input(key="model_path").input(str(database.model_dir)).run()
    at.number_input(key="num_latent").set_value(3).run()
    at.selectbox(key="merge_lora").set_value("no").run()
    at.selectbox(key="remove_eos").set_value("no").run()
    next(b for b in at.button if b.label == "Load model").click().run()
    assert not at.exception, [e.message for e in at.exception]
    loaded = [displayed(c.value) for c in at.caption if displayed(c.value).startswith("Checkpoint options:")]
    assert loaded and "num_latent=3 (given)" in loaded[0] and "remove_eos=False (given)" in loaded[0], loaded
    assert "merge_lora=False (given)" in loaded[0] and "lora_alpha=32.0 (codi_config.json)" in loaded[0]
    assert any("3 latents" in displayed(c.value) for c in at.caption)
