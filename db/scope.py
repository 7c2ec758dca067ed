"""What a figure counts: one `Scope` (run, problem filters, variant group), built once per page and
passed to every read, and the SQL that applies it through named `$name` parameters only.

A problem is in scope once its baseline row is stored (a batch writes all of a problem's variants)
and it passes the filters; `phase` None or 'full' = every problem (the validation subset is part of
the full run), 'validation' = the validation subset only. A variant group field left None matches
any value. Every statement filters `run_id = $run` first: DuckDB skips other runs' row groups.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from runner.errors import ThoughtSweepError

class QueryError(ThoughtSweepError, ValueError):
    """A filter, measure, ordering, run or export that no read takes; the message says which."""


# The problems in scope, with their baseline answer.
PROBLEMS = """scope AS (
    SELECT p.problem_id, p.ord, p.difficulty, p.phase, p.gold, p.question, b.correct AS baseline_correct,
           b.answer_text AS baseline_answer, b.answer_value AS baseline_value
    FROM problems p JOIN results b ON b.problem_id = p.problem_id
    WHERE p.run_id = $run AND b.run_id = $run AND b.scheme = 'baseline'
      AND ($phase IS NULL OR p.phase = $phase) AND (len($steps) = 0 OR list_contains($steps, p.difficulty))
      AND ($correct IS NULL OR b.correct = $correct))"""
# The variant group's rows `r` (the baseline excluded: it is no group's variant).
GROUP = ("r.run_id = $run AND r.scheme <> 'baseline' AND ($scheme IS NULL OR r.scheme = $scheme) "
         "AND ($method IS NULL OR r.method = $method) AND ($site IS NULL OR r.site = $site) "
         "AND ($mode IS NULL OR r.mode = $mode)")


@dataclass(frozen=True)
class Scope:
    """A run, which of its problems count, and which variant group (None = any); hashable for st.cache_data."""
    run_id: int
    phase: str | None = None  # None or 'full': all problems; 'validation': the validation subset
    difficulties: tuple[int, ...] = ()  # step counts to keep; empty keeps all
    baseline_correct: bool | None = None  # keep problems whose baseline is right / wrong; None keeps all
    scheme: str | None = None
    method: str | None = None
    site: str | None = None
    mode: str | None = None

    def __post_init__(self):
        if self.phase not in (None, "full", "validation"):
            raise QueryError(f"phase filter must be None, 'full' or 'validation', got {self.phase!r}")
        object.__setattr__(self, "run_id", int(self.run_id))
        object.__setattr__(self, "difficulties", tuple(sorted(int(d) for d in self.difficulties)))

    def group(self, scheme=None, method=None, site=None, mode=None) -> "Scope":
        """The same run and problems, another variant group."""
        return dataclasses.replace(self, scheme=scheme, method=method, site=site, mode=mode)

    def problems(self) -> "Scope":
        """The same run and problems, every variant group."""
        return self.group()

    def replace(self, **fields) -> "Scope":
        return dataclasses.replace(self, **fields)

    @property
    def keys(self) -> tuple[str | None, str | None, str | None, str | None]:
        return self.scheme, self.method, self.site, self.mode

    @property
    def params(self) -> dict:
        """Every `$name` value of PROBLEMS and GROUP."""
        return {"run": self.run_id, "phase": None if self.phase in (None, "full") else self.phase,
                "steps": list(self.difficulties), "correct": self.baseline_correct, "scheme": self.scheme,
                "method": self.method, "site": self.site, "mode": self.mode}


def bind(sql: str, scope: Scope | None = None, **extra) -> dict:
    """The named parameters `sql` uses, from the scope and `extra` (DuckDB refuses unused names)."""
    values = {**(scope.params if scope is not None else {}), **extra}
    used = set(re.findall(r"\$(\w+)", sql))
    missing = used - set(values)
    assert not missing, f"no value for ${', $'.join(sorted(missing))}"
    return {name: values[name] for name in used}
