"""runner/model.py: loading released-layout CODI checkpoints, and the rollout loop against naive references.

Real forward passes of tiny random GPT-2 and Llama CODI models (tests/checkpoints.py). The
references are written out here, one question at a time, straight from CODI's official test
loop, without `LatentReasoner.rollout`.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

from runner import ablation
from runner.ablation import BASELINE, Variant
from runner.model import ModelLoadError, ModelSpec, load
from tests.checkpoints import GOLDS, QUESTIONS, build_codi, save_checkpoint

STEPS = 8  # max_new_tokens: enough to see rows finish at different steps, cheap on a CPU
# Batch size and padding change float32 rounding; six recurrent latent steps through a random
# network amplify it to ~1e-5 on O(1) values; gold log-probs are ~ -30.
CLOSE = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, tmp_path_factory):
    """(in-memory TinyCodi, its saved checkpoint folder) per family; alpha 16 so codi_config.json matters."""
    codi = build_codi(request.param, lora_alpha=16)
    return codi, save_checkpoint(codi, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def reasoner(tiny):
    return load(ModelSpec(str(tiny[1])))


def plan_for(reasoner, variants, n_problems, references=None, seed=0):
    ids = [f"p{i}" for i in range(n_problems)]
    return ablation.make_plan(variants, ids, reasoner.num_latent, reasoner.d_model, references, seed)


def blocks_of(hf):
    """The transformer blocks, found by architecture (not through LatentReasoner)."""
    return hf.transformer.h if hasattr(hf, "transformer") else hf.model.layers


def codi_reference(reasoner, question, gold=None, zero_block=None, zero_steps=(), capture=None):
    """CODI's official test loop (zen-E/CODI test.py) at batch size 1, with an optional plain
    forward hook that zeroes block `zero_block`'s output on the latent steps in `zero_steps`.
    -> (generated ids, gold log-prob or None, fed latents (T, d), captured block outputs (T, d))."""
    hf, prj, V = reasoner.hf, reasoner.prj, reasoner.base_vocab
    ids = lambda text: reasoner.tokenizer(text, add_special_tokens=False)["input_ids"]
    question_ids = reasoner.tokenizer(question.strip().replace("  ", " "))["input_ids"]  # test.py's defaults
    state = {"zero": False, "seen": []}

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if state["zero"]:
            hidden = torch.zeros_like(hidden)
        state["seen"].append(hidden[0, -1].clone())
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    layer = zero_block if zero_block is not None else capture
    handle = blocks_of(hf)[layer].register_forward_hook(hook) if layer is not None else None
    try:
        with torch.inference_mode():
            out = hf(input_ids=torch.tensor([question_ids + [V + 1]]), use_cache=True, output_hidden_states=True)
            state["seen"].clear()  # only the latent steps count
            latent, fed = prj(out.hidden_states[-1][:, -1:]), []  # (1, 1, d)
            for step in range(reasoner.num_latent):
                fed.append(latent[0, 0])
                state["zero"] = step in zero_steps
                out = hf(inputs_embeds=latent, cache=out.cache, use_cache=True, output_hidden_states=True)
                state["zero"] = False
                latent = prj(out.hidden_states[-1][:, -1:])
            captured = torch.stack(state["seen"]) if state["seen"] else None
            if handle is not None:
                handle.remove()
                handle = None
            logprob = None
            if gold is not None:  # teacher forcing on a copy of the cache: EOT + the answer prompt
                answer = ids(reasoner.answer_prompt(gold))
                scored = hf(input_ids=torch.tensor([[V + 2] + answer]), cache=copy.deepcopy(out.cache), use_cache=True)
                logprobs = scored.logits[0, :-1, : V + 2].float().log_softmax(-1)  # test.py: all but EOT
                logprob = float(logprobs[torch.arange(len(answer)), answer].sum())
            out = hf(input_ids=torch.tensor([[V + 2]]), cache=out.cache, use_cache=True)
            tokens = []
            for _ in range(STEPS):
                next_id = int(out.logits[0, -1, : V + 2].argmax())
                if next_id == reasoner.tokenizer.eos_token_id:
                    break
                tokens.append(next_id)
                out = hf(input_ids=torch.tensor([[next_id]]), cache=out.cache, use_cache=True)
    finally:
        if handle is not None:
            handle.remove()
    return tokens, logprob, torch.stack(fed), captured


# --- Loading ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("merge_lora", [True, False])
def test_loaded_model_computes_what_the_in_memory_peft_model_computes(tiny, merge_lora):
    codi, folder = tiny
    loaded = load(ModelSpec(str(folder), merge_lora=merge_lora))
    assert (loaded.num_latent, loaded.base_vocab) == (6, len(codi.tokenizer))
    assert (loaded.bot_id, loaded.eot_id) == (codi.base_vocab + 1, codi.base_vocab + 2)
    ids = torch.tensor([codi.tokenizer(QUESTIONS[0])["input_ids"] + [codi.base_vocab + 1]])
    with torch.inference_mode():
        expected = codi.model(input_ids=ids, output_hidden_states=True)
        got = loaded.hf(input_ids=ids, output_hidden_states=True)
        with codi.model.disable_adapter():
            without_lora = codi.model(input_ids=ids).logits
        assert (without_lora - expected.logits).abs().max() > 1e-2, "LoRA must change outputs, or this test proves nothing"
        torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)
        last = expected.hidden_states[-1][:, -1:]
        torch.testing.assert_close(loaded.prj(last), codi.prj(last), atol=1e-6, rtol=1e-6)  # same weights,
        # but GEMM rounding depends on where the tensors sit in memory (safetensors vs. init)
    tied = loaded.hf.get_output_embeddings().weight
    assert tied.data_ptr() == loaded.hf.get_input_embeddings().weight.data_ptr(), "lm_head must stay tied"


def test_checkpoint_without_lora_and_without_codi_config_loads(tmp_path):
    codi = build_codi("gpt2", lora=False, num_latent=4)
    loaded = load(ModelSpec(str(save_checkpoint(codi, tmp_path, codi_config=False)), num_latent=4))
    ids = torch.tensor([codi.tokenizer(QUESTIONS[1])["input_ids"]])
    with torch.inference_mode():
        torch.testing.assert_close(loaded.hf(input_ids=ids).logits, codi.model(input_ids=ids).logits)
    assert loaded.num_latent == 4


@pytest.mark.parametrize("drop", ["codi.base_model.model.transformer.h.1.mlp.c_fc.lora_A.default.weight",
                                  "codi.base_model.model.transformer.h.0.attn.c_attn.base_layer.weight",
                                  "prj.ln.bias"])
def test_missing_key_is_named(tmp_path, drop):
    codi = build_codi("gpt2")
    state = codi.state_dict()
    del state[drop]
    with pytest.raises(ModelLoadError) as error:
        load(ModelSpec(str(save_checkpoint(codi, tmp_path, state=state))))
    assert drop.removeprefix("codi.base_model.model.").removeprefix("prj.") in str(error.value)
    assert "missing" in str(error.value)


@pytest.mark.parametrize("extra", ["codi.base_model.model.transformer.h.0.attn.c_attn.lora_C.default.weight",
                                   "optimizer.state.0"])
def test_unexpected_key_is_named(tmp_path, extra):
    codi = build_codi("gpt2")
    state = codi.state_dict() | {extra: torch.zeros(3)}
    with pytest.raises(ModelLoadError, match="unexpected") as error:
        load(ModelSpec(str(save_checkpoint(codi, tmp_path, state=state))))
    assert extra.removeprefix("codi.base_model.model.") in str(error.value)


def test_pytorch_model_bin_loads_like_safetensors(tiny, reasoner, tmp_path):
    codi, _ = tiny
    from_bin = load(ModelSpec(str(save_checkpoint(codi, tmp_path, weights="bin"))))
    assert not (tmp_path / "model.safetensors").exists()
    plan = plan_for(reasoner, [BASELINE], len(QUESTIONS))
    a, b = reasoner.rollout(QUESTIONS, plan, GOLDS, STEPS), from_bin.rollout(QUESTIONS, plan, GOLDS, STEPS)
    assert a.tokens == b.tokens
    assert torch.equal(a.gold_logprob, b.gold_logprob)


class Payload:
    """Unpickling this would create `path`: proof that a pickle ran code."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_that_is_not_a_plain_state_dict_is_refused(tmp_path):
    codi = build_codi("gpt2")
    folder = save_checkpoint(codi, tmp_path / "ckpt", weights="bin")
    marker = tmp_path / "code-ran"
    torch.save(codi.state_dict() | {"prj.extra": Payload(marker)}, folder / "pytorch_model.bin", pickle_module=pickle)
    with pytest.raises(ModelLoadError, match="weights_only") as error:
        load(ModelSpec(str(folder)))
    assert "pytorch_model.bin" in str(error.value) and "not a plain weights file" in str(error.value)
    assert not marker.exists(), "the pickle's code ran"


