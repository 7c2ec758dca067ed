"""The Progress page lists the problems a sweep skipped (issue 14 case 8), with the reason, as plain text."""
from __future__ import annotations

import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

from db.store import Store
from runner.sweep import Sweep, SweepConfig

APP = Path(__file__).resolve().parents[1] / "app.py"


def test_the_progress_page_lists_skipped_problems_with_their_reason(tmp_path, tiny_model_dir, tiny_reasoner,
                                                                    monkeypatch):
    dataset = tmp_path / "one_too_long.jsonl"
    records = [{"question": f"Ann has {i} pens and gets {i + 1} more. How many pens does she have?",
                "answer": f"#### {2 * i + 1}"} for i in range(6)]
    records[2]["question"] = "Ann has pens. " * 150 + "How many pens does she have?"  # > the model's 256 positions
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
    path = tmp_path / "skipped.duckdb"
    store = Store(path)
    config = SweepConfig(model=str(tiny_model_dir), dataset=str(dataset), batch_size=4, schemes=("prefix",))
    run_id = Sweep.create(store, tiny_reasoner, config)
    assert Sweep(store, tiny_reasoner, config, run_id).run() == "finished"
    skipped_id = store.run_problems(run_id)[2]["problem_id"]
    store.close()
    monkeypatch.setenv("THOUGHTSWEEP_DB", str(path))
    at = AppTest.from_file(str(APP), default_timeout=180).run()
    at.switch_page("pages/progress.py").run()
    assert not at.exception, [e.message for e in at.exception]
    assert any(m.value == "##### Skipped problems" for m in at.markdown)
    assert any("1 problem(s) the model cannot run" in c.value for c in at.caption)
    table = next(d.value for d in at.dataframe if "reason" in d.value.columns)
    assert list(table["problem_id"]) == [skipped_id]
    assert "too long for the model's 256 positions" in table["reason"].iloc[0]
