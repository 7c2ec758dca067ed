"""How many problems fit in one batch: bytes per problem from the model's shape, against a budget.

`auto` batch size is decided once per run from this estimate (not from timings or the memory
pressure of the moment), recorded in the run and reused on resume, so a resumed run cuts the
batches an uninterrupted one cuts. The budget is RAM on the CPU (psutil) and GPU memory on CUDA
(capped by --max-gpu-memory-gb), or `memory_budget_gb` when given. A configuration that does not
fit even one problem at a time is refused with one line before anything runs.
"""
from __future__ import annotations

import ctypes
import sys

import psutil
import torch

from runner.errors import MemoryBudgetError

# Rows (problems x variants) of an `auto` batch at most: on a CPU bigger batches stop paying off
# and hold progress back; a GPU keeps gaining up to thousands of rows. A CPU batch of a small model's rows
# (the embedded one: 0.8 M weights a token) is mostly per-step and per-batch overhead below ~500 rows
# (bench/throughput.py --batch-size): its cap grows as a row gets cheaper, up to CPU_CHEAP_ROWS.
MAX_ROWS = {"cpu": 256, "cuda": 4096}
CPU_CHEAP_ROWS = 1024
CPU_BATCH_WEIGHTS = 2**30  # rows x weights a token: a CPU batch's cap covers this much matmul work a step
ANSWER_TOKENS = 16  # teacher-forced gold answer width allowed for (`The answer is: N` is ~6-10 tokens)
# Allocator slack and transients the sum below does not itemise. On a CPU with shared latent steps
# (runner/ablation.py) every step's tensors have other row counts, and glibc's heap fragments: a batch of
# 60 latents x 181 variants grew to 1.0-1.9x the itemised sum (9 runs), against 0.5x at 6 latents.
SAFETY = 2.5
USABLE = 0.7  # share of the free RAM / GPU memory a batch may take
# glibc serves allocations above a threshold (dynamic, at most 32 MiB) with fresh mmap'd pages and gives
# the freed top of its heap back past another: every batch's multi-MB tensors (a 5,632-row prompt's
# activations are 3-9 MB each) then page-fault their memory in again, ~1,500-18,000 faults for a 128 x 7
# batch of the embedded model. Kept instead, the rollout takes ~3% less CPU time (7 alternating processes
# each way, 429 against 417 ms on average) and faults far less; a process then keeps up to KEPT_FREE bytes it freed.
# Batches on a thread (one CPU worker: runner/executor.py keeps one thread for a run's batches) allocate from
# a thread arena, whose 64 MiB heaps glibc unmaps as soon as one is empty, whatever the trim threshold, unless
# the top pad is that large: without it a later 128 x 7 batch faulted 5,000-28,000 pages in again, with it
# next to none. (db/store.py keeps DuckDB from trimming every arena: one DuckDB thread.)
# mallopt's M_MMAP_THRESHOLD, M_TRIM_THRESHOLD and M_TOP_PAD:
MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD, MALLOC_TOP_PAD = -3, -1, -2
MMAP_ABOVE = 32 * 2**20  # glibc's largest mmap threshold
KEPT_FREE = 512 * 2**20
THREAD_HEAP = 64 * 2**20  # glibc's HEAP_MAX_SIZE on 64 bits, a thread arena's heap


def keep_freed_memory() -> bool:
    """This process's malloc keeps what batches free for the next ones (glibc on Linux; elsewhere a no-op,
    False). Set where CPU batches are run (runner/executor.py); forked workers inherit it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(MALLOC_MMAP_THRESHOLD, MMAP_ABOVE) and libc.mallopt(MALLOC_TRIM_THRESHOLD, KEPT_FREE)
                    and libc.mallopt(MALLOC_TOP_PAD, THREAD_HEAP))
    except (OSError, AttributeError):  # another C library (musl has no mallopt)
        return False


def device_budget(device: str, max_gpu_memory_gb: float | None = None) -> int:
    """Bytes a batch may use on `device` now: a share of free RAM, or of free GPU memory (and the cap)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        budget = free * USABLE
        if max_gpu_memory_gb is not None:
            budget = min(budget, max_gpu_memory_gb * 2**30 - torch.cuda.memory_allocated(device))
        return int(max(budget, 0))
    return int(psutil.virtual_memory().available * USABLE)


