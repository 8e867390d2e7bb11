"""The operators `itermerge merge` streams (paper, ExPO, EMA, SLERP, TIES, DARE, groups): resolved, then per block."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from itermerge.errors import ItermergeError
from itermerge.maths.merge import eq9_block, merge_weights, resolve_weights
from itermerge.maths.operators import dare_mask_block, ema_weights, expo_weights, resolve_group_coefficients

METHODS = ("paper", "expo", "ema", "slerp", "ties", "dare", "groups")
FLAGS = {"lam": "--lam", "alpha": "--alpha", "weights": "--weights", "gamma": "--gamma", "t": "--t",
         "density": "--density", "seed": "--seed", "groups": "--groups"}
# What each method takes; any other parameter given is a mistake, a missing required one too.
TAKES = {
    "paper": ("lam", "alpha", "weights"), "expo": ("alpha",), "ema": ("gamma",), "slerp": ("t",),
    "ties": ("lam", "alpha", "weights", "density"), "dare": ("lam", "alpha", "weights", "density", "seed"),
    "groups": ("lam", "alpha", "groups"),
}
REQUIRED = {"expo": "alpha", "ema": "gamma", "slerp": "t", "ties": "density", "dare": "density", "groups": "groups"}
DESCRIPTIONS = {
    "paper": "Algorithm 2 / eq. (9): θ0 + Σ_t k_t (θ_t − θ0), float32 arithmetic",
    "expo": "ExPO: θ0 + (1+α)(θT − θ0), eq. (9) with k = (0, …, 0, 1+α), float32 arithmetic",
    "ema": "EMA of θ1..θT: eq. (9) with k_t = γ^(T−t) / Σ_s γ^(T−s), float32 arithmetic",
    "slerp": "θ0 + slerp(θ̄ − θ0, θT − θ0, t), one angle per tensor (lerp when |cos| > 0.9995), float32 arithmetic",
    "ties": "TIES: each θ_t − θ0 trimmed to its top `density` magnitudes per tensor, then θ0 + Σ_t k_t Δ̃_t over the "
            "entries whose sign agrees with sign(Σ_t k_t Δ̃_t), unnormalised, float32 arithmetic",
    "dare": "DARE: θ0 + Σ_t k_t m_t ⊙ (θ_t − θ0) / density, m_t ~ Bernoulli(density) seeded per tensor and "
            "checkpoint, float32 arithmetic",
    "groups": "eq. (9) with eq. (10)'s k_t from (λ, α) per layer group, float32 arithmetic",
}


@dataclass(frozen=True)
class Operator:
    """A merge operator resolved for θ1..θT: eq. (9)'s weights, per tensor where they differ, and its parameters.

    ``params`` is what merge.json records; ``weights`` are k_1..k_T of every tensor (TIES and DARE apply them to
    the sparsified task vectors), ``tensor_weights`` the per-tensor k_t of layer groups; SLERP has neither (its
    weights come from each tensor's angle, in a first pass).
    """

    method: str
    params: dict[str, Any]
    weights: tuple[float, ...] | None = None
    tensor_weights: Mapping[str, tuple[float, ...]] | None = None
    t: float | None = None
    density: float | None = None
    seed: int = 0

    @property
    def linear(self) -> bool:
        """Eq. (9) with k_t fixed before the tensors are read: the merge is linear in θ0..θT."""
        return self.method in ("paper", "expo", "ema", "groups") or (self.method == "dare" and self.density == 1.0)

    def weights_for(self, name: str) -> tuple[float, ...]:
        if self.tensor_weights is not None:
            return self.tensor_weights[name]
        if self.weights is None:
            raise ItermergeError(f"--method {self.method}: its weights depend on each tensor's angle, not fixed k_t")
        return self.weights


def resolve_operator(method: str, T: int, names: Sequence[str], **given: Any) -> Operator:
    """Check a method's parameters and turn them into eq. (9)'s weights; ``names``: the float tensors (for groups)."""
    if method not in METHODS:
        raise ItermergeError(f"--method {method!r}: not one of {', '.join(METHODS)}")
    given = {key: value for key, value in given.items() if value is not None}
    extra = [key for key in given if key not in TAKES[method]]
    if extra:
        takes = ", ".join(FLAGS[key] for key in TAKES[method])
        raise ItermergeError(f"{FLAGS[extra[0]]} does not apply to --method {method}; it takes {takes}")
    if method in REQUIRED and REQUIRED[method] not in given:
        raise ItermergeError(f"--method {method} needs {FLAGS[REQUIRED[method]]}")
    params: dict[str, Any] = {"method": method, **{k: list(v) if k == "weights" else v for k, v in given.items()}}
    lam, alpha, weights = given.get("lam"), given.get("alpha"), given.get("weights")
    if method == "expo":
        return Operator(method, params, tuple(expo_weights(T, alpha)))
    if method == "ema":
        return Operator(method, params, tuple(ema_weights(T, given["gamma"])))
    if method == "slerp":
        if T < 2:
            raise ItermergeError("--method slerp interpolates θ̄'s and θT's task vectors: give at least 2 checkpoints")
        t = given["t"]
        if not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ItermergeError(f"--t {t!r}: must be a finite number (0 gives θ̄, 1 gives θT)")
        return Operator(method, params, t=float(t))
    if method == "groups":
        return _groups(params, T, names, given["groups"], lam, alpha)
    k = tuple(resolve_weights(T, lam, alpha, weights))
    if method == "paper":
        return Operator(method, params, k)
    density = given["density"]
    if not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ItermergeError(f"--density {density!r}: must lie in (0, 1], the fraction of each task vector kept")
    seed = given.get("seed", 0)
    if method == "dare":
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ItermergeError(f"--seed {seed!r}: must be a non-negative integer")
        params["seed"] = seed
    return Operator(method, params, k, density=float(density), seed=seed)


def _groups(params: dict[str, Any], T: int, names: Sequence[str], groups: Mapping[str, Any],
            lam: float | None, alpha: float | None) -> Operator:
    groups = dict(groups)
    default = groups.pop("default", None)
    if default is not None and (lam is not None or alpha is not None):
        raise ItermergeError("the groups file sets `default` and --lam/--alpha were given too; keep one of the two")
    default = tuple(default) if default is not None else (lam or 0.0, alpha or 0.0)
    coefficients = resolve_group_coefficients(names, groups, default)
    params.update(groups={g: list(pair) for g, pair in groups.items()}, default=list(default))
    params.pop("lam", None), params.pop("alpha", None)
    per_tensor = {name: tuple(merge_weights(T, lam_g, alpha_g)) for name, (lam_g, alpha_g) in coefficients.items()}
    return Operator("groups", params, tensor_weights=per_tensor)


def read_groups(path: str | Path) -> dict[str, tuple[float, float]]:
    """A groups file: ``GROUP: [λ, α]`` or ``GROUP: {lam: λ, alpha: α}`` per line, GROUP a layer group
    (embeddings, attention, mlp, norms, head), a depth band ("layers 0-7") or ``default`` (the tensors in no group).
    """
    from itermerge.config.parse import read_yaml

    groups = {}
    for group, value in read_yaml(path).items():
        if isinstance(value, Mapping) and set(value) == {"lam", "alpha"}:
            value = (value["lam"], value["alpha"])
        ok = isinstance(value, (list, tuple)) and len(value) == 2
        if not ok or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ItermergeError(f"{path}: group {group!r}: {value!r}; write {group}: [λ, α], e.g. mlp: [0.3, 0.4]")
        groups[str(group)] = (float(value[0]), float(value[1]))
    return groups


# --- per block: the kernels of the operators that are not eq. (9) with fixed weights ------------------


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

    the same rounded operations, in the same order, as ``maths.operators.ties_merge(…, normalize=False)``:
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


def dare_block(out: np.ndarray, theta0: np.ndarray, deltas: Sequence[np.ndarray], weights: Sequence[float],
               seeds: Sequence[int], density: float, start: int, tmp: np.ndarray) -> np.ndarray:
    """DARE on one float32 block: out = θ0 + Σ_t k_t (m_t ⊙ Δ_t / density), m_t the block's slice of
    ``dare_mask(shape, density, seeds[t])``, as ``maths.operators.dare`` draws it for the whole tensor."""
    for d, seed in zip(deltas, seeds):
        np.multiply(d, dare_mask_block(start, d.size, density, seed), out=d)
        np.divide(d, np.float32(density), out=d)
    return eq9_block(out, theta0, deltas, weights, tmp, deltas=True)
