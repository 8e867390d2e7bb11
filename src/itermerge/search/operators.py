"""Other merge operators beside the paper's (every searchable one of ``itermerge.operators``): each candidate
evaluated on dev, one per operator chosen by the paper's rule against θT, and that one tested once beside the
chosen merge and θT."""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from itermerge.config.evaluation import EvalConfig
from itermerge.config.search import SearchConfig, SelectionRule
from itermerge.devices import CPU, Placement, load_placed, release
from itermerge.errors import ItermergeError
from itermerge.evaluation import metrics_to_dict
from itermerge.merging import MergeBasis, merge_checkpoints
from itermerge.operators import operator, parameters, spec
from itermerge.records import append_record, read_records
from itermerge.rundir import atomic_write_json
from itermerge.runner import Shard
from itermerge.search.finalize import paired_rows
from itermerge.search.grid import check_split
from itermerge.search.points import EvaluateFn, build_evaluator, load_weights_into, timed_eval
from itermerge.search.selection import oriented, regressions, select_point, value

DEV_RECORDS, RESULT = "operators.jsonl", "operators.json"


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
        return ", ".join(f"{_symbol(k)}={v:g}" for k, v in self.searched.items()) or "no parameters"

    @property
    def name(self) -> str:
        """``TIES (density=0.5; λ=0.3, α=0.4)``: the row's name in the tables; the title alone without parameters."""
        rest = {k: v for k, v in self.params.items() if k not in self.searched}
        fixed = "" if not rest else "; " + ", ".join(f"{_symbol(k)}={v:g}" for k, v in rest.items())
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
        if found.min_T > T:
            continue
        for values in itertools.product(*grid.values()):
            searched = dict(zip(grid, values))
            for key in found.searched:  # a searched parameter left out takes its default (DARE's seed 0)
                if found.param(key).default is not None:
                    searched.setdefault(key, found.param(key).default)
            extra = {"lam": lam, "alpha": alpha} if found.takes_choice else {}
            out.append(Candidate(method, searched, {**searched, **extra}))
    return out


def evaluate_dev(
    search_dir: str | os.PathLike, reference: str | os.PathLike, checkpoints: Sequence[str | os.PathLike],
    eval_config: EvalConfig, config: SearchConfig, *, mean_cache: str | os.PathLike | None = None,
    evaluate_fn: EvaluateFn | None = None, progress: bool = True, where: Placement = CPU,
    make_sampler: Callable[..., Any] | None = None, shard: Shard | None = None,
) -> int:
    """This process's share of the candidates not yet recorded, each merged and evaluated on the search's split and
    appended to operators.jsonl as it finishes (a rerun evaluates only what is missing); returns how many."""
    check_split(config.split)
    shard, search_dir, stamp = shard or Shard(), Path(search_dir), _stamp(eval_config, config.split)
    done = {r["key"] for r in read_records(search_dir / DEV_RECORDS) if _same(r, stamp)}
    choice = _choice(search_dir, stamp)
    todo = [c for c in candidates(config.operators, len(checkpoints), choice["lam"], choice["alpha"])
            if c.key not in done]
    rows = _evaluate(shard.take(sorted(todo, key=_kind)), search_dir, reference, checkpoints, eval_config,
                     config.split, mean_cache, evaluate_fn, progress and shard.is_main, where, make_sampler)
    for row in rows:
        append_record(search_dir / DEV_RECORDS, {**row, **stamp, "rank": shard.rank})
    return len(rows)


