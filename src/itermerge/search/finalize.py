"""The chosen merge written to disk (streamed) and evaluated once on the test split, beside the baselines:
θ0, every θt, the best θt on dev, ExPO, the uniform average; each compared with the merge prompt by prompt."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itermerge.config.evaluation import EvalConfig
from itermerge.config.search import SelectionRule
from itermerge.errors import ItermergeError
from itermerge.maths.merge import merge_weights
from itermerge.merging import merge_adapters, merge_checkpoints
from itermerge.merging.lora import chain_adapters
from itermerge.operators import operator
from itermerge.records import read_records
from itermerge.rundir import Manifest, RunLayout, SearchLayout, atomic_write_json
from itermerge.search.context import Bench, SearchContext, evaluate_each
from itermerge.search.grid import model_name
from itermerge.search.selection import select_checkpoint


def chosen(search_dir: str | os.PathLike) -> tuple[float, float]:
    """(λ, α) of search_dir/choice.json."""
    path = SearchLayout(Path(search_dir)).choice
    if not path.exists():
        raise ItermergeError(f"{path}: not found; run the search (itermerge search RUN_DIR) before the test")
    choice = json.loads(path.read_text())
    return choice["lam"], choice["alpha"]


def write_merge(ctx: SearchContext) -> dict[str, Any]:
    """The chosen (λ, α) merged to ``ctx.merged_dir`` (streamed), unless it already holds this merge of these inputs;
    for a LoRA run's θ_t (θ0 plus adapters), as one adapter on θ0 that ``merged_dir`` also reads as."""
    lam, alpha = chosen(ctx.search_dir)
    merged_dir, checkpoints, reference = ctx.merged_dir, list(ctx.checkpoints), ctx.reference
    mean_cache, progress = ctx.mean_cache, ctx.progress
    meta = merged_dir / "merge.json"
    if meta.exists():
        old = json.loads(meta.read_text())
        if old.get("lam") == lam and old.get("alpha") == alpha and len(old.get("checkpoints", [])) == len(checkpoints):
            return {"lam": lam, "alpha": alpha}
    adapters = chain_adapters(checkpoints)
    if adapters is not None:  # a LoRA run (dpo.peft): the merge is one adapter on θ0, no full weights (merging/lora.py)
        merge_adapters(reference, adapters, merged_dir, operator("paper", lam=lam, alpha=alpha), force=meta.exists(),
                       progress=progress)
    else:
        merge_checkpoints(reference, checkpoints, merged_dir, operator("paper", lam=lam, alpha=alpha),
                          mean_cache=mean_cache, force=meta.exists(), progress=progress)
    return {"lam": lam, "alpha": alpha}


def _record(search_dir: Path, eval_config: EvalConfig, test_split: str) -> dict[str, Any]:
    """test.json as recorded for this choice and these evaluators, else a fresh one."""
    lam, alpha = chosen(search_dir)
    path, fingerprint = SearchLayout(search_dir).test, eval_config.fingerprint()
    record = json.loads(path.read_text()) if path.exists() else {}
    if record.get("eval_fingerprint") != fingerprint or record.get("lam") != lam or record.get("alpha") != alpha:
        record = {"split": test_split, "eval_fingerprint": fingerprint, "lam": lam, "alpha": alpha, "models": []}
    return record


@dataclass(frozen=True)
class TestModel:
    """One row of the test table: a checkpoint on disk (``path``) or a merge built in memory (``lam``, ``alpha``).

    ``weights``: its coefficients on (θ0, θ1, …, θT), Σ = 1; two rows with the same weights are one model."""

    key: Any  # 0..T, "best", "expo", "uniform", "merged"
    name: str
    weights: tuple[float, ...]
    path: Path | None = None
    lam: float | None = None
    alpha: float | None = None


def _full(k: Sequence[float]) -> tuple[float, ...]:
    """Eq. (9)'s k_1..k_T with θ0's coefficient 1 − Σ k_t in front."""
    return (1.0 - math.fsum(k), *map(float, k))


