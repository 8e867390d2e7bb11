"""Every (λ, α) point of the grid, and θ0..θT, evaluated on the dev split: Algorithm 2 in memory, one model loaded."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from itermerge.checkpoint import CheckpointReader, load_tokenizer
from itermerge.config.evaluation import EvalConfig
from itermerge.config.search import SearchConfig, resolve_lams
from itermerge.devices import CPU, Placement, load_placed, release
from itermerge.errors import ItermergeError
from itermerge.evaluation import Evaluator, Metric, metrics_to_dict
from itermerge.maths.merge import merge_weights
from itermerge.merging import MergeBasis
from itermerge.records import append_record, read_records
from itermerge.rundir import atomic_write_json
from itermerge.runner import Shard
from itermerge.search.grid import check_split, grid, model_name, point_key
from itermerge.search.selection import select_checkpoint, select_point

EvaluateFn = Callable[[nn.Module, dict[str, float]], dict[str, Metric]]  # (model, timings) -> metrics


@torch.no_grad()
def load_weights_into(model: nn.Module, path: str | os.PathLike) -> None:
    """Overwrite the model's parameters with a checkpoint's, so one loaded model serves every evaluation."""
    reader = CheckpointReader(path)
    for name, p in model.named_parameters():
        if name not in reader:
            raise ItermergeError(
                f"{path}: has no tensor {name!r}; all checkpoints of a search must share θ0's architecture"
            )
        p.copy_(reader.get(name))


def run_search(
    search_dir: str | os.PathLike,
    reference: str | os.PathLike,
    checkpoints: Sequence[str | os.PathLike],
    eval_config: EvalConfig,
    config: SearchConfig | None = None,
    *,
    mean_cache: str | os.PathLike | None = None,
    evaluate_fn: EvaluateFn | None = None,
    progress: bool = True,
    where: Placement = CPU,
    make_sampler: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Evaluate every (λ, α) of the grid and θ0..θT on the dev split; write points, choice; return the choice.

    ``evaluate_points`` on one process, then ``choose``. ``evaluate_fn`` replaces the evaluators built from
    ``eval_config`` (its fingerprint still keys the records, so give a config that names what it measures).
    """
    evaluate_points(search_dir, reference, checkpoints, eval_config, config, mean_cache=mean_cache,
                    evaluate_fn=evaluate_fn, progress=progress, where=where, make_sampler=make_sampler)
    return choose(search_dir, checkpoints, eval_config, config)


