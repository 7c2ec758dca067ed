"""The live status page of a run (`runner status --markdown`, the status file beside the database):
phases with expected vs actual time, ETA, throughput, memory, validation vs full run so far, controls."""
from __future__ import annotations

from db import figures, queries, report
from db.markdown import code, text
from db.scope import Scope


def _phase_rows(store, run_id: int):
    counts = store.query_df(
        "SELECT p.phase, count(*) AS problems, count(b.problem_id) AS done FROM problems p "
        "LEFT JOIN (SELECT problem_id FROM results WHERE run_id = $run AND scheme = 'baseline') b "
        "ON b.problem_id = p.problem_id WHERE p.run_id = $run GROUP BY p.phase", {"run": run_id})
    spent = store.query_df(
        "SELECT phase, sum(elapsed_s - coalesce(previous, 0)) AS actual_s FROM (SELECT phase, elapsed_s, "
        "lag(elapsed_s) OVER (ORDER BY elapsed_s, t) AS previous FROM run_metrics WHERE run_id = $run) "
        "GROUP BY phase", {"run": run_id})
    return ({r.phase: (int(r.problems), int(r.done)) for r in counts.itertuples()},
            {r.phase: float(r.actual_s) for r in spent.itertuples()})


def status_markdown(store, run_id: int) -> str:
    """A live status page: phases (expected vs actual time), ETA, throughput, memory, validation vs full, controls."""
    run = report.run(store, run_id)
    series = queries.metrics(store, run_id)
    last = series.iloc[-1] if len(series) else None
    rate = run["problems_per_hour"] if not report.missing(run["problems_per_hour"]) else (
        None if last is None else last["problems_per_hour"])
    rate = None if report.missing(rate) or not rate else float(rate)
    per_problem = None if rate is None else 3600.0 / rate
    done, total = int(run["done"]), int(run["total"])
    eta = None if per_problem is None or run["status"] != "running" else (total - done) * per_problem
    out = [f"# Run {run_id}: {text(run['name'])} — {text(run['status'])}"
           + (f" (phase {text(run['phase'])})" if run["phase"] else ""),
           "", f"- progress: {done}/{total} problems ({100 * done / max(total, 1):.1f}%)",
           f"- time sweeping: {report.duration(run['elapsed_s'])}; ETA: {report.duration(eta)}"
           + ("" if eta is None else " at the current throughput"),
           f"- throughput: {'–' if rate is None else f'{rate:,.0f}'} problems/hour; "
           f"{report.duration(per_problem)} per problem ({run['n_variants']} variants each, batch size "
           f"{run['batch_size'] or '–'}, device {text(run['device'] or '–')})"]
    skipped = store.skipped_problems(run_id)
    if skipped:
        out.append(f"- skipped: {len(skipped)} problem(s) the model cannot run, left out ("
                   + "; ".join(f"{text(pid)}: {why}" for pid, why in list(skipped.items())[:3])
                   + ("; ..." if len(skipped) > 3 else "") + ")")
    if run["error"]:
        out.append(f"- error: {text(run['error'])}")
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
        rows.append([label, "–" if phase == "reference" else f"{finished}/{n}", report.duration(expected),
                     report.duration(spent.get(phase)) + (" so far" if state == "running" else ""), state])
    out += report.table(["phase", "problems", "expected (current throughput)", "actual", "state"], rows)

    out += ["## Resources", ""]
    if last is None:
        out += ["No batch stored yet.", ""]
    else:
        def mb(value):
            return "–" if report.missing(value) else f"{value:,.0f} MB"
        cpu = "" if report.missing(last["cpu_pct"]) else f"; CPU {last['cpu_pct']:.0f}%"
        measured = series["sweep_pss_mb"].dropna()  # read at most once a second, not every batch
        out += [f"- RSS (the process that ran the batch) now {mb(last['rss_mb'])}, peak "
                f"{mb(series['rss_mb'].max())}{cpu}",
                f"- the sweep's processes together (PSS) now {mb(measured.iloc[-1] if len(measured) else None)}, "
                f"peak {mb(measured.max())}",
                f"- GPU memory now {mb(last['gpu_mem_mb'])}, peak {mb(series['gpu_peak_mb'].max())}",
                f"- batches stored: {len(series)}; last at {last['t']:%H:%M:%S}", ""]

    out += ["## Validation vs full run so far", ""]
    val = queries.baseline_accuracy(store, Scope(run_id, phase="validation"))
    full = queries.baseline_accuracy(store, Scope(run_id))
    out += report.table(["", "validation", "full so far"],
                  [["problems", val["n"], full["n"]],
                   ["baseline accuracy", report.ci(val["accuracy"], val["lo"], val["hi"]),
                    report.ci(full["accuracy"], full["lo"], full["hi"])]])
    group = queries.first_group(store, Scope(run_id, scheme="prefix"))
    if group and val["n"]:
        both = figures.compare(store, group.replace(phase="validation"), group)
        out += [f"Flip rate, {text(' · '.join(group.keys))}:", ""]
        out += report.table(["k", "validation", "full so far", "intervals overlap"],
                      [[int(r["k"]), report.ci(r["value_a"], r["lo_a"], r["hi_a"]),
                        report.ci(r["value_b"], r["lo_b"], r["hi_b"]),
                        "yes" if r["overlap"] else "**no**"] for r in both.to_dict("records")])

    out += ["## Control", ""]
    if run["status"] == "running":
        where = f" on {text(run['host'])}" if run["host"] else ""
        out.append(f"- stop: Ctrl-C in the sweep's terminal, or `kill -INT {run['pid']}`{where} (or Stop in the "
                   "dashboard for a sweep it started); stored batches are kept, the batch in flight is redone "
                   "on resume")
    out.append(f"- resume: {code(f'python -m runner sweep --resume {run_id} --db {store.path}')}")
    out.append(f"- this page: {code(f'python -m runner status --markdown --run {run_id} --db {store.path}')}")
    return "\n".join(out) + "\n"
