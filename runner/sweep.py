"""The loop over batches: problems -> engine -> measures -> one transaction per batch.

A sweep is a `SweepConfig` stored as one `runs` row. Its phases run in order: `reference`
(baseline rollouts of the first problems, only when a method needs reference latents),
`validation` (a stratified subset) and `full` (every problem not stored yet, so validation
problems are not re-run and count in the full results). Each batch is written in one
transaction; a stop, a crash or a kill loses at most the batch in flight, and `resume`
continues with what is not stored, in the same batch order, so it yields the numbers of an
uninterrupted run. Nothing here touches Streamlit: progress goes to a callback.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from typing import Callable

import numpy as np
import psutil
import torch

from db.store import Store, StoreError
from runner import ablation, answers, data
from runner.ablation import Reference, Variant
from runner.model import LatentReasoner, ModelSpec

PHASES = ("validation", "full")


@dataclass(frozen=True)
class SweepConfig:
    model: str = "default"  # 'default' | folder | hub id
    base_model: str | None = None
    dataset: str = "builtin"  # 'builtin' | 'gsm8k' | path
    run_name: str | None = None
    limit: int | None = None  # first N problems (after the optional shuffle)
    shuffle: bool = False  # shuffle the dataset with `seed` before `limit`
    validation: int = 0  # size of the stratified validation subset (0: none)
    phases: tuple[str, ...] = PHASES  # the phases to run now; a resume may pick others
    schemes: tuple[str, ...] = ("prefix", "single", "suffix")
    methods: tuple[str, ...] = ("zero",)
    site: str = "latent"  # latent | resid:L
    mode: str = "recompute"  # recompute | frozen
    batch_size: int | str = "auto"  # problems per batch, or 'auto'
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0  # validation sampling, shuffle, noise and resample draws
    reference_size: int = 64  # problems whose baseline latents feed mean / noise / resample
    max_new_tokens: int = 24
    checkpoint_every: int | None = None  # write the old script's checkpoint_N.json every N problems
    checkpoint_dir: str | None = None
    max_gpu_memory_gb: float | None = None  # auto batch size stops growing before this
    # Checkpoint options (runner/checkpoint.py); None: what the checkpoint declares, else the released value.
    num_latent: int | None = None
    lora_alpha: float | None = None
    merge_lora: bool | None = None  # None: merge in float32 only
    remove_eos: bool | None = None
    use_prj: bool | None = None
    prj_no_ln: bool | None = None

    def model_spec(self) -> ModelSpec:
        return ModelSpec(model=self.model, base_model=self.base_model, device=self.device, dtype=self.dtype,
                         num_latent=self.num_latent, lora_alpha=self.lora_alpha, merge_lora=self.merge_lora,
                         remove_eos=self.remove_eos, use_prj=self.use_prj, prj_no_ln=self.prj_no_ln)

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(values: dict) -> "SweepConfig":
        known = {f.name for f in fields(SweepConfig)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
        return SweepConfig(**values)

    def check(self) -> None:
        """Options that are wrong whatever the model: one clear message each."""
        if self.limit is not None and self.limit < 1:
            raise SweepError(f"--limit must be at least 1, got {self.limit}")
        if self.validation < 0:
            raise SweepError(f"--validation must be 0 or more, got {self.validation}")
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise SweepError(f"--batch-size must be a positive integer or 'auto', got {self.batch_size!r}")
        unknown = [p for p in self.phases if p not in PHASES]
        if unknown or not self.phases:
            raise SweepError(f"unknown phase {unknown or self.phases}: choose from {', '.join(PHASES)}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise SweepError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise SweepError("--device cuda: no CUDA device is visible to this process")
        if self.max_new_tokens < 1:
            raise SweepError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise SweepError(f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")
        if self.num_latent is not None and self.num_latent < 0:
            raise SweepError(f"--num-latent must be 0 or more, got {self.num_latent}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise SweepError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        ablation.expand(self.schemes, self.methods, self.site, self.mode, 0)  # the names only: raises AblationError


class SweepError(ValueError):
    """A sweep that cannot start or continue; the message says why."""


@dataclass(frozen=True)
class Progress:
    """What the dashboard and the CLI show; a snapshot, safe to hand to another thread."""
    run_id: int
    status: str  # running | finished | stopped | failed | interrupted
    phase: str | None
    done: int
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


class BatchSizer:
    """Fixed, or 'auto': double while throughput improves and memory allows; halve on out-of-memory.

    'auto' starts at about START_ROWS rollouts (problems x variants): smaller batches waste most of
    a short sweep warming up, and 256 rows of a 1B model fit any GPU this tool targets.
    """
    START_ROWS = 256

    def __init__(self, requested: int | str, n_variants: int, device: str, max_gpu_memory_gb: float | None):
        self.auto = requested == "auto"
        self.size = max(1, self.START_ROWS // n_variants) if self.auto else int(requested)
        self.max_rows = 8192 if device.startswith("cuda") else 2048
        self.growing, self.best = self.auto, 0.0
        self.n_variants, self.device, self.cap_gb = n_variants, device, max_gpu_memory_gb

    def succeeded(self, problems: int, seconds: float) -> None:
        rate = problems / max(seconds, 1e-9)
        if not self.growing or problems < self.size:
            return
        room = (self.size * 2 * self.n_variants <= self.max_rows)
        if self.cap_gb is not None and self.device.startswith("cuda"):
            room &= torch.cuda.max_memory_allocated(self.device) * 2 < self.cap_gb * 2**30
        if rate > self.best * 1.05 and room:
            self.best, self.size = rate, self.size * 2
        else:
            self.growing = False

    def out_of_memory(self) -> None:
        if self.size == 1:
            raise SweepError("out of memory with a batch of 1 problem: use a smaller model, dtype or fewer variants")
        self.size, self.growing = max(1, self.size // 2), False


def measure(problem: dict, variants: tuple[Variant, ...], texts: list[str], logprobs, lens: list,
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
                     "lens": json.dumps(lens[v])})
    return rows


def _lens(reasoner: LatentReasoner, ids: torch.Tensor, probs: torch.Tensor) -> list:
    """(R, T, k) ids and probs -> per row, per latent, [[token, prob], ...] with readable tokens."""
    vocab = {i: reasoner.tokenizer.decode([i]) for i in torch.unique(ids).tolist()}
    return [[[[vocab[i], round(p, 4)] for i, p in zip(ti, tp)] for ti, tp in zip(ri, rp)]
            for ri, rp in zip(ids.tolist(), probs.tolist())]


def rollout_rows(reasoner: LatentReasoner, variants: tuple[Variant, ...], batch: list[dict], references: dict,
                 seed: int, max_new_tokens: int) -> list[dict]:
    """One batch of problems under every variant -> its result rows, problem-major, baseline first.

    The one path from a rollout to stored rows: the local loop and every Ray worker
    (runner/distributed.py) call it, so both store the same rows for the same batches.
    """
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


def reference_values(reasoner: LatentReasoner, questions: list[str], layer: int | None, batch_size: int) -> np.ndarray:
    """Baseline values fed at each latent step (layer None) or block `layer`'s output there: (N, T, d)."""
    values = []
    for start in range(0, len(questions), max(1, batch_size)):
        chunk = questions[start : start + max(1, batch_size)]
        plan = ablation.make_plan([ablation.BASELINE], [str(i) for i in range(len(chunk))],
                                  reasoner.num_latent, reasoner.d_model)
        out = reasoner.rollout(chunk, plan, max_new_tokens=1, capture=() if layer is None else (layer,))
        values.append(out.latents if layer is None else out.captured[layer])
    return torch.cat(values).numpy()


