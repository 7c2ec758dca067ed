"""The model card's figures from a sweep's DuckDB file: `python -m runner.toy.figures --db fig.duckdb`.

Reads a finished run of `python -m runner sweep --schemes prefix,single --methods zero` (recompute
mode, site latent) through db.queries, the same queries the dashboard draws, and prints each
figure of models/README.md with its interval (95% Wilson for rates over problems, 95% bootstrap
over problems for the difficulty buckets' early/late means), then the logit-lens readout per
latent position. `--json` prints the same figures as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import re

from db import figures as figures_of
from db import queries
from db.scope import Scope
from db.store import Store

STEP = re.compile(r"<<[^=]*=(-?\d+)>>")
Z = 1.959963984540054


def wilson(x: int, n: int) -> tuple[float, float, float]:
    """x/n and its 95% Wilson score interval (as db.stats.wilson_sql, for counts made in Python)."""
    p, z2 = x / n, Z * Z
    centre, half = p + z2 / (2 * n), Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return p, max(0.0, (centre - half) / (1 + z2 / n)), min(1.0, (centre + half) / (1 + z2 / n))


def lens_readout(store, run_id: int, num_latent: int) -> dict:
    """Per latent position j: share of problems whose baseline top-1 lens token of the state
    producing latent j is the value after step j+1 (the answer once the steps run out), and, over
    problems with at least j+2 steps, the share reading that intermediate (not yet final) value."""
    aligned, inter, inter_n, n = [0] * num_latent, [0] * num_latent, [0] * num_latent, 0
    for problem_id in queries.problems_table(store, Scope(run_id))["problem_id"]:
        detail = queries.problem_detail(store, run_id, problem_id)
        values = [int(v) for v in STEP.findall(detail["problem"]["solution"] or "")]
        baseline = detail["variants"][detail["variants"]["scheme"] == "baseline"]
        if not values or baseline.empty or baseline["lens"].iloc[0] is None:
            continue
        n += 1
        for j, top in enumerate(baseline["lens"].iloc[0][:num_latent]):
            token = top[0][0].strip()
            want = str(values[min(j, len(values) - 1)])
            aligned[j] += token == want
            if j + 1 < len(values):
                inter_n[j] += 1
                inter[j] += token == want
    return {"n": n, "step_value": [a / n if n else None for a in aligned],
            "intermediate": [i / m if m else None for i, m in zip(inter, inter_n)], "intermediate_n": inter_n}


def figures(store, run_id: int) -> dict:
    scope = Scope(run_id, method="zero", site="latent", mode="recompute")
    base = queries.baseline_accuracy(store, scope)
    curves = {}
    for scheme in ("prefix", "single"):
        frame = figures_of.position_curve(store, scope.replace(scheme=scheme), "flip")
        curves[scheme] = [{"k": int(r.k), "flip": r.value, "lo": r.value_lo, "hi": r.value_hi, "n": int(r.n)}
                          for r in frame.itertuples()]
    T = len(curves["prefix"])  # prefix k = 1..T
    # Accuracy with every latent zeroed: baseline accuracy - harm + help of prefix k = T.
    rates = {m: figures_of.position_curve(store, scope.replace(scheme="prefix"), m).set_index("k")
             for m in ("harm", "help")}
    n = base["n"]
    correct = round(base["accuracy"] * n - rates["harm"].loc[T, "value"] * n + rates["help"].loc[T, "value"] * n)
    all_zero = wilson(correct, n)
    single = [c["flip"] for c in curves["single"]]
    buckets = figures_of.difficulty_table(store, scope.replace(scheme="single"), by="bucket")
    by_bucket = {r["bucket"]: {"n": int(r["n"]), "late": r["late"], "late_lo": r["late_lo"], "late_hi": r["late_hi"],
                               "early": r["early"], "early_lo": r["early_lo"], "early_hi": r["early_hi"]}
                 for r in buckets.to_dict("records")}
    heat = figures_of.difficulty_heatmap(store, scope.replace(scheme="single"), "flip")
    return {"run": run_id, "n_problems": n, "baseline": base,
            "all_zero_accuracy": {"value": all_zero[0], "lo": all_zero[1], "hi": all_zero[2], "correct": correct},
            "prefix": curves["prefix"], "single": curves["single"],
            "single_spread": max(single) - min(single), "single_most": single.index(max(single)),
            "single_least": single.index(min(single)), "single_by_bucket": by_bucket,
            "single_heatmap": {int(d): [float(v) for v in row] for d, row in heat.iterrows()},
            "lens": lens_readout(store, run_id, T)}


def markdown(f: dict) -> str:
    pct = lambda v: f"{100 * v:.1f}%"
    span = lambda lo, hi: f"[{100 * lo:.1f}, {100 * hi:.1f}]"
    b, z = f["baseline"], f["all_zero_accuracy"]
    lines = ["| figure | measured | 95% interval |", "|---|---:|---|",
             f"| baseline accuracy ({b['correct']}/{b['n']}) | {pct(b['accuracy'])} | {span(b['lo'], b['hi'])} |",
             f"| accuracy, all {len(f['prefix'])} latents zeroed ({z['correct']}/{b['n']}) | {pct(z['value'])} "
             f"| {span(z['lo'], z['hi'])} |"]
    lines += [f"| prefix flip, k = {c['k']} | {pct(c['flip'])} | {span(c['lo'], c['hi'])} |" for c in f["prefix"]]
    lines += [f"| single flip, latent {c['k']} | {pct(c['flip'])} | {span(c['lo'], c['hi'])} |" for c in f["single"]]
    lines.append(f"| single spread (latent {f['single_most']} - latent {f['single_least']}) "
                 f"| {100 * f['single_spread']:.1f} points | |")
    for bucket, r in f["single_by_bucket"].items():
        lines.append(f"| {bucket}-step problems (n = {r['n']}): single flip, late latents 3-5 | {pct(r['late'])} "
                     f"| {span(r['late_lo'], r['late_hi'])} |")
        lines.append(f"| {bucket}-step problems: single flip, early latents 0-2 | {pct(r['early'])} "
                     f"| {span(r['early_lo'], r['early_hi'])} |")
    lens = f["lens"]
    lines.append("| logit lens top-1 = value after step j+1, j = 0..5 | "
                 + " / ".join(pct(v) for v in lens["step_value"]) + " | |")
    lines.append("| logit lens top-1 = intermediate value (problems with > j+1 steps) | "
                 + " / ".join("-" if v is None else pct(v) for v in lens["intermediate"]) + " | |")
    heat = ["", "Single-position flip rate (zero, recompute) by step count:", "",
            "| steps | " + " | ".join(f"latent {j}" for j in range(len(f["single"]))) + " |",
            "|---:|" + "---:|" * len(f["single"])]
    heat += [f"| {d} | " + " | ".join(pct(v) for v in row) + " |" for d, row in f["single_heatmap"].items()]
    return "\n".join(lines + heat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--run", type=int, default=None, help="default: the latest run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    store = Store(args.db, read_only=True)
    run_id = args.run if args.run is not None else queries.latest_run_id(store)
    found = figures(store, run_id)
    print(json.dumps(found, indent=2, default=float) if args.json else markdown(found))


if __name__ == "__main__":
    main()
