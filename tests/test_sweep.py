"""Sweeps into a real DuckDB file with a real (tiny) model: rows, phases, stop/resume, faults."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading

import psutil
import pytest
import torch

from db.store import Store
from runner import ablation
from runner.model import LatentReasoner
from runner.sweep import Sweep, SweepConfig, SweepError
from tests.reliability.support import FlakyReasoner

COLUMNS = "problem_id, variant, answer_text, answer_value, correct, changed, flip, harm, help, gold_logprob, lens"


def config(model_dir, **overrides) -> SweepConfig:
    values = dict(model=str(model_dir), dataset="builtin", limit=12, batch_size=4, validation=6,
                  schemes=("prefix", "exit"), methods=("zero",))
    return SweepConfig(**(values | overrides))


def sweep(store, reasoner, cfg, stop_after: int | None = None, executor=None) -> tuple[int, str]:
    """A new run swept by `reasoner` (or by `executor`, with `reasoner` its shape)."""
    run_id = Sweep.create(store, reasoner, cfg)
    return run_id, run(store, executor or reasoner, cfg, run_id, stop_after)


def run(store, reasoner, cfg, run_id, stop_after=None) -> str:
    stop = threading.Event()

    def on_progress(progress):
        if stop_after is not None and progress.status == "running" and progress.done >= stop_after:
            stop.set()
    return Sweep(store, reasoner, cfg, run_id, stop=stop, on_progress=on_progress).run()


def rows(store, run_id) -> list[tuple]:
    return store.query(f"SELECT {COLUMNS} FROM results WHERE run_id = ? ORDER BY problem_id, variant", [run_id])


def test_a_sweep_stores_every_problem_times_every_variant(tmp_path, tiny_reasoner, tiny_model_dir):
    store = Store(tmp_path / "s.duckdb")
    cfg = config(tiny_model_dir, schemes=("prefix", "single", "suffix", "exit"), methods=("zero", "mean"))
    run_id, status = sweep(store, tiny_reasoner, cfg)
    variants = ablation.expand(cfg.schemes, cfg.methods, cfg.site, cfg.mode, tiny_reasoner.num_latent)
    assert status == "finished"
    assert len(variants) == 1 + 2 * (6 + 6 + 6) + 7
    (n, distinct) = store.query("SELECT count(*), count(DISTINCT (problem_id, variant)) FROM results WHERE run_id = ?",
                                [run_id])[0]
    assert n == distinct == 12 * len(variants)
    run_row = store.run_row(run_id)
    assert (run_row["status"], run_row["done"], run_row["total"], run_row["phase"]) == ("finished", 12, 12, "full")
    assert run_row["elapsed_s"] > 0 and run_row["problems_per_hour"] > 0 and run_row["peak_rss_mb"] > 100
    phases = dict(store.query("SELECT phase, count(*) FROM problems WHERE run_id = ? GROUP BY phase", [run_id]))
    assert sum(phases.values()) == 12 and 1 <= phases["validation"] <= 6
    # One metrics row per batch: the validation batches, then the rest in batches of 4.
    n_batches = -(-phases["validation"] // 4) + -(-phases["full"] // 4)
    assert store.query("SELECT count(*) FROM run_metrics WHERE run_id = ?", [run_id])[0][0] == n_batches
    assert store.load_reference(run_id, "latent")[1].shape == (cfg.reference_size and 12, 6, tiny_reasoner.d_model)


def test_measures_are_consistent_with_the_baseline(tmp_path, tiny_reasoner, tiny_model_dir):
    store = Store(tmp_path / "s.duckdb")
    run_id, _ = sweep(store, tiny_reasoner, config(tiny_model_dir))
    bad = store.query("""
        SELECT count(*) FROM results r JOIN results b
          ON b.run_id = r.run_id AND b.problem_id = r.problem_id AND b.scheme = 'baseline'
        WHERE r.run_id = ? AND (r.flip <> (r.correct <> b.correct) OR r.harm <> (b.correct AND NOT r.correct)
           OR r.help <> (NOT b.correct AND r.correct)
           OR abs(r.logprob_drop - (b.gold_logprob - r.gold_logprob)) > 1e-9)""", [run_id])[0][0]
    assert bad == 0
    # The exit variant that feeds every latent is the baseline itself: same answer, same log-prob.
    same = store.query("""
        SELECT count(*) FROM results r JOIN results b USING (run_id, problem_id)
        WHERE r.run_id = ? AND r.variant = 'exit:6/none/latent/recompute' AND b.scheme = 'baseline'
          AND r.answer_text = b.answer_text AND r.gold_logprob = b.gold_logprob AND NOT r.changed""", [run_id])[0][0]
    assert same == 12


def test_stop_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_reasoner, tiny_model_dir):
    store = Store(tmp_path / "s.duckdb")
    cfg = config(tiny_model_dir, methods=("zero", "noise"))
    whole, _ = sweep(store, tiny_reasoner, cfg)
    parted, status = sweep(store, tiny_reasoner, cfg, stop_after=5)
    assert status == "stopped"
    row = store.run_row(parted)
    assert row["status"] == "stopped" and 5 <= row["done"] < 12
    stored = len(rows(store, parted))
    assert stored == row["done"] * row["n_variants"]  # whole batches only
    assert run(store, tiny_reasoner, cfg, parted) == "finished"
    assert rows(store, parted) == rows(store, whole)


def test_validation_phase_alone_then_full_does_not_rerun_validation(tmp_path, tiny_reasoner, tiny_model_dir):
    store = Store(tmp_path / "s.duckdb")
    cfg = config(tiny_model_dir, phases=("validation",))
    run_id, status = sweep(store, tiny_reasoner, cfg)
    validation = store.query("SELECT count(*) FROM problems WHERE run_id = ? AND phase = 'validation'", [run_id])[0][0]
    assert status == "finished" and store.run_row(run_id)["done"] == validation
    before = rows(store, run_id)
    assert run(store, tiny_reasoner, SweepConfig.from_json({**cfg.to_json(), "phases": ["full"]}), run_id) == "finished"
    after = rows(store, run_id)
    assert len(after) == 12 * store.run_row(run_id)["n_variants"]
    assert set(before) <= set(after)


def test_out_of_memory_halves_the_batch_and_loses_nothing(tmp_path, tiny_reasoner, tiny_model_dir):
    store = Store(tmp_path / "s.duckdb")
    cfg = config(tiny_model_dir, validation=0, batch_size=8)
    flaky = FlakyReasoner(tiny_reasoner, fail_on={1}, error=torch.cuda.OutOfMemoryError("CUDA out of memory"))
    run_id, status = sweep(store, flaky, cfg)
    assert status == "finished"
    assert store.run_row(run_id)["batch_size"] == 4
    # The retried batches are those of a sweep at batch size 4: the same rows, bit for bit.
    reference_store = Store(tmp_path / "r.duckdb")
    reference, _ = sweep(reference_store, tiny_reasoner, SweepConfig.from_json({**cfg.to_json(), "batch_size": 4}))
    assert rows(store, run_id) == rows(reference_store, reference)


def test_a_model_error_marks_the_run_failed_and_keeps_committed_batches(tmp_path, tiny_reasoner, tiny_model_dir):
    store = Store(tmp_path / "s.duckdb")
    cfg = config(tiny_model_dir, validation=0)
    flaky = FlakyReasoner(tiny_reasoner, fail_on={2}, error=RuntimeError("injected fault in batch 2"))
    run_id = Sweep.create(store, flaky, cfg)
    with pytest.raises(RuntimeError, match="injected"):
        run(store, flaky, cfg, run_id)
    row = store.run_row(run_id)
    assert row["status"] == "failed" and "injected fault in batch 2" in row["error"]
    assert row["done"] == 4 and len(rows(store, run_id)) == 4 * row["n_variants"]
    assert run(store, tiny_reasoner, cfg, run_id) == "finished"  # and it resumes


def test_bad_options_are_refused_before_anything_is_stored(tmp_path, tiny_reasoner, tiny_model_dir):
    store = Store(tmp_path / "s.duckdb")
    for bad, message in [({"limit": 0}, "--limit"), ({"batch_size": 0}, "--batch-size"),
                         ({"schemes": ("sideways",)}, "scheme"), ({"site": "resid:9"}, "layer"),
                         ({"methods": ()}, "method"), ({"dataset": str(tmp_path / "none.jsonl")}, "none.jsonl")]:
        with pytest.raises((SweepError, ValueError), match=message):
            Sweep.create(store, tiny_reasoner, config(tiny_model_dir, **bad))
    assert store.query("SELECT count(*) FROM runs")[0][0] == 0


def test_a_run_left_running_by_a_dead_process_opens_as_interrupted(tmp_path, tiny_reasoner, tiny_model_dir):
    path = tmp_path / "s.duckdb"
    store = Store(path)
    run_id = Sweep.create(store, tiny_reasoner, config(tiny_model_dir))
    store.update_run(run_id, status="running", pid=2**22 + 7)  # no such process
    store.close()
    assert Store(path).run_row(run_id)["status"] == "interrupted"


def test_a_problem_the_model_cannot_run_is_skipped_with_its_reason_and_the_sweep_goes_on(
        tmp_path, default_reasoner, gsm8k_path, one_torch_thread):
    """Issue 14 case 8: GSM8K's 5th test question does not fit the embedded model's 128 positions (it died
    with IndexError, and so did every resume). Skipped with its reason; a stopped run resumes to the rows
    of an uninterrupted one and does not retry it."""
    from runner.batch import BatchJob, rollout_rows
    cfg = SweepConfig(dataset=str(gsm8k_path), limit=40, batch_size=8, schemes=("prefix",))
    store = Store(tmp_path / "poison.duckdb")
    whole, status = sweep(store, default_reasoner, cfg)
    assert status == "finished"
    skipped = store.skipped_problems(whole)
    assert list(skipped) == ["gsm8k-test-0004"], skipped
    assert "too long for the model's 128 positions" in skipped["gsm8k-test-0004"]
    poison = next(p for p in store.run_problems(whole) if p["problem_id"] in skipped)
    job = BatchJob(tuple(ablation.expand(("prefix",), ("zero",), "latent", "recompute", 6)), {}, 0, 24)
    with pytest.raises(IndexError):  # what the sweep died of: the skip is needed, not cautious
        rollout_rows(default_reasoner, job.variants, [poison], {}, 0, 24)
    row = store.run_row(whole)
    stored = store.query("SELECT count(DISTINCT problem_id) FROM results WHERE run_id = ?", [whole])[0][0]
    assert (row["done"], row["total"], stored) == (40, 40, 39)
    from db import queries
    listed = queries.runs(store).set_index("id").loc[whole]
    assert listed["skipped"] == 1 and listed["status"] == "finished"

    parted, status = sweep(store, default_reasoner, cfg, stop_after=1)  # the poison is in the first batch
    assert status == "stopped" and store.skipped_problems(parted) == skipped
    assert run(store, default_reasoner, cfg, parted) == "finished"
    assert rows(store, parted) == rows(store, whole) and store.run_row(parted)["done"] == 40


def test_the_logit_lens_text_is_the_json_of_its_tokens_and_their_probabilities_to_four_places(default_reasoner):
    """runner/batch.py builds each row's lens as text, for speed: it must be exactly what json.dumps writes of
    [[[token, round(p, 4)], ...] per latent], at the rounding edges too, and with no token at all (k = 0)."""
    from runner.batch import _lens
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, default_reasoner.tokenizer.vocab_size, (5, 6, 3), generator=generator)
    probs = torch.rand(5, 6, 3, generator=generator)
    probs[0, 0], probs[0, 1] = torch.tensor([1.0, 0.0, 5e-05]), torch.tensor([0.99995, 0.12345, 1e-04])
    expected = [[[[default_reasoner.tokenizer.decode([i]), round(p, 4)] for i, p in zip(ti, tp)]
                 for ti, tp in zip(ri, rp)] for ri, rp in zip(ids.tolist(), probs.tolist())]
    assert _lens(default_reasoner, ids, probs) == [json.dumps(row) for row in expected]
    assert _lens(default_reasoner, ids[..., :0], probs[..., :0]) == [json.dumps([[]] * 6)] * 5


def test_auto_batch_size_fits_the_memory_budget_and_refuses_what_cannot_fit_one_problem(tmp_path, tiny_model_dir):
    """Issue 14 case 9: num_latent 1000 made one batch of the embedded model take ~23 GB. `auto` sizes the
    batch from the model's shape and the budget; below one problem it refuses in one line, storing nothing."""
    from runner import memory
    from runner.errors import MemoryBudgetError
    from runner.executor import ModelShape
    from runner.model import ModelSpec, load
    store = Store(tmp_path / "budget.duckdb")
    long_thoughts = load(ModelSpec(num_latent=1000))
    long_thoughts.batch_workers = 2  # two batches side by side: each has half the budget, and the line says so
    cfg = SweepConfig(limit=12, memory_budget_gb=4.0)
    with pytest.raises(MemoryBudgetError) as refused:
        Sweep.create(store, long_thoughts, cfg)
    assert "the memory budget is 4.0 GB (2.0 GB a batch, 2 batches side by side):" in str(refused.value)
    long_thoughts.batch_workers = 1
    with pytest.raises(MemoryBudgetError) as refused:
        Sweep.create(store, long_thoughts, cfg)
    message = str(refused.value)
    assert "\n" not in message and "3001 variants x 1000 latents" in message and "budget is 4.0 GB:" in message
    assert store.query("SELECT count(*) FROM runs")[0][0] == 0
    shape = ModelShape.of(long_thoughts)
    assert memory.bytes_per_problem(shape, 3001, 200, 24) > 16 * 2**30  # what the OOM killer saw, give or take

    reasoner = load(ModelSpec(model=str(tiny_model_dir)))
    reasoner.batch_workers = 1  # one batch at a time: it has the whole budget
    shape, V = ModelShape.of(reasoner), 19  # prefix, single, suffix over 6 latents + the baseline
    need = memory.bytes_per_problem(shape, V, max(len(p.question) for p in data_problems(12)) + 8, 24)
    sizes = {}
    for problems_fitting in (2, 5, 100):
        budget_gb = (problems_fitting * need + need // 2) / 2**30
        run_id = Sweep.create(store, reasoner, SweepConfig(model=str(tiny_model_dir), limit=12,
                                                           memory_budget_gb=budget_gb))
        sizes[problems_fitting] = store.run_row(run_id)["batch_size"]
    assert sizes == {2: 2, 5: 5, 100: memory.max_rows(shape, "cpu") // V}, sizes  # the row cap binds last
    reasoner.batch_workers = 2  # two batches side by side share an explicit budget, as they share the default
    run_id = Sweep.create(store, reasoner, SweepConfig(model=str(tiny_model_dir), limit=12,
                                                       memory_budget_gb=(10 * need + need // 2) / 2**30))
    assert store.run_row(run_id)["batch_size"] == 5
    # The row cap: a small model's rows are cheap on a CPU (up to CPU_CHEAP_ROWS), GPT-2 small's are not.
    gpt2_small = dataclasses.replace(shape, n_layers=12, d_model=768, kv_dim=768, vocab=50257)
    assert memory.max_rows(shape, "cpu") == memory.CPU_CHEAP_ROWS > memory.MAX_ROWS["cpu"]
    assert memory.max_rows(gpt2_small, "cpu") == memory.MAX_ROWS["cpu"]
    assert memory.max_rows(shape, "cuda:0") == memory.max_rows(gpt2_small, "cuda:0") == memory.MAX_ROWS["cuda"]


def data_problems(n: int):
    from runner import data
    return data.load_problems("builtin", limit=n)


def test_an_answer_length_that_leaves_no_room_for_a_question_is_refused_before_anything_is_stored(
        tmp_path, tiny_reasoner, tiny_model_dir):
    """Every problem would be skipped one by one and the run would 'finish' with no result: refused at the start."""
    store = Store(tmp_path / "s.duckdb")
    limit = tiny_reasoner.hf.config.n_positions
    most = limit - tiny_reasoner.num_latent - 3
    with pytest.raises(SweepError, match=f"--max-new-tokens {limit} does not fit .* use at most {most}"):
        Sweep.create(store, tiny_reasoner, config(tiny_model_dir, max_new_tokens=limit))
    assert store.query("SELECT count(*) FROM runs") == [(0,)]
    run_id = Sweep.create(store, tiny_reasoner, config(tiny_model_dir, limit=2, validation=0, max_new_tokens=most))
    assert store.run_row(run_id)["total"] == 2  # the largest length allowed still makes a run
    from runner.executor import ModelShape
    crowded = dataclasses.replace(ModelShape.of(tiny_reasoner), num_latent=limit - 3)
    with pytest.raises(SweepError, match=f"positions cannot hold {limit - 3} latents"):
        Sweep.create(store, crowded, config(tiny_model_dir, limit=2, validation=0))
    assert store.query("SELECT count(*) FROM runs") == [(1,)]


def test_resuming_a_finished_run_keeps_its_rate(tmp_path, tiny_reasoner, tiny_model_dir):
    """A session that stores nothing (the dashboard's Resume of a finished run) has no rate: the run keeps its own."""
    store = Store(tmp_path / "s.duckdb")
    cfg = config(tiny_model_dir, limit=4, validation=0)
    run_id, status = sweep(store, tiny_reasoner, cfg)
    before = store.run_row(run_id)
    assert status == "finished" and before["problems_per_hour"] > 0
    assert run(store, tiny_reasoner, cfg, run_id) == "finished"
    after = store.run_row(run_id)
    assert after["problems_per_hour"] == before["problems_per_hour"] and after["done"] == before["done"] == 4


class FaultOnQuestion(LatentReasoner):
    """The real tiny model, raising `error` for any batch (of more than `min_batch` problems) holding `question`:
    a fault that names its batch by content, whichever thread gets to it first."""

    def __init__(self, real: LatentReasoner, question: str, error: Exception, min_batch: int = 0):
        self.__dict__.update(real.__dict__)
        self.question, self.error, self.min_batch = question, error, min_batch

    def rollout(self, questions, plan, *args, **kwargs):
        if self.question in questions and len(questions) > self.min_batch:
            raise self.error
        return super().rollout(questions, plan, *args, **kwargs)


def stored_in_order(store, run_id) -> list[tuple]:
    """Every stored row in the order it was committed (rowid): the batches and their order."""
    return store.query(f"SELECT {COLUMNS} FROM results WHERE run_id = ? ORDER BY rowid", [run_id])


@pytest.mark.parametrize("workers, processes", [(2, True), (3, True), (2, False)])
def test_batches_side_by_side_commit_exactly_what_one_batch_at_a_time_commits(tmp_path, tiny_reasoner,
                                                                              tiny_model_dir, workers, processes):
    """runner/executor.py's LocalExecutor with several workers, in forked processes (runner/workers.py) or on
    threads: the same rows bit for bit, committed in the same order; a stop after the first batch leaves just
    that batch (the ones started beside it go back), and the resume ends where the uninterrupted run ends; a
    fault or an out-of-memory in a later batch in flight changes nothing before it."""
    from runner import workers as forked
    from runner.executor import LocalExecutor, one_torch_thread
    if processes and not forked.available():
        pytest.skip("worker processes are forked: Linux only")
    cfg = config(tiny_model_dir, limit=12, batch_size=2, validation=0)
    one, many = LocalExecutor(tiny_reasoner, workers=1), LocalExecutor(tiny_reasoner, workers=workers,
                                                                      processes=processes)
    assert many.workers == workers and many.processes == processes and not one.processes
    store = Store(tmp_path / "s.duckdb")
    with one_torch_thread():  # each worker's batch runs on one thread: so does the reference
        reference, status = sweep(store, one.shape, cfg, executor=one)
    assert status == "finished"
    side_by_side, status = sweep(store, many.shape, cfg, executor=many)
    assert status == "finished" and stored_in_order(store, side_by_side) == stored_in_order(store, reference)

    stopped, status = sweep(store, many.shape, cfg, stop_after=2, executor=many)
    assert status == "stopped" and store.run_row(stopped)["done"] == 2
    assert len(rows(store, stopped)) == 2 * store.run_row(stopped)["n_variants"]
    assert run(store, many, cfg, stopped) == "finished"
    assert rows(store, stopped) == rows(store, reference)

    problems = [p["question"] for p in store.run_problems(reference)]
    faulty = FaultOnQuestion(tiny_reasoner, problems[4], RuntimeError("injected fault in batch 3"))
    failed = Sweep.create(store, faulty, cfg)
    with pytest.raises(RuntimeError, match="injected"):
        run(store, LocalExecutor(faulty, workers=workers, processes=processes), cfg, failed)
    row = store.run_row(failed)
    assert row["status"] == "failed" and row["done"] == 4  # batches 1 and 2, not what ran beside batch 3
    assert stored_in_order(store, failed) == stored_in_order(store, reference)[: 4 * row["n_variants"]]

    oom = FaultOnQuestion(tiny_reasoner, problems[4], torch.cuda.OutOfMemoryError("CUDA out of memory"), min_batch=1)
    halved = {}
    for name, executor in (("one", LocalExecutor(oom, workers=1)),
                           ("many", LocalExecutor(oom, workers=workers, processes=processes))):
        with one_torch_thread():
            halved[name], status = sweep(store, executor.shape, cfg, executor=executor)
        assert status == "finished" and store.run_row(halved[name])["batch_size"] == 1
    assert stored_in_order(store, halved["many"]) == stored_in_order(store, halved["one"])
    assert len(rows(store, halved["many"])) == len(rows(store, reference))


class FaultNamingItsProcess(LatentReasoner):
    """The real tiny model, whose every rollout raises an error naming the process it ran in."""

    def __init__(self, real: LatentReasoner):
        self.__dict__.update(real.__dict__)

    def rollout(self, *args, **kwargs):
        raise RuntimeError(f"rolled out in process {os.getpid()}")


def test_cpu_batches_side_by_side_run_in_worker_processes_that_end_with_the_sweep(tmp_path, tiny_reasoner,
                                                                                  tiny_model_dir):
    """Two CPU workers are forked processes by default (on threads the GIL costs them: README); their
    errors reach the sweep, which fails the run; none is left once it has."""
    from runner import workers as forked
    from runner.executor import LocalExecutor
    if not forked.available():
        pytest.skip("worker processes are forked: Linux only")
    executor = LocalExecutor(FaultNamingItsProcess(tiny_reasoner), workers=2)
    assert executor.processes
    store = Store(tmp_path / "s.duckdb")
    run_id = Sweep.create(store, executor.shape, config(tiny_model_dir, limit=4, batch_size=2, validation=0))
    before = set(psutil.Process().children())  # other tests' long-lived helpers
    with pytest.raises(RuntimeError, match=r"rolled out in process \d+") as raised:
        run(store, executor, config(tiny_model_dir, limit=4, batch_size=2, validation=0), run_id)
    worker = int(str(raised.value).rsplit(" ", 1)[1])
    assert worker != os.getpid() and store.run_row(run_id)["status"] == "failed"
    assert set(psutil.Process().children()) <= before and not psutil.pid_exists(worker)


class KilledOnQuestion(LatentReasoner):
    """The real tiny model, whose process is killed (as the system's out-of-memory killer would) by a batch
    holding `question`."""

    def __init__(self, real: LatentReasoner, question: str):
        self.__dict__.update(real.__dict__)
        self.question = question

    def rollout(self, questions, *args, **kwargs):
        if self.question in questions:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().rollout(questions, *args, **kwargs)


def test_a_worker_process_killed_mid_batch_fails_the_run_with_one_message_and_keeps_what_was_committed(
        tmp_path, tiny_reasoner, tiny_model_dir):
    from runner import workers as forked
    from runner.executor import LocalExecutor
    if not forked.available():
        pytest.skip("worker processes are forked: Linux only")
    store, cfg = Store(tmp_path / "s.duckdb"), config(tiny_model_dir, limit=8, batch_size=2, validation=0)
    run_id = Sweep.create(store, tiny_reasoner, cfg)
    fifth = store.run_problems(run_id)[4]["question"]  # batch 3 of 4
    before = set(psutil.Process().children())  # other tests' long-lived helpers
    with pytest.raises(SweepError, match="a worker process of the sweep died mid-batch"):
        run(store, LocalExecutor(KilledOnQuestion(tiny_reasoner, fifth), workers=2), cfg, run_id)
    row = store.run_row(run_id)
    assert row["status"] == "failed" and row["done"] in (2, 4)  # batch 2 ran beside batch 3: kept if it ended first
    assert len(rows(store, run_id)) == row["done"] * row["n_variants"] and set(psutil.Process().children()) <= before
    assert run(store, tiny_reasoner, cfg, run_id) == "finished" and store.run_row(run_id)["done"] == 8


BALLAST_MB = 400
_ballast: list = []  # in a forked worker process only: what BallastInWorkers made it hold


class BallastInWorkers(LatentReasoner):
    """The real tiny model, whose worker processes (not the sweep's own) each take and keep BALLAST_MB of
    touched memory at their first rollout."""

    def __init__(self, real: LatentReasoner):
        self.__dict__.update(real.__dict__)
        self.sweeping_process = os.getpid()

    def rollout(self, *args, **kwargs):
        if os.getpid() != self.sweeping_process and not _ballast:
            _ballast.append(torch.ones(BALLAST_MB * 2**20 // 4))  # float32 ones: every page written
        return super().rollout(*args, **kwargs)


def test_the_sweeps_memory_counts_its_worker_processes_and_the_model_they_share_once(tmp_path, tiny_reasoner,
                                                                                     tiny_model_dir, monkeypatch):
    """run_metrics.sweep_pss_mb sums the PSS of the sweep's process and of its forked workers: memory a worker
    holds (and the sweep's own process does not) is in it; a batch's rss_mb stays that one worker's. The
    same sweep without the ballast is the control. It is read at most once a second, and at the last batch."""
    from runner import workers as forked
    from runner.executor import LocalExecutor
    if not forked.available():
        pytest.skip("worker processes are forked: Linux only")
    from runner import executor
    store, cfg = Store(tmp_path / "s.duckdb"), config(tiny_model_dir, limit=8, batch_size=2, validation=0)
    stored = {}
    monkeypatch.setattr(executor, "PSS_EVERY_S", 0.0)  # every batch (else at most once a second)
    for name, reasoner in (("control", tiny_reasoner), ("ballast", BallastInWorkers(tiny_reasoner))):
        run_id, status = sweep(store, reasoner, cfg, executor=LocalExecutor(reasoner, workers=2, processes=True))
        assert status == "finished"
        stored[name] = store.query_df("SELECT rss_mb, sweep_pss_mb FROM run_metrics WHERE run_id = $run",
                                      {"run": run_id})
        assert len(stored[name]) == 4 and stored[name]["sweep_pss_mb"].notna().all()
    control, ballast = stored["control"], stored["ballast"]
    assert not _ballast  # this process never held it: measuring the sweep's process alone would miss it
    assert ballast["sweep_pss_mb"].min() - control["sweep_pss_mb"].max() > 0.8 * BALLAST_MB, stored
    # A worker's PSS counts the model's pages it shares with the sweep's process in part; its RSS in full.
    assert control["sweep_pss_mb"].max() < control["rss_mb"].max() + psutil.Process().memory_info().rss / 2**20
    monkeypatch.setattr(executor, "PSS_EVERY_S", 3600.0)  # its cost is kept off most batches: the first and last
    run_id, status = sweep(store, tiny_reasoner, cfg, executor=LocalExecutor(tiny_reasoner, workers=2, processes=True))
    measured = store.query("SELECT sweep_pss_mb IS NOT NULL FROM run_metrics WHERE run_id = $run ORDER BY elapsed_s",
                           {"run": run_id})
    assert status == "finished" and [m for (m,) in measured] == [True, False, False, True]


def test_batches_run_side_by_side_on_a_cpu_one_per_torch_thread(tiny_reasoner):
    from runner.executor import LocalExecutor
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert LocalExecutor(tiny_reasoner).workers == 2
        torch.set_num_threads(1)
        assert LocalExecutor(tiny_reasoner).workers == 1
    finally:
        torch.set_num_threads(before)



def test_a_batch_thread_computes_on_the_thread_count_of_the_thread_that_handed_it_out():
    """runner/executor.py's batch threads: OpenMP, which MKL's matmuls use, gives a new thread the machine's
    default count until torch's first parallel op in it; a batch thread has the sweep's count from the start."""
    import ctypes
    import os
    from concurrent.futures import ThreadPoolExecutor

    from runner.executor import _in_thread
    library = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    if not os.path.exists(library):
        pytest.skip("this torch build does not ship GNU OpenMP, whose thread count the test reads")
    if os.cpu_count() < 2:
        pytest.skip("one core: a new thread's default is one thread too")
    openmp, before = ctypes.CDLL(library), torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with ThreadPoolExecutor(1) as batch_threads:  # a new thread for each count
                assert _in_thread(batch_threads, openmp.omp_get_max_threads).result() == threads
    finally:
        torch.set_num_threads(before)