def test_models(search_dir: str | os.PathLike, reference: str | os.PathLike, checkpoints: Sequence[Path],
                merged_dir: Path | None) -> list[TestModel]:
    """The test table's models, in order: θ0, θ1..θT, the best θt on dev (early stopping by the merge's own rule,
    ``select_checkpoint``; the row repeats that θt's numbers), ExPO (λ = 0, α chosen on dev by the same rule), the
    uniform average of θ1..θT (λ = (T−1)/T, α = 0) and the chosen merge (from ``merged_dir``, else built in memory).
    """
    T, (lam, alpha) = len(checkpoints), chosen(search_dir)
    choice = json.loads(SearchLayout(Path(search_dir)).choice.read_text())
    unit = lambda t: tuple(float(i == t) for i in range(T + 1))  # noqa: E731
    models = [TestModel(0, model_name(0), unit(0), Path(reference)),
              *(TestModel(t, model_name(t), unit(t), Path(checkpoints[t - 1])) for t in range(1, T + 1))]
    best = best_checkpoint(search_dir, choice)
    if best is not None:  # early stopping on dev: the same weights as that θt, so its test numbers are θt's
        t = best["t"]
        models.append(TestModel("best", f"Best θt on dev ({model_name(t)})", unit(t), Path(checkpoints[t - 1])))
    expo = choice.get("expo")
    if expo is not None:
        a = expo["alpha"]
        models.append(TestModel("expo", f"ExPO (λ=0, α={a:g})", _full(merge_weights(T, 0.0, a)), lam=0.0, alpha=a))
    if T >= 2:
        u = (T - 1) / T
        models.append(TestModel("uniform", f"Uniform average θ1..θ{T}", _full(merge_weights(T, u, 0.0)), lam=u,
                                alpha=0.0))
    weights = _full(merge_weights(T, lam, alpha))
    name = f"Merged (λ={lam:g}, α={alpha:g})"
    models.append(TestModel("merged", name, weights, merged_dir) if merged_dir is not None
                  else TestModel("merged", name, weights, lam=lam, alpha=alpha))
    return models


def best_checkpoint(search_dir: str | os.PathLike, choice: dict[str, Any]) -> dict[str, Any] | None:
    """choice.json's best θt on dev; for a choice written before it recorded one, the same rule applied to the
    search's checkpoints.jsonl (None when that holds no θt ≥ 1)."""
    if "best_checkpoint" in choice:
        return choice["best_checkpoint"]
    stamp = {k: choice.get(k) for k in ("split", "eval_fingerprint")}
    records = {r["t"]: r for r in read_records(SearchLayout(Path(search_dir)).checkpoints)
               if all(r.get(k) == v for k, v in stamp.items())}
    if not any(t >= 1 for t in records):
        return None
    return select_checkpoint(list(records.values()), SelectionRule(**choice["rule"]))


def _same_model(a: TestModel, b: TestModel) -> bool:
    return all(abs(x - y) <= 1e-12 for x, y in zip(a.weights, b.weights))


def evaluate_test(ctx: SearchContext) -> list[dict[str, Any]]:
    """This process's share of the test table's models (``test_models``) that test.json does not hold yet, each
    evaluated once on the test split. A model equal to an earlier row (ExPO at α = 0 is θT) is not evaluated
    again: ``write_test`` copies that row's numbers. In-memory merges need ``mean_cache`` for T ≥ 3."""
    split = ctx.test_split
    record = _record(ctx.search_dir, ctx.eval_config, split)
    done = {m["t"] for m in record["models"]}
    models = test_models(ctx.search_dir, ctx.reference, ctx.checkpoints, ctx.merged_dir)
    distinct = [m for i, m in enumerate(models) if not any(_same_model(m, o) for o in models[:i])]
    todo = ctx.shard.take([m for m in distinct if m.key not in done])
    measured = _measured_elsewhere(ctx.search_dir, ctx.eval_config.fingerprint(), split)
    out = [{**measured[str(m.path)], "t": m.key, "name": m.name, "weights": list(m.weights),
            "reused_from": measured[str(m.path)]["reused_from"]} for m in todo if str(m.path) in measured]

    def set_weights(bench: Bench, m: TestModel) -> str:
        return bench.load(m.path) if m.path is not None else bench.merge(m.lam, m.alpha)

    def row(m: TestModel, metrics: dict[str, Any], seconds: dict[str, float]) -> dict[str, Any]:
        return {"t": m.key, "name": m.name, "path": None if m.path is None else str(m.path),
                "weights": list(m.weights), "metrics": metrics, "seconds": seconds}

    return out + evaluate_each(ctx, split, [m for m in todo if str(m.path) not in measured], set_weights, row,
                               desc=f"{split} evaluation")


