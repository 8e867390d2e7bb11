"""Merging iterative-DPO checkpoints: Algorithm 2, eq. (9)-(10), streamed to disk or applied in memory."""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from itermerge import __version__
from itermerge.checkpoint import CheckpointReader, ShardedWriter, check_compatible, copy_metadata, parse_size
from itermerge.errors import ItermergeError
from itermerge.rundir import atomic_dir, atomic_write_json

CHUNK = 1 << 18  # elements per block: the block's fp32 buffers stay in cache across all inputs


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


def task_arithmetic(base: torch.Tensor, others: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Eq. (9) for one tensor: θ0 + Σ_t k_t (θ_t − θ0), in float32 whatever the storage dtype.

    The weighted deltas are summed first and θ0 is added once, so the result is within one float32
    rounding of the float64 formula (the deltas are small next to θ0). The coefficient vector
    (1 − Σk, k_1, …, k_T) on (θ0, θ1, …, θT) that is a unit vector returns that input exactly.
    Shapes: every tensor the same shape (*S); returns (*S) float32.
    """
    live = [(x, k) for x, k in zip(others, weights) if k != 0.0]
    if not live:
        return base.float().clone()
    if len(live) == 1 and live[0][1] == 1.0:
        return live[0][0].float().clone()
    out = torch.empty(base.shape, dtype=torch.float32)
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flats = [(x.reshape(-1), k) for x, k in live]
    n = flat_out.numel()
    acc = torch.empty(min(CHUNK, n), dtype=torch.float32)
    tmp = torch.empty_like(acc)
    for i in range(0, n, CHUNK):
        j = min(i + CHUNK, n)
        a, d, b = acc[: j - i], tmp[: j - i], flat_base[i:j]
        for m, (x, k) in enumerate(flats):
            torch.sub(x[i:j], b, out=d)
            if m == 0:
                torch.mul(d, k, out=a)
            else:
                a.add_(d, alpha=k)
        torch.add(b, a, out=flat_out[i:j])
    return out


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


# --- θ̄, the cached mean of the intermediate checkpoints --------------------------------------


def mean_checkpoint(checkpoints: Sequence[str | os.PathLike], out: str | os.PathLike, force: bool = False, progress: bool = True) -> Path:
    """Write θ̄ = mean(θ1..θ_{T−1}) in float32 with ``mean.json`` recording its inputs' content hashes."""
    if not checkpoints:
        raise ItermergeError("the mean of intermediate checkpoints needs at least one checkpoint")
    readers = [CheckpointReader(p) for p in checkpoints]
    check_compatible(readers)
    names = readers[0].keys()
    plan = [(n, readers[0].shape(n), torch.float32 if readers[0].dtype(n).is_floating_point else readers[0].dtype(n)) for n in names]
    with atomic_dir(out, force=force) as tmp:
        writer = ShardedWriter(tmp, plan)
        for name in tqdm(names, desc="θ̄ = mean(θ1..θT−1)", unit="tensor", disable=not progress):
            tensors = [r.get(name) for r in readers]
            if tensors[0].is_floating_point():
                acc = tensors[0].float().clone()
                for x in tensors[1:]:
                    acc.add_(x)
                writer.add(name, acc.div_(len(tensors)))
            else:
                writer.add(name, tensors[-1].clone())
        writer.close()
        copy_metadata(readers[-1], tmp)
        atomic_write_json(tmp / "mean.json", {
            "itermerge_version": __version__,
            "what": "mean of intermediate checkpoints θ1..θ_(T−1) (Algorithm 2's θ̄), float32",
            "inputs": [{"path": str(r.path), "hash": r.content_hash()} for r in readers],
        })
    return Path(out)


def _valid_mean_cache(cache: Path, intermediates: Sequence[CheckpointReader]) -> bool:
    meta = cache / "mean.json"
    if not meta.exists():
        return False
    recorded = [i["hash"] for i in json.loads(meta.read_text()).get("inputs", [])]
    return recorded == [r.content_hash() for r in intermediates]


# --- Algorithm 2 on disk, streamed --------------------------------------------------------------


def merge_checkpoints(
    reference: str | os.PathLike,
    checkpoints: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    lam: float | None = None,
    alpha: float | None = None,
    weights: Sequence[float] | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    max_shard_size: str | int = "5GB",
    mean_cache: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Write θ = θ0 + Σ k_t (θ_t − θ0) (eq. 9, with eq. 10's k_t from λ, α) as an HF checkpoint.

    Streams one tensor at a time from memory-mapped safetensors, computes in float32, writes
    sharded safetensors (``dtype``: default each tensor's dtype in θT), copies config and tokenizer
    from θT, and records the inputs, their content hashes and the k_t in ``merge.json``. The output
    appears under ``out`` only when complete. ``mean_cache``: a θ̄ directory (made by
    ``mean_checkpoint``, created there if absent) used when the intermediate k_t are equal, so that
    only θ0, θ̄ and θT are read.
    """
    start = time.perf_counter()
    if not checkpoints:
        raise ItermergeError("--checkpoints is empty: give θ1..θT, the checkpoints of iterative DPO in order")
    k = resolve_weights(len(checkpoints), lam, alpha, weights)
    max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    out = Path(out)
    if out.exists() and not force:
        raise ItermergeError(f"{out}: output directory exists; choose another path or pass --force to replace it")
    readers = [CheckpointReader(p) for p in [reference, *checkpoints]]
    check_compatible(readers)
    base, trained, last = readers[0], readers[1:], readers[-1]

    # The sources actually read: (reader, k) with k ≠ 0; θ̄ stands in for θ1..θ_{T−1} when it can.
    sources = [(r, kt) for r, kt in zip(trained, k)]
    used_cache = None
    T = len(trained)
    if mean_cache is not None and T >= 3 and len(set(k[:-1])) == 1 and k[0] != 0.0:
        cache = Path(mean_cache)
        if not _valid_mean_cache(cache, trained[:-1]):
            mean_checkpoint([r.path for r in trained[:-1]], cache, force=True, progress=progress)
        sources = [(CheckpointReader(cache), intermediate_total(k)), (last, k[-1])]
        used_cache = str(cache)
    sources = [(r, kt) for r, kt in sources if kt != 0.0]

    # Content hashes overlap the merge on the second core (xxhash releases the GIL).
    hashes: dict[str, str] = {}
    hasher = threading.Thread(target=lambda: hashes.update({str(r.path): r.content_hash() for r in readers}), daemon=True)
    hasher.start()

    names = base.keys()
    plan = [(n, base.shape(n), _out_dtype(last.dtype(n), dtype)) for n in names]
    source_weights = [kt for _, kt in sources]

    def compute(i: int) -> torch.Tensor:
        name = names[i]
        theta0 = base.get(name)
        if not theta0.is_floating_point():
            return last.get(name).clone()
        merged = task_arithmetic(theta0, [r.get(name) for r, _ in sources], source_weights).to(plan[i][2])
        if not torch.isfinite(merged).all():
            raise ItermergeError(_non_finite_message(name, [base, *(r for r, _ in sources)], k))
        return merged

    workers = max(1, min(os.cpu_count() or 1, 8))
    with atomic_dir(out, force=force) as tmp:
        writer = ShardedWriter(tmp, plan, max_bytes)
        # One tensor per worker thread, each single-threaded in torch: no OpenMP barriers per block
        # (they stall badly when the cores are shared), and results are written in order.
        with _torch_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
            window: deque = deque()
            bar = tqdm(total=len(names), desc="merging", unit="tensor", disable=not progress)
            for i in range(len(names)):
                window.append(pool.submit(compute, i))
                if len(window) > 2 * workers:
                    _write_next(writer, names, window, bar)
            while window:
                _write_next(writer, names, window, bar)
            bar.close()
        writer.close()
        copy_metadata(last, tmp)
        if dtype is not None:
            _set_config_dtype(tmp / "config.json", dtype)
        hasher.join()
        atomic_write_json(tmp / "merge.json", {
            "itermerge_version": __version__,
            "method": "Algorithm 2 / eq. (9): θ0 + Σ_t k_t (θ_t − θ0), float32 arithmetic",
            "reference": {"path": str(base.path), "hash": hashes[str(base.path)]},
            "checkpoints": [{"path": str(r.path), "hash": hashes[str(r.path)]} for r in trained],
            "lam": lam if weights is None else None,
            "alpha": alpha if weights is None else None,
            "weights": k,
            "reference_weight": 1.0 - sum(k),
            "dtype": str(dtype).removeprefix("torch.") if dtype is not None else "as θT",
            "mean_cache": used_cache,
            "seconds": round(time.perf_counter() - start, 3),
        })
    return out


def _write_next(writer: ShardedWriter, names: list[str], window: deque, bar: tqdm) -> None:
    writer.add(names[writer.written], window.popleft().result())
    bar.update()


@contextlib.contextmanager
def _torch_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _out_dtype(stored: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    return requested if requested is not None and stored.is_floating_point else stored


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    if path.exists():
        cfg = json.loads(path.read_text())
        key = "dtype" if "dtype" in cfg else "torch_dtype"
        cfg[key] = str(dtype).removeprefix("torch.")
        path.write_text(json.dumps(cfg, indent=2) + "\n")


def _non_finite_message(name: str, readers: Sequence[CheckpointReader], k: Sequence[float]) -> str:
    for r in readers:
        if not torch.isfinite(r.get(name).float()).all():
            return f"{r.path}: tensor {name!r} holds NaN or Inf; this input is corrupt — re-save it from a healthy run"
    return (
        f"tensor {name!r}: the merge with k={[round(x, 4) for x in k]} overflows to Inf/NaN in the output dtype; "
        "use a smaller |alpha| or --dtype float32"
    )


# --- Algorithm 2 in memory, for the search ------------------------------------------------------


class MergeBasis:
    """θ0 and the deltas θ̄ − θ0, θT − θ0 in float32, so that any (λ, α) point is three passes over memory.

    ``apply_to(model, lam, alpha)`` overwrites the model's parameters with eq. (10)'s merge in place:
    θ0 + (k̄ (θ̄ − θ0) + k_T (θT − θ0)), the same elementwise operations as `task_arithmetic`, so a
    point equals the streamed merge with a θ̄ cache bit for bit (except where that merge copies an
    input exactly: λ = 0 with α = 0 or −1, which differ here by at most one rounding).
    """

    def __init__(self, theta0: Mapping[str, torch.Tensor], theta_bar: Mapping[str, torch.Tensor] | None, theta_T: Mapping[str, torch.Tensor], T: int):
        self.T = T
        self.theta0 = {n: t.float().contiguous() for n, t in theta0.items()}
        self.delta_T = {n: theta_T[n].float() - t for n, t in self.theta0.items()}
        self.delta_bar = None if theta_bar is None else {n: theta_bar[n].float() - t for n, t in self.theta0.items()}

    @classmethod
    def from_checkpoints(cls, reference: str | os.PathLike, checkpoints: Sequence[str | os.PathLike], mean_cache: str | os.PathLike | None = None) -> MergeBasis:
        readers = [CheckpointReader(p) for p in [reference, *checkpoints]]
        check_compatible(readers)
        load = lambda r: {n: r.get(n).float().clone() for n in r if r.get(n).is_floating_point()}  # noqa: E731
        theta_bar = None
        if len(checkpoints) == 2:
            theta_bar = load(readers[1])
        elif len(checkpoints) > 2:
            if mean_cache is None:
                raise ItermergeError("MergeBasis with T ≥ 3 needs mean_cache: a directory for θ̄ (it is created if absent)")
            cache = Path(mean_cache)
            if not _valid_mean_cache(cache, readers[1:-1]):
                mean_checkpoint([r.path for r in readers[1:-1]], cache, force=True)
            theta_bar = load(CheckpointReader(cache))
        return cls(load(readers[0]), theta_bar, load(readers[-1]), T=len(checkpoints))

    def weights(self, lam: float, alpha: float) -> tuple[float, float]:
        """(k̄, k_T): θ = θ0 + k̄ (θ̄ − θ0) + k_T (θT − θ0), with k̄ = Σ_{t<T} k_t = (1+α) λ."""
        k = merge_weights(self.T, lam, alpha)
        return intermediate_total(k), k[-1]

    def _merge_into(self, out: torch.Tensor, name: str, k_bar: float, k_T: float) -> None:
        """out = (k̄ D̄ + k_T D_T) + θ0, computed in ``out`` itself: no allocation, no page faults."""
        if out.dtype != torch.float32 or not out.is_contiguous():
            tmp = torch.empty(out.shape, dtype=torch.float32, device=out.device)
            self._merge_into(tmp, name, k_bar, k_T)
            out.copy_(tmp)
            return
        if self.delta_bar is None or k_bar == 0.0:
            torch.mul(self.delta_T[name], k_T, out=out)
        else:
            torch.mul(self.delta_bar[name], k_bar, out=out)
            if k_T != 0.0:
                out.add_(self.delta_T[name], alpha=k_T)
        out.add_(self.theta0[name])

    def merged_tensor(self, name: str, lam: float, alpha: float) -> torch.Tensor:
        out = torch.empty_like(self.theta0[name])
        self._merge_into(out, name, *self.weights(lam, alpha))
        return out

    @torch.no_grad()
    def apply_to(self, model: torch.nn.Module, lam: float, alpha: float) -> None:
        params = dict(model.named_parameters())  # tied weights appear once
        missing = sorted(set(params) - set(self.theta0))
        if missing:
            raise ItermergeError(f"model parameter {missing[0]!r} is not in θ0's checkpoint; load the model from the same architecture")
        k_bar, k_T = self.weights(lam, alpha)
        if next(iter(params.values())).device.type != "cpu":
            for name, p in params.items():
                p.copy_(self.merged_tensor(name, lam, alpha))
            return
        workers = max(1, min(os.cpu_count() or 1, 8))
        with _torch_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda item: self._merge_into(item[1].data, item[0], k_bar, k_T), params.items()))


def mergekit_config(reference: str | os.PathLike, checkpoints: Sequence[str | os.PathLike], weights: Sequence[float], dtype: torch.dtype | None = None) -> str:
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
    if dtype is not None:
        lines.append(f"out_dtype: {str(dtype).removeprefix('torch.')}")
    return "\n".join(lines) + "\n"
