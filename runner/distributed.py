"""One sweep over many GPUs or machines: Ray actors roll batches out, this process stores them.

`python -m runner sweep --workers N [--ray-address ADDR]` lands in `main`. The driver (this
process) runs a `DistributedSweep`: the local `Sweep` (run creation, phases, references, resume,
stop, progress, the run row) whose batches go to N Ray actors instead of a local model. Each
actor holds the model on its own device (one GPU each; one CPU each without CUDA) and turns a
batch into rows with `runner.sweep.rollout_rows`, the code path of a local sweep. Rows come back
to the driver, DuckDB's one writer, which commits each batch in its own transaction. Batches
are cut as a local sweep cuts them (same size, same order), so a fixed batch size gives the same
rows. An actor that dies loses its batch in flight only: the batch goes to another actor, and a
replacement actor is started.

Ray is optional (requirements-distributed.txt). Without --ray-address a local Ray is started
once per process: token authentication on (RAY_AUTH_MODE=token; ~/.ray/auth_token, mode 0600),
no dashboard (THOUGHTSWEEP_RAY_DASHBOARD=1 asks for it), listening on loopback only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import torch

from db.store import Store
from runner.model import ModelSpec
from runner.sweep import (BatchSizer, Progress, Sweep, SweepConfig, SweepError, measure_resources, reference_values,
                          rollout_rows)

REPO = Path(__file__).resolve().parent.parent
INSTALL = "pip install -r requirements-distributed.txt"
# Shipped to the workers of a joined cluster (Ray also skips what .gitignore lists).
NOT_SHIPPED = [".git", ".benchmarks", ".pytest_cache", "tests", "bench", "test-output", "exports", "*.duckdb*"]


@dataclass(frozen=True)
class RayConfig:
    workers: int = 2  # actors, each holding one copy of the model
    address: str | None = None  # join this cluster ('auto', 'HOST:6379'); None: start a local Ray
    include_dashboard: bool = False  # the dashboard is one more open port: off unless asked
    local_cpus: int | None = None  # logical CPUs of a local Ray (None: the machine's cores)
    cpus_per_worker: float = 1.0  # CPU actors; a GPU actor asks for one GPU
    replacements: int | None = None  # actors started in place of dead ones (None: `workers`)
    max_attempts: int = 3  # a batch lost with this many actors is what kills them: fail the run


@dataclass(frozen=True)
class ModelShape:
    """What the driver needs of the model without loading it; `Sweep` takes it as its reasoner."""
    num_latent: int
    n_layers: int
    d_model: int
    options: dict | None = None  # the checkpoint options load() resolved, with their sources
    options_line: str = ""


@dataclass(frozen=True)
class BatchJob:
    """What every batch of a phase shares: put in Ray's object store once, not sent per batch."""
    variants: tuple
    references: dict
    seed: int
    max_new_tokens: int


@dataclass(frozen=True)
class BatchResult:
    rows: list[dict] | None  # None: out of memory, nothing computed
    seconds: float
    resources: dict  # the actor's own RSS / CPU / GPU memory


class SweepWorker:
    """A Ray actor: one model on this actor's device; batches of problems in, result rows out."""

    def __init__(self, spec: ModelSpec):
        self.spec, self.reasoner, self.process = spec, None, psutil.Process()

    def ready(self) -> tuple[int, ModelShape]:
        """Load the model once (a task, not __init__, so a load error comes back as itself); pid and shape."""
        if self.reasoner is None:
            from runner.model import load
            self.reasoner = load(self.spec)
        r = self.reasoner
        return os.getpid(), ModelShape(r.num_latent, r.n_layers, r.d_model, r.options, r.options_line)

    def references(self, questions: list[str], layer: int | None, batch_size: int) -> np.ndarray:
        self.ready()
        return reference_values(self.reasoner, questions, layer, batch_size)

    def rollout(self, job: BatchJob, batch: list[dict]) -> BatchResult:
        self.ready()
        started, rows = time.time(), None
        try:
            rows = rollout_rows(self.reasoner, job.variants, batch, job.references, job.seed, job.max_new_tokens)
        except torch.OutOfMemoryError:  # the driver halves the batch size and hands the batch out again
            if self.spec.device.startswith("cuda"):
                torch.cuda.empty_cache()
        return BatchResult(rows, time.time() - started, measure_resources(self.process, self.spec.device))


