"""Log-probs of given completions under the per-token ensemble of eq. (6), and each model's full next-token law."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from itermerge.errors import ItermergeError
from itermerge.logprobs.batches import collate
from itermerge.logprobs.structure import vocab_size
from itermerge.maths.ensemble import mix_logprobs


def live_members(models: Sequence[nn.Module], coeffs: Sequence[float]) -> tuple[list[nn.Module], list[float]]:
    """The models with c_m ≠ 0 and their coefficients, after checking that they can be mixed."""
    if len(models) != len(coeffs):
        raise ItermergeError(
            f"{len(coeffs)} ensemble coefficients for {len(models)} models; give one per model, θ0 first "
            "(ensemble_coefficients(k) turns k_1..k_T into the T+1 coefficients)"
        )
    if not models:
        raise ItermergeError("the ensemble has no models; pass θ0, θ1, …, θT")
    if not all(math.isfinite(c) for c in coeffs):
        raise ItermergeError(f"ensemble coefficients {list(coeffs)}: every coefficient must be finite")
    vocab = [vocab_size(m) for m in models]
    if len(set(vocab)) > 1:
        raise ItermergeError(
            f"ensemble models have vocabularies of sizes {vocab}; log-probs can only be mixed over one tokenizer — "
            "use checkpoints fine-tuned from the same θ0"
        )
    devices = {next(m.parameters()).device for m in models}
    if len(devices) > 1:
        raise ItermergeError(f"ensemble models are on devices {sorted(map(str, devices))}; load them all on one device")
    live = [(m, float(c)) for m, c in zip(models, coeffs) if c != 0.0]
    if not live:
        raise ItermergeError(f"ensemble coefficients {list(coeffs)} are all 0; at least one model must have weight")
    return [m for m, _ in live], [c for _, c in live]


def next_token_logprobs(model: nn.Module, batch) -> Tensor:
    """log π(· | x, y_<i) over the whole vocabulary at each scored completion position: (N, V), N = scored tokens."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return logits[:, :-1][batch.completion_mask[:, 1:]].float().log_softmax(-1)  # (N, V)


def scoring_batches(prompt_ids, completion_ids, pad_id: int, batch_size: int, device):
    """(indices, batch, targets) in batches of similar length; every completion token is scored (EOS too)."""
    order = sorted(range(len(prompt_ids)), key=lambda i: -(len(prompt_ids[i]) + len(completion_ids[i])))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([prompt_ids[i] for i in idx], [completion_ids[i] for i in idx], pad_id).to(device)
        yield idx, batch, batch.input_ids[:, 1:][batch.completion_mask[:, 1:]]  # targets (N,)


@torch.no_grad()
def ensemble_token_logprobs(
    models: Sequence[nn.Module], coeffs: Sequence[float], prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8,
) -> list[list[float]]:
    """log π*(y_i | x, y_<i) of each token of each given completion under the per-token ensemble, in input order."""
    members, live = live_members(models, coeffs)
    out: list[list[float]] = [[] for _ in prompt_ids]
    for idx, batch, targets in scoring_batches(
        prompt_ids, completion_ids, pad_id, batch_size, next(members[0].parameters()).device
    ):
        mixed = mix_logprobs([next_token_logprobs(m, batch) for m in members], live)  # (N, V)
        values = mixed.gather(1, targets[:, None]).squeeze(1).tolist()
        for i in idx:  # rows come in batch order, each sequence's tokens consecutively
            n = len(completion_ids[i])
            out[i], values = values[:n], values[n:]
    return out
