"""Algorithm 2 on disk: θ = θ0 + Σ k_t (θ_t − θ0) streamed block by block from safetensors to sharded safetensors."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from itermerge import __version__
from itermerge.checkpoint.dtypes import FLOAT_DTYPES, ST_STORAGE, all_finite, parse_dtype, to_float32, torch_name
from itermerge.checkpoint.reader import CheckpointReader, check_compatible
from itermerge.checkpoint.writer import ShardedWriter, copy_metadata, parse_size
from itermerge.errors import ItermergeError
from itermerge.maths.merge import eq9_block, intermediate_total, resolve_weights
from itermerge.merging.engine import Scratch, encode_block, float_block, read_for_hash, refuse_fp8, stream_blocks
from itermerge.merging.mean import mean_cache_hashes, mean_checkpoint
from itermerge.rundir import atomic_dir, atomic_write_json

if TYPE_CHECKING:
    import torch


def merge_checkpoints(
    reference: str | os.PathLike,
    checkpoints: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    lam: float | None = None,
    alpha: float | None = None,
    weights: Sequence[float] | None = None,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    max_shard_size: str | int = "5GB",
    mean_cache: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Write θ = θ0 + Σ k_t (θ_t − θ0) (eq. 9, with eq. 10's k_t from λ, α) as an HF checkpoint.

    Streams blocks of every tensor from the safetensors files, computes in float32, writes sharded
    safetensors (``dtype``: 'bfloat16', 'float16', 'float32' or a torch dtype; default each tensor's
    dtype in θT), copies config and tokenizer from θT, and records the inputs, their content hashes
    and the k_t in ``merge.json``. The output appears under ``out`` only when complete.
    ``mean_cache``: a θ̄ directory (made by ``mean_checkpoint``, created there if absent) used when
    the intermediate k_t are equal, so that only θ0, θ̄ and θT are read.
    """
    start = time.perf_counter()
    if not checkpoints:
        raise ItermergeError("--checkpoints is empty: give θ1..θT, the checkpoints of iterative DPO in order")
    k = resolve_weights(len(checkpoints), lam, alpha, weights)
    out_dtype = parse_dtype(dtype)
    max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    out = Path(out)
    if out.exists() and not force:
        raise ItermergeError(f"{out}: output directory exists; choose another path or pass --force to replace it")
    readers = [CheckpointReader(p) for p in [reference, *checkpoints]]
    check_compatible(readers)
    base, trained, last = readers[0], readers[1:], readers[-1]
    names = base.keys()
    refuse_fp8(base, names)

    # The sources actually read: (reader, k) with k ≠ 0; θ̄ stands in for θ1..θ_{T−1} when it can.
    sources = list(zip(trained, k))
    known: dict[str, str] = {}  # content hashes vouched for by the θ̄ cache's record
    used_cache = None
    T = len(trained)
    if mean_cache is not None and T >= 3 and len(set(k[:-1])) == 1 and k[0] != 0.0:
        cache = Path(mean_cache)
        hashes = mean_cache_hashes(cache, trained[:-1])
        if hashes is None:
            mean_checkpoint([r.path for r in trained[:-1]], cache, force=True, progress=progress)
            hashes = mean_cache_hashes(cache, trained[:-1])
        known = {str(r.path): h for r, h in zip(trained[:-1], hashes)}
        sources = [(CheckpointReader(cache), intermediate_total(k)), (last, k[-1])]
        used_cache = str(cache)
    sources = [(r, kt) for r, kt in sources if kt != 0.0]
    # Inputs read only for their content hash (k_t = 0 and not vouched for by the cache).
    read = {id(r) for r, _ in sources} | {id(base)}
    hash_only = [r for r in readers if id(r) not in read and str(r.path) not in known]
    plan = [(n, base.shape(n), _out_dtype(last.dtype(n), out_dtype)) for n in names]
    out_st = {n: st for n, _, st in plan}
    srcs, ks = [r for r, _ in sources], [kt for _, kt in sources]
    # A unit coefficient vector is an exact copy of one input: θ0 (α = −1) or the only k = 1.
    exact = base if not sources else sources[0][0] if len(sources) == 1 and ks[0] == 1.0 else None

    def block(name: str, i: int, scratch: Scratch) -> np.ndarray:
        read_for_hash(hash_only, name, i, scratch)
        st = out_st[name]
        if st not in FLOAT_DTYPES:  # integer buffers (rare): θT's, as save_pretrained would write them
            read_for_hash([r for r in [base, *srcs] if r is not last], name, i, scratch)
            return last.read_chunk(name, i, scratch.get("out", ST_STORAGE[st]))
        if exact is not None:
            read_for_hash([r for r in [base, *srcs] if r is not exact], name, i, scratch)
            raw = exact.read_chunk(name, i, scratch.get(("raw", 0), ST_STORAGE[exact.dtype(name)]))
            if exact.dtype(name) == st:
                if not all_finite(raw, st):
                    raise ItermergeError(_non_finite_message(name, [exact], k))
                return raw
            merged = to_float32(raw, exact.dtype(name), scratch.get(("f32", 0), np.float32)[: raw.size])
        else:
            theta0 = float_block(base, name, i, scratch, 0)
            xs = [float_block(r, name, i, scratch, m + 1) for m, r in enumerate(srcs)]
            merged = eq9_block(
                scratch.get("acc", np.float32)[: theta0.size],
                theta0,
                xs,
                ks,
                scratch.get("tmp", np.float32)[: theta0.size],
            )
        if not all_finite(merged, "F32"):
            raise ItermergeError(_non_finite_message(name, [base, *srcs], k))
        encoded = encode_block(merged, st, scratch)
        if st != "F32" and not all_finite(encoded, st):
            raise ItermergeError(_non_finite_message(name, [], k))
        return encoded

    with atomic_dir(out, force=force) as tmp:
        writer = ShardedWriter(tmp, plan, max_bytes)
        stream_blocks(writer, plan, {n: base.numel(n) for n in names}, block, "merging", progress)
        copy_metadata(last, tmp)
        if out_dtype is not None:
            _set_config_dtype(tmp / "config.json", out_dtype)
        hashes = {str(r.path): known.get(str(r.path)) or r.content_hash() for r in readers}
        atomic_write_json(tmp / "merge.json", {
            "itermerge_version": __version__,
            "method": "Algorithm 2 / eq. (9): θ0 + Σ_t k_t (θ_t − θ0), float32 arithmetic",
            "reference": {"path": str(base.path), "hash": hashes[str(base.path)]},
            "checkpoints": [{"path": str(r.path), "hash": hashes[str(r.path)]} for r in trained],
            "lam": lam if weights is None else None,
            "alpha": alpha if weights is None else None,
            "weights": k,
            "reference_weight": 1.0 - sum(k),
            "dtype": torch_name(out_dtype) if out_dtype is not None else "as θT",
            "mean_cache": used_cache,
            "seconds": round(time.perf_counter() - start, 3),
        })
    return out


def _out_dtype(stored: str, requested: str | None) -> str:
    return requested if requested is not None and stored in FLOAT_DTYPES else stored


def _set_config_dtype(path: Path, dtype: str) -> None:
    if path.exists():
        cfg = json.loads(path.read_text())
        key = "dtype" if "dtype" in cfg else "torch_dtype"
        cfg[key] = torch_name(dtype)
        path.write_text(json.dumps(cfg, indent=2) + "\n")


def _non_finite_message(name: str, readers: Sequence[CheckpointReader], k: Sequence[float]) -> str:
    for r in readers:
        if not all_finite(r.read(name), r.dtype(name)):
            return f"{r.path}: tensor {name!r} holds NaN or Inf; this input is corrupt — re-save it from a healthy run"
    return (
        f"tensor {name!r}: the merge with k={[round(x, 4) for x in k]} overflows to Inf/NaN in the output dtype; "
        "use a smaller |alpha| or --dtype float32"
    )
