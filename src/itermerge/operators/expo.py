"""ExPO (Zheng et al. 2024): θ0 + (1+α)(θT − θ0), eq. (9) with k = (0, …, 0, 1+α)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from itermerge.maths.operators import expo_weights
from itermerge.operators.base import Resolved, Spec
from itermerge.operators.paper import ALPHA


def _resolve(given: dict[str, Any], T: int, names: Sequence[str]) -> Resolved:
    return Resolved("expo", {"method": "expo", **given}, tuple(expo_weights(T, given["alpha"])))


SPEC = Spec(
    name="expo", title="ExPO", summary="θ0 + (1+α)(θT − θ0) (--alpha)",
    description="ExPO: θ0 + (1+α)(θT − θ0), eq. (9) with k = (0, …, 0, 1+α), float32 arithmetic",
    params=(replace(ALPHA, required=True),), resolve=_resolve, searched=("alpha",), mergekit="task_arithmetic",
    shared_k=True,
)