def test_missing_paths_give_clear_messages(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder") as error:
        load(ModelSpec(str(tmp_path / "nowhere")))
    assert str(tmp_path / "nowhere") in str(error.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no model.safetensors or pytorch_model.bin"):
        load(ModelSpec(str(tmp_path / "empty")))
    with pytest.raises(ModelLoadError, match="is a file"):
        load(ModelSpec(str(tmp_path / "empty" / "config.json")))


def test_hub_id_offline_names_the_id_and_how_to_pass_a_folder(monkeypatch, tmp_path):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError) as error:
        load(ModelSpec("zen-E/no-such-codi-model"))
    message = str(error.value)
    assert "'zen-E/no-such-codi-model'" in message
    assert "hf download zen-E/no-such-codi-model --local-dir" in message and "pass the folder" in message


@pytest.mark.parametrize("dtype, static", [("float16", False), ("bfloat16", False), ("bfloat16", True)])
def test_half_precision_loads_and_runs_on_cpu(tiny, dtype, static):
    half = load(ModelSpec(str(tiny[1]), dtype=dtype))
    half.static_shapes = static  # bf16 with static shapes: the GPU's configuration
    assert half.dtype == getattr(torch, dtype) and next(half.prj.parameters()).dtype == half.dtype
    variants = [BASELINE, Variant("prefix", 2), Variant("single", 1, site="resid:0"), Variant("exit", 3, "none")]
    out = half.rollout(QUESTIONS, plan_for(half, variants, len(QUESTIONS)), GOLDS, STEPS, capture=(1,))
    R = len(QUESTIONS) * len(variants)
    assert len(out.tokens) == len(out.texts) == R and all(len(t) <= STEPS for t in out.tokens)
    assert out.latents.shape == (R, 6, half.d_model) and out.latents.dtype == torch.float32
    assert out.gold_logprob.shape == (R,) and torch.isfinite(out.gold_logprob).all()
    assert out.captured[1].shape == (R, 6, half.d_model) and out.lens_ids.shape == (R, 6, 3)


# --- The rollout loop ---------------------------------------------------------------------------

def test_baseline_equals_the_official_codi_loop_at_batch_size_one(reasoner):
    out = reasoner.rollout(QUESTIONS, plan_for(reasoner, [BASELINE], len(QUESTIONS)), GOLDS, STEPS)
    for i, (question, gold) in enumerate(zip(QUESTIONS, GOLDS)):
        tokens, logprob, fed, _ = codi_reference(reasoner, question, gold)
        assert out.tokens[i] == tokens, f"question {i}: rollout {out.tokens[i]} != official loop {tokens}"
        assert out.gold_logprob[i].item() == pytest.approx(logprob, abs=1e-4)
        torch.testing.assert_close(out.latents[i], fed, **CLOSE)
    assert out.texts == [t.strip() for t in reasoner.tokenizer.batch_decode(out.tokens)]
    assert all(t != reasoner.eot_id for row in out.tokens for t in row), "EOT was emitted"


@pytest.mark.parametrize("layer", [0, 1])
def test_resid_zero_equals_a_plain_forward_hook(reasoner, layer):
    site = f"resid:{layer}"
    variants = [BASELINE, Variant("single", 2, site=site), Variant("prefix", 3, site=site),
                Variant("suffix", 4, site=site)]
    out = reasoner.rollout(QUESTIONS, plan_for(reasoner, variants, len(QUESTIONS)), GOLDS, STEPS, capture=(layer,))
    changed = 0
    for i, question in enumerate(QUESTIONS):
        for v, variant in enumerate(variants):
            row = i * len(variants) + v
            steps = variant.ablated_positions(6)
            tokens, logprob, fed, captured = codi_reference(reasoner, question, GOLDS[i], layer, steps, capture=layer)
            assert out.tokens[row] == tokens, f"{question!r} {variant.key}: {out.tokens[row]} != {tokens}"
            assert out.gold_logprob[row].item() == pytest.approx(logprob, abs=1e-4)
            torch.testing.assert_close(out.latents[row], fed, **CLOSE)
            torch.testing.assert_close(out.captured[layer][row], captured, **CLOSE)
            assert all(captured[s].abs().max() == 0 for s in steps)
            changed += out.tokens[row] != out.tokens[i * len(variants)]
    assert changed > 0, "no ablation changed any answer: the comparison is vacuous"


def test_batched_equals_one_at_a_time(reasoner):
    variants = [BASELINE]
    for mode in ablation.MODES:
        variants += ablation.expand(ablation.SCHEMES, ablation.METHODS, "latent", mode, 6)[1:]
        variants += ablation.expand(["single"], ["zero", "mean"], "resid:1", mode, 6)[1:]
    ids = [f"p{i}" for i in range(len(QUESTIONS))]
    base = reasoner.rollout(QUESTIONS, plan_for(reasoner, [BASELINE], len(QUESTIONS)), capture=(1,))
    references = {site: ablation.Reference(site, tuple(ids), values)
                  for site, values in (("latent", base.latents), ("resid:1", base.captured[1]))}
    together = reasoner.rollout(QUESTIONS, ablation.make_plan(variants, ids, 6, reasoner.d_model, references, 1),
                                GOLDS, STEPS)
    V = len(variants)
    for i, question in enumerate(QUESTIONS):
        alone = reasoner.rollout([question], ablation.make_plan(variants, ids[i:i + 1], 6, reasoner.d_model,
                                                                references, 1), [GOLDS[i]], STEPS)
        assert together.tokens[i * V:(i + 1) * V] == alone.tokens, f"question {i} differs when batched"
        torch.testing.assert_close(together.gold_logprob[i * V:(i + 1) * V], alone.gold_logprob, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together.latents[i * V:(i + 1) * V], alone.latents, **CLOSE)
    assert len(set(map(tuple, together.tokens))) > len(QUESTIONS), "variants never change answers: vacuous"
    assert len({len(t) for t in together.tokens}) > 1, "all rows decode the same length: finished rows untested"


def test_growing_cache_is_bit_identical_to_the_models_own_cache(reasoner, monkeypatch):
    """runner/cache.py only changes where keys and values live: every output equal, not merely close."""
    variants = [BASELINE, *ablation.expand(["prefix", "exit"], ["zero"], "latent", "frozen", 6)[1:],
                Variant("single", 2, site="resid:1")]
    plan = plan_for(reasoner, variants, len(QUESTIONS))
    monkeypatch.setattr(reasoner, "shared_prefix", False)  # the repeated cache; tests/test_attention.py: the shared one
    ours = reasoner.rollout(QUESTIONS, plan, GOLDS, 24, capture=(1,))
    assert type(reasoner._new_cache()).__name__ == "GrowingCache"
    from transformers.cache_utils import DynamicCache
    monkeypatch.setattr(reasoner, "_new_cache", lambda shared=False, capacity=None: DynamicCache())  # transformers' own
    theirs = reasoner.rollout(QUESTIONS, plan, GOLDS, 24, capture=(1,))
    assert ours.tokens == theirs.tokens and len({len(t) for t in ours.tokens}) > 1  # rows left the batch
    for name in ("gold_logprob", "latents", "lens_probs"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert torch.equal(ours.captured[1], theirs.captured[1])


@pytest.mark.parametrize("shared", [True, False])
def test_static_shapes_give_the_answers_of_the_dynamic_path(reasoner, monkeypatch, shared):
    """The CUDA path (fixed-capacity cache and mask; finished rows masked, not dropped), run on the CPU:
    every step after the prompt sees the same shapes, and the answers are the dynamic path's."""
    variants = [BASELINE, *ablation.expand(["prefix", "exit"], ["zero"], "latent", "frozen", 6)[1:],
                Variant("single", 2, site="resid:1")]
    plan = plan_for(reasoner, variants, len(QUESTIONS))
    monkeypatch.setattr(reasoner, "shared_prefix", shared)
    forward, outs, shapes = reasoner.forward, {}, {}

    def recording(cache, mask, *args, **kwargs):  # observes the real forward: the shapes it was given and left
        out = forward(cache, mask, *args, **kwargs)
        shapes[static][-1].append((tuple(mask.shape), tuple(cache.layers[0].keys.shape)))
        return out
    monkeypatch.setattr(reasoner, "forward", recording)
    for static in (False, True):
        monkeypatch.setattr(reasoner, "static_shapes", static)
        shapes[static] = [[]]
        outs[static] = [reasoner.rollout(QUESTIONS, plan, GOLDS, 24, capture=(1,))]
        shapes[static].append([])
        outs[static].append(reasoner.rollout(QUESTIONS, plan, max_new_tokens=2))
    for steps in shapes[True]:
        assert len(set(steps[1:])) == 1, f"static steps changed shape: {sorted(set(steps))}"
    assert len(set(shapes[False][0][1:])) > 1  # the dynamic path grows (and drops rows): the check can fail
    (dynamic, short), (static, static_short) = outs[False], outs[True]
    assert static.tokens == dynamic.tokens and static_short.tokens == short.tokens
    assert len({len(t) for t in dynamic.tokens}) > 1, "all rows decode the same length: finished rows untested"
    for name in ("gold_logprob", "latents", "lens_probs"):
        torch.testing.assert_close(getattr(static, name), getattr(dynamic, name), atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(static.captured[1], dynamic.captured[1], **CLOSE)


def test_growing_layer_grows_crops_and_selects_like_a_dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    from runner.cache import GrowingLayer
    ours, theirs = GrowingLayer(), DynamicLayer()
    steps = [torch.randn(3, 2, n, 4) for n in (50, 1, 1, 20, 1)]  # past the 64-token first buffer
    for step in steps:
        for layer in (ours, theirs):
            keys, values = layer.update(step, -step)
        assert torch.equal(keys, ours.keys) and torch.equal(ours.keys, theirs.keys)
        assert torch.equal(ours.values, theirs.values) and ours.get_seq_length() == theirs.get_seq_length()
    for operation in (lambda layer: layer.crop(-5), lambda layer: layer.batch_repeat_interleave(2),
                      lambda layer: layer.batch_select_indices(torch.tensor([0, 3, 5])),
                      lambda layer: layer.update(steps[1][:3], steps[1][:3])):
        operation(ours), operation(theirs)
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
        assert ours.get_seq_length() == theirs.get_seq_length()
    with pytest.raises(ValueError, match="minus"):
        ours.crop(3)


def test_a_rollout_leaves_no_hook_on_the_model(reasoner):
    """resid ablations and captures act inside runner/forward.py's loop: the shared model's hooks stay as they were."""
    blocks = blocks_of(reasoner.hf)
    own = [dict(block._forward_hooks) for block in blocks]  # transformers' output-capturing hooks
    plan = plan_for(reasoner, [BASELINE, Variant("single", 1, site="resid:0")], len(QUESTIONS))
    out = reasoner.rollout(QUESTIONS, plan, GOLDS, STEPS, capture=(0, 1))
    assert out.captured[0][1::2, 1].abs().max() == 0 and out.captured[0][0::2, 1].abs().max() > 0
    assert [dict(block._forward_hooks) for block in blocks] == own


def test_sigmoid_form_gelu_is_the_tanh_gelu_to_float32_rounding():
    """runner/forward.py's GELU in float32: x * sigmoid(2z) for 0.5 x (1 + tanh z), 2x faster on a CPU."""
    from runner.forward import gelu_tanh_
    x = torch.linspace(-12, 12, 100_001)
    expected = torch.nn.functional.gelu(x, approximate="tanh")
    got = gelu_tanh_(x.clone())
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)
    assert not torch.equal(got, expected), "the same kernel: this test would prove nothing"


def test_a_batch_mates_longer_gold_takes_no_row_past_the_models_positions(tiny_reasoner):
    """Each problem is checked to fit with its own gold answer; in a batch the teacher-forced answers are
    right-padded to the longest. That padding once ran a near-full row past GPT-2's position table
    (IndexError: the whole sweep failed); now its position ids stop at the row's last answer token."""
    from runner.batch import unrunnable
    r, max_new_tokens = tiny_reasoner, 8
    long_gold = " ".join(["12"] * 20)
    assert len(r.ids(r.answer_prompt(long_gold), special=False)) > max_new_tokens + 10
    question, words = "Tom has 3 apples and buys 5 more", " Then he eats 2 of them"
    while unrunnable(r, {"question": question + words, "gold": "7"}, max_new_tokens) is None:
        question += words  # as long as fits with its own one-token gold
    problems = [(question, "7"), ("How many apples?", long_gold)]
    assert all(unrunnable(r, {"question": q, "gold": g}, max_new_tokens) is None for q, g in problems)
    assert len(r.prompt_ids(question)) + r.num_latent + len(r.ids(r.answer_prompt(long_gold), special=False)) \
        > r.hf.config.n_positions, "the batch mate's answer would not have run the long row past the positions"
    variants = [BASELINE, Variant("prefix", 2)]
    plan = ablation.make_plan(variants, ["long", "mate"], r.num_latent, r.d_model)
    together = r.rollout([q for q, _ in problems], plan, [g for _, g in problems], max_new_tokens)
    for i, (q, g) in enumerate(problems):
        alone = r.rollout([q], ablation.make_plan(variants, ["x"], r.num_latent, r.d_model), [g], max_new_tokens)
        rows = slice(2 * i, 2 * i + 2)
        assert together.tokens[rows] == alone.tokens
        torch.testing.assert_close(together.gold_logprob[rows], alone.gold_logprob, **CLOSE)
