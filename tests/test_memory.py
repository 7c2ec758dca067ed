"""runner/memory.py's estimate against what a batch really takes: the peak RSS growth of one batch of the
embedded model, measured in a fresh process (VmHWM, reset before the batch), stays under the estimate that sized it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MEASURE = """
import json, sys, psutil
from runner import ablation, answers, data, memory
from runner.batch import BatchJob, rollout_batch
from runner.executor import ModelShape
from runner.model import ModelSpec, load
T, B = int(sys.argv[1]), int(sys.argv[2])
reasoner = load(ModelSpec(num_latent=T))
variants = tuple(ablation.expand(("prefix", "single", "suffix"), ("zero",), "latent", "recompute", T))
problems = [dict(problem_id=p.problem_id, question=p.question, gold=p.gold, gold_value=answers.parse_number(p.gold))
            for p in data.load_problems("builtin", limit=B)]
estimate = B * memory.bytes_per_problem(ModelShape.of(reasoner), len(variants),
                                        max(len(p["question"]) for p in problems) + 8, 24)
def high_water() -> int:  # VmHWM, the peak RSS since the last reset, in bytes
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
memory.keep_freed_memory()  # as LocalExecutor sets it for CPU batches
before = psutil.Process().memory_info().rss
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS: the model load's own peak is not counted
result = rollout_batch(reasoner, BatchJob(variants, {}, 0, 24), problems, psutil.Process(), "cpu")
assert result.rows and not result.skipped, result.skipped
peak = high_water()
print(json.dumps({"estimate": estimate, "growth": peak - before}))
"""


@pytest.mark.parametrize("num_latent, problems", [(6, 13), (60, 4)])
def test_the_estimate_bounds_the_memory_one_batch_really_takes(num_latent, problems):
    done = subprocess.run([sys.executable, "-c", MEASURE, str(num_latent), str(problems)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0 < measured["growth"] < measured["estimate"], measured


FAULTS = """
import resource, sys
from runner import ablation, data, memory
from runner.model import ModelSpec, load
if sys.argv[1] == "keep":
    assert memory.keep_freed_memory()
reasoner = load(ModelSpec())
problems = data.load_problems("builtin", limit=128)
variants = ablation.expand(("prefix",), ("zero",), "latent", "recompute", reasoner.num_latent)
plan = ablation.make_plan(variants, [p.problem_id for p in problems], reasoner.num_latent, reasoner.d_model)
def rollout():
    reasoner.rollout([p.question for p in problems], plan, golds=[p.gold for p in problems], max_new_tokens=77)
rollout()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    rollout()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_kept_freed_memory_spares_a_batch_the_page_faults_of_the_one_before():
    """Later 128 x 7 batches fault their pages in again under glibc's defaults (thousands of minor faults
    each: their multi-MB tensors come from fresh mmaps or a trimmed heap), and reuse the first one's with
    keep_freed_memory."""
    faults = {}
    for policy in ("default", "keep"):
        done = subprocess.run([sys.executable, "-c", FAULTS, policy], cwd=REPO, capture_output=True, text=True,
                              timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin"})
        assert done.returncode == 0, done.stderr[-2000:]
        faults[policy] = int(done.stdout.strip().splitlines()[-1])
    assert faults["keep"] * 2 < faults["default"], faults


BETWEEN_WRITES = """
import json, resource, sys
from pathlib import Path
from db import queries
from db.store import Store
from runner import ablation, data, memory
from runner.batch import rollout_rows
from concurrent.futures import ThreadPoolExecutor
from runner.executor import _in_thread
from runner.model import ModelSpec, load
from runner.sweep import Sweep, SweepConfig
assert memory.keep_freed_memory()  # as LocalExecutor sets it
reasoner = load(ModelSpec())
variants = tuple(ablation.expand(("prefix",), ("zero",), "latent", "recompute", reasoner.num_latent))
store = Store(Path(sys.argv[1]) / "kept.duckdb")
config = SweepConfig(dataset="builtin", limit=128, schemes=("prefix",), methods=("zero",), batch_size=128)
problems = store.run_problems(Sweep.create(store, reasoner, config))
def batch():  # on a batch thread, as one CPU worker runs it: its rows, and the page faults it took
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    rows = rollout_rows(reasoner, variants, problems, {}, 0, 77)
    return rows, resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
threads = ThreadPoolExecutor(1)  # as LocalExecutor.run keeps one for a run's batches
rows, first = _in_thread(threads, batch).result()
later = []
for _ in range(3):  # what the sweep's thread does between two batches: commit one, and a page's query
    run_id = store.create_run(name="kept", model="embedded", dataset="builtin", config={},
                              num_latent=reasoner.num_latent, n_variants=len(variants))
    store.write_batch(run_id, rows, done=len(problems))
    queries.runs(store)
    rows, faults = _in_thread(threads, batch).result()
    later.append(faults)
store.close()
print(json.dumps({"first": first, "later": later}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_a_batch_thread_keeps_the_freed_memory_of_the_last_one_across_a_committed_write(tmp_path):
    """One CPU worker's batches on the run's batch thread, a DuckDB commit and a query between them: a later
    batch finds the pages the first faulted in (~30,000 for 128 x 7). With DuckDB's worker threads their
    malloc_trim handed the free pages back (~25,000 faults each); without the top pad glibc unmapped a thread
    arena's empty heaps (5,000-28,000 in a sweep)."""
    done = subprocess.run([sys.executable, "-c", BETWEEN_WRITES, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    faults = json.loads(done.stdout.strip().splitlines()[-1])
    assert faults["first"] > 10_000 and max(faults["later"]) * 4 < faults["first"], faults
