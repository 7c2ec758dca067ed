"""Engine vs the old one-generation-per-variant loop, on the same problems: `python bench/throughput.py [--json]`.

Prints problems/s of the product's sweep (batched problems x variants, shared question encoding,
results written to a real DuckDB file) and of `bench/reference.py` (the old loop: batch 1, every
variant from scratch, 200-token cap), their ratio, whether every answer is identical (exit 1 if
not), peak RSS, and how the engine's cost scales with problems (100, 300, 1000) and variants
(1, 7, 19). Ratios are measured in one run, on one machine, so that noise hits both sides.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.reference import reference_answer  # noqa: E402
from db.store import Store  # noqa: E402
from runner import ablation, data  # noqa: E402
from runner.model import ModelSpec, load  # noqa: E402
from runner.sweep import Sweep, SweepConfig  # noqa: E402

SEED_SCHEMES = ("prefix",)  # the old configuration: baseline + prefix k = 1..6, zero, latent
DEFAULT_SCHEMES = ("prefix", "single", "suffix")


def engine_sweep(n: int, schemes: tuple[str, ...], batch_size, max_new_tokens: int = 24) -> tuple[float, dict]:
    """The product's sweep into a fresh DuckDB file: seconds, and answer text per (problem, variant key)."""
    with tempfile.TemporaryDirectory() as folder:
        store = Store(Path(folder) / "bench.duckdb")
        config = SweepConfig(dataset="builtin", limit=n, schemes=schemes, methods=("zero",), batch_size=batch_size,
                             max_new_tokens=max_new_tokens)
        reasoner = load(config.model_spec())
        started = time.perf_counter()
        run_id = Sweep.create(store, reasoner, config)
        status = Sweep(store, reasoner, config, run_id).run()
        seconds = time.perf_counter() - started
        assert status == "finished", status
        answers = dict(((p, v), a) for p, v, a in store.query(
            "SELECT problem_id, variant, answer_text FROM results WHERE run_id = ?", [run_id]))
        store.close()
    return seconds, answers


def reference_sweep(reasoner, problems, schemes) -> tuple[float, dict]:
    variants = ablation.expand(schemes, ("zero",), "latent", "recompute", reasoner.num_latent)
    answers, started = {}, time.perf_counter()
    for problem in problems:
        for variant in variants:
            tokens = reference_answer(reasoner, problem.question, variant.ablated_positions(reasoner.num_latent),
                                      variant.latents_fed(reasoner.num_latent))
            answers[(problem.problem_id, variant.key)] = reasoner.tokenizer.decode(tokens, skip_special_tokens=True).strip()
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
    parser.add_argument("--problems", type=int, default=100, help="problems for the engine vs reference comparison")
    parser.add_argument("--reference-problems", type=int, default=40, help="the reference is slow: fewer problems")
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    reasoner = load(ModelSpec())
    problems = data.load_problems("builtin", limit=max(args.problems, 1000))
    ref_problems = problems[: args.reference_problems]
    report, identical = {"machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}"}, True

    for label, schemes in (("seed", SEED_SCHEMES), ("default", DEFAULT_SCHEMES)):
        # The reference's 200-token cap on both sides, so that a rambling ablated row ends the same way.
        engine_seconds, engine_answers = engine_sweep(args.problems, schemes, batch_size, max_new_tokens=200)
        ref_seconds, ref_answers = reference_sweep(reasoner, ref_problems, schemes)
        mismatches = [key for key, text in ref_answers.items() if engine_answers.get(key) != text]
        identical &= not mismatches
        engine_rate, ref_rate = args.problems / engine_seconds, len(ref_problems) / ref_seconds
        report[label] = {"variants": 1 + 6 * len(schemes), "engine_problems_per_s": engine_rate,
                         "reference_problems_per_s": ref_rate, "speedup": engine_rate / ref_rate,
                         "answers_compared": len(ref_answers), "mismatches": mismatches[:5]}
        if not args.json:
            print(f"{label:8} ({report[label]['variants']:2} variants): engine {engine_rate:8.1f} problems/s, "
                  f"reference {ref_rate:6.2f} problems/s, speedup {engine_rate / ref_rate:6.1f}x, "
                  f"{len(ref_answers) - len(mismatches)}/{len(ref_answers)} answers identical")

    if not args.no_scaling:
        report["scaling_problems"] = {}
        for n in (100, 300, 1000):
            seconds, _ = engine_sweep(n, SEED_SCHEMES, batch_size)
            report["scaling_problems"][n] = {"seconds": seconds, "problems_per_s": n / seconds}
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
    report |= {"engine_problems_per_s": seed["engine_problems_per_s"],
               "reference_problems_per_s": seed["reference_problems_per_s"], "speedup": seed["speedup"],
               "answers_identical": identical,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"peak RSS {report['peak_rss_mb']:.0f} MB; answers identical: {identical}")
    sys.exit(0 if identical else 1)


if __name__ == "__main__":
    main()