def choose(search_dir: str | os.PathLike, checkpoints: Sequence[str | os.PathLike], eval_config: EvalConfig,
           config: SearchConfig) -> dict[str, dict[str, Any]]:
    """{operator: its dev choice}: the paper's rule (``select_point``) among the operator's candidates, against θT's
    dev record (choice.json's baseline), with why, and every candidate's dev numbers."""
    search_dir, stamp = Path(search_dir), _stamp(eval_config, config.split)
    choice = _choice(search_dir, stamp)
    base, rule = choice["baseline"], config.rule
    records = {r["key"]: r for r in read_records(search_dir / DEV_RECORDS) if _same(r, stamp)}
    every = candidates(config.operators, len(checkpoints), choice["lam"], choice["alpha"])
    chosen: dict[str, dict[str, Any]] = {}
    for method in config.operators:
        mine = [c for c in every if c.method == method]
        missing = [c.key for c in mine if c.key not in records]
        if missing:
            raise ItermergeError(f"{search_dir / DEV_RECORDS}: no {config.split} record of {missing[0]!r}; rerun "
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


def choice_record(search_dir: str | os.PathLike, checkpoints: Sequence[str | os.PathLike], eval_config: EvalConfig,
                  config: SearchConfig, parts: Sequence[int]) -> dict[str, Any]:
    """The dev stage's record: how many candidates it evaluated, and each operator's choice (what the test stage is
    keyed by)."""
    chosen = choose(search_dir, checkpoints, eval_config, config)
    return {"candidates_evaluated": sum(parts), "chosen": {m: c["key"] for m, c in chosen.items()}}


def evaluate_test(
    search_dir: str | os.PathLike, reference: str | os.PathLike, checkpoints: Sequence[str | os.PathLike],
    eval_config: EvalConfig, config: SearchConfig, *, test_split: str = "test",
    mean_cache: str | os.PathLike | None = None, evaluate_fn: EvaluateFn | None = None, progress: bool = True,
    where: Placement = CPU, make_sampler: Callable[..., Any] | None = None, shard: Shard | None = None,
) -> list[dict[str, Any]]:
    """This process's share of the operators' dev choices that operators.json does not hold yet, each evaluated once
    on the test split; returns their rows."""
    shard, search_dir = shard or Shard(), Path(search_dir)
    chosen = choose(search_dir, checkpoints, eval_config, config)
    done = set(_tested(search_dir, eval_config, test_split))
    todo = [Candidate(m, c["searched"], c["params"]) for m, c in chosen.items()
            if c["key"] is not None and c["key"] not in done]
    return _evaluate(shard.take(sorted(todo, key=_kind)), search_dir, reference, checkpoints, eval_config,
                     test_split, mean_cache, evaluate_fn, progress and shard.is_main, where, make_sampler)


def write_test(search_dir: str | os.PathLike, checkpoints: Sequence[str | os.PathLike], eval_config: EvalConfig,
               config: SearchConfig, parts: Sequence[Sequence[dict[str, Any]]], *, test_split: str = "test"
               ) -> dict[str, Any]:
    """operators.json: each operator's dev choice, its test row, and its paired differences (``maths.paired``, per
    metric held per prompt) against the chosen paper merge and θT, whose rows come from test.json."""
    search_dir, T = Path(search_dir), len(checkpoints)
    test_path = search_dir / "test.json"
    if not test_path.exists():
        raise ItermergeError(f"{test_path}: not found; the operators are compared with the tested merge, so run "
                             "the test first (itermerge search RUN_DIR without --no-test)")
    test = json.loads(test_path.read_text())
    if test.get("eval_fingerprint") != eval_config.fingerprint() or test.get("split") != test_split:
        raise ItermergeError(f"{test_path}: measured with other evaluators or on another split; rerun the test")
    rows = {r["t"]: r for r in test["models"]}
    merged, theta_T = rows["merged"], rows[T]
    tested = _tested(search_dir, eval_config, test_split) | {r["key"]: r for part in parts for r in part}
    out = []
    untested = {"weights": None, "metrics": None, "seconds": None}  # an operator without a choice
    for method, dev in choose(search_dir, checkpoints, eval_config, config).items():
        row = {"t": method, "name": dev["name"], **tested.get(dev["key"], untested)}
        out.append({
            "operator": method, "title": spec(method).title, **{k: dev[k] for k in ("name", "label", "none", "key",
                                                                               "searched", "params")},
            "dev": {k: dev[k] for k in ("reason", "reward_gain", "metrics", "candidates")},
            **{k: row[k] for k in ("weights", "metrics", "seconds")},
            "paired": [] if dev["key"] is None else paired_rows([row, merged, theta_T], against=method),
        })
    record = {"split": test_split, "eval_fingerprint": eval_config.fingerprint(), "lam": test["lam"],
              "alpha": test["alpha"], "operators": out,
              "baselines": [{k: r[k] for k in ("t", "name", "metrics")} for r in (theta_T, merged)]}
    atomic_write_json(search_dir / RESULT, record)
    return record


# --- merging one candidate into the loaded model -----------------------------------------------------------


def _kind(c: Candidate) -> int:
    """0: in memory from θ0, θ̄, θT; 1: in memory from every θ_t (EMA's k_t differ); 2: merged to disk. The
    candidates go in this order, so that one basis at a time is in memory."""
    return {"basis": 0, "each": 1, "disk": 2}[spec(c.method).search]


def _evaluate(todo: Sequence[Candidate], search_dir: Path, reference: str | os.PathLike,
              checkpoints: Sequence[str | os.PathLike], eval_config: EvalConfig, split: str,
              mean_cache: str | os.PathLike | None, evaluate_fn: EvaluateFn | None, progress: bool,
              where: Placement, make_sampler: Callable[..., Any] | None) -> list[dict[str, Any]]:
    """Each candidate merged into one loaded model (in memory, or written to a temporary directory and loaded),
    then evaluated; its row holds eq. (9)'s weights where it has them, its metrics and its seconds."""
    if not todo:
        return []
    checkpoints = [Path(c) for c in checkpoints]
    model = load_placed(checkpoints[-1], where)
    if evaluate_fn is None:
        evaluate_fn = build_evaluator(eval_config, split, checkpoints[-1], reference, where, make_sampler)
    basis, each, rows = None, None, []
    for c in tqdm(todo, desc=f"merge operators ({split})", unit="model", disable=not progress):
        start, seconds = time.perf_counter(), {}
        how = spec(c.method).search
        if how == "disk":
            basis, each = None, None  # the disk merges come last: no basis is needed any more
            with tempfile.TemporaryDirectory(prefix=".operator-", dir=search_dir) as tmp:
                out = merge_checkpoints(reference, checkpoints, Path(tmp) / "merged", operator(c.method, **c.params),
                                        progress=False)
                load_weights_into(model, out)
        else:
            if each != (how == "each" and len(checkpoints) >= 3):  # EMA (its k_t), Model Stock (its angles)
                basis, each = None, how == "each" and len(checkpoints) >= 3
                release()
                basis = MergeBasis.from_checkpoints(reference, checkpoints, mean_cache=mean_cache, each=each)
                seconds["basis"] = time.perf_counter() - start
                start = time.perf_counter()
            basis.apply_operator(model, c.method, **c.params)
        _refuse_non_finite(model, c)
        seconds["merge"] = time.perf_counter() - start
        metrics, timings = timed_eval(evaluate_fn, model)
        op = operator(c.method, **c.params).resolve(len(checkpoints), [])
        rows.append({"key": c.key, "operator": c.method, "name": c.name, "params": c.params,
                     "weights": None if op.weights is None else list(op.weights),
                     "metrics": metrics_to_dict(metrics), "seconds": {**seconds, **timings}})
    release(model, basis)
    return rows


@torch.no_grad()
def _refuse_non_finite(model: nn.Module, c: Candidate) -> None:
    """A candidate whose weights overflowed (a large α or t, in 16 bits) is refused by name, never evaluated."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ItermergeError(f"search.operators.{c.method} {c.label}: tensor {name!r} of the merge holds NaN or "
                                 f"Inf (it overflows {p.dtype}); take this value out of the grid or evaluate in "
                                 "float32 (model.dtype: float32)")


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


def _choice(search_dir: Path, stamp: dict[str, str]) -> dict[str, Any]:
    """choice.json, made by the same evaluators on the same split: its (λ, α), rule and θT's record (baseline)."""
    path = search_dir / "choice.json"
    if not path.exists():
        raise ItermergeError(f"{path}: not found; the operators are chosen beside the search: run it first")
    choice = json.loads(path.read_text())
    if not _same(choice, stamp):
        raise ItermergeError(f"{path}: made with other evaluators or on another split than search.operators'; "
                             "rerun the search first")
    return choice


def _tested(search_dir: Path, eval_config: EvalConfig, split: str) -> dict[str, dict[str, Any]]:
    """{candidate key: its test row} of operators.json, when it was measured by these evaluators on this split."""
    path = search_dir / RESULT
    record = json.loads(path.read_text()) if path.exists() else {}
    if not _same(record, _stamp(eval_config, split)):
        return {}
    return {o["key"]: {k: o[k] for k in ("weights", "metrics", "seconds")} for o in record.get("operators", [])
            if o["key"] is not None}


def _stamp(eval_config: EvalConfig, split: str) -> dict[str, str]:
    return {"split": split, "eval_fingerprint": eval_config.fingerprint()}


def _same(record: Mapping[str, Any], stamp: Mapping[str, str]) -> bool:
    return all(record.get(k) == v for k, v in stamp.items())
