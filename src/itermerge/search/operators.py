"""Other merge operators beside the paper's (every searchable one of ``itermerge.operators``): each candidate
evaluated on dev, one per operator chosen by the paper's rule against θT, and that one tested once beside the
chosen merge and θT."""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itermerge.config.search import SelectionRule
from itermerge.errors import ItermergeError
from itermerge.merging import merge_checkpoints
from itermerge.operators import operator, parameters, spec
from itermerge.records import read_records
from itermerge.rundir import atomic_write_json
from itermerge.search import learned
from itermerge.search.context import Bench, SearchContext, evaluate_each, refuse_non_finite
from itermerge.search.finalize import paired_rows
from itermerge.search.grid import check_split
from itermerge.search.selection import oriented, regressions, select_point, value


def _fmt(value: Any) -> str:
    """A parameter's value as the tables write it: 0.3, or (0.2, 0.3, 0.5) for k_1..k_T."""
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(f"{x:.3g}" for x in value) + ")"
    return f"{value:g}"


def _symbol(key: str) -> str:
    """How the tables write a parameter: its declared symbol (α, γ, λ) or its name."""
    found = parameters().get(key)
    return found.label if found is not None else key


@dataclass(frozen=True)
class Candidate:
    """One operator at one value of each searched parameter (``searched``); ``params`` adds what it takes from the
    search (TIES and DARE weight their sparsified task vectors with the chosen (λ, α))."""

    method: str
    searched: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """What its records are found by: the operator and every parameter, e.g. ``ties density=0.5 lam=0.3 …``."""
        return " ".join([self.method, *(f"{k}={v!r}" for k, v in self.params.items())])

    @property
    def label(self) -> str:
        return ", ".join(f"{_symbol(k)}={_fmt(v)}" for k, v in self.searched.items()) or "no parameters"

    @property
    def name(self) -> str:
        """``TIES (density=0.5; λ=0.3, α=0.4)``: the row's name in the tables; the title alone without parameters."""
        rest = {k: v for k, v in self.params.items() if k not in self.searched}
        fixed = "" if not rest else "; " + ", ".join(f"{_symbol(k)}={_fmt(v)}" for k, v in rest.items())
        title = spec(self.method).title
        return f"{title} ({self.label}{fixed})" if self.searched or fixed else title

    @property
    def coordinates(self) -> tuple[float, float]:
        """(λ, α) where the operator has them (ExPO: (0, α); TIES, DARE: the search's), else (0, 0): the rule breaks
        ties in reward by them, then by the grid's order."""
        return float(self.params.get("lam", 0.0)), float(self.params.get("alpha", 0.0))


def candidates(operators: Mapping[str, Mapping[str, Sequence[Any]]], T: int, lam: float, alpha: float
               ) -> list[Candidate]:
    """Every candidate of ``search.operators``, operator by operator, in the grid's order (SLERP needs T ≥ 2)."""
    out = []
    for method, grid in operators.items():
        found = spec(method)
        if found.min_T > T or found.search == "fit":  # a fitted operator has no grid (search/learned.py)
            continue
        for values in itertools.product(*grid.values()):
            searched = dict(zip(grid, values))
            for key in found.searched:  # a searched parameter left out takes its default (DARE's seed 0)
                if found.param(key).default is not None:
                    searched.setdefault(key, found.param(key).default)
            extra = {"lam": lam, "alpha": alpha} if found.takes_choice else {}
            out.append(Candidate(method, searched, {**searched, **extra}))
    return out


def evaluate_dev(ctx: SearchContext) -> int:
    """This process's share of the candidates not yet recorded, each merged and evaluated on the search's split and
    appended to operators.jsonl as it finishes (a rerun evaluates only what is missing); returns how many."""
    config = ctx.config
    check_split(config.split)
    done = {r["key"] for r in read_records(ctx.files.operator_records) if ctx.same(r)}
    choice = _choice(ctx)
    todo = [c for c in candidates(config.operators, ctx.T, choice["lam"], choice["alpha"]) if c.key not in done]
    stamp = {**ctx.stamp(), "rank": ctx.shard.rank}
    evaluated = len(_evaluate(ctx, ctx.shard.take(sorted(todo, key=_kind)), config.split, stamp,
                              append_to=ctx.files.operator_records))
    for method in _fitted(ctx):  # its rounds depend on each other: the main process fits it, then checks it
        if ctx.shard.is_main:
            result = learned.fit(ctx, choice["baseline"], config.operators[method], evaluate=True)
            evaluated += result["measured"] + learned.check(ctx, result, evaluate=True)["measured"]
    return evaluated


