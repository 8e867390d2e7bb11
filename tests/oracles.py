"""Whole-tensor references of the operators' block kernels, used only by tests (issue 22 item 6): TIES and DARE
on whole task vectors with mergekit's semantics, WARP's SLERP on a tensor, the layer group and depth band of a
parameter. The streamed merge (itermerge/operators, merging/) must equal them bit for bit."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from itermerge.errors import ItermergeError
from itermerge.maths.operators import _LAYER_INDEX, _density, _finite, dot64, group_of, slerp_coefficients


def slerp(delta_a: np.ndarray, delta_b: np.ndarray, t: float, eps: float = 1e-8) -> np.ndarray:
    """WARP's spherical interpolation of two task vectors of one tensor (here θ̄'s and θ_T's), any shape (*S).

        Ω = arccos(⟨a, b⟩ / (‖a‖ ‖b‖))   over the flattened tensor (one angle per tensor, as mergekit)
        slerp(a, b, t) = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b

    t = 0 gives a, t = 1 gives b; t outside [0, 1] extrapolates. Falls back to the lerp (1−t)·a + t·b when
    |cos Ω| > 0.9995 (mergekit's threshold; (anti-)parallel, sin Ω ≈ 0) or when ‖a‖ or ‖b‖ ≤ eps (the angle is
    undefined; mergekit would treat a zero vector as orthogonal). The coefficients act on the raw vectors, so
    the norm is preserved exactly when ‖a‖ = ‖b‖ (the path stays on that sphere) and otherwise is neither
    preserved nor linearly interpolated.
    """
    t = _finite(t, "slerp: t")
    if delta_a.shape != delta_b.shape:
        raise ItermergeError(f"slerp: shapes {delta_a.shape} and {delta_b.shape} differ; pass two deltas of one tensor")
    a, b = delta_a.ravel(), delta_b.ravel()
    k_a, k_b = slerp_coefficients(dot64(a, b), dot64(a, a), dot64(b, b), t, eps)
    return (k_a * delta_a + k_b * delta_b).astype(delta_a.dtype, copy=False)


def _same_shapes(deltas: Sequence[np.ndarray], where: str) -> None:
    if len(deltas) == 0:
        raise ItermergeError(f"{where}: no task vectors given; pass Δ_t = θ_t − θ0 for t = 1..T")
    shapes = {d.shape for d in deltas}
    if len(shapes) > 1:
        raise ItermergeError(f"{where}: task vectors of shapes {sorted(shapes)}; pass the deltas of one tensor")


def _top_magnitude(delta: np.ndarray, density: float) -> np.ndarray:
    flat = delta.ravel()
    k = max(1, int(density * flat.size))
    if k >= flat.size:
        return delta
    magnitude = np.abs(flat)
    kth = np.partition(magnitude, flat.size - k)[flat.size - k]  # the k-th largest |Δ|
    keep = magnitude > kth
    ties = np.flatnonzero(magnitude == kth)[: k - int(keep.sum())]  # lowest indices win ties: deterministic
    keep[ties] = True
    return (flat * keep).astype(delta.dtype, copy=False).reshape(delta.shape)  # × mask, as mergekit


def ties_trim(deltas: Sequence[np.ndarray], density: float) -> list[np.ndarray]:
    """TIES step 1 (Yadav et al. 2023): keep each Δ_t's k = max(1, ⌊density · numel⌋) largest |entries|, zero the rest.

    Per tensor, like mergekit's `magnitude` sparsification without rescaling; k is exact, ties at the k-th
    magnitude go to the lowest flat index. mergekit asserts instead when ⌊density · numel⌋ = 0.
    """
    density = _density(density, "ties_trim")
    _same_shapes(deltas, "ties_trim")
    return [_top_magnitude(d, density) for d in deltas]


def ties_merge(
    deltas: Sequence[np.ndarray], weights: Sequence[float], density: float, normalize: bool = True
) -> np.ndarray:
    """TIES-merging of T task vectors of one tensor (T × (*S) → (*S)), with mergekit's `ties` semantics.

        Δ̃_t = ties_trim(Δ_t),  w_t Δ̃_t                               trim, then weight
        s   = +1 where Σ_t w_t Δ̃_t ≥ 0 else −1                       elect the sign ("sum"; 0 → +1)
        m_t = [sign(w_t Δ̃_t) = s]                                    agreeing, non-zero entries
        Δ   = Σ_t m_t w_t Δ̃_t / Σ_t m_t w_t   (normalize=True, mergekit's default: a weighted disjoint mean)
        Δ   = Σ_t m_t w_t Δ̃_t                 (normalize=False: keeps Σ k_t = 1+α of eq. 10 as a magnitude)

    A zero divisor becomes 1, as in mergekit. The paper elects from the unweighted Δ̃_t and then scales by λ;
    mergekit (and this) elect from the weighted ones. Returns the merged Δ; the model is θ0 + Δ.
    """
    trimmed = ties_trim(deltas, density)
    if len(weights) != len(trimmed):
        raise ItermergeError(f"ties_merge: {len(weights)} weights for {len(trimmed)} task vectors; give one per Δ_t")
    w = [_finite(k, f"ties_merge: weights[{i}]") for i, k in enumerate(weights)]
    stacked = np.stack(trimmed)  # (T, *S)
    w_col = np.asarray(w, dtype=stacked.dtype).reshape((-1,) + (1,) * (stacked.ndim - 1))  # (T, 1, …)
    weighted = stacked * w_col  # (T, *S)
    elected = np.where(weighted.sum(axis=0) >= 0, 1, -1).astype(stacked.dtype)  # (*S)
    agree = np.sign(weighted) == elected  # (T, *S)
    merged = (weighted * agree).sum(axis=0)  # (*S), × mask as mergekit: a dropped −x leaves −0
    if normalize:
        divisor = np.where(agree, w_col, 0).sum(axis=0)
        merged = merged / np.where(divisor == 0, 1, divisor)
    return merged.astype(stacked.dtype, copy=False)


def dare_mask(shape: tuple[int, ...], density: float, seed: int) -> np.ndarray:
    """DARE's keep-mask (*shape) of bools, each True with probability `density`, from numpy's Generator(seed)."""
    density = _density(density, "dare_mask")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ItermergeError(f"dare_mask: seed={seed!r} must be a non-negative integer; use tensor_seed(seed, name)")
    return np.random.default_rng(int(seed)).random(shape, dtype=np.float32) < density


def dare(delta: np.ndarray, density: float, seed: int, rescale: bool = True) -> np.ndarray:
    """DARE (Yu et al. 2024) on one task vector (*S): drop each entry with probability 1 − density.

        Δ' = m ⊙ Δ / density    m ~ Bernoulli(density) = dare_mask(Δ.shape, density, seed)

    so E[Δ'] = Δ; rescale=False leaves out the 1/density (mergekit's `rescale`, older versions; newer ones can
    match an l1/l2 norm instead). density = 1 returns Δ itself, bit for bit. seed: tensor_seed(run_seed, name, t).
    """
    density = _density(density, "dare")
    if density == 1.0:
        return delta
    kept = (delta * dare_mask(delta.shape, density, seed)).astype(delta.dtype, copy=False)  # × mask, as mergekit
    return kept / np.asarray(density, dtype=delta.dtype) if rescale else kept


def layer_group(name: str) -> str:
    """The group of an HF Llama/Qwen/Mistral parameter: embeddings, attention, mlp, norms or head.

    model.embed_tokens.weight → embeddings; model.layers.3.self_attn.q_proj.weight → attention;
    model.layers.3.mlp.down_proj.weight → mlp; *.input_layernorm.weight, model.norm.weight → norms;
    lm_head.weight → head (absent with tied embeddings, where "embeddings" covers both).
    """
    group = group_of(name)
    if group is None:
        raise ItermergeError(
            f"{name!r}: not an embedding, attention, MLP, norm or head parameter of a Llama/Qwen/Mistral model; "
            "leave it out of per-group coefficients (it takes the default)"
        )
    return group


def depth_band(name: str, num_layers: int, bands: int) -> str | None:
    """The depth band "layers a-b" holding `name`, of `bands` near-equal bands over num_layers decoder layers.

    Band j covers layers ⌊j·L/bands⌋ .. ⌊(j+1)·L/bands⌋ − 1, e.g. L = 32, bands = 4: "layers 0-7" … "layers 24-31".
    None for tensors outside the decoder layers (embeddings, the final norm, the head).
    """
    if not 1 <= bands <= num_layers:
        raise ItermergeError(f"depth_band: bands={bands} must lie in 1..num_layers={num_layers}")
    match = _LAYER_INDEX.search(name)
    if match is None:
        return None
    layer = int(match.group(1))
    if layer >= num_layers:
        raise ItermergeError(f"{name!r}: layer {layer} but num_layers={num_layers}; pass the model's num_hidden_layers")
    j = next(j for j in range(bands) if layer < (j + 1) * num_layers // bands)
    return f"layers {j * num_layers // bands}-{(j + 1) * num_layers // bands - 1}"
