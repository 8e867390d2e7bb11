"""The (λ, α) grid of §3.2: which points, in which order, and the split they may be evaluated on."""

from __future__ import annotations

from collections.abc import Sequence

from itermerge.config.search import SearchConfig, resolve_lams
from itermerge.errors import ItermergeError


def grid(lams: Sequence[float], alphas: Sequence[float]) -> list[tuple[float, float]]:
    """(λ, α) points, θT itself (0, 0) first as §3.2 searches "from the final checkpoint", then λ-major."""
    points = [(0.0, 0.0)] + [(float(lam), float(a)) for lam in lams for a in alphas]
    return list(dict.fromkeys(points))


def check_split(split: str) -> None:
    if split.lower() == "test":
        raise ItermergeError(
            "the search refuses split 'test': choosing (λ, α) on test data leaks it into the result. "
            "Search on 'dev'; the chosen merge is evaluated on test once, by the search driver"
        )


def point_key(lam: float, alpha: float) -> tuple[float, float]:
    return round(float(lam), 9), round(float(alpha), 9)


def model_name(t: int) -> str:
    return "θ0" if t == 0 else f"Iter {t}"


def lams_at(T: int, config: SearchConfig) -> list[float]:
    """The λ values searched for T checkpoints (``uniform`` resolved to (T−1)/T); θ̄ is undefined for T = 1."""
    return [0.0] if T == 1 else resolve_lams(config.lams, T)


def search_grid(T: int, config: SearchConfig) -> list[tuple[float, float]]:
    """The (λ, α) points of ``config`` for T checkpoints, θT first."""
    return grid(lams_at(T, config), config.alphas)
