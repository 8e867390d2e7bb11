"""Algorithm 2 in memory: eq. (9) on tensors, and ``MergeBasis``, which turns any (λ, α) point into a model in place."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from itermerge.checkpoint import dtypes
from itermerge.checkpoint.dtypes import FLOAT_DTYPES, to_float32
from itermerge.checkpoint.reader import CheckpointReader, check_compatible
from itermerge.errors import ItermergeError
from itermerge.maths.merge import eq9_block, intermediate_total, merge_weights
from itermerge.maths.operators import dot64
from itermerge.merging.mean import mean_cache_hashes, mean_checkpoint
from itermerge.operators import Resolved, operator

if TYPE_CHECKING:
    import torch


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
    arrays = [
        t.detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy() for t in (base, *(x for x, _ in live))
    ]
    out = np.empty_like(arrays[0])
    tmp = np.empty(min(dtypes.CHUNK, out.size), dtype=np.float32)
    for i in range(0, out.size, dtypes.CHUNK):
        j = min(i + dtypes.CHUNK, out.size)
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
            raise ItermergeError(
                f"tensor {name!r} is in θ0 but not in θ{missing[0]}; the checkpoints must share an architecture"
            )
        merged[name] = task_arithmetic(base, [sd[name] for sd in checkpoints], weights)
    return merged


class MergeBasis:
    """θ0 and the deltas θ̄ − θ0, θT − θ0 in float32, so that any (λ, α) point is three passes over memory.

    ``apply_to(model, lam, alpha)`` overwrites the model's parameters with eq. (10)'s merge in place:
    θ0 + (k̄ (θ̄ − θ0) + k_T (θT − θ0)), the same elementwise operations as `eq9_block`, so a point
    equals the streamed merge with a θ̄ cache bit for bit (except where that merge copies an input
    exactly: λ = 0 with α = 0, or λ = 1 with α = 0, which differ here by at most one rounding).
    ``apply_coefficients`` takes any (k̄, k_T), shared or per tensor; ``apply_operator`` the operators linear
    in (θ0, θ̄, θT) — ExPO, layer groups, SLERP (its per-tensor angle fixes (k̄, k_T)) — and, with ``each=True``,
    EMA (its intermediate k_t differ) and Model Stock (its angles are between every θ_t − θ0): then every
    θ_t − θ0 is kept ((T+1)× the model in memory) and the coefficients are k_1..k_T themselves.
    """

    def __init__(
        self,
        theta0: Mapping[str, torch.Tensor],
        theta_bar: Mapping[str, torch.Tensor] | None,
        theta_T: Mapping[str, torch.Tensor],
        T: int,
        intermediates: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ):
        self.T = T
        self.theta0 = {n: _f32(t) for n, t in theta0.items()}
        self.delta_T = {n: np.subtract(_f32(theta_T[n]), t) for n, t in self.theta0.items()}
        self.delta_bar = (
            None if theta_bar is None else {n: np.subtract(_f32(theta_bar[n]), t) for n, t in self.theta0.items()}
        )
        self.each = intermediates is not None
        if self.each:
            if len(intermediates) != T - 1:
                raise ItermergeError(f"MergeBasis: {len(intermediates)} intermediate checkpoints for T={T}; give T−1")
            self.directions = [{n: np.subtract(_f32(x[n]), t) for n, t in self.theta0.items()} for x in intermediates]
            self.directions.append(self.delta_T)
        else:
            self.directions = [self.delta_bar, self.delta_T]

    @classmethod
    def from_checkpoints(
        cls,
        reference: str | os.PathLike,
        checkpoints: Sequence[str | os.PathLike],
        mean_cache: str | os.PathLike | None = None,
        each: bool = False,
    ) -> MergeBasis:
        readers = [CheckpointReader(p) for p in [reference, *checkpoints]]
        check_compatible(readers)
        if each:
            return cls(_load_float32(readers[0]), None, _load_float32(readers[-1]), T=len(checkpoints),
                       intermediates=[_load_float32(r) for r in readers[1:-1]])
        theta_bar = None
        if len(checkpoints) == 2:
            theta_bar = _load_float32(readers[1])
        elif len(checkpoints) > 2:
            if mean_cache is None:
                raise ItermergeError(
                    "MergeBasis with T ≥ 3 needs mean_cache: a directory for θ̄ (it is created if absent)"
                )
            cache = Path(mean_cache)
            if mean_cache_hashes(cache, readers[1:-1]) is None:
                mean_checkpoint([r.path for r in readers[1:-1]], cache, force=True)
            theta_bar = _load_float32(CheckpointReader(cache))
        return cls(_load_float32(readers[0]), theta_bar, _load_float32(readers[-1]), T=len(checkpoints))

    def coefficients(self, k: Sequence[float]) -> tuple[float, ...]:
        """Eq. (9)'s k_1..k_T as weights of the basis' deltas: (k̄, k_T) with k̄ = Σ_{t<T} k_t, or k itself (each)."""
        if len(k) != self.T:
            raise ItermergeError(f"{len(k)} weights for T={self.T} checkpoints; give one k_t per checkpoint")
        if self.each:
            return tuple(float(x) for x in k)
        if len(set(k[:-1])) > 1:
            raise ItermergeError(
                f"k = {[round(x, 4) for x in k]}: the intermediate k_t differ, and θ̄ holds only their mean; "
                "build the basis with MergeBasis.from_checkpoints(..., each=True)"
            )
        return intermediate_total(k), float(k[-1])

    def weights(self, lam: float, alpha: float) -> tuple[float, ...]:
        """(k̄, k_T): θ = θ0 + k̄ (θ̄ − θ0) + k_T (θT − θ0), with k̄ = Σ_{t<T} k_t = (1+α) λ."""
        return self.coefficients(merge_weights(self.T, lam, alpha))

    def gram_coefficients(self, op: Resolved) -> dict[str, tuple[float, ...]]:
        """Per tensor, the coefficients of the basis' deltas of an angle rule (SLERP on (θ̄ − θ0, θT − θ0), Model Stock
        on every θ_t − θ0): its weights of the float64 Gram matrix of those deltas."""
        if op.gram.on == "mean_last":
            if self.delta_bar is None:
                raise ItermergeError(f"--method {op.method} weights θ̄'s and θT's task vectors: build the basis with "
                                     "T ≥ 2, each=False")
            vectors = [self.delta_bar, self.delta_T]
        else:
            if not self.each and self.T != 2:  # T = 2: θ̄ is θ1, so the basis holds every θ_t − θ0 already
                raise ItermergeError(f"--method {op.method} weights every θ_t − θ0: build the basis with each=True")
            vectors = self.directions
        out = {}
        for name in self.theta0:
            flat = [v[name].reshape(-1) for v in vectors]
            G = np.empty((len(flat), len(flat)))
            for p in range(len(flat)):
                for q in range(p, len(flat)):
                    G[p, q] = G[q, p] = dot64(flat[p], flat[q])
            out[name] = tuple(op.gram.weights(G))
        return out

    def operator_coefficients(self, method: str, **params: Any) -> dict[str, tuple[float, ...]]:
        """Per tensor, the coefficients of the basis' deltas that a merge operator gives (``itermerge.operators``)."""
        op = operator(method, **params).resolve(self.T, list(self.theta0))
        if op.gram is not None:
            return self.gram_coefficients(op)
        if not op.linear:
            raise ItermergeError(
                f"--method {op.method} sparsifies each θ_t − θ0 before weighting: it is not linear in (θ0, θ̄, θT); "
                "write it with merge_checkpoints (itermerge merge) instead"
            )
        return {name: self.coefficients(op.weights_for(name)) for name in self.theta0}

    def _merge_into(self, out: np.ndarray, name: str, coefficients: Sequence[float]) -> None:
        """out = θ0 + Σ_j c_j D_j over a flat float32 array, through eq. (9)'s one kernel, block by block."""
        theta0 = self.theta0[name].reshape(-1)
        terms = [(d[name].reshape(-1), c) for d, c in zip(self.directions, coefficients) if d is not None and c != 0.0]
        tmp = np.empty(min(dtypes.CHUNK, out.size), dtype=np.float32)
        for i in range(0, out.size, dtypes.CHUNK):
            j = min(i + dtypes.CHUNK, out.size)
            eq9_block(out[i:j], theta0[i:j], [d[i:j] for d, _ in terms], [c for _, c in terms], tmp[: j - i],
                      deltas=True)

    def merged_tensor(self, name: str, lam: float | None = None, alpha: float | None = None, *,
                      coefficients: Sequence[float] | None = None) -> torch.Tensor:
        """One merged tensor: of (λ, α), or of the given coefficients of the basis' deltas."""
        import torch

        out = np.empty(self.theta0[name].shape, dtype=np.float32)
        self._merge_into(out.reshape(-1), name, self.weights(lam, alpha) if coefficients is None else coefficients)
        return torch.from_numpy(out)

    def apply_to(self, model: torch.nn.Module, lam: float, alpha: float) -> None:
        self.apply_coefficients(model, self.weights(lam, alpha))

    def apply_operator(self, model: torch.nn.Module, method: str, **params: Any) -> None:
        """``apply_to`` for a merge operator: e.g. ("expo", alpha=0.4), ("slerp", t=0.7), ("groups", groups={...})."""
        self.apply_coefficients(model, self.operator_coefficients(method, **params))

    def apply_coefficients(
        self, model: torch.nn.Module, coefficients: Sequence[float] | Mapping[str, Sequence[float]]
    ) -> None:
        """θ0 + Σ_j c_j D_j into the model in place; ``coefficients`` (k̄, k_T) (or k_1..k_T with ``each``),
        shared by every tensor or given per tensor name."""
        import torch

        params = dict(model.named_parameters())  # tied weights appear once
        missing = sorted(set(params) - set(self.theta0))
        if missing:
            raise ItermergeError(
                f"model parameter {missing[0]!r} is not in θ0's checkpoint; load the model from the same architecture"
            )
        per_tensor = coefficients if isinstance(coefficients, Mapping) else dict.fromkeys(params, coefficients)
        absent = sorted(set(params) - set(per_tensor))
        if absent:
            raise ItermergeError(f"no coefficients for parameter {absent[0]!r}; give one entry per tensor")
        with torch.no_grad():
            direct = {
                n: p
                for n, p in params.items()
                if p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous()
            }
            for name, p in params.items():  # GPU or non-fp32 parameters: merge on the CPU, then copy
                if name not in direct:
                    p.copy_(self.merged_tensor(name, coefficients=per_tensor[name]))
            workers = max(1, min(os.cpu_count() or 1, 8))
            with ThreadPoolExecutor(max_workers=workers) as pool:  # numpy releases the GIL
                list(pool.map(
                    lambda item: self._merge_into(item[1].detach().numpy().reshape(-1), item[0], per_tensor[item[0]]),
                    direct.items(),
                ))


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
            out[name] = (raw if st == "F32" else to_float32(raw, st, np.empty(raw.size, dtype=np.float32))).reshape(
                reader.shape(name)
            )
    return out
