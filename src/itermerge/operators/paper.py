"""The paper's merge, Algorithm 2 / eq. (9): θ0 + Σ_t k_t (θ_t − θ0), k_t from eq. (10)'s (λ, α) or given."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from itermerge.maths.merge import resolve_weights
from itermerge.operators.base import Param, Resolved, Spec

LAM = Param("lam", "λ: relative weight of the intermediate checkpoints (direction)", symbol="λ")
ALPHA = Param("alpha", "α: extrapolation of the alignment signal (magnitude); 0 = none", symbol="α")
WEIGHTS = Param("weights", "explicit k_1,...,k_T of eq. 9 instead of --lam/--alpha", kind="numbers",
                rule="one finite k_t per checkpoint", symbol="k")


def paper_weights(given: dict[str, Any], T: int) -> tuple[float, ...]:
    """Eq. (10)'s k_t from λ, α (each 0 when absent), or the given k_1..k_T of eq. (9)."""
    return tuple(resolve_weights(T, given.get("lam"), given.get("alpha"), given.get("weights")))


def _resolve(given: dict[str, Any], T: int, names: Sequence[str]) -> Resolved:
    return Resolved("paper", {"method": "paper", **given}, paper_weights(given, T))


SPEC = Spec(
    name="paper", title="Paper", summary="Algorithm 2 (--lam/--alpha or --weights)",
    description="Algorithm 2 / eq. (9): θ0 + Σ_t k_t (θ_t − θ0), float32 arithmetic",
    params=(LAM, ALPHA, WEIGHTS), resolve=_resolve, mergekit="task_arithmetic", shared_k=True,
)
