"""One sweep over many GPUs or machines: a batch executor whose batches run on Ray actors.

`python -m runner sweep --workers N [--ray-address ADDR]` builds a `RayExecutor` (`start`) and
runs the same `runner.sweep.Sweep` as a one-process sweep: run creation, phases, references,
resume, stop and progress are that loop's, once. Each actor holds the model on its own device (one
GPU each; one CPU each without CUDA) and turns a batch into rows with
`runner.batch.rollout_batch`, the code path of a local sweep. Rows come back to the driver
(this process), DuckDB's one writer, which commits each batch in its own transaction. The
executor keeps one batch in flight per actor, taken from the front of the sweep's queue, so the
batches are those of a local sweep and the rows are identical (runner/sweep.py cuts them). An
actor that dies loses its batch in flight only: the batch goes back to the front of the queue,
and a replacement actor is started.

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
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil

from runner.errors import SweepError
from runner.batch import BatchJob, BatchResult, reference_values, rollout_batch
from runner.executor import ModelShape
from runner.model import ModelSpec

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


class SweepWorker:
    """A Ray actor: one model on this actor's device; batches of problems in, result rows out."""

    def __init__(self, spec: ModelSpec, allow_nonfinite: bool = False):
        self.spec, self.reasoner, self.process = spec, None, psutil.Process()
        self.allow_nonfinite = allow_nonfinite

    def ready(self) -> tuple[int, ModelShape]:
        """Load the model once (a task, not __init__, so a load error comes back as itself); pid and shape."""
        if self.reasoner is None:
            from runner import checkpoint
            from runner.model import load
            reasoner = load(self.spec)
            # The weights live here, not in the driver: the driver's checks (NaN weights, no latents) run here.
            unusable = checkpoint.unusable(reasoner, allow_nonfinite=self.allow_nonfinite,
                                           override=" (--allow-nonfinite-weights sweeps it anyway)")
            if unusable:
                raise SweepError(unusable)
            self.reasoner = reasoner
        return os.getpid(), ModelShape.of(self.reasoner)

    def references(self, problems: list[dict], n: int, layer: int | None, batch_size: int,
                   max_new_tokens: int) -> tuple[list[str], np.ndarray]:
        self.ready()
        return reference_values(self.reasoner, problems, n, layer, batch_size, max_new_tokens)

    def rollout(self, job: BatchJob, batch: list[dict]) -> BatchResult:
        self.ready()
        return rollout_batch(self.reasoner, job, batch, self.process, self.spec.device)


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

    def __init__(self, ray, spec: ModelSpec, cluster: RayConfig, allow_nonfinite: bool = False):
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
        self.allow_nonfinite = allow_nonfinite
        # One GPU each (Ray sets CUDA_VISIBLE_DEVICES, so 'cuda' is that GPU); CPU actors get OMP threads = num_cpus.
        self.options = {"num_gpus": 1} if gpu else {"num_cpus": cluster.cpus_per_worker}
        self.remote = ray.remote(SweepWorker)
        self.started = 0
        self.replacements_left = cluster.workers if cluster.replacements is None else cluster.replacements
        self.workers = [self._start() for _ in range(cluster.workers)]

    def _start(self) -> Worker:
        actor = self.remote.options(**self.options).remote(self.spec, self.allow_nonfinite)
        self.started += 1
        return Worker(self.started - 1, actor, actor.ready.remote())

    def start(self) -> ModelShape:
        """Wait until every actor has loaded the model; its shape, with the smallest actor's memory budget."""
        shapes = [self.get(worker.ready)[1] for worker in self.workers]
        budgets = [s.memory_budget for s in shapes if s.memory_budget is not None]
        return dataclasses.replace(shapes[0], memory_budget=min(budgets) if budgets else None)

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


