"""Merge operators from the paper's neighbours (ExPO, EMA, WARP's SLERP, TIES, DARE) on task vectors Δ_t = θ_t − θ0."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from itermerge.errors import ItermergeError

# mergekit's slerp threshold: above it sin Ω is too small to divide by, so interpolate linearly.
SLERP_DOT_THRESHOLD = 0.9995
LAYER_GROUPS = ("embeddings", "attention", "mlp", "norms", "head")


def _finite(value: float, name: str) -> float:
    number = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not number or not math.isfinite(value):
        raise ItermergeError(f"{name}={value!r}: must be a finite number")
    return float(value)


def _steps(T: int, where: str) -> int:
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ItermergeError(f"{where}: T={T!r} must be an integer ≥ 1, the number of checkpoints θ1..θT")
    return int(T)


def _density(density: float, where: str) -> float:
    density = _finite(density, f"{where}: density")
    if not 0.0 < density <= 1.0:
        raise ItermergeError(f"{where}: density={density} must lie in (0, 1], the fraction kept; 1 keeps all")
    return density


# --- weights k_1..k_T for eq. (9) --------------------------------------------------------------


def expo_weights(T: int, alpha: float) -> list[float]:
    """ExPO (Zheng et al. 2024), the λ = 0 case of eq. (10): k = (0, …, 0, 1+α).

    With eq. (9): θ = θ0 + (1+α)(θ_T − θ0), extrapolating past θ_T for α > 0.
    """
    T, alpha = _steps(T, "expo_weights"), _finite(alpha, "alpha")
    return [0.0] * (T - 1) + [1.0 + alpha]


def ema_weights(T: int, gamma: float) -> list[float]:
    """Exponential moving average of θ1..θT as eq. (9) weights: k_t = γ^(T−t) / Σ_s γ^(T−s), Σ k_t = 1.

    This is the EMA m_t = γ m_{t−1} + (1−γ) θ_t started at m_0 = 0 and bias-corrected, θ = m_T / (1 − γ^T)
    (Adam's correction); it gives θ1 the weight (1−γ)γ^(T−1)/(1−γ^T), where an EMA started at m_1 = θ1 would
    give it γ^(T−1). Since Σ k_t = 1, θ0 drops out of eq. (9). γ = 1 is the plain mean; γ → 0 is θ_T.
    """
    T, gamma = _steps(T, "ema_weights"), _finite(gamma, "gamma")
    if not 0.0 < gamma <= 1.0:
        raise ItermergeError(f"ema_weights: gamma={gamma} must lie in (0, 1] (the decay per iteration; 1 = plain mean)")
    powers = [gamma ** (T - t) for t in range(1, T + 1)]
    total = sum(powers)
    return [p / total for p in powers]


# --- SLERP (WARP) ------------------------------------------------------------------------------


def dot64(a: np.ndarray, b: np.ndarray, chunk: int = 1 << 18) -> float:
    """⟨a, b⟩ of two flat float32 arrays (N,) in float64: per chunk numpy's pairwise sum of the products, the
    chunks summed in order.

    float32 sums lose ~1e-3 relative on 1e8 entries, as much as the colinearity threshold's margin. Not BLAS:
    the same bits on every machine, and no BLAS threads fighting a merge's thread pool. The chunk is the
    streamed merge's block (dtypes.CHUNK), so that its first pass sums the same partial dots.
    """
    total = 0.0
    for i in range(0, a.size, chunk):
        total += float(np.multiply(a[i : i + chunk], b[i : i + chunk], dtype=np.float64).sum())
    return total


def slerp_coefficients(dot_ab: float, dot_aa: float, dot_bb: float, t: float, eps: float = 1e-8) -> tuple[float, float]:
    """(k_a, k_b) with slerp(a, b, t) = k_a·a + k_b·b, from the float64 dots ⟨a, b⟩, ‖a‖², ‖b‖² of one tensor.

    (sin((1−t)Ω)/sin Ω, sin(tΩ)/sin Ω), or the lerp's (1−t, t) when |cos Ω| > 0.9995 or ‖a‖ or ‖b‖ ≤ eps.
    The streamed merge gets the dots from a first pass over blocks and applies these as eq. (9) weights.
    """
    t = _finite(t, "slerp: t")
    norm_a, norm_b = math.sqrt(dot_aa), math.sqrt(dot_bb)
    if norm_a > eps and norm_b > eps:
        cos = min(1.0, max(-1.0, dot_ab / (norm_a * norm_b)))
        if abs(cos) <= SLERP_DOT_THRESHOLD:
            omega = math.acos(cos)
            return math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    return 1 - t, t


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


# --- TIES --------------------------------------------------------------------------------------


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


# --- DARE --------------------------------------------------------------------------------------


def tensor_seed(seed: int, name: str, checkpoint: int = 0) -> int:
    """A 64-bit seed for one tensor of one checkpoint θ_t, from the run's seed and the tensor's name.

    Keyed on names (blake2b, not Python's salted hash), so a mask does not depend on the order tensors are
    processed in; pass checkpoint=t so that each θ_t gets its own mask, as DARE drops per model.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ItermergeError(f"tensor_seed: seed={seed!r} must be an integer")
    digest = hashlib.blake2b(f"{int(seed)}\0{int(checkpoint)}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def dare_mask(shape: tuple[int, ...], density: float, seed: int) -> np.ndarray:
    """DARE's keep-mask (*shape) of bools, each True with probability `density`, from numpy's Generator(seed)."""
    density = _density(density, "dare_mask")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ItermergeError(f"dare_mask: seed={seed!r} must be a non-negative integer; use tensor_seed(seed, name)")
    return np.random.default_rng(int(seed)).random(shape, dtype=np.float32) < density


def dare_mask_block(start: int, size: int, density: float, seed: int) -> np.ndarray:
    """Elements [start, start + size) of the flattened ``dare_mask(shape, density, seed)``, drawn without the rest.

    PCG64 gives two float32 draws per 64-bit step, so the stream jumps ``start // 2`` steps (and one draw for an
    odd start): a streamed merge draws each block's mask alone and still gets the whole tensor's mask bit for bit.
    """
    density = _density(density, "dare_mask_block")
    bits = np.random.PCG64(int(seed))
    bits.advance(start // 2)
    rng = np.random.Generator(bits)
    if start % 2:
        rng.random(1, dtype=np.float32)
    return rng.random(size, dtype=np.float32) < density


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


# --- per-layer groups --------------------------------------------------------------------------

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_BAND = re.compile(r"^layers (\d+)(?:-(\d+))?$")


def _group_or_none(name: str) -> str | None:
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 and parts[-1] in ("weight", "bias") else parts[-1]
    if "lm_head" in parts:
        return "head"
    if "embed_tokens" in parts:
        return "embeddings"
    if "norm" in module:  # input_layernorm, post_attention_layernorm, model.norm, Qwen3's q_norm/k_norm
        return "norms"
    if "self_attn" in parts:
        return "attention"
    if "mlp" in parts or "block_sparse_moe" in parts:
        return "mlp"
    return None


def layer_group(name: str) -> str:
    """The group of an HF Llama/Qwen/Mistral parameter: embeddings, attention, mlp, norms or head.

    model.embed_tokens.weight → embeddings; model.layers.3.self_attn.q_proj.weight → attention;
    model.layers.3.mlp.down_proj.weight → mlp; *.input_layernorm.weight, model.norm.weight → norms;
    lm_head.weight → head (absent with tied embeddings, where "embeddings" covers both).
    """
    group = _group_or_none(name)
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


def _matches(group: str, name: str) -> bool:
    band = _BAND.match(group)
    if band is None:
        return _group_or_none(name) == group
    layer = _LAYER_INDEX.search(name)
    first, last = int(band.group(1)), int(band.group(2) or band.group(1))
    return layer is not None and first <= int(layer.group(1)) <= last


def resolve_group_coefficients(
    names: Iterable[str], groups: Mapping[str, tuple[float, float]], default: tuple[float, float]
) -> dict[str, tuple[float, float]]:
    """Per-tensor (λ, α) of eq. (10): a tensor in group g takes groups[g], the others `default`.

    A group is a layer_group name ("attention") or a depth band ("layers 0-7", "layers 5"). A group naming
    no tensor, or a tensor in two groups, is a user's mistake.
    """
    names = list(names)
    coefficients = {}
    for group, pair in {**groups, "default": default}.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ItermergeError(f"groups[{group!r}]={pair!r}: give a pair (λ, α) of eq. (10)")
        _finite(pair[0], f"groups[{group!r}]: λ")
        _finite(pair[1], f"groups[{group!r}]: α")
    for group in groups:
        if group not in LAYER_GROUPS and _BAND.match(group) is None:
            raise ItermergeError(f"group {group!r}: not one of {', '.join(LAYER_GROUPS)} nor 'layers a-b'")
    members = {group: {n for n in names if _matches(group, n)} for group in groups}
    for group, found in members.items():
        if not found:
            present = sorted({g for g in map(_group_or_none, names) if g})
            layers = sorted({int(m.group(1)) for m in map(_LAYER_INDEX.search, names) if m})
            span = f", layers {layers[0]}-{layers[-1]}" if layers else ""
            raise ItermergeError(f"group {group!r} names no tensor; the tensors fall into: {', '.join(present)}{span}")
    for name in names:
        hits = [g for g in groups if name in members[g]]
        if len(hits) > 1:
            raise ItermergeError(f"{name!r} is in groups {hits}; make the groups disjoint")
        lam, alpha = groups[hits[0]] if hits else default
        coefficients[name] = (float(lam), float(alpha))
    return coefficients
