"""The embedding and the output layer with a backward that writes their weight gradients straight into ``.grad``
(``CompletionLogprobs.grads_into_weights``): no zero-filled dense (V, H) gradient per micro-batch, no second
model-sized matmul result. Only for a loop that owns its parameters' ``.grad`` alone (one process, no sharding
wrapper); ``training/lean_autograd.py`` holds the rest of the memory-saving backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class EmbeddingIntoGrad(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose backward adds the looked-up rows' gradients into ``weight.grad``."""

    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, padding_idx: int | None) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = weight, padding_idx
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[None, None, None]:
        (ids,) = ctx.saved_tensors
        weight, ids, rows = ctx.weight, ids.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.padding_idx is not None:  # as nn.Embedding: the padding row gets no gradient
            keep = ids != ctx.padding_idx
            ids, rows = ids[keep], rows[keep]
        _grad_of(weight).index_add_(0, ids, rows.to(weight.dtype))
        return None, None, None


class OutputLayerIntoGrad(torch.autograd.Function):
    """``hidden @ weight.T`` whose backward accumulates ``grad_logits.T @ hidden`` into ``weight.grad``."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(hidden)
        ctx.weight = weight
        return hidden @ weight.t()

    @staticmethod
    def backward(ctx, grad_logits: Tensor) -> tuple[Tensor, None]:
        (hidden,) = ctx.saved_tensors
        weight = ctx.weight
        _grad_of(weight).addmm_(grad_logits.t().to(weight.dtype), hidden.to(weight.dtype))
        return grad_logits @ weight.to(grad_logits.dtype), None


def _grad_of(weight: Tensor) -> Tensor:
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    return weight.grad