class RayExecutor:
    """A sweep's batches on a `WorkerPool`: one in flight per actor; this process stays DuckDB's only writer."""

    def __init__(self, pool: WorkerPool):
        self.pool, self.ray = pool, pool.ray
        self.shape = pool.start()
        self.in_flight: dict = {}  # ObjectRef -> (worker, batch)
        self.attempts: Counter = Counter()  # first problem id of a batch -> actors lost with it
        self.dispatched, self.requeued, self.handled = 0, 0, Counter()  # handled: batches per worker number

    def references(self, problems: list[dict], n: int, layer: int | None, batch_size: int,
                   max_new_tokens: int) -> tuple[list[str], np.ndarray]:
        """One actor computes them (the driver holds no model), another if that one dies."""
        while self.pool.workers:
            worker = self.pool.workers[0]
            try:
                # A copy: Ray hands numpy arrays back read-only (zero-copy from its object store).
                ids, values = self.pool.get(worker.actor.references.remote(problems, n, layer, batch_size,
                                                                            max_new_tokens))
                return ids, values.copy()
            except self.ray.exceptions.RayActorError:
                self.pool.replace(worker)
        raise SweepError("every Ray worker died computing the reference latents (see /tmp/ray/session_latest/logs)")

    def _dispatch(self, worker: Worker, job, batch: list[dict]):
        self.dispatched += 1
        return worker.actor.rollout.remote(job, batch)

    def run(self, job: BatchJob, queue: deque, stop: threading.Event) -> Iterator[BatchResult]:
        """Hand batches from the front of `queue` to idle actors until it is empty or `stop` is set; yield each
        result as it completes. A batch lost with its actor goes back to the front; a model error fails the
        run once the batches in flight are in."""
        shared = self.ray.put(job)
        idle, failure = list(self.pool.workers), None
        starting: dict = {}  # ready ObjectRef -> replacement still loading the model: idle once loaded
        while True:
            while idle and queue and failure is None and not stop.is_set():
                batch, worker = queue.popleft(), idle.pop(0)
                self.in_flight[self._dispatch(worker, shared, batch)] = (worker, batch)
            going = queue and failure is None and not stop.is_set()
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
                worker, batch = self.in_flight.pop(ref)
                try:
                    result = self.pool.get(ref)
                except self.ray.exceptions.RayActorError:  # the actor died: only this batch is lost
                    self.requeued += 1
                    key = batch[0]["problem_id"]
                    self.attempts[key] += 1
                    if self.attempts[key] >= self.pool.cluster.max_attempts:
                        failure = failure or SweepError(
                            f"the batch from problem {key} was lost with {self.attempts[key]} Ray workers "
                            f"in a row: it is what kills them (see /tmp/ray/session_latest/logs)")
                    queue.appendleft(batch)
                    # The lost batch goes to the next live actor; the replacement joins once it has loaded.
                    replacement = self.pool.replace(worker, start=not (stop.is_set() or failure))
                    if replacement is not None:
                        starting[replacement.ready] = replacement
                    continue
                except Exception as error:  # the model raised: fail the run once the other batches are in
                    failure = failure or error
                    continue
                idle.append(worker)
                if result.rows is not None:
                    self.handled[worker.number] += 1
                yield result  # the sweep writes it (or, out of memory, puts it back in pieces)
        if failure is not None:
            raise failure

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

    def close(self) -> None:
        self.pool.shutdown()


def start(spec: ModelSpec, workers: int = 2, address: str | None = None, allow_nonfinite: bool = False) -> RayExecutor:
    """`--workers N [--ray-address ADDR]`: connect (or start a local Ray), start the actors, wait for their model."""
    try:
        import_ray(local=address is None)
    except ImportError as error:
        raise SweepError(f"--workers {workers} runs on Ray, which is not installed ({error}): {INSTALL}") from None
    cluster = RayConfig(workers=workers, address=address,
                        include_dashboard=os.environ.get("THOUGHTSWEEP_RAY_DASHBOARD") == "1")
    pool = WorkerPool(connect(cluster), spec, cluster, allow_nonfinite)
    try:
        return RayExecutor(pool)
    except BaseException:
        pool.shutdown()
        raise
