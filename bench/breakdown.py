"""Where one batch's time goes, and the rollout's share of the matmul peak: `python bench/breakdown.py [--json]`.

One batch of the built-in problems (`--batch` problems x the seed's 7 variants, gold scoring on,
the old loop's 200-token cap) through `LatentReasoner.rollout` alone (no database), on one thread:
model FLOPs counted as in bench/throughput.py over the CPU time it took, against the fp32
torch.matmul peak measured in the same run; then torch.profiler's self CPU time by operator,
grouped into matmuls, attention, element-wise work and the rest; and the batch's work around the
rollout as the sweep does it (its rows, then one transaction into a DuckDB file). bench/throughput.py
measures the whole sweep (status file, start-up included); this isolates the engine.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.throughput import ModelFlops, matmul_peak_gflops  # noqa: E402
from db.store import Store  # noqa: E402
from runner import ablation, data, memory  # noqa: E402
from runner.batch import rollout_rows  # noqa: E402
from runner.model import ModelSpec, load  # noqa: E402
from runner.sweep import Sweep, SweepConfig  # noqa: E402

# Every operator that does arithmetic or moves data has a group (addmm_ is the in-place one the residual and the
# MLP's second matmul use); the rest is the small ops (views, allocation) and Python, listed with the report.
GROUPS = {"matmul": ("aten::addmm", "aten::addmm_", "aten::mm", "aten::bmm", "aten::matmul"),
          "attention (softmax, SDPA, masks)": ("aten::_softmax", "aten::_scaled_dot_product_flash_attention_for_cpu",
                                               "aten::masked_fill_", "aten::cat", "aten::bitwise_and", "aten::where"),
          "GELU (sigmoid form) and other element-wise": ("aten::mul", "aten::mul_", "aten::add", "aten::add_",
                                                         "aten::addcmul", "aten::addcmul_", "aten::sigmoid_",
                                                         "aten::sum", "aten::sub", "aten::exp", "aten::argmax",
                                                         "aten::topk", "aten::_log_softmax", "aten::fill_"),
          "layer norm": ("aten::native_layer_norm",),
          "copies and indexing": ("aten::copy_", "aten::index", "aten::index_select", "aten::index_copy_",
                                  "aten::scatter", "aten::gather")}


def seed_batch(size: int):
    """The embedded model on one torch thread and one batch of `size` built-in problems under the seed's 7
    variants: (reasoner, variants, rollout), rollout() running it with gold scoring and the old loop's cap."""
    torch.set_num_threads(1)
    memory.keep_freed_memory()  # as the sweep's CPU batches run (runner/executor.py)
    reasoner = load(ModelSpec())
    problems = data.load_problems("builtin", limit=size)
    variants = ablation.expand(("prefix",), ("zero",), "latent", "recompute", reasoner.num_latent)
    plan = ablation.make_plan(variants, [p.problem_id for p in problems], reasoner.num_latent, reasoner.d_model)

    def rollout():
        return reasoner.rollout([p.question for p in problems], plan, golds=[p.gold for p in problems],
                                max_new_tokens=200)
    return reasoner, len(variants), rollout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="problems in the batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed rollouts; the fastest counts")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    reasoner, n_variants, rollout = seed_batch(args.batch)
    rollout()  # warm-up
    with ModelFlops(reasoner) as counted:
        rollout()
    best = float("inf")
    for _ in range(args.repeats):  # CPU time, fastest of several: other processes' load stretches it, never shrinks it
        started = time.process_time()
        rollout()
        best = min(best, time.process_time() - started)
    forwards = timed_forwards(reasoner, rollout)
    around = around_the_rollout(reasoner, args.batch, args.repeats)
    peak = matmul_peak_gflops().cpu
    with torch.profiler.profile() as profiler:
        rollout()
    self_us = Counter({e.key: e.self_cpu_time_total for e in profiler.key_averages()})
    total = sum(self_us.values())
    shares = {group: sum(self_us[name] for name in names) / total for group, names in GROUPS.items()}
    shares["rest (small ops, Python)"] = 1 - sum(shares.values())
    grouped = {name for names in GROUPS.values() for name in names}
    rest = Counter({name: us for name, us in self_us.items() if name not in grouped})
    report = {"problems": args.batch, "rows": args.batch * n_variants, "model_gflop": counted.flops / 1e9,
              "cpu_seconds": best, "gflop_per_cpu_s": counted.flops / best / 1e9, "matmul_peak_gflop_per_cpu_s": peak,
              "fraction_of_matmul_peak": counted.flops / best / 1e9 / peak, "profile_shares": shares,
              "forwards_ms": forwards, "around_the_rollout_ms": around,
              "top_operators_ms": {name: us / 1e3 for name, us in self_us.most_common(12)},
              "rest_operators_ms": {name: us / 1e3 for name, us in rest.most_common(6)}}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.batch} problems x {n_variants} variants, 1 thread: {report['model_gflop']:.1f} model GFLOP in "
          f"{best:.3f} CPU s = {report['gflop_per_cpu_s']:.1f} GFLOP/s = "
          f"{100 * report['fraction_of_matmul_peak']:.0f}% "
          f"of the fp32 matmul peak ({peak:.0f} GFLOP per CPU second)")
    for group, share in shares.items():
        print(f"  {100 * share:5.1f}%  {group}")
    print("  the rest's largest: " + ", ".join(f"{name} {ms:.1f} ms"
                                               for name, ms in report["rest_operators_ms"].items()))
    print("wall clock by forward (no profiler): " + ", ".join(f"{name} {ms:.0f} ms" for name, ms in forwards.items()))
    print(f"around the rollout (wall clock): its {report['rows']} rows {around['rows']:.1f} ms, storing them "
          f"{around['store']:.1f} ms")