def choose(ctx: SearchContext) -> dict[str, dict[str, Any]]:
    """{operator: its dev choice}: the paper's rule (``select_point``) among the operator's candidates, against θT's
    dev record (choice.json's baseline), with why, and every candidate's dev numbers."""
    config = ctx.config
    choice = _choice(ctx)
    base, rule = choice["baseline"], config.rule
    records = {r["key"]: r for r in read_records(ctx.files.operator_records) if ctx.same(r)}
    every = candidates(config.operators, ctx.T, choice["lam"], choice["alpha"])
    chosen: dict[str, dict[str, Any]] = {}
    for method in config.operators:
        if method in _fitted(ctx):
            chosen[method] = _learned_choice(ctx, method, choice)
            continue
        mine = [c for c in every if c.method == method]
        missing = [c.key for c in mine if c.key not in records]
        if missing:
            raise ItermergeError(f"{ctx.files.operator_records}: no {config.split} record of {missing[0]!r}; rerun "
                                 "the search to evaluate it")
        if not mine:  # SLERP with T = 1
            found = spec(method)
            chosen[method] = _none(method, f"needs T ≥ {found.min_T}", f"it {found.why}", [])
            continue
        points = [{"lam": c.coordinates[0], "alpha": c.coordinates[1], "metrics": records[c.key]["metrics"]}
                  for c in mine]
        tried = [{"searched": c.searched, "eligible": not regressions(p, base, rule),
                  "metrics": {n: {k: m[k] for k in ("value", "stderr", "n")} for n, m in p["metrics"].items()},
                  "seconds": records[c.key]["seconds"]} for c, p in zip(mine, points)]
        if not any(t["eligible"] for t in tried):  # the rule keeps θT: this operator has nothing to test
            chosen[method] = _none(method, "no value kept θT's capability", _reason(None, mine, points, base, rule),
                                   tried)
            continue
        pick = select_point(points, base, rule)
        best = next(c for c, p in zip(mine, points)  # the first of equal ones, as the rule's min() takes it
                    if p["metrics"] == pick["chosen"]["metrics"] and c.coordinates == (pick["lam"], pick["alpha"]))
        chosen[method] = {"key": best.key, "name": best.name, "label": best.label, "none": None,
                          "searched": best.searched,
                          "params": best.params, "reason": _reason(best, mine, points, base, rule),
                          "reward_gain": pick["reward_gain"], "metrics": records[best.key]["metrics"],
                          "candidates": tried}
    return chosen


def choice_record(ctx: SearchContext, parts: Sequence[int]) -> dict[str, Any]:
    """The dev stage's record: how many candidates it evaluated, and each operator's choice (what the test stage is
    keyed by)."""
    chosen = choose(ctx)
    return {"candidates_evaluated": sum(parts), "chosen": {m: c["key"] for m, c in chosen.items()}}


def evaluate_test(ctx: SearchContext) -> list[dict[str, Any]]:
    """This process's share of the operators' dev choices that operators.json does not hold yet, each evaluated once
    on the test split; returns their rows."""
    done = set(_tested(ctx))
    todo = [Candidate(m, c["searched"], c["params"]) for m, c in choose(ctx).items()
            if c["key"] is not None and c["key"] not in done]
    return _evaluate(ctx, ctx.shard.take(sorted(todo, key=_kind)), ctx.test_split)


