"""Algorithm 2 and its neighbours on disk: θ = θ0 + Σ k_t (θ_t − θ0) streamed block by block to sharded safetensors."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from itermerge import __version__
from itermerge.checkpoint import dtypes
from itermerge.checkpoint.dtypes import FLOAT_DTYPES, ST_STORAGE, all_finite, parse_dtype, to_float32, torch_name
from itermerge.checkpoint.reader import CheckpointReader, check_compatible
from itermerge.checkpoint.writer import ShardedWriter, copy_metadata, parse_size
from itermerge.errors import ItermergeError
from itermerge.maths.merge import eq9_block, intermediate_total
from itermerge.merging.engine import (
    Scratch,
    Source,
    encode_block,
    float_block,
    read_for_hash,
    refuse_fp8,
    stream_blocks,
)
from itermerge.merging.first_pass import gram_matrices, top_magnitudes
from itermerge.merging.mean import mean_cache_hashes, mean_checkpoint
from itermerge.operators import Operator, Resolved
from itermerge.operators.base import Kernel
from itermerge.operators.ties import TopK
from itermerge.rundir import atomic_dir, atomic_write_json

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class _TensorPlan:
    """How one float tensor is merged: its sources with non-zero k, the operator's kernel (None: eq. 9) and its
    state for this tensor, and what else is read."""

    sources: tuple[Source, ...]
    weights: tuple[float, ...]
    kernel: Kernel | None = None  # TIES, DARE: a rule on the task vectors; None: eq. (9)
    state: Any = None  # the kernel's per-tensor state: TIES's top-k, DARE's seeds
    exact: CheckpointReader | None = None  # a unit coefficient vector: this input, copied bit for bit
    hash_only: tuple[CheckpointReader, ...] = ()  # inputs read only so that their content hash is complete


def merge_checkpoints(
    reference: str | os.PathLike,
    checkpoints: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    op: Operator,
    *,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    max_shard_size: str | int = "5GB",
    mean_cache: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Write θ = θ0 + Σ k_t (θ_t − θ0) (eq. 9, with eq. 10's k_t from λ, α), or another operator, as an HF checkpoint.

    ``op``: a merge operator with its parameters (``itermerge.operators.operator("paper", lam=0.3, alpha=0.4)``,
    ``operator("ties", …)``; docs/design.md lists them). Operators whose weights depend on each tensor (SLERP's and
    Model Stock's angles, TIES's top-k) first stream those statistics (merging/first_pass.py); every operator then
    streams blocks of every tensor from the safetensors files, computes in float32, writes sharded safetensors
    (``dtype``: 'bfloat16', 'float16', 'float32' or a torch dtype; default each tensor's dtype in θT), copies config
    and tokenizer from θT, and records the inputs, their content hashes, the operator and its parameters in
    ``merge.json``. The output appears under ``out`` only when complete. ``mean_cache``: a θ̄ directory (made by
    ``mean_checkpoint``, created there if absent) used when the intermediate k_t of every tensor are equal (and by
    SLERP), so that only θ0, θ̄ and θT are read.
    """
    start = time.perf_counter()
    if not checkpoints:
        raise ItermergeError("--checkpoints is empty: give θ1..θT, the checkpoints of iterative DPO in order")
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
    floats = [n for n in names if base.dtype(n) in FLOAT_DTYPES]
    chosen, op = op, op.resolve(len(trained), floats)
    theta_bar, known, used_cache = _theta_bar(op, trained, floats, mean_cache, progress)
    plans = _plans(op, readers, theta_bar, floats, known, progress)
    plan = [(n, base.shape(n), _out_dtype(last.dtype(n), out_dtype)) for n in names]
    out_st = {n: st for n, _, st in plan}
    int_hash = [r for r in readers if r is not last and str(r.path) not in known]

    def block(name: str, i: int, scratch: Scratch) -> np.ndarray:
        st = out_st[name]
        if st not in FLOAT_DTYPES:  # integer buffers (rare): θT's, as save_pretrained would write them
            read_for_hash(int_hash, name, i, scratch)
            return last.read_chunk(name, i, scratch.get("out", ST_STORAGE[st]))
        return _merged_block(plans[name], base, name, i, st, scratch)

    with atomic_dir(out, force=force) as tmp:
        writer = ShardedWriter(tmp, plan, max_bytes)
        stream_blocks(writer, plan, {n: base.numel(n) for n in names}, block, "merging", progress)
        copy_metadata(last, tmp)
        if out_dtype is not None:
            _set_config_dtype(tmp / "config.json", out_dtype)
        hashes = {str(r.path): known.get(str(r.path)) or r.content_hash() for r in readers}
        atomic_write_json(tmp / "merge.json", {
            "itermerge_version": __version__,
            **described(chosen, op),
            "reference": {"path": str(base.path), "hash": hashes[str(base.path)]},
            "checkpoints": [{"path": str(r.path), "hash": hashes[str(r.path)]} for r in trained],
            "weights": None if op.weights is None else list(op.weights),
            "reference_weight": None if op.weights is None else 1.0 - sum(op.weights),
            "dtype": torch_name(out_dtype) if out_dtype is not None else "as θT",
            "mean_cache": used_cache,
            "seconds": round(time.perf_counter() - start, 3),
        })
    return out


