"""The evaluators: one module each, one registry line each. The evaluation loop (``evaluation/suite.py``), the
search's directions (``search/selection.py``), ``itermerge eval --help`` and the docs table read these declarations.

A new evaluator is a module with a ``SPEC`` (``base.Spec``), its settings as a section of
``config.evaluation.EvalConfig`` under the same name, and a line here; order here is the order of its metrics in
every table."""

from __future__ import annotations

from itermerge.evaluation.evaluators import accuracy, axes, kl, lm_eval, reward
from itermerge.evaluation.evaluators.base import Pass, Spec

REGISTRY: dict[str, Spec] = {spec.name: spec for spec in (
    accuracy.SPEC,
    reward.SPEC,
    axes.SPEC,
    kl.SPEC,
    lm_eval.SPEC,
)}


def metric_order() -> tuple[str, ...]:
    """The metrics every table shows first, in this order (then the others by name: axes, benchmarks)."""
    return tuple(name for spec in REGISTRY.values() for name in spec.metrics)


def lower_is_better() -> frozenset[str]:
    """Every metric that is better lower (every other is better higher)."""
    return frozenset().union(*(spec.lower_is_better for spec in REGISTRY.values()))


def markdown_table() -> str:
    """The evaluators as a markdown table (docs/design.md holds it; a test keeps the two equal)."""
    rows = ["| `evaluation.` | what it measures | reports | reads π_ref |", "|---|---|---|---|"]
    for s in REGISTRY.values():
        rows.append(f"| `{s.name}` | {s.summary} | {s.reports} | {'yes' if s.needs_reference else '—'} |")
    return "\n".join(rows) + "\n"


__all__ = ["REGISTRY", "Pass", "Spec", "lower_is_better", "markdown_table", "metric_order"]
