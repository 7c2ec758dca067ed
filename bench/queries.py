"""Every dashboard query on a lab-sized database: `python bench/queries.py [--json] [--runs 20]`.

Builds a DuckDB file with many runs of 10,000 problems x 8 variants (>= 1.5 million result rows,
written through the product's own `Store` write path, synthetic but with realistic flip rates
that grow with difficulty and k), then times each query the pages run against one run in the
middle of the file: median of --repeats calls, cold caches aside. Target: every median under
300 ms on a 2-core CPU, so pages stay instant when a lab keeps months of runs in one file.
The export page's downloads (built only when clicked) are timed too, and reported apart.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from db import exports, figures, queries, report, seed  # noqa: E402
from db.scope import Scope  # noqa: E402
from db.store import Store  # noqa: E402

T = 6


def synthetic_run(store: Store, n_problems: int, rng: np.random.Generator) -> int:
    variants = [("baseline", 0, "none")] + [("prefix", k, "zero") for k in range(1, T + 1)] + [("single", 2, "zero")]
    run_id = store.create_run(name="synthetic", model="default", dataset="builtin", config={"synthetic": True},
                              num_latent=T, n_variants=len(variants), total=n_problems, status="finished")
    ids = [f"p{i:05d}" for i in range(n_problems)]
    difficulty = rng.integers(1, 9, n_problems)
    store.insert_problems(run_id, pd.DataFrame({
        "problem_id": ids, "ord": np.arange(n_problems), "question": [f"Question {i} about apples?" for i in range(n_problems)],
        "gold": "7", "gold_value": 7.0, "difficulty": difficulty, "solution": "",
        "phase": np.where(np.arange(n_problems) < 100, "validation", "full")}))
    base_correct = rng.random(n_problems) < 0.8
    base_lp = -rng.exponential(0.5, n_problems)
    frames = []
    for scheme, k, method in variants:
        p_wrong = 0.0 if scheme == "baseline" else np.clip(0.05 * k * difficulty / 4, 0, 0.95)
        correct = base_correct & (rng.random(n_problems) >= p_wrong)
        lp = base_lp - (0 if scheme == "baseline" else rng.exponential(0.3 * k, n_problems))
        frames.append(pd.DataFrame({
            "problem_id": ids, "variant": f"{scheme}:{k}/{method}/latent/recompute", "scheme": scheme, "k": k,
            "method": method, "site": "latent", "mode": "recompute",
            "answer_text": np.where(correct, "The answer is: 7", "The answer is: 8"),
            "answer_value": np.where(correct, 7.0, 8.0), "extraction": "codi", "correct": correct,
            "changed": correct != base_correct, "flip": correct != base_correct, "harm": base_correct & ~correct,
            "help": ~base_correct & correct, "gold_logprob": lp, "logprob_drop": base_lp - lp, "lens": None}))
    store.write_batch(run_id, pd.concat(frames, ignore_index=True), done=n_problems)
    return run_id


def page_queries(store: Store, run_id: int, other: int) -> dict:
    """The calls the dashboard pages make for one run, named by page."""
    f = Scope(run_id)
    hard, prefix = f.replace(difficulties=(5, 6, 7, 8)), f.replace(scheme="prefix")
    return {
        "run.runs": lambda: queries.runs(store),
        "sidebar.latest_run_id": lambda: queries.latest_run_id(store),
        "importance.variant_groups": lambda: queries.variant_groups(store, run_id),
        "importance.baseline_accuracy": lambda: queries.baseline_accuracy(store, f),
        "importance.flip_curve": lambda: figures.position_curve(store, f, "flip"),
        "importance.flip_curve_filtered": lambda: figures.position_curve(store, hard, "flip"),
        "importance.logprob_drop_curve": lambda: figures.position_curve(store, f, "logprob_drop"),
        "importance.early_late": lambda: figures.early_late(store, prefix),
        "difficulty.by_steps": lambda: figures.difficulty_table(store, prefix, by="steps"),
        "difficulty.by_bucket": lambda: figures.difficulty_table(store, prefix, by="bucket"),
        "difficulty.named_figures": lambda: figures.named_figures(store, prefix, by="steps"),
        "difficulty.heatmap": lambda: figures.difficulty_heatmap(store, prefix, "flip"),
        "problems.table": lambda: queries.problems_table(store, f, any_flip=True, search="apples"),
        "problems.table_sql_fragment": lambda: queries.problems_table(store, f, search="'; DROP TABLE x --"),
        "problems.detail": lambda: queries.problem_detail(store, run_id, "p00042"),
        "progress.metrics": lambda: queries.metrics(store, run_id),
        "progress.latest_results": lambda: queries.latest_results(store, run_id, 20),
        "compare.two_runs": lambda: figures.compare(store, prefix, Scope(other, scheme="prefix")),
        "compare.phases": lambda: figures.compare(store, prefix.replace(phase="validation"), prefix),
        "export.seed_summary": lambda: (figures.old_script_summary(store, prefix.group("prefix", "zero", "latent",
                                                                                       "recompute")),
                                        queries.baseline_accuracy(store, f.replace(phase="validation"))),
    }


def download_builders(store: Store, run_id: int) -> dict:
    """What the export page builds when a download button is clicked (never on page load)."""
    scope = Scope(run_id, scheme="prefix", method="zero", site="latent", mode="recompute")
    return {
        "download.seed_scores_json": lambda: json.dumps(seed.seed_documents(
            store, scope, names=(seed.SCORES,))[seed.SCORES], indent=2),
        "download.results_csv": lambda: exports.results_csv(store, Scope(run_id)),
        "download.results_parquet": lambda: exports.results_parquet(store, Scope(run_id)),
        "download.report_md": lambda: report.markdown_report(store, run_id),
        "download.stats_json": lambda: json.dumps(report.stats_json(store, run_id), indent=2),
    }


def medians(calls: dict, repeats: int) -> dict:
    found = {}
    for name, call in calls.items():
        call()  # first call: DuckDB loads the row groups it needs
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            call()
            times.append((time.perf_counter() - t) * 1000)
        found[name] = round(statistics.median(times), 1)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--problems", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--db", default=None, help="keep the generated file here (default: a temp folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    folder = tempfile.TemporaryDirectory()
    path = Path(args.db) if args.db else Path(folder.name) / "lab.duckdb"
    store = Store(path)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    if not store.query("SELECT count(*) FROM runs")[0][0]:
        for _ in range(args.runs):
            synthetic_run(store, args.problems, rng)
    built = time.perf_counter() - started
    rows = store.query("SELECT count(*) FROM results")[0][0]
    run_ids = [r[0] for r in store.query("SELECT id FROM runs ORDER BY id")]
    target, other = run_ids[len(run_ids) // 2], run_ids[0]
    pages = medians(page_queries(store, target, other), args.repeats)
    downloads = medians(download_builders(store, target), args.repeats)
    result = {"queries": pages, "max_median_ms": max(pages.values()), "downloads": downloads, "rows": rows,
              "runs": len(run_ids), "build_s": round(built, 1)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{rows:,} result rows in {len(run_ids)} runs (built in {built:.0f} s); medians of {args.repeats}:")
        for name, ms in pages.items():
            print(f"  {name:34} {ms:8.1f} ms{'  over 300 ms' if ms > 300 else ''}")
        print(f"max median {result['max_median_ms']:.1f} ms (target: every page query under 300 ms)")
        print("downloads, built when their button is clicked:")
        for name, ms in downloads.items():
            print(f"  {name:34} {ms:8.1f} ms")
    store.close()


if __name__ == "__main__":
    main()
