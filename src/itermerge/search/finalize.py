"""The chosen merge written to disk (streamed) and evaluated once on the test split, beside θ0 and θT."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from itermerge.checkpoint import load_model, load_tokenizer
from itermerge.config.evaluation import EvalConfig
from itermerge.errors import ItermergeError
from itermerge.evaluation import Evaluator, metrics_to_dict
from itermerge.merging import merge_checkpoints
from itermerge.rundir import Manifest, atomic_write_json
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
            metrics, seconds = timed_eval(evaluate_fn, model)
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
