"""Pareto frontier of reward against capability, and the paper's rule for choosing (λ, α) (§4.2)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from itermerge.config.search import SelectionRule
from itermerge.errors import ItermergeError
from itermerge.evaluation.evaluators import lower_is_better

LOWER_IS_BETTER = lower_is_better()  # as the evaluators declare them; every other metric: higher is better

Point = Mapping[str, Any]  # a points.jsonl record: {"lam", "alpha", "metrics": {name: {"value", "stderr", "n"}}, …}


def value(point: Point, metric: str) -> float:
    metrics = point["metrics"]
    if metric not in metrics:
        raise ItermergeError(
            f"point λ={point.get('lam')}, α={point.get('alpha')} has no metric {metric!r}; it has {sorted(metrics)}. "
            "Turn that evaluator on or choose another metric for the selection rule"
        )
    return float(metrics[metric]["value"])


def oriented(point: Point, metric: str) -> float:
    """The metric with its sign flipped where lower is better, so that larger is always better."""
    return -value(point, metric) if metric in LOWER_IS_BETTER else value(point, metric)


def pareto_frontier(points: Sequence[Point], reward: str, capability: str) -> list[int]:
    """Indices of the points that no other point beats on both axes, sorted by capability.

    Point j dominates i when j is at least as good on reward and capability and better on one. With
    (capability, reward) = (1, 1), (2, 0), (0, 2), (1, 0.5): the first three form the frontier.
    """
    xy = [(oriented(p, capability), oriented(p, reward)) for p in points]
    keep = [
        i for i, (x, y) in enumerate(xy)
        if not any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for x2, y2 in xy)
    ]
    return sorted(keep, key=lambda i: (xy[i][0], -xy[i][1]))


def regressions(point: Point, baseline: Point, rule: SelectionRule) -> list[str]:
    """Each capability metric on which ``point`` is worse than the baseline beyond the tolerance, in words."""
    failed = []
    for metric in rule.capability:
        got, floor = oriented(point, metric), oriented(baseline, metric) - rule.tolerance
        if got < floor - 1e-12:
            sign = -1 if metric in LOWER_IS_BETTER else 1
            op = ">" if sign < 0 else "<"
            failed.append(f"{metric} {sign * got:.4g} {op} θT's {value(baseline, metric):.4g} "
                          f"{'+' if sign < 0 else '−'} {rule.tolerance:g}")
    return failed


def select_point(points: Sequence[Point], baseline: Point, rule: SelectionRule) -> dict[str, Any]:
    """Apply the rule; returns the chosen point's (λ, α), its numbers, θT's, and why (as data and words).

    Ties in reward go to the point nearest θT (smaller α, then smaller λ).
    """
    if not points:
        raise ItermergeError("no search points to choose from; run the search first")
    eligible, excluded = [], []
    for p in points:
        failed = regressions(p, baseline, rule)
        (excluded if failed else eligible).append((p, failed))
    if not eligible:  # only when the baseline is not among the points
        raise ItermergeError("no search point keeps the capability of θT; include λ = 0, α = 0 in the grid")
    chosen = min(eligible, key=lambda pf: (-oriented(pf[0], rule.reward), abs(pf[0]["alpha"]), abs(pf[0]["lam"])))[0]
    better_excluded = sorted(
        (pf for pf in excluded if oriented(pf[0], rule.reward) > oriented(chosen, rule.reward)),
        key=lambda pf: -oriented(pf[0], rule.reward),
    )
    gain = _difference(chosen, baseline, rule.reward)
    r, b = chosen["metrics"][rule.reward], baseline["metrics"][rule.reward]
    if rule.capability:
        among = (f"among the {len(eligible)} of {len(points)} points whose {', '.join(rule.capability)} did not fall "
                 f"below θT's by more than {rule.tolerance:g}")
    else:
        among = f"among all {len(points)} points (the rule names no capability metric that may not regress)"
    reason = f"highest {rule.reward} ({_fmt(r)}) {among}; θT (λ=0, α=0) has {rule.reward} {_fmt(b)}"
    if better_excluded:
        top, why = better_excluded[0]
        reason += f"; λ={top['lam']:g}, α={top['alpha']:g} had more {rule.reward} but {'; '.join(why)}"
    return {
        "lam": chosen["lam"],
        "alpha": chosen["alpha"],
        "weights": chosen.get("weights"),
        "rule": rule.to_dict(),
        "reason": reason,
        "chosen": {"metrics": chosen["metrics"]},
        "baseline": {"lam": baseline["lam"], "alpha": baseline["alpha"], "metrics": baseline["metrics"]},
        "reward_gain": gain,
        "eligible": [[p["lam"], p["alpha"]] for p, _ in eligible],
        "excluded": [{"lam": p["lam"], "alpha": p["alpha"], "why": why} for p, why in excluded],
    }


def select_checkpoint(checkpoints: Sequence[Point], rule: SelectionRule) -> dict[str, Any]:
    """Early stopping by the merge's own rule: the best θt (t ≥ 1) on dev, as ``select_point`` picks (λ, α).

    checkpoints: checkpoints.jsonl records {"t", "name", "metrics"} of θ0..θT (θ0 is not a candidate: it is its own
    baseline row). A θt is eligible when none of the rule's capability metrics falls below θT's (the record of
    largest t) by more than the tolerance; the eligible θt of highest reward is chosen, a tie going to the later
    one (nearer θT, as ``select_point`` breaks ties towards θT). θT itself is always eligible.
    """
    iterates = [c for c in checkpoints if isinstance(c.get("t"), int) and c["t"] >= 1]
    if not iterates:
        raise ItermergeError("no θt (t ≥ 1) on dev to choose from; run the search, which evaluates θ0..θT")
    base = max(iterates, key=lambda c: c["t"])
    eligible, excluded = [], []
    for c in sorted(iterates, key=lambda c: c["t"]):
        failed = regressions(c, base, rule)
        (excluded if failed else eligible).append((c, failed))
    chosen = min(eligible, key=lambda cf: (-oriented(cf[0], rule.reward), -cf[0]["t"]))[0]
    r = chosen["metrics"][rule.reward]
    among = (f"among the {len(eligible)} of θ1..θ{base['t']} whose {', '.join(rule.capability)} did not fall below "
             f"θT's by more than {rule.tolerance:g}" if rule.capability else f"among θ1..θ{base['t']}")
    return {
        "t": chosen["t"],
        "name": chosen.get("name"),
        "rule": rule.to_dict(),
        "reason": f"highest {rule.reward} ({_fmt(r)}) {among}",
        "chosen": {"metrics": chosen["metrics"]},
        "eligible": [c["t"] for c, _ in eligible],
        "excluded": [{"t": c["t"], "why": why} for c, why in excluded],
    }


def _difference(a: Point, b: Point, metric: str) -> dict[str, Any]:
    """a − b on ``metric``: paired over the prompts both were scored on when their records keep per-prompt values
    (``maths.paired``: exact McNemar/Newcombe for 0/1 scores, else a seeded bootstrap), else the unpaired
    √(se_a² + se_b²) of two independent means (conservative, as both used the same prompts)."""
    ma, mb = a["metrics"][metric], b["metrics"][metric]
    diff = ma["value"] - mb["value"]
    items_a, items_b = ma.get("items"), mb.get("items")
    if items_a is not None and items_b is not None and len(items_a) == len(items_b) and len(items_a) >= 2:
        from itermerge.maths.paired import paired_difference

        d = paired_difference(items_a, items_b)
        se = d["stderr"]
        return {"value": d["difference"], "stderr": se, "z": None if not se else d["difference"] / se,
                "ci_low": d["ci_low"], "ci_high": d["ci_high"], "p_value": d["p_value"], "method": d["method"],
                "paired": True, "n": d["n"]}
    se = None if ma["stderr"] is None or mb["stderr"] is None else math.hypot(ma["stderr"], mb["stderr"])
    return {"value": diff, "stderr": se, "z": None if not se else diff / se, "paired": False}


def _fmt(m: Mapping[str, Any]) -> str:
    se = "" if m.get("stderr") is None else f" ± {m['stderr']:.3g}"
    return f"{m['value']:.4g}{se}, n={m['n']}"
