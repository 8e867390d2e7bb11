"""Algorithm 2 on LoRA adapters: θ_t = θ0 + Δ1 + … + Δt, so eq. (9)'s θ0 + Σ_t k_t (θ_t − θ0) is θ0 + Σ_s c_s Δ_s with
c_s = Σ_{t≥s} k_t — exactly one LoRA of rank Σ_s r_s, written without ever forming full weights. Torch-free."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from itermerge import __version__
from itermerge.checkpoint.chain import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    LoraAdapter,
    LowRank,
    add_delta,
    chain_spec,
    check_fits,
    is_adapter,
    read_adapter,
    write_chain,
)
from itermerge.checkpoint.dtypes import CHUNK, FLOAT_DTYPES, ST_STORAGE, all_finite, parse_dtype, torch_name
from itermerge.checkpoint.reader import CheckpointReader
from itermerge.checkpoint.writer import ShardedWriter, copy_metadata, parse_size
from itermerge.errors import ItermergeError
from itermerge.merging.engine import Scratch, encode_block, float_block, stream_blocks
from itermerge.merging.streamed import described
from itermerge.operators import Operator
from itermerge.rundir import atomic_dir, atomic_write_json

HOW = ("θ_t = θ0 + Δ1 + … + Δt (Δ_s = lora_alpha_s / r_s · B_s A_s), so θ = θ0 + Σ_s c_s Δ_s with c_s = Σ_{t≥s} k_t: "
       "one adapter, the A_s stacked along the rank, each B_s scaled by c_s · lora_alpha_s / r_s, lora_alpha = r "
       "(peft's scale 1), ranks padded with zeros to the largest; float32")


def open_adapter(path: str | os.PathLike) -> LoraAdapter:
    """A peft LoRA adapter directory (adapter_config.json + adapter_model.safetensors) as low-rank updates."""
    return read_adapter(path, CheckpointReader(path, chain=False))


def adapter_coefficients(k: Sequence[float]) -> list[float]:
    """c_s = Σ_{t≥s} k_t: eq. (9)'s weight of adapter s, which every θ_t with t ≥ s contains. (T,) → (T,)."""
    return [math.fsum(k[s:]) for s in range(len(k))]


def merged_updates(adapters: Sequence[LoraAdapter], weights_for: Callable[[str], Sequence[float]]
                   ) -> dict[str, LowRank]:
    """θ0's tensor name → the merge's update Σ_s c_s Δ_s as one LoRA (scale 1): A (R, in) the A_s stacked, B (out, R)
    the B_s scaled by c_s · scale_s side by side; every tensor padded with zero rank to the largest R, since a peft
    adapter has one r. ``weights_for(name)``: k_1..k_T of that tensor (eq. 10's, or an operator's)."""
    stacked = {}
    for name in sorted({n for a in adapters for n in a.updates}):
        c = adapter_coefficients(weights_for(name))
        parts = [(a.updates[name], c[s]) for s, a in enumerate(adapters) if name in a.updates]
        stacked[name] = (np.concatenate([u.A for u, _ in parts]),
                         np.concatenate([u.B * np.float32(cs * u.scale) for u, cs in parts], axis=1))
    rank = max(A.shape[0] for A, _ in stacked.values())
    return {name: LowRank(_pad(A, rank, 0), _pad(B, rank, 1), 1.0) for name, (A, B) in stacked.items()}


def _pad(x: np.ndarray, rank: int, axis: int) -> np.ndarray:
    width = [(0, 0), (0, 0)]
    width[axis] = (0, rank - x.shape[axis])
    return np.ascontiguousarray(np.pad(x, width), dtype=np.float32)


