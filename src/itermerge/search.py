"""The (λ, α) search of §3.2: merge in memory, evaluate on dev, choose by the paper's rule, test once."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from itermerge.checkpoint import CheckpointReader, load_model, load_tokenizer
from itermerge.errors import ItermergeError
from itermerge.evaluation import EvalConfig, Evaluator, Metric, metrics_to_dict
from itermerge.merge import MergeBasis, merge_checkpoints, merge_weights
from itermerge.rundir import Manifest, atomic_write_json
from itermerge.selection import SelectionRule, select_point

# Around the paper's picks, (λ, α) = (0.3, 0.4) for Llama-3-8B and (0.2, 1.7) for Qwen2-7B.
DEFAULT_LAMS = (0.0, 0.1, 0.2, 0.3, 0.5)
DEFAULT_ALPHAS = (0.0, 0.2, 0.4, 0.7, 1.0)

EvaluateFn = Callable[[nn.Module, dict[str, float]], dict[str, Metric]]  # (model, timings) -> metrics


@dataclass(frozen=True)
class SearchConfig:
    lams: tuple[float, ...] = field(default=DEFAULT_LAMS, metadata={"help": "λ: weight of θ̄ (direction)"})
    alphas: tuple[float, ...] = field(default=DEFAULT_ALPHAS, metadata={"help": "α: extrapolation (magnitude)"})
    split: str = field(default="dev", metadata={"help": "split the points are evaluated on (never test)"})
    rule: SelectionRule = field(default_factory=SelectionRule)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lams", tuple(float(x) for x in self.lams))
        object.__setattr__(self, "alphas", tuple(float(x) for x in self.alphas))
        if not self.lams or not self.alphas:
            raise ItermergeError("search: lams and alphas must each hold at least one value")


def grid(lams: Sequence[float], alphas: Sequence[float]) -> list[tuple[float, float]]:
    """(λ, α) points, θT itself (0, 0) first as §3.2 searches "from the final checkpoint", then λ-major."""
    points = [(0.0, 0.0)] + [(float(lam), float(a)) for lam in lams for a in alphas]
    return list(dict.fromkeys(points))


def check_split(split: str) -> None:
    if split.lower() == "test":
        raise ItermergeError(
            "the search refuses split 'test': choosing (λ, α) on test data leaks it into the result. "
            "Search on 'dev'; the chosen merge is evaluated on test once, by finalize()"
        )


# --- the records: one JSON object a line, appended as each point finishes ---------------------------


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file that is appended to; a torn last line (a crash mid-write) is cut off."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        path.write_text(text, encoding="utf-8")
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ItermergeError(f"{path} line {lineno}: not valid JSON ({e.msg}); delete that line to redo it") from e
    return records


def append_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _key(lam: float, alpha: float) -> tuple[float, float]:
    return round(float(lam), 9), round(float(alpha), 9)


# --- the search ------------------------------------------------------------------------------------


@torch.no_grad()
def load_weights_into(model: nn.Module, path: str | os.PathLike) -> None:
    """Overwrite the model's parameters with a checkpoint's, so one loaded model serves every evaluation."""
    reader = CheckpointReader(path)
    for name, p in model.named_parameters():
        if name not in reader:
            raise ItermergeError(f"{path}: has no tensor {name!r}; all checkpoints of a search must share θ0's architecture")
        p.copy_(reader.get(name))


def run_search(
    search_dir: str | os.PathLike,
    reference: str | os.PathLike,
    checkpoints: Sequence[str | os.PathLike],
    eval_config: EvalConfig,
    config: SearchConfig = SearchConfig(),
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
    done = {_key(r["lam"], r["alpha"]) for r in read_records(points_path) if _same(r, stamp)}
    done_ckpts = {r["t"] for r in read_records(ckpt_path) if _same(r, stamp)}
    atomic_write_json(search_dir / "eval_config.json", {"fingerprint": fingerprint, **eval_config.to_dict()})

    todo = [p for p in todo_grid if _key(*p) not in done]
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
            merge_s = time.perf_counter() - start
            metrics, seconds = _timed_eval(evaluate_fn, model)
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
            metrics, seconds = _timed_eval(evaluate_fn, model)
            append_record(ckpt_path, {"t": t, "name": model_name(t), "path": str(paths[t]), **stamp,
                                      "metrics": metrics_to_dict(metrics), "seconds": {"load": load_s, **seconds}})
    points = [r for r in read_records(points_path) if _same(r, stamp)]
    base = next(p for p in points if _key(p["lam"], p["alpha"]) == (0.0, 0.0))
    if T not in done_ckpts:
        # θ_T is the merge at λ = 0, α = 0 bit for bit (eq. 9 returns a unit-weight input exactly).
        append_record(ckpt_path, {"t": T, "name": model_name(T), "path": str(checkpoints[-1]), **stamp,
                                  "metrics": base["metrics"], "seconds": base["seconds"], "same_as": "λ=0, α=0"})
    grid_keys = {_key(*p) for p in todo_grid}
    in_grid = [p for p in points if _key(p["lam"], p["alpha"]) in grid_keys]
    choice = {**select_point(in_grid, base, config.rule), **stamp, "grid": {"lams": config.lams, "alphas": config.alphas}}
    atomic_write_json(search_dir / "choice.json", choice)
    return choice


def model_name(t: int) -> str:
    return "θ0" if t == 0 else f"Iter {t}"


def _same(record: dict[str, Any], stamp: dict[str, str]) -> bool:
    return all(record.get(k) == v for k, v in stamp.items())


def _timed_eval(evaluate_fn: EvaluateFn, model: nn.Module) -> tuple[dict[str, Metric], dict[str, float]]:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    metrics = evaluate_fn(model, timings)
    return metrics, {"eval": time.perf_counter() - start, **timings}


# --- the chosen merge, on disk, evaluated once on test -----------------------------------------------


def finalize(
    search_dir: str | os.PathLike,
    reference: str | os.PathLike,
    checkpoints: Sequence[str | os.PathLike],
    eval_config: EvalConfig,
    merged_dir: str | os.PathLike,
    *,
    mean_cache: str | os.PathLike | None = None,
    test_split: str = "test",
    all_checkpoints: bool = False,
    evaluate_fn: EvaluateFn | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the chosen merge with the streaming ``merge_checkpoints`` and evaluate it once on test.

    θ0 and θT (every θt with ``all_checkpoints``) are evaluated on test beside it, for the table.
    ``test.json`` is rewritten after each model; a model already in it is never evaluated again.
    """
    search_dir, merged_dir = Path(search_dir), Path(merged_dir)
    choice_path = search_dir / "choice.json"
    if not choice_path.exists():
        raise ItermergeError(f"{choice_path}: not found; run the search (itermerge search RUN_DIR) before finalize")
    choice = json.loads(choice_path.read_text())
    lam, alpha = choice["lam"], choice["alpha"]
    checkpoints = [Path(c) for c in checkpoints]
    _write_merge(reference, checkpoints, merged_dir, lam, alpha, mean_cache, progress)

    fingerprint = eval_config.fingerprint()
    test_path = search_dir / "test.json"
    record = json.loads(test_path.read_text()) if test_path.exists() else {}
    if record.get("eval_fingerprint") != fingerprint or record.get("lam") != lam or record.get("alpha") != alpha:
        record = {"split": test_split, "eval_fingerprint": fingerprint, "lam": lam, "alpha": alpha, "models": []}
    T = len(checkpoints)
    wanted = [(0, reference), *(((t, checkpoints[t - 1]) for t in range(1, T)) if all_checkpoints else ()),
              (T, checkpoints[-1]), ("merged", merged_dir)]
    done = {m["t"] for m in record["models"]}
    todo = [(t, p) for t, p in wanted if t not in done]
    if todo:
        tokenizer = load_tokenizer(checkpoints[-1])
        model = load_model(checkpoints[-1])
        if evaluate_fn is None:
            ref_model = load_model(reference) if eval_config.kl is not None else None
            evaluate_fn = Evaluator(eval_config, tokenizer, test_split, reference_model=ref_model, progress=False)
        for t, path in tqdm(todo, desc=f"{test_split} evaluation", unit="model", disable=not progress):
            load_weights_into(model, path)
            metrics, seconds = _timed_eval(evaluate_fn, model)
            name = f"Merged (λ={lam:g}, α={alpha:g})" if t == "merged" else model_name(t)
            record["models"].append({"t": t, "name": name, "path": str(path), "metrics": metrics_to_dict(metrics),
                                     "seconds": seconds})
            atomic_write_json(test_path, record)
    return record


