"""Command line (DESIGN.md section 6): `python -m runner sweep|status|stats|export|import-seed|validate-data`.

Bad input exits non-zero with one line on stderr and leaves what is stored untouched.
Set THOUGHTSWEEP_DEBUG=1 for a traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading

from db.markdown import printable  # imports only re: start-up stays fast

DEFAULT_DB = "thoughtsweep.duckdb"


class CliError(Exception):
    """One line for stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        raise CliError(f"{self.prog}: {message} (see --help)")


def say(text, file=None, flush: bool = False) -> None:
    """print() for every line of text the CLI writes: a dataset's ids, questions and names, a checkpoint's
    options, a file name can hold terminal escape sequences; control characters come out as visible \\xNN."""
    print(printable(text), file=file, flush=flush)


def _positive_or_auto(text: str):
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_parser(defaults: bool = True) -> Parser:
    """The CLI; `defaults=False`: a `sweep` namespace holds only the options given (what --resume checks)."""
    parser = Parser(prog="python -m runner", description="ThoughtSweep: ablation sweeps over a CODI model's latent thoughts.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    sweep = sub.add_parser("sweep", help="run (or resume) a sweep into the database")
    sweep.add_argument("--model", default="default", help="default | checkpoint folder | hub id")
    sweep.add_argument("--base-model", default=None, help="config + tokenizer source (folder or hub id)")
    sweep.add_argument("--dataset", default="builtin",
                       help="builtin | gsm8k | gsm-hard | svamp | multi-arith | path (.jsonl, .json, .csv, .parquet)")
    sweep.add_argument("--db", default=DEFAULT_DB)
    sweep.add_argument("--run-name", default=None)
    sweep.add_argument("--limit", type=int, default=None)
    sweep.add_argument("--shuffle", action="store_true", help="shuffle the dataset with --seed before --limit")
    sweep.add_argument("--validation", type=int, default=0, help="stratified validation subset size")
    sweep.add_argument("--phase", choices=["all", "validation", "full"], default=None,
                       help="which phases to run now (default all; on --resume, the run's own)")
    sweep.add_argument("--schemes", type=_csv, default=("prefix", "single", "suffix"))
    sweep.add_argument("--methods", type=_csv, default=("zero",))
    sweep.add_argument("--site", default="latent", help="latent | resid:L")
    sweep.add_argument("--mode", default="recompute", help="recompute | frozen")
    sweep.add_argument("--batch-size", type=_positive_or_auto, default="auto")
    sweep.add_argument("--device", default="cpu")
    sweep.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--resume", type=int, default=None, metavar="RUN_ID",
                       help="continue a run with its own options (any other given must equal the run's)")
    sweep.add_argument("--checkpoint-every", type=int, default=None, metavar="N")
    sweep.add_argument("--checkpoint-dir", default=None)
    sweep.add_argument("--max-gpu-memory-gb", type=float, default=None)
    sweep.add_argument("--memory-budget-gb", type=float, default=None,
                       help="memory the sweep's batches may use, shared by those rolled out side by side "
                            "(default: 70%% of the free RAM, or GPU memory on CUDA); "
                            "'auto' sizes batches to it and a configuration that cannot fit one problem is refused")
    sweep.add_argument("--max-new-tokens", type=int, default=24, help="answer tokens decoded at most")
    ckpt = sweep.add_argument_group("checkpoint options", "default: what the checkpoint declares (codi_config.json, "
                                    "training_args.bin), else the released CODI models' value; all printed at start")
    ckpt.add_argument("--num-latent", type=int, default=None, help="latent steps T (released: 6)")
    ckpt.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (released: 32)")
    ckpt.add_argument("--merge-lora", action=argparse.BooleanOptionalAction, default=None,
                      help="fold LoRA into the weights (default: in float32 only; bf16/fp16 run it unmerged)")
    ckpt.add_argument("--remove-eos", action=argparse.BooleanOptionalAction, default=None,
                      help="--no-remove-eos: the model was trained with EOS after the question and after EOT")
    ckpt.add_argument("--use-prj", action=argparse.BooleanOptionalAction, default=None,
                      help="--no-use-prj: latent = last hidden state (trained without prj)")
    ckpt.add_argument("--prj-no-ln", action=argparse.BooleanOptionalAction, default=None,
                      help="prj without its LayerNorm (trained with prj_no_ln)")
    sweep.add_argument("--allow-nonfinite-weights", action="store_true",
                       help="sweep a checkpoint whose weights hold NaN or inf (every answer will be garbage)")
    sweep.add_argument("--workers", type=_positive, default=1, help="Ray actors (needs requirements-distributed.txt)")
    sweep.add_argument("--ray-address", default=None, help="join an existing Ray cluster")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    if not defaults:
        for action in sweep._actions:
            action.default = argparse.SUPPRESS

    status = sub.add_parser("status", help="runs in the database, newest first")
    status.add_argument("--db", default=DEFAULT_DB)
    fmt = status.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--markdown", action="store_true")
    status.add_argument("--run", type=int, default=None)

    stats = sub.add_parser("stats", help="the seed's summary statistics plus intervals and extras")
    stats.add_argument("--db", default=DEFAULT_DB)
    stats.add_argument("--run", type=int, default=None)
    stats.add_argument("--method", default=None)
    stats.add_argument("--site", default=None)
    stats.add_argument("--mode", default=None)
    stats.add_argument("--json", action="store_true")

    export = sub.add_parser("export", help="write a run's results to files")
    export.add_argument("--db", default=DEFAULT_DB)
    export.add_argument("--run", type=int, default=None)
    export.add_argument("--format", required=True, choices=["seed-json", "csv", "parquet", "markdown"])
    export.add_argument("--out", required=True)
    export.add_argument("--csv-raw", action="store_true",
                        help="CSV cells as stored: no apostrophe before text starting with = + - @ (for code, "
                             "not spreadsheets)")

    imp = sub.add_parser("import-seed", help="load the old script's JSON results as a run")
    imp.add_argument("--db", default=DEFAULT_DB)
    imp.add_argument("--name", default=None)
    imp.add_argument("files", nargs="+", help="step_importance_scores.json [step_importance_validation.json]")

    validate = sub.add_parser("validate-data", help="check a dataset before a sweep")
    validate.add_argument("dataset")
    validate.add_argument("--json", action="store_true")
    validate.add_argument("--question-field", default="question")
    validate.add_argument("--answer-field", default="answer")
    validate.add_argument("--model", default=None, help="also list the problems this model cannot run (too long for "
                          "its positions, empty once tokenised), which a sweep skips: default | folder | hub id")
    validate.add_argument("--base-model", default=None)
    validate.add_argument("--max-new-tokens", type=int, default=24)
    return parser


