"""Learned merge weights, validated honestly (issue 27): eq. (9)'s k_1..k_T fitted on one half of dev, checked on
the other.

The dev prompts are split once, [0, n/2) to fit and [n/2, n) to check. The fit sees the fit half alone: coordinate
ascent (``ascend``) from the better of θT and the uniform average by the paper's rule, each round moving one k_t by
± step. The check measures the fitted k_t on the check half once, beside the paper's (λ, α), early stopping's θt and
θT, each chosen by the same rule on the fit half and read on the check half from the search's own dev records
(``part``: their per-prompt values). So every row of the check is chosen without the prompts it is checked on. The
test split then measures the fitted k_t once, as every other operator (``search.operators``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from itermerge.config.search import SelectionRule
from itermerge.errors import ItermergeError
from itermerge.evaluation.metric import mean_metric
from itermerge.records import read_records
from itermerge.search import budget
from itermerge.search.context import Bench, SearchContext, evaluate_each
from itermerge.search.grid import model_name, point_key, search_grid
from itermerge.search.selection import oriented, regressions, select_checkpoint, select_point

FIT, CHECK = "fit", "check"
Measure = Callable[[Sequence[tuple[float, ...]]], list[dict[str, Any]]]  # k's → their metrics on the fit half


def halves(n: int) -> dict[str, tuple[int, int]]:
    """The dev prompts [start, stop) each half reads: the first ⌊n/2⌋ fit, the rest check."""
    if n < 4:
        raise ItermergeError(f"search.operators.learned: {n} dev prompts cannot be split into a fit half and a check "
                             "half of at least 2 each; give prompts.dev >= 4 (64 in the study)")
    return {FIT: (0, n // 2), CHECK: (n // 2, n)}


def part(metrics: Mapping[str, Any], start: int, stop: int, where: str,
         needed: Sequence[str] = ()) -> dict[str, Any]:
    """The metrics over the prompts [start, stop) alone, from their per-prompt values (a metric without them is left
    out; one of ``needed`` without them is a named error)."""
    out = {}
    for name, m in metrics.items():
        items = m.get("items")
        if items is not None:
            out[name] = mean_metric(items[start:stop]).to_dict()
    missing = [name for name in needed if name not in out]
    if missing:
        raise ItermergeError(f"{where}: metric {missing[0]!r} has no per-prompt values, so it cannot be split into "
                             "the fit and check halves of dev; the learned weights need a rule whose metrics are "
                             "per prompt (accuracy, reward: not lm_eval's)")
    return out


def key(half: str, k: Sequence[float]) -> str:
    """A fit or check evaluation's record key in operators.jsonl: ``learned fit k=[0.25, 0.25, 0.5]``."""
    return f"learned {half} k=[{', '.join(f'{x:.9g}' for x in k)}]"


def _prefer(points: Sequence[dict[str, Any]], base: Mapping[str, Any], rule: SelectionRule) -> dict[str, Any]:
    """The paper's rule among ``points``: the highest reward among those that keep θT's capability; a tie goes to
    the earlier point (the current k before a move)."""
    eligible = [p for p in points if not regressions(p, base, rule)]
    best = eligible[0]
    for p in eligible[1:]:
        if oriented(p, rule.reward) > oriented(best, rule.reward):
            best = p
    return best


