"""log π(y|x) of completions under a causal LM: the one place it is computed."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itermerge.errors import ItermergeError
from itermerge.lean_autograd import EmbeddingIntoGrad, OutputLayerIntoGrad

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
        fields = (self.prompt_ids, self.prompt_mask, self.completion_ids, self.completion_attention, self.completion_mask)
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


def _right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
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
    input_ids, attention_mask = _right_pad([[*p, *c] for p, c in zip(prompt_ids, completion_ids)], pad_id)
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
    prompt, prompt_mask = _right_pad(prompt_ids, pad_id)
    ids, attention = _right_pad(completions, pad_id)
    completion_mask = torch.zeros(ids.shape, dtype=torch.bool)
    for r, completion in enumerate(completions):
        completion_mask[r, : _scored_length(completion, eos)] = True
    return GroupedBatch(prompt, prompt_mask, ids, attention, completion_mask)


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


def _cache_argument(body: nn.Module) -> str | None:
    """The name under which the body takes a KV cache (`cache` in transformers ≥ 5.2x, else `past_key_values`)."""
    params = inspect.signature(body.forward).parameters
    if "position_ids" not in params:
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _takes_custom_masks(model: nn.Module) -> bool:
    """Whether the attention takes an arbitrary 4-D additive mask (transformers' sdpa and eager do; flash kernels do not)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) in ("sdpa", "eager")


def _checkpointing(model: nn.Module) -> bool:
    # transformers 5 renamed the flag; reading the old name warns.
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


SCORE_ROWS = 512  # scored positions per output-layer block when no gradient is needed


def _head_logprobs(head: nn.Module, hidden: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """``_completion_logprobs(head(hidden), …)``; without gradients, ``SCORE_ROWS`` rows at a time.

    Why: the (N, V) logits and their log-softmax grow with the batch: θ0's log-probs of 32 pairs of
    1,024-token completions would need 2 × 13 GB at SmolLM2's 49k vocabulary. In blocks they take
    2 × 100 MB, whatever the batch.
    """
    if torch.is_grad_enabled() or len(targets) <= SCORE_ROWS:
        return _completion_logprobs(head(hidden), targets, mask)
    token_logps = torch.cat([
        -F.cross_entropy(head(h).float(), t, reduction="none")
        for h, t in zip(hidden.split(SCORE_ROWS), targets.split(SCORE_ROWS))
    ])  # fmt: skip
    return token_logps.new_zeros(mask.shape).masked_scatter(mask, token_logps)


def _completion_logprobs(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """log-softmax(logits)[target] for the N scored rows, scattered into mask's shape (zeros elsewhere).

    logits (N, V), targets (N,), mask (B, L) bool with N True entries → (B, L).
    """
    # cross_entropy fuses log-softmax and the gather; float32 keeps the logsumexp exact under bf16.
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
    return token_logps.new_zeros(mask.shape).masked_scatter(mask, token_logps)


def _plain_output_layer(model: nn.Module) -> nn.Linear | None:
    """The output layer when it is a bias-free nn.Linear, else None."""
    head = model.get_output_embeddings()
    return head if type(head) is nn.Linear and head.bias is None else None


def plain_output_path(model: nn.Module) -> tuple[nn.Linear, str] | None:
    """(output layer, the body's cache argument) where logits are exactly output_layer(body(x)) — a bias-free
    nn.Linear, no soft-capping or logit scale, a body that takes a KV cache — else None. Decoders that call
    the two halves themselves (the sampler's blocked output layer) need all of it."""
    if not _scores_from_hidden_states(model):
        return None
    head, cache_argument = _plain_output_layer(model), _cache_argument(model.base_model)
    return None if head is None or cache_argument is None else (head, cache_argument)


def _plain_embedding(model: nn.Module) -> nn.Embedding | None:
    """The input embedding when it is a plain lookup (no max_norm, no frequency scaling), else None."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get is not None else None
    if type(emb) is nn.Embedding and emb.max_norm is None and not emb.scale_grad_by_freq and not emb.sparse:
        return emb
    return None


class CompletionLogprobs(nn.Module):
    """A module whose forward returns per-token completion log-probs of the wrapped causal LM.

    It exists so that a launcher's wrapper (DDP, DeepSpeed ZeRO-3, FSDP) can wrap the whole
    computation: `accelerator.prepare(CompletionLogprobs(model))` keeps gradient sync and parameter
    gathering working although the body and the output layer are called separately.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)  # DeepSpeed's "auto" bucket sizes are read from model.config.hidden_size
        self.from_hidden_states = _scores_from_hidden_states(model)
        self.accepts_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.cache_argument = _cache_argument(model.base_model) if self.from_hidden_states else None
        # Packing needs what the cache path needs (position ids) plus a custom attention mask.
        self.packs_groups = self.cache_argument is not None and _takes_custom_masks(model)
        # Set by a training loop that owns .grad alone (see itermerge.lean_autograd).
        self.grads_into_weights = False

    def forward(self, batch: TokenBatch | GroupedBatch) -> Tensor:
        """Per-token log π(y_i | x, y_<i), zero outside the completion mask: (B, L) for a TokenBatch,
        (P·k, Lc) (aligned with completion_ids) for a GroupedBatch."""
        if isinstance(batch, TokenBatch):
            return self._flat(batch)
        # With gradients, the cache path runs every weight twice (prompt, completions), and autograd then
        # holds the completions' weight gradients (a model-sized buffer) until the prompt's backward; one
        # packed forward uses each weight once. Without gradients the cache path does less attention work.
        if self.packs_groups and torch.is_grad_enabled():
            return self._packed(batch)
        # Gradient checkpointing recomputes layers without a cache, so grouped prompts need a plain forward.
        if self.cache_argument is None or _checkpointing(self.model):
            flat = batch.flatten().to(batch.completion_ids.device)
            out = self._flat(flat)  # (P·k, Lp + Lc)
            # Move each row's scores back to completion coordinates.
            starts = batch.prompt_mask.sum(1).repeat_interleave(batch.group_size)
            index = starts[:, None] + torch.arange(batch.completion_ids.shape[1], device=out.device)
            return out.gather(1, index.clamp(max=out.shape[1] - 1)) * batch.completion_mask
        return self._grouped(batch)

    def _flat(self, batch: TokenBatch) -> Tensor:
        if bool(batch.completion_mask[:, 0].any()):
            raise ItermergeError("completion_mask marks position 0, which has no context; build batches with collate()")
        input_ids, attention_mask = batch.input_ids, batch.attention_mask
        target_mask = batch.completion_mask[:, 1:]  # (B, L-1): hidden state t predicts token t+1
        targets = input_ids[:, 1:][target_mask]  # (N,)
        if self.from_hidden_states:
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
            # Only the N rows that predict a completion token go through the output layer: no (B, L, V) logits.
            head, rows = self.model.get_output_embeddings(), hidden[:, :-1][target_mask]  # (N, H)
            return F.pad(_head_logprobs(head, rows, targets, target_mask), (1, 0))  # (B, L)
        else:
            # Ask only for the logits from the first scored position on (`logits_to_keep` keeps the last k).
            scored_columns = target_mask.any(dim=0).nonzero()
            first = int(scored_columns[0]) if len(scored_columns) else target_mask.shape[1]
            keep = input_ids.shape[1] - first
            kwargs = {"logits_to_keep": keep} if self.accepts_logits_to_keep else {}
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
            logits = logits[:, -keep:][:, :-1][target_mask[:, first:]]  # (N, V)
        return F.pad(_completion_logprobs(logits, targets, target_mask), (1, 0))  # (B, L)

    def _packed(self, batch: GroupedBatch) -> Tensor:
        """Each prompt and its k completions in one row, [prompt | completion 1 | … | completion k], each part
        padded to its batch width; the mask lets a completion see its prompt and its own earlier tokens only,
        and positions continue from the real prompt length, so every token is computed as in its own sequence."""
        k, (num_prompts, prompt_width), width = batch.group_size, batch.prompt_ids.shape, batch.completion_ids.shape[1]
        device = batch.prompt_ids.device
        prompt_len = batch.prompt_mask.sum(dim=1)  # (P,)
        steps = torch.arange(width, device=device)
        input_ids = torch.cat([batch.prompt_ids, batch.completion_ids.reshape(num_prompts, k * width)], dim=1)
        real = torch.cat([batch.prompt_mask, batch.completion_attention.reshape(num_prompts, k * width)], dim=1).bool()
        positions = torch.cat(
            [
                torch.arange(prompt_width, device=device).expand(num_prompts, prompt_width),
                (prompt_len[:, None, None] + steps).expand(num_prompts, k, width).reshape(num_prompts, k * width),
            ],
            dim=1,
        )  # (P, L)
        # part 0 = the prompt, part j = completion j; a query sees earlier real keys of the prompt or of its own part.
        part = torch.cat([steps.new_zeros(prompt_width), torch.arange(1, k + 1, device=device).repeat_interleave(width)])
        index = torch.arange(len(part), device=device)
        allowed = (index[None, :] <= index[:, None]) & ((part[None, :] == 0) | (part[None, :] == part[:, None]))
        allowed = (allowed & real[:, None, :]) | torch.eye(len(part), dtype=torch.bool, device=device)  # pads see themselves
        head = self.model.get_output_embeddings()
        dtype = head.weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
        into_grad = self.grads_into_weights and torch.is_grad_enabled()
        embedding = _plain_embedding(self.model) if into_grad else None
        if embedding is not None and embedding.weight.requires_grad:
            tokens = {"inputs_embeds": EmbeddingIntoGrad.apply(input_ids, embedding.weight, embedding.padding_idx)}
        else:
            tokens = {"input_ids": input_ids}
        hidden = self.model.base_model(
            **tokens, attention_mask=mask[:, None], position_ids=positions, use_cache=False
        )[0]  # (P, L, H)
        # Completion j's token t is predicted by its token t-1, its first token by the prompt's last real token.
        rows = torch.arange(num_prompts, device=device).repeat_interleave(k)[:, None].expand(-1, width)  # (P·k, Lc)
        columns = prompt_width + torch.arange(k, device=device).repeat(num_prompts)[:, None] * width + steps - 1
        columns = torch.where(steps == 0, prompt_len.repeat_interleave(k)[:, None] - 1, columns)
        scored = batch.completion_mask
        predicting = hidden[rows[scored], columns[scored]]  # (N, H)
        output = _plain_output_layer(self.model) if into_grad else None
        if output is not None and output.weight.requires_grad:
            logits = OutputLayerIntoGrad.apply(predicting, output.weight)  # (N, V)
        else:
            logits = head(predicting)
        return _completion_logprobs(logits, batch.completion_ids[scored], scored)

    def _grouped(self, batch: GroupedBatch) -> Tensor:
        """Each prompt once, its KV cache repeated for its k completions; positions as in one sequence."""
        body, k = self.model.base_model, batch.group_size
        prompt_len = batch.prompt_mask.sum(dim=1)  # (P,)
        out = body(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask, use_cache=True)
        cache = out[1]  # (P, heads, Lp, d) per layer
        cache.batch_repeat_interleave(k)  # (P·k, ...): out of place, so gradients reach the prompt
        # Hidden state of each prompt's last real token: it predicts the completion's first token.
        last = out[0][torch.arange(len(prompt_len), device=prompt_len.device), prompt_len - 1]  # (P, H)
        positions = prompt_len.repeat_interleave(k)[:, None] + torch.arange(
            batch.completion_ids.shape[1], device=prompt_len.device
        )  # (P·k, Lc): the completion continues right after the real prompt tokens
        hidden = body(
            input_ids=batch.completion_ids,
            attention_mask=torch.cat([batch.prompt_mask.repeat_interleave(k, dim=0), batch.completion_attention], dim=1),
            position_ids=positions,
            use_cache=True,
            **{self.cache_argument: cache},
        )[0]  # (P·k, Lc, H)
        predicting = torch.cat([last.repeat_interleave(k, dim=0)[:, None], hidden[:, :-1]], dim=1)  # (P·k, Lc, H)
        mask = batch.completion_mask
        return _head_logprobs(self.model.get_output_embeddings(), predicting[mask], batch.completion_ids[mask], mask)


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
    """Sums of log-probs, ``group_size`` per item; items batched longest first (little padding), returned in input order."""
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
