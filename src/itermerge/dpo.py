"""DPO against the fixed reference θ0 (§2, Alg. 1): the loss as a pure function, and the training loop on accelerate."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itermerge.errors import ItermergeError
from itermerge.lean_autograd import lean_modules
from itermerge.logprobs import CompletionLogprobs, collate_grouped, score_grouped

if TYPE_CHECKING:
    from accelerate import Accelerator

    from itermerge.records import PreferencePair


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The DPO loss of §2 per pair, and the induced rewards of eq. (4).

        r_θ(x, y) = β (log π_θ(y|x) − log π_θ0(y|x))                          eq. (4)
        L(θ)      = −log σ( r_θ(x, y_w) − r_θ(x, y_l) )                        §2, DPO loss

    All inputs are (B,) sums of completion-token log-probs; returns (losses, chosen_rewards,
    rejected_rewards), each (B,); the rewards are detached (they are metrics).
    """
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    logits = pi_logratios - ref_logratios  # h(y_w, y_l)
    losses = -F.logsigmoid(beta * logits)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


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


_SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class DPOConfig:
    """DPO settings; the defaults are appendix C's (Table 6), ZeRO-3 aside (that comes from the launcher)."""

    beta: float = field(default=0.1, metadata={"help": "KL coefficient β of eq. (2)/(4)."})
    learning_rate: float = field(default=5e-7, metadata={"help": "Peak AdamW learning rate."})
    global_batch_size: int = field(
        default=128, metadata={"help": "Pairs per optimizer step = micro_batch_size × grad. accumulation × processes."}
    )
    micro_batch_size: int = field(
        default=1,
        metadata={
            "help": "Pairs per forward on one process (chosen + rejected = 2× sequences). 1 holds the least "
            "activation memory; 2 is ~10% faster on CPUs and better for GPU throughput."
        },
    )
    warmup_ratio: float = field(default=0.03, metadata={"help": "Fraction of the optimizer steps spent warming up."})
    lr_scheduler: str = field(default="cosine", metadata={"help": "Decay after warm-up: cosine, linear or constant."})
    weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay on matrices (norms and biases are not decayed)."}
    )
    adam_betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW (β1, β2)."})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW ε."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm to this value."})
    epochs: int = field(default=1, metadata={"help": "Passes over D_t."})
    mask_eos: bool = field(
        default=True, metadata={"help": "Do not score a completion's final EOS token (appendix C)."}
    )
    max_length: int = field(default=2048, metadata={"help": "Longest prompt + completion, in tokens."})
    max_prompt_length: int = field(default=1024, metadata={"help": "Prompt tokens kept when a pair is too long."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward: less memory, ~30% more compute."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the pair shuffle (the same on every process)."})

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ItermergeError:
            return ItermergeError(f"dpo.{name} = {getattr(self, name)!r}: {rule}")

        for name in ("beta", "learning_rate", "adam_eps", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be > 0")
        for name in ("global_batch_size", "micro_batch_size", "epochs", "max_length", "max_prompt_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "must be a positive integer")
        if self.global_batch_size % self.micro_batch_size:
            raise bad("global_batch_size", f"must be a multiple of dpo.micro_batch_size = {self.micro_batch_size}")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "must be in [0, 1), e.g. 0.03")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if self.lr_scheduler not in _SCHEDULES:
            raise bad("lr_scheduler", f"must be one of {_SCHEDULES}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise bad("adam_betas", "must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        if self.max_prompt_length >= self.max_length:
            raise bad("max_prompt_length", f"must be < dpo.max_length = {self.max_length} to leave room for completions")

    def accumulation_steps(self, num_processes: int) -> int:
        """Micro-batches per process per optimizer step, so that global = micro × accumulation × processes."""
        per_step = self.micro_batch_size * num_processes
        if self.global_batch_size % per_step:
            raise ItermergeError(
                f"dpo.global_batch_size = {self.global_batch_size} is not a multiple of dpo.micro_batch_size × "
                f"processes = {self.micro_batch_size} × {num_processes}; change one of them"
            )
        return self.global_batch_size // per_step


@dataclass(frozen=True)
class _PairTokens:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref_chosen: float
    ref_rejected: float

    @property
    def num_tokens(self) -> int:
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


def _pair_tokens(pair: PreferencePair, index: int, cfg: DPOConfig) -> _PairTokens:
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        if not getattr(pair, name):
            raise ItermergeError(f"pair {index} (prompt_id {pair.prompt_id!r}): {name} is empty; re-run pair selection")
    prompt, chosen, rejected = truncate_pair(
        pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, cfg.max_length, cfg.max_prompt_length
    )
    ref = (pair.ref_chosen_logp, pair.ref_rejected_logp)
    return _PairTokens(prompt, chosen, rejected, *(math.nan if r is None else float(r) for r in ref))


def _eos_ids(model: nn.Module, cfg: DPOConfig) -> tuple[int, ...]:
    """The model's end-of-sequence ids when appendix C's EOS masking is on, else none."""
    if not cfg.mask_eos:
        return ()
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    return tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))


