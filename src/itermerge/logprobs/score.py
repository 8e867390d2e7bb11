"""log π(y|x) of many completions without gradients, batched by length: what the reference and the studies use."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from itermerge.errors import ItermergeError
from itermerge.logprobs.batches import GroupedBatch, TokenBatch, collate, collate_grouped
from itermerge.logprobs.forward import CompletionLogprobs


def token_logprobs(model: nn.Module, batch: TokenBatch | GroupedBatch) -> Tensor:
    """log π(y_i | x, y_<i) at each scored completion position, zeros elsewhere. Differentiable.

    (B, L) for a TokenBatch; (P·k, Lc), aligned with ``completion_ids``, for a GroupedBatch.
    """
    scorer = model if isinstance(model, CompletionLogprobs) else CompletionLogprobs(model)
    return scorer(batch)


def sequence_logprobs(model: nn.Module, batch: TokenBatch | GroupedBatch) -> Tensor:
    """log π(y|x) = Σ_i log π(y_i | x, y_<i) over the scored completion tokens: (B,) or (P·k,). Differentiable."""
    return token_logprobs(model, batch).sum(dim=1)


@torch.no_grad()
def _score_in_batches(
    model: nn.Module, lengths: list[int], make_batch, batch_size: int, progress: bool, group_size: int = 1
) -> list[list[float]]:
    """Sums of log-probs, ``group_size`` per item; batched longest first (little padding), returned in input order."""
    if batch_size < 1:
        raise ItermergeError(f"score_sequences: batch_size={batch_size}; pass a positive batch size")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    scores: list[list[float]] = [[] for _ in order]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="log-probs", unit="batch")
    try:
        for start in starts:
            idx = order[start : start + batch_size]
            values = sequence_logprobs(model, make_batch(idx).to(device)).view(len(idx), group_size)
            for i, row in zip(idx, values.tolist()):
                scores[i] = row
    finally:
        model.train(was_training)
    return scores


def score_sequences(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 16,
    progress: bool = False,
    *,
    eos_ids: Iterable[int] = (),
) -> list[float]:
    """log π(y|x) for many (prompt, completion) pairs, in their order, without gradients.

    Batched by length; ``eos_ids`` as in `collate` (training and reference must agree).
    """
    eos_ids = tuple(eos_ids)
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]

    def make_batch(idx: list[int]) -> TokenBatch:
        return collate([prompt_ids[i] for i in idx], [completion_ids[i] for i in idx], pad_id, eos_ids=eos_ids)

    return [row[0] for row in _score_in_batches(model, lengths, make_batch, batch_size, progress)]


def score_grouped(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_groups: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    batch_size: int = 16,
    progress: bool = False,
    *,
    eos_ids: Iterable[int] = (),
) -> list[list[float]]:
    """`score_sequences` for k completions per prompt, each prompt run once; ``batch_size`` counts prompts."""
    eos_ids = tuple(eos_ids)
    lengths = [len(p) + max(map(len, g), default=0) for p, g in zip(prompt_ids, completion_groups)]
    k = len(completion_groups[0]) if completion_groups else 0

    def make_batch(idx: list[int]) -> GroupedBatch:
        prompts, groups = [prompt_ids[i] for i in idx], [completion_groups[i] for i in idx]
        return collate_grouped(prompts, groups, pad_id, eos_ids=eos_ids)

    return _score_in_batches(model, lengths, make_batch, batch_size, progress, group_size=k)