def ascend(T: int, base: Mapping[str, Any], rule: SelectionRule, measure: Measure, rounds: int = 3,
           step: float = 0.1) -> dict[str, Any]:
    """Coordinate ascent on eq. (9)'s k_1..k_T under the paper's rule on the fit half.

    ``base``: θT's record on the fit half (k = e_T; always eligible, so every point kept is). It starts at whichever
    of θT and the uniform average (k_t = 1/T) the rule prefers; each round tries k ± step·e_t for every t (2T moves,
    measured together by ``measure``), moves to the one the rule prefers over the current k, and halves the step when
    none is. Returns the fitted k, its metrics, and every point tried with its round and whether it was eligible."""
    theta_T = {"weights": (*(0.0,) * (T - 1), 1.0), "metrics": base["metrics"]}
    uniform = tuple(round(1.0 / T, 9) for _ in range(T))
    start = {"weights": uniform, "metrics": measure([uniform])[0]}
    current = _prefer([theta_T, start], base, rule)
    began = "θT" if current is theta_T else "the uniform average"
    tried = [{"round": 0, "weights": list(uniform), "metrics": start["metrics"]}]
    path = [{"round": 0, "weights": list(current["weights"]), "step": step}]
    for r in range(1, rounds + 1):
        k = current["weights"]
        moves = list(dict.fromkeys(tuple(round(x + sign * step, 9) if s == t else x for s, x in enumerate(k))
                                   for t in range(T) for sign in (1.0, -1.0)))
        points = [{"weights": w, "metrics": m} for w, m in zip(moves, measure(moves))]
        tried += [{"round": r, "weights": list(p["weights"]), "metrics": p["metrics"]} for p in points]
        best = _prefer([current, *points], base, rule)
        if best is current:
            step /= 2
        current = best
        path.append({"round": r, "weights": list(current["weights"]), "step": step})
    for t in tried:
        t["eligible"] = not regressions(t, base, rule)
    return {"weights": list(current["weights"]), "metrics": current["metrics"], "tried": tried, "path": path,
            "start": began}


# --- the fit and the check in a search ----------------------------------------------------------------------


def fit(ctx: SearchContext, base: Mapping[str, Any], settings: Mapping[str, Any], *, evaluate: bool
        ) -> dict[str, Any]:
    """``ascend`` on the fit half of the search's dev split: each k measured once and appended to operators.jsonl
    (``evaluate``: the missing ones measured; else a missing one is a named error: the choice only replays the
    records). ``base``: θT's dev record. Returns the fit, the halves and how many k it measured."""
    n = budget.context_dev_size(ctx)
    span = halves(n)
    rule = ctx.config.rule
    base_fit = {**base, "metrics": part(base["metrics"], *span[FIT], "θT's dev record", rule.metrics)}
    records = {r["key"]: r for r in read_records(ctx.files.operator_records) if ctx.same(r)}
    measured = [0]

    def measure(ks: Sequence[tuple[float, ...]]) -> list[dict[str, Any]]:
        todo = [k for k in dict.fromkeys(ks) if key(FIT, k) not in records]
        if todo and not evaluate:
            raise ItermergeError(f"{ctx.files.operator_records}: no record of {key(FIT, todo[0])!r}; rerun the search "
                                 "to fit the learned weights")
        for row in _measure(ctx, todo, FIT, span[FIT]):
            records[row["key"]] = row
        measured[0] += len(todo)
        return [records[key(FIT, k)]["metrics"] for k in ks]

    out = ascend(ctx.T, base_fit, rule, measure, **_settings(settings))
    return {**out, "halves": span, "n": n, "measured": measured[0], "base": base_fit,
            "seconds": {key(FIT, tuple(t["weights"])): records[key(FIT, tuple(t["weights"]))]["seconds"]
                        for t in out["tried"]}}


