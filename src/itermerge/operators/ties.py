"""TIES (Yadav et al. 2023): each Δ_t = θ_t − θ0 trimmed to its top-`density` magnitudes, signs elected, the
agreeing entries summed with eq. (10)'s k_t (mergekit's `ties`, normalize: false); its per-block kernels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from itermerge.operators.base import FirstPasses, Param, Resolved, Spec
from itermerge.operators.paper import ALPHA, LAM, WEIGHTS, paper_weights

DENSITY = Param("density", "fraction of each task vector kept", rule="a number in (0, 1]",
                meaning="the fraction of each task vector kept", check=lambda v: 0.0 < v <= 1.0, required=True)


@dataclass(frozen=True)
class TopK:
    """The entries of one Δ_t = θ_t − θ0 that TIES keeps: |Δ| > kth, and |Δ| = kth up to flat index last_tie.

    ``ties_trim``'s rule (exactly k kept, the lowest indices win ties at the k-th magnitude), found in a first pass.
    """

    kth: float
    last_tie: int


def trim_block(delta: np.ndarray, keep: TopK | None, start: int, tmp: np.ndarray) -> np.ndarray:
    """Drop, in place, the entries of a block (elements start.. of the tensor) that ``keep`` drops: Δ × mask."""
    if keep is None:
        return delta
    magnitude = np.abs(delta, out=tmp)
    kth = np.float32(keep.kth)
    kept = magnitude >= kth
    if keep.last_tie < start + delta.size - 1:  # ties past the last one kept: dropped too
        kept &= ~((magnitude == kth) & (np.arange(start, start + delta.size) > keep.last_tie))
    return np.multiply(delta, kept, out=delta)


def ties_block(out: np.ndarray, theta0: np.ndarray, deltas: Sequence[np.ndarray], weights: Sequence[float],
               tmp: np.ndarray) -> np.ndarray:
    """TIES on one float32 block of trimmed task vectors Δ̃_t (N,), mergekit's `ties` with normalize: false.

        w_t = k_t Δ̃_t,   s = +1 where Σ_t w_t ≥ 0 else −1,   out = θ0 + Σ_t [sign(w_t) = s] w_t

    the same rounded operations, in the same order, as the whole-tensor oracle ``ties_merge(…, normalize=False)``:
    masks multiply (as in mergekit), never branch per element. s is copysign(1, Σ_t w_t), −1 where the sum is
    −0, which happens only where every w_t is zero and none agrees anyway. ``deltas`` are overwritten; ``out``
    and ``tmp`` are scratch (N,).
    """
    for d, k in zip(deltas, weights):
        np.multiply(d, np.float32(k), out=d)
    np.copyto(out, deltas[0])
    for d in deltas[1:]:
        np.add(out, d, out=out)
    elected = np.copysign(np.float32(1), out, out=tmp)
    for d in deltas:  # sign(w_t) = s ⇔ w_t·s > 0: zeros never agree
        np.multiply(d, np.multiply(d, elected, out=out) > 0, out=d)
    np.copyto(out, deltas[0])
    for d in deltas[1:]:
        np.add(out, d, out=out)
    return np.add(theta0, out, out=out)


@dataclass(frozen=True)
class TiesKernel:
    """Trim each block of Δ_t to its tensor's top-k (found by a first pass), then ``ties_block``."""

    density: float

    def prepare(self, passes: FirstPasses, ts: Sequence[int], names: Sequence[str]) -> Mapping[str, Any]:
        keeps = passes.top_magnitudes(ts, self.density)
        return {name: tuple(keeps.get(name, ())) for name in names}

    def __call__(self, out: np.ndarray, theta0: np.ndarray, deltas: Sequence[np.ndarray], weights: Sequence[float],
                 state: Sequence[TopK | None], start: int, tmp: np.ndarray) -> np.ndarray:
        for d, keep in zip(deltas, state):
            trim_block(d, keep, start, tmp)
        return ties_block(out, theta0, deltas, weights, tmp)


def _resolve(given: dict[str, Any], T: int, names: Sequence[str]) -> Resolved:
    k = paper_weights(given, T)
    return Resolved("ties", {"method": "ties", **given}, k, kernel=TiesKernel(float(given["density"])))


SPEC = Spec(
    name="ties", title="TIES", summary="each θ_t − θ0 trimmed (--density), signs elected, then eq. 10's k_t",
    description="TIES: each θ_t − θ0 trimmed to its top `density` magnitudes per tensor, then θ0 + Σ_t k_t Δ̃_t over "
                "the entries whose sign agrees with sign(Σ_t k_t Δ̃_t), unnormalised, float32 arithmetic",
    params=(LAM, ALPHA, WEIGHTS, DENSITY), resolve=_resolve, searched=("density",), search="disk", takes_choice=True,
    mergekit="ties", linearity="no (sparsified per tensor, after a first pass: top-k)",
)