def measure_resources(process: psutil.Process, device: str) -> dict:
    """This process's memory and CPU, and the device's memory: one `run_metrics` row's worth."""
    gpu = peak = None
    if device.startswith("cuda"):
        gpu = torch.cuda.memory_allocated(device) / 2**20
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    return {"rss_mb": process.memory_info().rss / 2**20, "cpu_pct": process.cpu_percent(None),
            "gpu_mem_mb": gpu, "gpu_peak_mb": peak}


class Sweep:
    """One run: create or resume it, then `run()` until done, stopped or failed."""

    def __init__(self, store: Store, reasoner: LatentReasoner, config: SweepConfig, run_id: int,
                 stop: threading.Event | None = None, on_progress: Callable[[Progress], None] | None = None):
        self.store, self.reasoner, self.config, self.run_id = store, reasoner, config, run_id
        self.stop = stop or threading.Event()
        self.on_progress = on_progress or (lambda progress: None)
        T = reasoner.num_latent
        self.variants = tuple(ablation.expand(config.schemes, config.methods, config.site, config.mode, T))
        self.sizer = BatchSizer(config.batch_size, len(self.variants), config.device, config.max_gpu_memory_gb)
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # starts the CPU-time window
        self.latest: deque = deque(maxlen=8)
        row = store.run_row(run_id)
        self.elapsed_before = float(np.nan_to_num(row["elapsed_s"]))  # summed over resumes
        # Known before run() reads the problems, so a failure that comes earlier can still be reported.
        self.done, self.total = int(row["done"]), int(row["total"])
        self.peak_rss = float(np.nan_to_num(row["peak_rss_mb"]))

    # --- public -----------------------------------------------------------------------------------
    @staticmethod
    def create(store: Store, reasoner: LatentReasoner, config: SweepConfig) -> int:
        """Store a new run and its problems (with their phase); returns the run id."""
        config.check()
        ablation.parse_site(config.site, reasoner.n_layers)
        problems = data.load_problems(config.dataset, limit=config.limit,
                                      seed=config.seed if config.shuffle else None)
        if not problems:
            raise SweepError(f"dataset {config.dataset!r} has no problems")
        validation_ids: set[str] = set()
        if config.validation:
            chosen, _ = data.stratified_sample(problems, config.validation, config.seed)
            validation_ids = {p.problem_id for p in chosen}
        variants = ablation.expand(config.schemes, config.methods, config.site, config.mode, reasoner.num_latent)
        name = config.run_name or f"{os.path.basename(str(config.model))} on {os.path.basename(config.dataset)}"
        # The run's config: what was asked, and what the checkpoint options resolved to (and from where).
        stored = config.to_json() | {"checkpoint_options": getattr(reasoner, "options", None) or {}}
        # One transaction: a crash (or text DuckDB cannot store) leaves no run without its problems.
        return store.create_run(
            name=name, model=config.model, dataset=config.dataset, config=stored, num_latent=reasoner.num_latent,
            n_variants=len(variants), total=len(problems), status="stopped", device=config.device, problems=[
                {"problem_id": p.problem_id, "ord": i, "question": p.question, "gold": p.gold,
                 "gold_value": answers.parse_number(p.gold), "difficulty": p.difficulty, "solution": p.solution,
                 "phase": "validation" if p.problem_id in validation_ids else "full"}
                for i, p in enumerate(problems)])

    def run(self) -> str:
        """Sweep until every requested phase is stored (-> 'finished') or a stop (-> 'stopped')."""
        self.started = time.time()
        self.session_done = 0
        try:
            # Inside the try: a file that cannot take this first write (disk full) is a failed run too.
            self.store.claim_run(self.run_id, self.sizer.size, self.config.device)
            references = self._references()
            problems = self.store.run_problems(self.run_id)
            self.total = len(problems)
            stored = self.store.stored_problem_ids(self.run_id)
            self.done = len(stored)
            self._emit("running")
            for phase in self.config.phases:
                pending = [p for p in problems if p["problem_id"] not in stored
                           and (phase == "full" or p["phase"] == "validation")]
                self.store.update_run(self.run_id, phase=phase)
                if not self._run_phase(phase, pending, references):
                    return self._finish("stopped")
                stored |= {p["problem_id"] for p in pending}
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

    # --- phases -----------------------------------------------------------------------------------
    def _references(self) -> dict[str, Reference]:
        """Baseline values at the sweep's site for the run's first problems, stored once per run."""
        if not any(m != "zero" for m in self.config.methods):
            return {}
        site = self.config.site
        loaded = self.store.load_reference(self.run_id, site)
        if loaded is None:
            self.store.update_run(self.run_id, phase="reference")
            problems = self.store.run_problems(self.run_id)[: self.config.reference_size]
            layer = ablation.parse_site(site, self.reasoner.n_layers)
            values = self._reference_values([p["question"] for p in problems], layer)
            loaded = ([p["problem_id"] for p in problems], values)
            self.store.save_reference(self.run_id, site, *loaded)
        problem_ids, values = loaded
        return {site: Reference(site, tuple(problem_ids), torch.from_numpy(values))}

    def _reference_values(self, questions: list[str], layer: int | None) -> np.ndarray:
        return reference_values(self.reasoner, questions, layer, self.sizer.size)

    def _run_phase(self, phase: str, pending: list[dict], references: dict) -> bool:
        self.phase = phase
        index = 0
        while index < len(pending):
            if self.stop.is_set():
                return False
            batch = pending[index : index + self.sizer.size]
            started = time.time()
            try:
                rows = self._rollout(batch, references)
            except torch.OutOfMemoryError:
                self.sizer.out_of_memory()  # the batch is retried smaller; nothing was written
                if self.config.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                self.store.update_run(self.run_id, batch_size=self.sizer.size)
                continue
            seconds = time.time() - started
            self.session_done += len(batch)
            self.done += len(batch)
            self._write(batch, rows, seconds)
            self.sizer.succeeded(len(batch), seconds)
            index += len(batch)
        return True

    def _rollout(self, batch: list[dict], references: dict) -> list[dict]:
        rows = rollout_rows(self.reasoner, self.variants, batch, references, self.config.seed,
                            self.config.max_new_tokens)
        self._remember(batch, rows)
        return rows

    def _remember(self, batch: list[dict], rows: list[dict]) -> None:
        """The newest baseline answers, for the live view (rows are problem-major, baseline first)."""
        V = len(self.variants)
        for b, problem in enumerate(batch):
            mine = rows[b * V : (b + 1) * V]
            self.latest.appendleft({"problem_id": problem["problem_id"], "question": problem["question"],
                                    "gold": problem["gold"], "answer": mine[0]["answer_text"],
                                    "correct": mine[0]["correct"], "flips": sum(r["flip"] for r in mine)})

    # --- progress ---------------------------------------------------------------------------------
    def _rates(self) -> tuple[float, float | None, float | None]:
        session = time.time() - self.started
        rate = self.session_done / session * 3600 if self.session_done and session > 0 else None
        left = self.total - self.done
        return self.elapsed_before + session, rate, (left / rate * 3600 if rate else None)

    def _write(self, batch: list[dict], rows: list[dict], seconds: float, measured: dict | None = None) -> None:
        """Commit one batch with its metrics; `measured`: resources of the process that ran it (default: this one)."""
        resources = measured or measure_resources(self.process, self.config.device)
        self.peak_rss = max(self.peak_rss, resources["rss_mb"])
        elapsed, rate, _ = self._rates()
        metrics = {"elapsed_s": elapsed, "phase": self.phase, "done": self.done, "batch_problems": len(batch),
                   "batch_size": self.sizer.size, "problems_per_hour": len(batch) / max(seconds, 1e-9) * 3600,
                   **resources}
        self.store.write_batch(self.run_id, rows, metrics, done=self.done, elapsed_s=elapsed,
                               problems_per_hour=rate, peak_rss_mb=self.peak_rss,
                               peak_gpu_mb=resources["gpu_peak_mb"], batch_size=self.sizer.size)
        self._checkpoint(before=self.done - len(batch))
        self._emit("running", resources)

    def _checkpoint(self, before: int) -> None:
        """The old script's checkpoint_N.json (its scores list so far) each time `done` passes a multiple of N."""
        every = self.config.checkpoint_every
        if not every or self.done // every == before // every:
            return
        from db import seed  # the old script's file formats
        folder = self.config.checkpoint_dir or f"{self.store.path.with_suffix('')}_checkpoints/run_{self.run_id}"
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"checkpoint_{self.done // every * every}.json"), "w") as f:
            json.dump(seed.seed_scores(self.store, self.run_id), f, indent=2, ensure_ascii=False)

    def _emit(self, status: str, resources: dict | None = None, error: str | None = None) -> None:
        elapsed, rate, eta = self._rates()
        resources = resources or {}
        self.on_progress(Progress(self.run_id, status, getattr(self, "phase", None), getattr(self, "done", 0),
                                  getattr(self, "total", 0), elapsed, rate, eta, self.sizer.size,
                                  resources.get("rss_mb"), self.peak_rss, resources.get("cpu_pct"),
                                  resources.get("gpu_mem_mb"), resources.get("gpu_peak_mb"),
                                  tuple(self.latest), error))

    def _finish(self, status: str) -> str:
        elapsed, rate, _ = self._rates()
        self.store.update_run(self.run_id, status=status, pid=None, elapsed_s=elapsed, problems_per_hour=rate,
                              finished=True)
        self._emit(status)
        return status
