"""Every (λ, α) point of the grid, and θ0..θT, evaluated on the dev split: Algorithm 2 in memory, one model loaded."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from itermerge.errors import ItermergeError
from itermerge.maths.merge import merge_weights
from itermerge.records import append_record, read_records
from itermerge.rundir import RunLayout, atomic_write_json
from itermerge.search.context import Bench, SearchContext, evaluate_each
from itermerge.search.grid import check_split, lams_at, model_name, point_key, search_grid
from itermerge.search.selection import select_checkpoint, select_point


def evaluate_points(ctx: SearchContext, among: Collection[tuple[float, float]] | None = None) -> int:
    """This process's share (``ctx.shard``) of the grid points and θ0..θ_{T−1} not yet recorded, evaluated on the
    dev split; returns how many. Each point is Algorithm 2 applied in memory to one loaded model (``MergeBasis``),
    then evaluated; its record is appended to ``points.jsonl`` as it finishes (``checkpoints.jsonl`` for θ_t), so
    a rerun evaluates only what is missing. ``among``: only these points of the grid (``point_key``s; the budgeted
    search passes none: it measured its points itself)."""
    config, shard = ctx.config, ctx.shard
    check_split(config.split)
    T, stamp = ctx.T, ctx.stamp()
    points_path, ckpt_path = ctx.files.points, ctx.files.checkpoints
    done = {point_key(r["lam"], r["alpha"]) for r in read_records(points_path) if ctx.same(r)}
    done_ckpts = {r["t"] for r in read_records(ckpt_path) if ctx.same(r)}
    if shard.is_main:
        atomic_write_json(ctx.files.eval_config, {"fingerprint": stamp["eval_fingerprint"],
                                                             **ctx.eval_config.to_dict()})
    paths = [ctx.reference, *ctx.checkpoints]
    elsewhere = _measured_elsewhere(ctx, paths[:T], done_ckpts)
    if shard.is_main:  # θ_t measured on this split by another search of the run (search_T3/ beside search/)
        for t, record in elsewhere.items():
            append_record(ckpt_path, {**record, "t": t, "name": model_name(t)})
    done_ckpts |= set(elsewhere)
    jobs = [("point", p) for p in search_grid(T, config)
            if point_key(*p) not in done and (among is None or point_key(*p) in among)]
    jobs += [("checkpoint", t) for t in range(T) if t not in done_ckpts]  # θT's record is the (0, 0) point
    mine = shard.take(jobs)

    def set_weights(bench: Bench, job: tuple[str, Any]) -> str:
        kind, what = job
        return bench.merge(*what) if kind == "point" else bench.load(paths[what])

    def record(job: tuple[str, Any], metrics: dict[str, Any], seconds: dict[str, float]) -> dict[str, Any]:
        kind, what = job
        if kind == "point":
            return {"lam": what[0], "alpha": what[1], "weights": merge_weights(T, *what), **stamp,
                    "metrics": metrics, "seconds": seconds, "rank": shard.rank}
        return {"t": what, "name": model_name(what), "path": str(paths[what]), **stamp, "metrics": metrics,
                "seconds": seconds, "rank": shard.rank}

    share = f" (this process's {shard.taken} of {len(jobs)})" if shard.world > 1 else ""
    return len(evaluate_each(ctx, config.split, mine, set_weights, record, desc=f"search (λ, α){share}",
                             append_to=lambda job: points_path if job[0] == "point" else ckpt_path))


def _measured_elsewhere(ctx: SearchContext, paths: Sequence[Path], done: set[int]) -> dict[int, dict[str, Any]]:
    """{t: record} for the θ_t (t not in ``done``) that another search directory of this run measured with the same
    evaluators on the same split, matched by path; the record says where it came from (``reused_from``)."""
    wanted = {str(p): t for t, p in enumerate(paths) if t not in done}
    found: dict[int, dict[str, Any]] = {}
    for other in RunLayout(ctx.search_dir.parent).searches():
        if other.dir == ctx.search_dir:
            continue
        for r in read_records(other.checkpoints):
            t = wanted.get(r.get("path"))
            if t is not None and t not in found and ctx.same(r) and r.get("same_as") is None:
                found[t] = {**r, "reused_from": other.dir.name}
    return found


def choose(ctx: SearchContext, among: Collection[tuple[float, float]] | None = None) -> dict[str, Any]:
    """The paper's rule applied to the recorded points of the grid (``among`` them only, when given: the budgeted
    search's finalists): writes choice.json and returns it."""
    config, T, stamp = ctx.config, ctx.T, ctx.stamp()
    points_path, ckpt_path = ctx.files.points, ctx.files.checkpoints
    points = [r for r in read_records(points_path) if ctx.same(r)]
    base = next((p for p in points if point_key(p["lam"], p["alpha"]) == (0.0, 0.0)), None)
    if base is None:
        raise ItermergeError(f"{points_path}: no record of θT (λ = 0, α = 0); rerun the search to evaluate it")
    if T not in {r["t"] for r in read_records(ckpt_path) if ctx.same(r)}:
        # θ_T is the merge at λ = 0, α = 0 bit for bit (eq. 9 returns a unit-weight input exactly).
        append_record(ckpt_path, {"t": T, "name": model_name(T), "path": str(ctx.checkpoints[-1]), **stamp,
                                  "metrics": base["metrics"], "seconds": base["seconds"], "same_as": "λ=0, α=0"})
    grid_keys = {point_key(*p) for p in search_grid(T, config)}
    if among is not None:
        grid_keys &= {point_key(*p) for p in among}
    in_grid = [p for p in points if point_key(p["lam"], p["alpha"]) in grid_keys]
    choice = {**select_point(in_grid, base, config.rule), **stamp,
              "grid": {"lams": config.lams, "alphas": config.alphas, "lams_at_T": lams_at(T, config)}}
    # ExPO (Zheng et al. 2024) is the λ = 0 line of the grid: θ0 + (1+α)(θT − θ0), α chosen by the same rule.
    expo = select_point([p for p in in_grid if p["lam"] == 0.0], base, config.rule)
    choice["expo"] = {k: expo[k] for k in ("lam", "alpha", "weights", "reason", "chosen", "reward_gain")}
    # Early stopping, the practitioner's baseline: the best θt on dev by the same rule (tested as a row of its own).
    ckpts = {r["t"]: r for r in reversed(read_records(ckpt_path)) if ctx.same(r) and r["t"] <= T}
    choice["best_checkpoint"] = select_checkpoint(list(ckpts.values()), config.rule)
    atomic_write_json(ctx.files.choice, choice)
    return choice
