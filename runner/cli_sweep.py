"""`python -m runner sweep`: start or resume a run in this process or on Ray, with a progress bar and a
graceful stop on the first Ctrl-C / SIGTERM (DESIGN.md section 6)."""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading

from runner.cli_args import CliError, open_store, say

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
    from runner.data import validation_shortfall
    from runner.sweep import Sweep, SweepConfig, prepare
    store = open_store(args.db, must_exist=False)
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
        if short := validation_shortfall(problems, config.validation, config.seed):
            say(f"warning: {short}", file=sys.stderr)
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


def postfix(progress) -> str:
    """The bar's tail: what the sweep knows so far (no phase before the first one, no RSS before a batch).
    rss: the process that ran the last batch (a worker, when there are several); sweep_pss: all of the
    sweep's processes on this machine, shared pages counted once."""
    parts = [progress.phase] if progress.phase else []
    parts += [f"batch={progress.batch_size}"] if progress.batch_size else []
    parts += [f"rss={progress.rss_mb:.0f}MB"] if progress.rss_mb else []
    parts += [f"sweep_pss={progress.sweep_pss_mb:.0f}MB"] if progress.sweep_pss_mb else []
    return " ".join(parts)


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
        self.bar.set_postfix_str(postfix(progress), refresh=False)  # drawn with the count, in one frame
        if progress.done != self.bar.n:
            self.bar.update(progress.done - self.bar.n)
        else:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

