"""One forward step of the rollout loop (runner/rollout.py), written over the model's own modules.

`hf(...)` costs ~4 ms of Python per call on a CPU (mask building, output capture, cache
bookkeeping), more than a whole step of the embedded model's batch. `Forward` calls the same
modules in the same order (embeddings, norms, projections, MLPs, LoRA-wrapped ones included), so
the arithmetic is transformers' own except for two parts: attention (runner/attention.py: the
shared prompt cache, else SDPA with the mask transformers would build) and, in float32 only, the
tanh GELU of GPT-2, computed as x * sigmoid(2z), the same function (0.5 * (1 + tanh z) =
sigmoid(2z)), 2x faster on a CPU and equal to float32 rounding (~5e-7). Families: GPT-2 and Llama
with full attention, CODI's two (runner/model.py refuses other models).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from runner.attention import blocked, causal, merged, plain

# A block's output passes through this between blocks: (layer, hidden (R, q, d)) -> hidden.
AfterBlock = Callable[[int, torch.Tensor], torch.Tensor]
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # transformers' names for the tanh approximation
MLP_ROWS = 256  # GPT-2's MLP in row chunks: the (rows, 4d) activation stays in the CPU's L2 cache


def gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    """In place: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) as x * sigmoid(2 sqrt(2/pi) (...))."""
    inner = torch.addcmul(x, x * x, x, value=0.044715)
    return x.mul_(inner.mul_(1.5957691216057308).sigmoid_())


def supported(config) -> bool:
    """GPT-2 (no cross-attention) or Llama, every layer attending over the full sequence: CODI's two families."""
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if getattr(config, "sliding_window", None) or layer_types != {"full_attention"}:
        return False
    return config.model_type == "llama" or (config.model_type == "gpt2" and not config.add_cross_attention)


class Attended:
    """Which cache positions each row attends, `mask` (R, K), and where the next tokens go (`n`).

    Dynamic: the mask grows by the new tokens' columns at every step. Static (`capacity`): one
    (R, capacity) mask from the start whose columns are filled in place, so every forward of a
    rollout sees the same shapes (CUDA graphs, torch.compile); unwritten positions stay masked.
    """

    def __init__(self, mask: torch.Tensor, capacity: int | None = None):
        self.n, self.start = mask.shape[-1], 0  # positions written; where the last forward's tokens began
        if capacity is not None:
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], capacity - self.n)], dim=-1)  # (R, capacity)
        self.mask, self.static = mask, capacity is not None

    def add(self, columns: torch.Tensor) -> torch.Tensor:
        """columns (R, q): 1 = attended, 0 = a hole, for q new tokens -> their position ids (R, q)."""
        q = columns.shape[-1]
        positions = self.mask.sum(-1, keepdim=True) + torch.arange(q, device=columns.device)
        if self.static:
            self.mask[:, self.n : self.n + q] = columns
        else:
            self.mask = torch.cat([self.mask, columns], dim=-1)
        self.start, self.n = self.n, self.n + q
        return positions

    def set(self, start: int, columns: torch.Tensor) -> None:
        """Rewrite the columns from `start` (tokens fed, then found not to count)."""
        self.mask[:, start : start + columns.shape[-1]] = columns

    def truncate(self, n: int) -> None:
        """Forget the positions from n on (the cache was cropped back to n)."""
        if self.static:
            self.mask[:, n:] = 0
        else:
            self.mask = self.mask[:, :n]
        self.n = n

    def select(self, rows: torch.Tensor) -> None:
        self.mask = self.mask[rows]

    def of_rows(self, rows: torch.Tensor) -> "Attended":
        """What `rows` attend, for a forward of those rows only (the cache's rows_only)."""
        view = Attended.__new__(Attended)
        view.n, view.start, view.mask, view.static = self.n, self.start, self.mask[rows], self.static
        return view


