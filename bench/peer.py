"""A careful researcher's batched plain-transformers sweep, for benchmarks only (never used by the product).

What someone fluent in Hugging Face writes in an afternoon to ablate CODI's latents: problems
batched with left padding and position ids from the mask, the question encoded once per batch,
the `DynamicCache` deep-copied for each variant, the six latents rolled out with the ablated ones
zeroed, EOT, and an own greedy loop over the batch (finished rows kept, masked, until all are
done). `bench/throughput.py` checks that it gives the engine's answers and measures the ratio.
"""
from __future__ import annotations

import copy

import torch

from runner.model import LatentReasoner


@torch.inference_mode()
def peer_answers(reasoner: LatentReasoner, questions: list, ablated: list[frozenset[int]],
                 max_new_tokens: int = 24) -> list[list[list[int]]]:
    """For each variant (its ablated latent positions), each question's generated ids (EOS excluded)."""
    hf, device = reasoner.hf, reasoner.device
    prompts = [reasoner.prompt_ids(q) for q in questions]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[reasoner.pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)  # (B, L)
    out = hf(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
             use_cache=True, output_hidden_states=True)
    prompt_cache, prompt_hidden = out.cache, out.hidden_states[-1][:, -1:]  # (B, 1, d)
    eos = torch.tensor(reasoner.eos_ids, dtype=torch.long, device=device)
    B, results = len(questions), []
    for positions in ablated:
        cache, hidden, m = copy.deepcopy(prompt_cache), prompt_hidden, mask
        for step in range(reasoner.num_latent):
            latent = reasoner.prj(hidden)
            if step in positions:
                latent = torch.zeros_like(latent)
            out = hf(inputs_embeds=latent, attention_mask=torch.cat([m, m.new_ones(B, 1)], -1),
                     position_ids=m.sum(-1, keepdim=True), cache=cache, use_cache=True, output_hidden_states=True)
            m = torch.cat([m, m.new_ones(B, 1)], -1)
            cache, hidden = out.cache, out.hidden_states[-1][:, -1:]
        token = torch.tensor([reasoner.answer_start] * B, device=device)  # EOT [+ EOS]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        generated = []
        while True:
            step = m.new_ones(B, token.shape[1])
            out = hf(input_ids=token, attention_mask=torch.cat([m, step], -1), cache=cache, use_cache=True,
                     position_ids=m.sum(-1, keepdim=True) + torch.arange(token.shape[1], device=device))
            m, cache = torch.cat([m, step], -1), out.cache
            next_ids = out.logits[:, -1, : reasoner.decode_vocab].argmax(-1)  # (B,)
            done |= torch.isin(next_ids, eos)
            generated.append(torch.where(done, -1, next_ids))
            if bool(done.all()) or len(generated) == max_new_tokens:
                break
            token = next_ids[:, None]
        rows = torch.stack(generated, 1).tolist() if generated else [[] for _ in range(B)]
        results.append([[t for t in row if t >= 0] for row in rows])
    return results
