"""Algorithm 2 in memory: eq. (9) on tensors, and ``MergeBasis``, which turns any (λ, α) point into a model in place."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from itermerge.checkpoint import dtypes
from itermerge.checkpoint.dtypes import FLOAT_DTYPES
from itermerge.checkpoint.reader import CheckpointReader, check_compatible
from itermerge.errors import ItermergeError
from itermerge.maths.merge import eq9_block, intermediate_total, merge_weights
from itermerge.merging.engine import Scratch, Source, reduce_blocks
from itermerge.merging.first_pass import gram_matrices
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
    """θ0, θ̄ and θT read block by block at every point, so that any (λ, α) point is one pass over three checkpoints.

    ``apply_to(model, lam, alpha)`` overwrites the model's parameters with eq. (10)'s merge in place:
    θ0 + (k̄ (θ̄ − θ0) + k_T (θT − θ0)), the deltas formed per block and combined by `eq9_block`, the same
    elementwise operations as the streamed merge, so a point equals the streamed merge with a θ̄ cache bit for bit
    (except where that merge copies an input exactly: λ = 0 with α = 0, or λ = 1 with α = 0, which differ here by
    at most one rounding). ``apply_coefficients`` takes any (k̄, k_T), shared or per tensor; ``apply_operator``
    the operators linear in (θ0, θ̄, θT) — ExPO, layer groups, SLERP (its per-tensor angle fixes (k̄, k_T)) — and,
    with ``each=True``, EMA (its intermediate k_t differ) and Model Stock (its angles are between every θ_t − θ0):
    then the directions are θ1..θT themselves and the coefficients k_1..k_T.

    Nothing model-sized is held in this process: a few block buffers per thread. The checkpoints' pages sit in
    the operating system's page cache, which every process of a launch shares, so eight processes merging an
    8B model hold its three float32 checkpoints (~96 GB) once per host, not ~96 GB each.
    """

    def __init__(self, base: Source, directions: Sequence[Source], T: int, each: bool = False):
        reader = base.readers[0]
        self.T, self.each = T, each
        self.base, self.directions = base, list(directions)
        self.names = [n for n in reader if reader.dtype(n) in FLOAT_DTYPES]
        self.shapes = {n: reader.shape(n) for n in self.names}

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
        base, T = Source(readers[:1]), len(checkpoints)
        if each:
            return cls(base, [Source([r]) for r in readers[1:]], T, each=True)
        if len(checkpoints) <= 2:
            bar = [Source(readers[1:2])] if len(checkpoints) == 2 else [None]
            return cls(base, [*bar, Source(readers[-1:])], T)
        if mean_cache is None:
            raise ItermergeError("MergeBasis with T ≥ 3 needs mean_cache: a directory for θ̄ (it is created if absent)")
        cache = Path(mean_cache)
        if mean_cache_hashes(cache, readers[1:-1]) is None:
            mean_checkpoint([r.path for r in readers[1:-1]], cache, force=True)
        return cls(base, [Source([CheckpointReader(cache)]), Source(readers[-1:])], T)

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
        on every θ_t − θ0): its weights of the float64 Gram matrix of those deltas, from the merge's first pass."""
        if op.gram.on == "mean_last":
            if self.each or self.directions[0] is None:
                raise ItermergeError(f"--method {op.method} weights θ̄'s and θT's task vectors: build the basis with "
                                     "T ≥ 2, each=False")
        elif not self.each and self.T != 2:  # T = 2: θ̄ is θ1, so the basis holds every θ_t − θ0 already
            raise ItermergeError(f"--method {op.method} weights every θ_t − θ0: build the basis with each=True")
        grams = gram_matrices(self.base, self.directions, self.names, op.method, progress=False)
        return {name: tuple(op.gram.weights(G)) for name, G in grams.items()}

    def operator_coefficients(self, method: str, **params: Any) -> dict[str, tuple[float, ...]]:
        """Per tensor, the coefficients of the basis' deltas that a merge operator gives (``itermerge.operators``)."""
        op = operator(method, **params).resolve(self.T, self.names)
        if op.gram is not None:
            return self.gram_coefficients(op)
        if not op.linear:
            raise ItermergeError(
                f"--method {op.method} sparsifies each θ_t − θ0 before weighting: it is not linear in (θ0, θ̄, θT); "
                "write it with merge_checkpoints (itermerge merge) instead"
            )
        return {name: self.coefficients(op.weights_for(name)) for name in self.names}

    def _merge_block(self, out: np.ndarray, name: str, i: int, coefficients: Sequence[float],
                     scratch: Scratch) -> None:
        """Block i of θ0 + Σ_j c_j (θ_j − θ0) into ``out`` (the whole flat float32 tensor), by eq. (9)'s kernel."""
        theta0 = self.base.block(name, i, scratch, 0)
        terms = [(j, d, c) for j, (d, c) in enumerate(zip(self.directions, coefficients)) if d is not None and c]
        deltas = [np.subtract(d.block(name, i, scratch, j + 1), theta0, out=scratch.get(("d", j), np.float32)[
            : theta0.size]) for j, d, _ in terms]
        start = i * dtypes.CHUNK
        eq9_block(out[start : start + theta0.size], theta0, deltas, [c for _, _, c in terms],
                  scratch.get("tmp", np.float32)[: theta0.size], deltas=True)

    def _merge_into(self, targets: Mapping[str, np.ndarray], per_tensor: Mapping[str, Sequence[float]]) -> None:
        """Every named flat float32 array ← its merge, block by block on the merge engine's threads."""
        numel = {name: out.size for name, out in targets.items()}
        reduce_blocks(numel, lambda name, i, scratch: self._merge_block(targets[name], name, i, per_tensor[name],
                                                                         scratch),
                      lambda state, i, value: None, lambda name, state: None, "merge", progress=False)

    def merged_tensor(self, name: str, lam: float | None = None, alpha: float | None = None, *,
                      coefficients: Sequence[float] | None = None) -> torch.Tensor:
        """One merged tensor: of (λ, α), or of the given coefficients of the basis' deltas."""
        import torch

        out = np.empty(self.shapes[name], dtype=np.float32)
        self._merge_into({name: out.reshape(-1)},
                         {name: self.weights(lam, alpha) if coefficients is None else coefficients})
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
        missing = sorted(set(params) - set(self.shapes))
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
                n: p.detach().numpy().reshape(-1)
                for n, p in params.items()
                if p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous()
            }
            for name, p in params.items():  # GPU or non-fp32 parameters: merge on the CPU, then copy
                if name not in direct:
                    p.copy_(self.merged_tensor(name, coefficients=per_tensor[name]))
            self._merge_into(direct, per_tensor)