_opened: list = []  # the stores this command opened: main() closes them (their status pages written first)


def _open(path: str, must_exist: bool = True):
    from db.store import Store, StoreError
    if must_exist and not os.path.exists(path):
        raise CliError(f"database {path} does not exist (pass --db)")
    try:
        store = Store(path)
    except StoreError as error:
        if os.path.exists(path) and not os.access(path, os.W_OK):
            store = Store(path, read_only=True)  # a copied, read-only file still opens for reading
        else:
            raise error
    _opened.append(store)
    return store


def _run_id(store, requested: int | None) -> int:
    from db import queries
    run_id = requested if requested is not None else queries.latest_run_id(store)
    if run_id is None:
        raise CliError(f"{store.path} holds no runs yet")
    if store.run_row(run_id) is None:
        raise CliError(f"no run {run_id} in {store.path}")
    return run_id


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else "default" if value is None else str(value)


def _resume_config(store, args):
    """The stored config of run `args.resume`, refusing options given now that differ from it."""
    from runner.sweep import SweepConfig
    row = store.run_row(args.resume)
    if row is None:
        raise CliError(f"no run {args.resume} in {args.db} to resume")
    if row["status"] == "running":
        raise CliError(f"run {args.resume} is already running")
    if row["source"] != "sweep":
        raise CliError(f"run {args.resume} was imported from the old script's files: there is nothing to resume")
    config = SweepConfig.from_json(json.loads(row["config"]))
    stored = config.to_json()  # --db, --workers, --phase, --quiet...: how this process runs it, not the run's config
    differing = [f"--{name.replace('_', '-')} {_shown(value)} (run {args.resume}: {_shown(getattr(config, name))})"
                 for name, value in args.given.items() if name in stored and value != getattr(config, name)]
    if differing:
        raise CliError(f"--resume {args.resume} continues the run as it was configured, but "
                       f"{'; '.join(differing)} differ: drop them, or start a new run")
    phases = PHASES_OF[args.phase]
    return SweepConfig.from_json({**config.to_json(), "phases": phases}) if phases else config


