"""The one decode loop: rows (prompt, k) decoded with continuous batching through any forward and KV cache.

HFSampler runs it over one model's forward; the exact ensemble of eq. (6) runs it over a forward that mixes
several models' next-token log-probs. Up to ``batch_size`` rows decode together, taken in order of prompt
length. Each distinct prompt is prefilled once and its KV cache copied to its K rows; ended rows leave the
batch and waiting rows take their slots, so the batch stays full until the last prompts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from itermerge.sampling.batch import Batch, DecodeBatch, Forward, NewCache, Row
from itermerge.sampling.params import SamplingParams, prompt_seeds

# Rows join (waiting rows fill free slots) or leave (ended rows are dropped) once that changes at
# least this fraction of the batch: each change copies the KV cache, so doing it at every finish
# would cost more than the dead rows' compute it saves.
CHANGE_FRACTION = 1 / 8


@torch.inference_mode()
def decode(
    forward: Forward, new_cache: NewCache, prompt_ids: Sequence[Sequence[int]], params: SamplingParams,
    eos_ids: Sequence[int], pad_id: int, device: torch.device, *, batch_size: int, progress: bool = False,
    desc: str = "sampling", batch: Batch | None = None,
) -> list[list[Row]]:
    """``params.n`` rows per prompt (one when greedy: greedy rows are all the same), as [prompt][k] → Row
    (token ids ending with the EOS when ``finished``). Row k of a prompt draws from uniforms keyed on the
    prompt's content and k, so it does not depend on what it was batched with.

    ``batch`` is where the rows decode: by default a ``DecodeBatch`` over ``forward`` and ``new_cache``; the
    static-cache path (``sampling.slots.SlotBatch``) passes its own, with room for ``batch_size`` rows."""
    seeds = prompt_seeds([list(p) for p in prompt_ids], params.seed)
    per_prompt = 1 if params.greedy else params.n
    rows = sorted(  # by prompt length, so rows that decode together need little padding
        ((p, k) for p in range(len(prompt_ids)) for k in range(per_prompt)),
        key=lambda row: (len(prompt_ids[row[0]]), row[0], row[1]),
    )
    prompts = [list(p) for p in prompt_ids]
    results: list[list[Row | None]] = [[None] * per_prompt for _ in prompt_ids]
    if batch is None:
        batch = DecodeBatch(forward, new_cache, params, list(eos_ids), pad_id, device)
    change = max(1, math.ceil(batch_size * CHANGE_FRACTION))
    taken, n_tokens, start = 0, 0, time.perf_counter()
    bar = tqdm(total=len(rows), unit="sample", desc=desc, disable=not progress)
    try:
        while True:
            waiting, room = len(rows) - taken, batch_size - batch.live
            if waiting and room >= min(change, waiting) and batch.can_admit():
                batch.admit(prompts, rows[taken : taken + room], seeds)
                taken += min(room, waiting)
            elif batch.live and batch.size - batch.live >= max(1, CHANGE_FRACTION * batch.size):
                batch.drop_ended()
            if batch.live == 0:
                break
            for row in batch.sample():
                results[row.prompt][row.k] = row
                n_tokens += len(row.tokens)
                bar.update(1)
                bar.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - start):.1f}", refresh=False)
            if batch.live:
                batch.forward()
    finally:
        bar.close()
    return results  # type: ignore[return-value]
