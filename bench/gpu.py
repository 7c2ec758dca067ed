"""The engine at Llama-3.2-1B scale on one GPU: `python bench/gpu.py [--json] [--tiny]`.

A randomly initialised CODI model of Llama-3.2-1B's shape (16 blocks, hidden 2048, vocabulary
128,256 + 3, prj; LoRA r=128 merged into the weights, which is what the loader does by default)
in bfloat16, on questions of random token ids with the real length distribution of the GSM8K
test questions. Decoding is forced to 8 answer tokens (EOS disabled) so that random weights do not
run to the cap. Prints problems/hour and peak GPU memory of the engine (`--batch-size auto`, the
product's memory estimate, runner/memory.py, capped by --max-gpu-memory-gb) and of the old loop (bench/reference.py) on
a small subset, and their ratio, and the engine's model FLOP utilisation (model FLOPs counted as in
bench/throughput.py, over the device's bf16 matmul rate measured in the same run). The engine runs
as on any CUDA device: static shapes (runner/forward.py's Attended: fixed-capacity cache, finished
rows masked, not dropped), shared-prefix attention, SDPA for the prompt. `--tiny` runs the same code
on a 2-block model on the CPU so that this script cannot rot on machines without a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.reference import reference_answer  # noqa: E402
from bench.throughput import ModelFlops  # noqa: E402
from runner import ablation  # noqa: E402
from runner.model import LatentReasoner  # noqa: E402
from runner import memory  # noqa: E402
from runner.executor import ModelShape  # noqa: E402

GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
# GSM8K test questions measured with the Llama-3 tokenizer average ~62 tokens (min ~15, max ~210);
# without the file at hand we draw from that range.
FALLBACK_LENGTHS = (15, 62, 210)


def question_lengths(n: int, rng: np.random.Generator) -> list[int]:
    """Token counts with the GSM8K test questions' distribution (~1.3 tokens per word)."""
    if GSM8K.exists():
        words = [len(json.loads(line)["question"].split()) for line in GSM8K.open()]
        return [max(4, int(round(w * 1.3))) for w in rng.choice(words, n)]
    low, mode, high = FALLBACK_LENGTHS
    return [int(x) for x in rng.triangular(low, mode, high, n)]


class IdTokenizer:
    """Enough of a tokenizer for random ids: decode to 't<id>' words (no tokenizer files needed)."""
    eos_token_id = None

    def __len__(self):
        return self.vocab

    def __init__(self, vocab: int):
        self.vocab = vocab

    def decode(self, ids, skip_special_tokens=True, **options):
        return " ".join(f"t{i}" for i in ids)

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(r) for r in rows]


def build(tiny: bool, device: str, dtype: torch.dtype) -> LatentReasoner:
    from transformers import LlamaConfig, LlamaForCausalLM
    if tiny:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=1000 + 3, tie_word_embeddings=True)
    else:  # meta-llama/Llama-3.2-1B
        config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=128256 + 3, max_position_embeddings=131072,
                             rope_theta=500000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM(config).to(dtype).eval()
        d = config.hidden_size
        prj = torch.nn.Sequential(torch.nn.Dropout(0.0), torch.nn.Linear(d, d), torch.nn.GELU(),
                                  torch.nn.Linear(d, d), torch.nn.LayerNorm(d)).to(dtype).eval()
    reasoner = LatentReasoner(hf, prj, IdTokenizer(config.vocab_size - 3), 6, config.vocab_size - 3, name="random-1b")
    reasoner.eos_ids = []  # forced-length decoding
    reasoner.static_shapes = True  # the CUDA default, also for --tiny on the CPU: the same code path
    return reasoner


def engine(reasoner, questions, variants, size: int, device: str) -> tuple[float, int]:
    """Every question x variant through the engine, `size` problems a batch, halved on out-of-memory as a
    sweep does; (seconds, final batch)."""
    started, index = time.perf_counter(), 0
    while index < len(questions):
        chunk = questions[index : index + size]
        plan = ablation.make_plan(variants, [str(index + i) for i in range(len(chunk))], 6, reasoner.d_model)
        try:
            reasoner.rollout(chunk, plan, max_new_tokens=8)
        except torch.OutOfMemoryError:
            size = max(1, size // 2)
            torch.cuda.empty_cache()
            continue
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        index += len(chunk)
    return time.perf_counter() - started, size


def matmul_peak_tflops(device: str, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """The device's dense matmul rate in `dtype` measured now (torch.matmul, best of square sizes): the
    denominator of model FLOP utilisation, measured rather than read from a data sheet."""
    best = 0.0
    for n in ((1024, 2048) if device == "cpu" else (4096, 8192)):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        reps, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            a @ b
            reps += 1
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - started) / 1e12)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="2-block model on the CPU (a smoke run)")
    parser.add_argument("--problems", type=int, default=None)
    parser.add_argument("--reference-problems", type=int, default=None)
    parser.add_argument("--schemes", default="prefix", help="prefix = the old configuration (7 variants)")
    parser.add_argument("--max-gpu-memory-gb", type=float, default=70.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = args.problems or (2048 if device == "cuda" else 64)
    n_ref = args.reference_problems or (16 if device == "cuda" else 4)
    reasoner = build(args.tiny or device == "cpu", device, dtype)
    rng = np.random.default_rng(0)
    questions = [rng.integers(0, reasoner.base_vocab, size=length).tolist() for length in question_lengths(n, rng)]
    variants = ablation.expand(tuple(args.schemes.split(",")), ("zero",), "latent", "recompute", 6)

    # The sweep's `auto`: as many problems as the row cap and the memory estimate allow (runner/memory.py).
    budget = memory.device_budget(device, args.max_gpu_memory_gb)
    size = memory.auto_batch_size(ModelShape.of(reasoner), len(variants), max(map(len, questions)), 8, device, budget)
    size = engine(reasoner, questions[:64], variants, size, device)[1]  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with ModelFlops(reasoner) as counted:
        seconds, batch = engine(reasoner, questions, variants, size, device)
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    peak_tflops = matmul_peak_tflops(device, dtype)

    started = time.perf_counter()
    for question in questions[:n_ref]:
        for variant in variants:
            reference_answer(reasoner, question, variant.ablated_positions(6), max_new_tokens=8)
    ref_seconds = time.perf_counter() - started
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (tiny shape)",
              "dtype": str(dtype).removeprefix("torch."), "variants": len(variants), "problems": n,
              "static_shapes": reasoner.static_shapes, "shared_prefix": reasoner.shared_prefix is not False,
              "engine_problems_per_hour": n / seconds * 3600, "engine_batch_problems": batch,
              "reference_problems_per_hour": n_ref / ref_seconds * 3600,
              "speedup": (n / seconds) / (n_ref / ref_seconds), "peak_gpu_memory_gb": peak_gb,
              "gpu_memory_cap_gb": args.max_gpu_memory_gb if device == "cuda" else None,
              "engine_model_tflops": counted.flops / seconds / 1e12, "matmul_peak_tflops": peak_tflops,
              "model_flop_utilisation": counted.flops / seconds / 1e12 / peak_tflops}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key:28} {value:,.1f}" if isinstance(value, float) else f"{key:28} {value}")


if __name__ == "__main__":
    main()
