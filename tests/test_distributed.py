"""Sweeps on Ray actors (runner/distributed.py) store exactly the rows of a local Sweep.

Ray's start-up takes tens of seconds on 2 cores, so the module starts one local Ray and one pool of
two CPU actors (the tiny checkpoint) and shares them; the CLI test joins that Ray with --ray-address.
Without Ray the Ray tests skip, except under CI=true, which installs requirements-distributed.txt.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from db.store import Store
from runner.executor import one_torch_thread
from runner.model import ModelSpec
from runner.sweep import Sweep, SweepConfig
from tests.reliability.support import assert_same_results

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("problem_id, variant, answer_text, answer_value, extraction, correct, changed, flip, harm, help, "
           "gold_logprob, logprob_drop, lens")
HAVE_RAY = importlib.util.find_spec("ray") is not None


def config(model_dir, **overrides) -> SweepConfig:
    """16 builtin problems in fixed batches of 4: validation 4+2, then full 4+4+2; `mean` needs references."""
    values = dict(model=str(model_dir), dataset="builtin", limit=16, batch_size=4, validation=6,
                  schemes=("prefix", "exit"), methods=("zero", "mean"))
    return SweepConfig(**(values | overrides))


def rows(store, run_id) -> list[tuple]:
    return store.query(f"SELECT {COLUMNS} FROM results WHERE run_id = ? ORDER BY problem_id, variant", [run_id])


def n_metrics(store, run_id) -> int:
    return store.query("SELECT count(*) FROM run_metrics WHERE run_id = ?", [run_id])[0][0]


def local_sweep(store, reasoner, cfg) -> int:
    with one_torch_thread():  # the actors run torch on one thread (Ray's OMP_NUM_THREADS = num_cpus)
        run_id = Sweep.create(store, reasoner, cfg)
        assert Sweep(store, reasoner, cfg, run_id).run() == "finished"
    return run_id


@pytest.fixture(scope="module")
def ray_pool(tiny_model_dir):
    """One local Ray (4 logical CPUs: this pool's 2 actors + the CLI test's 2) and a 2-actor pool."""
    if not HAVE_RAY:
        if os.environ.get("CI") == "true":
            pytest.fail("Ray is not installed: CI must run `pip install -r requirements-distributed.txt`")
        pytest.skip("Ray is not installed (pip install -r requirements-distributed.txt)")
    from runner import distributed
    cluster = distributed.RayConfig(workers=2, local_cpus=4)
    ray = distributed.connect(cluster)
    pool = distributed.WorkerPool(ray, ModelSpec(model=str(tiny_model_dir)), cluster)
    try:
        shape = pool.start()
        yield pool, shape
    finally:
        pool.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_reasoner, tiny_model_dir):
    """The 1-process Sweep of the same config: the rows every Ray run must reproduce."""
    store = Store(tmp_path_factory.mktemp("local") / "local.duckdb")
    run_id = local_sweep(store, tiny_reasoner, config(tiny_model_dir))
    return store, run_id


def ray_sweep(store, pool, shape, cfg, run_id=None, executor_class=None, **kwargs):
    """The one Sweep loop with its batches on the pool's actors; (run id, executor, status)."""
    from runner.distributed import RayExecutor
    executor = (executor_class or RayExecutor)(pool)
    run_id = Sweep.create(store, executor.shape, cfg) if run_id is None else run_id
    return run_id, executor, Sweep(store, executor, cfg, run_id, **kwargs).run()


def test_two_actors_store_exactly_the_rows_of_a_local_sweep(tmp_path, ray_pool, local_run, tiny_model_dir):
    pool, shape = ray_pool
    local_store, local_id = local_run
    store = Store(tmp_path / "ray.duckdb")
    seen = []
    run_id, sweep, status = ray_sweep(store, pool, shape, config(tiny_model_dir), on_progress=seen.append)
    assert status == "finished"
    assert rows(store, run_id) == rows(local_store, local_id)  # bit for bit: one thread on both sides
    assert len(sweep.handled) == 2, f"both actors should have run batches, got {dict(sweep.handled)}"
    row, local_row = store.run_row(run_id), local_store.run_row(local_id)
    for column in ("status", "phase", "done", "total", "n_variants", "batch_size"):
        assert row[column] == local_row[column], column
    assert row["elapsed_s"] > 0 and row["problems_per_hour"] > 0 and row["peak_rss_mb"] > 100
    assert n_metrics(store, run_id) == n_metrics(local_store, local_id) == 5  # the same 5 batches
    problem_phases = "SELECT problem_id, phase FROM problems WHERE run_id = ? ORDER BY ord"
    assert store.query(problem_phases, [run_id]) == local_store.query(problem_phases, [local_id])
    ref, local_ref = store.load_reference(run_id, "latent"), local_store.load_reference(local_id, "latent")
    assert ref[0] == local_ref[0] and (ref[1] == local_ref[1]).all()  # computed once, by one actor
    running = [p.done for p in seen if p.status == "running"]
    assert running == sorted(running) and running[-1] == 16 and seen[-1].status == "finished"


