"""The optimizer of a DPO iteration: appendix C's learning-rate schedule and AdamW, and its flat buffers."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from itermerge.config.dpo import DPOConfig


def scheduled_lr(step: int, total_steps: int, peak_lr: float, warmup_ratio: float, schedule: str = "cosine") -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine/linear decay or constant.

    The warm-up has ceil(warmup_ratio · total_steps) steps and, unlike transformers' schedule, the
    first step does not run at lr 0 (it would waste a step of a short iteration): lr = peak·(s+1)/(w+1).
    """
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return peak_lr * (step + 1) / (warmup + 1)
    if schedule == "constant":
        return peak_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    if schedule == "linear":
        return peak_lr * (1.0 - progress)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # As transformers' Trainer: matrices and embeddings decay; norms and biases (1-D) do not.
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def adamw(model: nn.Module, cfg: DPOConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW with appendix C's settings; the fused kernel where torch has one for the parameters' device.

    Why fused (``dpo.fused_adamw``): one pass over parameters, gradients and moments instead of a dozen per
    tensor (docs/benchmarks.md has the step time). Same update up to float rounding. (DeepSpeed brings its
    own optimizer wrapping, so there the plain implementation is kept.)
    """
    groups = decay_groups(model, cfg.weight_decay)
    kwargs = {"lr": cfg.learning_rate, "betas": cfg.adam_betas, "eps": cfg.adam_eps}
    devices = {p.device.type for group in groups for p in group["params"]}
    if fused and devices <= {"cpu", "cuda"}:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # a dtype or device the fused kernel does not support
            pass
    return torch.optim.AdamW(groups, **kwargs)


def flat_gradients_and_moments(optimizer: torch.optim.Optimizer) -> Tensor | None:
    """Give every parameter its .grad and AdamW moments as views into three flat buffers; returns the gradient one.

    Why: allocated one tensor each (gradients freed and reallocated every step, moments at the first
    step), these 3 × N floats land between activations on the C heap, whose holes glibc keeps resident.
    A flat buffer is one mmap of its own, allocated before any activation and kept for the whole run, so
    the heap holds only short-lived tensors and the DPO peak RSS drops (docs/benchmarks.md). The
    update is bit-identical: AdamW reads its state exactly as if it had initialised it lazily (zeros,
    step 0), and autograd adds each micro-batch's gradient into .grad in place, in the same order.

    Only for a plain torch AdamW whose parameters share one dtype and device (not under DeepSpeed or
    FSDP, which own gradients and optimizer state); returns None otherwise and nothing changes.
    """
    if type(optimizer) is not torch.optim.AdamW or any(g["amsgrad"] for g in optimizer.param_groups):
        return None
    fused = any(g["fused"] for g in optimizer.param_groups)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params or len({(p.dtype, p.device) for p in params}) > 1 or not all(p.is_contiguous() for p in params):
        return None
    numel = sum(p.numel() for p in params)
    kwargs = {"dtype": params[0].dtype, "device": params[0].device}
    grads, exp_avg, exp_avg_sq = (torch.zeros(numel, **kwargs) for _ in range(3))
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32  # as torch.optim
    offset = 0
    for p in params:
        view = slice(offset, offset + p.numel())
        p.grad = grads[view].view_as(p)
        optimizer.state[p] = {
            # as AdamW's lazy initialisation: the fused kernel keeps the step count on the parameters' device
            "step": torch.zeros((), dtype=step_dtype, device=p.device)
            if fused
            else torch.tensor(0.0, dtype=step_dtype),
            "exp_avg": exp_avg[view].view_as(p),
            "exp_avg_sq": exp_avg_sq[view].view_as(p),
        }
        offset += p.numel()
    return grads
