"""runner/ablation.py: the scheme table, variants and plans, the strategies, and their effect in a rollout.

Plans are checked as plain data; their meaning is checked through real rollouts of tiny random
GPT-2 and Llama CODI models (tests/checkpoints.py).
"""
from __future__ import annotations

import pytest
import torch

from runner import ablation
from runner.ablation import BASELINE, AblationError, Reference, Variant
from runner.model import ModelSpec, load
from tests.checkpoints import GOLDS, QUESTIONS, make_checkpoint

T = 6
STEPS = 8  # max_new_tokens
IDS = [f"p{i}" for i in range(len(QUESTIONS))]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def folder(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def reasoner(folder):
    return load(ModelSpec(str(folder)))


@pytest.fixture(scope="module")
def baseline(reasoner):
    return reasoner.rollout(QUESTIONS, ablation.make_plan([BASELINE], IDS, T, reasoner.d_model), GOLDS, STEPS)


def run(reasoner, variants, references=None, seed=0, **options):
    """(plan, rollout) of every question under `variants`; row = question * len(variants) + variant."""
    plan = ablation.make_plan(variants, IDS, T, reasoner.d_model, references, seed)
    return plan, reasoner.rollout(QUESTIONS, plan, GOLDS, STEPS, **options)


# --- Variants and plans as data ------------------------------------------------------------------------

def test_ablated_positions_follow_the_design_table():
    for k in range(1, T + 1):
        assert Variant("prefix", k).ablated_positions(T) == set(range(k))
    for k in range(T):
        assert Variant("single", k).ablated_positions(T) == {k}
        assert Variant("suffix", k).ablated_positions(T) == set(range(k, T))
    for k in range(T + 1):
        exit_k = Variant("exit", k, "none")
        assert exit_k.ablated_positions(T) == set() and exit_k.latents_fed(T) == k
    assert Variant("prefix", T).ablated_positions(T) == set(range(T)), "prefix k = T ablates all"
    assert Variant("suffix", 0).latents_fed(T) == T and BASELINE.ablated_positions(T) == set()
    for scheme, k in [("prefix", 0), ("single", T), ("suffix", T), ("exit", T + 1), ("suffix", -1)]:
        with pytest.raises(AssertionError, match=f"{scheme} k"):
            Variant(scheme, k).ablated_positions(T)


def test_expand_puts_the_baseline_first_with_the_right_counts():
    default = ablation.expand(["prefix", "single", "suffix"], ["zero"], "latent", "recompute", T)
    assert len(default) == 19 and default[0] == BASELINE and BASELINE not in default[1:]
    assert [(v.scheme, v.k) for v in default[1:7]] == [("prefix", k) for k in range(1, 7)]
    full = ablation.expand(ablation.SCHEMES, ablation.METHODS, "resid:3", "frozen", T)
    assert len(full) == 1 + 3 * T * 4 + (T + 1), "exit has no method: one set of T + 1"
    assert len({v.key for v in full}) == len(full)
    assert all(v.site == "resid:3" and v.mode == "frozen" for v in full[1:])
    assert [v.method for v in full if v.scheme == "exit"] == ["none"] * (T + 1)
    assert all(Variant.from_key(v.key) == v for v in full)
    bad = [(["prefix", "middle"], ["zero"], "latent", "recompute"), (["prefix"], ["blur"], "latent", "recompute"),
           ([], ["zero"], "latent", "recompute"), (["prefix"], ["zero"], "latent", "sideways"),
           (["prefix"], ["zero"], "resid:x", "recompute"), (["prefix"], ["zero"], "mlp:3", "recompute")]
    for args in bad:
        with pytest.raises(AblationError):
            ablation.expand(*args, T)
    assert ablation.parse_site("resid:8", 16) == 8 and ablation.parse_site("latent") is None
    with pytest.raises(AblationError, match="layer must be in 0..15"):
        ablation.parse_site("resid:16", 16)


def test_plan_rows_are_problem_major_with_each_variants_positions():
    variants = [BASELINE, Variant("prefix", 2), Variant("single", 4, site="resid:1", mode="frozen"),
                Variant("suffix", 3), Variant("exit", 2, "none")]
    plan = ablation.make_plan(variants, ["a", "b", "c"], T, 8)
    V = len(variants)
    assert plan.ablate.shape == (3 * V, T) and plan.replacement.shape == (3 * V, T, 8)
    for row in range(3 * V):
        variant = variants[row % V]
        assert set(plan.ablate[row].nonzero()[:, 0].tolist()) == variant.ablated_positions(T), variant.key
        assert plan.fed[row] == variant.latents_fed(T) and plan.baseline_row[row] == row // V * V
        assert plan.frozen[row] == (variant.mode == "frozen")
        assert plan.layer[row] == (1 if variant.site == "resid:1" else -1)
    assert plan.layers == [1] and not plan.replacement.any(), "zero replaces with zeros"
    with pytest.raises(AssertionError, match="start with the baseline"):
        ablation.make_plan(variants[1:], ["a"], T, 8)


# --- The strategies -------------------------------------------------------------------------------

def reference(n=5, d=4, site="latent"):
    return Reference(site, tuple(f"r{i}" for i in range(n)), torch.randn(n, T, d, generator=torch.Generator().manual_seed(7)))


def test_mean_is_the_reference_mean():
    ref = reference()
    plan = ablation.make_plan([BASELINE, Variant("prefix", 3, "mean")], ["r0", "x"], T, 4, {"latent": ref})
    for row in (1, 3):
        torch.testing.assert_close(plan.replacement[row], ref.values.mean(0), atol=0, rtol=0)
    with pytest.raises(AblationError, match="'mean' at site 'resid:1' needs reference"):
        ablation.make_plan([BASELINE, Variant("single", 0, "mean", "resid:1")], ["a"], T, 4, {"latent": ref})


def test_noise_is_reproducible_per_seed_and_matches_the_reference_statistics():
    ref = reference()
    draw = lambda problem, seed: ablation.noise(ref, T, 4, problem, seed)
    assert torch.equal(draw("a", 0), draw("a", 0))
    assert not torch.allclose(draw("a", 0), draw("a", 1)) and not torch.allclose(draw("a", 0), draw("b", 0))
    variants = [BASELINE, Variant("single", 2, "noise")]
    in_pair = ablation.make_plan(variants, ["b", "a"], T, 4, {"latent": ref}, seed=3)
    alone = ablation.make_plan(variants, ["a"], T, 4, {"latent": ref}, seed=3)
    assert torch.equal(in_pair.replacement[3], alone.replacement[1]), "a problem's draw depends on its batch"
    draws = torch.stack([draw(f"q{i}", 0) for i in range(3000)])  # (3000, T, 4)
    torch.testing.assert_close(draws.mean(0), ref.mean, atol=0.15 * ref.std.max().item(), rtol=0)
    torch.testing.assert_close(draws.std(0), ref.std, atol=0, rtol=0.1)


def test_resample_takes_the_same_position_from_another_problem():
    ref = reference(n=5)
    chosen = set()
    for seed in range(20):
        for own, problem in enumerate(ref.problem_ids + ("stranger",)):
            picked = ablation.resample(ref, T, 4, problem, seed)  # (T, d)
            for p in range(T):
                sources = [j for j in range(5) if torch.equal(ref.values[j, p], picked[p])]
                assert len(sources) == 1, f"position {p} of {problem} is not position {p} of a reference problem"
                assert problem == "stranger" or sources[0] != own, f"{problem} resampled itself at {p} (seed {seed})"
                chosen.add(sources[0])
    assert chosen == set(range(5)), f"resample only ever picks {chosen}"
    assert torch.equal(ablation.resample(ref, T, 4, "r1", 4), ablation.resample(ref, T, 4, "r1", 4))
    with pytest.raises(AssertionError, match="at least 2"):
        ablation.resample(reference(n=1), T, 4, "r0", 0)


# --- Their effect in a rollout ------------------------------------------------------------------------

def test_a_variant_that_ablates_nothing_reproduces_the_baseline_bitwise(reasoner, baseline):
    noops = [Variant("exit", T, "none"), Variant("exit", T, "none", mode="frozen"),
             Variant("exit", T, "zero", "resid:1", "frozen"), Variant("exit", T, "zero", "resid:0")]
    variants = [BASELINE, Variant("prefix", 3), *noops, Variant("single", 1, site="resid:1")]
    _, out = run(reasoner, variants, capture=(0, 1))
    V = len(variants)
    for i in range(len(QUESTIONS)):
        base = i * V
        assert out.tokens[base] == baseline.tokens[i], "the baseline depends on what shares its batch"
        for row in range(base + 2, base + 2 + len(noops)):
            assert out.tokens[row] == out.tokens[base], variants[row % V].key
            assert torch.equal(out.gold_logprob[row], out.gold_logprob[base]), variants[row % V].key
            assert torch.equal(out.latents[row], out.latents[base]), variants[row % V].key
            assert torch.equal(out.captured[1][row], out.captured[1][base]), variants[row % V].key
    torch.testing.assert_close(out.gold_logprob[::V], baseline.gold_logprob, atol=1e-5, rtol=1e-5)
    changed = [out.tokens[i * V + 1] != out.tokens[i * V] for i in range(len(QUESTIONS))]
    assert any(changed), "prefix:3 changed no answer: this batch does not exercise ablation"


@pytest.mark.parametrize("site", ["latent", "resid:0"])
def test_frozen_keeps_later_latents_and_recompute_changes_them(reasoner, baseline, site):
    k = 2
    variants = [BASELINE, Variant("single", k, site=site, mode="frozen"), Variant("single", k, site=site)]
    _, out = run(reasoner, variants)
    kept = [p for p in range(T) if p != k or site != "latent"]  # a resid ablation feeds the baseline latent
    for i in range(len(QUESTIONS)):
        base, frozen, recompute = out.latents[i * 3: i * 3 + 3]  # (T, d) each
        torch.testing.assert_close(base, baseline.latents[i], atol=1e-5, rtol=1e-5)
        assert torch.equal(frozen[kept], base[kept]), f"frozen changed a latent it does not ablate ({site})"
        assert torch.equal(recompute[:k], base[:k]), "positions before the ablation must not move"
        assert (recompute[k + 1:] - base[k + 1:]).abs().amax(-1).min() > 1e-3, "recompute left later latents alone"
        if site == "latent":
            assert not frozen[k].any() and not recompute[k].any(), "the ablated latent is not zero"
        assert out.gold_logprob[i * 3 + 1] != out.gold_logprob[i * 3], "frozen ablation had no effect at all"


def test_reference_strategies_feed_their_replacements(reasoner, baseline):
    refs = {"latent": Reference("latent", tuple(IDS), baseline.latents)}
    variants = [BASELINE, Variant("prefix", 3, "mean"), Variant("single", 4, "noise"), Variant("suffix", 2, "resample"),
                Variant("prefix", 2, "mean", mode="frozen")]
    plan, out = run(reasoner, variants, refs, seed=5)
    _, again = run(reasoner, variants, refs, seed=5)
    assert again.tokens == out.tokens and torch.equal(again.gold_logprob, out.gold_logprob)
    for row in range(len(out.tokens)):
        positions = sorted(variants[row % len(variants)].ablated_positions(T))
        assert torch.equal(out.latents[row, positions], plan.replacement[row, positions])
        if variants[row % len(variants)].method == "mean":
            assert torch.equal(out.latents[row, positions], baseline.latents.mean(0)[positions])
    for i, problem in enumerate(IDS):  # resample: position p from another problem's baseline at p
        fed = out.latents[i * len(variants) + 3]
        for p in range(2, T):
            sources = [j for j in range(len(IDS)) if torch.equal(baseline.latents[j, p], fed[p])]
            assert sources and i not in sources, f"{problem} position {p} came from {sources}"


@pytest.mark.parametrize("k", range(T))
def test_exit_after_k_latents_equals_a_model_with_k_latents(folder, reasoner, k):
    variants = [BASELINE, Variant("exit", k, "none"), Variant("prefix", T)]  # holes sit beside real rows
    _, out = run(reasoner, variants)
    short = load(ModelSpec(str(folder), num_latent=k))
    assert short.num_latent == k
    ref = short.rollout(QUESTIONS, ablation.make_plan([BASELINE], IDS, k, short.d_model), GOLDS, STEPS)
    rows = slice(1, None, len(variants))
    assert out.tokens[rows] == ref.tokens
    torch.testing.assert_close(out.gold_logprob[rows], ref.gold_logprob, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.latents[rows, :k], ref.latents, atol=1e-5, rtol=1e-5)