def _nothing_to_resume(store, run_id: int, phases: tuple[str, ...]) -> bool:
    """Whether every problem of the phases a resume would run is stored already."""
    stored = store.stored_problem_ids(run_id)
    return all(p["problem_id"] in stored for p in store.run_problems(run_id)
               if "full" in phases or p["phase"] == "validation")


PHASES_OF = {"all": ("validation", "full"), "validation": ("validation",), "full": ("full",), None: None}


def cmd_sweep(args) -> int:
    from runner.sweep import Sweep, SweepConfig, prepare
    store = _open(args.db, must_exist=False)
    problems = None
    if args.resume is not None:
        config = _resume_config(store, args)
        run_id = args.resume
        if store.run_row(run_id)["status"] == "finished" and _nothing_to_resume(store, run_id, config.phases):
            # Nothing to sweep: the run (and its problems_per_hour) stays as it is.
            say(f"run {run_id} is finished: every problem of {', '.join(config.phases)} is stored, nothing to "
                f"resume", file=sys.stderr)
            return 0
    else:
        config = SweepConfig(model=args.model, base_model=args.base_model, dataset=args.dataset,
                             run_name=args.run_name, limit=args.limit, shuffle=args.shuffle,
                             validation=args.validation, phases=PHASES_OF[args.phase] or ("validation", "full"),
                             schemes=args.schemes, methods=args.methods, site=args.site, mode=args.mode,
                             batch_size=args.batch_size, device=args.device, dtype=args.dtype, seed=args.seed,
                             checkpoint_every=args.checkpoint_every, checkpoint_dir=args.checkpoint_dir,
                             max_gpu_memory_gb=args.max_gpu_memory_gb, memory_budget_gb=args.memory_budget_gb,
                             max_new_tokens=args.max_new_tokens,
                             num_latent=args.num_latent, lora_alpha=args.lora_alpha, merge_lora=args.merge_lora,
                             remove_eos=args.remove_eos, use_prj=args.use_prj, prj_no_ln=args.prj_no_ln)
        problems = prepare(config)  # options and dataset checked once, before a model load
    ray = args.workers > 1 or args.ray_address
    with contextlib.closing(_executor(config, args)) as executor:
        if args.resume is None:
            run_id = Sweep.create(store, executor.shape, config, problems)
        # stdout: stderr carries progress and, on failure, the one-line error
        say(f"run {run_id} model options: {executor.shape.options_line}", flush=True)
        in_flight = "the batches in flight" if ray else "the batch in flight"
        with stop_on_signals(run_id, in_flight) as stop, _progress_bar(args.quiet, run_id) as bar:
            status = Sweep(store, executor, config, run_id, stop=stop, on_progress=bar).run()
    on = f" --workers {args.workers}" + (f" --ray-address {args.ray_address}" if args.ray_address else "") if ray else ""
    if status == "stopped":
        say(f"run {run_id} stopped; resume with: python -m runner sweep --db {args.db} --resume {run_id}{on}",
            file=sys.stderr)
    else:
        say(f"run {run_id} {status}{' on Ray' if ray else ''}: python -m runner stats --db {args.db} --run {run_id}",
            file=sys.stderr)
    if skipped := store.skipped_problems(run_id):
        # A problem the model cannot run is not a result: say so where the run ends, not only in `status`.
        first, why = next(iter(skipped.items()))
        say(f"run {run_id}: {len(skipped)} problem(s) skipped, e.g. {first}: {why} "
            f"(all of them: python -m runner status --db {args.db} --markdown --run {run_id})", file=sys.stderr)
    return 0


