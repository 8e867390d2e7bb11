"""Merging iterative-DPO checkpoints: Algorithm 2, eq. (9)-(10), streamed to disk or applied in memory."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, as_completed, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from itermerge import __version__
from itermerge import checkpoint as ckpt
from itermerge.checkpoint import (
    FLOAT_DTYPES,
    ST_STORAGE,
    CheckpointReader,
    ShardedWriter,
    all_finite,
    check_compatible,
    copy_metadata,
    from_float32,
    parse_dtype,
    parse_size,
    to_float32,
    torch_name,
)
from itermerge.errors import ItermergeError
from itermerge.rundir import atomic_dir, atomic_write_json

if TYPE_CHECKING:
    import torch


# --- the paper's arithmetic -------------------------------------------------------------------


def merge_weights(T: int, lam: float, alpha: float) -> list[float]:
    """Eq. (10): the weights k_1..k_T of the T iterative-DPO checkpoints.

        k_t = (1+α) λ / (T−1)   for t < T          (direction: λ, shared by θ1..θ_{T−1})
        k_T = (1+α) (1−λ)                          (magnitude: 1+α = Σ k_t)

    With eq. (9) this is Algorithm 2: θ = −α θ0 + (1+α) λ θ̄ + (1+α)(1−λ) θ_T.
    T = 1 leaves θ̄ undefined, so λ must be 0 there (ExPO: θ0 + (1+α)(θ1 − θ0)).
    """
    for name, value in (("lam", lam), ("alpha", alpha)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ItermergeError(f"{name}={value!r}: must be a finite number")
    if T < 1:
        raise ItermergeError(f"T={T}: a merge needs at least one checkpoint θ1")
    if T == 1:
        if lam != 0:
            raise ItermergeError(
                f"lam={lam} with T=1: θ̄ (the mean of θ1..θ_(T−1)) is undefined for a single checkpoint; use lam=0 "
                "(then alpha alone scales θ1 − θ0) or pass more checkpoints"
            )
        return [1.0 + alpha]
    k_intermediate = (1.0 + alpha) * lam / (T - 1)
    return [k_intermediate] * (T - 1) + [(1.0 + alpha) * (1.0 - lam)]


def resolve_weights(T: int, lam: float | None, alpha: float | None, weights: Sequence[float] | None) -> list[float]:
    """Either (λ, α) of eq. (10) or explicit k_1..k_T of eq. (9), never both."""
    if weights is not None:
        if lam is not None or alpha is not None:
            raise ItermergeError("give either --weights (eq. 9) or --lam/--alpha (eq. 10), not both")
        weights = [float(k) for k in weights]
        if len(weights) != T:
            raise ItermergeError(f"--weights has {len(weights)} values but there are {T} checkpoints θ1..θT; give one k_t per checkpoint")
        bad = [k for k in weights if not math.isfinite(k)]
        if bad:
            raise ItermergeError(f"--weights {bad[0]!r}: every k_t must be a finite number")
        return weights
    return merge_weights(T, 0.0 if lam is None else lam, 0.0 if alpha is None else alpha)


def intermediate_total(k: Sequence[float]) -> float:
    """k̄ = Σ_{t<T} k_t for equal intermediate weights (eq. 10): the weight of θ̄ when θ̄ replaces θ1..θ_{T−1}."""
    return k[0] * (len(k) - 1) if len(k) > 1 else 0.0


def eq9_block(out: np.ndarray, base: np.ndarray, sources: Sequence[np.ndarray], weights: Sequence[float], tmp: np.ndarray) -> np.ndarray:
    """Eq. (9) on one float32 block: out = θ0 + Σ_m k_m (θ_m − θ0), the weighted deltas summed first.

    Summing the small deltas before adding θ0 once keeps the result within one float32 rounding of
    the float64 formula. Every product and sum is rounded separately (no fused multiply-add), so the
    streamed merge, ``task_arithmetic`` and ``MergeBasis`` agree bit for bit. ``out`` and ``tmp`` are
    scratch of the block's length and must not alias the inputs.
    """
    for m, (x, k) in enumerate(zip(sources, weights)):
        d = out if m == 0 else tmp
        np.subtract(x, base, out=d)
        np.multiply(d, np.float32(k), out=d)
        if m:
            np.add(out, tmp, out=out)
    if not sources:
        out[...] = 0.0
    np.add(base, out, out=out)
    return out


def task_arithmetic(base: torch.Tensor, others: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Eq. (9) for one tensor: θ0 + Σ_t k_t (θ_t − θ0), in float32 whatever the storage dtype.

    The coefficient vector (1 − Σk, k_1, …, k_T) on (θ0, θ1, …, θT) that is a unit vector returns
    that input exactly. Shapes: every tensor the same shape (*S); returns (*S) float32.
    """
    import torch

    live = [(x, k) for x, k in zip(others, weights) if k != 0.0]
    if not live:
        return base.float().clone()
    if len(live) == 1 and live[0][1] == 1.0:
        return live[0][0].float().clone()
    arrays = [t.detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy() for t in (base, *(x for x, _ in live))]
    out = np.empty_like(arrays[0])
    tmp = np.empty(min(ckpt.CHUNK, out.size), dtype=np.float32)
    for i in range(0, out.size, ckpt.CHUNK):
        j = min(i + ckpt.CHUNK, out.size)
        eq9_block(out[i:j], arrays[0][i:j], [a[i:j] for a in arrays[1:]], [k for _, k in live], tmp[: j - i])
    return torch.from_numpy(out).view(base.shape)


