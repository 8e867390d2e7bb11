"""Where every model outside training runs: the configured device and dtype, this process's GPU under a launcher,
and device memory given back between the models of a stage (sampler, judge, reference, policy)."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from itermerge.errors import ItermergeError

if TYPE_CHECKING:
    import torch

    from itermerge.config.run import ModelConfig


@dataclass(frozen=True)
class Placement:
    """A device (``cpu``, ``cuda:3``) and a dtype name (``float32``, ``bfloat16``, ``float16``)."""

    device: str = "cpu"
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


CPU = Placement()  # float32 on the CPU: the default of every function that loads a model


def placement(model: ModelConfig) -> Placement:
    """``model.device`` / ``model.dtype`` resolved for this process. ``auto``: this process's GPU (``LOCAL_RANK``
    under ``accelerate launch`` or torchrun) in bfloat16 when CUDA is present, else the CPU in float32 (bf16
    matmul is slower than fp32 on CPUs); a bare ``cuda`` also means this process's GPU."""
    import torch

    device = model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ItermergeError(f"model.device = {device}: no CUDA device is visible; use device: cpu or auto")
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    dtype = model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return Placement(device, dtype)


def load_placed(path: str | os.PathLike, where: Placement, trust_remote_code: bool = False,
                partitioned: bool = False) -> Any:
    """A causal LM from ``path`` on ``where.device`` in ``where.dtype``, in eval mode, whole weights (unless
    ``partitioned``: training under ZeRO-3's zero.Init)."""
    from itermerge.checkpoint import hf

    return hf.load_model(path, dtype=where.torch_dtype, device=where.device, trust_remote_code=trust_remote_code,
                         partitioned=partitioned)


def release(*models: Any) -> None:
    """Give device memory back before the next model of a stage loads (the caller drops its own references)."""
    del models
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    """The most device memory torch held on this process's GPU since the last reset; None without CUDA."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None
