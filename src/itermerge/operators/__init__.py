"""The merge operators: one module each, one registry line each. The CLI's flags, the config's search.operators,
the search's tables, mergekit export, merge.json and the docs table are generated from these declarations."""

from __future__ import annotations

from typing import Any

from itermerge.errors import ItermergeError
from itermerge.operators import dare, ema, expo, groups, learned, model_stock, paper, slerp, ties
from itermerge.operators.base import Operator, Param, Resolved, Spec

REGISTRY: dict[str, Spec] = {spec.name: spec for spec in (
    paper.SPEC,
    expo.SPEC,
    ema.SPEC,
    slerp.SPEC,
    ties.SPEC,
    dare.SPEC,
    groups.SPEC,
    model_stock.SPEC,
    learned.SPEC,
)}


def spec(name: str) -> Spec:
    """The declaration of ``--method name``; an unknown name is a named error listing the others."""
    if name not in REGISTRY:
        raise ItermergeError(f"--method {name!r}: not one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def operator(method: str, **params: Any) -> Operator:
    """``--method`` with its parameters (None: not given), checked once against its declaration."""
    found = spec(method)
    return Operator(found, found.check(params))


def parameters() -> dict[str, Param]:
    """Every parameter of every operator, once (the first declaration of a name): the CLI's flags."""
    out: dict[str, Param] = {}
    for s in REGISTRY.values():
        for p in s.params:
            out.setdefault(p.name, p)
    return out


def markdown_table() -> str:
    """The operators as a markdown table (docs/design.md holds it; a test keeps the two equal)."""
    rows = ["| `--method` | what it merges | parameters | linear in θ0..θT (LoRA adapters) | search | mergekit |",
            "|---|---|---|---|---|---|"]
    for s in REGISTRY.values():
        takes = ", ".join(f"`{p.flag}`" + (" (required)" if p.required else "") for p in s.params) or "none"
        search = "—" if s.searched is None else {
            "basis": "in memory", "each": "in memory (every θ_t)", "disk": "merged to disk",
            "fit": "fitted on half of dev, checked on the other (" + ", ".join(f"`{p.name}`" for p in s.fitted) + ")",
        }[s.search]
        what = s.description.replace("|", "\\|")  # a literal | inside a table cell
        mergekit = f"`{s.mergekit}`" if s.mergekit else "—"
        rows.append(f"| `{s.name}` | {what} | {takes} | {s.linearity} | {search} | {mergekit} |")
    return "\n".join(rows) + "\n"


__all__ = ["REGISTRY", "Operator", "Param", "Resolved", "Spec", "markdown_table", "operator", "parameters", "spec"]
