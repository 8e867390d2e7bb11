"""The (λ, α) search's settings: the grid, how it is searched, the split it runs on, and the paper's rule (§4.2)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from itermerge.errors import ItermergeError

# λ = UNIFORM stands for (T−1)/T, resolved for each searched T (search.at's T' too): with α = 0 it is the uniform
# average of θ1..θT, and λ = 1 is θ̄ alone, so the family holds both baselines the merge is compared with.
UNIFORM = "uniform"
# Around the paper's picks, (λ, α) = (0.3, 0.4) for Llama-3-8B and (0.2, 1.7) for Qwen2-7B, then up to θ̄ alone.
DEFAULT_LAMS = (0.0, 0.1, 0.2, 0.3, 0.5, UNIFORM, 1.0)
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
    lams: tuple[Any, ...] | None = field(  # numbers, or "uniform": (T−1)/T for each searched T
        default=None, metadata={"help": "λ: weight of θ̄ (direction), numbers or 'uniform' = (T−1)/T (the uniform "
                                        "average of θ1..θT at α = 0; 1 is θ̄ alone); default 0, 0.1, 0.2, 0.3, 0.5, "
                                        "uniform, 1; 0..0.7 in 7 steps for halving"})
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
    operators: dict[str, dict[str, tuple[float, ...]]] = field(
        default_factory=dict, metadata={"help": "other merge operators beside the paper's, e.g. {ema: {gamma: [0.5, "
                                                "0.8]}, ties: {density: [0.3, 0.6]}}: each value merged and evaluated "
                                                "on dev, one per operator chosen by the same rule against θT, that "
                                                "one tested once (search/operators.json). Each operator ranges over "
                                                "the parameters docs/design.md's operator table lists (model_stock: "
                                                "none, {}; learned: its k_t fitted on half of dev, {}); TIES and "
                                                "DARE sparsify each θ_t − θ0, then weight it with "
                                                "the search's chosen (λ, α). Empty: off"}
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ItermergeError(f"search.method = {self.method!r}: must be one of {', '.join(METHODS)}")
        halving = self.method == "halving"
        lams = self.lams if self.lams is not None else HALVING_LAMS if halving else DEFAULT_LAMS
        alphas = self.alphas if self.alphas is not None else HALVING_ALPHAS if halving else DEFAULT_ALPHAS
        object.__setattr__(self, "lams", tuple(parse_lam(x) for x in lams))
        object.__setattr__(self, "alphas", tuple(float(x) for x in alphas))
        object.__setattr__(self, "at", tuple(self.at))
        bad = [t for t in self.at if isinstance(t, bool) or not isinstance(t, int) or t < 1]
        if bad:
            raise ItermergeError(f"search.at = {list(self.at)}: {bad[0]!r} is not an iteration count; give whole "
                                 "numbers 1 ≤ T' < iterations")
        if not self.lams or not self.alphas:
            raise ItermergeError("search: lams and alphas must each hold at least one value")
        object.__setattr__(self, "operators", _operator_grids(self.operators))


def parse_lam(value: Any) -> float | str:
    """One λ of the grid: a finite number, or the token ``uniform``."""
    if isinstance(value, str) and value.strip().lower() == UNIFORM:
        return UNIFORM
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(value, str):  # YAML 1.1 reads 1e-1 (no dot) as text: accept what float() accepts
        with contextlib.suppress(ValueError):
            value, number = float(value), True
    if not number or not math.isfinite(value):
        raise ItermergeError(f"search.lams: {value!r} is neither a number nor {UNIFORM!r} ((T−1)/T, the uniform "
                             "average of θ1..θT); write e.g. lams: [0.0, 0.3, 0.5, uniform, 1.0]")
    return float(value)


def resolve_lams(lams: Any, T: int) -> list[float]:
    """The grid's λ values for T checkpoints: ``uniform`` becomes (T−1)/T (T = 3: 2/3), numbers stay."""
    return [(T - 1) / T if lam == UNIFORM else float(lam) for lam in lams]


def _operator_grids(operators: Any) -> dict[str, dict[str, tuple[Any, ...]]]:
    """search.operators checked against the operators' declarations (``itermerge.operators``) and made plain:
    {operator: {parameter: (value, …)}}, a single value as a list of one."""
    if not isinstance(operators, dict):
        raise ItermergeError(f"search.operators = {operators!r}: give a mapping, e.g. {{ema: {{gamma: [0.5, 0.8]}}}}")
    if not operators:
        return {}
    from itermerge.operators import REGISTRY  # only when the search compares operators: config stays numpy-free

    searchable = {name: s for name, s in REGISTRY.items() if s.searched is not None}
    grids = {}
    for name, grid in operators.items():
        where = f"search.operators.{name}"
        if name not in searchable:
            raise ItermergeError(f"{where}: not an operator the search compares; choose among "
                                 f"{', '.join(searchable)} (the paper's merge is the search itself)")
        spec = searchable[name]
        fit = spec.search == "fit"  # its parameters are fitted on dev: the settings are the fit's, optional
        takes = tuple(p.name for p in spec.fitted) if fit else spec.searched
        example = f"{name}: {{{takes[0]}: [...]}}" if takes and not fit else f"{name}: {{}}"
        grid = {} if grid is None and (fit or not takes) else grid
        if not isinstance(grid, dict):
            raise ItermergeError(f"{where} = {grid!r}: give its parameter's values, e.g. {example}")
        unknown = [key for key in grid if key not in takes]
        if unknown:
            raise ItermergeError(f"{where}.{unknown[0]}: {name} takes {', '.join(takes) or 'no parameters'}")
        if takes and not fit and takes[0] not in grid:
            raise ItermergeError(f"{where}: give {takes[0]}, e.g. {example}")
        grids[name] = {key: _operator_values(f"{where}.{key}", spec.param(key), values) for key, values in grid.items()}
        several = [key for key, values in grids[name].items() if fit and len(values) > 1]
        if several:
            raise ItermergeError(f"{where}.{several[0]}: {name} is fitted on dev, not searched over a grid; give one "
                                 f"value, e.g. {several[0]}: {grids[name][several[0]][0]!r}")
    return grids


def _operator_values(where: str, param: Any, values: Any) -> tuple[Any, ...]:
    """One parameter's values, each checked by the operator's declaration of it (``Param.valid``)."""
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if not values:
        raise ItermergeError(f"{where} is empty: give at least one value")
    out = []
    for v in values:
        if not param.valid(v):
            raise ItermergeError(f"{where}: {v!r} is not {param.problem}")
        v = float(v) if param.kind == "number" else v
        if v in out:
            raise ItermergeError(f"{where}: {v!r} is listed twice")
        out.append(v)
    return tuple(out)
