"""The results page's claims: the paper's and ours, the study's primary endpoint, Holm for the rest, and verdicts.

A claim is one measured difference with the sign someone expects. "The paper's" are what the paper states (Alg. 1
helps, the merge beats θT as in Table 2, and the demo's Table 1, Fig. 3-4 and eq. 6 rows); "ours" are the questions
this project adds (the merge against early stopping on dev, ExPO and the uniform average; the last iteration's
over-optimisation). One comparison per study is declared primary in the study file and read unadjusted; every other
comparison of the study gets Holm-adjusted p-values (``maths.paired.holm_adjust``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itermerge.errors import ItermergeError
from itermerge.rundir import RunLayout
from itermerge.tables import fmt_ci

HEADLINE = ("accuracy", "reward")
# our baselines: (what the merge beats, the row subtracted)
LABELS = {"best": ("early stopping", "best θt on dev"), "expo": ("ExPO", "ExPO"),
          "uniform": ("the uniform average", "the uniform average"),
          "learned": ("learned k_t", "learned k_t (fitted on half of dev)")}  # only where search.operators fitted it


@dataclass
class Claim:
    """One row of a claims table. ``key`` = (regime, T, a, b, metric) for a study comparison, None for the demo's."""

    text: str
    where: str
    d: dict[str, Any] | None
    direction: int = 1
    group: str = "paper"  # or "ours"
    key: tuple[Any, ...] | None = None
    primary: bool = False
    holm: dict[str, float | None] = field(default_factory=dict)  # {"p_value", "t_p_value"}: Holm-adjusted


def verdict(d: dict[str, Any] | None, direction: int = 1) -> str:
    """held / contradicted / not shown for a difference whose claimed sign is ``direction``.

    A pooled difference carries two intervals: the crossed bootstrap over seeds and the shared prompts
    (``ci_low``/``ci_high``; new seeds and new prompts) and the t interval over the S per-seed differences
    (``across_seeds``, S − 1 df; these prompts only). With 5 seeds the bootstrap's seed term runs narrow and the t
    interval ignores prompt sampling, so a claim is held (or contradicted) only when both intervals say so.
    """
    if not d or d.get("ci_low") is None or d.get("ci_high") is None:
        return "not measured"
    seeds = d.get("across_seeds") or {}
    intervals = [(d["ci_low"], d["ci_high"])]
    if seeds.get("ci_low") is not None and seeds.get("ci_high") is not None:
        intervals.append((seeds["ci_low"], seeds["ci_high"]))
    said = set()
    for ci in intervals:
        low, high = sorted((ci[0] * direction, ci[1] * direction))  # a claim of "< 0" flips the interval
        said.add("held" if low > 0 else "contradicted" if high < 0 else "not shown")
    return said.pop() if len(said) == 1 else "not shown"


def claim_verdict(c: Claim) -> str:
    """The interval verdict; a study claim other than the primary also needs its Holm-adjusted p-values below 0.05
    (both of them, as it needs both intervals); a demo row without an interval is read from its test or its sign."""
    v, d = verdict(c.d, c.direction), c.d
    adjusted = [p for p in c.holm.values() if p is not None]
    if v in ("held", "contradicted") and adjusted and max(adjusted) >= 0.05:
        return f"not shown after Holm ({v} unadjusted)"
    if v == "not measured" and d is not None and d.get("p_value") is not None:  # a test, not an interval
        return "not shown" if d["p_value"] >= 0.05 else "held" if d["difference"] * c.direction > 0 else "contradicted"
    if v == "not measured" and d is not None:
        return ("in the claimed direction" if d["difference"] * c.direction > 0 else "against the claim") + \
            " (one run, no interval)"
    return v


def paired(search: dict[str, Any], b: Any, metric: str, key: str = "paired", a: Any = "merged"
           ) -> dict[str, Any] | None:
    return next((p["metrics"].get(metric) for p in search.get(key, []) if p["b"] == b and p["a"] == a), None)


def expo_is_theta_T(search: dict[str, Any]) -> bool:
    """Whether ExPO's dev choice was α = 0 (ExPO is θT itself) in every seed of an aggregated search."""
    flags = [c.get("expo_is_theta_T") for c in search.get("choices", [])]
    return bool(flags) and all(flags)


def study_claims(agg: dict[str, Any], primary: dict[str, Any] | None = None) -> list[Claim]:
    """Every comparison of the study as a claim (regime by regime, T by T), the primary endpoint marked, and the
    others' Holm-adjusted p-values set (``holm``). ExPO's rows are left out where ExPO is θT in every seed."""
    claims = []
    for regime, data in agg["regimes"].items():
        for s in data["searches"].values():
            n, T = len(s["seeds"]), s["T"]
            where = f"{regime}, T = {T}, {n} seed{'s' if n > 1 else ''}"
            claims.append(Claim("Iterative DPO improves on θ0 (Alg. 1): θT − θ0, accuracy", where,
                                paired(s, 0, "accuracy", "iterations", T), key=(regime, T, T, 0, "accuracy")))
            claims.append(Claim("*Observed, not claimed:* the last iteration over-optimises: θT − θ_{T−1} < 0, "
                                "accuracy", where, paired(s, T - 1, "accuracy", "iterations", T), -1, "ours",
                                (regime, T, T, T - 1, "accuracy")))
            for metric in HEADLINE:
                claims.append(Claim(f"The merge beats θT (Table 2): merge − θT, {metric}", where, paired(s, T, metric),
                                    key=(regime, T, "merged", T, metric)))
            for b, (label, row) in LABELS.items():
                if b == "expo" and expo_is_theta_T(s):
                    continue  # ExPO is θT in every seed: its comparison is the Table 2 row
                if b == "learned" and all(paired(s, b, metric) is None for metric in HEADLINE):
                    continue  # the study did not fit the k_t (search.operators.learned)
                for metric in HEADLINE:
                    claims.append(Claim(f"The merge beats {label}: merge − {row}, {metric}", where,
                                        paired(s, b, metric), group="ours", key=(regime, T, "merged", b, metric)))
    for name, compared in (agg.get("across") or {}).get("searches", {}).items():  # regimes against the anchor
        for c in compared:
            where = f"{name}, {len(c['seeds'])} seed{'s' if len(c['seeds']) > 1 else ''}"
            for metric in HEADLINE:
                claims.append(Claim(f"*Across regimes:* {c['a_name']} beats {c['b_name']}, {metric}", where,
                                    c["metrics"].get(metric), group="ours", key=("across", name, *c["a"], *c["b"],
                                                                                   metric)))
    if primary is not None:
        _mark_primary(claims, agg, primary)
    holm(claims)
    return claims


