"""The (λ, α) grid of §3.2: which points, in which order, and the split they may be evaluated on."""

from __future__ import annotations

from collections.abc import Sequence

from itermerge.errors import ItermergeError


def grid(lams: Sequence[float], alphas: Sequence[float]) -> list[tuple[float, float]]:
    """(λ, α) points, θT itself (0, 0) first as §3.2 searches "from the final checkpoint", then λ-major."""
    points = [(0.0, 0.0)] + [(float(lam), float(a)) for lam in lams for a in alphas]
    return list(dict.fromkeys(points))


def check_split(split: str) -> None:
    if split.lower() == "test":
        raise ItermergeError(
            "the search refuses split 'test': choosing (λ, α) on test data leaks it into the result. "
            "Search on 'dev'; the chosen merge is evaluated on test once, by finalize()"
        )


def point_key(lam: float, alpha: float) -> tuple[float, float]:
    return round(float(lam), 9), round(float(alpha), 9)


def model_name(t: int) -> str:
    return "θ0" if t == 0 else f"Iter {t}"
