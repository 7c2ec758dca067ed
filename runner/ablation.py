"""What an ablation is: variants as plain data, and the one generic `apply` of a plan.

A *variant* is (scheme, k) expanded to a set of ablated latent positions, plus a method (what
replaces the vector), a site (where: the latent fed back as input embedding, or the residual
stream output of block L) and a mode (later latents recomputed from the ablated state, or
frozen at their baseline values). DESIGN.md section 3 is the contract; `ablated_positions`
is its table, and `Variant.describe` writes it down with every result row (db migration 3):
readers take what a row ablated from the row, never from its scheme and k.

A *plan* is the tensor form of (problems x variants) for one batch: which row ablates which
latent step, with what replacement vector. The engine (`runner.model`) calls `apply(plan, ...)`
at each latent step and knows nothing of schemes or methods.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from runner.errors import AblationError  # noqa: F401  (raised here; listed in runner/errors.py)

SCHEMES = ("prefix", "single", "suffix", "exit")
METHODS = ("zero", "mean", "noise", "resample")
MODES = ("recompute", "frozen")


# How a run numbers its positions, stored with the run (runs.positions). The old script's loop
# (its step_importance_*.json files, imported by db/seed.py) is not ours: its position k does not
# ablate our latent k, so a figure must not put the two on one axis as if equal.
POSITIONS = {
    "latent": "position i is latent i, the i-th continuous thought fed after BOT (T of them)",
    "old-script": "the old script's numbering: it encoded the question without BOT, fed BOT as its first "
                  "'latent' (position 0) and five latents after it (positions 1-5), and its zeroing hook also "
                  "hit the last question token",
}


def parse_site(site: str, n_layers: int | None = None) -> int | None:
    """'latent' -> None; 'resid:L' -> L (checked against the model's depth when known)."""
    if site == "latent":
        return None
    prefix, _, layer = site.partition(":")
    if prefix != "resid" or not layer.lstrip("-").isdigit():
        raise AblationError(f"site must be 'latent' or 'resid:L' with L a block index, got {site!r}")
    index = int(layer)
    if index < 0 or (n_layers is not None and index >= n_layers):
        raise AblationError(f"site {site!r}: layer must be in 0..{(n_layers or 1) - 1}, the model has {n_layers} blocks")
    return index


@dataclass(frozen=True)
class Variant:
    scheme: str  # baseline | prefix | single | suffix | exit
    k: int  # the scheme's parameter (DESIGN.md section 3)
    method: str = "zero"  # zero | mean | noise | resample ("none" for the baseline)
    site: str = "latent"  # latent | resid:L
    mode: str = "recompute"  # recompute | frozen

    def ablated_positions(self, num_latent: int) -> frozenset[int]:
        """The latent positions this variant replaces (DESIGN.md section 3, the table)."""
        T, k = num_latent, self.k
        if self.scheme == "prefix":
            assert 1 <= k <= T, f"prefix k must be in 1..{T}, got {k}"
            return frozenset(range(0, k))
        if self.scheme == "single":
            assert 0 <= k < T, f"single k must be in 0..{T - 1}, got {k}"
            return frozenset({k})
        if self.scheme == "suffix":
            assert 0 <= k < T, f"suffix k must be in 0..{T - 1}, got {k}"
            return frozenset(range(k, T))
        if self.scheme == "exit":
            assert 0 <= k <= T, f"exit k must be in 0..{T}, got {k}"
        return frozenset()

    def latents_fed(self, num_latent: int) -> int:
        """How many latents are fed before EOT: all of them, except for early exit."""
        return self.k if self.scheme == "exit" else num_latent

    def position(self) -> int | None:
        """Where the variant is plotted and counted early or late: the last latent a prefix removes
        (k-1), the latent k of the other schemes; None for the baseline."""
        if self.is_baseline:
            return None
        return self.k - 1 if self.scheme == "prefix" else self.k

    def describe(self, num_latent: int) -> dict:
        """What a result row stores about its variant (db migration 3): every reader uses these."""
        return {"ablated_positions": sorted(self.ablated_positions(num_latent)),
                "latents_fed": self.latents_fed(num_latent), "position": self.position()}

    @property
    def is_baseline(self) -> bool:
        return self.scheme == "baseline"

    @property
    def key(self) -> str:
        """A stable, readable id used as the `variant` column: 'prefix:3/zero/latent/recompute'."""
        return f"{self.scheme}:{self.k}/{self.method}/{self.site}/{self.mode}"

    @staticmethod
    def from_key(key: str) -> "Variant":
        scheme_k, method, site, mode = key.split("/")
        scheme, _, k = scheme_k.partition(":")
        return Variant(scheme, int(k), method, site, mode)


BASELINE = Variant("baseline", 0, "none", "latent", "recompute")


def scheme_ks(scheme: str, num_latent: int) -> range:
    return {"prefix": range(1, num_latent + 1), "single": range(0, num_latent),
            "suffix": range(0, num_latent), "exit": range(0, num_latent + 1)}[scheme]


def expand(schemes, methods, site: str, mode: str, num_latent: int) -> list[Variant]:
    """All variants of a sweep, baseline first. `exit` ablates nothing, so it has no method."""
    for name, value, allowed in (("scheme", schemes, SCHEMES), ("method", methods, METHODS)):
        unknown = [v for v in value if v not in allowed]
        if unknown or not value:
            raise AblationError(f"unknown or missing {name} {unknown or value}: choose from {', '.join(allowed)}")
    if mode not in MODES:
        raise AblationError(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
    parse_site(site)
    variants = [BASELINE]
    for scheme in schemes:
        for method in (["none"] if scheme == "exit" else methods):
            variants += [Variant(scheme, k, method, site, mode) for k in scheme_ks(scheme, num_latent)]
    return variants


# --- Reference latents: where mean / noise / resample take their values --------------------------

@dataclass(frozen=True)
class Reference:
    """Baseline values at one site for a reference set of problems: (N, T, d) on the CPU."""
    site: str
    problem_ids: tuple[str, ...]
    values: torch.Tensor  # (N, T, d) float32

    @property
    def mean(self) -> torch.Tensor:  # (T, d)
        return self.values.mean(dim=0)

    @property
    def std(self) -> torch.Tensor:  # (T, d)
        return self.values.std(dim=0, unbiased=False)


def stable_seed(*parts) -> int:
    """A 63-bit seed from the run seed and names: the same problem gets the same draw in any batch."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


# The tiny named strategies: each returns the (T, d) replacement for one (problem, variant).
def zero(ref: Reference | None, T: int, d: int, problem_id: str, seed: int) -> torch.Tensor:
    return torch.zeros(T, d)


def mean(ref: Reference, T: int, d: int, problem_id: str, seed: int) -> torch.Tensor:
    assert ref.values.shape[1:] == (T, d), f"reference shape {tuple(ref.values.shape)} != (N, {T}, {d})"
    return ref.mean


def noise(ref: Reference, T: int, d: int, problem_id: str, seed: int) -> torch.Tensor:
    """A Gaussian draw matched per position and dimension to the reference mean and std."""
    assert ref.values.shape[1:] == (T, d), f"reference shape {tuple(ref.values.shape)} != (N, {T}, {d})"
    generator = torch.Generator().manual_seed(stable_seed(seed, "noise", problem_id))
    return ref.mean + ref.std * torch.randn(T, d, generator=generator)


def resample(ref: Reference, T: int, d: int, problem_id: str, seed: int) -> torch.Tensor:
    """Position p takes position p's value from another reference problem, chosen by a fixed RNG."""
    n = ref.values.shape[0]
    assert n >= 2, f"resample needs at least 2 reference problems, got {n}"
    own = ref.problem_ids.index(problem_id) if problem_id in ref.problem_ids else -1
    picks = []
    for p in range(T):
        j = stable_seed(seed, "resample", problem_id, p) % (n - (own >= 0))
        picks.append(j + (own >= 0 and j >= own))  # skip the problem itself
    return ref.values[torch.tensor(picks), torch.arange(T)]  # (T, d)


STRATEGIES = {"zero": zero, "mean": mean, "noise": noise, "resample": resample}


@dataclass
class Plan:
    """One batch of B problems x V variants as R = B*V rows, problem-major (row = b*V + v)."""
    ablate: torch.Tensor  # (R, T) bool: replace at this latent step
    layer: torch.Tensor  # (R,) long: -1 = latent site, else the block whose output is replaced
    replacement: torch.Tensor  # (R, T, d): the value put in place
    fed: torch.Tensor  # (R,) long: latents fed before EOT
    frozen: torch.Tensor  # (R,) bool
    baseline_row: torch.Tensor  # (R,) long: the row of the same problem's baseline
    variants: tuple[Variant, ...]

    @property
    def layers(self) -> list[int]:
        return sorted({int(x) for x in self.layer.tolist() if x >= 0})

    def to(self, device, dtype) -> "Plan":
        return Plan(self.ablate.to(device), self.layer.to(device), self.replacement.to(device, dtype),
                    self.fed.to(device), self.frozen.to(device), self.baseline_row.to(device), self.variants)


def make_plan(variants: list[Variant], problem_ids: list[str], num_latent: int, d_model: int,
              references: dict[str, Reference] | None = None, seed: int = 0) -> Plan:
    """Tensors for every (problem, variant) row; references are keyed by site."""
    assert variants and variants[0].is_baseline, f"variants must start with the baseline, got {variants[:1]}"
    T, d, V, B = num_latent, d_model, len(variants), len(problem_ids)
    ablate = torch.zeros(B * V, T, dtype=torch.bool)
    replacement = torch.zeros(B * V, T, d)
    for v, variant in enumerate(variants):
        positions = sorted(variant.ablated_positions(T))
        if not positions:
            continue
        ablate[v::V, positions] = True
        if variant.method == "zero":
            continue  # already zeros
        reference = (references or {}).get(variant.site)
        if reference is None:
            raise AblationError(f"method {variant.method!r} at site {variant.site!r} needs reference latents")
        strategy = STRATEGIES[variant.method]
        for b, problem_id in enumerate(problem_ids):
            replacement[b * V + v] = strategy(reference, T, d, problem_id, seed)
    layer = torch.tensor([-1 if (site := parse_site(v.site)) is None else site for v in variants]).repeat(B)
    fed = torch.tensor([v.latents_fed(T) for v in variants]).repeat(B)
    frozen = torch.tensor([v.mode == "frozen" for v in variants]).repeat(B)
    baseline_row = torch.arange(B).repeat_interleave(V) * V
    return Plan(ablate, layer, replacement, fed, frozen, baseline_row, tuple(variants))


@dataclass(frozen=True)
class SharedStep:
    """At one latent step, rows of a problem fed the same vectors so far are one rollout: run `rows`
    (R_s,), one per group, problem-major; `spread` (R,) gives each row its group's index in `rows`."""
    rows: torch.Tensor  # (R_s,) = (B * groups,)
    spread: torch.Tensor  # (R,)
    groups: int  # groups per problem, the same for every problem


def shared_steps(plan: Plan, num_latent: int) -> list[SharedStep | None]:
    """Per latent step, which rows have had the same past (None: every row its own, nothing to share).

    Two variants of a problem have fed the same vectors through step s when, at every step t <= s, both
    feed it or neither does (early exit), both keep it or both replace it at the same site with the same
    replacement, and a frozen one has not yet ablated (before its first ablation a frozen row is its
    baseline). A replacement depends on the problem, method and site only, never on the scheme (the
    strategies above), so (method, site) names it. With the prefix scheme the variants of a problem
    share ~36% of their latent steps, with the 19 default variants ~55%.
    """
    V = len(plan.variants)
    R, T = plan.ablate.shape
    B = R // V
    uniform = all(bool((x.view(B, V, *x.shape[1:]) == x[:V]).all())
                  for x in (plan.ablate, plan.layer, plan.fed, plan.frozen))
    if not uniform or B * V != R:  # a hand-made plan: no sharing assumed
        return [None] * T
    ablate, layer, fed, frozen = (x[:V].tolist() for x in (plan.ablate, plan.layer, plan.fed, plan.frozen))
    draws = {}
    source = [draws.setdefault((v.method, v.site), len(draws)) for v in plan.variants]
    past = [()] * V
    steps = []
    for t in range(num_latent):
        past = [past[v] + ((t < fed[v], ablate[v][t], layer[v] if ablate[v][t] else None,
                            source[v] if ablate[v][t] else None, frozen[v] and any(ablate[v][:t])),)
                for v in range(V)]
        group = {}
        of_variant = [group.setdefault(key, len(group)) for key in past]  # in order of first appearance
        if len(group) == V:
            steps.append(None)
            continue
        first = torch.tensor([of_variant.index(g) for g in range(len(group))])  # (G,) a variant per group
        rows = (torch.arange(B)[:, None] * V + first[None, :]).reshape(-1)  # (B*G,)
        spread = (torch.arange(B)[:, None] * len(group) + torch.tensor(of_variant)[None, :]).reshape(-1)  # (R,)
        steps.append(SharedStep(rows.to(plan.ablate.device), spread.to(plan.ablate.device), len(group)))
    return steps


def rows_of(plan: Plan, rows: torch.Tensor) -> Plan:
    """The plan of some of its rows (runner/rollout.py runs one row per group of a SharedStep)."""
    return Plan(plan.ablate[rows], plan.layer[rows], plan.replacement[rows], plan.fed[rows], plan.frozen[rows],
                plan.baseline_row[rows], plan.variants)


def apply(plan: Plan, step: int, hidden: torch.Tensor, layer: int) -> torch.Tensor:
    """The one generic ablation: rows of `plan` that ablate `step` at `layer` get their replacement.

    hidden: (R, 1, d), the vector at the current latent step (layer -1 = the input embedding).
    """
    assert hidden.shape[0] == plan.ablate.shape[0] and hidden.shape[1] == 1, \
        f"hidden {tuple(hidden.shape)} must be (R={plan.ablate.shape[0]}, 1, d)"
    rows = plan.ablate[:, step] & (plan.layer == layer)  # (R,)
    return torch.where(rows[:, None, None], plan.replacement[:, step : step + 1], hidden)
