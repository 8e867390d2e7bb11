"""log π(y|x) of completions under a causal LM: the one place it is computed."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itermerge.errors import ItermergeError

# Config attributes through which a model caps or rescales its logits after the output layer. A model
# that sets one (a scale other than 1) is scored through its own forward, so the transform is never skipped.
_LOGIT_SCALES = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


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


def collate(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
    *,
    eos_ids: Iterable[int] = (),
) -> TokenBatch:
    """Concatenate each prompt with its completion and right-pad to the longest.

    Every completion token is scored, except a completion's last token when it is in ``eos_ids``: it
    stays in the input but is not scored (appendix C: "we mask out the end of sentence token in the
    training"). A truncated completion has no trailing EOS, so nothing of it is masked.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ItermergeError(
            f"collate: {len(prompt_ids)} prompts but {len(completion_ids)} completions; pass one completion per prompt"
        )
    eos = set(eos_ids)
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    width = max(lengths, default=0)
    n = len(prompt_ids)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        if not prompt:
            raise ItermergeError(
                f"collate: prompt {i} is empty; the first completion token needs a context to be scored "
                "(encode the prompt with the chat template)"
            )
        p, c = len(prompt), len(completion)
        input_ids[i, : p + c] = torch.tensor([*prompt, *completion], dtype=torch.long)
        attention_mask[i, : p + c] = 1
        scored = c - 1 if c and completion[-1] in eos else c
        completion_mask[i, p : p + scored] = True
    return TokenBatch(input_ids, attention_mask, completion_mask)


def _scores_from_hidden_states(model: nn.Module) -> bool:
    """Whether log-probs may be computed as output_layer(body(x)) on selected rows only."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        return False
    if any(getattr(text_config, name, None) not in (None, 1.0) for name in _LOGIT_SCALES):
        return False
    body = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    return isinstance(body, nn.Module) and body is not model and get_head is not None and get_head() is not None


class CompletionLogprobs(nn.Module):
    """A module whose forward returns per-token completion log-probs of the wrapped causal LM.

    It exists so that a launcher's wrapper (DDP, DeepSpeed ZeRO-3, FSDP) can wrap the whole
    computation: `accelerator.prepare(CompletionLogprobs(model))` keeps gradient sync and parameter
    gathering working although the body and the output layer are called separately.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.from_hidden_states = _scores_from_hidden_states(model)
        self.accepts_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def forward(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> Tensor:
        """Per-token log π(y_i | x, y_<i): (B, L), zero outside the completion mask."""
        if bool(completion_mask[:, 0].any()):
            raise ItermergeError("completion_mask marks position 0, which has no context; build batches with collate()")
        target_mask = completion_mask[:, 1:]  # (B, L-1): hidden state t predicts token t+1
        targets = input_ids[:, 1:][target_mask]  # (N,)
        if self.from_hidden_states:
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
            # Only the N rows that predict a completion token go through the output layer: no (B, L, V) logits.
            logits = self.model.get_output_embeddings()(hidden[:, :-1][target_mask])  # (N, V)
        else:
            # Ask only for the logits from the first scored position on (`logits_to_keep` keeps the last k).
            scored_columns = target_mask.any(dim=0).nonzero()
            first = int(scored_columns[0]) if len(scored_columns) else target_mask.shape[1]
            keep = input_ids.shape[1] - first
            kwargs = {"logits_to_keep": keep} if self.accepts_logits_to_keep else {}
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
            logits = logits[:, -keep:][:, :-1][target_mask[:, first:]]  # (N, V)
        # cross_entropy fuses log-softmax and the gather; float32 keeps the logsumexp exact under bf16.
        token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
        per_token = token_logps.new_zeros(target_mask.shape).masked_scatter(target_mask, token_logps)  # (B, L-1)
        return F.pad(per_token, (1, 0))  # (B, L)


def token_logprobs(model: nn.Module, batch: TokenBatch) -> Tensor:
    """log π(y_i | x, y_<i) at each scored completion position: (B, L), zeros elsewhere. Differentiable."""
    scorer = model if isinstance(model, CompletionLogprobs) else CompletionLogprobs(model)
    return scorer(batch.input_ids, batch.attention_mask, batch.completion_mask)


def sequence_logprobs(model: nn.Module, batch: TokenBatch) -> Tensor:
    """log π(y|x) = Σ_i log π(y_i | x, y_<i) over the scored completion tokens: (B,). Differentiable."""
    return token_logprobs(model, batch).sum(dim=1)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
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

    Sequences are batched longest first so that a batch holds similar lengths (little padding); the
    scores come back in the input order. ``eos_ids`` as in `collate` (train and reference must agree).
    """
    if batch_size < 1:
        raise ItermergeError(f"score_sequences: batch_size={batch_size}; pass a positive batch size")
    eos_ids = tuple(eos_ids)
    order = sorted(range(len(prompt_ids)), key=lambda i: -(len(prompt_ids[i]) + len(completion_ids[i])))
    scores = [0.0] * len(order)
    device = _device_of(model)
    was_training = model.training
    model.eval()
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="log-probs", unit="batch")
    try:
        for start in starts:
            idx = order[start : start + batch_size]
            batch = collate([prompt_ids[i] for i in idx], [completion_ids[i] for i in idx], pad_id, eos_ids=eos_ids)
            for i, value in zip(idx, sequence_logprobs(model, batch.to(device)).tolist()):
                scores[i] = value
    finally:
        model.train(was_training)
    return scores
