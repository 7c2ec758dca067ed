"""Attention of the rollout loop (runner/forward.py): shared-prefix attention, and SDPA for the rest.

Shared prefix: every variant of a problem continues the same prompt, so the prompt's keys/values
are stored once per problem (runner/cache.py, `SharedPrefixLayer`) and, at each step, the queries
of all V variants attend to it in one batched matmul, (P, Hkv, V*G*q, d) x (P, Hkv, L, d); each
row's own latent and answer tokens (the suffix) are attended separately, and the two partial
softmaxes are merged exactly by their log-sum-exp (the technique of Hydragen and of FlashInfer's
cascade attention). Without the merge the prompt cache would be copied V times and re-read by
every variant at every step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal(mask: torch.Tensor | None, rows: int, q: int, kv: int, device, start: int | None = None) -> torch.Tensor:
    """(rows, 1, q, kv) bool: query i, at position start + i (default: the last q positions), sees key
    j <= start + i where `mask` (rows, kv) allows."""
    start = kv - q if start is None else start
    allowed = torch.arange(kv, device=device)[None, :] <= start + torch.arange(q, device=device)[:, None]  # (q, kv)
    if mask is None:
        return allowed.expand(rows, 1, q, kv)
    return mask[:, None, None, :] & allowed  # (rows, 1, q, kv)


def plain(query, keys, values, allowed, scale: float) -> torch.Tensor:
    """SDPA over each row's own keys: query (R, H, q, d), keys/values (R, Hkv, K, d), allowed (R, 1, q, K).

    Grouped heads as transformers' SDPA path arranges them (one query token: the G query heads of a
    KV head as G queries; else KV heads repeated). A row with nothing allowed (left padding) comes out
    as zeros, as there."""
    R, H, q, d = query.shape
    G = H // keys.shape[1]
    if G > 1 and q == 1:
        out = F.scaled_dot_product_attention(query.reshape(R, H // G, G, d), keys, values, attn_mask=allowed,
                                             scale=scale)  # (R, Hkv, G, d)
        return out.reshape(R, H, 1, d)
    if G > 1:
        keys, values = keys.repeat_interleave(G, dim=1), values.repeat_interleave(G, dim=1)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=allowed, scale=scale)


def blocked(layer, suffix_allowed: torch.Tensor) -> torch.Tensor:
    """(R, 1, q, L + S) float32: -inf where row r's query may NOT look (its problem's prompt padding, then its
    own suffix as `suffix_allowed` (R, 1, q, S) says), else 0. Built once per forward; every layer adds it
    to its scores (an add is ~5x faster than a masked_fill that broadcasts a bool mask over the heads)."""
    R, _, q, _ = suffix_allowed.shape
    prefix = layer.prefix_mask[layer.problem][:, None, None, :].expand(R, 1, q, -1)  # (R, 1, q, L)
    allowed = torch.cat([prefix, suffix_allowed], dim=-1)
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def merged(query, layer, suffix_keys, suffix_values, blocked: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact attention over [shared prefix ; own suffix] for R rows: (R, H, q, d).

    suffix_keys/values (S, R, Hkv, d), sequence-major as runner/cache.py's SharedPrefixLayer keeps them.
    layer.prefix_keys_t (P, Hkv, d, L) and prefix_values (P, Hkv, L, d); row r reads prefix
    layer.problem[r] and sits in slot layer.slot[r] of its problem's V slots. The prefix scores of a
    problem's V variants come from one matmul per (problem, KV head); prefix and suffix scores then
    share one softmax, so the split changes nothing but the order of the sums.
    """
    R, H, q, d = query.shape
    P, Hkv, _, L = layer.prefix_keys_t.shape
    G, V, S = H // Hkv, layer.variants, suffix_keys.shape[0]
    dtype = query.dtype  # bf16/fp16: scores and sums in float32, as SDPA's kernels accumulate them
    query = (query.float() * scale).reshape(R, Hkv, G * q, d)  # (R, Hkv, Gq, d): a KV head's queries together
    suffix_keys, suffix_values = suffix_keys.float(), suffix_values.float()
    prefix_keys_t, prefix_values = layer.prefix_keys_t.float(), layer.prefix_values.float()
    rows = None if layer.dense else layer.problem * V + layer.slot  # rows that left: scatter into P*V slots
    grouped = query if rows is None else query.new_zeros(P * V, Hkv, G * q, d).index_copy_(0, rows, query)
    grouped = grouped.view(P, V, Hkv, G * q, d).transpose(1, 2).reshape(P, Hkv, V * G * q, d)
    prefix = (grouped @ prefix_keys_t).view(P, Hkv, V, G * q, L).transpose(1, 2).reshape(P * V, Hkv, G * q, L)
    if rows is not None:
        prefix = prefix[rows]
    if G * q == 1:  # one query per row
        suffix = _suffix_scores(query.view(R, Hkv, d), suffix_keys)[:, :, None]  # (R, Hkv, 1, S)
    else:
        suffix = query @ suffix_keys.permute(1, 2, 3, 0)  # (R, Hkv, Gq, S)
    scores = torch.cat([prefix, suffix], dim=-1).view(R, Hkv, G, q, L + S)
    weights = scores.add_(blocked[:, :, None]).softmax(-1).view(R, Hkv, G * q, L + S)
    prefix_weights = weights[..., :L]
    if rows is not None:
        prefix_weights = prefix_weights.new_zeros(P * V, Hkv, G * q, L).index_copy_(0, rows, prefix_weights)
    prefix_weights = prefix_weights.reshape(P, V, Hkv, G * q, L).transpose(1, 2).reshape(P, Hkv, V * G * q, L)
    out = (prefix_weights @ prefix_values).view(P, Hkv, V, G * q, d).transpose(1, 2).reshape(P * V, Hkv, G * q, d)
    if rows is not None:
        out = out[rows]
    if G * q == 1:
        out = out + _suffix_sum(weights[..., L:], suffix_values)[:, :, None]
    else:
        out = out + weights[..., L:] @ suffix_values.permute(1, 2, 0, 3)  # (R, Hkv, S, d)
    return out.reshape(R, H, q, d).to(dtype)