def _pad_id(model: nn.Module) -> int:
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
    log-ratios of eq. (4) compare like with like. Pass θ0 itself, never θ_{t-1}.
    """
    tokens = [_pair_tokens(pair, i, cfg) for i, pair in enumerate(pairs)]
    scores = score_grouped(
        reference_model, [t.prompt for t in tokens], [[t.chosen, t.rejected] for t in tokens],
        _pad_id(reference_model), batch_size, progress, eos_ids=_eos_ids(reference_model, cfg),
    )  # fmt: skip
    return [
        dataclasses.replace(pair, ref_chosen_logp=chosen, ref_rejected_logp=rejected)
        for pair, (chosen, rejected) in zip(pairs, scores)
    ]


def _global_batches(num_pairs: int, cfg: DPOConfig) -> list[list[int]]:
    """Pair indices of each optimizer step: a seeded shuffle per epoch, cut into global batches (last may be short)."""
    batches = []
    for epoch in range(cfg.epochs):
        order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        batches += [order[i : i + cfg.global_batch_size] for i in range(0, num_pairs, cfg.global_batch_size)]
    return batches


def _micro_batches(batch: list[int], rank: int, processes: int, accumulation: int, micro: int) -> list[tuple[list[int], float]]:
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


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # As transformers' Trainer: matrices and embeddings decay; norms and biases (1-D) do not.
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def _adamw(model: nn.Module, cfg: DPOConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW with appendix C's settings; the fused kernel where torch has one for the parameters' device.

    Why fused: one pass over parameters, gradients and moments instead of a dozen per tensor; on
    SmolLM2-135M on 2 CPU cores a step takes 0.08 s instead of 0.56 s. Same update up to float rounding.
    (DeepSpeed brings its own optimizer wrapping, so there the plain implementation is kept.)
    """
    groups = _decay_groups(model, cfg.weight_decay)
    kwargs = {"lr": cfg.learning_rate, "betas": cfg.adam_betas, "eps": cfg.adam_eps}
    devices = {p.device.type for group in groups for p in group["params"]}
    if fused and devices <= {"cpu", "cuda"}:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # a dtype or device the fused kernel does not support
            pass
    return torch.optim.AdamW(groups, **kwargs)


def _flat_gradients_and_moments(optimizer: torch.optim.Optimizer) -> Tensor | None:
    """Give every parameter its .grad and AdamW moments as views into three flat buffers; returns the gradient one.

    Why: allocated one tensor each (gradients freed and reallocated every step, moments at the first
    step), these 3 × N floats land between activations on the C heap, whose holes glibc keeps resident.
    A flat buffer is one mmap of its own, allocated before any activation and kept for the whole run, so
    the heap holds only short-lived tensors: SmolLM2-135M's DPO peak RSS drops by ~0.07-0.1 GiB. The
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
            "step": torch.zeros((), dtype=step_dtype, device=p.device) if fused else torch.tensor(0.0, dtype=step_dtype),
            "exp_avg": exp_avg[view].view_as(p),
            "exp_avg_sq": exp_avg_sq[view].view_as(p),
        }
        offset += p.numel()
    return grads


def _pair_losses(
    scorer: nn.Module, pairs: list[_PairTokens], pad_id: int, eos_ids: tuple[int, ...], beta: float, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO losses and rewards of m pairs, (m,) each: chosen and rejected in one forward, the prompt run once."""
    inputs = collate_grouped(
        [p.prompt for p in pairs], [[p.chosen, p.rejected] for p in pairs], pad_id, eos_ids=eos_ids
    ).to(device)
    logps = scorer(inputs).sum(dim=1).float()  # (2m,): chosen, rejected of pair 0, then of pair 1, …
    ref = torch.tensor([[p.ref_chosen, p.ref_rejected] for p in pairs], device=logps.device)  # (m, 2)
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


