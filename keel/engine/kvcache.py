"""A preallocated KV cache for the rollout engine: one in-place write per decode step.

transformers' default `DynamicCache` grows every layer's keys and values with `torch.cat`, which
copies the whole cache at every step: for a batch of 32 on the ~27M model that is as much memory
traffic as the weights themselves. Here each layer owns buffers sized for the whole rollout
(prompt + max_new_tokens columns), a step writes its column in place, and attention reads a view
of the filled columns. The model sees exactly what a `DynamicCache` would give it (same shapes,
same values, same mask sizes), so results are identical; only the copies are gone.

It covers models whose layers are all plain full-attention layers (Llama, Qwen, Mistral without a
sliding window, ...). For anything else (sliding windows, linear attention, shared KV)
`preallocated_cache` returns None and the caller lets the model build its own cache.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer


class PreallocatedLayer(CacheLayerMixin):
    """One layer's keys and values in [B, H, capacity, D] buffers, filled left to right."""

    is_sliding = False

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0  # columns filled so far

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        # Allocated on first use, so batch, heads, dtype and device come from the model itself.
        B, H, _, D = key_states.shape
        self.device = key_states.device
        self.key_buf = key_states.new_empty(B, H, self.capacity, D)
        self.value_buf = value_states.new_empty(B, value_states.shape[1], self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        assert end <= self.capacity, f"KV cache overflow: {end} columns > capacity {self.capacity}"
        self.key_buf[:, :, start:end].copy_(key_states)
        self.value_buf[:, :, start:end].copy_(value_states)
        self.length = end
        # Views, not copies: columns past `end` are never read (they are uninitialised memory).
        self.keys, self.values = self.key_buf[:, :, :end], self.value_buf[:, :, :end]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0  # (kv_length, kv_offset), as for a DynamicLayer

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument: transformers 5.x renamed `past_key_values` to `cache`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def preallocated_cache(model: torch.nn.Module, capacity: int) -> Cache | None:
    """A cache of `capacity` columns per layer for `model`, or None when the model's default cache
    is not all plain full-attention layers (then let the model build its own)."""
    layers = DynamicCache(config=model.config).layers  # what the model would use by default
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return Cache(layers=[PreallocatedLayer(capacity) for _ in layers])
