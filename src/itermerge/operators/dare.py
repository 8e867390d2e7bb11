"""DARE (Yu et al. 2024): each Δ_t = θ_t − θ0 dropped at random to `density` and rescaled, then eq. (10)'s k_t;
its per-block kernel draws each block's slice of the whole tensor's mask."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from itermerge.maths.merge import eq9_block
from itermerge.maths.operators import dare_mask_block, tensor_seed
from itermerge.operators.base import FirstPasses, Param, Resolved, Spec
from itermerge.operators.paper import ALPHA, LAM, WEIGHTS, paper_weights
from itermerge.operators.ties import DENSITY

SEED = Param("seed", "seed of the drop masks (default 0), keyed per tensor and θ_t", kind="integer",
             rule="a whole number >= 0", check=lambda v: v >= 0, default=0)


def dare_block(out: np.ndarray, theta0: np.ndarray, deltas: Sequence[np.ndarray], weights: Sequence[float],
               seeds: Sequence[int], density: float, start: int, tmp: np.ndarray) -> np.ndarray:
    """DARE on one float32 block: out = θ0 + Σ_t k_t (m_t ⊙ Δ_t / density), m_t the block's slice of
    ``dare_mask(shape, density, seeds[t])``, as the whole-tensor oracle ``dare`` draws it."""
    for d, seed in zip(deltas, seeds):
        np.multiply(d, dare_mask_block(start, d.size, density, seed), out=d)
        np.divide(d, np.float32(density), out=d)
    return eq9_block(out, theta0, deltas, weights, tmp, deltas=True)


@dataclass(frozen=True)
class DareKernel:
    """``dare_block`` with each tensor's mask seeds, one per θ_t (``tensor_seed``)."""

    density: float
    seed: int

    def prepare(self, passes: FirstPasses, ts: Sequence[int], names: Sequence[str]) -> Mapping[str, Any]:
        return {name: tuple(tensor_seed(self.seed, name, t) for t in ts) for name in names}

    def __call__(self, out: np.ndarray, theta0: np.ndarray, deltas: Sequence[np.ndarray], weights: Sequence[float],
                 state: Sequence[int], start: int, tmp: np.ndarray) -> np.ndarray:
        return dare_block(out, theta0, deltas, weights, state, self.density, start, tmp)


def _resolve(given: dict[str, Any], T: int, names: Sequence[str]) -> Resolved:
    given.setdefault("seed", SEED.default)
    density = float(given["density"])
    kernel = None if density == 1.0 else DareKernel(density, given["seed"])  # density 1 keeps every Δ_t: eq. (9)
    return Resolved("dare", {"method": "dare", **given}, paper_weights(given, T), kernel=kernel)


SPEC = Spec(
    name="dare", title="DARE", summary="each θ_t − θ0 dropped at random (--density, --seed), then eq. 10's k_t",
    description="DARE: θ0 + Σ_t k_t m_t ⊙ (θ_t − θ0) / density, m_t ~ Bernoulli(density) seeded per tensor and "
                "checkpoint, float32 arithmetic",
    params=(LAM, ALPHA, WEIGHTS, DENSITY, SEED), resolve=_resolve, searched=("density", "seed"), search="disk",
    takes_choice=True, mergekit="dare_linear", linearity="no (random masks; yes at density 1)",
)
