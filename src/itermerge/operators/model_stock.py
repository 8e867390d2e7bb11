"""Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models"), per tensor.

    Δ_t = θ_t − θ0 (t = 1..T, T ≥ 2),   cos θ = mean over pairs s < t of ⟨Δ_s, Δ_t⟩ / (‖Δ_s‖ ‖Δ_t‖)
    r = T cos θ / (1 + (T − 1) cos θ),   θ = r · mean_t θ_t + (1 − r) θ0 = θ0 + Σ_t (r / T) Δ_t

so eq. (9) with k_t = r / T, r found from each tensor's angles in a first pass (float64 dots). As mergekit's
`model_stock` (filter_wise: false): one cos θ per flattened tensor, the mean of the pairwise cosines, a pair with
a zero task vector counted as orthogonal (cos 0). Where mergekit only clips cos θ to [−1, 1], here it is clipped
to [0, 1]: the paper's geometry has the fine-tuned models at an acute angle, and below 0 the ratio turns
negative and has a pole at cos θ = −1/(T−1); clipped, r stays in [0, 1] (0: θ0, 1: the plain mean).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from itermerge.operators.base import Gram, Resolved, Spec


def stock_ratio(G: Any, eps: float = 1e-8) -> float:
    """r = T cos θ / (1 + (T−1) cos θ) from the (T, T) Gram matrix G_st = ⟨Δ_s, Δ_t⟩ of one tensor's task vectors."""
    T = len(G)
    norms = [math.sqrt(float(G[s][s])) for s in range(T)]
    pairs = [(s, t) for s in range(T) for t in range(s + 1, T)]
    cos = [float(G[s][t]) / (norms[s] * norms[t]) if min(norms[s], norms[t]) > eps else 0.0 for s, t in pairs]
    mean = min(1.0, max(0.0, math.fsum(cos) / len(pairs)))
    return T * mean / (1.0 + (T - 1) * mean)


def stock_weights(G: Any) -> tuple[float, ...]:
    """k_t = r / T for each of the T task vectors: eq. (9)'s weights of Model Stock on one tensor."""
    T = len(G)
    return (stock_ratio(G) / T,) * T


def _resolve(given: dict[str, Any], T: int, names: Sequence[str]) -> Resolved:
    return Resolved("model_stock", {"method": "model_stock"}, gram=Gram("each", stock_weights))


SPEC = Spec(
    name="model_stock", title="Model Stock", summary="θ0 + r (mean θ_t − θ0), r from the task vectors' angles",
    description="Model Stock: θ0 + r (mean_t θ_t − θ0) per tensor, r = T cos θ / (1 + (T−1) cos θ), cos θ the mean "
                "pairwise cosine of the θ_t − θ0 (clipped to [0, 1]), float32 arithmetic",
    params=(), resolve=_resolve, searched=(), search="each", min_T=2,
    why="weights θ1..θT by the angles between their task vectors", mergekit="model_stock",
    mergekit_note="filter_wise: false (one angle per tensor). mergekit computes the cosines in the merge dtype and\n"
                  "clips them to [−1, 1]; itermerge in float64 and to [0, 1]: equal where the mean cosine is ≥ 0.",
    linearity="per tensor, after a first pass (angles)",
)
