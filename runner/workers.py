"""CPU batches in worker processes forked from the sweep's process: two cores without one GIL between them.

Two batches on two threads of one process reach 1.5-1.6x of one core on a 2-core Xeon
(bench/side_by_side.py): the Python between the rollout's many small ops holds the GIL. `ForkedWorkers`
forks `workers` processes once the model is loaded; each holds the model (its pages shared
copy-on-write), rolls a batch out with `rollout_batch` on one torch thread, exactly as a batch thread
does, and sends its `BatchResult` back. The sweep's process keeps the database, the status and the
order of results (runner/executor.py's LocalExecutor).

A worker ignores SIGINT, SIGTERM and SIGHUP, which reach the whole process group (the first Ctrl-C or
SIGTERM is the sweep's graceful stop: the batches in flight end and are written or handed back), is
killed when the thread that forked it ends (PR_SET_PDEATHSIG, SIGKILL: the sweep's thread, which closes
the workers before it returns, so only when the sweep's process dies), never collects
the objects it inherited (gc.freeze: their finalizers, DuckDB's included, belong to the parent), and
exits without the parent's atexit handlers (multiprocessing ends a forked child with os._exit). Linux
only (fork after threads is unsafe on macOS); elsewhere LocalExecutor keeps its threads.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import os
import signal
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import psutil
import torch

from runner.batch import rollout_batch
from runner.errors import SweepError

PR_SET_PDEATHSIG = 1
_worker: dict = {}  # in a worker process: its reasoner and psutil.Process


def available() -> bool:
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


class ForkedWorkers:
    """`workers` processes, forked at the first `submit`, each running one batch at a time."""

    def __init__(self, reasoner, workers: int):
        # The tokenizers library warns in every forked child that has used its thread pool, and turns it off.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                        initializer=_start, initargs=(reasoner,))

    def submit(self, job, batch: list[dict], device: str) -> Future:
        """The BatchResult of `batch`, from whichever worker is free; its exception if the rollout raised one."""
        try:
            return self.pool.submit(_rollout, job, batch, device)
        except BrokenProcessPool as error:  # a worker died since the last batch was handed out
            raise _died() from error

    def processes(self) -> list[psutil.Process]:
        """The worker processes alive now (none before the first `submit` forks them; a killed one is gone)."""
        alive = []
        for pid in list(getattr(self.pool, "_processes", None) or {}):
            with contextlib.suppress(psutil.NoSuchProcess):
                alive.append(psutil.Process(pid))
        return alive

    def close(self) -> None:
        """Waits for the batches running, then for the workers to exit.

        After a worker died the pool stops the others with SIGTERM, which they ignore (`_start`): Python
        3.11 also sends them its exit sentinel, 3.12+ does not and waits for them forever, holding the
        lock `shutdown` needs. So the survivors of a broken pool are killed here first."""
        if getattr(self.pool, "_broken", False):
            for process in list((getattr(self.pool, "_processes", None) or {}).values()):
                process.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)


def result_of(future: Future):
    """A batch's result (a thread's or a worker's); a worker that died (the system's out-of-memory killer,
    a signal) is a SweepError that says so, the batches already committed kept."""
    try:
        return future.result()
    except BrokenProcessPool as error:
        raise _died() from error


def _died() -> SweepError:
    return SweepError("a worker process of the sweep died mid-batch (killed by the system: out of memory?); "
                      "the batches committed are kept: resume with a smaller --batch-size")


def _start(reasoner) -> None:
    gc.freeze()
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # sent to the process group: the sweep's
        signal.signal(stop, signal.SIG_IGN)  # process decides (a graceful stop, or its own end)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    torch.set_num_threads(1)
    process = psutil.Process()
    process.cpu_percent(None)  # starts this worker's CPU-time window
    _worker.update(reasoner=reasoner, process=process)


def _rollout(job, batch: list[dict], device: str):
    return rollout_batch(_worker["reasoner"], job, batch, _worker["process"], device)
