"""1 vs K Ray CPU actors on the same sweep: `python bench/distributed.py [--workers 2] [--json]`.

Times the sweep (batches out to the actors, rows back, one DuckDB transaction per batch) on the
embedded model with a fixed batch size, three ways: in this process without Ray (one torch
thread, as each CPU actor has), on 1 actor and on K actors of one local Ray. Actor start-up
(import, model load) is left out: it is paid once per sweep. The three alternate for a few rounds
and the best of each is kept, so that a change in background load does not favour one. Prints
problems/s, the K/1 ratio, how busy the actors were (time in batches / (K x wall clock): near 100%
means the driver keeps them fed, so a ratio under K comes from the cores) and whether every run
stored the same rows (exit 1 if not). On 2 cores the ceiling is 2x, less whatever else runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from db import exports, queries  # noqa: E402
from db.scope import Scope  # noqa: E402
from db.store import Store  # noqa: E402
from runner import distributed  # noqa: E402
from runner.model import load  # noqa: E402
from runner.sweep import Sweep, SweepConfig  # noqa: E402


def timed(store: Store, sweep: Sweep, run_id: int) -> dict:
    started = time.perf_counter()
    assert sweep.run() == "finished"
    seconds = time.perf_counter() - started
    metrics = queries.metrics(store, run_id)
    in_batches = float((metrics.batch_problems / metrics.problems_per_hour * 3600).sum())
    results = exports.results_table(store, Scope(run_id)).to_pandas().drop(columns="run_id")
    for column in ("tokens", "ablated_positions"):  # lists as tuples: DataFrame.equals compares them by value
        results[column] = [None if v is None else tuple(v) for v in results[column]]
    return {"seconds": seconds, "in_batches_s": in_batches, "results": results}


def one_sweep(name: str, config: SweepConfig, store: Store, reasoner, pools: dict) -> dict:
    """A fresh run of `config` in this process ('local') or on the pool of that many actors."""
    if name == "local":
        run_id = Sweep.create(store, reasoner, config)
        return timed(store, Sweep(store, reasoner, config, run_id), run_id)
    executor = distributed.RayExecutor(pools[name][0])
    run_id = Sweep.create(store, executor.shape, config)
    return timed(store, Sweep(store, executor, config, run_id), run_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="K, compared with 1")
    parser.add_argument("--problems", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--schemes", default="prefix,single,suffix")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of local, 1, K; the best of each is kept")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    config = SweepConfig(dataset="builtin", limit=args.problems, schemes=tuple(args.schemes.split(",")),
                         methods=("zero",), batch_size=args.batch_size)
    k, n = str(args.workers), args.problems
    torch.set_num_threads(1)  # as each CPU actor has (Ray sets OMP_NUM_THREADS = num_cpus = 1)
    reasoner = load(config.model_spec())
    ray = distributed.connect(distributed.RayConfig(workers=args.workers, local_cpus=1 + args.workers))
    pools = {}
    for workers in (1, args.workers):  # started once, loaded before any clock runs
        pool = distributed.WorkerPool(ray, config.model_spec(), distributed.RayConfig(workers=workers))
        pools[str(workers)] = (pool, pool.start())
    load_before, best = os.getloadavg()[0], {}
    with tempfile.TemporaryDirectory() as folder:
        store = Store(Path(folder) / "bench.duckdb")
        for round_ in range(args.repeats):  # interleaved, so that a change in background load hits all three
            for name in ("local", "1", k) if round_ % 2 == 0 else (k, "1", "local"):
                run = one_sweep(name, config, store, reasoner, pools)
                if name not in best or run["seconds"] < best[name]["seconds"]:
                    best[name] = run
    for pool, _ in pools.values():
        pool.shutdown()
    ray.shutdown()
    identical = all(run["results"].equals(best["local"]["results"]) for run in best.values())
    out = {"problems": n, "batch_size": args.batch_size, "cores": os.cpu_count(), "repeats": args.repeats,
           "load_average_1m": [load_before, os.getloadavg()[0]], "rows_identical": identical,
           **{f"{name}_problems_per_s": n / run["seconds"] for name, run in best.items()},
           **{f"{name}_busy": run["in_batches_s"] / run["seconds"] / int(name) for name, run in best.items()
              if name != "local"},
           "speedup": best["1"]["seconds"] / best[k]["seconds"]}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{n} problems, batch {args.batch_size}, {os.cpu_count()} cores, best of {args.repeats}, load average "
              f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}")
        print(f"in-process, 1 thread: {out['local_problems_per_s']:.1f}/s; "
              f"1 actor: {out['1_problems_per_s']:.1f}/s (busy {out['1_busy']:.0%}); "
              f"{k} actors: {out[k + '_problems_per_s']:.1f}/s (busy {out[k + '_busy']:.0%})")
        print(f"{k} actors / 1 actor: {out['speedup']:.2f}x; rows identical: {identical}")
    sys.exit(0 if identical else 1)


if __name__ == "__main__":
    main()
