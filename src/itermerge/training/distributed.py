"""Training under a launcher's sharding (DeepSpeed ZeRO-3, FSDP): batch sizes, float32 master weights, gathering."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from itermerge.config.dpo import DPOConfig

if TYPE_CHECKING:
    from accelerate import Accelerator


def set_deepspeed_batch(accelerator: Accelerator, cfg: DPOConfig, accumulation: int) -> None:
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


def set_float32_masters(model: nn.Module, checkpoint: str | Path, device: torch.device) -> int:
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


def gather_full_weights(accelerator: Accelerator, scorer: nn.Module, model: nn.Module) -> dict[str, Tensor]:
    """The trained weights, whole, in the main process's host memory (empty elsewhere): a collective every process
    calls; the extra device memory it needs is one parameter at a time, on every process.

    Under ZeRO-3 these are DeepSpeed's float32 master weights, gathered one parameter at a time: its
    16-bit gather (``stage3_gather_16bit_weights_on_model_save``) would round most DPO updates away,
    as `_float32_master_weights` explains. FSDP's come from accelerate's ``get_state_dict``.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from deepspeed.utils import safe_get_full_fp32_param

        full: dict[str, Tensor] = {}
        complete = True
        for name, p in model.named_parameters():  # the same order on every process
            value = safe_get_full_fp32_param(p)  # None for a frozen parameter (no master copy), on every process
            complete = complete and value is not None
            if value is not None and accelerator.is_main_process:
                full[name] = value.detach().float().cpu()  # to host memory, tensor by tensor
            del value  # the other processes keep nothing: at most one whole tensor on a device at a time
        if complete:
            return full if accelerator.is_main_process else {}
    gathered = accelerator.get_state_dict(scorer) or {}
    return {name.removeprefix("model."): value for name, value in gathered.items()}


def sharded_parameters(accelerator: Accelerator) -> bool:
    """Whether each process holds only a shard of the weights (ZeRO-3, FSDP): the model cannot be saved alone."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.deepspeed_config["zero_optimization"]["stage"] == 3
    return accelerator.distributed_type == DistributedType.FSDP