def evaluate_points(
    search_dir: str | os.PathLike,
    reference: str | os.PathLike,
    checkpoints: Sequence[str | os.PathLike],
    eval_config: EvalConfig,
    config: SearchConfig | None = None,
    *,
    mean_cache: str | os.PathLike | None = None,
    evaluate_fn: EvaluateFn | None = None,
    progress: bool = True,
    where: Placement = CPU,
    make_sampler: Callable[..., Any] | None = None,
    shard: Shard | None = None,
    among: Collection[tuple[float, float]] | None = None,
) -> int:
    """This process's share (``shard``) of the grid points and θ0..θ_{T−1} not yet recorded, evaluated on the dev
    split; returns how many. Each point is Algorithm 2 applied in memory to one loaded model (``MergeBasis``),
    then evaluated; its record is appended to ``points.jsonl`` as it finishes (``checkpoints.jsonl`` for θ_t), so
    a rerun evaluates only what is missing. Models load on ``where`` (device and dtype). ``among``: only these
    points of the grid (``point_key``s; the budgeted search passes none: it measured its points itself)."""
    config, shard = config or SearchConfig(), shard or Shard()
    check_split(config.split)
    search_dir, checkpoints = Path(search_dir), [Path(c) for c in checkpoints]
    if not checkpoints:
        raise ItermergeError("run_search: no checkpoints θ1..θT given")
    T, stamp = len(checkpoints), _stamp(config, eval_config)
    points_path, ckpt_path = search_dir / "points.jsonl", search_dir / "checkpoints.jsonl"
    done = {point_key(r["lam"], r["alpha"]) for r in read_records(points_path) if _same(r, stamp)}
    done_ckpts = {r["t"] for r in read_records(ckpt_path) if _same(r, stamp)}
    if shard.is_main:
        atomic_write_json(search_dir / "eval_config.json", {"fingerprint": stamp["eval_fingerprint"],
                                                             **eval_config.to_dict()})
    paths = [Path(reference), *checkpoints]
    if shard.is_main:  # θ_t measured on this split by another search of the run (search_T3/ beside search/)
        for t, record in _measured_elsewhere(search_dir, stamp, paths[:T], done_ckpts).items():
            append_record(ckpt_path, {**record, "t": t, "name": model_name(t)})
    done_ckpts |= set(_measured_elsewhere(search_dir, stamp, paths[:T], done_ckpts))
    jobs = [("point", p) for p in _grid(T, config)
            if point_key(*p) not in done and (among is None or point_key(*p) in among)]
    jobs += [("checkpoint", t) for t in range(T) if t not in done_ckpts]  # θT's record is the (0, 0) point
    mine = shard.take(jobs)
    if not mine:
        return 0
    model = load_placed(checkpoints[-1], where)
    evaluate_fn = evaluate_fn or build_evaluator(eval_config, config.split, checkpoints[-1], reference, where,
                                                 make_sampler)
    basis = (MergeBasis.from_checkpoints(reference, checkpoints, mean_cache=mean_cache)
             if any(kind == "point" for kind, _ in mine) else None)
    for kind, job in tqdm(mine, desc=f"search (λ, α) {_share(shard, len(jobs))}", unit="model",
                          disable=not (progress and shard.is_main)):
        start = time.perf_counter()
        if kind == "point":
            lam, alpha = job
            basis.apply_to(model, lam, alpha)
            refuse_non_finite(model, lam, alpha)
            merge_s = time.perf_counter() - start
            metrics, seconds = timed_eval(evaluate_fn, model)
            append_record(points_path, {
                "lam": lam, "alpha": alpha, "weights": merge_weights(T, lam, alpha), **stamp,
                "metrics": metrics_to_dict(metrics), "seconds": {"merge": merge_s, **seconds}, "rank": shard.rank,
            })
        else:
            load_weights_into(model, paths[job])
            load_s = time.perf_counter() - start
            metrics, seconds = timed_eval(evaluate_fn, model)
            append_record(ckpt_path, {"t": job, "name": model_name(job), "path": str(paths[job]), **stamp,
                                      "metrics": metrics_to_dict(metrics), "seconds": {"load": load_s, **seconds},
                                      "rank": shard.rank})
    release(model, basis)
    return len(mine)


def _measured_elsewhere(search_dir: Path, stamp: dict[str, str], paths: Sequence[Path],
                        done: set[int]) -> dict[int, dict[str, Any]]:
    """{t: record} for the θ_t (t not in ``done``) that another search directory of this run measured with the same
    evaluators on the same split, matched by path; the record says where it came from (``reused_from``)."""
    wanted = {str(p): t for t, p in enumerate(paths) if t not in done}
    found: dict[int, dict[str, Any]] = {}
    for other in sorted(search_dir.parent.glob("search*/checkpoints.jsonl")):
        if other.parent == search_dir:
            continue
        for r in read_records(other):
            t = wanted.get(r.get("path"))
            if t is not None and t not in found and _same(r, stamp) and r.get("same_as") is None:
                found[t] = {**r, "reused_from": other.parent.name}
    return found


