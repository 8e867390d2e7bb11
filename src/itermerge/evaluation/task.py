"""Task accuracy (correctness and answer format, kept apart) and mean reward of sampled replies."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from itermerge.config.evaluation import PromptSource
from itermerge.errors import ItermergeError
from itermerge.evaluation.metric import Metric, clustered_mean
from itermerge.labeling import Scorer
from itermerge.records import Prompt, read_prompts_jsonl
from itermerge.tasks import Task, get_task

_BARE_NUMBER = re.compile(r"\s*-?\d+(?:\.\d+)?\s*\.?\s*")


def is_bare_number(prompt: Prompt, completion: str) -> bool:
    """The reply is just a number (``"42"``, ``" 42."``), as the arithmetic prompts ask; ``"It is 42"`` is not."""
    return _BARE_NUMBER.fullmatch(completion.replace("\u2212", "-")) is not None


def load_task(source: PromptSource) -> Task | None:
    return None if source.task is None else get_task(source.task, **source.task_options)


def load_prompts(source: PromptSource, split: str) -> list[Prompt]:
    """The first ``source.n`` prompts of ``split``: from ``source.files[split]`` if given, else the task."""
    if split in source.files:
        return read_prompts_jsonl(source.files[split])[: source.n]
    if source.task is None:
        raise ItermergeError(
            f"eval.prompts: no prompts for split {split!r}; add files: {{{split}: PATH.jsonl}} or set a task"
        )
    return load_task(source).prompts(split, source.n, source.seed)


def format_check(task: Task) -> Callable[[Prompt, str], bool]:
    """The task's own ``follows_format(prompt, completion)`` if it has one, else "the reply is a bare number"."""
    return getattr(task, "follows_format", is_bare_number)


def task_accuracy(task: Task, prompts: Sequence[Prompt], completions: Sequence[Sequence[str]]) -> dict[str, Metric]:
    """``accuracy``: fraction of replies the verifier marks correct; ``format``: fraction in the asked format.

    Both are means over prompts of the per-prompt fraction (one reply per prompt when greedy). Correctness
    ignores format (the arithmetic verifier reads the last number), so a gain in ``accuracy`` with ``format``
    flat is a gain in arithmetic, not in answering tersely.
    """
    _check_lengths(prompts, completions)
    follows = format_check(task)
    correct = [[float(task.is_correct(p, c)) for c in cs] for p, cs in zip(prompts, completions)]
    formatted = [[float(follows(p, c)) for c in cs] for p, cs in zip(prompts, completions)]
    return {"accuracy": clustered_mean(correct), "format": clustered_mean(formatted)}


def mean_reward(scorer: Scorer, prompts: Sequence[Prompt], completions: Sequence[Sequence[str]]) -> Metric:
    """The paper's "average reward" (§4.2): mean over prompts of the mean score of their replies."""
    _check_lengths(prompts, completions)
    flat_prompts = [p for p, cs in zip(prompts, completions) for _ in cs]
    scores = scorer.score(flat_prompts, [c for cs in completions for c in cs])
    groups, i = [], 0
    for cs in completions:
        groups.append(scores[i : i + len(cs)])
        i += len(cs)
    return clustered_mean(groups)


def _check_lengths(prompts: Sequence[Prompt], completions: Sequence[Sequence[str]]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completion lists; pass one list per prompt")
