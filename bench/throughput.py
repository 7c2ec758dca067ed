"""The engine against a careful plain-transformers peer and the old loop: `python bench/throughput.py [--json]`.

All in one run, on the same problems, with every answer checked identical (exit 1 if not):
(1) problems/s of the product's sweep (batched problems x variants, shared-prefix attention, results
written to a real DuckDB file; as many problems a batch as the peer by default) against
`bench/peer.py` (problems batched with left padding, the question encoded once per batch and the
DynamicCache deep-copied per variant, own greedy loop),
alternating A/B rounds, best round of each; (2) the engine's achieved GFLOP/s, model FLOPs counted
from the forwards it really ran (2 x matmul parameters x tokens, the logits it kept, attention
2 x 2 x keys x d per token and block), against this machine's fp32 matmul peak measured in the
same run (torch.matmul, best of several square sizes); (3) the ratio to `bench/reference.py`, the
old one-rollout-per-variant loop. Optionally how the engine scales with problems and variants.
Ratios, not absolute times, travel between machines: noise hits both sides of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.peer import peer_answers  # noqa: E402
from bench.reference import reference_answer  # noqa: E402
from db.store import Store  # noqa: E402
from runner import ablation, data  # noqa: E402
from runner.model import ModelSpec, load  # noqa: E402
from runner.executor import LocalExecutor  # noqa: E402
from runner.sweep import Sweep, SweepConfig  # noqa: E402

SEED_SCHEMES = ("prefix",)  # the old configuration: baseline + prefix k = 1..6, zero, latent
DEFAULT_SCHEMES = ("prefix", "single", "suffix")


class Seconds(NamedTuple):
    """Wall clock, and this process's CPU time: on a shared machine the second is the steadier
    measure of work (other processes' load stretches wall time, not CPU time)."""
    wall: float
    cpu: float


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (the sweep's worker processes)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def engine_sweep(reasoner, n: int, schemes: tuple[str, ...], batch_size, max_new_tokens: int = 24,
                 in_process: bool = False) -> tuple[Seconds, dict]:
    """The product's sweep into a fresh DuckDB file: seconds, and answer text per (problem, variant key).
    `in_process`: its batches on threads of this process, where ModelFlops sees their forwards."""
    with tempfile.TemporaryDirectory() as folder:
        store = Store(Path(folder) / "bench.duckdb")
        config = SweepConfig(dataset="builtin", limit=n, schemes=schemes, methods=("zero",), batch_size=batch_size,
                             max_new_tokens=max_new_tokens)
        started, cpu = time.perf_counter(), cpu_seconds()
        run_id = Sweep.create(store, reasoner, config)
        executor = LocalExecutor(reasoner, processes=False) if in_process else reasoner
        status = Sweep(store, executor, config, run_id).run()
        seconds = Seconds(time.perf_counter() - started, cpu_seconds() - cpu)
        assert status == "finished", status
        answers = dict(((p, v), a) for p, v, a in store.query(
            "SELECT problem_id, variant, answer_text FROM results WHERE run_id = ?", [run_id]))
        store.close()
    return seconds, answers


def peer_sweep(reasoner, problems, schemes, batch: int, max_new_tokens: int) -> tuple[Seconds, dict]:
    """bench/peer.py over the same problems and variants: seconds, and answer text per (problem, variant key)."""
    variants = ablation.expand(schemes, ("zero",), "latent", "recompute", reasoner.num_latent)
    answers, started, cpu = {}, time.perf_counter(), cpu_seconds()
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        tokens = peer_answers(reasoner, [p.question for p in chunk],
                              [v.ablated_positions(reasoner.num_latent) for v in variants], max_new_tokens)
        for variant, rows in zip(variants, tokens):
            answers |= {(p.problem_id, variant.key): reasoner.decode(t) for p, t in zip(chunk, rows)}
    return Seconds(time.perf_counter() - started, cpu_seconds() - cpu), answers


class ModelFlops:
    """Model FLOPs of every forward `reasoner` runs while counting (a hook on the model and on prj).

    Per row and block: 2 x matmul parameters per token, and 2 x 2 x d per (query, key) pair for the
    keys a query may attend (the whole cache before it plus the causal part of its own step, as if
    each row had its own copy: the standard count, whatever the engine shares); plus 2 x d x vocab per
    logit kept and 2 x prj parameters per latent. Embedding lookups count nothing.
    """

    def __init__(self, reasoner):
        self.reasoner, self.flops, self.tokens, self.handles = reasoner, 0, 0, []
        self.lock = threading.Lock()  # batches may run side by side (runner/executor.py)
        config = reasoner.hf.config
        self.d, self.layers, self.vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
        self.block_params = sum(p.numel() for p in reasoner.blocks.parameters() if p.dim() == 2)
        self.prj_params = sum(p.numel() for p in reasoner.prj.parameters() if p.dim() == 2)

    def _model(self, cache, attended, position_ids, inputs_embeds=None, input_ids=None, keep=1, **kwargs):
        x = input_ids if input_ids is not None else inputs_embeds
        rows, q = x.shape[:2]
        past = cache.get_seq_length()
        keys = q * past + q * (q + 1) // 2  # per row
        with self.lock:
            self.tokens += rows * q
            self.flops += rows * (2 * self.block_params * q + 4 * self.d * keys * self.layers
                                  + 2 * self.d * self.vocab * keep)
        return self.forward(cache, attended, position_ids, inputs_embeds, input_ids, keep, **kwargs)

    def _prj(self, module, args, output):
        with self.lock:
            self.flops += 2 * self.prj_params * output[..., 0].numel()

    def __enter__(self):
        # Every step of the loop goes through LatentReasoner._forward: counted on the way (an instance
        # attribute in front of the method, removed on exit).
        self.forward, self.reasoner._forward = self.reasoner._forward, self._model
        self.handles = [self.reasoner.prj.register_forward_hook(self._prj)]
        return self

    def __exit__(self, *exc):
        del self.reasoner._forward
        for handle in self.handles:
            handle.remove()


def matmul_peak_gflops(seconds: float = 0.5) -> Seconds:
    """This machine's fp32 torch.matmul rate now, the best of square sizes 512..2048: GFLOP per
    second of wall clock and per second of CPU time."""
    wall = cpu = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        reps, started, used = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - started < seconds:
            a @ b
            reps += 1
        wall = max(wall, 2 * n**3 * reps / (time.perf_counter() - started) / 1e9)
        cpu = max(cpu, 2 * n**3 * reps / max(time.process_time() - used, 1e-9) / 1e9)
    return Seconds(wall, cpu)


def reference_sweep(reasoner, problems, schemes, max_new_tokens: int = 200) -> tuple[float, dict]:
    variants = ablation.expand(schemes, ("zero",), "latent", "recompute", reasoner.num_latent)
    answers, started = {}, time.perf_counter()
    for problem in problems:
        for variant in variants:
            tokens = reference_answer(reasoner, problem.question, variant.ablated_positions(reasoner.num_latent),
                                      variant.latents_fed(reasoner.num_latent), max_new_tokens)
            answers[(problem.problem_id, variant.key)] = reasoner.decode(tokens)
    return time.perf_counter() - started, answers


def engine_rollouts(reasoner, problems, variants, batch: int = 64) -> float:
    """Engine cost alone (no database): seconds for every problem x variant."""
    started = time.perf_counter()
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        plan = ablation.make_plan(variants, [p.problem_id for p in chunk], reasoner.num_latent, reasoner.d_model)
        reasoner.rollout([p.question for p in chunk], plan, golds=[p.gold for p in chunk])
    return time.perf_counter() - started


def cli_wall_clock(n: int) -> float:
    """`python -m runner sweep` end to end (start-up, model load, database): the user's wall clock."""
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "runner", "sweep", "--limit", str(n), "--schemes", "prefix",
                        "--db", str(Path(folder) / "cli.duckdb"), "--quiet"], cwd=REPO, check=True)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=300, help="problems for engine vs peer")
    parser.add_argument("--reference-problems", type=int, default=20, help="the old loop is slow: fewer problems")
    parser.add_argument("--rounds", type=int, default=2, help="alternating engine/peer rounds; the best of each")
    parser.add_argument("--batch-size", default="peer", help="the engine's problems per batch (the product's "
                        "--batch-size: N or auto); default: the peer's, so both batch alike")
    parser.add_argument("--peer-batch", type=int, default=128, help="problems per peer batch")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="the old loop's answer cap, on every side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scaling", action="store_true", help="also: engine cost vs problems and variants, CLI wall clock")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch_size = {"auto": "auto", "peer": args.peer_batch}.get(args.batch_size) or int(args.batch_size)
    reasoner = load(ModelSpec())
    problems = data.load_problems("builtin", limit=max(args.problems, 1000 if args.scaling else 0))
    ref_problems, mnt = problems[: args.reference_problems], args.max_new_tokens
    # The old loop's 200-token cap runs past the embedded model's 128 positions (44 prompt + 6 latents +
    # EOT leave 77), where the sweep refuses every problem: the cap is what the model holds.
    limit = getattr(reasoner.hf.config, "n_positions", None)
    if limit is not None:
        longest = max(len(reasoner.prompt_ids(p.question)) for p in problems)
        mnt = min(mnt, limit - longest - reasoner.num_latent - len(reasoner.answer_start))
    peaks = [matmul_peak_gflops()]
    report, identical = {"machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}",
                         "problems": args.problems, "peer_batch": args.peer_batch, "engine_batch": batch_size,
                         "max_new_tokens": mnt}, True

    for label, schemes in (("seed", SEED_SCHEMES), ("default", DEFAULT_SCHEMES)):
        engine_times, peer_times, mismatches = [], [], []
        # Forwards are counted in a sweep of its own, untimed, with the same batches on threads of this
        # process: the timed sweeps' worker processes (runner/workers.py) count in their own memory.
        with ModelFlops(reasoner) as counted:
            engine_sweep(reasoner, args.problems, schemes, batch_size, mnt, in_process=True)
        for round_ in range(args.rounds):  # alternating, so that load on a shared machine hits both sides
            seconds, engine_answers = engine_sweep(reasoner, args.problems, schemes, batch_size, mnt)
            engine_times.append(seconds)
            seconds, peer_answer = peer_sweep(reasoner, problems[: args.problems], schemes, args.peer_batch, mnt)
            peer_times.append(seconds)
            mismatches += [key for key, text in peer_answer.items() if engine_answers.get(key) != text]
        peaks.append(matmul_peak_gflops())
        ref_seconds, ref_answers = reference_sweep(reasoner, ref_problems, schemes, mnt)
        mismatches += [key for key, text in ref_answers.items() if engine_answers.get(key) != text]
        identical &= not mismatches and len(peer_answer) == len(engine_answers)
        engine, peer = (Seconds(min(t.wall for t in times), min(t.cpu for t in times)) for times in (engine_times, peer_times))
        engine_rate, peer_rate = args.problems / engine.wall, args.problems / peer.wall
        ref_rate = len(ref_problems) / ref_seconds
        report[label] = {"variants": 1 + 6 * len(schemes), "engine_problems_per_s": engine_rate,
                         "peer_problems_per_s": peer_rate, "engine_vs_peer": engine_rate / peer_rate,
                         "engine_vs_peer_rounds": [p.wall / e.wall for e, p in zip(engine_times, peer_times)],
                         "engine_vs_peer_cpu_time": peer.cpu / engine.cpu,
                         "reference_problems_per_s": ref_rate, "engine_vs_reference": engine_rate / ref_rate,
                         "engine_gflops": counted.flops / engine.wall / 1e9,
                         "engine_gflop_per_cpu_s": counted.flops / engine.cpu / 1e9,
                         "engine_model_gflop": counted.flops / 1e9, "engine_tokens": counted.tokens,
                         "answers_compared": len(peer_answer) + len(ref_answers), "mismatch_count": len(mismatches),
                         "mismatches": mismatches[:5]}

    peak = Seconds(max(p.wall for p in peaks), max(p.cpu for p in peaks))  # measured around each: the best
    report["matmul_peak_gflops"], report["matmul_peak_gflop_per_cpu_s"] = peak.wall, peak.cpu
    for label in ("seed", "default"):
        row = report[label]
        row["engine_fraction_of_matmul_peak"] = row["engine_gflops"] / peak.wall
        row["engine_fraction_of_matmul_peak_cpu_time"] = row["engine_gflop_per_cpu_s"] / peak.cpu
        if not args.json:
            print(f"{label:8} ({row['variants']:2} variants, {args.problems} problems): engine "
                  f"{row['engine_problems_per_s']:6.1f} problems/s, peer {row['peer_problems_per_s']:6.1f}: "
                  f"{row['engine_vs_peer']:.2f}x (rounds {', '.join(f'{x:.2f}x' for x in row['engine_vs_peer_rounds'])}; "
                  f"CPU time {row['engine_vs_peer_cpu_time']:.2f}x); old loop {row['reference_problems_per_s']:5.2f} "
                  f"({row['engine_vs_reference']:.1f}x); engine {row['engine_gflops']:.1f} GFLOP/s = "
                  f"{100 * row['engine_fraction_of_matmul_peak']:.0f}% of the matmul peak "
                  f"({100 * row['engine_fraction_of_matmul_peak_cpu_time']:.0f}% per CPU second); "
                  f"{row['answers_compared'] - row['mismatch_count']}/{row['answers_compared']} answers identical")
    if args.scaling:
        report["scaling_problems"] = {}
        for n in (100, 300, 1000):
            seconds, _ = engine_sweep(reasoner, n, SEED_SCHEMES, batch_size)
            report["scaling_problems"][n] = {"seconds": seconds.wall, "problems_per_s": n / seconds.wall}
        report["scaling_variants"] = {}
        base = problems[:300]
        for schemes in ((), SEED_SCHEMES, DEFAULT_SCHEMES):
            variants = [ablation.BASELINE] + (ablation.expand(schemes, ("zero",), "latent", "recompute", 6)[1:] if schemes else [])
            seconds = engine_rollouts(reasoner, base, variants)
            report["scaling_variants"][len(variants)] = {"seconds": seconds, "rollouts_per_s": len(base) * len(variants) / seconds}
        report["cli_1000_seed_sweep_s"] = cli_wall_clock(1000)
        if not args.json:
            for n, row in report["scaling_problems"].items():
                print(f"engine, seed configuration, {n:5} problems: {row['seconds']:6.2f} s ({row['problems_per_s']:.1f}/s)")
            for v, row in report["scaling_variants"].items():
                print(f"engine rollouts, 300 problems x {v:2} variants: {row['seconds']:6.2f} s "
                      f"({row['rollouts_per_s']:.0f} rollouts/s)")
            print(f"`python -m runner sweep --limit 1000 --schemes prefix`: {report['cli_1000_seed_sweep_s']:.1f} s wall clock")

    seed = report["seed"]
    report |= {"engine_vs_peer": seed["engine_vs_peer"], "speedup": seed["engine_vs_reference"],
               "engine_fraction_of_matmul_peak": seed["engine_fraction_of_matmul_peak"],
               "engine_fraction_of_matmul_peak_cpu_time": seed["engine_fraction_of_matmul_peak_cpu_time"],
               "answers_identical": identical,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"fp32 matmul peak {peak.wall:.0f} GFLOP/s ({peak.cpu:.0f} per CPU second); peak RSS {report['peak_rss_mb']:.0f} MB; "
              f"answers identical: {identical}")
    sys.exit(0 if identical else 1)


if __name__ == "__main__":
    main()
