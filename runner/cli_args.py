"""The command line's arguments and what every command shares: one-line errors, safe printing, opened stores.

runner/__main__.py dispatches the commands; runner/cli_sweep.py is `sweep`'s. Imports stay light (no torch,
no DuckDB until a store is opened): a bad argument is refused in a fraction of a second.
"""
from __future__ import annotations

import argparse
import os

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


opened: list = []  # the stores this command opened: main() closes them (their status pages written first)


def open_store(path: str, must_exist: bool = True):
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
    opened.append(store)
    return store


def run_id_of(store, requested: int | None) -> int:
    from db import queries
    run_id = requested if requested is not None else queries.latest_run_id(store)
    if run_id is None:
        raise CliError(f"{store.path} holds no runs yet")
    if store.run_row(run_id) is None:
        raise CliError(f"no run {run_id} in {store.path}")
    return run_id

