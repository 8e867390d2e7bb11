"""The lm-eval-harness bridge (extra ``eval``): benchmarks on a checkpoint path or an in-memory model.

The paper (appendix D) runs lm-eval-harness with: MMLU 5-shot, TruthfulQA 0-shot, ARC 25-shot,
HellaSwag 10-shot, GSM8K 5-shot chain-of-thought; the chat template on every benchmark except
HellaSwag; top-1 accuracy, normalised accuracy for HellaSwag, flexible-extract exact match for GSM8K.
``PRESETS["paper"]`` is that list; it downloads the datasets, so it runs only where the Hub is reachable.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from itermerge.config.evaluation import PRESETS, LmEvalConfig, LmEvalTask
from itermerge.errors import ItermergeError
from itermerge.evaluation.evaluators.base import Pass, Spec
from itermerge.evaluation.metric import Metric

INSTALL_HINT = "pip install 'itermerge[eval]'"

def require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as e:
        raise ItermergeError(
            f"the lm-eval evaluator needs lm-eval-harness, which is not installed: {INSTALL_HINT}"
        ) from e
    return lm_eval


def resolve_tasks(config: LmEvalConfig) -> tuple[LmEvalTask, ...]:
    """The preset's tasks followed by the explicit ones."""
    if config.preset is not None and config.preset not in PRESETS:
        raise ItermergeError(f"eval.lm_eval.preset = {config.preset!r}: known presets are {sorted(PRESETS)}")
    return (PRESETS[config.preset] if config.preset else ()) + tuple(config.tasks)


def run_lm_eval(
    model: Any,
    tasks: Sequence[LmEvalTask],
    tokenizer: Any = None,
    *,
    include_path: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    fewshot_as_multiturn: bool = False,
    device: str | None = None,
    split: str | None = None,
) -> dict[str, Metric]:
    """``{"lm_eval/<task>": Metric, ..., "lm_eval/average": Metric}`` for ``model`` (a path or a loaded HF model).

    Each task runs in its own ``simple_evaluate`` call because few-shot count and chat template are
    per task. The average is the unweighted mean over tasks (Table 2's "Avg"), its standard error
    √(Σ se²) / k treating the tasks as independent. ``split`` "dev" or "test": only that half of each
    benchmark's documents (``document_split``), the first ``limit`` of them; None: every document.
    Each task's Metric keeps its per-document values (``items``, in document order) for paired comparisons.
    """
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if not tasks:
        raise ItermergeError("run_lm_eval: no tasks given; name lm-eval tasks or use the 'paper' preset")
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).exists():
            raise ItermergeError(f"lm-eval model {model}: no such checkpoint directory")
        import torch

        lm = HFLM(pretrained=str(model), tokenizer=tokenizer, batch_size=batch_size, dtype="float32",
                  device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    else:
        if tokenizer is None:
            raise ItermergeError("run_lm_eval: an in-memory model needs its tokenizer; pass tokenizer=")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = _task_manager(tuple(t.name for t in tasks), None if include_path is None else str(include_path))

    out: dict[str, Metric] = {}
    for task in tasks:
        samples = None
        if split is not None:
            samples = {name: ids[:limit] if limit is not None else ids
                       for name, ids in document_split(task.name, manager, split).items()}
        with _quiet():
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=[task.name],
                num_fewshot=task.num_fewshot,
                limit=limit if samples is None else None,
                samples=samples,
                task_manager=manager,
                apply_chat_template=task.chat_template,
                fewshot_as_multiturn=fewshot_as_multiturn and task.chat_template,
                log_samples=True,
                bootstrap_iters=1000,
            )
        out[f"lm_eval/{task.name}"] = task_metric(results, task)
    values = [m for k, m in out.items()]
    stderr = (
        None if any(m.stderr is None for m in values) else math.sqrt(sum(m.stderr**2 for m in values)) / len(values)
    )
    out["lm_eval/average"] = Metric(sum(m.value for m in values) / len(values), stderr, sum(m.n for m in values))
    return out


