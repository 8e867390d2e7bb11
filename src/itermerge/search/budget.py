"""The (λ, α) search within a budget: successive halving over growing prefixes of the dev prompts.

Round r evaluates the points still in the race on the first n_r = min_prompts · eta^r dev prompts (all of them in
the last round), only the prompts a point was not yet evaluated on; then it keeps the best 1/eta of them by the
paper's rule, read on those n_r prompts against θT's values on the same prompts. The last round's points (the
finalists) have been evaluated on every dev prompt, and the paper's rule chooses among them as in the grid.

Each round appends one record per (point, prompt range) it evaluated to ``rounds/round_{r}.jsonl`` (its items,
its seconds: what the point cost), so a rerun evaluates only what is missing; the finalists' records over the
whole split go to ``points.jsonl`` and the choice to ``choice.json``, in the grid's formats.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itermerge.config.evaluation import EvalConfig
from itermerge.config.search import HalvingConfig, SearchConfig, SelectionRule
from itermerge.errors import ItermergeError
from itermerge.evaluation.metric import mean_metric
from itermerge.maths.merge import merge_weights
from itermerge.records import append_record, read_records
from itermerge.rundir import SearchLayout, atomic_write_json
from itermerge.search import points
from itermerge.search.context import SearchContext, evaluate_each
from itermerge.search.grid import check_split, point_key, search_grid
from itermerge.search.selection import oriented, regressions

THETA_T = (0.0, 0.0)  # the rule's baseline: evaluated on every dev prompt in round 0


@dataclass(frozen=True)
class Round:
    prompts: int  # n_r: the points of this round are measured on the first n_r dev prompts
    keep: int  # how many of them go on to the next round (plus the λ = 0 line's best); 0 in the last round


def schedule(n_prompts: int, n_points: int, halving: HalvingConfig) -> list[Round]:
    """The rounds for ``n_points`` points besides θT on a dev split of ``n_prompts``: n_r = min_prompts · eta^r
    until all prompts, each keeping ⌈|S_r| / eta⌉ (a single point goes straight to all prompts).

    E.g. 80 prompts, 48 points, eta = 3, min_prompts = 8: (8 prompts, keep 16), (24, 6), (72, 2), (80, 0):
    48·8 + 16·16 + 6·48 + 2·8 = 944 prompt-evaluations, plus θT's 80, against 49 · 80 = 3920 for the grid.
    """
    rounds, n, alive = [], min(halving.min_prompts, n_prompts), n_points
    while n < n_prompts and alive > 1:
        keep = math.ceil(alive / halving.eta)
        rounds.append(Round(n, keep))
        n, alive = min(n * halving.eta, n_prompts), keep
    return [*rounds, Round(n_prompts, 0)]


def plan(T: int, config: SearchConfig, n_prompts: int) -> list[Round]:
    """The rounds of this search: its grid but θT, on a dev split of ``n_prompts``."""
    return schedule(n_prompts, len(_contenders(T, config)), config.halving)


def dev_size(eval_config: EvalConfig, split: str) -> int:
    """How many prompts the evaluators measure on ``split`` (what the rounds' prefixes grow to); evaluators that
    cannot measure a prompt subset (lm-eval's benchmarks) are refused here, before any round runs."""
    from itermerge.prompts import split_prompts

    if eval_config.lm_eval is not None:
        raise ItermergeError("search.method: halving evaluates growing subsets of the dev prompts, but "
                             "evaluation.lm_eval measures benchmark documents, which it cannot split; use "
                             "search.method: grid with lm_eval")
    return len(split_prompts(eval_config.prompts, split))


def context_dev_size(ctx: SearchContext) -> int:
    """How many dev prompts a search's evaluators measure: the given evaluator's, else the configured evaluators'."""
    given = ctx.evaluators.get(ctx.config.split)
    return len(given.prompts) if given is not None else dev_size(ctx.eval_config, ctx.config.split)


# --- the race ---------------------------------------------------------------------------------------------


def survivors(chunks: Mapping[tuple[float, float], list[dict[str, Any]]], T: int, config: SearchConfig,
              rounds: Sequence[Round], r: int) -> list[tuple[float, float]]:
    """The points (λ, α) that enter round r, in grid order: every point but θT in round 0; then each round keeps its
    best ``keep`` by ``rank`` on its n_r prompts, plus the best point of the λ = 0 line (ExPO's α is chosen among
    the finalists too). Computed from the records alone, so every process and every rerun agree."""
    alive = _contenders(T, config)
    for q in range(r):
        base = _measured(chunks, THETA_T, rounds[q].prompts)
        ranked = sorted(alive, key=lambda p: rank(_measured(chunks, p, rounds[q].prompts), base, config.rule))
        kept = set(ranked[: rounds[q].keep])
        kept |= set([p for p in ranked if p[0] == 0.0][:1])
        alive = [p for p in alive if p in kept]
    return alive


def rank(point: Mapping[str, Any], base: Mapping[str, Any], rule: SelectionRule) -> tuple[Any, ...]:
    """The paper's rule as an order (smaller first): points whose capability does not fall below θT's on the same
    prompts, by reward; then the others, by how far they fall (so a round always keeps its count); ties to the
    point nearest θT (smaller α, then λ), as ``select_point``."""
    deficit = sum(max(0.0, oriented(base, m) - rule.tolerance - oriented(point, m))
                  for m in rule.capability) if regressions(point, base, rule) else 0.0
    return deficit > 0, deficit, -oriented(point, rule.reward), abs(point["alpha"]), abs(point["lam"])


def chunks_of(search_dir: str | os.PathLike, stamp: Mapping[str, str]) -> dict[tuple[float, float], list[dict]]:
    """{(λ, α): [records of prompt ranges [start, stop)]} from every round's file, and the grid's whole-split
    records in points.jsonl (start 0) measured by the same evaluators on the same split. The finalists' records
    that ``choose`` pieced together from the rounds are no measurement: a round redone after its file was removed
    (the stage runner redoes every stage after a changed one) evaluates them again."""
    files, found = SearchLayout(Path(search_dir)), {}
    for path in files.round_files():
        for rec in read_records(path):
            if _same(rec, stamp):
                found.setdefault(point_key(rec["lam"], rec["alpha"]), []).append(rec)
    for rec in read_records(files.points):
        n = {len(m["items"]) for m in rec["metrics"].values() if m.get("items") is not None}
        if _same(rec, stamp) and len(n) == 1 and rec.get("method") != "halving":
            found.setdefault(point_key(rec["lam"], rec["alpha"]), []).append({**rec, "start": 0, "stop": n.pop()})
    return found


def covered(chunks: Sequence[Mapping[str, Any]], n: int) -> tuple[int, dict[str, list[float]]]:
    """(m, {metric: items of prompts 0..m−1}): the longest prefix of the first ``n`` prompts the records cover,
    pieced together prompt by prompt (a record over [0, 80) covers [0, 8) too)."""
    pos, items = 0, {}
    while pos < n:
        here = [c for c in chunks if c["start"] <= pos < c["stop"]]
        if not here:
            break
        c = max(here, key=lambda c: c["stop"])
        stop = min(c["stop"], n)
        for name, m in c["metrics"].items():
            if m.get("items") is None:
                raise ItermergeError(f"search point λ={c['lam']:g}, α={c['alpha']:g}: metric {name!r} keeps no "
                                     "per-prompt values, which search.method: halving pieces together; use grid")
            items.setdefault(name, []).extend(m["items"][pos - c["start"] : stop - c["start"]])
        pos = stop
    return pos, {name: v for name, v in items.items() if len(v) == pos}


def _measured(chunks: Mapping[tuple[float, float], list[dict]], p: tuple[float, float], n: int) -> dict[str, Any]:
    """Point ``p`` on the first ``n`` prompts, as a points.jsonl record's ``lam``, ``alpha`` and ``metrics``."""
    m, items = covered(chunks.get(p, []), n)
    if m < n:
        raise ItermergeError(f"search point λ={p[0]:g}, α={p[1]:g} is measured on {m} of the first {n} dev prompts: "
                             "an earlier round is unfinished; rerun the search to finish it")
    return {"lam": p[0], "alpha": p[1], "metrics": {k: mean_metric(v).to_dict() for k, v in items.items()}}


def _same(record: Mapping[str, Any], stamp: Mapping[str, str]) -> bool:
    return all(record.get(k) == v for k, v in stamp.items())


def _contenders(T: int, config: SearchConfig) -> list[tuple[float, float]]:
    return [point_key(*p) for p in search_grid(T, config) if point_key(*p) != THETA_T]


# --- the stages -------------------------------------------------------------------------------------------


def evaluate_round(ctx: SearchContext, r: int, n_prompts: int) -> int:
    """This process's share of round r: each surviving point on the prompts of [0, n_r) it lacks (θT on all
    ``n_prompts`` in round 0), merged in memory as in the grid; one record per point appended to round_{r}.jsonl
    as it finishes. Returns how many points it evaluated."""
    config, shard = ctx.config, ctx.shard
    check_split(config.split)
    T, stamp = ctx.T, ctx.stamp()
    rounds = plan(T, config, n_prompts)
    chunks = chunks_of(ctx.search_dir, stamp)
    jobs = [(THETA_T, n_prompts)] if r == 0 else []
    jobs += [(p, rounds[r].prompts) for p in survivors(chunks, T, config, rounds, r)]
    jobs = [(p, covered(chunks.get(p, []), stop)[0], stop) for p, stop in jobs]
    mine = shard.take([job for job in jobs if job[1] < job[2]])

    def record(job: tuple[tuple[float, float], int, int], metrics: dict[str, Any], seconds: dict[str, float]
               ) -> dict[str, Any]:
        (lam, alpha), start, stop = job
        return {"lam": lam, "alpha": alpha, "round": r, "start": start, "stop": stop, **stamp, "metrics": metrics,
                "seconds": seconds, "rank": shard.rank}

    return len(evaluate_each(ctx, config.split, mine, lambda bench, job: bench.merge(*job[0]), record,
                             desc=f"search round {r} ({rounds[r].prompts} prompts)", prompts=lambda job: job[1:],
                             append_to=lambda job: ctx.files.round(r)))


def round_record(ctx: SearchContext, r: int, n_prompts: int, parts: Sequence[int]) -> dict[str, Any]:
    """The manifest's record of round r (its points, its prompts, who goes on), once every process finished it."""
    path, T, config = ctx.files.round(r), ctx.T, ctx.config
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()  # a round that found everything measured still proves its (empty) file
    rounds, chunks = plan(T, config, n_prompts), chunks_of(ctx.search_dir, ctx.stamp())
    alive = survivors(chunks, T, config, rounds, r)
    record = {"round": r, "prompts": rounds[r].prompts, "points": len(alive), "evaluated": sum(parts)}
    if r + 1 < len(rounds):
        record["kept"] = [list(p) for p in survivors(chunks, T, config, rounds, r + 1)]
    return record


def choose(ctx: SearchContext, n_prompts: int) -> dict[str, Any]:
    """The paper's rule among the finalists and θT, each pieced together over every dev prompt and written to
    points.jsonl as a grid point (``cost``: what it took); choice.json gains ``budget``: the rounds and the cost."""
    search_dir, T, config = ctx.search_dir, ctx.T, ctx.config
    stamp, rounds = ctx.stamp(), plan(T, config, n_prompts)
    chunks = chunks_of(search_dir, stamp)
    finalists = survivors(chunks, T, config, rounds, len(rounds) - 1)
    done = {point_key(p["lam"], p["alpha"]) for p in read_records(ctx.files.points) if ctx.same(p)}
    spent = costs(chunks)
    for lam, alpha in [THETA_T, *finalists]:
        if (lam, alpha) in done:
            continue
        metrics = _measured(chunks, (lam, alpha), n_prompts)["metrics"]
        own = [c for c in chunks[(lam, alpha)] if "round" in c]
        seconds: dict[str, float] = {}
        for c in own:
            for k, v in c["seconds"].items():
                seconds[k] = seconds.get(k, 0.0) + v
        append_record(ctx.files.points, {
            "lam": lam, "alpha": alpha, "weights": merge_weights(T, lam, alpha), **stamp,
            "metrics": metrics, "seconds": seconds, "rank": 0, "method": "halving",
            "rounds": sorted({c["round"] for c in own}), "cost": spent.get((lam, alpha)),
        })
    choice = points.choose(ctx, among=[THETA_T, *finalists])
    choice["budget"] = {
        "method": "halving", **config.halving.to_dict(), "dev_prompts": n_prompts,
        "rounds": [{"round": q, "prompts": rnd.prompts, "points": len(survivors(chunks, T, config, rounds, q))}
                   for q, rnd in enumerate(rounds)],
        "finalists": [list(p) for p in finalists],
        "prompt_evaluations": sum(c["prompts"] for c in spent.values()),
        "seconds": round(sum(c["seconds"] for c in spent.values()), 3),
        "grid_prompt_evaluations": (len(_contenders(T, config)) + 1) * n_prompts,
    }
    atomic_write_json(ctx.files.choice, choice)
    return choice


def costs(chunks: Mapping[tuple[float, float], list[dict]]) -> dict[tuple[float, float], dict[str, Any]]:
    """{(λ, α): {"prompts": prompt-evaluations, "seconds": merge + evaluation}} of what the rounds evaluated."""
    out = {}
    for p, recs in chunks.items():
        own = [c for c in recs if "round" in c]
        if own:
            out[p] = {"prompts": sum(c["stop"] - c["start"] for c in own),
                      "seconds": round(sum(c["seconds"].get("merge", 0.0) + c["seconds"]["eval"] for c in own), 3)}
    return out