def _write_merge(reference, checkpoints, merged_dir: Path, lam, alpha, mean_cache, progress: bool) -> None:
    """Merge to ``merged_dir`` unless it already holds this (λ, α) of these inputs."""
    meta = merged_dir / "merge.json"
    if meta.exists():
        old = json.loads(meta.read_text())
        if old.get("lam") == lam and old.get("alpha") == alpha and len(old.get("checkpoints", [])) == len(checkpoints):
            return
    merge_checkpoints(reference, checkpoints, merged_dir, lam=lam, alpha=alpha, mean_cache=mean_cache,
                      force=meta.exists(), progress=progress)


# --- the same, on a run directory -------------------------------------------------------------------


def run_paths(run_dir: str | os.PathLike, reference: str | os.PathLike | None = None) -> tuple[Path, list[Path]]:
    """θ0 (``reference``, else the manifest's ``reference``) and θ1..θT = iter_XX/model in order."""
    run_dir = Path(run_dir)
    checkpoints = sorted(p for p in run_dir.glob("iter_*/model") if p.is_dir())
    if not checkpoints:
        raise ItermergeError(f"{run_dir}: no iter_XX/model checkpoints; run `itermerge iterate` first")
    if reference is None:
        reference = Manifest(run_dir).data.get("reference")
    if reference is None:
        raise ItermergeError(f"{run_dir}/manifest.json names no reference θ0; pass it (--reference THETA0)")
    return Path(reference), checkpoints


def search_run(run_dir: str | os.PathLike, eval_config: EvalConfig, config: SearchConfig = SearchConfig(),
               *, reference: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """``run_search`` on a run directory: results in run_dir/search, θ̄ cached in run_dir/cache."""
    run_dir = Path(run_dir)
    reference, checkpoints = run_paths(run_dir, reference)
    choice = run_search(run_dir / "search", reference, checkpoints, eval_config, config,
                        mean_cache=run_dir / "cache" / "mean_intermediate", progress=progress)
    Manifest(run_dir).record("search", {"lam": choice["lam"], "alpha": choice["alpha"], "config": asdict(config)})
    return choice


def finalize_run(run_dir: str | os.PathLike, eval_config: EvalConfig, *, reference: str | os.PathLike | None = None,
                 all_checkpoints: bool = False, progress: bool = True) -> dict[str, Any]:
    """``finalize`` on a run directory: the merge in run_dir/merged, test numbers in run_dir/search/test.json."""
    run_dir = Path(run_dir)
    reference, checkpoints = run_paths(run_dir, reference)
    record = finalize(run_dir / "search", reference, checkpoints, eval_config, run_dir / "merged",
                      mean_cache=run_dir / "cache" / "mean_intermediate", all_checkpoints=all_checkpoints,
                      progress=progress)
    Manifest(run_dir).record("test_eval", {"lam": record["lam"], "alpha": record["alpha"]})
    return record