def _set_deepspeed_batch(accelerator: Accelerator, cfg: DPOConfig, accumulation: int) -> None:
    """Write the DPO config's batch sizes and clipping into DeepSpeed's config before ``prepare``.

    accelerate fills DeepSpeed's ``auto`` batch sizes from a DataLoader, which this loop does not have
    (it refuses to prepare without one), and otherwise lets DeepSpeed's gradient_accumulation_steps
    (often 1 from an accelerate config file) override ours: DeepSpeed would then step the optimizer
    after every micro-batch. The DPO config decides the batch (appendix C: 128 pairs), so it is written
    over whatever the launcher's config says.
    """
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ours = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": cfg.micro_batch_size * accumulation * accelerator.num_processes,
        "gradient_clipping": cfg.max_grad_norm,
    }
    differ = {k: ds[k] for k, v in ours.items() if ds.get(k, "auto") not in ("auto", v)}
    if differ and accelerator.is_main_process:
        print(f"DPO: the DeepSpeed config's {differ} replaced by the dpo section's {ours}", flush=True)
    ds.update(ours)


def _set_float32_masters(model: nn.Module, checkpoint: str | Path, device: torch.device) -> int:
    """Overwrite DeepSpeed's float32 master weights with the checkpoint's float32 tensors; returns how many.

    Each process reads every tensor whole and keeps its own partition (no collective). Tensors stored in
    16 bits are left as they are (their master copy is already exact), and so is everything when a
    parameter's name is missing from the checkpoint (the same decision on every process).
    """
    from deepspeed.utils import safe_set_full_fp32_param

    from itermerge.checkpoint import CheckpointReader

    reader = CheckpointReader(checkpoint)
    try:
        stored = set(reader.keys())
        params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if any(name not in stored for name, _ in params):
            return 0
        restored = 0
        for name, p in params:
            if reader.dtype(name) not in ("F32", "F64"):
                continue
            value = reader.get(name).to(device=device, dtype=torch.float32)
            partition = getattr(p, "ds_tensor", None)  # ZeRO-3: this process's slice, padded on the last ones
            if partition is None or partition.numel() * torch.distributed.get_world_size() == value.numel():
                safe_set_full_fp32_param(p, value)
            else:  # an uneven split: DeepSpeed 0.19's setter would read past the tensor's end on the last process
                optimizer = p._z3_optimizer
                master, _ = optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=False)
                start = master.numel() * optimizer._get_param_partition_rank(p)
                mine = value.flatten()[start : start + master.numel()]
                master.data.zero_()
                master.data[: mine.numel()].copy_(mine)
            restored += 1
        return restored
    finally:
        reader.close()


