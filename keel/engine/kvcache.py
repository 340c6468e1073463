"""The torch backend's KV cache: keys and values in preallocated buffers, written in place.

transformers' default `DynamicCache` grows every layer's keys and values with `torch.cat`, which
copies the whole cache at every decode step: with 1,000-token traces that copy is the dominant cost
of a step. Here each layer owns [B, H, capacity, D] buffers; a step writes its columns in place
and attention reads a view of the filled columns. The model sees exactly what a
`DynamicCache` holding those columns would give it (same shapes, values and mask sizes), so the
results are identical; only the copies are gone.

The continuous-batching engine (keel/engine/batching.py) changes the batch's rows between steps,
through the backend: `join` adds the rows of a newcomers' prefill (the narrower side padded on the
left with zeros), `keep` drops retired rows and trims columns no row uses any more. Those copy the
live columns once per change of the batch, not once per step.

Every layer keeps every column, sliding-window layers too: the attention mask applies the window
(keel.engine.backends.FULL_CACHE_LAYERS says which layer types that serves).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin


class BufferLayer(CacheLayerMixin):
    """One layer's keys and values in [B, H, capacity, D] buffers; columns [0, end) are filled."""

    is_sliding = False

    def __init__(self, keys_buf: Tensor | None = None, values_buf: Tensor | None = None, end: int = 0):
        super().__init__()
        self.end = end
        if keys_buf is not None:
            self._set(keys_buf, values_buf)

    def _set(self, keys_buf: Tensor, values_buf: Tensor) -> None:
        self.keys_buf, self.values_buf = keys_buf, values_buf
        self.device = keys_buf.device
        self.is_initialized = True
        # Views, not copies: columns past `end` are never read (they may be uninitialised memory).
        self.keys, self.values = keys_buf[:, :, :self.end], values_buf[:, :, :self.end]

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        # A prefill's cache: exactly its own columns (the engine joins it into the batch's buffers).
        self._set(key_states.new_empty(key_states.shape), value_states.new_empty(value_states.shape))

    @property
    def capacity(self) -> int:
        return self.keys_buf.shape[2]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        S = key_states.shape[2]
        if self.end + S > self.capacity:  # rare: the engine sizes the buffers for the batch's budget
            self._set(*(_moved(b, None, 0, self.end, 2 * (self.end + S)) for b in (self.keys_buf, self.values_buf)))
        self.keys_buf[:, :, self.end:self.end + S].copy_(key_states)
        self.values_buf[:, :, self.end:self.end + S].copy_(value_states)
        self.end += S
        self._set(self.keys_buf, self.values_buf)
        return self.keys, self.values

    def rewind(self, end: int) -> None:
        """Forget the columns from `end` on."""
        self.end = end
        self._set(self.keys_buf, self.values_buf)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.end + query_length, 0  # (kv_length, kv_offset), as for a DynamicLayer

    def get_seq_length(self) -> int:
        return self.end

    def get_max_length(self) -> int:
        return -1


def _moved(buf: Tensor, rows: Tensor | None, first: int, end: int, capacity: int) -> Tensor:
    """A new [B', H, capacity, D] buffer whose first columns are columns [first, end) of `buf`
    (of its rows `rows`, or all)."""
    src = buf[:, :, first:end] if rows is None else buf[:, :, first:end].index_select(0, rows)
    B, H, T, D = src.shape
    out = src.new_empty(B, H, max(capacity, T), D)
    out[:, :, :T].copy_(src)
    return out


def buffer_cache(layers: int) -> Cache:
    """An empty cache of `layers` buffer layers (a prefill allocates them)."""
    return Cache(layers=[BufferLayer() for _ in range(layers)])


def join(cache: Cache | None, new: Cache, rows: list[int], capacity: int) -> Cache:
    """A cache of `cache`'s rows followed by rows `rows` of `new` (a prefill's cache; a row may be
    taken more than once), aligned on their last column: the narrower side is padded on the left
    with zeros (finite: masked columns still enter the attention matmuls). `capacity`: columns to
    allocate, the widest the batch can grow to."""
    layers = []
    for i, n in enumerate(new.layers):
        idx = torch.tensor(rows, dtype=torch.long, device=n.device)
        old = cache.layers[i] if cache is not None else BufferLayer(n.keys_buf[:0], n.values_buf[:0])
        W = max(old.end, n.end)
        bufs = []
        for a, b in ((old.keys_buf, n.keys_buf), (old.values_buf, n.values_buf)):
            B_old, H, _, D = a.shape
            out = b.new_empty(B_old + len(rows), H, max(capacity, W), D)
            out[:, :, :W].zero_()
            out[:B_old, :, W - old.end:W].copy_(a[:, :, :old.end])
            out[B_old:, :, W - n.end:W].copy_(b[:, :, :n.end].index_select(0, idx))
            bufs.append(out)
        layers.append(BufferLayer(*bufs, end=W))
    return Cache(layers=layers)


def keep(cache: Cache, rows: list[int], first: int) -> Cache:
    """`cache` with only rows `rows` and without its first `first` columns: those rows' columns
    are copied to the front of new buffers of the same capacity."""
    for layer in cache.layers:
        idx = torch.tensor(rows, dtype=torch.long, device=layer.device)
        bufs = [_moved(b, idx, first, layer.end, layer.capacity) for b in (layer.keys_buf, layer.values_buf)]
        layer.end -= first
        layer._set(*bufs)
    return cache


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument: transformers 5.x renamed `past_key_values` to `cache`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
