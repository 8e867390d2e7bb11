"""The (λ, α) search's settings: the grid, how it is searched, the split it runs on, and the paper's rule (§4.2)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from itermerge.errors import ItermergeError

# Around the paper's picks, (λ, α) = (0.3, 0.4) for Llama-3-8B and (0.2, 1.7) for Qwen2-7B.
DEFAULT_LAMS = (0.0, 0.1, 0.2, 0.3, 0.5)
DEFAULT_ALPHAS = (0.0, 0.2, 0.4, 0.7, 1.0)
# Successive halving affords a finer grid (7 × 7) for less evaluation than the 5 × 5 one on every prompt.
HALVING_LAMS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7)
HALVING_ALPHAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.5)
METHODS = ("grid", "halving")


@dataclass(frozen=True)
class SelectionRule:
    """§4.2: "the highest average reward without loss of average score on academic benchmarks".

    A point is eligible when none of its ``capability`` metrics is worse than θT's (λ = 0, α = 0) by
    more than ``tolerance`` (absolute, in the metric's units); the eligible point of highest
    ``reward`` is chosen. θT itself is always eligible, so there is always a choice. With no
    capability metric the rule picks the highest reward.
    """

    reward: str = field(default="reward", metadata={"help": "metric maximised"})
    capability: tuple[str, ...] = field(default=("accuracy",), metadata={"help": "metrics that may not regress"})
    tolerance: float = field(default=0.0, metadata={"help": "allowed regression below θT, absolute"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "capability", tuple(self.capability))
        if not math.isfinite(self.tolerance) or self.tolerance < 0:
            raise ItermergeError(f"search.tolerance = {self.tolerance!r}: must be a finite number >= 0")
        if not self.reward:
            raise ItermergeError("search.rule.reward is empty: name the metric to maximise, e.g. reward")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric the rule reads: the reward, then the capability metrics."""
        return (self.reward, *self.capability)


@dataclass(frozen=True)
class HalvingConfig:
    """Successive halving (search/budget.py): round r evaluates the surviving points on the first
    min_prompts · eta^r dev prompts (all of them in the last round) and keeps the best 1/eta of them."""

    eta: int = field(default=3, metadata={"help": "each round keeps 1/eta of the points and gives them eta times "
                                                  "as many prompts"})
    min_prompts: int = field(default=8, metadata={"help": "dev prompts of the first round, where every point runs"})

    def __post_init__(self) -> None:
        if isinstance(self.eta, bool) or not isinstance(self.eta, int) or self.eta < 2:
            raise ItermergeError(f"search.halving.eta = {self.eta!r}: must be a whole number >= 2 (3 keeps a third "
                                 "of the points each round)")
        if isinstance(self.min_prompts, bool) or not isinstance(self.min_prompts, int) or self.min_prompts < 1:
            raise ItermergeError(f"search.halving.min_prompts = {self.min_prompts!r}: must be a whole number >= 1 "
                                 "(the dev prompts every point is evaluated on in the first round, e.g. 8)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SearchConfig:
    lams: tuple[float, ...] | None = field(
        default=None, metadata={"help": "λ: weight of θ̄ (direction); default 0..0.5 in 5 steps, 7 for halving"})
    alphas: tuple[float, ...] | None = field(
        default=None, metadata={"help": "α: extrapolation (magnitude); default 0..1 in 5 steps, 0..1.5 in 7 for "
                                        "halving"})
    method: str = field(default="grid", metadata={"help": "grid: every point on every dev prompt; halving: "
                                                          "successive halving over growing prompt subsets"})
    halving: HalvingConfig = field(default_factory=HalvingConfig, metadata={"help": "settings of method: halving"})
    split: str = field(default="dev", metadata={"help": "split the points are evaluated on (never test)"})
    rule: SelectionRule = field(default_factory=SelectionRule)
    at: tuple[int, ...] = field(
        default=(), metadata={"help": "also search and test the merge of θ1..θ_T' alone, for each T' < T listed "
                                      "(search_T3/ for 3): a T = 6 run answers for T = 3 too"}
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ItermergeError(f"search.method = {self.method!r}: must be one of {', '.join(METHODS)}")
        halving = self.method == "halving"
        lams = self.lams if self.lams is not None else HALVING_LAMS if halving else DEFAULT_LAMS
        alphas = self.alphas if self.alphas is not None else HALVING_ALPHAS if halving else DEFAULT_ALPHAS
        object.__setattr__(self, "lams", tuple(float(x) for x in lams))
        object.__setattr__(self, "alphas", tuple(float(x) for x in alphas))
        object.__setattr__(self, "at", tuple(self.at))
        bad = [t for t in self.at if isinstance(t, bool) or not isinstance(t, int) or t < 1]
        if bad:
            raise ItermergeError(f"search.at = {list(self.at)}: {bad[0]!r} is not an iteration count; give whole "
                                 "numbers 1 ≤ T' < iterations")
        if not self.lams or not self.alphas:
            raise ItermergeError("search: lams and alphas must each hold at least one value")
