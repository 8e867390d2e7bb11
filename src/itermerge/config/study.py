"""A study's pre-declared primary endpoint: one comparison, one metric, one T (and regime), named before the runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from itermerge.errors import ItermergeError

# The comparisons a study measures (replicates.BASELINES), as a study file names them, and the row key each reads.
COMPARISONS: dict[str, Any] = {
    "merge - best_theta_on_dev": "best",  # early stopping by the merge's own rule: the practitioner's baseline
    "merge - theta_T": "T",  # the paper's Table 2
    "merge - uniform": "uniform",
    "merge - expo": "expo",
    "merge - theta_0": 0,
    "merge - learned": "learned",  # eq. 9's k_t fitted on half of dev (search.operators.learned)
}
EXAMPLE = "primary: {comparison: merge - best_theta_on_dev, metric: accuracy, T: 6}"


@dataclass(frozen=True)
class Primary:
    """The one comparison whose p-value is read unadjusted; Holm adjusts every other comparison of the study.

    ``comparison``: a key of ``COMPARISONS``; ``metric``: a metric the evaluators produce; ``T``: the run's iterations
    or one of its search.at; ``regime``: which regime (may be left out when the study has one).
    """

    comparison: str
    metric: str
    T: int
    regime: str

    @property
    def baseline(self) -> Any:
        """The aggregate's row key of the baseline (``"T"`` stands for θT of this T)."""
        key = COMPARISONS[self.comparison]
        return self.T if key == "T" else key

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_primary(data: Any, where: str, regimes: Mapping[str, Sequence[int]], metrics: Sequence[str]
                  ) -> Primary | None:
    """The study file's ``primary`` checked against the study: ``regimes`` maps each regime to the T it searches (its
    iterations and search.at), ``metrics`` are what its evaluators produce. None when the file declares none."""
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise ItermergeError(f"{where}: primary = {data!r}; give a mapping, e.g. {EXAMPLE}")
    unknown = sorted(set(data) - {"comparison", "metric", "T", "regime"})
    if unknown:
        raise ItermergeError(f"{where}: primary.{unknown[0]} is not a key of the primary endpoint; it takes "
                             f"comparison, metric, T and regime, e.g. {EXAMPLE}")
    comparison = " ".join(str(data.get("comparison", "")).replace("-", " - ").split())
    if comparison not in COMPARISONS:
        raise ItermergeError(f"{where}: primary.comparison = {data.get('comparison')!r}; choose one of "
                             f"{', '.join(COMPARISONS)}")
    metric = data.get("metric")
    if metric not in metrics:
        raise ItermergeError(f"{where}: primary.metric = {metric!r} is not measured by the study's evaluators; "
                             f"choose one of {', '.join(metrics) or 'none (turn an evaluator on)'}")
    regime = data.get("regime")
    if regime is None:
        if len(regimes) != 1:
            raise ItermergeError(f"{where}: primary names no regime and the study has {len(regimes)}; add "
                                 f"primary.regime, one of {', '.join(regimes)}")
        regime = next(iter(regimes))
    if regime not in regimes:
        raise ItermergeError(f"{where}: primary.regime = {regime!r} is not a regime of the study; choose one of "
                             f"{', '.join(regimes)}")
    T = data.get("T")
    if isinstance(T, bool) or not isinstance(T, int) or T not in regimes[regime]:
        searched = ", ".join(str(t) for t in regimes[regime])
        raise ItermergeError(f"{where}: primary.T = {T!r}; regime {regime} searches T = {searched} (its "
                             "iterations and search.at): give one of them")
    return Primary(comparison, str(metric), T, str(regime))
