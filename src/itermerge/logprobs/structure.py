"""What a causal LM's structure allows: scoring from hidden states, a KV cache argument, plain embedding and head."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Config attributes through which a model caps or rescales its logits after the output layer. A model
# that sets one (a scale other than 1) is scored through its own forward, so the transform is never skipped.
_LOGIT_SCALES = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


def scores_from_hidden_states(model: nn.Module) -> bool:
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


def cache_argument_name(body: nn.Module) -> str | None:
    """The name under which the body takes a KV cache (`cache` in transformers ≥ 5.2x, else `past_key_values`)."""
    params = inspect.signature(body.forward).parameters
    if "position_ids" not in params:
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def takes_custom_masks(model: nn.Module) -> bool:
    """Whether the attention takes any 4-D additive mask (transformers' sdpa and eager do; flash kernels do not)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) in ("sdpa", "eager")


def checkpointing(model: nn.Module) -> bool:
    # transformers 5 renamed the flag; reading the old name warns.
    name = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    return bool(getattr(model, name, False))


SCORE_ROWS = 512  # scored positions per output-layer block when no gradient is needed


def at_least_float32(t: Tensor) -> Tensor:
    """``t`` in float32 when it is 16-bit (sums and logsumexps stay exact), unchanged in float32 or float64 (a float64
    model, e.g. a reference computation in a test, is never rounded down)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def head_logprobs(head: nn.Module, hidden: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """``completion_logprobs(head(hidden), …)``; without gradients, ``SCORE_ROWS`` rows at a time.

    Why: the (N, V) logits and their log-softmax grow with the batch: θ0's log-probs of 32 pairs of
    1,024-token completions would need 2 × 13 GB at SmolLM2's 49k vocabulary. In blocks they take
    2 × 100 MB, whatever the batch.
    """
    if torch.is_grad_enabled() or len(targets) <= SCORE_ROWS:
        return completion_logprobs(head(hidden), targets, mask)
    token_logps = torch.cat([
        -F.cross_entropy(at_least_float32(head(h)), t, reduction="none")
        for h, t in zip(hidden.split(SCORE_ROWS), targets.split(SCORE_ROWS))
    ])  # fmt: skip
    return token_logps.new_zeros(mask.shape).masked_scatter(mask, token_logps)


def completion_logprobs(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """log-softmax(logits)[target] for the N scored rows, scattered into mask's shape (zeros elsewhere).

    logits (N, V), targets (N,), mask (B, L) bool with N True entries → (B, L).
    """
    # cross_entropy fuses log-softmax and the gather; float32 keeps the logsumexp exact under bf16.
    token_logps = -F.cross_entropy(at_least_float32(logits), targets, reduction="none")  # (N,)
    return token_logps.new_zeros(mask.shape).masked_scatter(mask, token_logps)


def plain_output_layer(model: nn.Module) -> nn.Linear | None:
    """The output layer when it is a bias-free nn.Linear, else None."""
    head = model.get_output_embeddings()
    return head if type(head) is nn.Linear and head.bias is None else None


def plain_output_path(model: nn.Module) -> tuple[nn.Linear, str] | None:
    """(output layer, the body's cache argument) where logits are exactly output_layer(body(x)) — a bias-free
    nn.Linear, no soft-capping or logit scale, a body that takes a KV cache — else None. Decoders that call
    the two halves themselves (the sampler's blocked output layer) need all of it."""
    if not scores_from_hidden_states(model):
        return None
    head, cache_argument = plain_output_layer(model), cache_argument_name(model.base_model)
    return None if head is None or cache_argument is None else (head, cache_argument)


def plain_embedding(model: nn.Module) -> nn.Embedding | None:
    """The input embedding when it is a plain lookup (no max_norm, no frequency scaling), else None."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get is not None else None
    if type(emb) is nn.Embedding and emb.max_norm is None and not emb.scale_grad_by_freq and not emb.sparse:
        return emb
    return None


def vocab_size(model: nn.Module) -> int:
    """Rows of the output layer (what log-probs range over), else ``config.vocab_size``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)
