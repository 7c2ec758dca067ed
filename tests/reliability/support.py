"""What the reliability tests share: sweep configs, reference runs, row dumps, the invariants a store keeps."""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from db.store import Store
from runner.model import LatentReasoner
from runner.sweep import Sweep, SweepConfig

REPO = Path(__file__).resolve().parents[2]
RESULT_ROWS = ("SELECT * EXCLUDE (run_id) FROM results WHERE run_id = ? ORDER BY problem_id, variant")
# One statement = one snapshot: a reader that sees the runs row and the results of different commits would
# report a torn batch that is not there, and one that reads them together sees exactly what a commit left.
SNAPSHOT = """
    SELECT r.status, r.done, r.n_variants,
           (SELECT count(*) FROM results WHERE run_id = r.id),
           (SELECT count(DISTINCT (problem_id, variant)) FROM results WHERE run_id = r.id),
           (SELECT count(*) FROM results WHERE run_id = r.id AND scheme = 'baseline'),
           (SELECT count(*) FROM run_metrics WHERE run_id = r.id),
           (SELECT coalesce(sum(batch_problems), 0) FROM run_metrics WHERE run_id = r.id)
    FROM runs r WHERE r.id = ?"""


def sweep_config(model_dir, **overrides) -> SweepConfig:
    values = dict(model=str(model_dir), dataset="builtin", limit=24, batch_size=2, validation=0,
                  schemes=("prefix",), methods=("zero",))
    return SweepConfig(**(values | overrides))


def result_rows(store: Store, run_id: int) -> list[tuple]:
    return store.query(RESULT_ROWS, [run_id])


def assert_same_results(actual: list[tuple], expected: list[tuple]) -> None:
    """Row for row equal, floats to float32 noise: a run finished in another process may use another number
    of intra-op threads, which sums a matmul in another order (CI saw 4e-6 on a log-probability of -29)."""
    assert len(actual) == len(expected), f"{len(actual)} rows, expected {len(expected)}"
    for got, want in zip(actual, expected):
        assert _close(got, want), f"row differs:\n  got  {got}\n  want {want}"


def _close(got, want) -> bool:
    if isinstance(got, float) and isinstance(want, float):
        return math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-4)
    if isinstance(got, (tuple, list)) and isinstance(want, (tuple, list)):
        return len(got) == len(want) and all(_close(g, w) for g, w in zip(got, want))
    if isinstance(got, str) and isinstance(want, str) and got.startswith("[[[") and want.startswith("[[["):
        return _close(json.loads(got), json.loads(want))  # logit-lens JSON: probabilities rounded to 4 places
    return got == want


def reference_rows(path: Path, reasoner: LatentReasoner, config: SweepConfig) -> list[tuple]:
    """An uninterrupted run of `config` into its own file: the rows every recovered run must equal."""
    store = Store(path)
    try:
        run_id = Sweep.create(store, reasoner, config)
        assert Sweep(store, reasoner, config, run_id).run() == "finished"
        return result_rows(store, run_id)
    finally:
        store.close()


def finished_database(path: Path, model_dir: Path, reasoner: LatentReasoner) -> tuple[int, int]:
    """A file holding a finished 6-problem sweep and the seed fixture imported as a run: (sweep id, seed id)."""
    from db.seed import SCORES, VALIDATION, import_seed
    store = Store(path)
    try:
        config = sweep_config(model_dir, limit=6, batch_size=3)
        sweep_id = Sweep.create(store, reasoner, config)
        assert Sweep(store, reasoner, config, sweep_id).run() == "finished"
        seed_files = REPO / "tests" / "fixtures" / "seed"
        return sweep_id, import_seed(store, seed_files / SCORES, seed_files / VALIDATION, name="seed import")
    finally:
        store.close()


