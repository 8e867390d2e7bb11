"""Algorithm 2's arithmetic: eq. (10)'s weights k_t from (λ, α), and eq. (9) on one float32 block (numpy only)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from itermerge.errors import ItermergeError


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
            raise ItermergeError(
                f"--weights has {len(weights)} values but there are {T} checkpoints θ1..θT; give one k_t per checkpoint"
            )
        bad = [k for k in weights if not math.isfinite(k)]
        if bad:
            raise ItermergeError(f"--weights {bad[0]!r}: every k_t must be a finite number")
        return weights
    return merge_weights(T, 0.0 if lam is None else lam, 0.0 if alpha is None else alpha)


def intermediate_total(k: Sequence[float]) -> float:
    """k̄ = Σ_{t<T} k_t for equal intermediate weights (eq. 10): the weight of θ̄ when θ̄ replaces θ1..θ_{T−1}."""
    return k[0] * (len(k) - 1) if len(k) > 1 else 0.0


def eq9_block(
    out: np.ndarray, base: np.ndarray, sources: Sequence[np.ndarray], weights: Sequence[float], tmp: np.ndarray,
    *, deltas: bool = False,
) -> np.ndarray:
    """Eq. (9) on one float32 block: out = θ0 + Σ_m k_m (θ_m − θ0), the weighted deltas summed first.

    ``sources`` are the θ_m, or with ``deltas`` the task vectors θ_m − θ0 already computed (the search's
    ``MergeBasis`` keeps them): the same rounded operations either way. Summing the small deltas before
    adding θ0 once keeps the result within one float32 rounding of the float64 formula. Every product and
    sum is rounded separately (no fused multiply-add), so the streamed merge, ``task_arithmetic`` and
    ``MergeBasis`` agree bit for bit. ``out`` and ``tmp`` are scratch of the block's length (N,) and must
    not alias the inputs; every array is (N,) float32.
    """
    for m, (x, k) in enumerate(zip(sources, weights)):
        d = out if m == 0 else tmp
        if deltas:
            np.multiply(x, np.float32(k), out=d)
        else:
            np.subtract(x, base, out=d)
            np.multiply(d, np.float32(k), out=d)
        if m:
            np.add(out, tmp, out=out)
    if not sources:
        out[...] = 0.0
    np.add(base, out, out=out)
    return out