def write_test(ctx: SearchContext, parts: Sequence[Sequence[dict[str, Any]]]) -> dict[str, Any]:
    """operators.json: each operator's dev choice, its test row, and its paired differences (``maths.paired``, per
    metric held per prompt) against the chosen paper merge and θT, whose rows come from test.json."""
    T, eval_config, test_split = ctx.T, ctx.eval_config, ctx.test_split
    test_path = ctx.files.test
    if not test_path.exists():
        raise ItermergeError(f"{test_path}: not found; the operators are compared with the tested merge, so run "
                             "the test first (itermerge search RUN_DIR without --no-test)")
    test = json.loads(test_path.read_text())
    if test.get("eval_fingerprint") != eval_config.fingerprint() or test.get("split") != test_split:
        raise ItermergeError(f"{test_path}: measured with other evaluators or on another split; rerun the test")
    rows = {r["t"]: r for r in test["models"]}
    merged, theta_T = rows["merged"], rows[T]
    tested = _tested(ctx) | {r["key"]: r for part in parts for r in part}
    out = []
    untested = {"weights": None, "metrics": None, "seconds": None}  # an operator without a choice
    for method, dev in choose(ctx).items():
        row = {"t": method, "name": dev["name"], **tested.get(dev["key"], untested)}
        out.append({
            "operator": method, "title": spec(method).title, **{k: dev[k] for k in ("name", "label", "none", "key",
                                                                               "searched", "params")},
            "dev": {k: dev[k] for k in ("reason", "reward_gain", "metrics", "candidates", "check") if k in dev},
            **{k: row[k] for k in ("weights", "metrics", "seconds")},
            "paired": [] if dev["key"] is None else paired_rows([row, merged, theta_T], against=method),
        })
    record = {"split": test_split, "eval_fingerprint": eval_config.fingerprint(), "lam": test["lam"],
              "alpha": test["alpha"], "operators": out,
              "baselines": [{k: r[k] for k in ("t", "name", "metrics")} for r in (theta_T, merged)]}
    atomic_write_json(ctx.files.operators, record)
    return record


# --- merging one candidate into the loaded model -----------------------------------------------------------


def _kind(c: Candidate) -> int:
    """0: in memory from θ0, θ̄, θT; 1: in memory from every θ_t (EMA's k_t differ); 2: merged to disk. The
    candidates go in this order, so that one basis at a time is in memory."""
    return {"basis": 0, "each": 1, "fit": 1, "disk": 2}[spec(c.method).search]


def _evaluate(ctx: SearchContext, todo: Sequence[Candidate], split: str, stamp: Mapping[str, Any] | None = None,
              append_to: Path | None = None) -> list[dict[str, Any]]:
    """Each candidate merged into one loaded model (in memory, or written to a temporary directory and loaded),
    then evaluated; its row holds eq. (9)'s weights where it has them, its metrics and its seconds (and ``stamp``,
    when given, appended to ``append_to`` as it finishes)."""
    each_theta = ctx.T >= 3  # EMA's k_t, Model Stock's angles: with θ̄ in between they need every θ_t

    def set_weights(bench: Bench, c: Candidate) -> str:
        how = spec(c.method).search
        if how == "disk":
            bench.drop_basis()  # the disk merges come last: no basis is needed any more
            with tempfile.TemporaryDirectory(prefix=".operator-", dir=ctx.search_dir) as tmp:
                out = merge_checkpoints(ctx.reference, list(ctx.checkpoints), Path(tmp) / "merged",
                                        operator(c.method, **c.params), progress=False)
                bench.load(out)
        else:
            bench.basis(each=how in ("each", "fit") and each_theta).apply_operator(bench.model, c.method, **c.params)
        refuse_non_finite(bench.model, f"search.operators.{c.method} {c.label}",
                          "take this value out of the grid or evaluate in float32 (model.dtype: float32)")
        return "merge"

    def row(c: Candidate, metrics: dict[str, Any], seconds: dict[str, float]) -> dict[str, Any]:
        op = operator(c.method, **c.params).resolve(ctx.T, [])
        return {"key": c.key, "operator": c.method, "name": c.name, "params": c.params,
                "weights": None if op.weights is None else list(op.weights), "metrics": metrics, "seconds": seconds,
                **(stamp or {})}

    return evaluate_each(ctx, split, todo, set_weights, row, desc=f"merge operators ({split})",
                         append_to=None if append_to is None else lambda c: append_to)


# --- the learned weights (search/learned.py) ------------------------------------------------------------------


def _fitted(ctx: SearchContext) -> list[str]:
    """The operators of search.operators whose parameters are fitted on dev, where T allows them."""
    return [m for m in ctx.config.operators if spec(m).search == "fit" and spec(m).min_T <= ctx.T]