def merge_state_dicts(
    reference: Mapping[str, torch.Tensor],
    checkpoints: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
) -> dict[str, torch.Tensor]:
    """Eq. (9) in memory: {name: θ0 + Σ k_t (θ_t − θ0)} in float32, for every tensor of θ0."""
    if len(weights) != len(checkpoints):
        raise ItermergeError(f"{len(weights)} weights for {len(checkpoints)} checkpoints; give one k_t per checkpoint")
    merged = {}
    for name, base in reference.items():
        missing = [t + 1 for t, sd in enumerate(checkpoints) if name not in sd]
        if missing:
            raise ItermergeError(f"tensor {name!r} is in θ0 but not in θ{missing[0]}; the checkpoints must share an architecture")
        merged[name] = task_arithmetic(base, [sd[name] for sd in checkpoints], weights)
    return merged


# --- the streaming engine: blocks of every tensor on a thread pool --------------------------------


class _Scratch:
    """One worker's buffers, reused for every block: a few MiB, whatever the model's size."""

    def __init__(self) -> None:
        self._bufs: dict[Any, np.ndarray] = {}

    def get(self, key: Any, dtype: Any) -> np.ndarray:
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = np.empty(ckpt.CHUNK * 8, dtype=np.uint8)
        return buf.view(dtype)


BlockFn = Callable[[str, int, _Scratch], np.ndarray]


