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


def causal(mask: torch.Tensor | None, rows: int, q: int, kv: int, device) -> torch.Tensor:
    """(rows, 1, q, kv) bool: query i (the last q positions) sees key j <= kv - q + i, where `mask` allows."""
    allowed = torch.ones(q, kv, dtype=torch.bool, device=device).tril(kv - q)  # (q, kv)
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


def partial(scores: torch.Tensor, values: torch.Tensor):
    """Unnormalised softmax(scores) @ values with its max and sum (float32), for a log-sum-exp merge.

    scores (..., n, S), values (..., S, d). One query per matrix (n = 1) multiplies and sums: a
    batch of matrix-vector products is 3x slower as bmm on the CPU.
    """
    scores = scores.float()
    top = scores.amax(-1, keepdim=True)
    top = top.masked_fill(top == float("-inf"), 0.0)  # a row with nothing to attend adds exp(-inf) = 0
    weights = (scores - top).exp()
    if scores.shape[-2] == 1:
        out = (weights.to(values.dtype).transpose(-1, -2) * values).sum(-2, keepdim=True)
    else:
        out = weights.to(values.dtype) @ values
    return out.float(), top, weights.sum(-1, keepdim=True)


def merged(query, layer, suffix_keys, suffix_values, suffix_mask, scale: float) -> torch.Tensor:
    """Exact attention over [shared prefix ; own suffix] for R rows: (R, H, q, d).

    layer.prefix_keys_t (P, Hkv, d, L) and prefix_values (P, Hkv, L, d) with prefix_mask (P, L);
    row r reads prefix layer.problem[r] and sits in slot layer.slot[r] of its problem's V slots.
    """
    R, H, q, d = query.shape
    P, Hkv, _, L = layer.prefix_keys_t.shape
    dtype = query.dtype  # bf16/fp16: scores and sums in float32, as SDPA's kernels accumulate them
    query, suffix_keys, suffix_values = query.float(), suffix_keys.float(), suffix_values.float()
    prefix_keys_t, prefix_values = layer.prefix_keys_t.float(), layer.prefix_values.float()
    G, V = H // Hkv, layer.variants
    # Prefix: the queries of a problem's V variants (x G query heads per KV head) as one matrix.
    if layer.dense:  # rows are exactly problem-major b*V + v: a view, no scatter
        grouped = query.reshape(P, V, Hkv, G, q, d)
    else:
        grouped = query.new_zeros(P * V, H, q, d)
        grouped[layer.problem * V + layer.slot] = query
        grouped = grouped.view(P, V, Hkv, G, q, d)
    grouped = grouped.permute(0, 2, 1, 3, 4, 5).reshape(P, Hkv, V * G * q, d)
    scores = (grouped @ prefix_keys_t) * scale  # (P, Hkv, VGq, L)
    scores = scores.masked_fill(~layer.prefix_mask[:, None, None, :], float("-inf"))
    out1, top1, sum1 = (t.view(P, Hkv, V, G, q, -1).permute(0, 2, 1, 3, 4, 5).reshape(P * V, H, q, -1)
                        for t in partial(scores, prefix_values))
    if not layer.dense:
        rows = layer.problem * V + layer.slot
        out1, top1, sum1 = out1[rows], top1[rows], sum1[rows]
    # Suffix: each row's own tokens, causal within this step's q tokens.
    if G * q == 1:
        scores = (query * suffix_keys).sum(-1, keepdim=True).transpose(-1, -2) * scale  # (R, H, 1, S)
    else:
        scores = query.reshape(R, Hkv, G * q, d) @ suffix_keys.transpose(-1, -2) * scale  # (R, Hkv, Gq, S)
    scores = scores.view(R, Hkv, G, q, -1).masked_fill(~suffix_mask[:, :, None], float("-inf"))
    out2, top2, sum2 = (t.reshape(R, H, q, -1) for t in partial(scores.view(R, Hkv, G * q, -1), suffix_values))
    top = torch.maximum(top1, top2)
    w1, w2 = (top1 - top).exp(), (top2 - top).exp()
    return ((out1 * w1 + out2 * w2) / (sum1 * w1 + sum2 * w2)).to(dtype)
