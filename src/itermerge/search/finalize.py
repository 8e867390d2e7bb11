"""The chosen merge written to disk (streamed) and evaluated once on the test split, beside θ0 and θT."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from itermerge.checkpoint import load_tokenizer
from itermerge.config.evaluation import EvalConfig
from itermerge.devices import CPU, Placement, load_placed, release
from itermerge.errors import ItermergeError
from itermerge.evaluation import Evaluator, metrics_to_dict
from itermerge.merging import merge_checkpoints
from itermerge.rundir import Manifest, atomic_write_json
from itermerge.runner import Shard
from itermerge.search.grid import model_name
from itermerge.search.points import EvaluateFn, load_weights_into, timed_eval


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
    where: Placement = CPU,
    make_sampler: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Write the chosen merge with the streaming ``merge_checkpoints`` and evaluate it once on test, beside θ0 and
    θT (every θt with ``all_checkpoints``), on one process: ``write_merge``, ``evaluate_test``, ``write_test``."""
    write_merge(search_dir, reference, checkpoints, merged_dir, mean_cache=mean_cache, progress=progress)
    done = evaluate_test(search_dir, reference, checkpoints, eval_config, merged_dir, test_split=test_split,
                         all_checkpoints=all_checkpoints, evaluate_fn=evaluate_fn, progress=progress, where=where,
                         make_sampler=make_sampler)
    return write_test(search_dir, checkpoints, eval_config, [done], test_split=test_split)


def chosen(search_dir: str | os.PathLike) -> tuple[float, float]:
    """(λ, α) of search_dir/choice.json."""
    path = Path(search_dir) / "choice.json"
    if not path.exists():
        raise ItermergeError(f"{path}: not found; run the search (itermerge search RUN_DIR) before the test")
    choice = json.loads(path.read_text())
    return choice["lam"], choice["alpha"]


def write_merge(search_dir: str | os.PathLike, reference: str | os.PathLike, checkpoints: Sequence[str | os.PathLike],
                merged_dir: str | os.PathLike, *, mean_cache: str | os.PathLike | None = None,
                progress: bool = True) -> dict[str, Any]:
    """The chosen (λ, α) merged to ``merged_dir`` (streamed), unless it already holds this merge of these inputs."""
    lam, alpha = chosen(search_dir)
    merged_dir, checkpoints = Path(merged_dir), [Path(c) for c in checkpoints]
    meta = merged_dir / "merge.json"
    if meta.exists():
        old = json.loads(meta.read_text())
        if old.get("lam") == lam and old.get("alpha") == alpha and len(old.get("checkpoints", [])) == len(checkpoints):
            return {"lam": lam, "alpha": alpha}
    merge_checkpoints(reference, checkpoints, merged_dir, lam=lam, alpha=alpha, mean_cache=mean_cache,
                      force=meta.exists(), progress=progress)
    return {"lam": lam, "alpha": alpha}


def _record(search_dir: Path, eval_config: EvalConfig, test_split: str) -> dict[str, Any]:
    """test.json as recorded for this choice and these evaluators, else a fresh one."""
    lam, alpha = chosen(search_dir)
    path, fingerprint = search_dir / "test.json", eval_config.fingerprint()
    record = json.loads(path.read_text()) if path.exists() else {}
    if record.get("eval_fingerprint") != fingerprint or record.get("lam") != lam or record.get("alpha") != alpha:
        record = {"split": test_split, "eval_fingerprint": fingerprint, "lam": lam, "alpha": alpha, "models": []}
    return record


def _wanted(reference, checkpoints: list[Path], merged_dir: Path, all_checkpoints: bool) -> list[tuple[Any, Path]]:
    T = len(checkpoints)
    return [(0, Path(reference)), *(((t, checkpoints[t - 1]) for t in range(1, T)) if all_checkpoints else ()),
            (T, checkpoints[-1]), ("merged", merged_dir)]


def evaluate_test(
    search_dir: str | os.PathLike, reference: str | os.PathLike, checkpoints: Sequence[str | os.PathLike],
    eval_config: EvalConfig, merged_dir: str | os.PathLike, *, test_split: str = "test", all_checkpoints: bool = False,
    evaluate_fn: EvaluateFn | None = None, progress: bool = True, where: Placement = CPU,
    make_sampler: Callable[..., Any] | None = None, shard: Shard | None = None,
) -> list[dict[str, Any]]:
    """This process's share of the models test.json does not hold yet, each evaluated once on the test split."""
    shard, search_dir, checkpoints = shard or Shard(), Path(search_dir), [Path(c) for c in checkpoints]
    lam, alpha = chosen(search_dir)
    record = _record(search_dir, eval_config, test_split)
    done = {m["t"] for m in record["models"]}
    todo = shard.take([(t, p) for t, p in _wanted(reference, checkpoints, Path(merged_dir), all_checkpoints)
                       if t not in done])
    if not todo:
        return []
    model = load_placed(checkpoints[-1], where)
    if evaluate_fn is None:
        ref_model = load_placed(reference, where) if eval_config.kl is not None else None
        evaluate_fn = Evaluator(eval_config, load_tokenizer(checkpoints[-1]), test_split, reference_model=ref_model,
                                progress=False, make_sampler=make_sampler)
    out = []
    for t, path in tqdm(todo, desc=f"{test_split} evaluation", unit="model", disable=not (progress and shard.is_main)):
        load_weights_into(model, path)
        metrics, seconds = timed_eval(evaluate_fn, model)
        name = f"Merged (λ={lam:g}, α={alpha:g})" if t == "merged" else model_name(t)
        out.append({"t": t, "name": name, "path": str(path), "metrics": metrics_to_dict(metrics), "seconds": seconds})
    release(model)
    return out


def write_test(search_dir: str | os.PathLike, checkpoints: Sequence[str | os.PathLike], eval_config: EvalConfig,
               parts: Sequence[Sequence[dict[str, Any]]], *, test_split: str = "test") -> dict[str, Any]:
    """test.json: what it held, and the processes' new evaluations, in the table's order (θ0, …, θT, merged)."""
    search_dir = Path(search_dir)
    record = _record(search_dir, eval_config, test_split)
    models = {m["t"]: m for m in record["models"]} | {m["t"]: m for part in parts for m in part}
    order = {t: i for i, t in enumerate([0, *range(1, len(checkpoints) + 1), "merged"])}
    record["models"] = sorted(models.values(), key=lambda m: order[m["t"]])
    atomic_write_json(search_dir / "test.json", record)
    return record


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
