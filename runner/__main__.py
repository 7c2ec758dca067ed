"""Command line (DESIGN.md section 6): `python -m runner sweep|status|stats|export|import-seed|validate-data`.

Bad input exits non-zero with one line on stderr and leaves what is stored untouched.
Set THOUGHTSWEEP_DEBUG=1 for a traceback instead.
"""
from __future__ import annotations

import json
import os
import sys

from runner.cli_args import CliError, build_parser, open_store, opened, run_id_of, say
from runner.cli_sweep import cmd_sweep


def cmd_status(args) -> int:
    from db import queries, status_page
    from db.store import DatabaseLocked
    try:
        store = open_store(args.db)
    except DatabaseLocked as error:
        return _status_from_snapshot(args, error)  # the dashboard or a CLI sweep holds the file
    if args.markdown:
        say(status_page.status_markdown(store, run_id_of(store, args.run)))
        return 0
    runs = queries.runs_json(store)
    _print_runs(args, runs)
    return 0


def _print_runs(args, runs: list[dict]) -> None:
    if args.json:
        print(json.dumps(runs, indent=2))
        return
    if not runs:
        say(f"{args.db}: no runs yet")
    for run in runs:
        rate = f"{run['problems_per_hour']:,.0f}/h" if run["problems_per_hour"] else "-"
        skipped = f" ({run['skipped']} skipped)" if run.get("skipped") else ""
        say(f"{run['id']:>4}  {run['status']:<11} {run['phase'] or '-':<10} {run['done']:>6}/"
            f"{run['total']:<6} {rate:>10}  {run['name']}" + skipped)


def _status_from_snapshot(args, locked) -> int:
    """What the holder of the file last wrote beside it (db/status_file.py), saying how old it is."""
    from db import status_file
    snapshot = status_file.read(args.db)
    if snapshot is None:
        raise CliError(f"{locked} (and no {status_file.path_for(args.db).name} beside it to read instead)")
    say(f"{args.db} is held by process {snapshot['writer_pid']}: showing its status file, written "
        f"{snapshot['written']}", file=sys.stderr)
    runs = snapshot["runs"]
    if args.markdown:
        run_id = args.run if args.run is not None else (runs[0]["id"] if runs else None)
        if run_id is None:
            raise CliError(f"{args.db} holds no runs yet")
        page = snapshot["markdown"].get(str(run_id))
        if page is None:
            known = any(r["id"] == run_id for r in runs)
            raise CliError(f"run {run_id}: {'no status page written yet' if known else 'no such run'} in "
                           f"{status_file.path_for(args.db).name}; try again after its next batch")
        say(page)  # a file beside the database: its text reaches the terminal as text
        return 0
    _print_runs(args, runs)
    return 0


def _summary_group(store, run_id: int, args) -> bool:
    """Whether the run has a prefix group for the summary; refuses a --method/--site/--mode it does not have."""
    from db import queries
    groups = queries.variant_groups(store, run_id)
    prefix = groups[groups["scheme"] == "prefix"]
    asked = {name: getattr(args, name) for name in ("method", "site", "mode") if getattr(args, name) is not None}
    if not asked:
        return not prefix.empty
    matching = prefix
    for name, value in asked.items():
        matching = matching[matching[name] == value]
    if matching.empty:
        given = " ".join(f"--{name} {value}" for name, value in asked.items())
        if prefix.empty:
            schemes = ", ".join(dict.fromkeys(groups["scheme"])) or "none"
            raise CliError(f"stats {given}: run {run_id} has no prefix-scheme results (its schemes: {schemes})")
        have = "; ".join(f"{name} {' or '.join(map(repr, dict.fromkeys(prefix[name])))}" for name in asked)
        raise CliError(f"stats {given}: run {run_id} has no such prefix results; it has {have}")
    return True


def cmd_stats(args) -> int:
    from db import queries, report
    from db.scope import Scope
    store = open_store(args.db)
    run_id = run_id_of(store, args.run)
    if queries.baseline_accuracy(store, Scope(run_id))["n"] == 0:
        row = store.run_row(run_id)
        raise CliError(f"run {run_id} has no results yet ({row['status']}, {row['done']}/{row['total']} problems): "
                       f"nothing to summarise" + (f"; resume it with python -m runner sweep --db {args.db} --resume "
                                                  f"{run_id}" if row["source"] == "sweep" else ""))
    has_prefix = _summary_group(store, run_id, args)
    stats = report.stats_json(store, run_id, method=args.method, site=args.site, mode=args.mode)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    extras = stats["extras"]
    say(f"problems {stats['n_problems']}, baseline accuracy {stats['baseline_accuracy']:.1%}"
        f"{_percent_interval(extras['baseline_accuracy'])} (intervals: 95% Wilson; early/late: 95% bootstrap over "
        f"problems)")
    if not has_prefix:
        say(f"run {run_id} has no prefix-scheme results: position importance and early/late are the prefix "
            f"scheme's (stats --json lists its other groups under extras)")
        return 0
    group = " · ".join(str(extras["summary_group"][key]) for key in ("scheme", "method", "site", "mode"))
    intervals = extras["position_importance_intervals"]
    say(f"position importance ({group}, flip rate; 0 = the baseline): " +
        ", ".join(f"{k}: " + (report.ci(v) if k == "0" else report.ci_of(v, intervals.get(k)))
                  for k, v in stats["position_importance"].items()))
    spread = {str(r["difficulty"]): r["old_script_early_late"]  # the old script's values with our intervals
              for r in extras["figures"]["old_script_early_late"]["steps"]}
    for steps, row in stats["by_difficulty"].items():
        accuracy = _percent_interval(extras["baseline_accuracy_by_steps"].get(steps))
        early, late = (report.ci(row[f"{side}_importance"], spread.get(steps, {}).get(f"{side}_importance_lo"),
                                 spread.get(steps, {}).get(f"{side}_importance_hi")) for side in ("early", "late"))
        say(f"  {'unknown' if steps == '-1' else steps} steps: n={row['n_problems']} acc={row['baseline_accuracy']:.1%}"
            f"{accuracy} old script's early={early} late={late}")
    return 0