def _measured_elsewhere(search_dir: Path, fingerprint: str, split: str) -> dict[str, dict[str, Any]]:
    """Checkpoints (θ0..θT, by path) already measured by the same evaluators on the same split in another search of
    this run (search_T3/ and search/ share θ0..θ3): their rows, so a checkpoint is tested once per run."""
    found: dict[str, dict[str, Any]] = {}
    for other in RunLayout(search_dir.parent).searches():
        if other.dir == search_dir or not other.test.exists():
            continue
        record = json.loads(other.test.read_text())
        if record.get("eval_fingerprint") != fingerprint or record.get("split") != split:
            continue
        for row in record.get("models", []):
            if isinstance(row.get("t"), int) and row.get("path") and row.get("same_as") is None:
                found.setdefault(row["path"], {**row, "reused_from": other.dir.name})
    return found


def write_test(ctx: SearchContext, parts: Sequence[Sequence[dict[str, Any]]]) -> dict[str, Any]:
    """test.json: what it held and the processes' new evaluations in the table's order (θ0, θ1..θT, best θt on dev,
    ExPO, uniform, merged; a row equal to an earlier one carries its numbers and ``same_as``), then ``paired``: the
    chosen merge against every other row, prompt by prompt (``maths.paired``), on each metric."""
    search_dir = ctx.search_dir
    record = _record(search_dir, ctx.eval_config, ctx.test_split)
    got = {m["t"]: m for m in record["models"]} | {m["t"]: m for part in parts for m in part}
    rows = []
    for m in test_models(search_dir, ctx.reference, ctx.checkpoints, ctx.merged_dir):
        twin = next((o for o in rows if _same_model(m, o[0])), None)
        if m.key in got and got[m.key].get("same_as") is None:
            rows.append((m, got[m.key]))
        elif twin is not None:
            rows.append((m, {**twin[1], "t": m.key, "name": m.name, "weights": list(m.weights),
                             "same_as": twin[1]["t"], "seconds": {}}))
    record["models"] = [row for _, row in rows]
    record["paired"] = paired_rows(record["models"])
    atomic_write_json(ctx.files.test, record)
    return record


def paired_rows(models: Sequence[dict[str, Any]], against: Any = "merged") -> list[dict[str, Any]]:
    """``against`` (the chosen merge) minus each other row, per metric that both hold per prompt: the paired
    difference with its 95% interval and p-value (exact McNemar for 0/1 scores, bootstrap otherwise)."""
    from itermerge.maths.paired import paired_difference

    a = next((m for m in models if m["t"] == against), None)
    if a is None:
        return []
    out = []
    for b in models:
        if b["t"] == against:
            continue
        metrics = {}
        for name, ma in a["metrics"].items():
            mb = b["metrics"].get(name, {})
            if ma.get("items") is not None and mb.get("items") is not None and len(ma["items"]) == len(mb["items"]):
                d = paired_difference(ma["items"], mb["items"])
                metrics[name] = {k: d[k] for k in ("difference", "ci_low", "ci_high", "stderr", "p_value", "n",
                                                   "method", "a_only", "b_only") if k in d}
        out.append({"a": a["t"], "b": b["t"], "b_name": b["name"], "metrics": metrics})
    return out


def run_paths(run_dir: str | os.PathLike, reference: str | os.PathLike | None = None) -> tuple[Path, list[Path]]:
    """θ0 (``reference``, else the manifest's ``reference``) and θ1..θT = iter_XX/model in order."""
    run_dir = Path(run_dir)
    checkpoints = RunLayout(run_dir).checkpoints()
    if not checkpoints:
        raise ItermergeError(f"{run_dir}: no iter_XX/model checkpoints; run `itermerge iterate` first")
    if reference is None:
        reference = Manifest(run_dir).data.get("reference")  # run_dir/manifest.json
    if reference is None:
        raise ItermergeError(f"{run_dir}/manifest.json names no reference θ0; pass it (--reference THETA0)")
    return Path(reference), checkpoints
