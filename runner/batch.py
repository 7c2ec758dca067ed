"""One batch of problems -> its result rows: the code path every executor runs (runner/executor.py's
LocalExecutor, its worker processes, runner/distributed.py's Ray actors), so all store the same rows
for the same batches.

A problem the model cannot run (its prompt and answer do not fit the model's positions, or its
question is empty once tokenised) is left out of its batch and comes back in `skipped` with the
reason, instead of failing the batch (and every resume) with an IndexError.
"""
from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass

import numpy as np
import psutil
import torch

from runner import ablation, answers
from runner.ablation import Variant
from runner.errors import SweepError
from runner.model import LatentReasoner, official_question


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
    resources: dict  # RSS / CPU / GPU memory of the process that ran it; the executor adds sweep_pss_mb


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
    Flat, then joined k and T at a time: half the time of nested generators (~8 of 15 ms a 128 x 7 batch).
    """
    R, T, k = ids.shape
    flat_ids, flat_probs = ids.cpu().reshape(-1).tolist(), probs.float().cpu().reshape(-1).tolist()
    unique = sorted(set(flat_ids))
    with reasoner.tokenizer_lock:
        pieces = reasoner.tokenizer.batch_decode([[i] for i in unique])
    token = {i: json.dumps(t) for i, t in zip(unique, pieces)}
    pairs = [f"[{token[i]}, {_four_places(p)}]" for i, p in zip(flat_ids, flat_probs)]
    latents = ["[" + ", ".join(pairs[j * k : (j + 1) * k]) + "]" for j in range(R * T)]
    return ["[" + ", ".join(latents[r * T : (r + 1) * T]) + "]" for r in range(R)]


def _four_places(p: float) -> str:
    """repr(round(p, 4)) for a probability, without the float in between: both are the correctly rounded
    4-place decimal, and repr's shortest form of it drops its trailing zeros (but one after the point)."""
    text = ("%.4f" % p).rstrip("0")
    return text + "0" if text.endswith(".") else text


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


def sweep_pss_mb(processes: list[psutil.Process]) -> float | None:
    """What the sweep's processes on this machine hold together, in MB: the sum of their PSS, which splits
    each shared page between the processes that map it, so the model's pages that forked workers share
    with the sweep's process count once (a sum of RSS counts them in every process). None where the
    system reports no PSS (only Linux does); a process that has ended counts nothing."""
    total = 0
    for process in processes:
        try:
            pss = getattr(process.memory_full_info(), "pss", None)
        except psutil.NoSuchProcess:  # a zombie too
            continue
        except psutil.Error:  # denied, say: not measured, and the sweep goes on
            return None
        if pss is None:
            return None
        total += pss
    return total / 2**20
