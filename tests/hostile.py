"""Hostile database files for the trust-boundary tests: every text a file supplies is a Markdown/HTML payload.

`text_payloads(host)` are the strings; `hostile_text_database` sweeps the tiny CODI model over
problems whose ids, questions and golds carry them, then (as somebody else's copy of a file would)
writes them into the run's name, notes, tags, model, dataset, stored error and its
variants' method names. Every payload points
at `host`: the browser test listens there and counts requests.
"""
from __future__ import annotations

import json
from pathlib import Path

import duckdb

from db.store import Store
from runner.sweep import Sweep, SweepConfig


def text_payloads(host: str) -> dict[str, str]:
    """One payload per way Markdown or HTML could make a browser fetch, or follow, an address."""
    return {"image": f"![x](http://{host}/image.png)", "tag": f"<img src=http://{host}/tag.png>",
            "link": f"[link](http://{host}/link)", "autolink": f"<http://{host}/autolink>",
            "directive": f":red[styled] :material/warning: $x^2$ **bold** http://{host}/bare"}


# Raw fragments that only an unescaped payload contains: a rendered Markdown body holding one is a defect.
def raw_fragments(host: str) -> list[str]:
    return [f"](http://{host}", "<img", f"<http://{host}", ":red[styled]", "**bold**"]


def hostile_text_database(path: Path, model_dir: Path, reasoner, host: str) -> tuple[int, int]:
    """(a finished-then-failed sweep of 6 problems, 2 of them a validation subset, the newest run; an older
    stopped run with no results), payloads everywhere."""
    payloads = list(text_payloads(host).values())
    dataset = path.parent / "hostile.jsonl"
    with dataset.open("w") as out:
        for i in range(6):
            payload = payloads[i % len(payloads)]
            out.write(json.dumps({"id": f"p{i} {payload}", "question": f"Ann has {i + 2} apples {payload}. "
                                  "She eats one. How many are left?", "answer": f"{i + 2} - 1 = {i + 1}\n"
                                  f"#### {i + 1}"}) + "\n")
    store = Store(path)
    empty_id = store.create_run(name=f"empty {payloads[3]}", model=payloads[4], dataset=payloads[0], config={},
                                num_latent=6, n_variants=1, total=3, status="stopped")
    config = SweepConfig(model=str(model_dir), dataset=str(dataset), validation=2, batch_size=4,
                         run_name=f"run {payloads[0]}")
    run_id = Sweep.create(store, reasoner, config)
    assert Sweep(store, reasoner, config, run_id).run() == "finished"
    store.update_run(run_id, notes=f"notes {payloads[1]}", tags=f"tag {payloads[2]}, {payloads[4]}",
                     status="failed", error=f"it broke on {payloads[0]}")
    store.close()
    conn = duckdb.connect(str(path))  # what Store never writes: names that came from another machine
    conn.execute("UPDATE runs SET model = $model, dataset = $dataset WHERE id = $id",
                 {"model": f"model {payloads[0]}", "dataset": f"data {payloads[1]}", "id": run_id})
    conn.execute("UPDATE problems SET gold = gold || ' ' || $payload WHERE run_id = $id",
                 {"payload": payloads[2], "id": run_id})
    conn.execute("UPDATE results SET method = method || ' ' || $payload WHERE run_id = $id AND scheme <> 'baseline'",
                 {"payload": payloads[1], "id": run_id})  # variant names: legends, headings, help, lens labels
    conn.close()
    return run_id, empty_id