def check(ctx: SearchContext, result: Mapping[str, Any], *, evaluate: bool) -> dict[str, Any]:
    """The fitted k on the check half (measured once, recorded), beside what the search's own dev records give there:
    the paper's (λ, α), best θt and θT chosen by the rule on the fit half, and the uniform average where the grid
    holds it. Returns the rows and the fitted k minus each, paired prompt by prompt."""
    from itermerge.search.finalize import paired_rows

    span, rule, T = result["halves"], ctx.config.rule, ctx.T
    k = tuple(result["weights"])
    rows = {r["key"]: r for r in read_records(ctx.files.operator_records) if ctx.same(r) and r["key"] == key(CHECK, k)}
    if not rows and not evaluate:
        raise ItermergeError(f"{ctx.files.operator_records}: no record of {key(CHECK, k)!r}; rerun the search to "
                             "check the learned weights")
    mine = rows.get(key(CHECK, k)) or _measure(ctx, [k], CHECK, span[CHECK])[0]
    fit_of = lambda r: {**r, "metrics": part(r["metrics"], *span[FIT], "dev record", rule.metrics)}  # noqa: E731
    check_of = lambda r: part(r["metrics"], *span[CHECK], "dev record")  # noqa: E731
    grid = {point_key(*p) for p in search_grid(T, ctx.config)}
    whole = lambda r: len(r["metrics"].get(rule.reward, {}).get("items") or ()) == result["n"]  # noqa: E731
    # every point of the grid (successive halving keeps only its finalists' records on every dev prompt)
    points = [r for r in read_records(ctx.files.points)
              if ctx.same(r) and point_key(r["lam"], r["alpha"]) in grid and whole(r)]
    by_key = {point_key(r["lam"], r["alpha"]): r for r in points}
    base = by_key[(0.0, 0.0)]
    paper = select_point([fit_of(r) for r in points], fit_of(base), rule)
    ckpts = {r["t"]: r for r in reversed(read_records(ctx.files.checkpoints)) if ctx.same(r) and r["t"] <= T}
    early = select_checkpoint([fit_of(r) for r in ckpts.values()], rule)
    models = [{"t": "learned", "name": "Learned k_t (fitted on the fit half)", "weights": list(k),
               "metrics": mine["metrics"]},
              {"t": "paper", "name": f"Paper (λ={paper['lam']:g}, α={paper['alpha']:g}, chosen on the fit half)",
               "metrics": check_of(by_key[point_key(paper["lam"], paper["alpha"])])}]
    uniform = by_key.get(point_key((T - 1) / T, 0.0))
    if uniform is not None:
        models.append({"t": "uniform", "name": "Uniform average of θ1..θT", "metrics": check_of(uniform)})
    models += [{"t": early["t"], "name": f"Best θt on the fit half ({model_name(early['t'])})",
                "metrics": check_of(ckpts[early["t"]])},
               {"t": T, "name": f"θT ({model_name(T)})", "metrics": check_of(base)}]
    return {"halves": {h: list(s) for h, s in span.items()}, "paper": {k2: paper[k2] for k2 in ("lam", "alpha")},
            "best_checkpoint": early["t"], "uniform_in_grid": uniform is not None, "models": models,
            "paired": paired_rows(models, against="learned"), "measured": 0 if rows else 1}


def _measure(ctx: SearchContext, ks: Sequence[tuple[float, ...]], half: str, span: tuple[int, int]
             ) -> list[dict[str, Any]]:
    """Each k merged in memory from every θ_t and measured on the prompts ``span`` of dev alone, appended to
    operators.jsonl as it finishes."""
    stamp = {**ctx.stamp(), "rank": ctx.shard.rank}

    def set_weights(bench: Bench, k: tuple[float, ...]) -> str:
        bench.basis(each=ctx.T >= 3).apply_operator(bench.model, "learned", weights=list(k))
        return "merge"

    def row(k: tuple[float, ...], metrics: dict[str, Any], seconds: dict[str, float]) -> dict[str, Any]:
        return {"key": key(half, k), "operator": "learned", "half": half, "prompts": list(span), "weights": list(k),
                "metrics": metrics, "seconds": seconds, **stamp}

    return evaluate_each(ctx, ctx.config.split, list(ks), set_weights, row, desc=f"learned k_t ({half} half of dev)",
                         append_to=lambda _: ctx.files.operator_records, prompts=lambda _: span)


def _settings(given: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """search.operators.learned's settings (one value each, as the config checked), else their declared defaults."""
    from itermerge.operators import spec

    return {p.name: given[p.name][0] if p.name in given else p.default for p in spec("learned").fitted}