def _learned_choice(ctx: SearchContext, method: str, choice: dict[str, Any]) -> dict[str, Any]:
    """The fitted k_t as an operator's dev choice, replayed from the records: its fit-half metrics, every k tried,
    why, and the check on the other half (``learned.check``)."""
    result = learned.fit(ctx, choice["baseline"], ctx.config.operators[method], evaluate=False)
    checked = learned.check(ctx, result, evaluate=False)
    k = result["weights"]
    best = Candidate(method, {"weights": k}, {"weights": k})
    base, rule, (start, stop) = result["base"], ctx.config.rule, result["halves"][learned.FIT]
    reward_gain = select_point([{"lam": 0.0, "alpha": 0.0, "metrics": result["metrics"]}], base, rule)["reward_gain"]
    moves = sum(1 for a, b in zip(result["path"], result["path"][1:]) if a["weights"] != b["weights"])
    plural = "" if moves == 1 else "s"
    reason = (f"{best.label}: coordinate ascent on dev prompts [{start}, {stop}) from {result['start']}, "
              f"{len(result['path']) - 1} rounds, {moves} move{plural}, {len(result['tried'])} k measured: "
              f"{rule.reward} "
              f"{value(result, rule.reward):.4g} against θT's {value(base, rule.reward):.4g} on those prompts; "
              f"checked on [{stop}, {result['n']})")
    tried = [{"searched": {"weights": t["weights"]}, "round": t["round"], "eligible": t["eligible"],
              "metrics": {n: {k2: m[k2] for k2 in ("value", "stderr", "n")} for n, m in t["metrics"].items()},
              "seconds": result["seconds"][learned.key(learned.FIT, tuple(t["weights"]))]} for t in result["tried"]]
    return {"key": best.key, "name": best.name, "label": best.label, "none": None, "searched": best.searched,
            "params": best.params, "reason": reason, "reward_gain": reward_gain, "metrics": result["metrics"],
            "candidates": tried, "check": checked}


# --- records -------------------------------------------------------------------------------------------


def _none(method: str, short: str, reason: str, tried: list[dict[str, Any]]) -> dict[str, Any]:
    """An operator without a choice (``short`` says why in the table, ``reason`` in full): nothing to test."""
    return {"key": None, "name": spec(method).title, "label": None, "none": short, "searched": None, "params": None,
            "reason": reason, "reward_gain": None, "metrics": None, "candidates": tried}


def _reason(best: Candidate | None, mine: Sequence[Candidate], points: Sequence[dict[str, Any]],
            base: dict[str, Any], rule: SelectionRule) -> str:
    """Why ``best``, in words: the rule's reward among the candidates that keep θT's capability (``best`` None: none
    kept it, and the rule keeps θT)."""
    why = [regressions(p, base, rule) for p in points]
    if best is None:
        return (f"no value kept θT's {', '.join(rule.capability)} within {rule.tolerance:g} ("
                + "; ".join(f"{c.label}: {'; '.join(w)}" for c, w in zip(mine, why)) + "), so the rule keeps θT")
    r, chosen = rule.reward, points[mine.index(best)]
    kept, values = sum(not w for w in why), "1 value" if len(mine) == 1 else f"{len(mine)} values"
    among = (f"the {kept} of {values} whose {', '.join(rule.capability)} did not fall below θT's by more than "
             f"{rule.tolerance:g}" if rule.capability else f"all {values}")
    text = (f"{best.label}: highest {r} ({value(chosen, r):.4g}) among {among}; θT has {r} "
            f"{value(base, r):.4g}")
    better = [(c, w) for c, p, w in zip(mine, points, why) if w and oriented(p, r) > oriented(chosen, r)]
    if better:
        top, w = max(better, key=lambda cw: oriented(points[mine.index(cw[0])], r))
        text += f"; {top.label} had more {r} but {'; '.join(w)}"
    return text


def _choice(ctx: SearchContext) -> dict[str, Any]:
    """choice.json, made by the same evaluators on the same split: its (λ, α), rule and θT's record (baseline)."""
    path = ctx.files.choice
    if not path.exists():
        raise ItermergeError(f"{path}: not found; the operators are chosen beside the search: run it first")
    choice = json.loads(path.read_text())
    if not ctx.same(choice):
        raise ItermergeError(f"{path}: made with other evaluators or on another split than search.operators'; "
                             "rerun the search first")
    return choice


def _tested(ctx: SearchContext) -> dict[str, dict[str, Any]]:
    """{candidate key: its test row} of operators.json, when it was measured by these evaluators on the test split."""
    path = ctx.files.operators
    record = json.loads(path.read_text()) if path.exists() else {}
    if not ctx.same(record, ctx.test_split):
        return {}
    return {o["key"]: {k: o[k] for k in ("weights", "metrics", "seconds")} for o in record.get("operators", [])
            if o["key"] is not None}
