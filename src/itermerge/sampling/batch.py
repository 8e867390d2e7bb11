"""The rows decoded together: their KV cache, masks, positions and noise, and rows joining and leaving mid-way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from itermerge.sampling.kv_cache import append_rows, can_append_rows, can_expand_rows, expand_rows
from itermerge.sampling.logits import apply_penalties, sample_categorical, warp_logits
from itermerge.sampling.params import SamplingParams

INITIAL_ROOM = 128  # KV-cache slots reserved for new tokens before the first doubling

# forward(cache, input_ids, attention_mask, position_ids) -> last-position logits (B, V), float32
Forward = Callable[..., torch.Tensor]
# new_cache(capacity) -> an empty KV cache with room for ``capacity`` tokens (``kv_cache.growing_cache`` or any
# transformers cache); rows may join a running batch only when ``kv_cache.can_append_rows`` says the cache allows it.
NewCache = Callable[[int], Any]


def row_uniforms(prompt_seed: int, k: int, steps: int) -> np.ndarray:
    """The uniforms that drive sample k of a prompt, one per decoding step: (steps,) float64 in [0, 1)."""
    return np.random.default_rng([prompt_seed, k]).random(steps)


@dataclass
class Row:
    """Sample ``k`` of prompt ``prompt``: its tokens so far, and whether it has ended (EOS or length)."""

    prompt: int
    k: int
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    ended: bool = False


class Batch(Protocol):
    """What the decode loop drives: rows join (``admit``), choose a token (``sample``) and advance (``forward``).

    ``size`` is the width decoded (live and ended rows), ``live`` the rows still decoding; ``drop_ended`` lets
    the batch shed ended rows when a change would pay.
    """

    @property
    def size(self) -> int: ...

    @property
    def live(self) -> int: ...

    def can_admit(self) -> bool: ...

    def admit(self, prompt_ids: list[list[int]], rows: list[tuple[int, int]], seeds: list[int]) -> None: ...

    def drop_ended(self) -> None: ...

    def sample(self) -> list[Row]: ...

    def forward(self) -> None: ...


class DecodeBatch:
    """Up to a batch of rows advanced one token per ``forward``; tensors are indexed by batch position.

    Rows are left-padded to a common width so that every row's next token sits in the same column;
    each row keeps its own position ids. Ended rows stay (their outputs ignored) until ``admit``
    or ``drop_ended`` removes them: copying the cache at every finish would cost more. With ``shared_prefix``
    the prompts admitted together run their common prefix once (``prefill(shared=...)``).
    """

    def __init__(
        self, forward: Forward, new_cache: NewCache, params: SamplingParams, eos_ids: list[int], pad_id: int,
        device: torch.device, *, shared_prefix: bool = False,
    ) -> None:
        self.forward_fn, self.new_cache, self.params, self.shared_prefix = forward, new_cache, params, shared_prefix
        self.eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
        self.pad_id, self.device = pad_id, device
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask = self.next_pos = self.logits = self.tokens = None  # (B, T), (B,), (B, V), (B,)
        self.uniforms: torch.Tensor | None = None  # (B, max_new_tokens) float64; None when greedy
        self.counts: torch.Tensor | None = None  # (B, V) token counts for the penalties; None without them

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def live(self) -> int:
        return sum(not r.ended for r in self.rows)

    def can_admit(self) -> bool:
        """New rows may join when no row is live, or mid-way when the cache supports it."""
        return self.live == 0 or can_append_rows(self.cache)

    def admit(self, prompt_ids: list[list[int]], rows: list[tuple[int, int]], seeds: list[int]) -> None:
        """Drop ended rows and add ``rows`` (prompt index, k): each distinct prompt is prefilled once and its
        KV cache copied to its rows."""
        dev, max_new = self.device, self.params.max_new_tokens
        distinct = list(dict.fromkeys(p for p, _ in rows))
        prompts = [prompt_ids[p] for p in distinct]
        cache, logits, mask, lengths = prefill(
            self.forward_fn, self.new_cache, prompts, self.pad_id, dev, room=min(max_new, INITIAL_ROOM),
            shared=shared_prefix_length(prompts) if self.shared_prefix else 0,
        )
        of_prompt = torch.tensor([distinct.index(p) for p, _ in rows], device=dev)  # (B_new,)
        if len(rows) != len(distinct):  # one row per prompt (greedy) is already in order: no copy
            cache.batch_select_indices(of_prompt)
        new = dict(
            mask=mask[of_prompt], next_pos=lengths[of_prompt], logits=logits[of_prompt],
            tokens=torch.full((len(rows),), self.pad_id, dtype=torch.long, device=dev),
            uniforms=None if self.params.greedy else torch.from_numpy(
                np.stack([row_uniforms(seeds[p], k, max_new) for p, k in rows])).to(dev),
            counts=torch.zeros_like(logits[of_prompt]) if self._penalized else None,
        )
        new_rows = [Row(p, k) for p, k in rows]
        if self.size == 0 or self.live == 0:
            self.rows, self.cache = new_rows, cache
            for name, value in new.items():
                setattr(self, name, value)
            return
        keep = self._live_index()
        # Slots that are padding in every remaining row go, so the width follows the live rows' lengths
        # instead of growing with every row that ever joined.
        kept_mask = self.mask[keep]
        trim = int((kept_mask.cumsum(dim=1) == 0).sum(dim=1).min())
        width = append_rows(self.cache, keep, trim, cache)
        self.mask = torch.cat([_left_pad(kept_mask[:, trim:], width), _left_pad(new["mask"], width)])
        for name in ("next_pos", "logits", "tokens", "uniforms", "counts"):
            if getattr(self, name) is not None:
                setattr(self, name, torch.cat([getattr(self, name)[keep], new[name]]))
        self.rows = [self.rows[i] for i in keep.tolist()] + new_rows

    def drop_ended(self) -> None:
        """Remove ended rows from the batch and its cache."""
        keep = self._live_index()
        self.cache.batch_select_indices(keep)
        for name in ("mask", "next_pos", "logits", "tokens", "uniforms", "counts"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[keep])
        self.rows = [self.rows[i] for i in keep.tolist()]

    def sample(self) -> list[Row]:
        """Choose every live row's next token from its logits; returns the rows that ended with it."""
        p = self.params
        steps = [min(len(r.tokens), p.max_new_tokens - 1) for r in self.rows]
        tokens = choose_tokens(self.logits, p, self.counts, self.uniforms, steps)  # (B,)
        is_eos = torch.isin(tokens, self.eos).tolist()
        ended = []
        for row, token, eos in zip(self.rows, tokens.tolist(), is_eos):
            if row.ended:
                continue
            row.tokens.append(token)
            row.finished = eos
            row.ended = eos or len(row.tokens) == p.max_new_tokens
            if row.ended:
                ended.append(row)
        self.tokens = tokens
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(self.counts[:, :1]))
        return ended

    def forward(self) -> None:
        """Feed every row its last token: the logits of the next step."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)
        self.logits = self.forward_fn(
            self.cache, input_ids=self.tokens[:, None], attention_mask=self.mask, position_ids=self.next_pos[:, None]
        )
        self.next_pos = self.next_pos + 1

    @property
    def _penalized(self) -> bool:
        return self.params.presence_penalty != 0 or self.params.frequency_penalty != 0

    def _live_index(self) -> torch.Tensor:
        return torch.tensor([i for i, r in enumerate(self.rows) if not r.ended], dtype=torch.long, device=self.device)


def prefill(
    forward: Forward, new_cache: NewCache, prompts: list[list[int]], pad_id: int, device: torch.device, *, room: int,
    shared: int = 0,
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``prompts`` left-padded to a common width W through ``forward`` in a fresh cache with ``room`` spare
    slots: (cache, last-position logits (U, V), attention mask (U, W), prompt lengths (U,)). Position ids are
    HF ``generate``'s: a prompt's first token is at position 0 whatever its padding.

    ``shared`` > 0 (``sampling.shared_prefix``): the first ``shared`` tokens, the same in every prompt (a chat
    template's system prompt), run once with batch 1 and their keys/values are expanded to the U rows
    (``kv_cache.expand_rows``); then only the rest of each prompt runs, left-padded after them. A row's columns
    are then [shared prefix | padding | the rest], masked accordingly, with position ids running on from
    ``shared``: the same attention as the left-padded prompt's, at about (W − shared)/W of the compute. Caches
    that ``kv_cache.can_expand_rows`` refuses prefill every prompt whole."""
    lengths = torch.tensor([len(p) for p in prompts])  # (U,)
    cache = new_cache(int(lengths.max()) + room)
    shared = shared if shared and can_expand_rows(cache) else 0
    width = int(lengths.max()) - shared  # of the unshared part
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - (len(p) - shared) :] = torch.tensor(p[shared:])
    mask = (torch.arange(width) >= (width - (lengths - shared))[:, None]).long()  # (U, W − shared)
    positions = (shared + mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)  # as HF generate
    mask = torch.cat([mask.new_ones(len(prompts), shared), mask], dim=1)  # (U, W)
    input_ids, mask, positions, lengths = (t.to(device) for t in (input_ids, mask, positions, lengths))
    if shared:
        forward(cache, input_ids=input_ids.new_tensor([prompts[0][:shared]]),
                attention_mask=mask.new_ones(1, shared), position_ids=torch.arange(shared, device=device)[None])
        expand_rows(cache, len(prompts))
    logits = forward(cache, input_ids=input_ids, attention_mask=mask, position_ids=positions)
    return cache, logits, mask, lengths