class Forward:
    """forward(cache, mask, position_ids, input_ids | inputs_embeds, keep, after_block) ->
    (logits (R, keep, V'), final normed hidden state (R, q, d)); keys/values go into `cache`."""

    @classmethod
    def of(cls, hf) -> "Forward | None":
        """The forward of `hf` (a causal LM, or a PeftModel around one); None for a family not written here."""
        lm = hf.get_base_model() if hasattr(hf, "get_base_model") else hf  # unmerged LoRA: a PeftModel
        if not supported(lm.config):
            return None
        return Gpt2Forward(lm) if lm.config.model_type == "gpt2" else LlamaForward(lm)

    def __init__(self, lm, blocks: nn.ModuleList, norm: nn.Module, embed: nn.Embedding):
        self.lm, self.blocks, self.norm, self.embed = lm, blocks, norm, embed
        config = lm.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = config.hidden_size // self.heads

    def __call__(self, cache, mask: torch.Tensor, position_ids: torch.Tensor, input_ids=None, inputs_embeds=None,
                 keep: int = 1, after_block: AfterBlock | None = None, start: int | None = None):
        """mask (R, K) over the cache's K positions; the q new tokens sit at start.. (default: the last q)."""
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (R, q, d)
        R, q = hidden.shape[:2]
        prefix = getattr(cache, "prefix_length", 0)  # > 0: the prompt is shared (runner/cache.py)
        start = mask.shape[-1] - q if start is None else start
        allowed = causal(mask[:, prefix:].bool(), R, q, mask.shape[-1] - prefix, hidden.device, start - prefix)
        if prefix:  # a shared prompt: what each row may not see, its prompt's padding included, (R, 1, q, L + S)
            allowed = blocked(cache.layers[0], allowed)
        elif start == 0:  # the prompt: a left-padding position would see nothing, which fused GPU kernels
            # may turn into NaN (the CPU gives 0) in its keys/values: it sees itself. No real token sees padding.
            allowed = allowed | (torch.arange(allowed.shape[-1], device=hidden.device)
                                 == start + torch.arange(q, device=hidden.device)[:, None])
        hidden, extra = self.start(hidden, position_ids)
        for i, block in enumerate(self.blocks):
            hidden = self.block(i, block, hidden, extra, lambda i, query, key, value, scale:
                                self.attend(cache, i, query, key, value, allowed, scale))
            if after_block is not None:
                hidden = after_block(i, hidden)
        hidden = self.norm(hidden)
        return self.lm.lm_head(hidden[:, -keep:]), hidden

    @staticmethod
    def attend(cache, i: int, query, key, value, allowed, scale: float) -> torch.Tensor:
        """query (R, H, q, dh), key/value (R, Hkv, q, dh) of this step -> (R, q, H, dh); `allowed` as
        `__call__` built it (where the prompt is shared: `blocked`, an additive -inf bias)."""
        keys, values = cache.update(key, value, i)
        layer = cache.layers[i]
        if getattr(layer, "prefix_keys_t", None) is not None:
            out = merged(query, layer, keys, values, allowed, scale)
        else:
            out = plain(query, keys, values, allowed, scale)
        return out.transpose(1, 2)

    def heads_of(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.view(*x.shape[:2], heads, self.head_dim).transpose(1, 2)  # (R, q, h*dh) -> (R, h, q, dh)


class Gpt2Forward(Forward):
    """transformers' GPT2Model/GPT2Block/GPT2Attention.forward in eval mode, without their bookkeeping."""

    def __init__(self, lm):
        super().__init__(lm, lm.transformer.h, lm.transformer.ln_f, lm.transformer.wte)
        self.positions = lm.transformer.wpe
        self.fast_gelu = lm.config.activation_function in TANH_GELUS

    def start(self, hidden, position_ids):
        return hidden + self.positions(position_ids), None

    def block(self, i, block, hidden, extra, attend):
        attn, d = block.attn, hidden.shape[-1]
        query, key, value = attn.c_attn(block.ln_1(hidden)).split(d, dim=2)
        out = attend(i, self.heads_of(query, self.heads), self.heads_of(key, self.heads),
                     self.heads_of(value, self.heads), attn.scaling)
        hidden = self.project(attn.c_proj, out.reshape(*hidden.shape[:2], d), hidden)
        return self.mlp(block.mlp, block.ln_2(hidden), hidden)

    @staticmethod
    def plain(*convs) -> bool:
        return all(type(m).__name__ == "Conv1D" for m in convs)  # not LoRA-wrapped

    def project(self, conv, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + conv(x), the residual accumulated by the matmul itself (one pass over the rows fewer)."""
        if not (self.plain(conv) and x.dtype == torch.float32):
            return conv(x) + residual
        out = (residual + conv.bias).view(-1, residual.shape[-1])  # (N, d)
        return out.addmm_(x.reshape(-1, x.shape[-1]), conv.weight).view(residual.shape)

    def mlp(self, mlp, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + mlp(x)."""
        if not (self.fast_gelu and self.plain(mlp.c_fc, mlp.c_proj) and x.dtype == torch.float32):
            return residual + mlp(x)
        flat = x.reshape(-1, x.shape[-1])  # (N, d)
        out = (residual + mlp.c_proj.bias).view(-1, residual.shape[-1])  # (N, d)
        for start in range(0, flat.shape[0], MLP_ROWS):
            inner = torch.addmm(mlp.c_fc.bias, flat[start : start + MLP_ROWS], mlp.c_fc.weight)  # (n, 4d)
            out[start : start + MLP_ROWS].addmm_(gelu_tanh_(inner), mlp.c_proj.weight)
        return out.view(residual.shape)


class LlamaForward(Forward):
    """transformers' LlamaModel/LlamaDecoderLayer/LlamaAttention.forward in eval mode, without their bookkeeping."""

    def __init__(self, lm):
        super().__init__(lm, lm.model.layers, lm.model.norm, lm.model.embed_tokens)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        self.rotary, self.apply_rotary = lm.model.rotary_emb, apply_rotary_pos_emb
        self.head_dim = getattr(lm.config, "head_dim", None) or self.head_dim

    def start(self, hidden, position_ids):
        return hidden, self.rotary(hidden, position_ids)  # (cos, sin), each (R, q, dh)

    def block(self, i, block, hidden, extra, attend):
        attn, x = block.self_attn, block.input_layernorm(hidden)
        query = self.heads_of(attn.q_proj(x), self.heads)
        key, value = self.heads_of(attn.k_proj(x), self.kv_heads), self.heads_of(attn.v_proj(x), self.kv_heads)
        query, key = self.apply_rotary(query, key, *extra)
        out = attend(i, query, key, value, attn.scaling)
        hidden = hidden + attn.o_proj(out.reshape(*hidden.shape[:2], -1))
        return hidden + block.mlp(block.post_attention_layernorm(hidden))
