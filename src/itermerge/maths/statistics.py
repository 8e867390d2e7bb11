"""Plain statistics of the studies: preference accuracy, mean and standard error, Pearson correlation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def preference_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> dict[str, Any]:
    """Fraction of pairs with r(chosen) > r(rejected); a tie counts half (a coin flip would rank it)."""
    correct = sum(c > r for c, r in zip(chosen, rejected))
    ties = sum(c == r for c, r in zip(chosen, rejected))
    n = len(chosen)
    return {"accuracy": (correct + 0.5 * ties) / n if n else None, "correct": correct, "ties": ties, "pairs": n}


def mean_sem(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and its standard error std/√n (sample std, n − 1); None for fewer than two values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def pearson(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    """(Pearson r, two-sided p-value); (None, None) when undefined (fewer than 3 points or a constant input)."""
    from scipy.stats import pearsonr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None, None
    result = pearsonr(x, y)
    return float(result.statistic), float(result.pvalue)