def _executor(config, args):
    """Where the batches run: this process's model, or Ray actors (--workers N, --ray-address); one sweep loop."""
    if args.workers > 1 or args.ray_address:
        from runner import distributed
        return distributed.start(config.model_spec(), workers=args.workers, address=args.ray_address,
                                 allow_nonfinite=args.allow_nonfinite_weights)
    from runner import checkpoint
    from runner.executor import LocalExecutor
    from runner.model import load
    reasoner = load(config.model_spec())
    unusable = checkpoint.unusable(reasoner, allow_nonfinite=args.allow_nonfinite_weights,
                                   override=" (--allow-nonfinite-weights sweeps it anyway)")
    if unusable:
        raise CliError(unusable)
    if args.allow_nonfinite_weights and (nonfinite := checkpoint.nonfinite_weights(reasoner)):
        say(f"warning: {nonfinite}; sweeping it as --allow-nonfinite-weights asks", file=sys.stderr)
    return LocalExecutor(reasoner)


@contextlib.contextmanager
def stop_on_signals(run_id: int, in_flight: str):
    """An Event set by the first Ctrl-C / SIGTERM (the sweep stops after `in_flight`); the second aborts."""
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        say(f"\nstopping run {run_id} after {in_flight} (again to abort)", file=sys.stderr)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _progress_bar:
    """tqdm on stderr, fed by the sweep's progress callback; a context manager that closes it."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __init__(self, quiet: bool, run_id: int):
        self.bar, self.quiet, self.run_id = None, quiet, run_id

    def __call__(self, progress) -> None:
        if self.quiet or progress.status != "running":
            return
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=progress.total, initial=progress.done, desc=f"run {self.run_id}",
                            unit="problem", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(progress.done - self.bar.n)
        self.bar.set_postfix_str(f"{progress.phase} batch={progress.batch_size} rss={progress.rss_mb or 0:.0f}MB")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_status(args) -> int:
    from db import queries, status_page
    from db.store import DatabaseLocked
    try:
        store = _open(args.db)
    except DatabaseLocked as error:
        return _status_from_snapshot(args, error)  # the dashboard or a CLI sweep holds the file
    if args.markdown:
        say(status_page.status_markdown(store, _run_id(store, args.run)))
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
    store = _open(args.db)
    run_id = _run_id(store, args.run)
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
    say(f"problems {stats['n_problems']}, baseline accuracy {stats['baseline_accuracy']:.1%}")
    if not has_prefix:
        say(f"run {run_id} has no prefix-scheme results: position importance and early/late are the prefix "
            f"scheme's (stats --json lists its other groups under extras)")
        return 0
    say("position importance (prefix, flip rate): " +
        ", ".join(f"{k}: {v:.3f}" for k, v in stats["position_importance"].items()))
    for steps, row in stats["by_difficulty"].items():
        say(f"  {'unknown' if steps == '-1' else steps} steps: n={row['n_problems']} acc={row['baseline_accuracy']:.1%} "
            f"old script's early={_figure(row['early_importance'])} late={_figure(row['late_importance'])}")
    return 0


def _figure(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def cmd_export(args) -> int:
    from db import exports, seed
    store = _open(args.db)
    run_id = _run_id(store, args.run)
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
    store = _open(args.db, must_exist=False)
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
    from runner.executor import unrunnable
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
        while _opened:
            _opened.pop().close()


if __name__ == "__main__":
    sys.exit(main())
