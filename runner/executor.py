"""Where a sweep's batches run.

The loop over batches, phases, references, progress and stop is `runner.sweep.Sweep`'s alone. It
hands a phase's batches to an executor through a queue (cut in problem order, first out) and writes
each `BatchResult` the executor yields. `LocalExecutor` rolls batches out on this machine: on a CPU
one batch per core at a time, each on one torch thread (`workers`; several of them in forked worker
processes, runner/workers.py), yielded in the order they were handed out, so that it commits exactly
the batches, in exactly the order, of one batch at a time; `runner.distributed.RayExecutor` keeps
one batch in flight per Ray actor and yields results as they complete. Both turn a batch into rows
with runner/batch.py's `rollout_batch`, so they store the same rows for the same batches.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Iterator, Protocol

import numpy as np
import psutil
import torch

from runner import memory
from runner import workers as forked
from runner.batch import BatchJob, BatchResult, reference_values, rollout_batch, sweep_pss_mb
from runner.model import LatentReasoner


@dataclass(frozen=True)
class ModelShape:
    """What the sweep loop needs of a model it may not hold (the Ray driver holds none).

    `ModelShape.of(reasoner)` measures it where the model lives; the memory figures feed
    `runner.memory`'s estimate of how many problems fit in a batch.
    """
    num_latent: int  # T, the latents fed
    n_layers: int
    d_model: int
    kv_dim: int  # key/value width per layer (d_model, or less with grouped-query attention)
    vocab: int  # logits per position
    max_positions: int | None  # the model's context (GPT-2's n_positions); None: no fixed limit
    dtype_bytes: int  # bytes per weight/activation element
    memory_budget: int | None = None  # bytes a batch may use on the model's device, measured now
    batches_in_flight: int = 1  # batches rolled out side by side, which share the device's memory
    options: dict | None = None  # the checkpoint options load() resolved, with their sources
    options_line: str = ""

    @staticmethod
    def of(model: "LatentReasoner | ModelShape") -> "ModelShape":
        if isinstance(model, ModelShape):
            return model
        config = model.hf.config
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        device = str(model.device)
        # `auto` sizes one batch from the budget: the batches in flight side by side share it.
        workers = local_workers(model)
        return ModelShape(model.num_latent, model.n_layers, model.d_model, model.d_model * kv_heads // heads,
                          int(config.vocab_size), positions, torch.finfo(model.dtype).bits // 8,
                          memory.device_budget(device) // workers, workers, model.options, model.options_line)


def local_workers(reasoner: LatentReasoner) -> int:
    """Batches `LocalExecutor` runs side by side: the reasoner's `batch_workers`, else one per torch thread on
    a CPU, one on CUDA."""
    return max(1, reasoner.batch_workers or (torch.get_num_threads() if reasoner.device.type == "cpu" else 1))


class Executor(Protocol):
    """What `runner.sweep.Sweep` needs of whatever runs its batches (LocalExecutor, distributed.RayExecutor)."""
    shape: ModelShape

    def references(self, problems: list[dict], n: int, layer: int | None, batch_size: int,
                   max_new_tokens: int) -> tuple[list[str], np.ndarray]: ...

    def run(self, job: BatchJob, queue: deque, stop: threading.Event) -> Iterator[BatchResult]: ...

    def close(self) -> None: ...


# The sweep's memory (runner/batch.py's sweep_pss_mb) costs ~1 ms of kernel time a process to read, on the
# sweep's thread while the next batch computes: at most once a second, not per batch (a small model's CPU
# batches take ~0.1-0.5 s) and for the last batch of a phase. The batches between are stored without it (NULL).
PSS_EVERY_S = 1.0


class LocalExecutor:
    """Batches rolled out on this machine with the model this process holds: `workers` at a time, one torch
    thread each.

    A batch of one-token steps (latents, EOT, decoding) is many small ops that a second torch thread
    speeds up little; two whole batches side by side use two cores. On a CPU with several workers they
    run in worker processes forked from this one (runner/workers.py; Linux), because on threads of one
    process the GIL they share costs them (bench/side_by_side.py, 2 cores, one batch alone = 1x: on
    threads 1.9x on an AMD EPYC, 1.5-1.6x on an Intel Xeon); `processes=False` keeps threads. Each batch
    computes exactly what it computes alone on one thread, and results are yielded in hand-out order: a
    stop or an out-of-memory drops (or hands back) the batches started after the one yielded, so the
    committed batches are those of one worker, bit for bit. On CUDA one worker (one stream does the
    batching). One worker's batches run on a thread of their own, several workers' in their processes:
    either way the next batch is handed out before a result is yielded, so it computes while the sweep's
    thread writes that one.
    """

    def __init__(self, reasoner: LatentReasoner, workers: int | None = None, processes: bool | None = None):
        self.reasoner, self.device = reasoner, str(reasoner.device)
        self.workers = max(1, workers or local_workers(reasoner))
        # Several CPU workers: forked processes by default (on threads the GIL held two to 1.5-1.6x of one core).
        self.processes = (self.workers > 1 and self.device == "cpu" and forked.available()) \
            if processes is None else processes
        self.shape = ModelShape.of(reasoner)
        if self.workers != local_workers(reasoner):  # another count than ModelShape.of assumed: the budget follows
            budget = self.shape.memory_budget * local_workers(reasoner) // self.workers
            self.shape = replace(self.shape, memory_budget=budget, batches_in_flight=self.workers)
        if self.device == "cpu":
            memory.keep_freed_memory()  # each batch reuses the pages the last one freed (runner/memory.py)
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # starts the CPU-time window

    def references(self, problems: list[dict], n: int, layer: int | None, batch_size: int,
                   max_new_tokens: int) -> tuple[list[str], np.ndarray]:
        # On one thread too when batches run side by side: then any worker count stores the same bits.
        with one_torch_thread() if self.workers > 1 else contextlib.nullcontext():
            return reference_values(self.reasoner, problems, n, layer, batch_size, max_new_tokens)

    def run(self, job: BatchJob, queue: deque, stop: threading.Event) -> Iterator[BatchResult]:
        """Take batches from the front of `queue` until it is empty or `stop` is set; yield each result."""
        flight: deque = deque()  # (batch, future), oldest first
        measured = -math.inf  # when the sweep's memory was last read
        pool = forked.ForkedWorkers(self.reasoner, self.workers) if self.processes else None
        # Batch threads for the whole run, not one per batch: a thread's malloc arena keeps what its last batch
        # freed (runner/memory.py); a new thread may find another thread (a status page's) holding that arena
        # and start on a fresh one, whose pages a 128 x 7 batch of the embedded model faults in (~30,000).
        threads = None if pool else ThreadPoolExecutor(self.workers, thread_name_prefix="sweep-batch")

        def hand_out() -> None:
            while queue and not stop.is_set() and len(flight) < self.workers:
                batch = queue.popleft()
                flight.append((batch, pool.submit(job, batch, self.device) if pool else
                               _in_thread(threads, rollout_batch, self.reasoner, job, batch, self.process, self.device)))
        with one_torch_thread() if self.workers > 1 else contextlib.nullcontext():
            try:
                while True:
                    hand_out()
                    if not flight:
                        return
                    result = forked.result_of(flight.popleft()[1])
                    if not (queue or flight) or time.monotonic() - measured >= PSS_EVERY_S:  # the last batch too
                        processes = [self.process, *(pool.processes() if pool else ())]
                        result.resources["sweep_pss_mb"], measured = sweep_pss_mb(processes), time.monotonic()
                    if result.rows is None:  # out of memory: the later batches go back, as if not handed out
                        _hand_back(flight, queue)
                    else:  # the next batch computes while the sweep writes this one
                        hand_out()
                    yield result
                    if stop.is_set():  # the batches started since go back unused: one worker would not have run them
                        _hand_back(flight, queue)
                        return
            finally:  # an error, an abort, the sweep gone: no batch thread or worker outlives the sweep (a
                _hand_back(flight, queue)  # next run gets the cores); a Ctrl-C during the wait leaves at once
                if pool is not None:
                    pool.close()
                if threads is not None:  # idle now: the batches in flight have ended
                    threads.shutdown()

    def close(self) -> None:
        pass


def _in_thread(threads: ThreadPoolExecutor, function, *args) -> Future:
    """function(*args) on one of a run's batch threads. Not daemons: a process that exits mid-batch (a second
    Ctrl-C) waits for it (C++ threads killed at exit abort the process)."""
    # A new thread's OpenMP, which MKL's matmuls use, starts at the machine's default thread count whatever
    # torch.get_num_threads() says; torch sets it to its own count only at the thread's first parallel ATen op,
    # so a matmul before that ran on every core. The thread sets the caller's count first.
    count = torch.get_num_threads()

    def work():
        torch.set_num_threads(count)
        return function(*args)
    return threads.submit(work)  # never cancelled: a batch once handed out runs to its end


def _hand_back(flight: deque, queue: deque) -> None:
    """Batches in flight whose results will not be used go back to the front of `queue`, in order, once their
    threads are done (so that they hold no core when the sweep moves on)."""
    for _, future in flight:
        with contextlib.suppress(Exception):
            future.result()
    queue.extendleft(reversed([batch for batch, _ in flight]))
    flight.clear()


@contextlib.contextmanager
def one_torch_thread():
    """torch on one intra-op thread while batches run side by side (each then computes what it does alone)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
