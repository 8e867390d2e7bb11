"""``CompletionLogprobs``: per-token log π(y_i | x, y_<i) of a causal LM as one module a launcher can wrap."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itermerge.errors import ItermergeError
from itermerge.logprobs.batches import GroupedBatch, TokenBatch
from itermerge.logprobs.into_grad import EmbeddingIntoGrad, OutputLayerIntoGrad
from itermerge.logprobs.structure import (
    cache_argument_name,
    checkpointing,
    completion_logprobs,
    head_logprobs,
    plain_embedding,
    plain_output_layer,
    scores_from_hidden_states,
    takes_custom_masks,
)


class CompletionLogprobs(nn.Module):
    """A module whose forward returns per-token completion log-probs of the wrapped causal LM.

    It exists so that a launcher's wrapper (DDP, DeepSpeed ZeRO-3, FSDP) can wrap the whole
    computation: `accelerator.prepare(CompletionLogprobs(model))` keeps gradient sync and parameter
    gathering working although the body and the output layer are called separately.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = getattr(
            model, "config", None
        )  # DeepSpeed's "auto" bucket sizes are read from model.config.hidden_size
        self.from_hidden_states = scores_from_hidden_states(model)
        self.accepts_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.cache_argument = cache_argument_name(model.base_model) if self.from_hidden_states else None
        # Packing needs what the cache path needs (position ids) plus a custom attention mask.
        self.packs_groups = self.cache_argument is not None and takes_custom_masks(model)
        # Set by a training loop that owns .grad alone (see itermerge.logprobs.into_grad).
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
        if self.cache_argument is None or checkpointing(self.model):
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
            return F.pad(head_logprobs(head, rows, targets, target_mask), (1, 0))  # (B, L)
        else:
            # Ask only for the logits from the first scored position on (`logits_to_keep` keeps the last k).
            scored_columns = target_mask.any(dim=0).nonzero()
            first = int(scored_columns[0]) if len(scored_columns) else target_mask.shape[1]
            keep = input_ids.shape[1] - first
            kwargs = {"logits_to_keep": keep} if self.accepts_logits_to_keep else {}
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
            logits = logits[:, -keep:][:, :-1][target_mask[:, first:]]  # (N, V)
        return F.pad(completion_logprobs(logits, targets, target_mask), (1, 0))  # (B, L)

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
        part = torch.cat(
            [steps.new_zeros(prompt_width), torch.arange(1, k + 1, device=device).repeat_interleave(width)]
        )
        index = torch.arange(len(part), device=device)
        allowed = (index[None, :] <= index[:, None]) & ((part[None, :] == 0) | (part[None, :] == part[:, None]))
        allowed = (allowed & real[:, None, :]) | torch.eye(
            len(part), dtype=torch.bool, device=device
        )  # pads see themselves
        head = self.model.get_output_embeddings()
        dtype = head.weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
        into_grad = self.grads_into_weights and torch.is_grad_enabled()
        embedding = plain_embedding(self.model) if into_grad else None
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
        output = plain_output_layer(self.model) if into_grad else None
        if output is not None and output.weight.requires_grad:
            logits = OutputLayerIntoGrad.apply(predicting, output.weight)  # (N, V)
        else:
            logits = head(predicting)
        return completion_logprobs(logits, batch.completion_ids[scored], scored)

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
            attention_mask=torch.cat(
                [batch.prompt_mask.repeat_interleave(k, dim=0), batch.completion_attention], dim=1
            ),
            position_ids=positions,
            use_cache=True,
            **{self.cache_argument: cache},
        )[0]  # (P·k, Lc, H)
        predicting = torch.cat([last.repeat_interleave(k, dim=0)[:, None], hidden[:, :-1]], dim=1)  # (P·k, Lc, H)
        mask = batch.completion_mask
        return head_logprobs(self.model.get_output_embeddings(), predicting[mask], batch.completion_ids[mask], mask)