def merge_adapters(
    reference: str | os.PathLike,
    adapters: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    op: Operator,
    *,
    full: bool = False,
    dtype: str | None = None,
    force: bool = False,
    max_shard_size: str | int = "5GB",
    progress: bool = True,
) -> Path:
    """Eq. (9) of θ0..θT given θ0 (``reference``) and the adapters Δ1..ΔT of a LoRA run in order (θ_t = θ0 + Δ1 + …
    + Δt; a run's iter_XX/adapter) with the operator ``op`` (``itermerge.operators.operator``), which must be linear
    in θ0..θT: the paper's (λ, α) or k_t, expo, ema, groups. Written as one peft adapter on θ0 — ``out`` also reads
    as an itermerge checkpoint, θ0 plus that adapter — or, with ``full``, as full weights (float32, or ``dtype``).
    merge.json records the operator, the inputs and their content hashes, every k_t and c_s = Σ_{t≥s} k_t."""
    start = time.perf_counter()
    if not adapters:
        raise ItermergeError("--checkpoints is empty: give the adapters Δ1..ΔT of a LoRA run in iteration order")
    full_ones = [str(a) for a in adapters if not is_adapter(a)]
    if full_ones:
        raise ItermergeError(f"{full_ones[0]}: a full checkpoint among LoRA adapters; give --checkpoints as all "
                             "adapters (a LoRA run's iter_XX/adapter) or all full checkpoints (its iter_XX/model)")
    out, out_dtype = Path(out), parse_dtype(dtype)
    if out.exists() and not force:
        raise ItermergeError(f"{out}: output directory exists; choose another path or pass --force to replace it")
    if out_dtype is not None and not full:
        raise ItermergeError("--dtype applies with --full; a merged adapter is float32")
    base = CheckpointReader(reference)
    loras = [open_adapter(a) for a in adapters]
    named = sorted({a.base_model for a in loras if a.base_model})
    if len(named) > 1:
        raise ItermergeError(f"the adapters name different base models ({', '.join(named)}); merge the adapters of "
                             "one run, all trained on the same θ0")
    for adapter in loras:
        check_fits(adapter, base)
    floats = [n for n in base if base.dtype(n) in FLOAT_DTYPES]
    chosen, op = op, op.resolve(len(loras), floats)
    if not op.linear:
        raise ItermergeError(f"--method {op.method} is not linear in θ0..θT, so its merge is no sum of the adapters; "
                             "merge full checkpoints instead: a LoRA run's iter_XX/model (θ0 plus its adapters)")
    updates = merged_updates(loras, op.weights_for)
    rank = next(iter(updates.values())).rank
    with atomic_dir(out, force=force) as tmp:
        if full:
            _write_full(base, updates, tmp, out_dtype or "F32", max_shard_size, progress)
        else:
            _write_adapter(loras[0].config, base, updates, tmp, out)
        k = None if op.weights is None else list(op.weights)
        atomic_write_json(tmp / "merge.json", {
            "itermerge_version": __version__,
            **described(chosen, op),
            "format": "full weights" if full else "one LoRA adapter (peft) on θ0",
            "adapters": HOW,
            "reference": {"path": str(base.path), "hash": base.content_hash()},
            "checkpoints": [{"path": str(a.path), "hash": a.hash} for a in loras],
            "weights": k,
            "reference_weight": None if k is None else 1.0 - sum(k),
            "adapter_coefficients": None if k is None else adapter_coefficients(k),
            "rank": rank,
            "dtype": torch_name(out_dtype or "F32"),
            "seconds": round(time.perf_counter() - start, 3),
        })
    base.close()
    return out


def _write_adapter(config: Mapping, base: CheckpointReader, updates: Mapping[str, LowRank], tmp: Path,
                   final: Path) -> None:
    """adapter_model.safetensors and adapter_config.json (peft's layout), and the chain θ0 + this adapter beside."""
    modules = [name.removesuffix(".weight") for name in updates]
    tensors = {f"{PEFT_PREFIX}{m}.lora_{x}.weight": getattr(u, x) for m, u in zip(modules, updates.values())
               for x in "AB"}
    writer = ShardedWriter(tmp, [(key, a.shape, "F32") for key, a in tensors.items()], max_shard_bytes=2**62)
    for key, a in tensors.items():
        writer.write(key, 0, a.reshape(-1))
    os.replace(writer.close()[0], tmp / ADAPTER_WEIGHTS)
    rank = next(iter(updates.values())).rank
    (tmp / ADAPTER_CONFIG).write_text(json.dumps({
        **config, "r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
        "target_modules": modules, "lora_dropout": 0.0, "layers_to_transform": None, "layers_pattern": None,
        "inference_mode": True, "base_model_name_or_path": os.path.abspath(base.path),
    }, indent=2) + "\n")
    write_chain(tmp, final, base.path, [final])


def _write_full(base: CheckpointReader, updates: Mapping[str, LowRank], tmp: Path, st: str, max_shard_size: str | int,
                progress: bool) -> None:
    """θ0 + the merged update, streamed block by block (each θ0 block plus its rows of B A) to sharded safetensors."""
    names = list(base)
    plan = [(n, base.shape(n), st if base.dtype(n) in FLOAT_DTYPES else base.dtype(n)) for n in names]

    def block(name: str, i: int, scratch: Scratch) -> np.ndarray:
        if base.dtype(name) not in FLOAT_DTYPES:  # integer buffers (rare): θ0's
            return base.read_chunk(name, i, scratch.get("out", ST_STORAGE[base.dtype(name)]))
        x = float_block(base, name, i, scratch, 0)
        acc = scratch.get("acc", np.float32)[: x.size]
        np.copyto(acc, x)
        if name in updates:
            add_delta(acc, updates[name], base.shape(name), i * CHUNK)
        if not all_finite(acc, "F32"):
            raise ItermergeError(f"tensor {name!r}: the merge overflows to Inf/NaN; use a smaller |alpha|")
        return encode_block(acc, st, scratch)

    max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    writer = ShardedWriter(tmp, plan, max_bytes)
    stream_blocks(writer, plan, {n: base.numel(n) for n in names}, block, "merging adapters", progress)
    copy_metadata(base, tmp)
    config = tmp / "config.json"
    if config.exists():
        data = json.loads(config.read_text())
        data["dtype" if "dtype" in data else "torch_dtype"] = torch_name(st)
        config.write_text(json.dumps(data, indent=2) + "\n")


def chain_adapters(checkpoints: Sequence[str | os.PathLike]) -> list[Path] | None:
    """Δ1..ΔT when θ1..θT are the θ_t of one LoRA run (θ_t = θ0 + Δ1 + … + Δt, one θ0; checkpoint/chain.py), else
    None (full checkpoints, or chains that are not one run's prefixes)."""
    specs = [chain_spec(c) for c in checkpoints]
    if not specs or any(s is None for s in specs):
        return None
    last = specs[-1]
    if any(s.base != last.base or s.adapters != last.adapters[: t + 1] for t, s in enumerate(specs)):
        return None
    return list(last.adapters)