def _percent_interval(bounds: dict | None) -> str:
    """' [lo, hi]' of a {lo, hi} in percent; '' where there is none."""
    lo, hi = ((bounds or {}).get(end) for end in ("lo", "hi"))
    return "" if lo is None or hi is None else f" [{100 * lo:.1f}, {100 * hi:.1f}]"


def cmd_export(args) -> int:
    from db import exports, seed
    store = open_store(args.db)
    run_id = run_id_of(store, args.run)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CliError(f"--out {args.out} is a file: give a folder (the export's file names are fixed)")
    os.makedirs(args.out, exist_ok=True)
    if args.format == "seed-json":
        paths = seed.export_seed(store, run_id, args.out)
    elif args.format == "csv":
        paths = exports.export_csv(store, run_id, args.out, raw=args.csv_raw)
    elif args.format == "parquet":
        paths = exports.export_parquet(store, run_id, args.out)
    else:
        paths = exports.export_markdown(store, run_id, args.out)
    for path in paths if isinstance(paths, (list, tuple)) else [paths]:
        say(path)
    return 0


def cmd_import_seed(args) -> int:
    from db import seed
    store = open_store(args.db, must_exist=False)
    scores = [f for f in args.files if "validation" not in os.path.basename(f)]
    validation = [f for f in args.files if "validation" in os.path.basename(f)]
    if len(scores) != 1 or len(validation) > 1:
        raise CliError("import-seed takes one scores file and at most one validation file")
    run_id = seed.import_seed(store, scores[0], validation[0] if validation else None, name=args.name)
    say(run_id)
    return 0


def _unrunnable(args) -> list[dict]:
    """The dataset's problems that --model cannot run (a sweep records them as skipped): [{problem_id, reason}]."""
    from runner import answers, data
    from runner.batch import unrunnable
    from runner.model import ModelSpec, load
    reasoner = load(ModelSpec(model=args.model, base_model=args.base_model))
    problems = data.load_problems(args.dataset, question_field=args.question_field, answer_field=args.answer_field)
    found = []
    for p in problems:
        reason = unrunnable(reasoner, {"question": p.question, "gold": p.gold, "gold_value": answers.parse_number(p.gold)},
                            args.max_new_tokens)
        if reason is not None:
            found.append({"problem_id": p.problem_id, "reason": reason})
    return found


def cmd_validate_data(args) -> int:
    from runner import data
    report = data.validate_dataset(args.dataset, question_field=args.question_field, answer_field=args.answer_field)
    unrunnable = _unrunnable(args) if args.model is not None and report.n_problems else []
    if args.json:
        print(json.dumps(report.to_json() | ({"unrunnable": unrunnable} if args.model is not None else {}),
                         indent=2))
    else:
        say(f"{report.n_problems} problems; difficulty " + (", ".join(
            f"{'unknown' if k == -1 else k} steps: {v}" for k, v in sorted(report.difficulty.items())) or "-"))
        for rejected in report.rejected:
            say(f"  line {rejected['line']}: {rejected['reason']}")
        for problem in unrunnable:
            say(f"  {problem['problem_id']}: skipped by a sweep on {args.model}: {problem['reason']}")
    if report.n_problems == 0:  # the report is on stdout; stderr says, in one line, that it is a failure
        say(f"error: {args.dataset}: no usable problem ({len(report.rejected)} rejected, listed in the report)",
            file=sys.stderr)
        return 1
    return 0


COMMANDS = {"sweep": cmd_sweep, "status": cmd_status, "stats": cmd_stats, "export": cmd_export,
            "import-seed": cmd_import_seed, "validate-data": cmd_validate_data}


# The errors whose message is written for a person: (module, class). Only a module already imported can have
# raised one, so recognising them imports nothing: a bad argument is refused before torch is imported.
EXPLAINED = (("db.store", "StoreError"), ("db.seed", "SeedFormatError"), ("db.files", "ExportError"),
             ("runner.ablation", "AblationError"), ("runner.data", "DatasetError"),
             ("runner.model", "ModelLoadError"), ("runner.sweep", "SweepError"))


def _explained(error: Exception) -> bool:
    return isinstance(error, CliError) or any(
        isinstance(error, cls) for module, name in EXPLAINED
        if (cls := getattr(sys.modules.get(module), name, None)) is not None)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "sweep":
            args.given = vars(build_parser(defaults=False).parse_args(argv))  # what --resume must not contradict
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        say("aborted", file=sys.stderr)
        return 130
    except Exception as error:
        if os.environ.get("THOUGHTSWEEP_DEBUG"):
            raise
        if _explained(error):
            say(f"error: {_one_line(error)}", file=sys.stderr)
            return 2
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        say(f"error: {type(error).__name__}: {first} (THOUGHTSWEEP_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    finally:  # closed when the command ends, not when the last reference goes: a page may still be building
        while opened:
            opened.pop().close()


if __name__ == "__main__":
    sys.exit(main())
