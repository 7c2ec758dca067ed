"""The loop over batches: problems -> executor -> measures -> one transaction per batch.

A sweep is a `SweepConfig` stored as one `runs` row. Its phases run in order: `reference`
(baseline rollouts of the first problems, only when a method needs reference latents),
`validation` (a stratified subset) and `full` (every problem not stored yet, so validation
problems are not re-run and count in the full results). Batches are cut in problem order at the
run's batch size (the validation problems first, among themselves), recorded in the run when it
is created (`auto` included) and reused on resume: a resume cuts the batches an uninterrupted
run cuts, so it stores the same numbers bit for bit. Each batch is written in one transaction; a
stop, a crash or a kill loses at most the batch in flight. Where a batch runs is the executor's
business (runner/executor.py: this process, or Ray actors); this loop exists once. Nothing here
touches Streamlit: progress goes to a callback.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from db.store import Store, StoreError
from runner import ablation, answers, data
from runner.ablation import Reference
from runner.config import (  # noqa: F401  (imported from here too)
    PHASES, SweepConfig, batch_size_for, check_fits_context, prepare)
from runner.errors import SweepError
from runner.batch import BatchJob, BatchResult
from runner.executor import Executor, LocalExecutor, ModelShape
from runner.model import LatentReasoner

@dataclass(frozen=True)
class Progress:
    """What the dashboard and the CLI show; a snapshot, safe to hand to another thread."""
    run_id: int | None  # None: the run is not created yet (its model is loading)
    status: str  # starting | running | finished | stopped | failed | interrupted
    phase: str | None  # load | reference | validation | full
    done: int  # problems handled: stored, or skipped as unrunnable
    total: int
    elapsed_s: float
    problems_per_hour: float | None = None
    eta_s: float | None = None
    batch_size: int | None = None
    rss_mb: float | None = None
    peak_rss_mb: float | None = None
    cpu_pct: float | None = None
    gpu_mem_mb: float | None = None
    gpu_peak_mb: float | None = None
    latest: tuple[dict, ...] = ()
    error: str | None = None
    skipped: int = 0  # problems the model cannot run (problems.skip_reason says why)
    sweep_pss_mb: float | None = None  # the sweep's processes on this machine together (runner/batch.py)


class Sweep:
    """One run: create or resume it, then `run()` until done, stopped or failed.

    `executor` runs the batches (runner/executor.py); a `LatentReasoner` is run in this process.
    """

    def __init__(self, store: Store, executor: Executor | LatentReasoner, config: SweepConfig, run_id: int,
                 stop: threading.Event | None = None, on_progress: Callable[[Progress], None] | None = None):
        self.executor = LocalExecutor(executor) if isinstance(executor, LatentReasoner) else executor
        self.store, self.config, self.run_id = store, config, run_id
        self.stop = stop or threading.Event()
        self.on_progress = on_progress or (lambda progress: None)
        shape = self.executor.shape
        self.variants = tuple(ablation.expand(config.schemes, config.methods, config.site, config.mode,
                                              shape.num_latent))
        row = store.run_row(run_id)
        # The size the run was created with (auto's pick, or what out-of-memory halved it to): a resume
        # cuts the batches of an uninterrupted run.
        recorded = row["batch_size"]
        self.batch_size = int(recorded) if recorded is not None and recorded == recorded else None
        self.elapsed_before = float(np.nan_to_num(row["elapsed_s"]))  # summed over resumes
        # Known before run() reads the problems, so a failure that comes earlier can still be reported.
        self.done, self.total = int(row["done"]), int(row["total"])
        self.peak_rss = float(np.nan_to_num(row["peak_rss_mb"]))
        self.sweep_pss: float | None = None  # the last measured (not every batch is: runner/executor.py)
        self.phase: str | None = row["phase"]
        self.skipped = len(store.skipped_problems(run_id))
        self.started, self.session_done = time.time(), 0
        self.latest: deque = deque(maxlen=8)

    # --- public -----------------------------------------------------------------------------------
    @staticmethod
    def create(store: Store, model: LatentReasoner | ModelShape, config: SweepConfig,
               problems: list[data.Problem] | None = None) -> int:
        """Store a new run and its problems (with their phase); returns the run id.

        `problems`: what `prepare(config)` read (validated then); else it is called here.
        """
        shape = ModelShape.of(model)
        problems = prepare(config) if problems is None else problems
        ablation.parse_site(config.site, shape.n_layers)
        validation_ids: set[str] = set()
        if config.validation:
            chosen, _ = data.stratified_sample(problems, config.validation, config.seed)
            validation_ids = {p.problem_id for p in chosen}
        variants = ablation.expand(config.schemes, config.methods, config.site, config.mode, shape.num_latent)
        batch_size = batch_size_for(config, shape, len(variants), [p.question for p in problems])
        check_fits_context(config, shape)  # after the memory estimate: its refusal names the bigger problem
        name = config.run_name or f"{os.path.basename(str(config.model))} on {os.path.basename(config.dataset)}"
        # The run's config: what was asked, and what the checkpoint options resolved to (and from where).
        stored = config.to_json() | {"checkpoint_options": shape.options or {}}
        # One transaction: a crash (or text DuckDB cannot store) leaves no run without its problems.
        return store.create_run(
            name=name, model=config.model, dataset=config.dataset, config=stored, num_latent=shape.num_latent,
            n_variants=len(variants), total=len(problems), status="stopped", device=config.device,
            batch_size=batch_size, problems=[
                {"problem_id": p.problem_id, "ord": i, "question": p.question, "gold": p.gold,
                 "gold_value": answers.parse_number(p.gold), "difficulty": p.difficulty, "solution": p.solution,
                 "phase": "validation" if p.problem_id in validation_ids else "full"}
                for i, p in enumerate(problems)])

    def run(self) -> str:
        """Sweep until every requested phase is stored (-> 'finished') or a stop (-> 'stopped')."""
        self.started, self.session_done = time.time(), 0
        try:
            problems = self.store.run_problems(self.run_id)
            if self.batch_size is None:  # a run stored before sizes were recorded at creation
                self.batch_size = batch_size_for(self.config, self.executor.shape, len(self.variants),
                                                 [p["question"] for p in problems])
            # Inside the try: a file that cannot take this first write (disk full) is a failed run too.
            self.store.claim_run(self.run_id, self.batch_size, self.config.device)
            handled = self.store.stored_problem_ids(self.run_id)
            self.total, self.done = len(problems), len(handled)
            self._emit("running")
            if self.stop.is_set():  # asked while the model loaded
                return self._finish("stopped")
            references = self._references()
            for phase in self.config.phases:
                if self.stop.is_set():
                    return self._finish("stopped")
                self.phase = phase
                self.store.update_run(self.run_id, phase=phase)
                if not self._run_phase(self._batches(phase, problems, handled), references):
                    return self._finish("stopped")
                handled |= {p["problem_id"] for p in problems if phase == "full" or p["phase"] == "validation"}
            return self._finish("finished")
        except KeyboardInterrupt:
            self.store.update_run(self.run_id, status="interrupted", pid=None)
            self._emit("interrupted")
            raise
        except Exception as error:
            message = str(error) if isinstance(error, (StoreError, SweepError)) else f"{type(error).__name__}: {error}"
            with contextlib.suppress(StoreError):  # a full disk or read-only file cannot record it
                self.store.update_run(self.run_id, status="failed", error=message, pid=None, finished=True)
            self._emit("failed", error=message)
            raise
        finally:  # when run() returns, the status file holds the pages of the run's last status
            self.store.pages.flush()

    # --- phases -----------------------------------------------------------------------------------
    def _references(self) -> dict[str, Reference]:
        """Baseline values at the sweep's site for the run's first problems (that the model can run), stored once."""
        if not any(m != "zero" for m in self.config.methods):
            return {}
        site = self.config.site
        loaded = self.store.load_reference(self.run_id, site)
        if loaded is None:
            self.phase = "reference"
            self.store.update_run(self.run_id, phase="reference")
            self._emit("running")  # a stop asked now is honoured once the references are stored
            layer = ablation.parse_site(site, self.executor.shape.n_layers)
            loaded = self.executor.references(self.store.run_problems(self.run_id), self.config.reference_size,
                                              layer, self.batch_size, self.config.max_new_tokens)
            self.store.save_reference(self.run_id, site, *loaded)
        problem_ids, values = loaded
        return {site: Reference(site, tuple(problem_ids), torch.from_numpy(values))}

    def _batches(self, phase: str, problems: list[dict], handled: set[str]) -> deque:
        """The phase's batches still to run: cut in run order at the batch size, validation problems first
        and among themselves (as the validation phase cuts them), whatever earlier sessions stored."""
        groups = [[p for p in problems if p["phase"] == "validation"]]
        if phase == "full":
            groups.append([p for p in problems if p["phase"] != "validation"])
        size = self.batch_size
        chunks = (group[i : i + size] for group in groups for i in range(0, len(group), size))
        return deque(left for chunk in chunks if (left := [p for p in chunk if p["problem_id"] not in handled]))

    def _run_phase(self, queue: deque, references: dict) -> bool:
        """Every batch of `queue` through the executor, written as it comes back; False on a stop."""
        job = BatchJob(self.variants, references, self.config.seed, self.config.max_new_tokens)
        for result in self.executor.run(job, queue, self.stop):
            if result.rows is None:
                self._out_of_memory(result.batch, queue)
                continue
            self._write(result)
        return not queue

    def _out_of_memory(self, batch: list[dict], queue: deque) -> None:
        """Halve the batch size (recorded: a resume cuts the same batches); the batch and the queue are re-cut.

        Halving keeps the cut in problem order (the halves of a batch are the batches of the new size).
        A batch cut before another one's out-of-memory halved the size is split without halving again.
        """
        if len(batch) <= self.batch_size:
            if self.batch_size == 1:
                raise SweepError("out of memory with a batch of 1 problem: use a smaller model, dtype, "
                                 "fewer latents or fewer variants")
            self.batch_size //= 2
            self.store.update_run(self.run_id, batch_size=self.batch_size)
        size, waiting = self.batch_size, [batch, *queue]
        queue.clear()
        queue.extend(b[i : i + size] for b in waiting for i in range(0, len(b), size))

    def _remember(self, result: BatchResult) -> None:
        """The newest baseline answers, for the live view (rows are problem-major, baseline first)."""
        V = len(self.variants)
        ran = [p for p in result.batch if p["problem_id"] not in result.skipped]
        for b, problem in enumerate(ran):
            mine = result.rows[b * V : (b + 1) * V]
            self.latest.appendleft({"problem_id": problem["problem_id"], "question": problem["question"],
                                    "gold": problem["gold"], "answer": mine[0]["answer_text"],
                                    "correct": mine[0]["correct"], "flips": sum(r["flip"] for r in mine)})

    # --- progress ---------------------------------------------------------------------------------
    def _rates(self) -> tuple[float, float | None, float | None]:
        session = time.time() - self.started
        rate = self.session_done / session * 3600 if self.session_done and session > 0 else None
        left = self.total - self.done
        return self.elapsed_before + session, rate, (left / rate * 3600 if rate else None)

    def _write(self, result: BatchResult) -> None:
        """Commit one batch with its metrics (the resources of the process that ran it) and skipped problems."""
        batch, resources = result.batch, result.resources
        self._remember(result)
        self.session_done += len(batch)
        self.done += len(batch)
        self.skipped += len(result.skipped)
        self.peak_rss = max(self.peak_rss, resources["rss_mb"])
        self.sweep_pss = resources.get("sweep_pss_mb") or self.sweep_pss
        elapsed, rate, _ = self._rates()
        metrics = {"elapsed_s": elapsed, "phase": self.phase, "done": self.done, "batch_problems": len(batch),
                   "batch_size": self.batch_size,
                   "problems_per_hour": len(batch) / max(result.seconds, 1e-9) * 3600, **resources}
        self.store.write_batch(self.run_id, result.rows, metrics, skipped=result.skipped, done=self.done,
                               elapsed_s=elapsed, problems_per_hour=rate, peak_rss_mb=self.peak_rss,
                               peak_gpu_mb=resources["gpu_peak_mb"], batch_size=self.batch_size)
        self._checkpoint(before=self.done - len(batch))
        self._emit("running", resources)

    def _checkpoint(self, before: int) -> None:
        """The old script's checkpoint_N.json (its scores list so far) each time `done` passes a multiple of N."""
        every = self.config.checkpoint_every
        if not every or self.done // every == before // every:
            return
        from db import files, seed  # the old script's file formats; written whole or not at all
        from db.scope import Scope
        folder = self.config.checkpoint_dir or f"{self.store.path.with_suffix('')}_checkpoints/run_{self.run_id}"
        os.makedirs(folder, exist_ok=True)
        scores = seed.seed_scores(self.store, Scope(self.run_id))
        files.write_text(os.path.join(folder, f"checkpoint_{self.done // every * every}.json"),
                         json.dumps(scores, indent=2, ensure_ascii=False))

    def _emit(self, status: str, resources: dict | None = None, error: str | None = None) -> None:
        elapsed, rate, eta = self._rates()
        resources = resources or {}
        self.on_progress(Progress(self.run_id, status, self.phase, self.done, self.total, elapsed, rate, eta,
                                  self.batch_size, resources.get("rss_mb"), self.peak_rss, resources.get("cpu_pct"),
                                  resources.get("gpu_mem_mb"), resources.get("gpu_peak_mb"), tuple(self.latest),
                                  error, self.skipped, self.sweep_pss))

    def _finish(self, status: str) -> str:
        elapsed, rate, _ = self._rates()
        # A session that stored nothing (a resume with nothing left, a stop before the first batch) has no
        # rate of its own: keep the run's last one rather than overwrite it with NULL.
        measured = {} if rate is None else {"problems_per_hour": rate}
        self.store.update_run(self.run_id, status=status, pid=None, elapsed_s=elapsed, finished=True, **measured)
        self._emit(status)
        return status
