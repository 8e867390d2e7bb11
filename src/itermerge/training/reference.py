"""Preference pairs as training sees them, and θ0's log-probs of them, computed once (Alg. 1: π_ref = θ0)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from itermerge.config.dpo import DPOConfig
from itermerge.errors import ItermergeError
from itermerge.logprobs import score_grouped
from itermerge.tokenization import stop_token_ids

if TYPE_CHECKING:
    from itermerge.records import PreferencePair


def truncate_pair(
    prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int], max_length: int, max_prompt_length: int
) -> tuple[list[int], list[int], list[int]]:
    """Fit prompt + the longer completion into ``max_length`` tokens.

    First the prompt keeps its last ``max_prompt_length`` tokens (the generation prompt sits at its end),
    then both completions keep their first tokens; a cut completion loses its EOS, so it is fully scored.
    """
    prompt, chosen, rejected = list(prompt), list(chosen), list(rejected)
    if len(prompt) + max(len(chosen), len(rejected)) > max_length:
        prompt = prompt[-max_prompt_length:]
    budget = max_length - len(prompt)
    return prompt, chosen[:budget], rejected[:budget]


@dataclass(frozen=True)
class PairTokens:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref_chosen: float
    ref_rejected: float

    @property
    def num_tokens(self) -> int:
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


def pair_tokens(pair: PreferencePair, index: int, cfg: DPOConfig) -> PairTokens:
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        if not getattr(pair, name):
            raise ItermergeError(f"pair {index} (prompt_id {pair.prompt_id!r}): {name} is empty; re-run pair selection")
    prompt, chosen, rejected = truncate_pair(
        pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, cfg.max_length, cfg.max_prompt_length
    )
    ref = (pair.ref_chosen_logp, pair.ref_rejected_logp)
    return PairTokens(prompt, chosen, rejected, *(math.nan if r is None else float(r) for r in ref))


def masked_eos_ids(model: nn.Module, cfg: DPOConfig) -> tuple[int, ...]:
    """The ids whose final occurrence is not scored when appendix C's EOS masking is on (else none): the ids the
    model stops on (``tokenization.stop_token_ids``), so training, the reference and the samplers agree."""
    return stop_token_ids(model, required=False) if cfg.mask_eos else ()


def model_pad_id(model: nn.Module) -> int:
    # Padding is masked out everywhere, so any valid id does; the config's keeps batches readable.
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return 0 if pad is None else int(pad)


def add_reference_logprobs(
    reference_model: nn.Module,
    pairs: Sequence[PreferencePair],
    cfg: DPOConfig,
    batch_size: int = 16,
    progress: bool = True,
) -> list[PreferencePair]:
    """Pairs with ref_chosen_logp / ref_rejected_logp = log π_θ0(y|x), computed once (Alg. 1: π_ref = θ0).

    ``batch_size`` counts pairs (2 sequences each, the prompt run once).

    The tokens scored are exactly those `train_dpo` scores (same truncation, same EOS masking), so the
    log-ratios of eq. (4) compare like with like. Pass θ0 itself under the paper's ``dpo.reference = fixed``;
    θ_{t-1} (the iteration's start) only for the other reference policies (iteration.reference_path).
    """
    tokens = [pair_tokens(pair, i, cfg) for i, pair in enumerate(pairs)]
    scores = score_grouped(
        reference_model, [t.prompt for t in tokens], [[t.chosen, t.rejected] for t in tokens],
        model_pad_id(reference_model), batch_size, progress, eos_ids=masked_eos_ids(reference_model, cfg),
    )  # fmt: skip
    return [
        dataclasses.replace(pair, ref_chosen_logp=chosen, ref_rejected_logp=rejected)
        for pair, (chosen, rejected) in zip(pairs, scores)
    ]
