"""Rows decoded in the fixed slots of a static KV cache: refilled as rows end, packed down as the run tails off.

The decode loop's batch for the static-cache path (``sampling.static``). A row occupies one slot from its
prefill to its last token; when it ends its slot is free at once, and waiting rows fill the lowest free slots:
their distinct prompts are prefilled together (as ``DecodeBatch`` does, in the sampler's ordinary cache) and
each row's keys/values copied into its slot. Steps run on the leading ``width`` slots, the smallest bucket
holding every occupied slot; once no row waits and the live rows fit a smaller bucket, the rows above it move
down into free slots below it. Tokens are chosen outside the step by ``batch.choose_tokens``, the function
``DecodeBatch`` uses, from each row's own uniforms: the same draws, up to the float rounding of the attention.
"""

from __future__ import annotations

import numpy as np
import torch

from itermerge.sampling.batch import Forward, NewCache, Row, choose_tokens, prefill, row_uniforms
from itermerge.sampling.params import SamplingParams
from itermerge.sampling.static import StaticKV


class SlotBatch:
    """Up to ``kv.slots`` rows, row i of slot i; ``rows[i]`` is None for a free slot."""

    def __init__(self, kv: StaticKV, forward: Forward, new_cache: NewCache, params: SamplingParams,
                 eos_ids: list[int], pad_id: int, device: torch.device) -> None:
        self.kv, self.forward_fn, self.new_cache, self.params = kv, forward, new_cache, params
        self.eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
        self.pad_id, self.device = pad_id, device
        self.rows: list[Row | None] = [None] * kv.slots
        self.next_pos = np.zeros(kv.slots, dtype=np.int64)  # the column (= position id) of each slot's next input
        self.width = 0  # leading slots the steps run on
        self.uniforms: torch.Tensor | None = None  # (S, max_new_tokens) float64; None when greedy
        self.counts: torch.Tensor | None = None  # (S, V) token counts for the penalties; None without them
        self.moves = 0  # rows moved down to a smaller bucket (for tests and benchmarks)

    @property
    def size(self) -> int:
        return self.width

    @property
    def live(self) -> int:
        return sum(r is not None for r in self.rows)

    def can_admit(self) -> bool:
        return True

    def admit(self, prompt_ids: list[list[int]], rows: list[tuple[int, int]], seeds: list[int]) -> None:
        """Put ``rows`` (prompt index, k) in the lowest free slots: each distinct prompt prefilled once."""
        dev, p = self.device, self.params
        distinct = list(dict.fromkeys(i for i, _ in rows))
        cache, logits, _, lengths = prefill(
            self.forward_fn, self.new_cache, [prompt_ids[i] for i in distinct], self.pad_id, dev, room=0)
        free = [s for s, row in enumerate(self.rows) if row is None][: len(rows)]
        slots = torch.tensor(free, device=dev)  # (R,)
        of_prompt = torch.tensor([distinct.index(i) for i, _ in rows], device=dev)  # (R,)
        self.kv.load(cache, of_prompt, lengths[of_prompt], slots, logits[of_prompt])
        for s, (i, k) in zip(free, rows):
            self.rows[s], self.next_pos[s] = Row(i, k), len(prompt_ids[i])
        if not p.greedy:
            if self.uniforms is None:
                self.uniforms = torch.zeros(self.kv.slots, p.max_new_tokens, dtype=torch.float64, device=dev)
            fresh = np.stack([row_uniforms(seeds[i], k, p.max_new_tokens) for i, k in rows])
            self.uniforms[slots] = torch.from_numpy(fresh).to(dev)
        if p.presence_penalty != 0 or p.frequency_penalty != 0:
            if self.counts is None:
                self.counts = torch.zeros(self.kv.slots, logits.shape[-1], device=dev)
            self.counts[slots] = 0
        self.width = max(self.width, self.kv.bucket_for(max(free) + 1))

    def drop_ended(self) -> None:
        """Ended rows have left already; move the live rows into a smaller bucket once they fit one."""
        target = self.kv.bucket_for(max(self.live, 1))
        if target >= self.width:
            return
        src = [s for s in range(target, self.width) if self.rows[s] is not None]
        dst = [s for s in range(target) if self.rows[s] is None][: len(src)]
        if src:
            self.kv.move(torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device),
                         columns=int(self.next_pos[src].max()))
            for name in ("uniforms", "counts"):
                table = getattr(self, name)
                if table is not None:
                    table[dst] = table[src]
            for s, d in zip(src, dst):
                self.rows[d], self.rows[s] = self.rows[s], None
                self.next_pos[d], self.next_pos[s] = self.next_pos[s], 0
            self.moves += len(src)
        self.width = target

    def sample(self) -> list[Row]:
        """Choose every slot's next token (free slots' are ignored); returns the rows that ended with it."""
        p, b = self.params, self.width
        steps = [min(len(r.tokens), p.max_new_tokens - 1) if r is not None else 0 for r in self.rows[:b]]
        tokens = choose_tokens(
            self.kv.logits[:b], p, None if self.counts is None else self.counts[:b],
            None if self.uniforms is None else self.uniforms[:b], steps,
        )  # (b,)
        # A free slot's garbage logits could in principle draw a padded id ≥ V, which the next step's embedding
        # lookup would turn into a device-side assert; live rows only ever draw ids < V.
        self.kv.tokens[:b].copy_(tokens.clamp(max=self.kv.logits.shape[-1] - 1))
        if self.counts is not None:
            self.counts[:b].scatter_add_(1, tokens[:, None], torch.ones_like(self.counts[:b, :1]))
        chosen, is_eos = torch.stack([tokens, torch.isin(tokens, self.eos).long()]).tolist()  # one sync
        ended = []
        for s, row in enumerate(self.rows[:b]):
            if row is None:
                continue
            row.tokens.append(chosen[s])
            row.finished = bool(is_eos[s])
            row.ended = row.finished or len(row.tokens) == p.max_new_tokens
            if row.ended:  # the slot is free from now on
                self.rows[s], self.next_pos[s] = None, 0
                ended.append(row)
        return ended

    def forward(self) -> None:
        """Feed every slot its last token: the logits of the next step (free slots compute harmless garbage)."""
        b = self.width
        self.kv.positions[:b].copy_(torch.from_numpy(self.next_pos[:b]))
        self.kv.step(b, self.kv.span_for(int(self.next_pos[:b].max()) + 1))
        self.next_pos[[s for s in range(b) if self.rows[s] is not None]] += 1
