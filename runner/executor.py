"""Where a sweep's batches run, and how one batch becomes result rows.

The loop over batches, phases, references, progress and stop is `runner.sweep.Sweep`'s alone. It
hands a phase's batches to an executor through a queue (cut in problem order, first out) and writes
each `BatchResult` the executor yields. `LocalExecutor` rolls batches out on this machine: on a CPU
one batch per core at a time, each on one torch thread (`workers`; several of them in forked worker
processes, runner/workers.py), yielded in the order they were handed out, so that it commits exactly
the batches, in exactly the order, of one batch at a time; `runner.distributed.RayExecutor` keeps
one batch in flight per Ray actor and yields results as they complete. Both turn a batch into rows
with `rollout_batch`, so they store the same rows for the same batches.

A problem the model cannot run (its prompt and answer do not fit the model's positions, or its
question is empty once tokenised) is left out of its batch and comes back in `skipped` with the
reason, instead of failing the batch (and every resume) with an IndexError.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Iterator, Protocol

import numpy as np
import psutil
import torch

from runner import ablation, answers
from runner import workers as forked
from runner.ablation import Variant
from runner.errors import SweepError
from runner.model import LatentReasoner, official_question


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
        from runner import memory
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


@dataclass(frozen=True)
class BatchJob:
    """What every batch of a phase shares (Ray puts it in its object store once, not per batch)."""
    variants: tuple[Variant, ...]
    references: dict
    seed: int
    max_new_tokens: int


@dataclass(frozen=True)
class BatchResult:
    batch: list[dict]  # the problems handed out, in run order
    rows: list[dict] | None  # problem-major, baseline first; None: out of memory, nothing computed
    skipped: dict  # problem_id -> why the model cannot run it (no rows for it)
    seconds: float
    resources: dict  # RSS / CPU / GPU memory of the process that ran it


def measure(problem: dict, variants: tuple[Variant, ...], texts: list[str], logprobs, lens: list[str],
            tokens: list[list[int]] | None = None) -> list[dict]:
    """The measures of DESIGN.md section 4 for one problem's rows (baseline first).

    The answer value is CODI's official one (last number, commas removed) and `correct` is its
    test.py comparison (equal to the gold value); `prefix_value` is the number after "The answer is:".
    """
    values = [answers.official_answer(t) for t in texts]
    gold = problem["gold_value"]
    correct = [v is not None and gold is not None and v == gold for v in values]
    base, base_correct = values[0], correct[0]
    base_lp = None if logprobs is None else float(logprobs[0])
    rows = []
    for v, (variant, value, is_correct, text) in enumerate(zip(variants, values, correct, texts)):
        if value is not None or base is not None:
            changed = not answers.same_number(value, base)
        else:
            changed = text != texts[0]
        stated = answers.extract_answer(text)
        lp = None if logprobs is None else float(logprobs[v])
        rows.append({"problem_id": problem["problem_id"], "variant": variant.key, "scheme": variant.scheme,
                     "k": variant.k, "method": variant.method, "site": variant.site, "mode": variant.mode,
                     "answer_text": text, "answer_value": value,
                     "extraction": "last-number" if value is not None else "none",
                     "prefix_value": stated.value if stated.extraction == "codi" else None,
                     "tokens": None if tokens is None else tokens[v],
                     "correct": is_correct, "changed": changed, "flip": is_correct != base_correct,
                     "harm": base_correct and not is_correct, "help": (not base_correct) and is_correct,
                     "gold_logprob": lp, "logprob_drop": None if lp is None else base_lp - lp,
                     "lens": lens[v]})
    return rows


def _lens(reasoner: LatentReasoner, ids: torch.Tensor, probs: torch.Tensor) -> list[str]:
    """(R, T, k) ids and probs -> per row, the JSON text of [[[token, prob], ...] per latent] (probs to 4 places).

    Built as text, not as nested lists for json.dumps: the ~40,000 small lists of a batch outlived
    several garbage collections, whose scans of the loaded model's objects cost ten times the work.
    """
    ids, probs = ids.cpu().numpy(), probs.float().cpu().numpy()
    unique = np.unique(ids).tolist()
    with reasoner.tokenizer_lock:
        pieces = reasoner.tokenizer.batch_decode([[i] for i in unique])
    token = {i: json.dumps(t) for i, t in zip(unique, pieces)}
    return ["[" + ", ".join("[" + ", ".join(f"[{token[i]}, {round(p, 4)!r}]" for i, p in zip(ti, tp)) + "]"
                            for ti, tp in zip(ri, rp)) + "]"
            for ri, rp in zip(ids.tolist(), probs.tolist())]


def unrunnable(reasoner: LatentReasoner, problem: dict, max_new_tokens: int) -> str | None:
    """Why the model cannot run this problem, or None: checked alone, so the verdict never depends on the batch."""
    text = official_question(problem["question"])
    if not text or reasoner.ids(text) == reasoner.ids(""):
        return "the question is empty after tokenisation"
    config = reasoner.hf.config
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    answer = reasoner.ids(reasoner.answer_prompt(problem["gold"]), special=False)
    prompt = len(reasoner.prompt_ids(problem["question"]))
    # prompt + latents + EOT(+EOS) + the longer of the teacher-forced gold answer and the decoded one, less
    # its last token, which is scored or emitted but never fed
    needed = prompt + reasoner.num_latent + len(reasoner.answer_start) + max(len(answer), max_new_tokens) - 1
    if needed > limit:
        return (f"too long for the model's {limit} positions: {prompt} prompt tokens + {reasoner.num_latent} "
                f"latents + answer need {needed}")
    return None


def rollout_batch(reasoner: LatentReasoner, job: BatchJob, batch: list[dict], process: psutil.Process,
                  device: str) -> BatchResult:
    """One batch of problems under every variant -> its rows (or None on out-of-memory) and skipped problems."""
    started = time.time()
    skipped = {p["problem_id"]: why for p in batch if (why := unrunnable(reasoner, p, job.max_new_tokens))}
    runnable = [p for p in batch if p["problem_id"] not in skipped]
    rows: list[dict] | None = []
    try:
        if runnable:
            rows = rollout_rows(reasoner, job.variants, runnable, job.references, job.seed, job.max_new_tokens)
    except torch.OutOfMemoryError:  # the sweep halves the batch size and hands the batch out again
        rows = None
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return BatchResult(batch, rows, skipped, time.time() - started, measure_resources(process, device))


def rollout_rows(reasoner: LatentReasoner, variants: tuple[Variant, ...], batch: list[dict], references: dict,
                 seed: int, max_new_tokens: int) -> list[dict]:
    """One batch of runnable problems under every variant -> its result rows, problem-major, baseline first."""
    plan = ablation.make_plan(list(variants), [p["problem_id"] for p in batch], reasoner.num_latent,
                              reasoner.d_model, references, seed)
    out = reasoner.rollout([p["question"] for p in batch], plan, golds=[p["gold"] for p in batch],
                           max_new_tokens=max_new_tokens)
    V, lens = len(variants), _lens(reasoner, out.lens_ids, out.lens_probs)
    rows = []
    for b, problem in enumerate(batch):
        part = slice(b * V, (b + 1) * V)
        logprobs = None if out.gold_logprob is None else out.gold_logprob[part].tolist()
        rows += measure(problem, variants, out.texts[part], logprobs, lens[part], out.tokens[part])
    return rows


def reference_values(reasoner: LatentReasoner, problems: list[dict], n: int, layer: int | None, batch_size: int,
                     max_new_tokens: int) -> tuple[list[str], np.ndarray]:
    """Baseline values fed at each latent step (layer None) or block `layer`'s output there, for the first `n`
    problems the model can run (as the sweep skips the others): (their ids, (n, T, d))."""
    chosen = list(itertools.islice((p for p in problems if unrunnable(reasoner, p, max_new_tokens) is None), n))
    if not chosen:
        raise SweepError("no problem of the run fits the model: there are no reference latents to compute")
    questions, values = [p["question"] for p in chosen], []
    for start in range(0, len(questions), max(1, batch_size)):
        chunk = questions[start : start + max(1, batch_size)]
        plan = ablation.make_plan([ablation.BASELINE], [str(i) for i in range(len(chunk))],
                                  reasoner.num_latent, reasoner.d_model)
        out = reasoner.rollout(chunk, plan, max_new_tokens=1, capture=() if layer is None else (layer,))
        values.append(out.latents if layer is None else out.captured[layer])
    return [p["problem_id"] for p in chosen], torch.cat(values).numpy()


_RESOURCES = threading.Lock()  # psutil's CPU-time window is one per Process object: one reader at a time


def measure_resources(process: psutil.Process, device: str) -> dict:
    """The memory and CPU of `process` (the one that ran the batch: this one, or a worker process of
    runner/workers.py), and the device's memory: one `run_metrics` row's worth."""
    with _RESOURCES:
        return _resources(process, device)


def _resources(process: psutil.Process, device: str) -> dict:
    gpu = peak = None
    if device.startswith("cuda"):
        gpu = torch.cuda.memory_allocated(device) / 2**20
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    return {"rss_mb": process.memory_info().rss / 2**20, "cpu_pct": process.cpu_percent(None),
            "gpu_mem_mb": gpu, "gpu_peak_mb": peak}


class Executor(Protocol):
    """What `runner.sweep.Sweep` needs of whatever runs its batches (LocalExecutor, distributed.RayExecutor)."""
    shape: ModelShape

    def references(self, problems: list[dict], n: int, layer: int | None, batch_size: int,
                   max_new_tokens: int) -> tuple[list[str], np.ndarray]: ...

    def run(self, job: BatchJob, queue: deque, stop: threading.Event) -> Iterator[BatchResult]: ...

    def close(self) -> None: ...


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
        pool = forked.ForkedWorkers(self.reasoner, self.workers) if self.processes else None

        def hand_out() -> None:
            while queue and not stop.is_set() and len(flight) < self.workers:
                batch = queue.popleft()
                flight.append((batch, pool.submit(job, batch, self.device) if pool else
                               _in_thread(rollout_batch, self.reasoner, job, batch, self.process, self.device)))
        with one_torch_thread() if self.workers > 1 else contextlib.nullcontext():
            try:
                while True:
                    hand_out()
                    if not flight:
                        return
                    result = forked.result_of(flight.popleft()[1])
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

    def close(self) -> None:
        pass


def _in_thread(function, *args) -> Future:
    """function(*args) on a thread of its own. Not a daemon: a process that exits mid-batch (a second Ctrl-C)
    waits for it (C++ threads killed at exit abort the process)."""
    future: Future = Future()
    # A new thread's OpenMP, which MKL's matmuls use, starts at the machine's default thread count whatever
    # torch.get_num_threads() says; torch sets it to its own count only at the thread's first parallel ATen op,
    # so a matmul before that ran on every core. The thread sets the caller's count first.
    threads = torch.get_num_threads()

    def work() -> None:
        torch.set_num_threads(threads)
        future.set_running_or_notify_cancel()  # never cancelled: a batch once handed out runs to its end
        try:
            future.set_result(function(*args))
        except BaseException as error:  # handed to the sweep's thread, which raises it
            future.set_exception(error)
    threading.Thread(target=work, name="sweep-batch").start()
    return future


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