def import_ray(local: bool):
    """Ray (or ImportError), with a local cluster's settings in the environment before Ray reads them at import."""
    if local and "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray >= 2.52: a token for every RPC and HTTP call
        # Bind the throwaway local cluster to loopback, as Ray does on macOS: nobody else should join it.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    return ray


def private_token(home: Path) -> Path:
    """~/.ray/auth_token, readable by its owner only: the token lets anyone who reads it run code on the cluster.

    Ray writes a missing token with the umask's mode (0644 on most systems) and keeps an existing one,
    so it is written here first, 0600 from its creation (secrets.token_hex(32), as Ray makes it); an
    older token keeps its value and loses the others' read bit.
    """
    path = home / ".ray" / "auth_token"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
            file.write(secrets.token_hex(32))
    path.chmod(0o600)
    return path


def connect(cluster: RayConfig):
    """Join `cluster.address`, or start a local Ray (once per process); returns the ray module."""
    ray = import_ray(local=cluster.address is None)
    if ray.is_initialized():
        return ray
    if cluster.address is None and os.environ.get("RAY_AUTH_MODE") == "token" \
            and not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        private_token(Path.home())  # before ray.init, which would write a missing one world-readable
    # A joined cluster may run workers on other machines: ship this code (and models/default) to them.
    shipped = {"working_dir": str(REPO), "excludes": NOT_SHIPPED} if cluster.address else None
    try:
        ray.init(address=cluster.address, ignore_reinit_error=True, include_dashboard=cluster.include_dashboard,
                 num_cpus=None if cluster.address else cluster.local_cpus, runtime_env=shipped,
                 log_to_driver=False, logging_level=logging.WARNING)  # actor logs: /tmp/ray/session_latest/logs
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"join the Ray cluster at {cluster.address}" if cluster.address else "start a local Ray"
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SweepError(f"cannot {where}: {first}") from None
    return ray


@dataclass
class Worker:
    number: int  # 0.. in start order; replacements get new numbers
    actor: Any  # ray.actor.ActorHandle
    ready: Any  # ObjectRef of (pid, ModelShape)


class WorkerPool:
    """The actors of one sweep; starts a replacement for a dead one, within a budget."""

    def __init__(self, ray, spec: ModelSpec, cluster: RayConfig):
        gpu = spec.device.startswith("cuda")
        if cluster.workers < 1:
            raise SweepError(f"--workers must be at least 1, got {cluster.workers}")
        kind, need = ("GPU", cluster.workers) if gpu else ("CPU", cluster.workers * cluster.cpus_per_worker)
        have = ray.cluster_resources().get(kind, 0)
        if have < need:  # the actors would wait forever for a slot (an autoscaling cluster may add one)
            message = f"--workers {cluster.workers}: the Ray cluster has {have:g} {kind}s, {need:g} needed"
            if cluster.address is None:
                raise SweepError(message + (" (one GPU per worker)" if gpu else " (pass fewer --workers)"))
            print(f"warning: {message}; waiting for the cluster to provide them", file=sys.stderr)
        self.ray, self.cluster, self.spec = ray, cluster, _as_seen_by_actors(spec)
        # One GPU each (Ray sets CUDA_VISIBLE_DEVICES, so 'cuda' is that GPU); CPU actors get OMP threads = num_cpus.
        self.options = {"num_gpus": 1} if gpu else {"num_cpus": cluster.cpus_per_worker}
        self.remote = ray.remote(SweepWorker)
        self.started = 0
        self.replacements_left = cluster.workers if cluster.replacements is None else cluster.replacements
        self.workers = [self._start() for _ in range(cluster.workers)]

    def _start(self) -> Worker:
        actor = self.remote.options(**self.options).remote(self.spec)
        self.started += 1
        return Worker(self.started - 1, actor, actor.ready.remote())

    def start(self) -> ModelShape:
        """Wait until every actor has loaded the model; the model's shape."""
        return [self.get(worker.ready)[1] for worker in self.workers][0]

    def get(self, ref):
        """ray.get, with a worker's own error (ModelLoadError, ...) raised as itself, not Ray's wrapper."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as error:
            raise (error.cause if isinstance(error.cause, Exception) else error) from None

    def pid(self, worker: Worker) -> int:
        return self.get(worker.ready)[0]

    def replace(self, dead: Worker, start: bool = True) -> Worker | None:
        """Forget a dead actor; a new one in its place while the budget lasts (it loads the model as it starts)."""
        if dead in self.workers:
            self.workers.remove(dead)
            self.ray.kill(dead.actor)
        if not start or self.replacements_left <= 0:
            return None
        self.replacements_left -= 1
        self.workers.append(self._start())
        return self.workers[-1]

    def shutdown(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker.actor)
        self.workers = []


def _as_seen_by_actors(spec: ModelSpec) -> ModelSpec:
    """An actor's one GPU is 'cuda'; a local folder is named absolutely (a shipped actor runs elsewhere)."""
    def absolute(name):
        path = Path(name).expanduser() if name else None
        return str(path.resolve()) if name not in (None, "default") and path.exists() else name
    device = "cuda" if spec.device.startswith("cuda") else spec.device
    return dataclasses.replace(spec, model=absolute(spec.model), base_model=absolute(spec.base_model), device=device)


