"""One measured number with its standard error and sample size, and the means that produce it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from itermerge.errors import ItermergeError


@dataclass(frozen=True)
class Metric:
    """``value`` ± ``stderr`` over ``n`` independent units (prompts, or documents for lm-eval).

    ``stderr`` is None where it is undefined (n = 1) or where the source did not report one. ``items``: each
    unit's value in the evaluation's prompt order (None where the source gives only the mean), so that two models
    measured on the same prompts are compared prompt by prompt (``maths.paired``).
    """

    value: float
    stderr: float | None
    n: int
    items: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"value": self.value, "stderr": self.stderr, "n": self.n}
        return out if self.items is None else {**out, "items": [round(v, 9) for v in self.items]}

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], where: str = "metric") -> Metric:
        try:
            stderr, items = obj["stderr"], obj.get("items")
            return cls(float(obj["value"]), None if stderr is None else float(stderr), int(obj["n"]),
                       None if items is None else tuple(float(v) for v in items))
        except (KeyError, TypeError, ValueError) as e:
            raise ItermergeError(f'{where}: expected {{"value", "stderr", "n"}}, got {obj!r:.120}') from e


def mean_metric(values: Sequence[float]) -> Metric:
    """Mean and its standard error s / √n, s the sample standard deviation (ddof = 1, as lm-eval).

    E.g. [1, 0, 1, 1] → value 0.75, s² = (3·0.0625 + 0.5625) / 3 = 0.25, stderr = 0.5 / 2 = 0.25.
    """
    n = len(values)
    if n == 0:
        raise ItermergeError("a metric over 0 items is undefined; evaluate at least one prompt")
    mean, items = math.fsum(values) / n, tuple(float(v) for v in values)
    if n == 1:
        return Metric(mean, None, 1, items)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return Metric(mean, math.sqrt(var / n), n, items)


def clustered_mean(groups: Sequence[Sequence[float]]) -> Metric:
    """Mean over prompts of each prompt's mean over its samples; n = number of prompts.

    Samples of one prompt are correlated, so the prompt (not the sample) is the independent unit
    and the standard error is computed over the per-prompt means.
    """
    if any(len(g) == 0 for g in groups):
        raise ItermergeError("a prompt without samples cannot be scored; sample at least one completion per prompt")
    return mean_metric([math.fsum(g) / len(g) for g in groups])