def task_metric(results: dict[str, Any], task: LmEvalTask) -> Metric:
    """The task's ``metric,filter`` entry of lm-eval's results, with its stderr and document count."""
    key = f"{task.metric},{task.filter}"
    row = results.get("results", {}).get(task.name, {})
    if key not in row:
        found = sorted(k for k in row if "stderr" not in k and "," in k)
        raise ItermergeError(
            f"lm-eval task {task.name!r} reported no {key!r}; it reported {found}. Set metric/filter of this "
            "task to one of those"
        )
    stderr = row.get(f"{task.metric}_stderr,{task.filter}")
    stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
    # A group (mmlu) has no n-samples entry of its own; this call ran only its subtasks, so sum them.
    counts = results.get("n-samples", {})
    n = counts[task.name]["effective"] if task.name in counts else sum(c["effective"] for c in counts.values())
    return Metric(float(row[key]), stderr, int(n), _items(results, task, int(n)))


def _items(results: dict[str, Any], task: LmEvalTask, n: int) -> tuple[float, ...] | None:
    """Each document's value of the task's metric (leaf tasks by name, documents by id), or None if not logged."""
    values = []
    for name in sorted(results.get("samples") or {}):
        for sample in sorted(results["samples"][name], key=lambda s: s.get("doc_id", 0)):
            if sample.get("filter", task.filter) == task.filter and isinstance(sample.get(task.metric), (int, float)):
                values.append(float(sample[task.metric]))
    return tuple(values) if len(values) == n else None


def document_split(name: str, manager: Any, split: str) -> dict[str, list[int]]:
    """{leaf task: its document indices in ``split``} for a task or group: each document of a benchmark's
    evaluation split goes to dev or test by a hash of (task name, index), about half each, the same on every
    machine and for every model; the two halves never share a document."""
    import hashlib

    from lm_eval.tasks import get_task_dict

    if split not in ("dev", "test"):
        raise ItermergeError(f"lm-eval document split {split!r}: use dev or test")

    def leaves(tree: Any) -> list[Any]:
        return [t for v in tree.values() for t in (leaves(v) if isinstance(v, dict) else [v])]

    out = {}
    for task in leaves(get_task_dict([name], manager)):
        task_name = task.config.task
        ids = range(len(task.eval_docs))
        out[task_name] = [i for i in ids
                          if ("dev" if hashlib.sha256(f"{task_name}:{i}".encode()).digest()[0] < 128 else "test")
                          == split]
    return out


@functools.lru_cache(maxsize=4)
def _task_manager(names: tuple[str, ...], include: str | None) -> Any:
    """Index only the local task directory when it holds every task: indexing lm-eval's own YAMLs takes
    tens of seconds, so it is done once per process (the search evaluates many points)."""
    from lm_eval.tasks import TaskManager

    if include is not None:
        local = TaskManager(include_path=include, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    manager = TaskManager(include_path=include)
    missing = [n for n in names if n not in manager.all_tasks]
    if missing:
        where = f" or in {include}" if include else ""
        raise ItermergeError(
            f"lm-eval task(s) {missing} not found among lm-eval's tasks{where}; check the names "
            "(lm-eval --tasks list) or set eval.lm_eval.include_path to the directory of your task YAMLs"
        )
    return manager


@contextlib.contextmanager
def _quiet():
    """lm-eval logs every request at INFO; keep our progress output readable."""
    import logging

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _measure(run: Pass) -> dict[str, Metric]:
    lm, ev = run.config.lm_eval, run.evaluator
    return run_lm_eval(run.model, resolve_tasks(lm), ev.tokenizer, include_path=lm.include_path, limit=lm.limit,
                       batch_size=lm.batch_size, fewshot_as_multiturn=lm.fewshot_as_multiturn,
                       split=ev.split if lm.split_documents else None)


SPEC = Spec(
    name="lm_eval", summary="lm-eval-harness benchmarks (a preset or tasks) on the model in memory",
    reports="`lm_eval/TASK` per task and `lm_eval/average`", measure=_measure,
    no_subset=lambda ev: ("evaluation.lm_eval measures benchmark documents, not the split's prompts, so it "
                          "cannot be evaluated on a prompt subset; use search.method: grid with lm_eval"),
)
