"""WARP's SLERP: θ0 + slerp(θ̄ − θ0, θT − θ0, t), one angle per tensor, applied as eq. (9) weights on (θ̄, θT)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from itermerge.maths.operators import slerp_coefficients
from itermerge.operators.base import Gram, Param, Resolved, Spec

T_PARAM = Param("t", "0 gives θ̄, 1 gives θT; outside [0, 1] extrapolates", meaning="0 gives θ̄, 1 gives θT",
                required=True)


def _resolve(given: dict[str, Any], T: int, names: Sequence[str]) -> Resolved:
    t = float(given["t"])

    def weights(G: Any) -> tuple[float, float]:  # G: the 2 × 2 Gram matrix of (θ̄ − θ0, θT − θ0)
        return slerp_coefficients(float(G[0][1]), float(G[0][0]), float(G[1][1]), t)

    return Resolved("slerp", {"method": "slerp", **given}, gram=Gram("mean_last", weights))


SPEC = Spec(
    name="slerp", title="SLERP", summary="θ0 + slerp(θ̄ − θ0, θT − θ0, t) (--t)",
    description="θ0 + slerp(θ̄ − θ0, θT − θ0, t), one angle per tensor (lerp when |cos| > 0.9995), float32 arithmetic",
    params=(T_PARAM,), resolve=_resolve, searched=("t",), min_T=2, why="interpolates θ̄'s and θT's task vectors",
    mergekit="nuslerp", linearity="per tensor, after a first pass (angles)",
)
