"""The exact ensemble of eq. (6) that the merge approximates: its coefficients and its per-token mixture.

Eq. (6): log π*(y|x) = (1 − Σk_t) log π_θ0(y|x) + Σ_t k_t log π_θt(y|x) + const. The constant normalises
over all sequences y and is intractable. As EFT (Mitchell et al., 2024) and DeRa (Liu et al., 2024) do,
the mixture is normalised per token instead:

    log π*(y_i | x, y_<i) = log_softmax_v( Σ_m c_m log π_m(v | x, y_<i) ),   c = (1 − Σk, k_1, …, k_T)

which equals eq. (6) when one coefficient is 1 and is the standard tractable approximation otherwise.
The coefficient vectors of the special cases:

- a merge (λ, α):  ``merge_coefficients(T, lam, alpha)`` on (θ0, θ1, …, θT), the k_t of eq. (10);
- EFT, two reward directions r_a, r_b weighted k_a, k_b: ``eft_coefficients(k_a, k_b)`` on (θ0, θa, θb);
- DeRa, the aligned model re-aligned with β' = β / r: ``dera_coefficients(r)`` on (θ0, θ_aligned).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from itermerge.errors import ItermergeError
from itermerge.maths.merge import merge_weights


def ensemble_coefficients(weights: Sequence[float]) -> list[float]:
    """Eq. (6), second line: c = (1 − Σ_t k_t, k_1, …, k_T), the coefficients of (θ0, θ1, …, θT)."""
    weights = [float(k) for k in weights]
    if not weights or not all(math.isfinite(k) for k in weights):
        raise ItermergeError(f"ensemble weights {weights}: give one finite k_t per checkpoint θ1..θT")
    return [1.0 - sum(weights), *weights]


def merge_coefficients(T: int, lam: float, alpha: float) -> list[float]:
    """The ensemble that the merge (λ, α) approximates: eq. (10)'s k_t put into eq. (6)."""
    return ensemble_coefficients(merge_weights(T, lam, alpha))


def eft_coefficients(k_a: float, k_b: float) -> list[float]:
    """EFT with two reward directions: π ∝ π_θ0 · exp((k_a r_a + k_b r_b)/β), on models (θ0, θa, θb)."""
    return ensemble_coefficients([k_a, k_b])


def dera_coefficients(beta_ratio: float) -> list[float]:
    """DeRa: π_θ0^(1−r) π_aligned^r on (θ0, θ_aligned), the policy of KL weight β/r (r = β/β').

    It is EFT with one direction, where the reference induces the zero reward (paper §5).
    """
    return ensemble_coefficients([beta_ratio])


def mix_logprobs(logps: Sequence[Tensor], coeffs: Sequence[float]) -> Tensor:
    """log_softmax(Σ_m c_m log π_m): the per-token ensemble distribution. Each (*S, V) → (*S, V).

    A token that a model with c_m ≠ 0 gives probability 0 stays impossible: with c_m < 0 the product
    would otherwise be +inf. Models with c_m = 0 are not read.
    """
    total, impossible = None, None
    for lp, c in zip(logps, coeffs):
        if c == 0.0:
            continue
        zero = torch.isneginf(lp)
        term = c * lp.float().masked_fill(zero, 0.0)
        total = term if total is None else total.add_(term)
        impossible = zero if impossible is None else impossible | zero
    if total is None:
        raise ItermergeError(f"ensemble coefficients {list(coeffs)} are all 0; at least one model must have weight")
    return total.masked_fill_(impossible, -math.inf).log_softmax(-1)


def kl_per_position(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) over the vocabulary at each position: (N, V), (N, V) → (N,).

    Terms with p_v = 0 are 0 (not 0·∞ = NaN); q_v = 0 where p_v > 0 gives +inf, as it should.
    """
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)