def bytes_per_problem(shape, n_variants: int, prompt_tokens: int, max_new_tokens: int) -> int:
    """Peak bytes one problem adds to a batch under `n_variants` variants (its rows, R = V per problem).

    The prompt's KV is stored once per problem (shared-prefix cache); each row holds its own KV for
    the T latents, EOT and the answer, the fed latents and logit-lens tensors, and the logits of the
    teacher-forced gold answer (float32 log-softmax beside them). Checked against the peak RSS growth
    of one batch of the embedded model (tests/test_memory.py): T=60 x 181 variants, 4 problems, 0.6-1.1 GB
    measured, 1.5 GB estimated; T=6 x 19 variants, 13 problems, ~45 MB measured, ~230 MB estimated.
    """
    T, e = shape.num_latent, shape.dtype_bytes
    kv_per_token = 2 * shape.n_layers * shape.kv_dim * e  # keys + values, every layer
    row_tokens = T + 2 + max(max_new_tokens, ANSWER_TOKENS)
    row = (2 * kv_per_token * row_tokens  # x2: a growing cache holds the old and the new copy while it grows
           + T * shape.d_model * (e + 4)  # latents (R, T, d), and their float32 copy
           + shape.vocab * (ANSWER_TOKENS + 2) * (e + 8)  # gold logits (R, A, V'), softmax / log-softmax
           + 4 * shape.d_model * e * 4)  # one token's MLP activations
    prompt = kv_per_token * prompt_tokens + 4 * shape.d_model * e * prompt_tokens
    return int(SAFETY * (prompt + n_variants * row))


def auto_batch_size(shape, n_variants: int, prompt_tokens: int, max_new_tokens: int, device: str,
                    budget: int) -> int:
    """Problems per batch for `auto`: as many as the row cap and the budget allow; refuses below one."""
    need = bytes_per_problem(shape, n_variants, prompt_tokens, max_new_tokens)
    if need > budget:
        n = shape.batches_in_flight  # the budget given is theirs together: one batch has budget of it
        shared = "" if n == 1 else f" ({budget / 2**30:.1f} GB a batch, {n} batches side by side)"
        raise MemoryBudgetError(
            f"one problem needs about {need / 2**30:.1f} GB ({n_variants} variants x {shape.num_latent} latents, "
            f"{shape.n_layers} layers of width {shape.d_model}) but the memory budget is "
            f"{budget * n / 2**30:.1f} GB{shared}: "
            f"use fewer latents (--num-latent), fewer schemes or methods, or a bigger budget")
    return max(1, min(max_rows(shape, device) // n_variants, budget // need))


def max_rows(shape, device: str) -> int:
    """The row cap of an `auto` batch: MAX_ROWS, on a CPU up to CPU_CHEAP_ROWS for a model whose rows are cheap."""
    if device.startswith("cuda"):
        return MAX_ROWS["cuda"]
    weights = shape.n_layers * 12 * shape.d_model**2 + shape.d_model * shape.vocab  # blocks + logits, a token
    return max(MAX_ROWS["cpu"], min(CPU_CHEAP_ROWS, CPU_BATCH_WEIGHTS // weights))


def check_fixed(shape, n_variants: int, prompt_tokens: int, max_new_tokens: int, budget: int) -> None:
    """A fixed batch size still needs one problem to fit; bigger batches are the user's call (out-of-memory halves)."""
    auto_batch_size(shape, n_variants, prompt_tokens, max_new_tokens, "cpu", budget)