# One query per row against its own S suffix keys (S, R, Hkv, d): a multiply and a sum is the fastest form on a
# CPU while their (S, R, Hkv, d) product stays in a core's L2 (bmm's per-matrix cost dominates 1 x S matmuls);
# past it the product's trip through memory costs more than what it saves (measured on a 2-core Xeon with a
# 2 MiB L2, R 3-896, S 2-40: at 896 rows and 12 suffix tokens 0.35 ms instead of 0.72 ms for the sum, 0.45
# instead of 0.78 for the scores). Which form runs depends on the batch's shape only: a batch computes the same
# bits on every thread count and resume.
SCORES_IN_L2 = 1 << 18  # product elements (1 MiB of float32)
SUM_IN_L2 = 1 << 17


def _suffix_scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """query (R, Hkv, d) . keys (S, R, Hkv, d) over d -> (R, Hkv, S)."""
    S, R, Hkv, d = keys.shape
    if keys.numel() < SCORES_IN_L2:
        return (query * keys).sum(-1).permute(1, 2, 0)
    # The keys read in place: a batch of R*Hkv (S, d) matrices whose rows lie R*Hkv*d elements apart.
    return torch.bmm(keys.reshape(S, R * Hkv, d).transpose(0, 1), query.reshape(R * Hkv, d, 1)).view(R, Hkv, S)


def _suffix_sum(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """weights (R, Hkv, 1, S), values (S, R, Hkv, d) -> sum over S of weight x value, (R, Hkv, d)."""
    weights = weights.permute(3, 0, 1, 2).contiguous()  # (S, R, Hkv, 1)
    if values.numel() < SUM_IN_L2:
        return (weights * values).sum(0)
    total = weights[0] * values[0]  # (R, Hkv, d): accumulated in place, one suffix position at a time
    for s in range(1, values.shape[0]):
        total.addcmul_(weights[s], values[s])
    return total
