"""EMA of θ1..θT: eq. (9) with k_t = γ^(T−t) / Σ_s γ^(T−s) (the bias-corrected moving average)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from itermerge.maths.operators import ema_weights
from itermerge.operators.base import Param, Resolved, Spec

GAMMA = Param("gamma", "decay per iteration in (0, 1]; 1 = plain mean", rule="a number in (0, 1]",
              meaning="the decay per iteration; 1 = the plain mean", check=lambda v: 0.0 < v <= 1.0, required=True,
              symbol="γ")


def _resolve(given: dict[str, Any], T: int, names: Sequence[str]) -> Resolved:
    return Resolved("ema", {"method": "ema", **given}, tuple(ema_weights(T, given["gamma"])))


SPEC = Spec(
    name="ema", title="EMA", summary="an exponential moving average of θ1..θT (--gamma)",
    description="EMA of θ1..θT: eq. (9) with k_t = γ^(T−t) / Σ_s γ^(T−s), float32 arithmetic",
    params=(GAMMA,), resolve=_resolve, searched=("gamma",), search="each", mergekit="task_arithmetic", shared_k=True,
)
