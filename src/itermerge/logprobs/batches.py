"""Prompt + completion token batches for scoring: right-padded rows, or k completions sharing each prompt."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from itermerge.errors import ItermergeError


@dataclass(frozen=True)
class TokenBatch:
    """Prompt + completion sequences, right-padded.

    input_ids (B, L) long; attention_mask (B, L) long, 1 on real tokens; completion_mask (B, L) bool,
    True at the completion tokens whose log-probability is scored (never position 0).
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.completion_mask.to(device))

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens the forward pass reads."""
        return int(self.attention_mask.sum())


@dataclass(frozen=True)
class GroupedBatch:
    """k completions per prompt, so that each prompt goes through the model once (DPO: k = 2).

    prompt_ids, prompt_mask (P, Lp), right-padded. Completion row r continues prompt r // k:
    completion_ids, completion_attention (P·k, Lc), right-padded; completion_mask (P·k, Lc) bool marks
    the scored completion tokens.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_attention: Tensor
    completion_mask: Tensor

    @property
    def group_size(self) -> int:
        return self.completion_ids.shape[0] // self.prompt_ids.shape[0]

    def to(self, device: torch.device | str) -> GroupedBatch:
        fields = (
            self.prompt_ids,
            self.prompt_mask,
            self.completion_ids,
            self.completion_attention,
            self.completion_mask,
        )
        return GroupedBatch(*(t.to(device) for t in fields))

    @property
    def num_tokens(self) -> int:
        """Real tokens the forward pass reads: each prompt once, every completion."""
        return int(self.prompt_mask.sum() + self.completion_attention.sum())

    def flatten(self) -> TokenBatch:
        """The same rows as one prompt + completion sequence each (for models scored through their forward)."""
        k, width = self.group_size, self.prompt_ids.shape[1] + self.completion_ids.shape[1]
        rows, masks = [], []
        for r in range(self.completion_ids.shape[0]):
            prompt = self.prompt_ids[r // k][self.prompt_mask[r // k].bool()]
            real = self.completion_attention[r].bool()
            rows.append(torch.cat([prompt, self.completion_ids[r][real]]))
            masks.append(torch.cat([torch.zeros_like(prompt, dtype=torch.bool), self.completion_mask[r][real]]))
        input_ids = torch.stack([F.pad(x, (0, width - len(x))) for x in rows])
        attention_mask = torch.stack([F.pad(torch.ones_like(x), (0, width - len(x))) for x in rows])
        completion_mask = torch.stack([F.pad(m, (0, width - len(m))) for m in masks])
        return TokenBatch(input_ids, attention_mask, completion_mask)


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def _scored_length(completion: Sequence[int], eos: set[int]) -> int:
    # Appendix C: "we mask out the end of sentence token in the training". Only a trailing EOS: a
    # truncated completion has none, so it is scored whole.
    return len(completion) - 1 if completion and completion[-1] in eos else len(completion)


def _check_prompts(prompt_ids: Sequence[Sequence[int]], where: str) -> None:
    for i, prompt in enumerate(prompt_ids):
        if not prompt:
            raise ItermergeError(
                f"{where}: prompt {i} is empty; the first completion token needs a context to be scored "
                "(encode the prompt with the chat template)"
            )


def collate(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
    *,
    eos_ids: Iterable[int] = (),
) -> TokenBatch:
    """Concatenate each prompt with its completion and right-pad to the longest.

    Every completion token is scored, except a completion's last token when it is in ``eos_ids``: it
    stays in the input but is not scored (appendix C masks the end-of-sentence token in training).
    """
    if len(prompt_ids) != len(completion_ids):
        raise ItermergeError(
            f"collate: {len(prompt_ids)} prompts but {len(completion_ids)} completions; pass one completion per prompt"
        )
    _check_prompts(prompt_ids, "collate")
    eos = set(eos_ids)
    input_ids, attention_mask = right_pad([[*p, *c] for p, c in zip(prompt_ids, completion_ids)], pad_id)
    completion_mask = torch.zeros(input_ids.shape, dtype=torch.bool)
    for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        completion_mask[i, len(prompt) : len(prompt) + _scored_length(completion, eos)] = True
    return TokenBatch(input_ids, attention_mask, completion_mask)


def collate_grouped(
    prompt_ids: Sequence[Sequence[int]],
    completion_groups: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    *,
    eos_ids: Iterable[int] = (),
) -> GroupedBatch:
    """Prompts and, for each, the same number k of completions (``completion_groups[p]``); EOS as in `collate`."""
    if len(prompt_ids) != len(completion_groups) or len({len(g) for g in completion_groups}) > 1:
        raise ItermergeError(
            f"collate_grouped: {len(prompt_ids)} prompts, completion groups of sizes "
            f"{sorted({len(g) for g in completion_groups})}; pass one group of k completions per prompt"
        )
    _check_prompts(prompt_ids, "collate_grouped")
    eos = set(eos_ids)
    completions = [c for group in completion_groups for c in group]
    prompt, prompt_mask = right_pad(prompt_ids, pad_id)
    ids, attention = right_pad(completions, pad_id)
    completion_mask = torch.zeros(ids.shape, dtype=torch.bool)
    for r, completion in enumerate(completions):
        completion_mask[r, : _scored_length(completion, eos)] = True
    return GroupedBatch(prompt, prompt_mask, ids, attention, completion_mask)
