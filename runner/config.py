"""A sweep's options (`SweepConfig`, stored as the run's config JSON), their checks, and the batch size.

`prepare(config)` is the one validation of a new run: its options, then its dataset, read once and
before any model is loaded (the dashboard's service and the CLI both call it). `batch_size_for`
decides the run's problems per batch when it is created (runner/memory.py for `auto`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from runner import ablation, data, memory
from runner.errors import SweepError
from runner.executor import ModelShape
from runner.model import ModelSpec

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
    max_gpu_memory_gb: float | None = None  # GPU memory a batch may use at most (CUDA)
    memory_budget_gb: float | None = None  # memory the batches in flight share (None: a share of free RAM / GPU)
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
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise SweepError(f"--memory-budget-gb must be positive, got {self.memory_budget_gb}")
        # The names only (AblationError): T is the model's, known once it is loaded.
        ablation.expand(self.schemes, self.methods, self.site, self.mode, num_latent=0)


def prepare(config: SweepConfig) -> list[data.Problem]:
    """Validate a new run's options and read its problems: once per start, before any model is loaded."""
    config.check()
    problems = data.load_problems(config.dataset, limit=config.limit, seed=config.seed if config.shuffle else None)
    if not problems:
        raise SweepError(f"dataset {config.dataset!r} has no problems")
    return problems


def batch_size_for(config: SweepConfig, shape: ModelShape, n_variants: int, questions: list[str]) -> int:
    """The run's problems per batch: the fixed size, or `auto`'s pick from the memory estimate (runner/memory.py).

    Refuses (MemoryBudgetError) a configuration that cannot fit one problem within the budget.
    """
    budget = shape.memory_budget if shape.memory_budget is not None else memory.device_budget(config.device)
    if config.memory_budget_gb is not None:  # the process's: shared by the batches in flight, as the default is
        budget = int(config.memory_budget_gb * 2**30) // shape.batches_in_flight
    if config.max_gpu_memory_gb is not None and config.device.startswith("cuda"):
        budget = min(budget, int(config.max_gpu_memory_gb * 2**30))
    # Characters bound a BPE prompt's tokens from above; the model's context bounds them too.
    longest = max(map(len, questions), default=0) + 8
    prompt = min(longest, shape.max_positions or longest)
    auto = memory.auto_batch_size(shape, n_variants, prompt, config.max_new_tokens, config.device, budget)
    return auto if config.batch_size == "auto" else int(config.batch_size)


def check_fits_context(config: SweepConfig, shape: ModelShape) -> None:
    """Refuse (SweepError) latents and an answer length that leave no room for any question in the context."""
    # The skip rule (runner.batch.unrunnable) would skip every problem, one by one, and the run would
    # "finish" with no result: refuse at the start instead. The shortest prompt is one question token
    # and BOT; EOT and at least one answer token follow the latents.
    if shape.max_positions is None:
        return
    most = shape.max_positions - shape.num_latent - 3
    if most < 1:
        raise SweepError(f"the model's {shape.max_positions} positions cannot hold {shape.num_latent} latents with a "
                         f"question and an answer: every problem would be skipped; use fewer latents (--num-latent)")
    if config.max_new_tokens > most:
        raise SweepError(f"--max-new-tokens {config.max_new_tokens} does not fit the model's {shape.max_positions} "
                         f"positions with {shape.num_latent} latents: every problem would be skipped; "
                         f"use at most {most} (the question's tokens come out of the same room)")