def whole_batches(store: Store, run_id: int) -> dict:
    """The invariants a commit keeps, read in one snapshot; returns the run's numbers for further checks."""
    status, done, n_variants, results, distinct, baselines, batches, batch_problems = \
        store.query(SNAPSHOT, [run_id])[0]
    assert results == distinct, f"run {run_id}: {results} result rows but {distinct} distinct (problem, variant)"
    assert results == done * n_variants, f"run {run_id}: {results} rows != done {done} x {n_variants} variants"
    assert baselines == done, f"run {run_id}: {baselines} baselines stored, runs.done says {done}"
    assert batch_problems == done, f"run {run_id}: metrics count {batch_problems} problems, runs.done says {done}"
    return {"status": status, "done": done, "n_variants": n_variants, "results": results, "batches": batches}


def file_digest(path: Path) -> str:
    """sha256 of a file and of its WAL (absent = '')."""
    parts = []
    for p in (Path(path), Path(f"{path}.wal")):
        parts.append(hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "")
    return ":".join(parts)


def table_dump(path: Path) -> dict[str, list[tuple]]:
    """Every row of every table, in a fixed order; opens the file read-only and closes it."""
    store = Store(path, read_only=True)
    try:
        tables = [t for (t,) in store.query("SELECT table_name FROM information_schema.tables "
                                            "WHERE table_schema = 'main' ORDER BY 1")]
        return {t: store.query(f"SELECT * FROM {t} ORDER BY ALL") for t in tables}  # names from the catalog
    finally:
        store.close()


def child_env(**extra) -> dict:
    """The environment of a CLI or service child: this repo importable, one thread, no colour, no tqdm."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("THOUGHTSWEEP_DEBUG", None)
    return env | extra


PYTHON = sys.executable


class FlakyReasoner(LatentReasoner):
    """The real tiny model, with `error` raised on the chosen rollout calls (1-based)."""

    def __init__(self, real: LatentReasoner, fail_on: set[int], error: BaseException):
        self.__dict__.update(real.__dict__)
        self.calls, self.fail_on, self.error = 0, set(fail_on), error
        self.batch_workers = 1  # faults keyed by call number: one batch at a time, calls in batch order

    def rollout(self, questions, plan, *args, **kwargs):
        self.calls += 1
        if self.calls in self.fail_on:
            raise self.error
        return super().rollout(questions, plan, *args, **kwargs)


class ForkServer:
    """Client of forkserver.py: children that run the CLI or a SweepService without re-importing torch."""

    def __init__(self, folder: Path, warm_model: Path | None = None):
        self.folder = Path(folder)
        self._count = itertools.count()
        argv = [PYTHON, str(REPO / "tests" / "reliability" / "forkserver.py")]
        argv += ["--warm", str(warm_model)] if warm_model is not None else []
        self._log = open(self.folder / "forkserver.log", "w")
        self._server = subprocess.Popen(argv, cwd=REPO, env=child_env(), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self._log, text=True)
        ready = self._server.stdout.readline()
        assert ready, f"the fork server did not start: {(self.folder / 'forkserver.log').read_text()}"

    def spawn(self, run: str, argv: list, fsize: int | None = None, die_at: dict | None = None) -> tuple[int, Path, Path]:
        """Fork a child running `run` ('cli' or 'service') on argv, no file larger than `fsize` bytes, killed at
        a write point when `die_at` says (forkserver.py); returns (pid, stdout file, stderr file)."""
        n = next(self._count)
        out, err = self.folder / f"child{n}.out", self.folder / f"child{n}.err"
        out.touch()
        err.touch()
        request = {"run": run, "argv": [str(a) for a in argv], "out": str(out), "err": str(err), "fsize": fsize,
                   "die_at": die_at}
        self._server.stdin.write(json.dumps(request) + "\n")
        self._server.stdin.flush()
        return json.loads(self._server.stdout.readline())["pid"], out, err

    def wait(self) -> int:
        """The exit status of the last child spawned (-9: SIGKILL)."""
        return json.loads(self._server.stdout.readline())["rc"]

    def cli(self, *argv, fsize: int | None = None, die_at: dict | None = None) -> tuple[int, str, str]:
        """`python -m runner ARGV` in a child: (exit status, stdout, stderr)."""
        _, out, err = self.spawn("cli", list(argv), fsize, die_at)
        code = self.wait()
        return code, out.read_text(), err.read_text()

    def close(self) -> None:
        self._server.stdin.close()
        self._server.wait(timeout=60)
        self._log.close()
