"""Task accuracy (correctness and answer format, kept apart) and mean reward of sampled replies."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from itermerge.config.evaluation import PromptSource
from itermerge.evaluation.metric import Metric, clustered_mean
from itermerge.labeling import Scorer
from itermerge.records import Prompt
from itermerge.tasks import Task, get_task

_BARE_NUMBER = re.compile(r"\s*-?\d+(?:\.\d+)?\s*\.?\s*")


def is_bare_number(prompt: Prompt, completion: str) -> bool:
    """The reply is just a number (``"42"``, ``" 42."``), as the arithmetic prompts ask; ``"It is 42"`` is not."""
    return _BARE_NUMBER.fullmatch(completion.replace("\u2212", "-")) is not None


def load_task(source: PromptSource) -> Task | None:
    return None if source.task is None else get_task(source.task, **source.task_options)


def format_check(task: Task) -> Callable[[Prompt, str], bool]:
    """The task's own ``follows_format(prompt, completion)`` if it has one, else "the reply is a bare number"."""
    return getattr(task, "follows_format", is_bare_number)


def task_accuracy(task: Task, prompts: Sequence[Prompt], completions: Sequence[Sequence[str]]) -> dict[str, Metric]:
    """``accuracy`` and ``format`` of a built-in task's replies (``accuracy_metrics`` with its checks)."""
    return accuracy_metrics(task.is_correct, format_check(task), prompts, completions)


def accuracy_metrics(
    is_correct: Callable[[Prompt, str], bool], follows_format: Callable[[Prompt, str], bool] | None,
    prompts: Sequence[Prompt], completions: Sequence[Sequence[str]],
) -> dict[str, Metric]:
    """``accuracy``: fraction of replies ``is_correct`` accepts; ``format``: fraction in the asked format (when
    there is a format check).

    Both are means over prompts of the per-prompt fraction (one reply per prompt when greedy). Correctness
    ignores format (the arithmetic verifier reads the last number), so a gain in ``accuracy`` with ``format``
    flat is a gain in arithmetic, not in answering tersely.
    """
    _check_lengths(prompts, completions)
    def rate(check: Callable[[Prompt, str], bool]) -> Metric:
        return clustered_mean([[float(check(p, c)) for c in cs] for p, cs in zip(prompts, completions)])

    return {"accuracy": rate(is_correct), **({"format": rate(follows_format)} if follows_format is not None else {})}


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