def _mark_primary(claims: list[Claim], agg: dict[str, Any], primary: dict[str, Any]) -> None:
    """Mark the claim of the primary endpoint, adding it when it is not among them (e.g. merge − θ0)."""
    from itermerge.config.study import COMPARISONS

    b = COMPARISONS[primary["comparison"]]
    b = primary["T"] if b == "T" else b
    key = (primary["regime"], primary["T"], "merged", b, primary["metric"])
    found = next((c for c in claims if c.key == key), None)
    if found is None:
        search = next((s for s in (agg["regimes"].get(primary["regime"]) or {}).get("searches", {}).values()
                       if s["T"] == primary["T"]), None)
        label, row = ("θT", "θT") if b == primary["T"] else ("θ0", "θ0") if b == 0 else LABELS[b]
        found = Claim(f"The merge beats {label}: merge − {row}, {primary['metric']}",
                      f"{primary['regime']}, T = {primary['T']}",
                      None if search is None else paired(search, b, primary["metric"]),
                      group="paper" if b == primary["T"] else "ours", key=key)
        claims.insert(0, found)
    found.primary = True


def holm(claims: Sequence[Claim]) -> None:
    """Holm-adjust the p-values of every study claim but the primary: the bootstrap p's as one family and the t-test
    p's over seeds as another, each over the claims that have one."""
    from itermerge.maths.paired import holm_adjust

    family = [c for c in claims if c.key is not None and not c.primary and c.d]
    for name, read in (("p_value", lambda d: d.get("p_value")),
                       ("t_p_value", lambda d: (d.get("across_seeds") or {}).get("p_value"))):
        tested = [c for c in family if read(c.d) is not None]
        for c, p in zip(tested, holm_adjust([read(c.d) for c in tested])):
            c.holm[name] = p


def demo_claims(demo: Path) -> list[Claim]:
    """The studies of one demo run (one seed): the α correlation (Table 1), λ (Fig. 3-4), merge vs ensemble (eq. 6)."""
    manifest = RunLayout(demo).manifest
    if not manifest.exists():
        raise ItermergeError(f"{manifest}: not found; give the run directory of `make demo`")
    stages = json.loads(manifest.read_text()).get("stages", {})
    where = f"{demo.name}, one seed"
    claims = []
    alpha = (stages.get("studies/alpha") or {}).get("correlations") or {}
    r = alpha.get("r_theta_T") or {}
    if r:
        claims.append(Claim("α extrapolation raises the induced reward r_θ (Table 1): Pearson r(α, r_θT)", where,
                            {"difference": r["pearson_r"], "ci_low": None, "ci_high": None,
                             "p_value": r.get("p_value")}))
    lam = stages.get("studies/lambda") or {}
    if lam.get("reward_correlation") is not None:
        claims.append(Claim("Two criteria trade off along λ (Fig. 3-4): r between the two rewards", where,
                            {"difference": lam["reward_correlation"], "ci_low": None, "ci_high": None}, -1))
    ens = (stages.get("studies/ensemble") or {}).get("kl_ensemble_to_model_per_token") or {}
    if "merged" in ens and "theta_T" in ens:
        claims.append(Claim("The merge approximates the eq. 6 ensemble better than θT: KL(ens ‖ θT) − KL(ens ‖ "
                            "merge)", where, {"difference": ens["theta_T"] - ens["merged"], "ci_low": None,
                                              "ci_high": None}))
    return claims


def claims_table(claims: Sequence[Claim]) -> str:
    """One Markdown row per claim: value, crossed interval, p (bootstrap / t-test), Holm-adjusted p, t interval."""
    lines = ["| claim | measured on | value | 95% CI (crossed bootstrap) | p | p, Holm-adjusted | "
             "95% CI (t over seeds) | verdict |", "|---|---|---|---|---|---|---|---|"]
    for c in claims:
        d = c.d or {}
        value = "" if not d else f"{d['difference']:+.3g}"
        p = "" if d.get("p_value") is None else f"{d['p_value']:.2g}"
        t_p = (d.get("across_seeds") or {}).get("p_value")
        p += "" if t_p is None else f" / {t_p:.2g}"
        if c.primary:
            adjusted = "primary endpoint: unadjusted"
        else:
            adjusted = " / ".join(f"{c.holm[k]:.2g}" for k in ("p_value", "t_p_value") if c.holm.get(k) is not None)
        text = f"**Primary endpoint:** {c.text}" if c.primary else c.text
        lines.append(f"| {text} | {c.where} | {value} | {fmt_ci(d)} | {p} | {adjusted} | "
                     f"{fmt_ci(d.get('across_seeds') or {})} | {claim_verdict(c)} |")
    return "\n".join(lines) + "\n"
