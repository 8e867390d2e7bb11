"""The arithmetic of the paper's neighbours that the operators (itermerge/operators) use: ExPO's and EMA's k_t, SLERP's
coefficients from float64 dots, DARE's seeded masks block by block, layer groups. The whole-tensor TIES, DARE and
SLERP the block kernels are tested against live in tests/oracles.py."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping

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


# --- per-layer groups --------------------------------------------------------------------------

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_BAND = re.compile(r"^layers (\d+)(?:-(\d+))?$")


def group_of(name: str) -> str | None:
    """The layer group of an HF Llama/Qwen/Mistral parameter (embeddings, attention, mlp, norms, head), else None."""
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


def _matches(group: str, name: str) -> bool:
    band = _BAND.match(group)
    if band is None:
        return group_of(name) == group
    layer = _LAYER_INDEX.search(name)
    first, last = int(band.group(1)), int(band.group(2) or band.group(1))
    return layer is not None and first <= int(layer.group(1)) <= last


def resolve_group_coefficients(
    names: Iterable[str], groups: Mapping[str, tuple[float, float]], default: tuple[float, float]
) -> dict[str, tuple[float, float]]:
    """Per-tensor (λ, α) of eq. (10): a tensor in group g takes groups[g], the others `default`.

    A group is a layer group name (``group_of``: "attention") or a depth band ("layers 0-7", "layers 5"). A group naming
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
            present = sorted({g for g in map(group_of, names) if g})
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
