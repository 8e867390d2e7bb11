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


# A CPU computes in bfloat16 when its bf16 matmul is at least this much faster than fp32's: below it, the work bf16
# does not speed up (softmax, sampling, norms, the casts around them) eats the gain. Measured on the run's machine.
BF16_MARGIN = 1.5
PRECISION_ENV = "ITERMERGE_CPU_DTYPE"  # float32 or bfloat16: the probe's decision given, not measured
_settled: dict[str, Any] = {}


def cpu_precision() -> dict[str, Any]:
    """Which precision this CPU computes faster, measured: a square matmul in float32 and in bfloat16 (~0.1 s
    each, on the threads torch uses), bfloat16 when it is ``BF16_MARGIN`` × faster. The record says what was
    measured and on which CPU (its model name and whether it has AMX / AVX512-BF16). Measured once per process;
    under a launcher the main process's record is shared (``settle_precision``), so every process agrees.
    ``ITERMERGE_CPU_DTYPE`` (float32 or bfloat16) gives the decision instead of measuring it."""
    if not _settled:
        _settled.update(_probe())
    return dict(_settled)


def settle_precision(record: dict[str, Any]) -> None:
    """Adopt ``record`` (the main process's ``cpu_precision()``) as this process's."""
    _settled.clear()
    _settled.update(record)


def _cpu_flags() -> dict[str, Any]:
    info = {"cpu": "unknown", "amx_bf16": False, "avx512_bf16": False}
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()  # noqa: SIM115
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and info["cpu"] == "unknown":
            info["cpu"] = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            info.update(amx_bf16="amx_bf16" in flags, avx512_bf16="avx512_bf16" in flags)
            break
    return info


def matmul_gflops(dtype: Any, n: int = 768, seconds: float = 0.1) -> float:
    """GFLOP/s of an n×n matmul in ``dtype`` on the CPU, over ~``seconds`` after a warm-up."""
    import time

    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count < 3:
        a @ b
        count += 1
    return 2 * n**3 * count / elapsed / 1e9


def _probe() -> dict[str, Any]:
    import torch

    record: dict[str, Any] = {**_cpu_flags(), "threads": torch.get_num_threads(), "margin": BF16_MARGIN}
    forced = os.environ.get(PRECISION_ENV)
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise ItermergeError(f"{PRECISION_ENV}={forced!r}: use float32 or bfloat16 (or unset it to measure)")
        return {**record, "dtype": forced, "given_by": PRECISION_ENV}
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    return {**record, "float32_gflops": round(fp32, 1), "bfloat16_gflops": round(bf16, 1),
            "dtype": "bfloat16" if bf16 >= BF16_MARGIN * fp32 else "float32"}


def placement(model: ModelConfig) -> Placement:
    """``model.device`` / ``model.dtype`` resolved for this process. ``auto``: this process's GPU (``LOCAL_RANK``
    under ``accelerate launch`` or torchrun) in bfloat16 when CUDA is present, else the CPU in the precision it
    computes faster, measured (``cpu_precision``: which one wins differs between CPU kinds, by several times);
    a bare ``cuda`` also means this process's GPU."""
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
        dtype = "bfloat16" if device.startswith("cuda") else cpu_precision()["dtype"]
    return Placement(device, dtype)


def scorer_spec(spec: dict[str, Any], where: Placement) -> dict[str, Any]:
    """A scorer spec placed on this process's device: a reward model runs in bfloat16 on a GPU, on a CPU in the run's
    precision (``model.dtype``, measured when auto)."""
    if spec.get("type") != "reward_model":
        return spec
    return {**spec, "device": where.device, "dtype": "bfloat16" if where.is_cuda else where.dtype}


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
