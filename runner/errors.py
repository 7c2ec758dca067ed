"""Every error ThoughtSweep raises for a person to read, listed once.

Each one's message says what went wrong and what to do; the CLI prints it as one line and the
dashboard shows it as text, never a traceback. Catch `ThoughtSweepError` to catch them all.
This module imports nothing (no torch, no DuckDB), so `db/` can derive its errors from the base.
"""
from __future__ import annotations


class ThoughtSweepError(Exception):
    """The base: an error whose message is written for a person."""


class SweepError(ThoughtSweepError, ValueError):
    """A sweep that cannot start or continue; the message says why."""


class SweepBusy(ThoughtSweepError, RuntimeError):
    """A sweep is already running (or starting) in this process."""


class AblationError(ThoughtSweepError, ValueError):
    """A variant, site or option that does not make sense; the message says which."""


class DatasetError(ThoughtSweepError, ValueError):
    """Bad dataset input: one line naming the file and the line or row to fix."""


class ModelLoadError(ThoughtSweepError, RuntimeError):
    """The checkpoint could not be loaded; the message says what to do about it."""


class MemoryBudgetError(SweepError):
    """The configuration cannot fit the memory budget even one problem at a time."""