def _gather_full_weights(accelerator: Accelerator, scorer: nn.Module, model: nn.Module) -> dict[str, Tensor]:
    """The trained weights, whole, on the main process (empty elsewhere): a collective every process calls.

    Under ZeRO-3 these are DeepSpeed's float32 master weights, gathered one parameter at a time: its
    16-bit gather (``stage3_gather_16bit_weights_on_model_save``) would round most DPO updates away,
    as `_float32_master_weights` explains. FSDP's come from accelerate's ``get_state_dict``.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from deepspeed.utils import safe_get_full_fp32_param

        full: dict[str, Tensor | None] = {}
        for name, p in model.named_parameters():  # the same order on every process
            value = safe_get_full_fp32_param(p)  # None for a frozen parameter (no master copy), on every process
            full[name] = None if value is None else value.detach().float().cpu() if accelerator.is_main_process else value
        if all(value is not None for value in full.values()):
            return dict(full) if accelerator.is_main_process else {}  # type: ignore[arg-type]
    gathered = accelerator.get_state_dict(scorer) or {}
    return {name.removeprefix("model."): value for name, value in gathered.items()}


def _sharded_parameters(accelerator: Accelerator) -> bool:
    """Whether each process holds only a shard of the weights (DeepSpeed ZeRO-3, FSDP): the model alone cannot be saved."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.deepspeed_config["zero_optimization"]["stage"] == 3
    return accelerator.distributed_type == DistributedType.FSDP


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
) -> dict[str, Any]:
    """θ_t = argmin_θ L(θ; D_t) from the model's current weights (Alg. 1), trained in place; returns metrics.

    The reference log-probs are read from the pairs (θ0's, see `add_reference_logprobs`), so only the
    policy is in memory. A model in bfloat16/float16 trains as float32 master weights under autocast and
    is left in float32 (rounding back to 16 bits would undo most DPO updates); DeepSpeed keeps its own.
    Under `accelerate launch` (DDP, DeepSpeed) every process passes all pairs; each takes its slots of
    every global batch, and the result matches one process with the same global batch.
    The accelerator's prepared objects are released at the end.

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
    from accelerate.utils import DistributedType

    start = time.perf_counter()
    if not pairs:
        raise ItermergeError("train_dpo: no preference pairs; D_t is empty (were all samples ties?)")
    tokens = [_pair_tokens(pair, i, cfg) for i, pair in enumerate(pairs)]
    for i, t in enumerate(tokens):
        if math.isnan(t.ref_chosen) or math.isnan(t.ref_rejected):
            raise ItermergeError(
                f"pair {i} (prompt_id {pairs[i].prompt_id!r}) has no reference log-probs (ref_chosen_logp / "
                "ref_rejected_logp); compute them once under θ0 with itermerge.dpo.add_reference_logprobs"
            )
    accelerator = accelerator or Accelerator()
    processes, rank = accelerator.num_processes, accelerator.process_index
    accumulation = cfg.accumulation_steps(processes)
    accelerator.gradient_accumulation_steps = accumulation
    accelerator.step = 0  # align accelerate's accumulation counter with our optimizer steps
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _set_deepspeed_batch(accelerator, cfg, accumulation)
    pad_id, eos_ids = _pad_id(model), _eos_ids(model, cfg)
    batches = _global_batches(len(pairs), cfg)

    was_training = model.training
    upcast_from = _float32_master_weights(model, accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED or compute_dtype == torch.float32:
        compute_dtype = None  # DeepSpeed casts itself; float32 needs no autocast
    compute_dtype = compute_dtype or upcast_from
    if cfg.gradient_checkpointing:
        _set_checkpointing(model, True)
    model.train()
    optimizer = _adamw(model, cfg, fused=accelerator.distributed_type != DistributedType.DEEPSPEED)
    scorer, optimizer = accelerator.prepare(CompletionLogprobs(model), optimizer)
    if master_weights_from is not None and accelerator.distributed_type == DistributedType.DEEPSPEED:
        _set_float32_masters(model, master_weights_from, accelerator.device)
    flat_grads = None
    if accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        flat_grads = _flat_gradients_and_moments(getattr(optimizer, "optimizer", optimizer))
    # .grad is ours alone (one process, plain AdamW): no DDP or DeepSpeed hook waits on it or owns it
    own_grads, lean = flat_grads is not None and processes == 1, contextlib.ExitStack()
    accelerator.unwrap_model(scorer).grads_into_weights = own_grads

    from tqdm.auto import tqdm

    history: list[dict[str, float]] = []
    bar = tqdm(total=len(batches), desc="DPO", unit="step", disable=not (progress and accelerator.is_main_process))
    try:
        if own_grads:
            lean.enter_context(lean_modules(model))  # SwiGLU and RMSNorm keep a third less for backward
        for step, batch in enumerate(batches):
            lr = scheduled_lr(step, len(batches), cfg.learning_rate, cfg.warmup_ratio, cfg.lr_scheduler)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rows = torch.zeros(accumulation * cfg.micro_batch_size, 4)  # (loss, r_w, r_l, weight) per local pair
            micro_batches = _micro_batches(batch, rank, processes, accumulation, cfg.micro_batch_size)
            for k, (indices, weight) in enumerate(micro_batches):
                with accelerator.accumulate(scorer), _autocast(accelerator.device, compute_dtype):
                    losses, chosen_rewards, rejected_rewards = _pair_losses(
                        scorer, [tokens[i] for i in indices], pad_id, eos_ids, cfg.beta, accelerator.device
                    )
                    # The step's gradient is that of the mean loss over the global batch: accelerate divides
                    # by `accumulation` and DDP averages over processes, hence the factors.
                    loss = losses.sum() * (weight * processes * accumulation / len(batch))
                    accelerator.backward(loss)
                    at = slice(k * cfg.micro_batch_size, k * cfg.micro_batch_size + len(indices))
                    rows[at] = torch.stack(
                        [losses.detach(), chosen_rewards, rejected_rewards, torch.full_like(losses, weight)], dim=1
                    ).cpu()
            grad_norm = accelerator.clip_grad_norm_(scorer.parameters(), cfg.max_grad_norm)
            optimizer.step()
            if flat_grads is not None:
                flat_grads.zero_()
            else:
                optimizer.zero_grad(set_to_none=True)
            history.append(_step_metrics(accelerator.gather(rows.to(accelerator.device)).cpu(), step, lr, grad_norm))
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", acc=f"{history[-1]['accuracy']:.2f}")
        if state_dict is not None and _sharded_parameters(accelerator):
            state_dict.update(_gather_full_weights(accelerator, scorer, model))  # a collective: every process
    finally:
        bar.close()
        lean.close()
        if cfg.gradient_checkpointing:
            _set_checkpointing(model, False)
        model.train(was_training)
        if flat_grads is not None:
            for p in model.parameters():
                p.grad = None  # views: they would keep the whole flat buffer alive
        accelerator.free_memory()
    wall = time.perf_counter() - start
    return _run_metrics(history, sum(tokens[i].num_tokens for batch in batches for i in batch), wall)


def _step_metrics(rows: Tensor, step: int, lr: float, grad_norm: Tensor | float | None) -> dict[str, float]:
    """Mean loss, preference accuracy and rewards of one step over all processes' real pairs (weight 1)."""
    rows = rows[rows[:, 3] > 0]
    loss, chosen, rejected = rows[:, 0], rows[:, 1], rows[:, 2]
    return {
        "step": step + 1,
        "lr": lr,
        "pairs": len(rows),
        "loss": loss.mean().item(),
        "accuracy": (chosen > rejected).float().mean().item(),
        "reward_margin": (chosen - rejected).mean().item(),
        "chosen_reward": chosen.mean().item(),
        "rejected_reward": rejected.mean().item(),
        "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
    }


def _run_metrics(history: list[dict[str, float]], num_tokens: int, wall: float) -> dict[str, Any]:
    pairs = sum(h["pairs"] for h in history)

    def mean(key: str) -> float:
        return sum(h[key] * h["pairs"] for h in history) / pairs

    return {
        "loss": mean("loss"),
        "accuracy": mean("accuracy"),
        "reward_margin": mean("reward_margin"),
        "chosen_reward": mean("chosen_reward"),
        "rejected_reward": mean("rejected_reward"),
        "first_step_loss": history[0]["loss"],
        "last_step_loss": history[-1]["loss"],
        "last_step_accuracy": history[-1]["accuracy"],
        "steps": len(history),
        "pairs_seen": pairs,
        "tokens": num_tokens,
        "tokens_per_s": num_tokens / wall,
        "wall_s": wall,
        "history": history,
    }
