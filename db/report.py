"""What leaves the database for people: CSV/Parquet exports, the experiment report, the live status page.

Files are written only under the `out_dir` given, with names from `EXPORT_NAMES`; `out_dir` is
created if missing. Numbers come from db/queries.py, so the report, the dashboard and
`stats --json` never disagree.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pyarrow
import pyarrow.compute
import pyarrow.csv
import pyarrow.parquet

from db import files, queries
from db.queries import Curve, Filters
from db.seed import export_seed

EXPORT_NAMES = ("results.csv", "results.parquet", "report.md")
FORMATS = ("seed-json", "csv", "parquet", "markdown")
EXPORT_COLUMNS = ("run_id", "problem_id", "difficulty", "phase", "variant", "scheme", "k", "method", "site", "mode",
                  "answer_text", "answer_value", "extraction", "correct", "changed", "flip", "harm", "help",
                  "gold_logprob", "logprob_drop", "gold", "baseline_correct", "prefix_value", "tokens")


def _target(out_dir, name: str) -> Path:
    """out_dir/name for a fixed export name; refuses any name that could leave out_dir."""
    if "/" in name or "\\" in name or ".." in name or name not in EXPORT_NAMES:
        raise ValueError(f"export name {name!r} is not one of {', '.join(EXPORT_NAMES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out / name


def results_table(store, run_id: int, filters: Filters = Filters()) -> pyarrow.Table:
    """One row per (problem, variant) in scope, in run order, baseline first: what the CSV/Parquet exports hold.

    An Arrow table straight from DuckDB: three times faster than a DataFrame, and both writers take it.
    """
    table = store.query_arrow(
        f"WITH {queries.SCOPE} SELECT r.run_id, r.problem_id, s.difficulty, s.phase, r.variant, r.scheme, r.k, "
        f"r.method, r.site, r.mode, r.answer_text, r.answer_value, r.extraction, r.correct, r.changed, r.flip, "
        f"r.harm, r.help, r.gold_logprob, r.logprob_drop, s.gold, s.baseline_correct, r.prefix_value, r.tokens "
        f"FROM results r JOIN scope s USING (problem_id) WHERE r.run_id = ? "
        f"ORDER BY s.ord, {queries.SCHEME_ORDER}, r.method, r.site, r.mode, r.k",
        [*queries.scope_params(run_id, filters), run_id])
    assert tuple(table.column_names) == EXPORT_COLUMNS, f"export columns {table.column_names} != EXPORT_COLUMNS"
    return table


def results_csv(store, run_id: int, filters: Filters = Filters(), sink=None, raw: bool = False):
    """results.csv into `sink` (a path), or as bytes when no sink is given. Booleans are written true/false.

    Text cells a spreadsheet would run as formulas are neutralised (db/files.py) unless `raw`.

    pyarrow's writer: pandas' to_csv takes seconds on a 50k-row run.
    """
    table = results_table(store, run_id, filters)
    # CSV has no lists: the generated ids as one cell of space-separated integers ("" for rows without).
    tokens = pyarrow.compute.binary_join(pyarrow.compute.cast(table["tokens"], pyarrow.list_(pyarrow.string())), " ")
    table = table.set_column(table.column_names.index("tokens"), "tokens", tokens)
    return _write(pyarrow.csv.write_csv, table if raw else files.neutralise_formulas(table), sink)


def results_parquet(store, run_id: int, filters: Filters = Filters(), sink=None):
    """results.parquet (the CSV's columns, typed) into `sink` (a path), or as bytes when no sink is given."""
    return _write(pyarrow.parquet.write_table, results_table(store, run_id, filters), sink)


def _write(writer, table: pyarrow.Table, sink):
    if sink is not None:
        return writer(table, str(sink))
    buffer = pyarrow.BufferOutputStream()
    writer(table, buffer)
    return buffer.getvalue().to_pybytes()


def export_csv(store, run_id: int, out_dir, filters: Filters = Filters(), name: str = "results.csv",
               raw: bool = False) -> Path:
    """Write results.csv (columns EXPORT_COLUMNS) into out_dir, whole or not at all (db/files.py)."""
    return files.write_bytes(_target(out_dir, name), results_csv(store, run_id, filters, raw=raw))


def export_parquet(store, run_id: int, out_dir, filters: Filters = Filters(), name: str = "results.parquet") -> Path:
    """Write results.parquet (same columns as the CSV) into out_dir."""
    return files.write_bytes(_target(out_dir, name), results_parquet(store, run_id, filters))


def export_markdown(store, run_id: int, out_dir, name: str = "report.md") -> Path:
    """Write the experiment report into out_dir."""
    return files.write_text(_target(out_dir, name), markdown_report(store, run_id))


def export(store, run_id: int, fmt: str, out_dir, filters: Filters = Filters(), raw: bool = False) -> list[Path]:
    """`runner export --format FMT`: the files written for one of FORMATS (seed-json: the whole run, no filters)."""
    if fmt == "seed-json":
        return export_seed(store, run_id, out_dir)
    if fmt == "csv":
        return [export_csv(store, run_id, out_dir, filters, raw=raw)]
    if fmt == "parquet":
        return [export_parquet(store, run_id, out_dir, filters)]
    if fmt == "markdown":
        return [export_markdown(store, run_id, out_dir)]
    raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")


# --- formatting -------------------------------------------------------------------------------------
def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _ci(value, lo, hi, digits: int = 3) -> str:
    if _missing(value):
        return "–"
    interval = "" if _missing(lo) or _missing(hi) else f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return f"{value:.{digits}f}{interval}"


def _duration(seconds) -> str:
    if _missing(seconds):
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _ablated(scheme: str, k: int, num_latent: int) -> str:
    """Which latent positions a variant replaces (DESIGN.md section 3), for table rows."""
    if scheme == "prefix":
        return "0" if k == 1 else f"0–{k - 1}"
    if scheme == "single":
        return str(k)
    if scheme == "suffix":
        return str(k) if k == num_latent - 1 else f"{k}–{num_latent - 1}"
    return f"none (EOT after {k} latents)"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def _run(store, run_id: int) -> dict:
    run = store.run_row(run_id)
    if run is None:
        raise ValueError(f"no run {run_id} in {store.path}")
    return {k: None if not isinstance(v, (dict, list)) and pd.isna(v) else v for k, v in run.items()}  # NaN -> None


# --- the experiment report ------------------------------------------------------------------------------
def markdown_report(store, run_id: int) -> str:
    """An experiment report to paste into a journal: setup, baseline, per-position effects, difficulty, early/late."""
    run = _run(store, run_id)
    config = json.loads(run["config"]) if isinstance(run["config"], str) else dict(run["config"] or {})
    T = int(run["num_latent"])
    out = [f"# ThoughtSweep run {run_id}: {run['name']}", "",
           f"{run['created']:%Y-%m-%d %H:%M} · status **{run['status']}** · {run['done']}/{run['total']} problems · "
           f"source {run['source']}", "", "## Setup", ""]
    setup = [["model", run["model"]], ["dataset", run["dataset"]], ["latents (T)", T],
             ["variants per problem", run["n_variants"]], ["device", run["device"] or "–"],
             ["batch size", run["batch_size"] or "–"], ["time sweeping", _duration(run["elapsed_s"])]]
    shown = {"model", "dataset", "device", "batch_size"}  # already in the rows above
    setup += [[key, value if isinstance(value, (str, int, float)) else json.dumps(value)]
              for key, value in config.items() if key not in shown and value not in (None, [], ())]
    out += _table(["setting", "value"], setup)

    stats = queries.stats_json(store, run_id)
    extras = stats["extras"]
    out += ["## Baseline accuracy", ""]
    for label, acc in (("all problems", extras["baseline_accuracy"]),
                       ("validation subset", extras["baseline_accuracy_validation"])):
        if acc["n"]:
            out.append(f"- {label}: {acc['correct']}/{acc['n']} = {_ci(acc['accuracy'], acc['lo'], acc['hi'])} "
                       f"(95% Wilson)")
    out.append("")

    out += ["## Effect of ablating latent positions", ""]
    for g in extras["groups"]:
        out += [f"### {g['scheme']} · {g['method']} · {g['site']} · {g['mode']}", ""]
        rows = [[p["k"], _ablated(g["scheme"], p["k"], T), p["n"],
                 *(_ci(p[m]["value"], p[m]["lo"], p[m]["hi"]) for m in queries.MEASURES)] for p in g["positions"]]
        out += _table(["k", "ablated", "n", "flip", "harm", "help", "changed", "Δ gold log-prob"], rows)

    if stats["position_importance"]:
        out += ["Seed-format summary (position 0 = baseline, position p = prefix k = p): "
                + ", ".join(f"{p}: {v:.3f}" for p, v in stats["position_importance"].items()), ""]

    wanted = extras["summary_group"]
    chosen = next((g for g in extras["groups"] if all(g[key] == wanted[key] for key in wanted)),
                  extras["groups"][0] if extras["groups"] else None)
    if chosen:
        out += [f"## By difficulty ({chosen['scheme']} · {chosen['method']} · {chosen['site']} · {chosen['mode']})",
                ""]
        for by, key, label in (("steps", "difficulty", "steps"), ("bucket", "bucket", "bucket")):
            out += _table([label, "n", "baseline accuracy", f"early (0–{T // 2 - 1})", f"late ({T // 2}–{T - 1})",
                           "early/late"],
                          [["unknown" if r[key] == -1 else r[key], r["n"],
                            _ci(r["accuracy"], r["accuracy_lo"], r["accuracy_hi"]),
                            _ci(r.get("early"), r.get("early_lo"), r.get("early_hi")),
                            _ci(r.get("late"), r.get("late_lo"), r.get("late_hi")),
                            _ci(r.get("ratio"), r.get("ratio_lo"), r.get("ratio_hi"), 2)]
                           for r in chosen["by_difficulty"][by]])

    out += ["## Early vs late positions", ""]
    rows = [[f"{g['scheme']} · {g['method']} · {g['site']} · {g['mode']}", g["early_late"].get("n", 0),
             *(_ci(g["early_late"].get(m), g["early_late"].get(f"{m}_lo"), g["early_late"].get(f"{m}_hi"),
                   2 if m == "ratio" else 3) for m in ("early", "late", "ratio"))] for g in extras["groups"]]
    out += _table(["variant group", "problems", "early", "late", "early/late"], rows)

    out += ["## Notes", "",
            "- flip = baseline correctness differs from the variant's (the seed's importance_score); harm = baseline "
            "right and variant wrong, help = the reverse; rates are over all problems in scope.",
            "- The prefix curve is cumulative by construction: prefix k ablates latents 0..k-1, so it can only "
            "describe how much damage accumulates, not which single latent matters (see the single scheme).",
            f"- Early = latent positions 0..{T // 2 - 1}, late = {T // 2}..{T - 1}; a prefix variant k sits at "
            "position k-1 (the last latent it removes), other schemes at position k. The seed's own summary numbered "
            "positions differently (0 = baseline); `python -m runner stats --json` reports both.",
            "- Intervals are 95%: Wilson score intervals for rates; percentile bootstrap over problems "
            "(1,000 resamples, seed 0) for mean log-prob drops and for early, late and their ratio.",
            "- Exit k = T feeds every latent and equals the baseline; a variant that ablates nothing must reproduce "
            "the baseline exactly.", ""]
    if run["source"] == "import":
        out.insert(-1, "- This run was imported from the seed's JSON files: there are no gold log-probs, and "
                       "answers were re-parsed from the stored text.")
    return "\n".join(out)


# --- the live status page ----------------------------------------------------------------------------
def _phase_rows(store, run_id: int):
    counts = store.query_df(
        "SELECT p.phase, count(*) AS problems, count(b.problem_id) AS done FROM problems p "
        "LEFT JOIN (SELECT problem_id FROM results WHERE run_id = ? AND scheme = 'baseline') b "
        "ON b.problem_id = p.problem_id WHERE p.run_id = ? GROUP BY p.phase", [run_id, run_id])
    spent = store.query_df(
        "SELECT phase, sum(elapsed_s - coalesce(previous, 0)) AS actual_s FROM (SELECT phase, elapsed_s, "
        "lag(elapsed_s) OVER (ORDER BY elapsed_s, t) AS previous FROM run_metrics WHERE run_id = ?) "
        "GROUP BY phase", [run_id])
    return ({r.phase: (int(r.problems), int(r.done)) for r in counts.itertuples()},
            {r.phase: float(r.actual_s) for r in spent.itertuples()})


def status_markdown(store, run_id: int) -> str:
    """A live status page: phases (expected vs actual time), ETA, throughput, memory, validation vs full, controls."""
    run = _run(store, run_id)
    series = queries.metrics(store, run_id)
    last = series.iloc[-1] if len(series) else None
    rate = run["problems_per_hour"] if not _missing(run["problems_per_hour"]) else (
        None if last is None else last["problems_per_hour"])
    rate = None if _missing(rate) or not rate else float(rate)
    per_problem = None if rate is None else 3600.0 / rate
    done, total = int(run["done"]), int(run["total"])
    eta = None if per_problem is None or run["status"] != "running" else (total - done) * per_problem
    out = [f"# Run {run_id}: {run['name']} — {run['status']}" + (f" (phase {run['phase']})" if run["phase"] else ""),
           "", f"- progress: {done}/{total} problems ({100 * done / max(total, 1):.1f}%)",
           f"- time sweeping: {_duration(run['elapsed_s'])}; ETA: {_duration(eta)}"
           + ("" if eta is None else " at the current throughput"),
           f"- throughput: {'–' if rate is None else f'{rate:.0f}'} problems/hour; "
           f"{_duration(per_problem)} per problem ({run['n_variants']} variants each, batch size "
           f"{run['batch_size'] or '–'}, device {run['device'] or '–'})"]
    if run["error"]:
        out.append(f"- error: {run['error']}")
    out += ["", "## Phases", ""]
    counts, spent = _phase_rows(store, run_id)
    order = ["reference"] if "reference" in spent or run["phase"] == "reference" else []
    rows = []
    for phase in order + ["validation", "full"]:
        n, finished = counts.get(phase, (0, 0))
        if phase != "reference" and n == 0:
            continue
        if phase == "reference":
            state = "running" if run["phase"] == "reference" and run["status"] == "running" else "done"
        elif finished >= n:
            state = "done"
        elif run["phase"] == phase:
            state = run["status"]
        else:
            state = "pending" if finished == 0 else run["status"]
        expected = None if phase == "reference" or per_problem is None else n * per_problem
        label = "full (the other problems)" if phase == "full" and "validation" in counts else phase
        rows.append([label, "–" if phase == "reference" else f"{finished}/{n}", _duration(expected),
                     _duration(spent.get(phase)) + (" so far" if state == "running" else ""), state])
    out += _table(["phase", "problems", "expected (current throughput)", "actual", "state"], rows)

    out += ["## Resources", ""]
    if last is None:
        out += ["No batch stored yet.", ""]
    else:
        def mb(value):
            return "–" if _missing(value) else f"{value:,.0f} MB"
        cpu = "" if _missing(last["cpu_pct"]) else f"; CPU {last['cpu_pct']:.0f}%"
        out += [f"- RSS now {mb(last['rss_mb'])}, peak {mb(series['rss_mb'].max())}{cpu}",
                f"- GPU memory now {mb(last['gpu_mem_mb'])}, peak {mb(series['gpu_peak_mb'].max())}",
                f"- batches stored: {len(series)}; last at {last['t']:%H:%M:%S}", ""]

    out += ["## Validation vs full run so far", ""]
    val = queries.baseline_accuracy(store, run_id, Filters(phase="validation"))
    full = queries.baseline_accuracy(store, run_id)
    out += _table(["", "validation", "full so far"],
                  [["problems", val["n"], full["n"]],
                   ["baseline accuracy", _ci(val["accuracy"], val["lo"], val["hi"]),
                    _ci(full["accuracy"], full["lo"], full["hi"])]])
    group = queries.first_group(store, run_id, "prefix")
    if group and val["n"]:
        both = queries.compare(store, Curve(run_id, Filters(phase="validation"), "prefix", *group),
                               Curve(run_id, Filters(), "prefix", *group))
        out += [f"Flip rate, prefix · {' · '.join(group)}:", ""]
        out += _table(["k", "validation", "full so far", "intervals overlap"],
                      [[int(r["k"]), _ci(r["value_a"], r["lo_a"], r["hi_a"]), _ci(r["value_b"], r["lo_b"], r["hi_b"]),
                        "yes" if r["overlap"] else "**no**"] for r in both.to_dict("records")])

    out += ["## Control", ""]
    if run["status"] == "running":
        where = f" on {run['host']}" if run["host"] else ""
        out.append(f"- stop: Ctrl-C in the sweep's terminal, or `kill -INT {run['pid']}`{where} (or Stop in the "
                   "dashboard for a sweep it started); stored batches are kept, the batch in flight is redone "
                   "on resume")
    out.append(f"- resume: `python -m runner sweep --resume {run_id} --db {store.path}`")
    out.append(f"- this page: `python -m runner status --markdown --run {run_id} --db {store.path}`")
    return "\n".join(out) + "\n"