def choose(search_dir: str | os.PathLike, checkpoints: Sequence[str | os.PathLike], eval_config: EvalConfig,
           config: SearchConfig | None = None, among: Collection[tuple[float, float]] | None = None) -> dict[str, Any]:
    """The paper's rule applied to the recorded points of the grid (``among`` them only, when given: the budgeted
    search's finalists): writes choice.json and returns it."""
    config, search_dir = config or SearchConfig(), Path(search_dir)
    T, stamp = len(checkpoints), _stamp(config, eval_config)
    points_path, ckpt_path = search_dir / "points.jsonl", search_dir / "checkpoints.jsonl"
    points = [r for r in read_records(points_path) if _same(r, stamp)]
    base = next((p for p in points if point_key(p["lam"], p["alpha"]) == (0.0, 0.0)), None)
    if base is None:
        raise ItermergeError(f"{points_path}: no record of θT (λ = 0, α = 0); rerun the search to evaluate it")
    if T not in {r["t"] for r in read_records(ckpt_path) if _same(r, stamp)}:
        # θ_T is the merge at λ = 0, α = 0 bit for bit (eq. 9 returns a unit-weight input exactly).
        append_record(ckpt_path, {"t": T, "name": model_name(T), "path": str(checkpoints[-1]), **stamp,
                                  "metrics": base["metrics"], "seconds": base["seconds"], "same_as": "λ=0, α=0"})
    grid_keys = {point_key(*p) for p in _grid(T, config)}
    if among is not None:
        grid_keys &= {point_key(*p) for p in among}
    in_grid = [p for p in points if point_key(p["lam"], p["alpha"]) in grid_keys]
    choice = {**select_point(in_grid, base, config.rule), **stamp,
              "grid": {"lams": config.lams, "alphas": config.alphas, "lams_at_T": _lams(T, config)}}
    # ExPO (Zheng et al. 2024) is the λ = 0 line of the grid: θ0 + (1+α)(θT − θ0), α chosen by the same rule.
    expo = select_point([p for p in in_grid if p["lam"] == 0.0], base, config.rule)
    choice["expo"] = {k: expo[k] for k in ("lam", "alpha", "weights", "reason", "chosen", "reward_gain")}
    # Early stopping, the practitioner's baseline: the best θt on dev by the same rule (tested as a row of its own).
    ckpts = {r["t"]: r for r in reversed(read_records(ckpt_path)) if _same(r, stamp) and r["t"] <= T}
    choice["best_checkpoint"] = select_checkpoint(list(ckpts.values()), config.rule)
    atomic_write_json(search_dir / "choice.json", choice)
    return choice


def _lams(T: int, config: SearchConfig) -> list[float]:
    """The λ values searched for T checkpoints (``uniform`` resolved to (T−1)/T); θ̄ is undefined for T = 1."""
    return [0.0] if T == 1 else resolve_lams(config.lams, T)


def _grid(T: int, config: SearchConfig) -> list[tuple[float, float]]:
    return grid(_lams(T, config), config.alphas)


def _stamp(config: SearchConfig, eval_config: EvalConfig) -> dict[str, str]:
    return {"split": config.split, "eval_fingerprint": eval_config.fingerprint()}


def _share(shard: Shard, total: int) -> str:
    return f"(this process's {shard.taken} of {total})" if shard.world > 1 else ""


def build_evaluator(eval_config: EvalConfig, split: str, theta_T: str | os.PathLike, reference: str | os.PathLike,
                    where: Placement, make_sampler: Callable[..., Any] | None) -> Evaluator:
    """The evaluators of ``eval_config`` for ``split``, as every stage of the search builds them: the reference model
    (for KL) and the judge placed like the policy (its device, its precision)."""
    ref_model = load_placed(reference, where) if eval_config.kl is not None else None
    return Evaluator(eval_config, load_tokenizer(theta_T), split, reference_model=ref_model, progress=False,
                     make_sampler=make_sampler, where=where)


def _same(record: dict[str, Any], stamp: dict[str, str]) -> bool:
    return all(record.get(k) == v for k, v in stamp.items())


def timed_eval(evaluate_fn: EvaluateFn, model: nn.Module) -> tuple[dict[str, Metric], dict[str, float]]:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    metrics = evaluate_fn(model, timings)
    return metrics, {"eval": time.perf_counter() - start, **timings}


@torch.no_grad()
def refuse_non_finite(model: nn.Module, lam: float, alpha: float) -> None:
    """A merged point whose weights overflowed (a very large α, in 16 bits) is refused by name, never evaluated."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ItermergeError(
                f"search point λ={lam:g}, α={alpha:g}: tensor {name!r} of the merge holds NaN or Inf (it overflows "
                f"{p.dtype}); take this α out of search.alphas or evaluate in float32 (model.dtype: float32)"
            )
