"""KV caches of the rollout loop (runner/rollout.py): one that grows in place (bit-identical to DynamicCache),
and one that stores each problem's prompt once for all its variants (runner/attention.py reads it).

Kept apart from runner/rollout.py because subclassing a transformers class imports transformers, which
the loop does only when a model is loaded (the dashboard and the CLI start without it).
"""
from __future__ import annotations

import contextlib
from functools import partial

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class GrowingCache(DynamicCache):
    """A DynamicCache whose layers (created on first use, one per block) are GrowingLayers.

    With `capacity`, static shapes: every layer holds `capacity` positions from the start and
    `keys`/`values` are always all of them (what is not written yet is masked by the caller), so
    each step's tensors have the same shapes, as CUDA graphs and torch.compile want.
    """

    def __init__(self, capacity: int | None = None):
        super().__init__()
        self.capacity = capacity
        self.layer_class_to_replicate = partial(GrowingLayer, capacity=capacity)


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that writes each step's keys/values into spare room instead of concatenating.

    DynamicLayer copies its whole cache at every step (torch.cat); this one doubles a buffer when it
    is full, so a step copies only its own tokens. `keys`/`values` are views of the first `length`
    positions: attention sees exactly what a DynamicLayer would hold (bit-identical rollouts; 18%
    faster on CPU with the embedded model). With a `capacity` they are the whole buffer (static shapes).
    """

    def __init__(self, capacity: int | None = None):
        super().__init__()
        self.capacity = capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.length, self.key_buffer, self.value_buffer = 0, None, None

    def room(self, end: int) -> int:
        """Positions to allocate for `end`: doubling, or the fixed capacity."""
        if self.capacity is None:
            return max(end, 2 * self.length, 16)
        assert end <= self.capacity, f"{end} positions, the static cache holds {self.capacity}"
        return self.capacity

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self.key_buffer is None or end > self.key_buffer.shape[-2]:
            self._grow(key_states, value_states, self.room(end))
        self.key_buffer[..., self.length:end, :] = key_states
        self.value_buffer[..., self.length:end, :] = value_states
        self._set_length(end)
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int, copy: int = 0) -> None:
        """Buffers of `capacity` positions shaped like `key_states`; the cached positions (or the first
        `copy` positions of key/value_states themselves) are copied in."""
        # Static shapes attend over unwritten positions too (masked): they must hold numbers, not NaN garbage.
        new = torch.Tensor.new_empty if self.capacity is None else torch.Tensor.new_zeros
        keys = new(key_states, (*key_states.shape[:-2], capacity, key_states.shape[-1]))  # (B, H, capacity, dk)
        values = new(value_states, (*value_states.shape[:-2], capacity, value_states.shape[-1]))
        if copy:
            keys[..., :copy, :], values[..., :copy, :] = key_states[..., :copy, :], value_states[..., :copy, :]
        elif self.length:
            keys[..., :self.length, :], values[..., :self.length, :] = self.keys, self.values
        self.key_buffer, self.value_buffer = keys, values

    def _set_length(self, length: int) -> None:
        self.length = length
        shown = length if self.capacity is None else self.capacity
        self.keys, self.values = self.key_buffer[..., :shown, :], self.value_buffer[..., :shown, :]

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes minus the number of tokens to remove, got {tokens_to_remove}")
        if self.is_initialized and tokens_to_remove:
            self._set_length(max(0, self.length + tokens_to_remove))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:  # with spare room: the next step must not copy the repeated cache again
            keys, values = self.keys, self.values
            self.key_buffer = self.value_buffer = None
            room = max(2 * self.length, self.length + 64) if self.capacity is None else self.capacity
            self._grow(keys.repeat_interleave(repeats, dim=0), values.repeat_interleave(repeats, dim=0),
                       room, copy=self.length)
            self._set_length(self.length)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self._set_length(self.length)


class SharedPrefixCache(DynamicCache):
    """A cache whose prompt part is stored once per problem and read by all its V variants.

    Until `share_prefix` it is a GrowingCache (the prompt forward, B rows). `share_prefix(V, mask)`
    stands for `batch_repeat_interleave(V)` without copying: every layer keeps its (B, H, L, d)
    prompt as the shared prefix, and the R = B*V rows' later tokens go into a growing suffix.
    Sequence length, mask sizes and `crop` count prefix + suffix, as if the prompt were repeated.
    runner/forward.py attends to it with runner/attention.py's `merged`.
    """

    def __init__(self, capacity: int | None = None):
        super().__init__()
        self.capacity = capacity  # static shapes (see GrowingCache): prompt + suffix positions
        self.layer_class_to_replicate = partial(SharedPrefixLayer, capacity=capacity)
        self.prefix_length = 0  # prompt positions stored once per problem; 0 until share_prefix

    def share_prefix(self, repeats: int, mask: torch.Tensor) -> None:
        """mask (B, L): which prompt positions are attended (left padding); static shapes: (B, capacity)."""
        self.prefix_length = self.layers[0].length
        for layer in self.layers:
            layer.share_prefix(repeats, mask)

    @contextlib.contextmanager
    def rows_only(self, rows: torch.Tensor, spread: torch.Tensor, groups: int):
        """For the forwards inside: only `rows` (R_s,) run, `groups` of them per problem (problem-major);
        their keys/values are written to every row r as those of rows[spread[r]] (spread (R,)), so rows that
        shared a past share it in the cache too (runner/ablation.py's SharedStep)."""
        assert all(layer.dense for layer in self.layers), "rows are shared before any row leaves"
        saved = [(layer.problem, layer.slot, layer.variants) for layer in self.layers]
        for layer in self.layers:
            layer.problem, layer.variants = layer.problem[rows], groups
            layer.slot = torch.arange(len(rows), device=rows.device) % groups
            layer.only = (rows, spread)
        try:
            yield
        finally:
            for layer, (problem, slot, variants) in zip(self.layers, saved):
                layer.problem, layer.slot, layer.variants, layer.only = problem, slot, variants, None


class SharedPrefixLayer(GrowingLayer):
    """prefix_keys_t (P, Hkv, d, L) and prefix_values (P, Hkv, L, d) once per problem; after them each
    row's own keys/values, stored sequence-major: `keys`/`values` are (S, R, Hkv, d).

    Sequence-major because the suffix is read whole at every step: the first S positions of an
    (S_max, R, Hkv, d) buffer are one contiguous block, where those of an (R, Hkv, S_max, d) one are R * Hkv
    pieces (a broadcast multiply over them ran 5x slower). Row r reads prefix `problem[r]` and is
    slot `slot[r]` of its problem's `variants` slots; `dense` while the rows are exactly
    problem-major (r = problem * variants + slot), which attention uses to skip a scatter. Finished
    rows leave (`batch_select_indices`); a prefix nobody reads any more is dropped once a quarter of
    them are unread. Until `share_prefix` it is a GrowingLayer (the prompt forward).
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.prefix_keys_t = self.prefix_values = self.prefix_mask = None
        self.prefix_length, self.variants, self.dense, self.problem, self.slot = 0, 1, True, None, None
        self.only = None  # (rows, spread) inside SharedPrefixCache.rows_only

    def share_prefix(self, repeats: int, mask: torch.Tensor) -> None:
        assert self.prefix_keys_t is None, "the prefix is shared once"
        # Keys transposed once, (B, Hkv, d, L): every step's q @ k^T then reads them contiguously.
        keys, values = self.key_buffer[..., : self.length, :], self.value_buffer[..., : self.length, :]
        self.prefix_keys_t, self.prefix_values = keys.transpose(-1, -2).contiguous(), values.contiguous()
        self.prefix_mask, self.prefix_length, self.variants = mask[:, : self.length].bool(), self.length, repeats
        rows = torch.arange(keys.shape[0] * repeats, device=keys.device)
        self.problem, self.slot = rows // repeats, rows % repeats
        self.length, self.key_buffer, self.value_buffer = 0, None, None
        self.keys = self.values = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key/value_states (R, Hkv, q, d) -> the suffix so far, (S, R, Hkv, d) each (R_s rows inside rows_only)."""
        if not self.is_initialized or self.prefix_keys_t is None:
            return super().update(key_states, value_states)
        key_states, value_states = key_states.permute(2, 0, 1, 3), value_states.permute(2, 0, 1, 3)  # (q, R, Hkv, d)
        end = self.length + key_states.shape[0]
        if self.key_buffer is None or end > self.key_buffer.shape[0]:
            capacity = max(end, 2 * self.length, 16) if self.capacity is None else self.capacity - self.prefix_length
            assert end <= capacity, f"{self.prefix_length + end} positions, the static cache holds {self.capacity}"
            new = torch.Tensor.new_empty if self.capacity is None else torch.Tensor.new_zeros  # as in _grow
            rows = key_states.shape[1] if self.only is None else len(self.only[1])
            keys = new(key_states, (capacity, rows, *key_states.shape[2:]))  # (S_max, R, Hkv, d)
            values = new(value_states, (capacity, rows, *value_states.shape[2:]))
            if self.length:
                keys[: self.length], values[: self.length] = self.keys, self.values
            self.key_buffer, self.value_buffer = keys, values
        if self.only is None:
            self.key_buffer[self.length : end] = key_states
            self.value_buffer[self.length : end] = value_states
        else:  # rows_only: R_s rows computed, every row written. index_select into the buffer is one pass of
            # a third the time of indexing then copying, and reads the R_s rows' suffix 3x faster than [:, rows].
            torch.index_select(key_states, 1, self.only[1], out=self.key_buffer[self.length : end])
            torch.index_select(value_states, 1, self.only[1], out=self.value_buffer[self.length : end])
        self._set_length(end)
        if self.only is not None:
            return self.keys.index_select(1, self.only[0]), self.values.index_select(1, self.only[0])
        return self.keys, self.values

    def _set_length(self, length: int) -> None:
        if self.prefix_keys_t is None:
            return super()._set_length(length)
        self.length = length
        shown = length if self.capacity is None else self.key_buffer.shape[0]
        self.keys, self.values = self.key_buffer[:shown], self.value_buffer[:shown]

    def get_seq_length(self) -> int:
        return self.prefix_length + self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        assert self.prefix_keys_t is None or -tokens_to_remove <= self.length, "crop reaches into the shared prefix"
        super().crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("SharedPrefixCache repeats rows by share_prefix(repeats, mask)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.prefix_keys_t is None:
            return super().batch_select_indices(indices)
        if self.key_buffer is not None:
            self.key_buffer, self.value_buffer = self.key_buffer[:, indices], self.value_buffer[:, indices]
            self._set_length(self.length)
        self.problem, self.slot, self.dense = self.problem[indices], self.slot[indices], False
        alive = torch.unique(self.problem)  # sorted
        if len(alive) <= 0.75 * self.prefix_keys_t.shape[0]:
            self.prefix_keys_t, self.prefix_values = self.prefix_keys_t[alive], self.prefix_values[alive]
            self.prefix_mask, self.problem = self.prefix_mask[alive], torch.searchsorted(alive, self.problem)
