"""A transformers DynamicCache whose layers write into buffers with room to grow, instead of re-concatenating.

``DynamicLayer.update`` runs ``torch.cat`` on the whole cache at every decoding step, a copy that grows with
the length (a measurable share of a CPU step: docs/benchmarks.md). ``StaticCache`` avoids it but attends
over its full ``max_cache_len`` every step (ruinous for max_new_tokens=1024 with short answers) and cannot
drop finished rows. These layers keep DynamicLayer's semantics (``keys``/``values`` are exactly the tokens
seen so far, as views) while appending in place into a buffer whose spare room doubles when it runs out,
and let new rows join a running batch (``append_rows``). ``sampling.growing_kv_cache`` turns them off.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


@functools.cache
def _growing_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        is_croppable = False  # crop() would edit the views but not the buffer

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity, self.length = capacity, 0
            self._keys: torch.Tensor | None = None
            self._values: torch.Tensor | None = None

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.device = key_states.device
            b, h, n, d = key_states.shape  # (B, H_kv, T, D)
            self.capacity = max(self.capacity, n)
            self._keys = key_states.new_empty(b, h, self.capacity, d)
            self._values = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
            self.is_initialized = True

        def _resize(self, rows: torch.Tensor | None, capacity: int) -> None:
            """New buffers holding ``rows`` (all when None) of the filled part, with room for ``capacity`` tokens."""
            assert self._keys is not None and self._values is not None
            old = [self._keys, self._values]
            new = []
            for buf in old:
                kept = buf[:, :, : self.length] if rows is None else buf[rows, :, : self.length]
                grown = buf.new_empty(kept.shape[0], buf.shape[1], capacity, buf.shape[3])
                grown[:, :, : self.length] = kept
                new.append(grown)
            self._keys, self._values, self.capacity = new[0], new[1], capacity
            self._publish()

        def _publish(self) -> None:
            assert self._keys is not None and self._values is not None
            self.keys = self._keys[:, :, : self.length]
            self.values = self._values[:, :, : self.length]

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                self._resize(None, max(end, 2 * self.capacity))
            assert self._keys is not None and self._values is not None
            self._keys[:, :, self.length : end] = key_states
            self._values[:, :, self.length : end] = value_states
            self.length = end
            self._publish()
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                self._resize(indices, self.capacity)

        def append_rows(self, keep: torch.Tensor, trim: int, other: GrowingLayer, length: int) -> None:
            """Rows ``keep`` of this layer without their first ``trim`` slots, then all rows of ``other``, each
            left-padded to ``length`` slots."""
            _append_layer_rows(self, keep, trim, other, length)

        def expand_rows(self, rows: int) -> None:
            """The one row of this layer (a prefix shared by every row) written into ``rows`` rows: each row
            appends its own tokens in place after it, so the buffer holds one copy per row."""
            _expand_layer_rows(self, rows)

    return GrowingLayer


def _append_layer_rows(layer: Any, keep: torch.Tensor, trim: int, other: Any, length: int) -> None:
    """``GrowingLayer.append_rows``: new buffers with the kept rows, then ``other``'s, each left-padded."""
    assert layer._keys is not None and layer._values is not None and other._keys is not None
    assert other._values is not None and length >= max(layer.length - trim, other.length)
    pad_mine, pad_theirs, n_mine = length - (layer.length - trim), length - other.length, len(keep)
    capacity = max(layer.capacity, length + 1)
    merged = []
    for mine, theirs in ((layer._keys, other._keys), (layer._values, other._values)):
        buf = mine.new_empty(n_mine + theirs.shape[0], mine.shape[1], capacity, mine.shape[3])
        # Padded slots are masked out, but must hold finite numbers: 0 · NaN is NaN in attention.
        buf[:n_mine, :, :pad_mine] = 0
        buf[n_mine:, :, :pad_theirs] = 0
        buf[:n_mine, :, pad_mine:length] = mine[keep, :, trim : layer.length]
        buf[n_mine:, :, pad_theirs:length] = theirs[:, :, : other.length]
        merged.append(buf)
    layer._keys, layer._values, layer.capacity, layer.length = merged[0], merged[1], capacity, length
    layer._publish()


def _expand_layer_rows(layer: Any, rows: int) -> None:
    """``GrowingLayer.expand_rows``: the one row's filled part broadcast into a ``rows``-row buffer."""
    assert layer._keys is not None and layer._values is not None and layer._keys.shape[0] == 1
    expanded = []
    for buf in (layer._keys, layer._values):
        grown = buf.new_empty(rows, buf.shape[1], layer.capacity, buf.shape[3])
        grown[:, :, : layer.length] = buf[:, :, : layer.length]  # broadcast over the rows
        expanded.append(grown)
    layer._keys, layer._values = expanded
    layer._publish()


def can_append_rows(cache: Any) -> bool:
    """Whether rows can join ``cache`` mid-decoding: only when every layer is a growing one."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(isinstance(layer, _growing_layer_class()) for layer in layers)


def append_rows(cache: Any, keep: torch.Tensor, trim: int, new: Any) -> int:
    """Keep rows ``keep`` of ``cache`` less their first ``trim`` slots (padding in every kept row), append the
    rows of ``new``, left-pad all to the longer length and return it (the attention mask's new width).
    Both caches must pass ``can_append_rows``."""
    length = max(cache.get_seq_length() - trim, new.get_seq_length())
    for mine, theirs in zip(cache.layers, new.layers):
        mine.append_rows(keep, trim, theirs, length)
    return length


def can_expand_rows(cache: Any) -> bool:
    """Whether ``expand_rows`` can serve ``cache``: every layer a growing or a plain full-attention one."""
    from transformers.cache_utils import DynamicLayer

    kinds = (DynamicLayer, _growing_layer_class())
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) in kinds for layer in layers)


def expand_rows(cache: Any, rows: int) -> None:
    """A one-row ``cache`` (that passes ``can_expand_rows``) seen as ``rows`` rows holding the same tokens: a plain
    layer's keys/values become a view (``expand``; the next ``update`` concatenates into a new tensor anyway), a
    growing layer copies them once into its ``rows``-row buffer."""
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        if type(layer) is _growing_layer_class():
            layer.expand_rows(rows)
        else:
            layer.keys = layer.keys.expand(rows, -1, -1, -1)
            layer.values = layer.values.expand(rows, -1, -1, -1)


def growing_cache(config: Any, capacity: int) -> Any:
    """A ``DynamicCache`` for ``config`` whose full-attention layers grow in place (room for ``capacity`` tokens
    before the first doubling). Other layer kinds (sliding windows, …) stay as they are."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)  # per-layer objects since transformers 4.56 (our bound: 4.57.1)
    layer_class = _growing_layer_class()
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = layer_class(capacity)
    return cache


def plain_cache(config: Any) -> Any:
    """transformers' own ``DynamicCache`` (re-concatenated every step; rows join only an empty batch)."""
    from transformers import DynamicCache

    return DynamicCache(config=config)