def _merged_block(p: _TensorPlan, base: CheckpointReader, name: str, i: int, st: str, scratch: Scratch
                  ) -> np.ndarray:
    """Block i of one float tensor, merged as its plan says (an exact copy, eq. 9, or the operator's kernel on the
    task vectors) and encoded in ``st``; a non-finite input or result is a named error."""
    read_for_hash(p.hash_only, name, i, scratch)
    inputs = [base, *(r for s in p.sources for r in s.readers)]
    if p.exact is not None:
        raw = p.exact.read_chunk(name, i, scratch.get(("raw", 0), ST_STORAGE[p.exact.dtype(name)]))
        if p.exact.dtype(name) == st:
            if not all_finite(raw, st):
                raise ItermergeError(_non_finite_message(name, [p.exact], p.weights))
            return raw
        merged = to_float32(raw, p.exact.dtype(name), scratch.get(("f32", 0), np.float32)[: raw.size])
    else:
        theta0 = float_block(base, name, i, scratch, 0)
        xs = [s.block(name, i, scratch, m + 1) for m, s in enumerate(p.sources)]
        acc, tmp = (scratch.get(key, np.float32)[: theta0.size] for key in ("acc", "tmp"))
        if p.kernel is None:
            merged = eq9_block(acc, theta0, xs, p.weights, tmp)
        else:
            deltas = [np.subtract(x, theta0, out=scratch.get(("d", m), np.float32)[: x.size])
                      for m, x in enumerate(xs)]
            merged = p.kernel(acc, theta0, deltas, p.weights, p.state, i * dtypes.CHUNK, tmp)
    if not all_finite(merged, "F32"):
        raise ItermergeError(_non_finite_message(name, inputs, p.weights))
    encoded = encode_block(merged, st, scratch)
    if st != "F32" and not all_finite(encoded, st):
        raise ItermergeError(_non_finite_message(name, [], p.weights))
    return encoded


