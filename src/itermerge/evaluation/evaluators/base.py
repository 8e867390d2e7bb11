"""What an evaluator declares (``Spec``) and what it is given to measure one model (``Pass``): the one contract
between an evaluator's module and the evaluation loop (``evaluation/suite.py``), the search's selection rule and
the report."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from itermerge.evaluation.metric import Metric
    from itermerge.evaluation.suite import Evaluator
    from itermerge.sampling import Sample, Sampler


def _nothing(evaluator: Evaluator) -> None:
    return None


@dataclass(frozen=True)
class Spec:
    """An evaluator, on under ``evaluation.NAME`` when that section is set (a non-empty list for ``axes``).

    ``metrics``: the names it always reports, in table order (an axis's or a benchmark's are its own, after them).
    ``prepare(evaluator)``: what it needs once per split (checks, prompts), kept as its ``Pass.state``.
    ``samples(section)``: the replies it reads, as (decoding mode, n per prompt): each mode is sampled once per
    model at the largest n asked. ``measure(pass_)``: its metrics. ``lower_is_better``: the metrics it reports that
    are better lower (every other metric is better higher); ``needs_reference``: it reads π_ref (θ0).
    ``no_subset(evaluator)``: why it cannot run on part of the split's prompts (the budgeted search's rounds), or
    None when it can."""

    name: str
    summary: str
    reports: str
    measure: Callable[[Pass], dict[str, Metric]]
    metrics: tuple[str, ...] = ()
    prepare: Callable[[Evaluator], Any] = _nothing
    samples: Callable[[Any], list[tuple[str, int]]] = field(default=lambda section: [])
    lower_is_better: frozenset[str] = frozenset()
    needs_reference: bool = False
    no_subset: Callable[[Evaluator], str | None] = field(default=lambda evaluator: None)

    def on(self, config: Any) -> bool:
        """Whether ``config`` (an ``EvalConfig``) turns this evaluator on."""
        return bool(getattr(config, self.name))


@dataclass
class Pass:
    """One model's measurement by one evaluator: the split's ``evaluator``, the ``model``, the ``sampler`` it was
    sampled with, the replies of each decoding mode (``samples``) and what ``prepare`` gave (``state``)."""

    evaluator: Evaluator
    model: nn.Module
    sampler: Sampler
    samples: Mapping[str, list[list[Sample]]]
    state: Any = None

    @property
    def config(self) -> Any:
        return self.evaluator.config

    def texts(self, mode: str, n: int) -> list[list[str]]:
        """The first ``n`` replies of each prompt in decoding ``mode``."""
        return [[s.text for s in row[:n]] for row in self.samples[mode]]


def one_list_per_prompt(prompts: Sequence[Any], completions: Sequence[Sequence[Any]]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completion lists; pass one list per prompt")
