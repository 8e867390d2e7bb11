"""Markdown tables of measured numbers: value ± standard error per model, and paired differences with intervals."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from itermerge.search.selection import LOWER_IS_BETTER

METRIC_ORDER = ("accuracy", "format", "reward", "kl")  # then lm_eval/* in their order


def fmt_metric(m: dict[str, Any] | None) -> str:
    """``0.55 ± 0.05`` (4 significant digits, the stderr to 2); blank when absent."""
    if m is None:
        return ""
    se = "" if m.get("stderr") is None else f" ± {m['stderr']:.2g}"
    return f"{m['value']:.4g}{se}"


def metric_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    names = {n for r in rows for n in r["metrics"]}
    return [n for n in METRIC_ORDER if n in names] + sorted(n for n in names if n not in METRIC_ORDER)


def metrics_table(rows: Sequence[tuple[str, dict[str, Any]]], baseline: dict[str, Any] | None = None) -> str:
    """A Markdown table, one row per model, one column per metric; ``n`` in the header when every row agrees.

    Rows named "Merged…" also show the difference to ``baseline`` (θT), as Table 2 does.
    """
    names = metric_names([m for _, m in rows])
    header = []
    for n in names:
        ns = {m["metrics"][n]["n"] for _, m in rows if n in m["metrics"]}
        arrow = " ↓" if n in LOWER_IS_BETTER else ""
        header.append(f"{n}{arrow} (n={ns.pop()})" if len(ns) == 1 else f"{n}{arrow}")
    lines = ["| model | " + " | ".join(header) + " |", "|---" * (len(names) + 1) + "|"]
    for name, m in rows:
        cells = []
        for n in names:
            cell = fmt_metric(m["metrics"].get(n))
            if len({r["metrics"][n]["n"] for _, r in rows if n in r["metrics"]}) > 1 and n in m["metrics"]:
                cell += f" (n={m['metrics'][n]['n']})"
            if baseline is not None and name.startswith("Merged") and n in m["metrics"] and n in baseline["metrics"]:
                cell += f" ({m['metrics'][n]['value'] - baseline['metrics'][n]['value']:+.3g})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fmt_ci(d: dict[str, Any], low: str = "ci_low", high: str = "ci_high") -> str:
    """``[−0.012, +0.034]``, or ``n/a`` where no interval could be computed."""
    if d.get(low) is None or d.get(high) is None:
        return "n/a"
    return f"[{d[low]:+.3g}, {d[high]:+.3g}]"


def fmt_difference(d: dict[str, Any] | None) -> str:
    """``+0.025 [−0.012, +0.061] p=0.19``: a paired difference (``maths.paired``), blank when absent."""
    if not d:
        return ""
    p = "" if d.get("p_value") is None else f" p={d['p_value']:.2g}"
    return f"{d['difference']:+.3g} {fmt_ci(d)}{p}"


def paired_table(paired: Sequence[dict[str, Any]]) -> str:
    """One row per comparison (the merge − a baseline), one column per metric held per prompt by both."""
    names = metric_names([{"metrics": row["metrics"]} for row in paired])
    if not paired or not names:
        return ""
    lines = ["| merge − | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in paired:
        lines.append(f"| {row['b_name']} | " + " | ".join(fmt_difference(row["metrics"].get(n)) for n in names) + " |")
    return "\n".join(lines) + "\n"
