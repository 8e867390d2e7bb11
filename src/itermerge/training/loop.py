"""θ_t = argmin_θ L(θ; D_t) from θ_{t−1} (Alg. 1): the DPO loop on accelerate (DDP, ZeRO-3 from the launcher)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from itermerge.config.dpo import DPOConfig
from itermerge.errors import ItermergeError
from itermerge.logprobs import CompletionLogprobs, collate_grouped
from itermerge.logprobs.structure import at_least_float32
from itermerge.maths.dpo import dpo_loss
from itermerge.training.distributed import (
    gather_full_weights,
    set_deepspeed_batch,
    set_float32_masters,
    sharded_parameters,
)
from itermerge.training.lean_autograd import lean_modules
from itermerge.training.metrics import run_metrics, step_metrics
from itermerge.training.moving_reference import MovingReference, check_reference_supported
from itermerge.training.optim import adamw, flat_gradients_and_moments, scheduled_lr
from itermerge.training.reference import PairTokens, masked_eos_ids, model_pad_id, pair_tokens

if TYPE_CHECKING:
    from accelerate import Accelerator

    from itermerge.records import PreferencePair


def _global_batches(num_pairs: int, cfg: DPOConfig) -> list[list[int]]:
    """Pair indices of each optimizer step: a seeded shuffle per epoch, cut into global batches (last may be short)."""
    batches = []
    for epoch in range(cfg.epochs):
        order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        batches += [order[i : i + cfg.global_batch_size] for i in range(0, num_pairs, cfg.global_batch_size)]
    return batches


def _micro_batches(
    batch: list[int], rank: int, processes: int, accumulation: int, micro: int
) -> list[tuple[list[int], float]]:
    """This process's micro-batches of one global batch, as (pair indices, weight).

    Slot j = k·processes + rank holds pairs [j·micro, (j+1)·micro) of the batch. A short last batch
    can leave a slot empty; it then runs the batch's first pair with weight 0, so every process still
    does the same number of forward/backward passes (DDP's collectives need it).
    """
    slots = []
    for k in range(accumulation):
        j = k * processes + rank
        indices = batch[j * micro : (j + 1) * micro]
        slots.append((indices, 1.0) if indices else (batch[:1], 0.0))
    return slots


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    # transformers 5 renamed gradient checkpointing to activation checkpointing; the old names warn.
    name = "activation_checkpointing" if hasattr(model, "activation_checkpointing_enable") else "gradient_checkpointing"
    getattr(model, f"{name}_{'enable' if on else 'disable'}")()


def _pair_losses(
    scorer: nn.Module, pairs: list[PairTokens], pad_id: int, eos_ids: tuple[int, ...], beta: float,
    device: torch.device, reference: MovingReference | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO losses and rewards of m pairs, (m,) each: chosen and rejected in one forward, the prompt run once."""
    inputs = collate_grouped(
        [p.prompt for p in pairs], [[p.chosen, p.rejected] for p in pairs], pad_id, eos_ids=eos_ids
    ).to(device)
    logps = at_least_float32(scorer(inputs).sum(dim=1))  # (2m,): chosen, rejected of pair 0, then of pair 1, …
    moved = reference and reference.logprobs(inputs)  # None while the pairs' stored log-probs are the reference's
    if moved is None:
        ref = torch.tensor([[p.ref_chosen, p.ref_rejected] for p in pairs], dtype=logps.dtype, device=logps.device)
    else:
        ref = at_least_float32(moved.sum(dim=1)).to(logps.dtype).view(-1, 2)  # (m, 2)
    return dpo_loss(logps[0::2], logps[1::2], ref[:, 0], ref[:, 1], beta)


def _float32_master_weights(model: nn.Module, accelerator: Accelerator) -> torch.dtype | None:
    """Upcast 16-bit trainable weights to float32 in place; returns the 16-bit dtype to compute in, or None.

    Why: at DPO learning rates (5e-7) an AdamW step moves a weight by ~lr, far below half a bfloat16
    ulp (~6e-5 for a weight of 0.02), so 16-bit weights round every update away: on a tiny Llama in
    bfloat16, 99 % of the weights never changed. As mixed-precision training does, the weights train in
    float32 and the forward runs under autocast in the 16-bit dtype. DeepSpeed keeps float32 master
    weights itself (its bf16/fp16 modes), so there nothing changes.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return None
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    low = dtypes & {torch.bfloat16, torch.float16}
    if not low:
        return None
    model.float()
    return torch.bfloat16 if torch.bfloat16 in low else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@dataclass
class _Recipe:
    """What the setup steps of `train_dpo` build and every optimizer step uses."""

    accelerator: Accelerator
    accumulation: int
    compute_dtype: torch.dtype | None
    scorer: nn.Module
    optimizer: Any
    flat_grads: Tensor | None
    reference: MovingReference
    pad_id: int
    eos_ids: tuple[int, ...]
    speed: dict[str, bool]  # the speed settings that actually ran (a setting can be on and not apply)


def train_dpo(
    model: nn.Module,
    pairs: Sequence[PreferencePair],
    cfg: DPOConfig,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    *,
    state_dict: dict[str, Tensor] | None = None,
    compute_dtype: torch.dtype | None = None,
    master_weights_from: str | Path | None = None,
    label: str = "",
) -> dict[str, Any]:
    """θ_t = argmin_θ L(θ; D_t) from the model's current weights (Alg. 1), trained in place; returns metrics.

    A step whose gradient norm or loss is not finite stops training with a named error (``label`` says which
    iteration), before the optimizer applies it.

    The reference log-probs are read from the pairs (θ0's for ``dpo.reference = fixed``, see `add_reference_logprobs`;
    the starting policy θ_{t−1}'s for the other policies), so for fixed and previous only the policy is in memory;
    soft and hard keep the reference's copy of the trainable weights and score the pairs under it once it has moved
    (training/moving_reference.py). A model in bfloat16/float16 trains as float32 master weights under autocast and
    is left in float32 (rounding back to 16 bits would undo most DPO updates); DeepSpeed keeps its own.
    Under `accelerate launch` (DDP, DeepSpeed) every process passes all pairs; each takes its slots of
    every global batch, and the result matches one process with the same global batch.
    The accelerator's prepared objects are released at the end. The metrics record the reference of every step
    (``history[i]["reference"]``) and which speed settings ran (``speed_settings``).

    ``compute_dtype``: run the forward under autocast in this dtype (e.g. bfloat16 on a GPU, with float32
    weights); by default a 16-bit model's own dtype, else none.

    ``master_weights_from``: the checkpoint directory the model was read from. Under DeepSpeed its float32
    tensors become the float32 master weights (DeepSpeed makes them from the 16-bit model, so a float32
    θ_{t−1} would lose every update smaller than half a bfloat16 ulp, i.e. most of iteration t−1's).

    ``state_dict``: where the weights are sharded across processes (DeepSpeed ZeRO-3, FSDP), the trained
    weights are gathered into it before the release (every process takes part; the main process receives
    them, keyed as ``model.state_dict()``), to save with ``save_pretrained(dir, state_dict=...)``. It stays
    empty on one process and under DDP, where ``model`` itself holds the trained weights.
    """
    from accelerate import Accelerator

    start = time.perf_counter()
    tokens = _setup_data(pairs, cfg)
    accelerator = accelerator or Accelerator()
    accumulation = _setup_accelerator(accelerator, cfg)
    batches = _global_batches(len(pairs), cfg)
    was_training = model.training
    lean, recipe = contextlib.ExitStack(), None
    try:
        recipe = _setup_recipe(model, cfg, accelerator, accumulation, compute_dtype, master_weights_from)
        if recipe.speed["lean_activations"]:
            lean.enter_context(lean_modules(model))  # SwiGLU and RMSNorm keep a third less for backward
        history = _train_steps(recipe, tokens, batches, cfg, label, progress)
        if state_dict is not None and sharded_parameters(accelerator):
            state_dict.update(gather_full_weights(accelerator, recipe.scorer, model))  # a collective: every process
    finally:
        lean.close()
        _release(model, cfg, accelerator, was_training, flat_grads=recipe is not None and recipe.flat_grads is not None)
    wall = time.perf_counter() - start
    metrics = run_metrics(history, sum(tokens[i].num_tokens for batch in batches for i in batch), wall)
    return {**metrics, "reference": recipe.reference.summary(), "speed_settings": recipe.speed}


def _setup_data(pairs: Sequence[PreferencePair], cfg: DPOConfig) -> list[PairTokens]:
    """The pairs as training scores them (truncated), each with its stored reference log-probs (else a named error)."""
    if not pairs:
        raise ItermergeError("train_dpo: no preference pairs; D_t is empty (were all samples ties?)")
    tokens = [pair_tokens(pair, i, cfg) for i, pair in enumerate(pairs)]
    for i, t in enumerate(tokens):
        if math.isnan(t.ref_chosen) or math.isnan(t.ref_rejected):
            raise ItermergeError(
                f"pair {i} (prompt_id {pairs[i].prompt_id!r}) has no reference log-probs (ref_chosen_logp / "
                "ref_rejected_logp); compute them once under the reference (θ0 for dpo.reference = fixed) with "
                "itermerge.training.reference.add_reference_logprobs"
            )
    return tokens


def _setup_accelerator(accelerator: Accelerator, cfg: DPOConfig) -> int:
    """Micro-batches per process per step, set on the accelerator (and DeepSpeed's config); refuses a reference
    policy the launcher's sharding cannot run."""
    from accelerate.utils import DistributedType

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    check_reference_supported(cfg, accelerator.distributed_type == DistributedType.FSDP, deepspeed)
    accumulation = cfg.accumulation_steps(accelerator.num_processes)
    accelerator.gradient_accumulation_steps = accumulation
    accelerator.step = 0  # align accelerate's accumulation counter with our optimizer steps
    if deepspeed:
        set_deepspeed_batch(accelerator, cfg, accumulation)
    return accumulation


def _setup_recipe(
    model: nn.Module, cfg: DPOConfig, accelerator: Accelerator, accumulation: int,
    compute_dtype: torch.dtype | None, master_weights_from: str | Path | None,
) -> _Recipe:
    """The model in training mode (float32 masters, checkpointing), the optimizer, the prepared scorer, the
    reference."""
    from accelerate.utils import DistributedType

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    upcast_from = _float32_master_weights(model, accelerator)
    if deepspeed or compute_dtype == torch.float32:
        compute_dtype = None  # DeepSpeed casts itself; float32 needs no autocast
    compute_dtype = compute_dtype or upcast_from
    if cfg.gradient_checkpointing:
        _set_checkpointing(model, True)
    model.train()
    sharded = deepspeed or accelerator.distributed_type == DistributedType.FSDP
    optimizer = adamw(model, cfg, fused=cfg.fused_adamw and not deepspeed)
    scorer, optimizer = accelerator.prepare(CompletionLogprobs(model), optimizer)
    if master_weights_from is not None and deepspeed:
        set_float32_masters(model, master_weights_from, accelerator.device)
    flat_grads = None
    if cfg.flat_buffers and not sharded:
        flat_grads = flat_gradients_and_moments(getattr(optimizer, "optimizer", optimizer))
    # .grad is ours alone (one process, no DDP, DeepSpeed or FSDP hook waits on it or owns it): the memory-saving
    # autograd of training/lean_autograd.py may write into it and recompute activations.
    own_grads = accelerator.num_processes == 1 and not sharded
    unwrapped = accelerator.unwrap_model(scorer)
    unwrapped.grads_into_weights = own_grads and cfg.grads_into_weights
    speed = {
        "lean_activations": own_grads and cfg.lean_activations,
        "grads_into_weights": unwrapped.grads_into_weights,
        "flat_buffers": flat_grads is not None,
        "fused_adamw": any(bool(group.get("fused")) for group in optimizer.param_groups),
        "gradient_checkpointing": cfg.gradient_checkpointing,
    }
    return _Recipe(accelerator, accumulation, compute_dtype, scorer, optimizer, flat_grads,
                   MovingReference(unwrapped, cfg), model_pad_id(model), masked_eos_ids(model, cfg), speed)


def _train_steps(
    recipe: _Recipe, tokens: list[PairTokens], batches: list[list[int]], cfg: DPOConfig, label: str, progress: bool
) -> list[dict[str, Any]]:
    """Every optimizer step of the iteration, with a progress bar; returns each step's metrics."""
    from tqdm.auto import tqdm

    history: list[dict[str, Any]] = []
    main = recipe.accelerator.is_main_process
    with tqdm(total=len(batches), desc="DPO", unit="step", disable=not (progress and main)) as bar:
        for step, batch in enumerate(batches):
            lr = scheduled_lr(step, len(batches), cfg.learning_rate, cfg.warmup_ratio, cfg.lr_scheduler)
            history.append(_train_step(recipe, tokens, batch, step, lr, cfg, label, len(batches)))
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", acc=f"{history[-1]['accuracy']:.2f}")
    return history


def _train_step(
    recipe: _Recipe, tokens: list[PairTokens], batch: list[int], step: int, lr: float, cfg: DPOConfig, label: str,
    steps: int,
) -> dict[str, Any]:
    """One optimizer step on one global batch: this process's micro-batches, clip, AdamW, then the reference update."""
    accelerator, scorer, optimizer, micro = recipe.accelerator, recipe.scorer, recipe.optimizer, cfg.micro_batch_size
    processes = accelerator.num_processes
    for group in optimizer.param_groups:
        group["lr"] = lr
    reference = recipe.reference.describe()  # what this step compares against, before the step moves it
    rows = torch.zeros(recipe.accumulation * micro, 4)  # (loss, r_w, r_l, weight) per local pair
    slots = _micro_batches(batch, accelerator.process_index, processes, recipe.accumulation, micro)
    for k, (indices, weight) in enumerate(slots):
        with accelerator.accumulate(scorer), _autocast(accelerator.device, recipe.compute_dtype):
            losses, chosen_rewards, rejected_rewards = _pair_losses(
                scorer, [tokens[i] for i in indices], recipe.pad_id, recipe.eos_ids, cfg.beta, accelerator.device,
                recipe.reference,
            )
            # The step's gradient is that of the mean loss over the global batch: accelerate divides
            # by `accumulation` and DDP averages over processes, hence the factors.
            loss = losses.sum() * (weight * processes * recipe.accumulation / len(batch))
            accelerator.backward(loss)
            at = slice(k * micro, k * micro + len(indices))
            rows[at] = torch.stack(
                [losses.detach(), chosen_rewards, rejected_rewards, torch.full_like(losses, weight)], dim=1
            ).cpu()
    grad_norm = accelerator.clip_grad_norm_(scorer.parameters(), cfg.max_grad_norm)
    if grad_norm is not None and not math.isfinite(float(grad_norm)):  # the same on every process
        raise _diverged(label, step, steps, lr, f"the gradient norm is {float(grad_norm)}", cfg)
    optimizer.step()
    if recipe.flat_grads is not None:
        recipe.flat_grads.zero_()
    else:
        optimizer.zero_grad(set_to_none=True)
    recipe.reference.after_step(step)  # the same weights on every process, so the same reference
    metrics = step_metrics(accelerator.gather(rows.to(accelerator.device)).cpu(), step, lr, grad_norm)
    if not math.isfinite(metrics["loss"]):  # gathered: the same on every process
        raise _diverged(label, step, steps, lr, f"the loss is {metrics['loss']}", cfg)
    return {**metrics, "reference": reference}


def _release(model: nn.Module, cfg: DPOConfig, accelerator: Accelerator, was_training: bool, flat_grads: bool) -> None:
    """Undo the setup: checkpointing off, the caller's mode back, the flat gradient views and prepared objects freed."""
    if cfg.gradient_checkpointing:
        _set_checkpointing(model, False)
    model.train(was_training)
    if flat_grads:
        for p in model.parameters():
            p.grad = None  # views: they would keep the whole flat buffer alive
    accelerator.free_memory()


def _diverged(label: str, step: int, steps: int, lr: float, what: str, cfg: DPOConfig) -> ItermergeError:
    return ItermergeError(
        f"{label}DPO step {step + 1} of {steps}: {what} at learning rate {lr:.3g}; training diverged, and no weights "
        f"were saved. Lower dpo.learning_rate (now {cfg.learning_rate:g}), raise dpo.warmup_ratio (now "
        f"{cfg.warmup_ratio:g}) or lower dpo.max_grad_norm (now {cfg.max_grad_norm:g}), then rerun to continue"
    )
