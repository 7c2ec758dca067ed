"""A faithful reference of the old script's loop, for benchmarks only (never used by the product).

The old MECH-02 script generated once per (problem, variant) at batch size 1: the question was
re-encoded every time, the six latents were rolled out with the ablated ones zeroed, EOT was
fed, and up to 200 tokens were decoded greedily, stopping at EOS. This file does exactly that
with plain Hugging Face calls, so that `bench/throughput.py` can check that the engine gives
the same answers and measure how much faster it is.
"""
from __future__ import annotations

import torch

from runner.model import LatentReasoner


@torch.inference_mode()
def reference_answer(reasoner: LatentReasoner, question: str | list[int], ablated: frozenset[int],
                     latents_fed: int | None = None, max_new_tokens: int = 200) -> list[int]:
    """One rollout from scratch: returns the generated token ids (EOS excluded)."""
    hf, device = reasoner.hf, reasoner.device
    input_ids = torch.tensor([reasoner.prompt_ids(question)], device=device)  # (1, L): the model's own template
    out = hf(input_ids=input_ids, use_cache=True, output_hidden_states=True)
    cache, hidden = out.cache, out.hidden_states[-1][:, -1:]  # (1, 1, d)
    for step in range(reasoner.num_latent if latents_fed is None else latents_fed):
        latent = reasoner.prj(hidden)
        if step in ablated:
            latent = torch.zeros_like(latent)
        out = hf(inputs_embeds=latent, cache=cache, use_cache=True, output_hidden_states=True)
        cache, hidden = out.cache, out.hidden_states[-1][:, -1:]
    out = hf(input_ids=torch.tensor([reasoner.answer_start], device=device), cache=cache, use_cache=True)  # EOT [+ EOS]
    tokens = []
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1, : reasoner.decode_vocab].argmax())
        if token in reasoner.eos_ids:
            break
        tokens.append(token)
        out = hf(input_ids=torch.tensor([[token]], device=device), cache=out.cache, use_cache=True)
    return tokens