MIN_SHARED_PREFIX = 4  # tokens: a shorter common prefix is not worth its own forward pass


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens at the start of every prompt that ``prefill(shared=...)`` can run once: the longest common prefix,
    less one so that every prompt keeps a token of its own (whose logits start its reply); 0 when that is under
    ``MIN_SHARED_PREFIX`` or there is a single prompt."""
    if len(prompts) < 2:
        return 0
    first, shortest = prompts[0], min(map(len, prompts))
    n = 0
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


def choose_tokens(
    logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None, uniforms: torch.Tensor | None,
    steps: list[int],
) -> torch.Tensor:
    """Each row's next token (B,) from its logits (B, V): penalties (``counts`` (B, V), None without them), then
    argmax when ``uniforms`` is None (greedy), else HF's warping and the inverse CDF at the row's own uniform
    ``uniforms[b, steps[b]]`` ((B, max_new_tokens) float64)."""
    p = params
    if counts is not None:
        logits = apply_penalties(logits, counts, p.presence_penalty, p.frequency_penalty)
    if uniforms is None:
        return logits.argmax(dim=-1)
    at = torch.tensor(steps, device=uniforms.device)[:, None]
    u = uniforms.gather(1, at).squeeze(1)  # each row's noise for its own step
    return sample_categorical(warp_logits(logits, p.temperature, p.top_k, p.top_p), u)


def _left_pad(mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, T) attention mask → (B, width) with zeros (masked) on the left."""
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0), value=0)
