"""The README's reproducibility claims (section "What is bit-identical"), each tested on the real models.

- every stored column is bit-identical across stop/resume (the batch size `auto` chose is recorded
  in the run and reused; batches are cut in problem order), and across Ray vs one process at the
  same thread count (tests/test_distributed.py); a SIGKILLed and resumed CLI run likewise
  (tests/reliability/test_resume_bits.py);
- across thread counts and batch sizes the answers, their tokens and every discrete measure are
  identical, and the float measures agree to 1e-4 (gold_logprob, logprob_drop; logit-lens
  probabilities, rounded to 4 places, to one unit in the last place).
"""
from __future__ import annotations

import dataclasses
import json
import threading

import pytest
import torch

from db.store import Store
from runner.sweep import Sweep, SweepConfig

EVERY_COLUMN = "SELECT * EXCLUDE (run_id) FROM results WHERE run_id = ? ORDER BY problem_id, variant"
FLOATS = ("gold_logprob", "logprob_drop")
TOLERANCE = 1e-4


def run_to_end(store, reasoner, cfg, stop_after_batches: int | None = None) -> tuple[int, int]:
    """A new run, stopped after that many committed batches, then resumed by a fresh Sweep; (run id, stops)."""
    run_id, stops = Sweep.create(store, reasoner, cfg), 0
    while True:
        stop, seen = threading.Event(), []

        def on_progress(progress):
            if progress.status == "running":
                seen.append(progress.done)
                if stop_after_batches is not None and len(seen) > stop_after_batches:
                    stop.set()
        status = Sweep(store, reasoner, cfg, run_id, stop=stop, on_progress=on_progress).run()
        if status == "finished":
            return run_id, stops
        stops += 1


def test_an_auto_run_stopped_and_resumed_equals_an_uninterrupted_one_on_every_column(tmp_path, default_reasoner,
                                                                                      one_torch_thread):
    cfg = SweepConfig(limit=48, validation=12, methods=("zero", "noise"))  # batch size auto; 37 variants
    store = Store(tmp_path / "auto.duckdb")
    whole, _ = run_to_end(store, default_reasoner, cfg)
    parted, stops = run_to_end(store, default_reasoner, cfg, stop_after_batches=1)
    auto = store.run_row(whole)["batch_size"]
    assert stops >= 3 and 1 < auto < 48, (stops, auto)
    assert store.run_row(parted)["batch_size"] == auto  # recorded at creation, reused by every resume
    assert store.query(EVERY_COLUMN, [parted]) == store.query(EVERY_COLUMN, [whole])
    sizes = "SELECT batch_problems FROM run_metrics WHERE run_id = ? ORDER BY done"
    assert store.query(sizes, [parted]) == store.query(sizes, [whole])  # the same batches, cut alike
    ref_whole, ref_parted = store.load_reference(whole, "latent"), store.load_reference(parted, "latent")
    assert ref_whole[0] == ref_parted[0] and (ref_whole[1] == ref_parted[1]).all()


def _columns(store, run_id) -> dict[str, list]:
    """{column: values} of every stored column, as Python values (lists compare as lists)."""
    names = [name for (name,) in store.query("SELECT column_name FROM (DESCRIBE results) WHERE column_name <> 'run_id'")]
    return dict(zip(names, map(list, zip(*store.query(EVERY_COLUMN, [run_id])))))


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory, default_reasoner):
    """The run the others are compared with: one thread, batches of 4."""
    store, cfg = Store(tmp_path_factory.mktemp("threads") / "threads.duckdb"), SweepConfig(limit=16, batch_size=4,
                                                                                          methods=("zero", "mean"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return store, cfg, run_to_end(store, default_reasoner, cfg)[0]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads, batch_size", [(2, 4), (1, 1), (2, "auto")])
def test_thread_count_and_batch_size_change_no_answer_and_floats_within_the_stated_tolerance(
        baseline_run, default_reasoner, threads, batch_size):
    store, base_cfg, base = baseline_run
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        other, _ = run_to_end(store, default_reasoner, dataclasses.replace(base_cfg, batch_size=batch_size))
    finally:
        torch.set_num_threads(before)
    a, b = _columns(store, base), _columns(store, other)
    assert len(a["variant"]) == 16 * 37  # 1 + 2 methods x 18 ablations
    differs = False
    for column in a:
        if column in FLOATS:
            worst = max(abs(x - y) for x, y in zip(a[column], b[column]))
            assert worst <= TOLERANCE, (column, worst)
            differs |= worst > 0
        elif column == "lens":
            for row_a, row_b in zip(a[column], b[column]):
                for latent_a, latent_b in zip(json.loads(row_a), json.loads(row_b)):
                    assert [t for t, _ in latent_a] == [t for t, _ in latent_b]  # the same top tokens
                    assert max(abs(p - q) for (_, p), (_, q) in zip(latent_a, latent_b)) <= TOLERANCE + 1e-12
        else:
            assert a[column] == b[column], column  # answers, tokens, correct, flip, ...: identical
    print(f"threads {threads}, batch {batch_size}: log-probs {'differ' if differs else 'bit-identical'}")
    if batch_size == base_cfg.batch_size:  # the same batches on 2 threads: side by side, one thread each
        assert not differs, "another thread count changed a float: batches no longer run on one thread each"
