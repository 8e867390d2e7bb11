"""Autograd functions that spend less memory (or memory traffic) on a DPO step than the modules they stand in for.

All of them are for a training loop that owns ``.grad`` alone (one process, no DDP, DeepSpeed or FSDP
hooks): `CompletionLogprobs` uses them when ``grads_into_weights`` is set, which `train_dpo` does there.
Each gives autograd's gradients up to float rounding (tests/test_dpo.py compares them).

Why (each measured on SmolLM2-135M in docs/benchmarks.md, each behind its own ``dpo`` setting):

- ``dpo.grads_into_weights``: the input embedding and the output layer (``logprobs/into_grad.py``, where the
  log-prob scorer uses them). Autograd builds each one's (V, H) weight gradient afresh per micro-batch (a
  vocabulary-sized buffer, page-faulted in) and then adds it into ``.grad``; there the rows are added (and the
  output-layer product accumulated with ``addmm_``) straight into ``.grad``;
- ``dpo.lean_activations``: SwiGLU (``down(silu(gate) · up)``) and RMSNorm. Autograd keeps silu(gate), the
  product, and the normalised input of every layer until backward (a third of the activations); here only
  gate, up and the norm's input are kept and the rest is recomputed in backward (a few elementwise passes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itermerge.logprobs.structure import at_least_float32


class SwiGLUDown(torch.autograd.Function):
    """``down(silu(gate) · up)`` keeping gate and up only; silu(gate) and the product are recomputed in backward."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, down_weight: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up, down_weight)
        return F.linear(F.silu(gate) * up, down_weight)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gate, up, weight = ctx.saved_tensors
        sigmoid = torch.sigmoid(gate)
        silu = gate * sigmoid
        product = silu * up
        grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).t() @ product.reshape(-1, product.shape[-1])
        del product
        grad_product = grad_out @ weight.to(grad_out.dtype)  # under autocast the forward ran in 16 bits
        grad_up = grad_product * silu
        # d silu / d gate = σ(g)(1 + g(1 − σ(g)))
        grad_gate = grad_product.mul_(up).mul_(sigmoid * (1 + gate * (1 - sigmoid)))
        return grad_gate, grad_up, grad_weight.to(weight.dtype)


class RMSNormLean(torch.autograd.Function):
    """Llama's RMSNorm, ``weight · (x / rms(x))`` (float32 inside; float64 stays float64), keeping x and 1/rms only."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        rstd = torch.rsqrt(at_least_float32(x).pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (at_least_float32(x) * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        x, weight, rstd = ctx.saved_tensors
        normed = at_least_float32(x) * rstd
        grad_weight = (grad_out * normed.to(grad_out.dtype)).reshape(-1, x.shape[-1]).sum(0)
        grad_normed = at_least_float32(grad_out * weight)
        # n = x·r, r = (mean(x²) + ε)^(−1/2): dx = r · (dn − n · mean(dn · n))
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None


# Modules whose forward is exactly the function above (transformers' Llama family); others keep theirs.
_RMSNORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def _swiglu_forward(mlp: nn.Module):
    def forward(x: Tensor) -> Tensor:
        return SwiGLUDown.apply(mlp.gate_proj(x), mlp.up_proj(x), mlp.down_proj.weight)

    return forward


def _rmsnorm_forward(norm: nn.Module):
    def forward(x: Tensor) -> Tensor:
        return RMSNormLean.apply(x, norm.weight, norm.variance_epsilon)

    return forward


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


@contextlib.contextmanager
def lean_modules(model: nn.Module) -> Iterator[int]:
    """Within the block, the model's Llama-family SwiGLU MLPs and RMSNorms run as the functions above.

    Yields how many modules were swapped; their own forwards are back afterwards. Only for a loop that
    owns its parameters alone (see the module doc): the functions read ``down_proj.weight`` and
    ``norm.weight`` directly, past any hook a sharding wrapper puts on those modules.
    """
    swapped = []
    for module in model.modules():
        name = type(module).__name__
        if name in _MLPS and _is_silu(getattr(module, "act_fn", None)) and all(
            type(getattr(module, p, None)) is nn.Linear and getattr(module, p).bias is None
            for p in ("gate_proj", "up_proj", "down_proj")
        ):
            module.forward = _swiglu_forward(module)
        elif name in _RMSNORMS and hasattr(module, "variance_epsilon"):
            module.forward = _rmsnorm_forward(module)
        else:
            continue
        swapped.append(module)
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward  # the instance attribute: the class's forward again
