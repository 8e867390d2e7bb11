"""Every (λ, α) point of the grid, and θ0..θT, evaluated on the dev split: Algorithm 2 in memory, one model loaded."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from itermerge.checkpoint import CheckpointReader, load_model, load_tokenizer
from itermerge.config.evaluation import EvalConfig
from itermerge.config.search import SearchConfig
from itermerge.errors import ItermergeError
from itermerge.evaluation import Evaluator, Metric, metrics_to_dict
from itermerge.maths.merge import merge_weights
from itermerge.merging import MergeBasis
from itermerge.records import append_record, read_records
from itermerge.rundir import atomic_write_json
from itermerge.search.grid import check_split, grid, model_name, point_key
from itermerge.search.selection import select_point

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
) -> dict[str, Any]:
    """Evaluate every (λ, α) of the grid and θ0..θT on the dev split; write points, choice; return the choice.

    Each point is Algorithm 2 applied in memory to one loaded model (``MergeBasis``: θ0, θ̄, θT in
    float32), then evaluated. Points go to ``points.jsonl`` as they finish, the checkpoints to
    ``checkpoints.jsonl``; a rerun skips what is recorded under the same evaluator fingerprint.
    ``evaluate_fn`` replaces the evaluators built from ``eval_config`` (its fingerprint still keys the
    records, so give a config that names what the function measures).
    """
    config = config or SearchConfig()
    check_split(config.split)
    search_dir = Path(search_dir)
    checkpoints = [Path(c) for c in checkpoints]
    if not checkpoints:
        raise ItermergeError("run_search: no checkpoints θ1..θT given")
    T = len(checkpoints)
    todo_grid = grid([0.0] if T == 1 else config.lams, config.alphas)  # θ̄ is undefined for T = 1
    fingerprint = eval_config.fingerprint()
    stamp = {"split": config.split, "eval_fingerprint": fingerprint}
    points_path, ckpt_path = search_dir / "points.jsonl", search_dir / "checkpoints.jsonl"
    done = {point_key(r["lam"], r["alpha"]) for r in read_records(points_path) if _same(r, stamp)}
    done_ckpts = {r["t"] for r in read_records(ckpt_path) if _same(r, stamp)}
    atomic_write_json(search_dir / "eval_config.json", {"fingerprint": fingerprint, **eval_config.to_dict()})

    todo = [p for p in todo_grid if point_key(*p) not in done]
    todo_ckpts = [t for t in range(T) if t not in done_ckpts]  # θT's record is the (0, 0) point
    if todo or todo_ckpts:
        tokenizer = load_tokenizer(checkpoints[-1])
        model = load_model(checkpoints[-1])
        if evaluate_fn is None:
            ref_model = load_model(reference) if eval_config.kl is not None else None
            evaluate_fn = Evaluator(eval_config, tokenizer, config.split, reference_model=ref_model, progress=False)
        basis = MergeBasis.from_checkpoints(reference, checkpoints, mean_cache=mean_cache) if todo else None
        for lam, alpha in tqdm(todo, desc="search (λ, α)", unit="point", disable=not progress):
            start = time.perf_counter()
            basis.apply_to(model, lam, alpha)
            refuse_non_finite(model, lam, alpha)
            merge_s = time.perf_counter() - start
            metrics, seconds = timed_eval(evaluate_fn, model)
            append_record(points_path, {
                "lam": lam, "alpha": alpha, "weights": merge_weights(T, lam, alpha), **stamp,
                "metrics": metrics_to_dict(metrics), "seconds": {"merge": merge_s, **seconds},
            })
        del basis
        paths = [Path(reference), *checkpoints]
        for t in tqdm(todo_ckpts, desc="search: θ0..θT−1", unit="model", disable=not progress):
            start = time.perf_counter()
            load_weights_into(model, paths[t])
            load_s = time.perf_counter() - start
            metrics, seconds = timed_eval(evaluate_fn, model)
            append_record(ckpt_path, {"t": t, "name": model_name(t), "path": str(paths[t]), **stamp,
                                      "metrics": metrics_to_dict(metrics), "seconds": {"load": load_s, **seconds}})
    points = [r for r in read_records(points_path) if _same(r, stamp)]
    base = next(p for p in points if point_key(p["lam"], p["alpha"]) == (0.0, 0.0))
    if T not in done_ckpts:
        # θ_T is the merge at λ = 0, α = 0 bit for bit (eq. 9 returns a unit-weight input exactly).
        append_record(ckpt_path, {"t": T, "name": model_name(T), "path": str(checkpoints[-1]), **stamp,
                                  "metrics": base["metrics"], "seconds": base["seconds"], "same_as": "λ=0, α=0"})
    grid_keys = {point_key(*p) for p in todo_grid}
    in_grid = [p for p in points if point_key(p["lam"], p["alpha"]) in grid_keys]
    choice = {
        **select_point(in_grid, base, config.rule),
        **stamp,
        "grid": {"lams": config.lams, "alphas": config.alphas},
    }
    atomic_write_json(search_dir / "choice.json", choice)
    return choice


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
