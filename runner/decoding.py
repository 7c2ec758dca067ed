"""After EOT: the gold answer's log-prob by teacher forcing, and greedy decoding (runner/rollout.py's loop).

The teacher-forced answer doubles as a draft of greedy decoding (speculative decoding with the
gold as the draft): where the model's own argmax agrees with it, its tokens are accepted without
a forward of their own, so a correct answer costs no decoding steps.
"""
from __future__ import annotations

import torch


def answer_ids(reasoner, golds: list[str]) -> list[list[int]]:
    """The teacher-forced answer of each gold: `The answer is: {gold}` as ids, no special tokens."""
    return [reasoner.ids(reasoner.answer_prompt(g), special=False) for g in golds]


def gold_logprob(reasoner, answers: list[list[int]], V: int, logits, cache, attended, out: torch.Tensor):
    """Sum of log p(`The answer is: {gold}`) after EOT, teacher-forced, (R,) on the CPU; and the
    forced answer as a draft of greedy decoding, accepted while greedy agrees with it (speculative
    decoding, the gold as the draft): the accepted tokens go into `out` without a forward of their
    own, the rest of the draft is masked out of later attention instead of cropped. Returns
    (log-probs, the logits after the accepted tokens (R, V'), accepted counts (R,)); `attended`
    (runner/forward.py) is updated in place."""
    R, max_new_tokens = out.shape
    width = max(map(len, answers))
    answer_ids = torch.tensor([a + [reasoner.pad_id] * (width - len(a)) for a in answers],
                              device=reasoner.device).repeat_interleave(V, dim=0)  # (R, A), right-padded
    answer_len = torch.tensor(list(map(len, answers)), device=reasoner.device).repeat_interleave(V)  # (R,)
    valid = torch.arange(width, device=reasoner.device)[None] < answer_len[:, None]  # (R, A)
    scores = logits[:, None]  # (R, 1, V'): predicts the first answer token
    # Only in float32: in bf16 a multi-token forward rounds differently from one-token steps
    # (test.py decodes one token at a time), so there the draft is scored, cropped, not accepted.
    draft, length = reasoner.dtype == torch.float32, cache.get_seq_length()
    if width > 1:  # causal: the padding after a short answer changes none of its own logits
        fed = answer_ids[:, :-1]  # (R, A-1)
        start, position_ids = attended.n, attended.add(torch.ones_like(fed))
        # A short answer's right padding (never attended by its own tokens, masked out after) stops at the
        # position of its last fed token: a batch mate's longer answer must not take a row past the model's
        # positions (GPT-2's position table; each problem was checked to fit with its own answer).
        position_ids = torch.minimum(position_ids, position_ids[:, :1] + (answer_len[:, None] - 2).clamp(min=0))
        more, _, cache = reasoner._forward(cache, attended, position_ids, input_ids=fed, keep=width - 1)
        scores = torch.cat([scores, more], dim=1)  # (R, A, V')
    logprobs = scores[..., : reasoner.decode_vocab].float().log_softmax(-1)  # (R, A, V)
    # Padding positions are gathered at id 0 (a padding id need not lie in the slice); masked below.
    picked = logprobs.gather(-1, answer_ids.masked_fill(~valid, 0)[..., None])[..., 0]  # (R, A)
    gold_logprob = (picked * valid).sum(-1).cpu()
    if not draft:
        if width > 1:
            cache.crop(length - cache.get_seq_length())  # negative = tokens to drop: back to "... EOT"
            attended.truncate(start)
        return gold_logprob, logits, torch.zeros(R, dtype=torch.long, device=reasoner.device)
    eos = torch.tensor(reasoner.eos_ids, dtype=torch.long, device=reasoner.device)
    agree = (scores[..., : reasoner.decode_vocab].argmax(-1) == answer_ids) & valid & ~torch.isin(answer_ids, eos)
    # The last answer token was not fed: a row that agrees throughout emits it from the loop.
    accepted = agree.long().cumprod(-1).sum(-1).clamp(max=min(width - 1, max_new_tokens))  # (R,)
    drafted = torch.arange(width - 1, device=reasoner.device)[None] < accepted[:, None]  # (R, A-1)
    room = min(width - 1, max_new_tokens)
    out[:, :room] = torch.where(drafted, answer_ids[:, :-1], -1)[:, :room]
    if width > 1:
        attended.set(start, drafted.long())
    return gold_logprob, scores[torch.arange(R, device=reasoner.device), accepted], accepted

def greedy(reasoner, logits, cache, attended, out: torch.Tensor, filled: torch.Tensor) -> list[list[int]]:
    """Batched greedy decoding over `decode_vocab` until EOS into out (R, max_new_tokens), after the
    `filled` (R,) tokens already there. Finished rows leave the batch, or, with static shapes
    (`attended.static`), stay in it masked: their later tokens are computed and never written."""
    R, max_new_tokens = out.shape
    if max_new_tokens == 0:
        return [[] for _ in range(R)]
    eos = torch.tensor(reasoner.eos_ids, dtype=torch.long, device=reasoner.device)
    active = torch.arange(R, device=reasoner.device)  # (A,) rows still in the batch
    finished = torch.zeros(R, dtype=torch.bool, device=reasoner.device)  # static shapes: rows done
    while True:
        next_ids = logits[:, : reasoner.decode_vocab].argmax(-1)  # (A,)
        done = torch.isin(next_ids, eos) | (filled >= max_new_tokens) | finished
        slot = filled.clamp(max=max_new_tokens - 1)[:, None]  # where each row's next token goes
        rows = out[active]  # (A, max_new_tokens)
        out[active] = rows.scatter(1, slot, torch.where(done, rows.gather(1, slot)[:, 0], next_ids)[:, None])
        filled = filled + ~done
        done |= filled >= max_new_tokens
        if bool(done.all()):
            break
        if attended.static:
            finished = done
        elif bool(done.any()):  # drop finished rows so later steps cost only what is left
            keep = (~done).nonzero()[:, 0]
            cache.batch_select_indices(keep)
            attended.select(keep)
            active, next_ids, filled, finished = active[keep], next_ids[keep], filled[keep], finished[keep]
        position_ids = attended.add(torch.ones_like(next_ids[:, None]))
        logits, _, cache = reasoner._forward(cache, attended, position_ids, input_ids=next_ids[:, None])
        logits = logits[:, -1]
    return [[t for t in row if t >= 0] for row in out.tolist()]
