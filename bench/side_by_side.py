"""How two CPU cores share the rollout: `python bench/side_by_side.py [--batch N] [--json]`.

One batch of the built-in problems (bench/breakdown.py's: the seed's 7 variants, gold scoring on)
rolled out (1) alone on one torch thread, (2) twice at once on two Python threads of one process,
one torch thread each (what runner/executor.py's LocalExecutor does with two workers), (3) twice at
once in two forked processes, one torch thread each, and (4) alone on two torch threads. Each
figure is the best of `--repeats`; the speedups are two batches' work over the time taken, against
one batch alone. Threads share the GIL (the rollout is many small ops with Python between them);
processes share only the hardware. Needs two cores and `fork` (Linux).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.breakdown import seed_batch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=146, help="problems in a batch (146: `auto` on the embedded model)")
    parser.add_argument("--repeats", type=int, default=4, help="timed tries of each arrangement; the fastest counts")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    _, n_variants, one_batch = seed_batch(args.batch)

    def rollout(threads: int = 1) -> None:
        torch.set_num_threads(threads)  # a new thread or process sets its own (see runner/executor.py)
        one_batch()

    def threads_side_by_side() -> None:
        pair = [threading.Thread(target=rollout) for _ in range(2)]
        for thread in pair:
            thread.start()
        for thread in pair:
            thread.join()

    def processes_side_by_side() -> None:
        pair = [multiprocessing.get_context("fork").Process(target=rollout) for _ in range(2)]
        for process in pair:
            process.start()
        for process in pair:
            process.join()
        assert all(process.exitcode == 0 for process in pair), [process.exitcode for process in pair]

    def best(arrangement) -> float:
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            arrangement()
            seconds.append(time.perf_counter() - started)
        return min(seconds)

    rollout()  # warm-up
    alone = best(rollout)
    report = {"problems": args.batch, "rows": args.batch * n_variants, "alone_1_thread_s": alone,
              "threads_side_by_side_s": best(threads_side_by_side),
              "processes_side_by_side_s": best(processes_side_by_side),
              "alone_2_threads_s": best(lambda: rollout(2))}
    torch.set_num_threads(1)
    report |= {"speedup_threads_side_by_side": 2 * alone / report["threads_side_by_side_s"],
               "speedup_processes_side_by_side": 2 * alone / report["processes_side_by_side_s"],
               "speedup_one_batch_on_2_threads": alone / report["alone_2_threads_s"]}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"one batch of {args.batch} problems x {n_variants} variants alone on one thread: {1e3 * alone:.0f} ms")
    for name, key in (("two batches on two threads of one process", "threads_side_by_side"),
                      ("two batches in two processes", "processes_side_by_side")):
        print(f"{name}: {1e3 * report[key + '_s']:.0f} ms, {report['speedup_' + key]:.2f}x of one core")
    print(f"one batch on two torch threads: {1e3 * report['alone_2_threads_s']:.0f} ms, "
          f"{report['speedup_one_batch_on_2_threads']:.2f}x")


if __name__ == "__main__":
    main()