def around_the_rollout(reasoner, size: int, repeats: int) -> dict[str, float]:
    """Milliseconds, the fastest of `repeats`, of the seed batch's work around its rollout as the sweep does it:
    its rows (runner/batch.py's rollout_rows less the rollout inside it) and storing them (Store.write_batch:
    one transaction into a DuckDB file, a new run each time)."""
    variants = tuple(ablation.expand(("prefix",), ("zero",), "latent", "recompute", reasoner.num_latent))
    config = SweepConfig(dataset="builtin", limit=size, schemes=("prefix",), methods=("zero",), batch_size=size)
    rows_ms = store_ms = float("inf")
    inner, rollout = [], reasoner.rollout

    def timed(*args, **kwargs):
        started = time.perf_counter()
        out = rollout(*args, **kwargs)
        inner.append(time.perf_counter() - started)
        return out
    with tempfile.TemporaryDirectory() as folder:
        store = Store(Path(folder) / "breakdown.duckdb")
        problems = store.run_problems(Sweep.create(store, reasoner, config))  # as the sweep hands them out
        reasoner.rollout = timed  # an instance attribute in front of the method, removed below
        try:
            for _ in range(repeats):
                started = time.perf_counter()
                rows = rollout_rows(reasoner, variants, problems, {}, 0, 200)
                rows_ms = min(rows_ms, 1e3 * (time.perf_counter() - started - inner.pop()))
                run_id = store.create_run(name="breakdown", model="embedded", dataset="builtin", config={},
                                          num_latent=reasoner.num_latent, n_variants=len(variants))
                started = time.perf_counter()
                store.write_batch(run_id, rows, done=size)
                store_ms = min(store_ms, 1e3 * (time.perf_counter() - started))
        finally:
            del reasoner.rollout
            store.close()
    return {"rows": rows_ms, "store": store_ms}


def timed_forwards(reasoner, rollout) -> dict[str, float]:
    """Milliseconds of one rollout by forward, in the loop's order: the prompt, the latent steps, EOT, the
    teacher-forced gold answer (one forward of several tokens), the decoding steps (the first, with every
    row, apart), and the rest (the loop's own work between forwards)."""
    spent: list[tuple[int, int, float]] = []  # (rows, tokens, seconds) per forward
    forward = reasoner._forward

    def timed(cache, attended, position_ids, inputs_embeds=None, input_ids=None, *args, **kwargs):
        started = time.perf_counter()
        out = forward(cache, attended, position_ids, inputs_embeds, input_ids, *args, **kwargs)
        x = input_ids if input_ids is not None else inputs_embeds
        spent.append((x.shape[0], x.shape[1], time.perf_counter() - started))
        return out
    reasoner._forward = timed  # an instance attribute in front of the method, removed below
    try:
        started = time.perf_counter()
        rollout()
        total = time.perf_counter() - started
    finally:
        del reasoner._forward
    T = reasoner.num_latent
    prompt, latents, eot, rest = spent[0], spent[1 : T + 1], spent[T + 1], spent[T + 2 :]
    gold = [rest.pop(0)] if rest and rest[0][1] > 1 else []
    parts = {"prompt": [prompt], f"{T} latent steps": latents, "EOT": [eot], "gold answer": gold,
             "first decoding step": rest[:1], f"{max(len(rest) - 1, 0)} more decoding steps": rest[1:]}
    ms = {name: 1e3 * sum(s for _, _, s in part) for name, part in parts.items()}
    return ms | {"rest": 1e3 * total - sum(ms.values()), "rollout": 1e3 * total}


if __name__ == "__main__":
    main()
