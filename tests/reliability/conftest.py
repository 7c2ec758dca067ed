"""The reliability suite's ledger: every fault injected and every bad input tried is recorded as it runs.

A test opens a case (`with ledger.fault("...")` or `with ledger.bad_input("...")`, or `ledger.tried` then
`ledger.ok`) before it injects the fault or feeds the input; the case counts as survived / handled only
when the body that checks the outcome (clear status or message, stored rows intact) completes. At the
end of the session `pytest_terminal_summary` prints

    reliability: faults injected N / survived N, bad inputs tried M / handled M, nothing lost

from those records, never from constants: a case that fails, or a test that fails before it could
record its case, turns "nothing lost" into the list of what did not hold.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import pytest
import torch

KINDS = ("fault", "bad input")


@dataclass
class Case:
    kind: str  # one of KINDS
    name: str
    ok: bool = False


@dataclass
class Ledger:
    cases: list[Case] = field(default_factory=list)
    failed_tests: list[str] = field(default_factory=list)
    ran: bool = False  # a reliability test ran in this session

    def tried(self, kind: str, name: str) -> Case:
        assert kind in KINDS, f"kind {kind!r} not in {KINDS}"
        case = Case(kind, name)
        self.cases.append(case)
        return case

    @staticmethod
    def ok(case: Case) -> None:
        case.ok = True

    @contextlib.contextmanager
    def _case(self, kind: str, name: str):
        case = self.tried(kind, name)
        yield case
        case.ok = True  # reached only when the body raised nothing

    def fault(self, name: str):
        return self._case("fault", name)

    def bad_input(self, name: str):
        return self._case("bad input", name)

    def summary(self) -> str:
        faults = [c for c in self.cases if c.kind == "fault"]
        inputs = [c for c in self.cases if c.kind == "bad input"]
        lost = [f"{c.kind} {c.name!r}" for c in self.cases if not c.ok] + \
               [f"test {name}" for name in self.failed_tests]
        verdict = "nothing lost" if not lost else f"NOT HANDLED: {'; '.join(lost)}"
        return (f"reliability: faults injected {len(faults)} / survived {sum(c.ok for c in faults)}, "
                f"bad inputs tried {len(inputs)} / handled {sum(c.ok for c in inputs)}, {verdict}")


LEDGER = Ledger()


@pytest.fixture(scope="session")
def ledger() -> Ledger:
    return LEDGER


@pytest.fixture(scope="session")
def forkserver(tmp_path_factory, tiny_model_dir):
    """Children for the CLI and the dashboard's service, forked from one warm process (see forkserver.py)."""
    from tests.reliability.support import ForkServer
    server = ForkServer(tmp_path_factory.mktemp("children"), warm_model=tiny_model_dir)
    yield server
    server.close()


@pytest.fixture(scope="session")
def finished_db(tmp_path_factory, tiny_model_dir, tiny_reasoner):
    """A database with a finished sweep and an imported seed run. Never written to: copy it to change it."""
    from types import SimpleNamespace

    from tests.reliability.support import finished_database
    path = tmp_path_factory.mktemp("finished") / "finished.duckdb"
    sweep_id, seed_id = finished_database(path, tiny_model_dir, tiny_reasoner)
    return SimpleNamespace(path=path, sweep_id=sweep_id, seed_id=seed_id)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread, as the CLI children run (OMP_NUM_THREADS=1): identical float sums, and the
    2-core CI machine is not oversubscribed by a sweep thread plus the test's own processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _in_this_suite(nodeid: str) -> bool:
    return "tests/reliability/" in nodeid.replace("\\", "/")


def pytest_runtest_logreport(report):
    if not _in_this_suite(report.nodeid):
        return
    LEDGER.ran = True
    if report.failed and report.nodeid not in LEDGER.failed_tests:
        LEDGER.failed_tests.append(report.nodeid)


@pytest.hookimpl(trylast=True)  # after the other summaries (durations, warnings): the last word
def pytest_terminal_summary(terminalreporter):
    if LEDGER.ran:
        terminalreporter.write_line(LEDGER.summary())