def _stream(writer: ShardedWriter, plan: Sequence[tuple[str, tuple[int, ...], str]], numel: Mapping[str, int],
            block: BlockFn, desc: str, progress: bool) -> None:
    """Compute every CHUNK-element block of every planned tensor with ``block``, write it in place, close the writer.

    Blocks run on one thread per core (numpy releases the GIL), each with its own scratch buffers,
    so the working set is a few MiB per core plus what numpy allocates; a failing block cancels the rest.
    """
    jobs = [(name, i) for name, _, _ in plan for i in range(ckpt.n_chunks(numel[name]))]
    local = threading.local()

    def run(job: tuple[str, int]) -> int:
        scratch = getattr(local, "scratch", None)
        if scratch is None:
            scratch = local.scratch = _Scratch()
        name, i = job
        raw = block(name, i, scratch)
        writer.write(name, i * ckpt.CHUNK, raw)
        return raw.nbytes

    workers = max(1, min(os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=writer.total_size, desc=desc, unit="B", unit_scale=True, disable=not progress,
    ) as bar:
        pending: set = set()
        try:
            for job in jobs:  # a bounded window of blocks in flight
                pending.add(pool.submit(run, job))
                if len(pending) >= 4 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    bar.update(sum(f.result() for f in done))
            for f in as_completed(pending):
                bar.update(f.result())
        except BaseException:  # an error or Ctrl-C: drop the queued blocks, let running ones finish
            for f in pending:
                f.cancel()
            writer.abort()
            raise
    writer.close()


def _chunk_len(reader: CheckpointReader, name: str, i: int) -> int:
    return min(ckpt.CHUNK, reader.numel(name) - i * ckpt.CHUNK)


def _float_block(reader: CheckpointReader, name: str, i: int, scratch: _Scratch, slot: int) -> np.ndarray:
    """Block i of a tensor as float32 (read through the reader, so it is digested on the way)."""
    st = reader.dtype(name)
    raw = reader.read_chunk(name, i, scratch.get(("raw", slot), ST_STORAGE[st]))
    return to_float32(raw, st, scratch.get(("f32", slot), np.float32)[: raw.size])


def _read_for_hash(readers: Sequence[CheckpointReader], name: str, i: int, scratch: _Scratch) -> None:
    """Read block i of inputs that the block does not otherwise need, only so their content hash is complete."""
    for r in readers:
        r.read_chunk(name, i, scratch.get("hash", ST_STORAGE[r.dtype(name)]))


def _encode(x: np.ndarray, st: str, scratch: _Scratch) -> np.ndarray:
    return from_float32(x, st, scratch.get("out", ST_STORAGE[st])[: x.size], scratch.get("bits", np.uint32)[: x.size])


# --- θ̄, the cached mean of the intermediate checkpoints --------------------------------------


def mean_checkpoint(checkpoints: Sequence[str | os.PathLike], out: str | os.PathLike, force: bool = False, progress: bool = True) -> Path:
    """Write θ̄ = mean(θ1..θ_{T−1}) in float32 with ``mean.json`` recording its inputs' content hashes."""
    if not checkpoints:
        raise ItermergeError("the mean of intermediate checkpoints needs at least one checkpoint")
    readers = [CheckpointReader(p) for p in checkpoints]
    check_compatible(readers)
    first, n = readers[0], np.float32(len(readers))
    names = first.keys()
    plan = [(name, first.shape(name), "F32" if first.dtype(name) in FLOAT_DTYPES else first.dtype(name)) for name in names]
    _refuse_fp8(first, names)

    def block(name: str, i: int, scratch: _Scratch) -> np.ndarray:
        if first.dtype(name) not in FLOAT_DTYPES:
            _read_for_hash(readers[:-1], name, i, scratch)
            return readers[-1].read_chunk(name, i, scratch.get("out", ST_STORAGE[readers[-1].dtype(name)]))
        acc = scratch.get("acc", np.float32)[: _chunk_len(first, name, i)]
        for m, r in enumerate(readers):
            x = _float_block(r, name, i, scratch, 0)
            if m == 0:
                np.copyto(acc, x)
            else:
                np.add(acc, x, out=acc)
        return np.divide(acc, n, out=acc)

    with atomic_dir(out, force=force) as tmp:
        writer = ShardedWriter(tmp, plan)
        _stream(writer, plan, {name: first.numel(name) for name in names}, block, "θ̄ = mean(θ1..θT−1)", progress)
        copy_metadata(readers[-1], tmp)
        atomic_write_json(tmp / "mean.json", {
            "itermerge_version": __version__,
            "what": "mean of intermediate checkpoints θ1..θ_(T−1) (Algorithm 2's θ̄), float32",
            "inputs": [{"path": str(r.path), "hash": r.content_hash(), "files": r.file_stats()} for r in readers],
        })
    return Path(out)


def _mean_cache_hashes(cache: Path, intermediates: Sequence[CheckpointReader]) -> list[str] | None:
    """The inputs' hashes if ``cache`` holds θ̄ of exactly these checkpoints, else None.

    A recorded hash is trusted when the files' sizes and modification times are unchanged (as git
    and make do); otherwise the checkpoints are hashed again and compared.
    """
    meta = cache / "mean.json"
    if not meta.exists():
        return None
    recorded = json.loads(meta.read_text()).get("inputs", [])
    if len(recorded) != len(intermediates):
        return None
    hashes = []
    for entry, r in zip(recorded, intermediates):
        if entry.get("files") != r.file_stats() and entry.get("hash") != r.content_hash():
            return None
        hashes.append(entry.get("hash"))
    return hashes


def _refuse_fp8(reader: CheckpointReader, names: Sequence[str]) -> None:
    fp8 = [n for n in names if reader.dtype(n).startswith("F8")]
    if fp8:
        raise ItermergeError(
            f"{reader.path}: tensor {fp8[0]!r} is {reader.dtype(fp8[0])}; float8 checkpoints cannot be merged "
            "in float32 faithfully — dequantise them to bfloat16 or float32 first"
        )


# --- Algorithm 2 on disk, streamed --------------------------------------------------------------


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
    _refuse_fp8(base, names)

    # The sources actually read: (reader, k) with k ≠ 0; θ̄ stands in for θ1..θ_{T−1} when it can.
    sources = list(zip(trained, k))
    known: dict[str, str] = {}  # content hashes vouched for by the θ̄ cache's record
    used_cache = None
    T = len(trained)
    if mean_cache is not None and T >= 3 and len(set(k[:-1])) == 1 and k[0] != 0.0:
        cache = Path(mean_cache)
        hashes = _mean_cache_hashes(cache, trained[:-1])
        if hashes is None:
            mean_checkpoint([r.path for r in trained[:-1]], cache, force=True, progress=progress)
            hashes = _mean_cache_hashes(cache, trained[:-1])
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

    def block(name: str, i: int, scratch: _Scratch) -> np.ndarray:
        _read_for_hash(hash_only, name, i, scratch)
        st = out_st[name]
        if st not in FLOAT_DTYPES:  # integer buffers (rare): θT's, as save_pretrained would write them
            _read_for_hash([r for r in [base, *srcs] if r is not last], name, i, scratch)
            return last.read_chunk(name, i, scratch.get("out", ST_STORAGE[st]))
        if exact is not None:
            _read_for_hash([r for r in [base, *srcs] if r is not exact], name, i, scratch)
            raw = exact.read_chunk(name, i, scratch.get(("raw", 0), ST_STORAGE[exact.dtype(name)]))
            if exact.dtype(name) == st:
                if not all_finite(raw, st):
                    raise ItermergeError(_non_finite_message(name, [exact], k))
                return raw
            merged = to_float32(raw, exact.dtype(name), scratch.get(("f32", 0), np.float32)[: raw.size])
        else:
            theta0 = _float_block(base, name, i, scratch, 0)
            xs = [_float_block(r, name, i, scratch, m + 1) for m, r in enumerate(srcs)]
            merged = eq9_block(scratch.get("acc", np.float32)[: theta0.size], theta0, xs, ks, scratch.get("tmp", np.float32)[: theta0.size])
        if not all_finite(merged, "F32"):
            raise ItermergeError(_non_finite_message(name, [base, *srcs], k))
        encoded = _encode(merged, st, scratch)
        if st != "F32" and not all_finite(encoded, st):
            raise ItermergeError(_non_finite_message(name, [], k))
        return encoded

    with atomic_dir(out, force=force) as tmp:
        writer = ShardedWriter(tmp, plan, max_bytes)
        _stream(writer, plan, {n: base.numel(n) for n in names}, block, "merging", progress)
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


# --- Algorithm 2 in memory, for the search ------------------------------------------------------


class MergeBasis:
    """θ0 and the deltas θ̄ − θ0, θT − θ0 in float32, so that any (λ, α) point is three passes over memory.

    ``apply_to(model, lam, alpha)`` overwrites the model's parameters with eq. (10)'s merge in place:
    θ0 + (k̄ (θ̄ − θ0) + k_T (θT − θ0)), the same elementwise operations as `eq9_block`, so a point
    equals the streamed merge with a θ̄ cache bit for bit (except where that merge copies an input
    exactly: λ = 0 with α = 0, or λ = 1 with α = 0, which differ here by at most one rounding).
    """

    def __init__(self, theta0: Mapping[str, torch.Tensor], theta_bar: Mapping[str, torch.Tensor] | None, theta_T: Mapping[str, torch.Tensor], T: int):
        self.T = T
        self.theta0 = {n: _f32(t) for n, t in theta0.items()}
        self.delta_T = {n: np.subtract(_f32(theta_T[n]), t) for n, t in self.theta0.items()}
        self.delta_bar = None if theta_bar is None else {n: np.subtract(_f32(theta_bar[n]), t) for n, t in self.theta0.items()}

    @classmethod
    def from_checkpoints(cls, reference: str | os.PathLike, checkpoints: Sequence[str | os.PathLike], mean_cache: str | os.PathLike | None = None) -> MergeBasis:
        readers = [CheckpointReader(p) for p in [reference, *checkpoints]]
        check_compatible(readers)
        theta_bar = None
        if len(checkpoints) == 2:
            theta_bar = _load_float32(readers[1])
        elif len(checkpoints) > 2:
            if mean_cache is None:
                raise ItermergeError("MergeBasis with T ≥ 3 needs mean_cache: a directory for θ̄ (it is created if absent)")
            cache = Path(mean_cache)
            if _mean_cache_hashes(cache, readers[1:-1]) is None:
                mean_checkpoint([r.path for r in readers[1:-1]], cache, force=True)
            theta_bar = _load_float32(CheckpointReader(cache))
        return cls(_load_float32(readers[0]), theta_bar, _load_float32(readers[-1]), T=len(checkpoints))

    def weights(self, lam: float, alpha: float) -> tuple[float, float]:
        """(k̄, k_T): θ = θ0 + k̄ (θ̄ − θ0) + k_T (θT − θ0), with k̄ = Σ_{t<T} k_t = (1+α) λ."""
        k = merge_weights(self.T, lam, alpha)
        return intermediate_total(k), k[-1]

    def _merge_into(self, out: np.ndarray, name: str, k_bar: float, k_T: float) -> None:
        """out = (k̄ D̄ + k_T D_T) + θ0 over a flat float32 array, block by block, with no allocation but one block."""
        theta0, d_T = self.theta0[name].reshape(-1), self.delta_T[name].reshape(-1)
        d_bar = None if self.delta_bar is None or k_bar == 0.0 else self.delta_bar[name].reshape(-1)
        tmp = np.empty(min(ckpt.CHUNK, out.size), dtype=np.float32) if d_bar is not None and k_T != 0.0 else None
        for i in range(0, out.size, ckpt.CHUNK):
            j = min(i + ckpt.CHUNK, out.size)
            o = out[i:j]
            if d_bar is None:
                np.multiply(d_T[i:j], np.float32(k_T), out=o)
            else:
                np.multiply(d_bar[i:j], np.float32(k_bar), out=o)
                if tmp is not None:
                    np.multiply(d_T[i:j], np.float32(k_T), out=tmp[: j - i])
                    np.add(o, tmp[: j - i], out=o)
            np.add(theta0[i:j], o, out=o)

    def merged_tensor(self, name: str, lam: float, alpha: float) -> torch.Tensor:
        import torch

        out = np.empty(self.theta0[name].shape, dtype=np.float32)
        self._merge_into(out.reshape(-1), name, *self.weights(lam, alpha))
        return torch.from_numpy(out)

    def apply_to(self, model: torch.nn.Module, lam: float, alpha: float) -> None:
        import torch

        params = dict(model.named_parameters())  # tied weights appear once
        missing = sorted(set(params) - set(self.theta0))
        if missing:
            raise ItermergeError(f"model parameter {missing[0]!r} is not in θ0's checkpoint; load the model from the same architecture")
        k_bar, k_T = self.weights(lam, alpha)
        with torch.no_grad():
            direct = {n: p for n, p in params.items() if p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous()}
            for name, p in params.items():  # GPU or non-fp32 parameters: merge on the CPU, then copy
                if name not in direct:
                    p.copy_(self.merged_tensor(name, lam, alpha))
            workers = max(1, min(os.cpu_count() or 1, 8))
            with ThreadPoolExecutor(max_workers=workers) as pool:  # numpy releases the GIL
                list(pool.map(lambda item: self._merge_into(item[1].detach().numpy().reshape(-1), item[0], k_bar, k_T), direct.items()))


def _f32(t: Any) -> np.ndarray:
    """A torch tensor or array as a contiguous float32 numpy array (a copy only when needed)."""
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t, dtype=np.float32)
    import torch

    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def _load_float32(reader: CheckpointReader) -> dict[str, np.ndarray]:
    """Every floating-point tensor of a checkpoint as float32 arrays."""
    out = {}
    for name in reader:
        st = reader.dtype(name)
        if st in FLOAT_DTYPES:
            raw = reader.read(name)
            out[name] = (raw if st == "F32" else to_float32(raw, st, np.empty(raw.size, dtype=np.float32))).reshape(reader.shape(name))
    return out


def mergekit_config(reference: str | os.PathLike, checkpoints: Sequence[str | os.PathLike], weights: Sequence[float], dtype: str | torch.dtype | None = None) -> str:
    """The mergekit YAML that reproduces eq. (9): task arithmetic with base θ0, unnormalised, float32 compute."""
    lines = [
        "# Reproduces `itermerge merge` with mergekit (mergekit-yaml THIS_FILE OUT_DIR):",
        "# eq. (9) is task arithmetic with base θ0 and weights k_t, unnormalised, computed in float32.",
        "merge_method: task_arithmetic",
        f"base_model: {json.dumps(str(reference))}",
        "models:",
    ]
    for path, k in zip(checkpoints, weights):
        if k != 0.0:
            lines += [f"  - model: {json.dumps(str(path))}", "    parameters:", f"      weight: {k!r}"]
    lines += ["parameters:", "  normalize: false", "dtype: float32"]
    st = parse_dtype(dtype)
    if st is not None:
        lines.append(f"out_dtype: {torch_name(st)}")
    return "\n".join(lines) + "\n"
