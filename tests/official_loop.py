"""CODI's official evaluation loop (zhenyi4/codi `test.py`, greedy), rewritten here from reading it.

Independent of ThoughtSweep's engine: it runs on the in-memory model built the way CODI's
`CODI` class builds it (tests/checkpoints.py), not on what `runner.model.load` makes of the saved
folder, and it uses none of runner/. What it does, as test.py does it:

- tokenizer: `AutoTokenizer.from_pretrained(base, padding_side="left", use_fast=False)`, and a
  '[PAD]' special token with id V (the base vocabulary size) when the tokenizer has no pad token;
- question text `question.strip().replace('  ', ' ')`, tokenised with the tokenizer's defaults
  (Llama-3 adds BOS), padded to the longest of the batch; then BOT (EOS, BOT when `remove_eos`
  is false); the attention mask covers the question forward only;
- latent 0 = prj(last hidden state) (the state itself when `use_prj` is false), then
  `inf_latent_iterations` forwards of the latent as an input embedding, each making the next;
- EOT (EOT, EOS when `remove_eos` is false) fed as embeddings, then greedy tokens fed back as
  embeddings, with no attention mask and no position ids, over logits[..., :vocab_size - 1] of
  the grown vocabulary (every id but EOT), until every row has emitted EOS (kept in its tokens)
  or `max_new_tokens`;
- `tokenizer.decode(tokens, skip_special_tokens=True)` with the tokenizer's declared clean-up of
  tokenization spaces, which transformers 4.52 (test.py's pin) applies and transformers 5 skips
  for BPE tokenizers: applied here by hand so that the reference means what test.py meant;
- the answer: commas removed, the last match of `-?\\d+\\.?\\d*` as a float, infinity when none.
"""
from __future__ import annotations

import copy
import re

import torch

INF = float("inf")
# transformers' clean_up_tokenization: the spaced forms it joins.
_SPACED = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
           (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def official_tokenizer(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder, padding_side="left", use_fast=False)


def answer_number(text: str) -> float:
    numbers = re.findall(r"-?\d+\.?\d*", text.replace(",", ""))
    return float(numbers[-1]) if numbers else INF


def decode(tokenizer, tokens: list[int]) -> str:
    text = tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if tokenizer.clean_up_tokenization_spaces:
        for spaced, joined in _SPACED:
            text = text.replace(spaced, joined)
    return text


@torch.no_grad()
def official_answers(codi, tokenizer, questions: list[str], batch_size: int = 1, max_new_tokens: int = 256,
                     remove_eos: bool = True, use_prj: bool = True, dtype=torch.float32):
    """Per question: (generated ids up to and with EOS, decoded text, answer number), batched as test.py."""
    # test.py casts the unmerged peft model (model.to(torch.bfloat16)); a copy keeps `codi` in float32.
    model, prj = (codi.model, codi.prj) if dtype == torch.float32 else \
        (copy.deepcopy(codi.model).to(dtype), copy.deepcopy(codi.prj).to(dtype))
    embed = model.get_input_embeddings()
    grown = embed.weight.shape[0]  # CODI's model.codi.config.vocab_size after resize_token_embeddings
    V = grown - 3
    pad_id, bot_id, eot_id = V, V + 1, V + 2
    if tokenizer.pad_token_id is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        tokenizer.pad_token_id = pad_id
    eos = tokenizer.eos_token_id
    texts = [q.strip().replace("  ", " ") for q in questions]
    results = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding="longest")
        B = batch["input_ids"].shape[0]
        tail = torch.tensor([bot_id] if remove_eos else [eos, bot_id]).expand(B, -1)
        input_ids = torch.cat([batch["input_ids"], tail], dim=1)
        attention_mask = torch.cat([batch["attention_mask"], torch.ones_like(tail)], dim=1)
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, output_hidden_states=True)
        cache = out.past_key_values
        latent = out.hidden_states[-1][:, -1, :].unsqueeze(1)
        if use_prj:
            latent = prj(latent)
        for _ in range(codi.num_latent):
            out = model(inputs_embeds=latent, past_key_values=cache, use_cache=True, output_hidden_states=True)
            cache = out.past_key_values
            latent = out.hidden_states[-1][:, -1, :].unsqueeze(1)
            if use_prj:
                latent = prj(latent)
        after = torch.tensor([eot_id] if remove_eos else [eot_id, eos])
        step_input = embed(after).unsqueeze(0).expand(B, -1, -1)
        finished = [False] * B
        tokens = [[] for _ in range(B)]
        for _ in range(max_new_tokens):
            out = model(inputs_embeds=step_input, attention_mask=None, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            next_ids = out.logits[:, -1, : grown - 1].argmax(-1)
            for b in range(B):
                if not finished[b]:
                    tokens[b].append(int(next_ids[b]))
                    finished[b] = int(next_ids[b]) == eos
            if all(finished):
                break
            step_input = embed(next_ids).unsqueeze(1)
        for row in tokens:
            text = decode(tokenizer, row)
            results.append((row, text, answer_number(text)))
    return results