def test_an_auto_batch_size_ray_run_equals_a_local_one_bit_for_bit_skipped_problems_included(
        tmp_path, ray_pool, tiny_reasoner, tiny_model_dir):
    """`auto` is decided from the actors' smallest memory budget and recorded; a problem too long for the
    model's 256 positions is skipped on the actors as in one process."""
    pool, shape = ray_pool
    dataset = tmp_path / "with_a_long_one.jsonl"
    lines = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?",
              "answer": f"{i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2}\n#### {2 * i + 2}"} for i in range(30)]
    lines[7]["question"] = "Tom has apples. " * 120 + "How many apples does he have?"
    dataset.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cfg = config(tiny_model_dir, dataset=str(dataset), limit=None, batch_size="auto", validation=8,
                 schemes=("prefix", "single", "suffix"))
    local_store, ray_store = Store(tmp_path / "local.duckdb"), Store(tmp_path / "ray.duckdb")
    local_id = local_sweep(local_store, tiny_reasoner, cfg)
    run_id, _, status = ray_sweep(ray_store, pool, shape, cfg)
    assert status == "finished"
    auto = ray_store.run_row(run_id)["batch_size"]
    assert auto == local_store.run_row(local_id)["batch_size"] and 1 < auto < 30
    assert rows(ray_store, run_id) == rows(local_store, local_id)
    skipped = ray_store.skipped_problems(run_id)
    assert skipped == local_store.skipped_problems(local_id) and len(skipped) == 1
    assert "256 positions" in next(iter(skipped.values()))


def test_a_killed_actor_loses_only_its_batch_in_flight(tmp_path, ray_pool, local_run, tiny_model_dir):
    from runner.distributed import RayExecutor
    pool, shape = ray_pool
    local_store, local_id = local_run

    class KillOnThirdBatch(RayExecutor):
        """SIGKILLs the actor just handed the third batch: that batch is in flight when its worker dies."""
        killed = None

        def _dispatch(self, worker, job, batch):
            ref = super()._dispatch(worker, job, batch)
            if self.dispatched == 3:
                self.killed = pool.pid(worker)
                os.kill(self.killed, signal.SIGKILL)
            return ref

    store = Store(tmp_path / "ray.duckdb")
    run_id, sweep, status = ray_sweep(store, pool, shape, config(tiny_model_dir), executor_class=KillOnThirdBatch)
    assert status == "finished" and sweep.killed is not None and sweep.requeued == 1
    assert not psutil.pid_exists(sweep.killed) or psutil.Process(sweep.killed).status() == psutil.STATUS_ZOMBIE
    n, distinct = store.query("SELECT count(*), count(DISTINCT (problem_id, variant)) FROM results WHERE run_id = ?",
                              [run_id])[0]
    assert n == distinct == 16 * store.run_row(run_id)["n_variants"]
    assert_same_results(rows(store, run_id), rows(local_store, local_id))
    assert n_metrics(store, run_id) == 5  # the lost batch was committed once, by its second actor
    assert len(pool.workers) == 2  # a replacement took the dead actor's place


def test_stop_finishes_the_batches_in_flight_and_resume_completes_the_run(tmp_path, ray_pool, local_run,
                                                                          tiny_model_dir):
    pool, shape = ray_pool
    local_store, local_id = local_run
    store, cfg, stop = Store(tmp_path / "ray.duckdb"), config(tiny_model_dir), threading.Event()

    def on_progress(progress):
        if progress.status == "running" and progress.done >= 4:
            stop.set()

    run_id, _, status = ray_sweep(store, pool, shape, cfg, stop=stop, on_progress=on_progress)
    row = store.run_row(run_id)
    assert status == row["status"] == "stopped" and 4 <= row["done"] < 16
    assert len(rows(store, run_id)) == row["done"] * row["n_variants"]  # whole batches only
    _, _, status = ray_sweep(store, pool, shape, cfg, run_id=run_id)
    assert status == "finished" and store.run_row(run_id)["done"] == 16
    assert_same_results(rows(store, run_id), rows(local_store, local_id))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "runner", "sweep", *args]


def interrupt_once_running(process: subprocess.Popen) -> str:
    """Ctrl-C (SIGINT to the driver) as soon as the progress bar shows; all of stderr."""
    seen = b""
    while b"%|" not in seen:  # tqdm's first frame: the run is claimed, batches are going out
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk, f"the sweep ended before its progress bar showed: {seen.decode()[-2000:]}"
        seen += chunk
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=600)[1]
    return (seen + rest).decode()


