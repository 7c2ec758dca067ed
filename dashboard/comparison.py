"""What Compare compares: curves (a run, a variant group, its problems) and legend names made of what differs."""
from __future__ import annotations

from dataclasses import dataclass

from db.scope import Scope

PHASES = {"all": None, "validation": "validation"}
# Settings in legend order; the run's own settings come from db.overview.run_settings.
SHOWN = ("model", "dataset", "positions", "scheme", "method", "site", "mode", "problems", "limit", "validation",
         "seed", "dtype", "device", "batch_size")
POSITIONS = {"latent": "latent positions", "old-script": "the old script's positions"}
BARE = {"scheme", "method", "site", "mode"}  # their values say what they are: "frozen", "resid:8"


@dataclass(frozen=True)
class Side:
    run_id: int
    scheme: str
    method: str
    site: str
    mode: str
    phase: str = "all"  # all | validation

    def scope(self) -> Scope:
        return Scope(self.run_id, PHASES[self.phase], scheme=self.scheme, method=self.method, site=self.site,
                     mode=self.mode)

    def option(self) -> str:
        problems = " · validation subset" if self.phase == "validation" else ""
        return f"#{self.run_id} · {self.scheme} · {self.method} · {self.site} · {self.mode}{problems}"


def settings(side: Side, run: dict) -> dict:
    """Everything that can tell two curves apart."""
    problems = "validation subset" if side.phase == "validation" else "all problems"
    return {**{k: run.get(k) for k in SHOWN if k in run}, "scheme": side.scheme, "method": side.method,
            "site": side.site, "mode": side.mode, "problems": problems}


def _text(key: str, value) -> str:
    if key == "positions":
        return POSITIONS.get(value, str(value))
    value = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else "not recorded" if value is None \
        else value
    return str(value) if key in BARE or key == "problems" else f"{key.replace('_', ' ')} {value}"


def labels(sides: list[Side], runs: dict[int, dict]) -> tuple[list[str], list[str]]:
    """(legend names, the settings that differ): each name lists exactly the settings that differ between
    the compared curves; curves that no setting tells apart (two runs alike) are named by their run."""
    every = [settings(s, runs.get(s.run_id, {})) for s in sides]
    differ = [k for k in SHOWN if len({repr(e.get(k)) for e in every}) > 1]
    names = [" · ".join(_text(k, e.get(k)) for k in differ) for e in every]
    tied = {n for n in names if names.count(n) > 1}
    names = [f"{n} · run #{s.run_id}" if n and n in tied else n or f"run #{s.run_id}" for n, s in zip(names, sides)]
    return names, differ


def mixed_positions(sides: list[Side], runs: dict[int, dict]) -> list[int]:
    """The runs among `sides` that number positions otherwise than the first side (runner.ablation.POSITIONS)."""
    first = runs.get(sides[0].run_id, {}).get("positions", "latent")
    return sorted({s.run_id for s in sides if runs.get(s.run_id, {}).get("positions", "latent") != first})


def same_group(side: Side, first: Side) -> bool:
    """`side` is `first`'s run and variant group in another phase: their pairs are the subset against itself."""
    return (side.run_id, side.scheme, side.method, side.site, side.mode) == \
        (first.run_id, first.scheme, first.method, first.site, first.mode)