class DistributedSweep(Sweep):
    """A `Sweep` whose batches run on a `WorkerPool`; this process stays DuckDB's only writer."""

    def __init__(self, store: Store, shape: ModelShape, config: SweepConfig, run_id: int, pool: WorkerPool,
                 stop: threading.Event | None = None, on_progress: Callable[[Progress], None] | None = None):
        super().__init__(store, shape, config, run_id, stop, on_progress)
        self.pool, self.ray = pool, pool.ray
        # No GPU memory cap here: the driver has no CUDA context; an actor's out-of-memory halves the size.
        self.sizer = BatchSizer(config.batch_size, len(self.variants), config.device, None)
        self.in_flight: dict = {}  # ObjectRef -> (worker, batch, attempts)
        self.dispatched, self.requeued, self.handled = 0, 0, Counter()  # handled: batches per worker number

    def _reference_values(self, questions: list[str], layer: int | None) -> np.ndarray:
        """One actor computes them (the driver holds no model), another if that one dies."""
        while self.pool.workers:
            worker = self.pool.workers[0]
            try:
                # A copy: Ray hands numpy arrays back read-only (zero-copy from its object store).
                return self.pool.get(worker.actor.references.remote(questions, layer, self.sizer.size)).copy()
            except self.ray.exceptions.RayActorError:
                self.pool.replace(worker)
        raise SweepError("every Ray worker died computing the reference latents (see /tmp/ray/session_latest/logs)")

    def _dispatch(self, worker: Worker, job, batch: list[dict]):
        self.dispatched += 1
        return worker.actor.rollout.remote(job, batch)

    def _run_phase(self, phase: str, pending: list[dict], references: dict) -> bool:
        self.phase = phase
        job = self.ray.put(BatchJob(self.variants, references, self.config.seed, self.config.max_new_tokens))
        queue = deque(pending)  # not handed out yet, in run order: batches are cut as a local sweep cuts them
        retry: deque = deque()  # (batch, attempts) lost with an actor or split after out-of-memory: first out
        idle, failure = list(self.pool.workers), None
        starting: dict = {}  # ready ObjectRef -> replacement still loading the model: idle once loaded
        while True:
            while idle and (retry or queue) and failure is None and not self.stop.is_set():
                batch, attempts = retry.popleft() if retry else \
                    ([queue.popleft() for _ in range(min(self.sizer.size, len(queue)))], 0)
                worker = idle.pop(0)
                self.in_flight[self._dispatch(worker, job, batch)] = (worker, batch, attempts)
            going = (retry or queue) and failure is None and not self.stop.is_set()
            if not self.in_flight and not (going and starting):  # else wait for a replacement to load
                if going:
                    failure = SweepError("every Ray worker died and no replacement could be started; "
                                         "resume the run once the cluster is healthy")
                break
            # A timeout so that a second Ctrl-C (KeyboardInterrupt) is seen while batches run.
            ready, _ = self.ray.wait([*self.in_flight, *starting], num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in starting:
                    failure = failure or self._started(starting.pop(ref), ref, idle)
                    continue
                worker, batch, attempts = self.in_flight.pop(ref)
                try:
                    result = self.pool.get(ref)
                except self.ray.exceptions.RayActorError:  # the actor died: only this batch is lost
                    self.requeued += 1
                    if attempts + 1 >= self.pool.cluster.max_attempts:
                        failure = failure or SweepError(
                            f"the batch from problem {batch[0]['problem_id']} was lost with {attempts + 1} Ray workers "
                            f"in a row: it is what kills them (see /tmp/ray/session_latest/logs)")
                    retry.appendleft((batch, attempts + 1))
                    # The lost batch goes to the next live actor; the replacement joins once it has loaded.
                    replacement = self.pool.replace(worker, start=not (self.stop.is_set() or failure))
                    if replacement is not None:
                        starting[replacement.ready] = replacement
                    continue
                except Exception as error:  # the model raised: fail the run once the other batches are in
                    failure = failure or error
                    continue
                idle.append(worker)
                if result.rows is None:
                    failure = failure or self._halve(batch, attempts, retry)
                    continue
                self.session_done += len(batch)
                self.done += len(batch)
                self.handled[worker.number] += 1
                self._remember(batch, result.rows)
                self._write(batch, result.rows, result.seconds, result.resources)
                self.sizer.succeeded(len(batch), result.seconds)
        if failure is not None:
            raise failure
        return not (retry or queue)

    def _started(self, worker: Worker, ready, idle: list) -> Exception | None:
        """A replacement has loaded the model (idle now), died doing so (forgotten), or failed to load (the error)."""
        try:
            self.pool.get(ready)
        except self.ray.exceptions.RayActorError:
            self.pool.replace(worker, start=False)
            return None
        except Exception as error:
            return error
        idle.append(worker)
        return None

    def _halve(self, batch: list[dict], attempts: int, retry: deque) -> SweepError | None:
        """Out of memory: halve the batch size (as a local sweep does); the batch goes out again in pieces."""
        if len(batch) <= self.sizer.size:  # not a batch cut before another actor's out-of-memory halved the size
            try:
                self.sizer.out_of_memory()
            except SweepError as error:
                return error
            self.store.update_run(self.run_id, batch_size=self.sizer.size)
        pieces = [batch[i : i + self.sizer.size] for i in range(0, len(batch), self.sizer.size)]
        retry.extendleft((piece, attempts) for piece in reversed(pieces))
        return None


def main(store: Store, config: SweepConfig, run_id: int | None = None, workers: int = 2,
         address: str | None = None, quiet: bool = False) -> int:
    """`python -m runner sweep --workers N [--ray-address ADDR]`: create or resume the run, sweep it on Ray."""
    try:
        import_ray(local=address is None)
    except ImportError as error:
        print(f"error: --workers {workers} runs on Ray, which is not installed ({error}): {INSTALL}", file=sys.stderr)
        return 2
    cluster = RayConfig(workers=workers, address=address,
                        include_dashboard=os.environ.get("THOUGHTSWEEP_RAY_DASHBOARD") == "1")
    ray = connect(cluster)
    pool = WorkerPool(ray, config.model_spec(), cluster)
    try:
        shape = pool.start()
        if run_id is None:
            run_id = Sweep.create(store, shape, config)
        print(f"run {run_id} model options: {shape.options_line}", flush=True)  # stdout, as the local CLI
        from runner.__main__ import _progress_bar, stop_on_signals  # the local sweep's bar and Ctrl-C
        with stop_on_signals(run_id, "the batches in flight") as stop, _progress_bar(quiet, run_id) as bar:
            status = DistributedSweep(store, shape, config, run_id, pool, stop=stop, on_progress=bar).run()
    finally:
        pool.shutdown()
    if status == "stopped":
        joined = f" --ray-address {address}" if address else ""
        print(f"run {run_id} stopped; resume with: python -m runner sweep --db {store.path} --resume {run_id} "
              f"--workers {workers}{joined}", file=sys.stderr)
    else:
        print(f"run {run_id} {status} on {workers} Ray workers: "
              f"python -m runner stats --db {store.path} --run {run_id}", file=sys.stderr)
    return 0
