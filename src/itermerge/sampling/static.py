"""A static KV cache of fixed slots and the one-token decode step over it, captured as CUDA graphs on GPUs.

On a GPU a small model's decode step is bound by kernel launches from Python (docs/benchmarks.md: ~80 ms a
step for SmolLM2-135M, whatever the batch). A CUDA graph replays a captured step as one launch, but needs every
tensor it touches at a fixed address with a fixed shape. So the keys and values live in buffers allocated once,
(slots, kv heads, capacity, head dim) per layer; slot s holds one row's tokens at columns 0, 1, … (no padding:
a token's column is its position id), and the step writes each row's new key/value at its own column and
attends to the columns up to it (a mask built from the positions, inside the step).

One graph per (rows, span): ``rows`` a bucket of leading slots (8, 16, 32, … up to the batch size: the tail of
a run decodes in a small graph), ``span`` the columns attended to (128, 256, … up to the capacity: short
answers do not pay for the longest one). Graphs are captured the first time their shape is needed and share
one memory pool; everything read after a replay (the logits) lives outside it. On CPU the same step runs
eagerly. What rows are in which slot is ``sampling.slots.SlotBatch``'s business.
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Any

import torch

SPAN_MIN = 128  # smallest number of cache columns a step attends to; spans double up to the capacity
SMALLEST_BUCKET = 8  # the fewest leading slots a step runs on: below it a GPU step costs the same


def capacity_for(tokens: int) -> int:
    """Cache columns for rows of up to ``tokens`` tokens (prompt + new): rounded up to a multiple of SPAN_MIN."""
    return -(-tokens // SPAN_MIN) * SPAN_MIN


def cache_bytes(config: Any, slots: int, capacity: int, dtype: torch.dtype) -> int:
    """Bytes of the static keys and values: 2 × layers × slots × kv heads × capacity × head dim × element size."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * slots * kv_heads * capacity * head_dim * torch.empty((), dtype=dtype).itemsize


def row_buckets(slots: int, smallest: int | None = None) -> list[int]:
    """The step widths: powers of two from ``smallest`` (SMALLEST_BUCKET) below ``slots``, then ``slots`` itself."""
    buckets, b = [], smallest or SMALLEST_BUCKET
    while b < slots:
        buckets.append(b)
        b *= 2
    return [*buckets, slots]


def static_unsupported(model: Any) -> str | None:
    """Why ``model`` cannot decode over the static slot cache (None when it can): it needs transformers 5's
    per-layer caches, full attention in every layer, SDPA or eager attention (which take a ready 4-D mask) and
    rotary positions that do not depend on the length decoded so far."""
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import CacheLayerMixin, DynamicLayer  # noqa: F401 - transformers 5 only
    except ImportError:
        return "transformers < 5 has no per-layer caches"
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in ("sdpa", "eager"):
        return f"attention implementation {implementation!r} (needs 'sdpa' or 'eager')"
    layers = DynamicCache(config=model.config).layers
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return "a layer is not full attention (sliding window, linear attention, …)"
    for module in model.modules():
        kinds = getattr(module, "rope_type", None)
        kinds = kinds.values() if isinstance(kinds, dict) else [kinds]
        if any(kind in ("dynamic", "longrope") for kind in kinds):
            return "rotary embedding rescaled by the sequence length (dynamic or longrope)"
    return None


class _Step:
    """What the layers of the cache read during one step: rows run, columns attended, each row's column."""

    rows: int = 0
    span: int = 0
    write_at: torch.Tensor | None = None  # (rows, 1, 1, 1) long, a view of StaticKV.positions


@functools.cache
def _slot_layer_class() -> type:
    from transformers.cache_utils import CacheLayerMixin

    class SlotLayer(CacheLayerMixin):
        """One layer's keys and values, (slots, kv heads, capacity, head dim), written at per-row columns."""

        is_compileable = True
        is_sliding = False

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, step: _Step) -> None:
            super().__init__()
            self.keys, self.values, self.step, self.is_initialized = keys, values, step, True
            self.device = keys.device

        def lazy_initialization(self, *args: Any) -> None:
            pass

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            s = self.step  # key_states (rows, kv heads, 1, head dim)
            keys, values = self.keys[: s.rows], self.values[: s.rows]
            keys.scatter_(2, s.write_at.expand_as(key_states), key_states)
            values.scatter_(2, s.write_at.expand_as(value_states), value_states)
            return keys[:, :, : s.span], values[:, :, : s.span]

        def get_mask_sizes(self, *args: Any) -> tuple[int, int]:
            return self.step.span, 0

        def get_seq_length(self, *args: Any) -> int:
            return self.step.span  # rows differ in length; this is what the step attends to

        def get_max_length(self) -> int:
            return self.keys.shape[2]

        get_max_cache_shape = get_max_length  # the older name of the same thing

    # Which methods are abstract differs between transformers versions; a step calls only `update`.
    SlotLayer.__abstractmethods__ = frozenset()
    return SlotLayer


