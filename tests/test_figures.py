"""One definition of every figure: the Difficulty page, the Markdown report, `stats --json` and the exported
summary show the same named figures; an imported old run keeps its own position semantics.

The module's database: the dashboard's demo sweep (the embedded model, 120 built-in problems x 19
variants, 30 of them a validation subset) and the hand-made old-script trio of tests/fixtures/seed.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard.state import demo_config
from db import exports, report, seed
from db.figures import FIGURES
from db.scope import Scope
from db.store import Store
from runner.sweep import Sweep

APP = Path(__file__).resolve().parents[1] / "app.py"
FIXTURES = Path(__file__).parent / "fixtures" / "seed"
OLD, LATENT = (FIGURES[name][0] for name in ("old_script_early_late", "per_latent_early_late"))
OLD_KEYS = ("early_importance", "late_importance", "pattern_validated")  # the old script's summary keys


@pytest.fixture(scope="module")
def database(tmp_path_factory, default_reasoner):
    path = tmp_path_factory.mktemp("figures") / "demo.duckdb"
    store = Store(path)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("THOUGHTSWEEP_DEMO_LIMIT", raising=False)
        config = demo_config()
    demo = Sweep.create(store, default_reasoner, config)
    assert Sweep(store, default_reasoner, config, demo).run() == "finished"
    old = seed.import_seed(store, FIXTURES / seed.SCORES, FIXTURES / seed.VALIDATION, name="old results")
    store.close()  # the dashboard opens it through its own cached Store
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("THOUGHTSWEEP_DB", str(path))
        yield {"path": path, "demo": demo, "old": old}


@pytest.fixture
def store(database):
    """The dashboard's own Store of the file (one process holds a DuckDB file through one connection)."""
    from dashboard import state
    return state.open_service(str(database["path"].resolve())).store


def open_page(run_id: int, page: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=180).run()
    at.sidebar.selectbox(key="run_id").set_value(run_id).run()
    at.switch_page(page).run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    return "\n".join(str(e.value) for kind in ("markdown", "caption", "info", "warning") for e in getattr(at, kind))


def report_table(text: str, after: str) -> dict[str, list[str]]:
    """The first Markdown table after the heading `after`, as {first cell: the other cells}."""
    lines = text[text.index(after):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_page_report_stats_and_exported_summary_agree(database, store, tmp_path):
    demo = database["demo"]
    at = open_page(demo, "pages/difficulty.py")
    page = at.dataframe[0].value.set_index("steps")
    columns = [c for c in page.columns if c.startswith(OLD)] + [c for c in page.columns if c.startswith(LATENT)]
    assert len(columns) == 6 and columns == list(page.columns[2:]), page.columns  # each under its own name
    assert OLD in texts(at) and FIGURES["old_script_early_late"][1] in texts(at)
    heatmap = json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]
    assert list(heatmap["x"]) == ["0", "0–1", "0–2", "0–3", "0–4", "0–5"]  # what each prefix k's rows ablated

    text = report.markdown_report(store, demo)
    named = report_table(text, "## Named early/late figures")
    summary = json.loads(next(p for p in exports.export(store, demo, "seed-json", tmp_path)
                              if p.name == seed.SUMMARY).read_text())
    stats = report.stats_json(store, demo)["extras"]["figures"]
    assert stats["old_script_early_late"]["name"] == OLD and stats["per_latent_early_late"]["name"] == LATENT
    latent = {str(r["difficulty"]): r["per_latent_early_late"] for r in stats["per_latent_early_late"]["steps"]}
    old = {str(r["difficulty"]): r["old_script_early_late"] for r in stats["old_script_early_late"]["steps"]}

    assert set(map(str, page.index)) == set(named) == set(summary["by_difficulty"]) == set(old) == set(latent)
    for steps, row in page.iterrows():
        mine, cells, shown = summary["by_difficulty"][str(steps)], named[str(steps)], list(row.iloc[2:])
        figure = old[str(steps)]
        assert {k: figure[k] for k in OLD_KEYS} == {k: mine[k] for k in OLD_KEYS}  # the old script's own values
        for side in ("early", "late"):  # with the interval the old script did not give
            assert figure[f"{side}_importance_lo"] <= mine[f"{side}_importance"] <= figure[f"{side}_importance_hi"]
        expected = [report.ci(mine["early_importance"], figure["early_importance_lo"], figure["early_importance_hi"]),
                    report.ci(mine["late_importance"], figure["late_importance_lo"], figure["late_importance_hi"]),
                    "yes" if mine["pattern_validated"] else "no",
                    report.ci(latent[str(steps)]["early"], latent[str(steps)]["early_lo"],
                              latent[str(steps)]["early_hi"]),
                    report.ci(latent[str(steps)]["late"], latent[str(steps)]["late_lo"], latent[str(steps)]["late_hi"])]
        assert shown[:5] == expected == cells[1:6], steps  # page, report, stats --json and exported summary
        assert str(row["problems"]) == cells[0] == str(mine["n_problems"])