def test_the_cli_sweeps_on_a_joined_cluster_and_stops_on_ctrl_c(tmp_path, ray_pool, tiny_reasoner, tiny_model_dir):
    import ray
    address = ray.get_runtime_context().gcs_address  # join the module's Ray instead of starting another
    db = tmp_path / "cli.duckdb"
    sweep = subprocess.Popen(cli("--workers", "2", "--ray-address", address, "--model", str(tiny_model_dir),
                                 "--limit", "64", "--batch-size", "2", "--schemes", "prefix", "--db", str(db)),
                             cwd=REPO, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    stderr = interrupt_once_running(sweep)
    assert sweep.returncode == 0, stderr[-3000:]
    assert "stopping run 1 after the batches in flight" in stderr and "--resume 1 --workers 2" in stderr
    store = Store(db)
    row = store.run_row(1)
    assert row["status"] == "stopped" and row["done"] < 64
    assert len(rows(store, 1)) == row["done"] * row["n_variants"]  # the batches in flight were finished
    # Resume on this module's actors (the CLI's --resume path is the same call with run_id set).
    pool, shape = ray_pool
    cfg = SweepConfig.from_json(json.loads(row["config"]))
    assert ray_sweep(store, pool, shape, cfg, run_id=1)[2] == "finished"
    local_store = Store(tmp_path / "local.duckdb")
    assert_same_results(rows(store, 1), rows(local_store, local_sweep(local_store, tiny_reasoner, cfg)))


def test_workers_without_ray_exit_with_one_line_naming_the_requirements_file(tmp_path):
    hide_ray = "import sys; sys.modules['ray'] = None; from runner.__main__ import main; sys.exit(main(sys.argv[1:]))"
    db = tmp_path / "none.duckdb"
    done = subprocess.run([sys.executable, "-c", hide_ray, "sweep", "--workers", "2", "--limit", "4", "--db", str(db)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "pip install -r requirements-distributed.txt" in lines[0]
    assert Store(db).query("SELECT count(*) FROM runs")[0][0] == 0


def test_out_of_memory_on_an_actor_halves_the_batch_size_once_and_splits_the_batch(tmp_path, tiny_reasoner,
                                                                                   tiny_model_dir):
    """The sweep loop's out-of-memory handling, which a Ray actor's out-of-memory result goes through."""
    from collections import deque

    store = Store(tmp_path / "oom.duckdb")
    cfg = config(tiny_model_dir, batch_size=8, methods=("zero",))
    run_id = Sweep.create(store, tiny_reasoner, cfg)
    sweep = Sweep(store, tiny_reasoner, cfg, run_id)
    batch, queue = [{"problem_id": str(i)} for i in range(8)], deque()
    sweep._out_of_memory(batch, queue)
    assert sweep.batch_size == 4
    assert [[p["problem_id"] for p in piece] for piece in queue] == [["0", "1", "2", "3"], ["4", "5", "6", "7"]]
    assert store.run_row(run_id)["batch_size"] == 4
    # A second actor's batch, cut at the old size before the halving, is split but does not halve again.
    sweep._out_of_memory(batch, queue)
    assert sweep.batch_size == 4 and len(queue) == 4


def test_the_local_ray_token_is_written_readable_by_its_owner_only(tmp_path):
    """Issue 14, security 3: Ray would write ~/.ray/auth_token 0644 (the umask's mode); the token runs code."""
    from runner.distributed import private_token
    old_umask = os.umask(0o022)  # the common default, under which a plain write gives 0644
    try:
        path = private_token(tmp_path / "fresh")
        assert path == tmp_path / "fresh" / ".ray" / "auth_token"
        assert oct(path.stat().st_mode & 0o777) == oct(0o600) and len(path.read_text()) == 64
        assert oct(path.parent.stat().st_mode & 0o777) == oct(0o700)
        older = tmp_path / "older" / ".ray" / "auth_token"  # a token an earlier Ray wrote: kept, made private
        older.parent.mkdir(parents=True)
        older.write_text("a-token-ray-wrote")
        older.chmod(0o644)
        assert private_token(tmp_path / "older").read_text() == "a-token-ray-wrote"
        assert oct(older.stat().st_mode & 0o777) == oct(0o600)
    finally:
        os.umask(old_umask)


def test_the_running_local_ray_uses_a_private_token(ray_pool):
    """connect() made the token before ray.init, and Ray's cluster (the pool's actors answer) runs with it."""
    import ray
    from ray._raylet import AuthenticationTokenLoader
    path = Path.home() / ".ray" / "auth_token"
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert os.environ.get("RAY_AUTH_MODE") == "token" and ray.is_initialized()
    assert AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)



@pytest.mark.parametrize("broken", ["NaN in a weight", "num_latent 0"])
def test_a_checkpoint_the_cli_refuses_is_refused_on_ray_actors_too(tmp_path, ray_pool, broken):
    """The weights live in the actors: the driver's checks (non-finite weights, no latents) run there, one line."""
    import ray

    from tests.test_checkpoint import BROKEN, broken_default
    folder = broken_default(tmp_path / "model", broken)
    db = tmp_path / "cli.duckdb"
    done = subprocess.run(cli("--workers", "2", "--ray-address", ray.get_runtime_context().gcs_address,
                              "--model", str(folder), "--limit", "2", "--db", str(db)),
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(lines) == 1 and BROKEN[broken][1] in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert Store(db).query("SELECT count(*) FROM runs") == [(0,)]
