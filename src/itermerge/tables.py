"""Markdown tables of measured numbers: value ± standard error per model, and paired differences with intervals."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from itermerge.evaluation.evaluators import metric_order
from itermerge.search.selection import LOWER_IS_BETTER

METRIC_ORDER = metric_order()  # accuracy, format, reward, kl, as the evaluators declare; then the others by name


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

    Rows named "Merged…" also show the difference to ``baseline`` (θT), as Table 2 does. A row whose model holds
    ``equals`` (e.g. "θT": ExPO at α = 0) reads "= θT" in every cell instead of repeating that row's numbers.
    """
    names = metric_names([m for _, m in rows])
    header = []
    for n in names:
        ns = {m["metrics"][n]["n"] for _, m in rows if n in m["metrics"]}
        arrow = " ↓" if n in LOWER_IS_BETTER else ""
        header.append(f"{n}{arrow} (n={ns.pop()})" if len(ns) == 1 else f"{n}{arrow}")
    lines = ["| model | " + " | ".join(header) + " |", "|---" * (len(names) + 1) + "|"]
    for name, m in rows:
        if m.get("equals"):
            lines.append(f"| {name} | " + " | ".join([f"= {m['equals']}"] * len(names)) + " |")
            continue
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


def paired_table(paired: Sequence[dict[str, Any]], minus: str = "merge") -> str:
    """One row per comparison (``minus``, the merge, − a baseline), one column per metric held per prompt by both; a
    row with ``equals`` names the row whose comparison it repeats."""
    names = metric_names([{"metrics": row["metrics"]} for row in paired])
    if not paired or not names:
        return ""
    lines = [f"| {minus} − | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in paired:
        if row.get("equals"):  # the same model as another row: its comparison is that row's
            lines.append(f"| {row['b_name']} | " + " | ".join([f"= {minus} − {row['equals']}"] * len(names)) + " |")
            continue
        lines.append(f"| {row['b_name']} | " + " | ".join(fmt_difference(row["metrics"].get(n)) for n in names) + " |")
    return "\n".join(lines) + "\n"


def operators_table(record: dict[str, Any], metrics: Sequence[str] | None = None) -> str:
    """search/operators.json as a table: θT and the chosen paper merge, then one row per other operator with its value
    chosen on dev, its test metrics (value ± stderr) and its paired difference from the paper's merge (``metrics``:
    only these columns)."""
    measured = [*record["baselines"], *(o for o in record["operators"] if o["metrics"] is not None)]
    names = [n for n in metric_names(measured) if metrics is None or n in metrics]
    head = ["model", "value chosen on dev", *names, *(f"{n}: − merge (95% CI, p)" for n in names)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in record["baselines"]:
        cells = ["", *(fmt_metric(row["metrics"].get(n)) for n in names), *([""] * len(names))]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    for o in record["operators"]:
        if o["metrics"] is None:  # no choice (no value kept θT's capability on dev: the rule keeps θT)
            lines.append(f"| {o['title']} | none: {o['none']} | " + " | ".join([""] * 2 * len(names)) + " |")
            continue
        against = next((p["metrics"] for p in o["paired"] if p["b"] == "merged"), {})
        cells = [o["label"], *(fmt_metric(o["metrics"].get(n)) for n in names),
                 *(fmt_difference(against.get(n)) for n in names)]
        lines.append(f"| {o['title']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check_section(o: dict[str, Any]) -> str:
    """A fitted operator's check (search/learned.py): on the half of dev its fit never read, its k_t beside the
    paper's (λ, α), best θt and θT chosen by the rule on the fit half, and the uniform average."""
    check = o["dev"]["check"]
    start, stop = check["halves"]["check"]
    return (f"\n{o['title']} checked on dev prompts [{start}, {stop}), which its fit never read; every other row "
            f"was chosen by the rule on the fit half [{check['halves']['fit'][0]}, {check['halves']['fit'][1]}) "
            "and is read here from the search's own dev records:\n\n"
            + metrics_table([(m["name"], m) for m in check["models"]])
            + "\n" + paired_table(check["paired"], minus=o["title"]))