def test_a_filter_moves_page_and_exported_summary_alike(database, store):
    demo = database["demo"]
    at = open_page(demo, "pages/difficulty.py")
    at.selectbox(key="difficulty_correct").set_value("baseline right").run()
    page = at.dataframe[0].value.set_index("steps")
    group = Scope(demo, baseline_correct=True, scheme="prefix", method="zero", site="latent", mode="recompute")
    summary = seed.seed_documents(store, group, names=(seed.SUMMARY,))[seed.SUMMARY]
    for steps, row in page.iterrows():
        mine = summary["by_difficulty"][str(steps)]
        early, late, validated = row.iloc[2:5]
        assert early.startswith(f"{mine['early_importance']:.3f} [")  # with its interval
        assert late.startswith(f"{mine['late_importance']:.3f} [")
        assert validated == ("yes" if mine["pattern_validated"] else "no")
        assert int(row["problems"]) == mine["n_problems"]


def test_imported_old_results_keep_the_old_scripts_figures_under_its_name(database, store):
    old = database["old"]
    expected = json.loads((FIXTURES / seed.SUMMARY).read_text())["by_difficulty"]
    stats = report.stats_json(store, old)["extras"]
    figure = stats["figures"]["old_script_early_late"]
    assert figure["name"] == OLD and stats["run"]["positions"] == "old-script"
    found = {str(r["difficulty"]): r["old_script_early_late"] for r in figure["steps"]}
    assert {d: {k: f[k] for k in OLD_KEYS} for d, f in found.items()} == {d: {k: v[k] for k in OLD_KEYS}
                                                                           for d, v in expected.items()}
    assert stats["figures"]["per_latent_early_late"]["group"] is None  # the old script swept no single scheme
    named = report_table(report.markdown_report(store, old), "## Named early/late figures")
    assert {d: cells[1:4] for d, cells in named.items()} == {
        d: [report.ci(v["early_importance"], found[d]["early_importance_lo"], found[d]["early_importance_hi"]),
            report.ci(v["late_importance"], found[d]["late_importance_lo"], found[d]["late_importance_hi"]),
            "yes" if v["pattern_validated"] else "no"] for d, v in expected.items()}
    at = open_page(old, "pages/difficulty.py")
    page = at.dataframe[0].value.set_index("steps")
    assert {str(d): list(r.iloc[2:5]) for d, r in page.iterrows()} == {d: c[1:4] for d, c in named.items()}


def test_an_old_run_is_not_drawn_on_a_sweeps_axis_as_if_equal(database):
    at = open_page(database["old"], "pages/importance.py")
    assert "numbers positions the old script's way" in texts(at) and "BOT" in texts(at)
    at = open_page(database["demo"], "pages/importance.py")
    assert "old script's way" not in texts(at)

    from dashboard.comparison import Side
    at = open_page(database["demo"], "pages/compare.py")
    at.multiselect(key="compare_sides").set_value(
        [Side(database["demo"], "prefix", "zero", "latent", "recompute"),
         Side(database["old"], "prefix", "zero", "latent", "recompute")]).run()
    assert not at.exception, [e.message for e in at.exception]
    assert "Positions differ in meaning" in texts(at) and "BOT" in texts(at)
    assert "positions" in at.text[0].value  # a setting that differs, named in the legend
    table = at.dataframe[0].value
    assert set(table["first − this (shared)"]) <= {"positions differ in meaning", "only in the first"}
    assert (table["excludes 0"] == "–").all()
    chart = json.loads(at.get("plotly_chart")[0].proto.spec)
    names = [t["name"] for t in chart["data"] if t.get("mode") == "lines+markers"]
    assert "latent positions" in names[0] and "the old script's positions" in names[1]
    assert not [t for t in chart["data"] if t.get("mode") == "markers"]  # no difference drawn