def _theta_bar(
    op: Resolved, trained: Sequence[CheckpointReader], floats: Sequence[str], mean_cache: str | os.PathLike | None,
    progress: bool,
) -> tuple[Source | None, dict[str, str], str | None]:
    """θ̄ as a source when the operator reads it (an angle rule on (θ̄, θT) such as SLERP, or equal intermediate k_t
    with a cache), the content hashes its cache vouches for, and the cache's path if one is used."""
    T = len(trained)
    on_mean = op.gram is not None and op.gram.on == "mean_last"
    if on_mean and T == 2:
        return Source(trained[:1]), {}, None
    if on_mean and mean_cache is None:
        return Source(trained[:-1]), {}, None  # θ̄ computed as it streams
    if not on_mean:
        ks = [op.weights_for(n) for n in floats] if op.linear and mean_cache is not None and T >= 3 else []
        if not ks or any(len(set(k[:-1])) > 1 for k in ks) or all(k[0] == 0.0 for k in ks):
            return None, {}, None
    cache = Path(mean_cache)
    hashes = mean_cache_hashes(cache, trained[:-1])
    if hashes is None:
        mean_checkpoint([r.path for r in trained[:-1]], cache, force=True, progress=progress)
        hashes = mean_cache_hashes(cache, trained[:-1])
    return Source([CheckpointReader(cache)]), {str(r.path): h for r, h in zip(trained[:-1], hashes)}, str(cache)


def _plans(op: Resolved, readers: Sequence[CheckpointReader], theta_bar: Source | None, floats: Sequence[str],
           known: Mapping[str, str], progress: bool) -> dict[str, _TensorPlan]:
    """Each float tensor's sources and weights (zeros dropped), with the first passes the operator asks for run here."""
    base, trained = Source(readers[:1]), [Source([r]) for r in readers[1:]]
    plans = {}
    if op.kernel is not None:
        ts = [t for t, k in enumerate(op.weights, start=1) if k != 0.0]
        state = op.kernel.prepare(_Passes(base, trained, floats, progress), ts, floats) if ts else {}
        for name in floats:
            plans[name] = _TensorPlan(tuple(trained[t - 1] for t in ts), tuple(op.weights[t - 1] for t in ts),
                                      op.kernel, state.get(name))
    elif op.gram is not None:
        sources = [theta_bar, trained[-1]] if op.gram.on == "mean_last" else trained
        grams = gram_matrices(base, sources, floats, f"{op.method}: angles", progress)
        for name in floats:
            plans[name] = _TensorPlan(*_nonzero(zip(sources, op.gram.weights(grams[name]))))
    else:
        for name in floats:
            k = op.weights_for(name)
            terms = zip(trained, k) if theta_bar is None else [(theta_bar, intermediate_total(k)), (trained[-1], k[-1])]
            plans[name] = _TensorPlan(*_nonzero(terms))
    for name, p in plans.items():
        exact = readers[0] if not p.sources else None
        if p.kernel is None and len(p.sources) == 1 and p.weights[0] == 1.0:
            exact = p.sources[0].reader
        used = {id(exact)} if exact is not None else {id(readers[0]), *(id(r) for s in p.sources for r in s.readers)}
        hash_only = tuple(r for r in readers if id(r) not in used and str(r.path) not in known)
        plans[name] = dataclasses.replace(p, exact=exact, hash_only=hash_only)
    return plans


@dataclass(frozen=True)
class _Passes:
    """The first passes an operator's kernel may ask for (``operators.base.FirstPasses``), over θ0 and θ1..θT."""

    base: Source
    trained: Sequence[Source]
    names: Sequence[str]
    progress: bool

    def top_magnitudes(self, ts: Sequence[int], density: float) -> dict[str, list[TopK | None]]:
        return top_magnitudes(self.base, [self.trained[t - 1] for t in ts], self.names, density, self.progress)


def described(chosen: Operator, op: Resolved) -> dict[str, Any]:
    """merge.json's words for the operator: its description and parameters, and (λ, α) where the paper's merge used
    them."""
    paper = op.method == "paper" and "weights" not in chosen.params
    return {"method": chosen.spec.description, "operator": op.params,
            "lam": chosen.params.get("lam") if paper else None, "alpha": chosen.params.get("alpha") if paper else None}


def _nonzero(terms) -> tuple[tuple[Source, ...], tuple[float, ...]]:
    kept = [(s, k) for s, k in terms if k != 0.0]
    return tuple(s for s, _ in kept), tuple(k for _, k in kept)


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