class StaticKV:
    """The static cache of ``slots`` rows × ``capacity`` tokens, its step inputs and outputs, and the step.

    Buffers are allocated at the first ``load`` (shapes and dtype from the prefill's cache) and reused by later
    decodes of the same sampler while they fit. ``graphs``: capture each step shape as a CUDA graph.
    """

    def __init__(self, model: Any, cache_arg: str, slots: int, capacity: int, *, graphs: bool) -> None:
        self.model, self.cache_arg, self.slots, self.capacity = model, cache_arg, slots, capacity
        self.buckets = row_buckets(slots)
        self.use_graphs = graphs
        self.graphs: dict[tuple[int, int], Any] = {}
        self.capture_seconds = 0.0
        self.additive_mask = model.config._attn_implementation == "eager"
        self.cache: Any = None  # a transformers Cache of SlotLayers
        self.tokens = self.positions = self.logits = self.columns = None  # (S,), (S,), (S, V) float32, (L,)
        self._step = _Step()
        self._pool: Any = None

    def span_for(self, columns: int) -> int:
        """The step's span for rows that need ``columns`` columns: SPAN_MIN doubled until it fits, at most capacity."""
        span = SPAN_MIN
        while span < columns:
            span *= 2
        return min(span, self.capacity)

    def bucket_for(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def load(self, prefill_cache: Any, of_prompt: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor,
             logits: torch.Tensor) -> None:
        """Copy prompts from a left-padded prefill cache (U prompts, W columns) into slots, columns 0 … length − 1:
        row r of the new rows is prompt ``of_prompt[r]`` of length ``lengths[r]`` and goes to slot ``slots[r]``,
        with ``logits[r]`` (V,) its first token's logits."""
        if self.cache is None:
            self._allocate(prefill_cache, logits)
        width = prefill_cache.layers[0].keys.shape[2]
        # Column c of a slot is column W − length + c of its prefill row (beyond the prompt: a copy of its last
        # column, never attended to and overwritten as the row decodes, but finite: 0 · NaN is NaN in attention).
        cols = (torch.arange(width, device=lengths.device) + (width - lengths)[:, None]).clamp_(max=width - 1)
        for mine, theirs in zip(self.cache.layers, prefill_cache.layers):
            for dst, src in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                rows = src[of_prompt]  # (R, H, W, D)
                dst[slots, :, :width] = rows.gather(2, cols[:, None, :, None].expand_as(rows))
        self.logits[slots] = logits

    def move(self, src: torch.Tensor, dst: torch.Tensor, columns: int) -> None:
        """Move rows from slots ``src`` to slots ``dst`` (their first ``columns`` columns and pending logits)."""
        for layer in self.cache.layers:
            layer.keys[dst, :, :columns] = layer.keys[src, :, :columns]
            layer.values[dst, :, :columns] = layer.values[src, :, :columns]
        self.logits[dst] = self.logits[src]

    def step(self, rows: int, span: int) -> None:
        """Feed ``tokens[:rows]`` at ``positions[:rows]``: writes their keys/values and ``logits[:rows]``."""
        if not self.use_graphs:
            self._forward(rows, span)
            return
        graph = self.graphs.get((rows, span))
        if graph is None:
            try:
                graph = self._capture(rows, span)
            except RuntimeError as e:  # a model whose step reads values back to the host, say: slower, not wrong
                warnings.warn(f"sampling: CUDA graph capture failed ({e}); decoding without CUDA graphs", stacklevel=2)
                self.use_graphs = False
                self._forward(rows, span)
                return
        graph.replay()

    def _forward(self, rows: int, span: int) -> None:
        """The step itself: no host synchronisation and no allocation that outlives it, so it can be captured."""
        positions = self.positions[:rows]
        self._step.rows, self._step.span, self._step.write_at = rows, span, positions.view(rows, 1, 1, 1)
        mask = self.columns[:span] <= positions[:, None]  # (rows, span): a row sees its columns up to its own
        mask = mask[:, None, None, :]  # (rows, 1, 1, span): a ready 4-D mask, which transformers passes on as is
        if self.additive_mask:
            mask = torch.zeros(mask.shape, dtype=self.mask_dtype, device=mask.device).masked_fill_(
                ~mask, torch.finfo(self.mask_dtype).min)
        out = self.model(
            input_ids=self.tokens[:rows, None], attention_mask=mask, position_ids=positions[:, None],
            use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache},
        )
        self.logits[:rows].copy_(out.logits[:, -1])

    def _capture(self, rows: int, span: int) -> Any:
        """Run the step once eagerly on a side stream (warm-up, as CUDA graph capture requires), then capture it.
        The step is idempotent (it writes the same keys/values at the same columns), so the warm-up is harmless
        and the first replay recomputes this very step."""
        start = time.perf_counter()
        current = torch.cuda.current_stream(self.tokens.device)
        side = torch.cuda.Stream(self.tokens.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._forward(rows, span)
        current.wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._forward(rows, span)
        self.graphs[(rows, span)] = graph
        self.capture_seconds += time.perf_counter() - start
        return graph

    def _allocate(self, prefill_cache: Any, logits: torch.Tensor) -> None:
        from transformers.cache_utils import Cache

        device = logits.device
        layers = []
        for layer in prefill_cache.layers:
            k, v = layer.keys, layer.values  # (U, H, W, D)
            keys = k.new_zeros(self.slots, k.shape[1], self.capacity, k.shape[3])
            values = v.new_zeros(self.slots, v.shape[1], self.capacity, v.shape[3])
            layers.append(_slot_layer_class()(keys, values, self._step))
        self.cache = Cache(layers=layers)
        self.mask_dtype = prefill_cache.layers[0].keys.dtype
        self.tokens = torch.zeros(self.slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(self.slots, dtype=torch.long, device=device)
        self.logits = torch.zeros(self.slots, logits.shape[-1], dtype=torch.float32, device=device)
        self.columns = torch.arange(self.capacity, device=device)
