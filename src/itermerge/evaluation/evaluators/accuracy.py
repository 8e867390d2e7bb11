"""``evaluation.accuracy``: task accuracy and answer format, kept apart, of greedy (or sampled) replies."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from itermerge.callables import load_callable
from itermerge.evaluation.evaluators.base import Pass, Spec, one_list_per_prompt
from itermerge.evaluation.metric import Metric, clustered_mean
from itermerge.records import Prompt
from itermerge.tasks import Task

if TYPE_CHECKING:
    from itermerge.evaluation.suite import Evaluator

_BARE_NUMBER = re.compile(r"\s*-?\d+(?:\.\d+)?\s*\.?\s*")


def is_bare_number(prompt: Prompt, completion: str) -> bool:
    """The reply is just a number (``"42"``, ``" 42."``), as the arithmetic prompts ask; ``"It is 42"`` is not."""
    return _BARE_NUMBER.fullmatch(completion.replace("\u2212", "-")) is not None


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
    one_list_per_prompt(prompts, completions)
    def rate(check: Callable[[Prompt, str], bool]) -> Metric:
        return clustered_mean([[float(check(p, c)) for c in cs] for p, cs in zip(prompts, completions)])

    return {"accuracy": rate(is_correct), **({"format": rate(follows_format)} if follows_format is not None else {})}


def checks(evaluator: Evaluator) -> tuple[Callable[[Prompt, str], bool], Callable[[Prompt, str], bool] | None]:
    """What decides a correct reply (the configured verifier, a threshold on the reward scorer's score, or the
    task's verifier) and the answer-format check (configured, or the task's; none for a user's task)."""
    acc, task = evaluator.config.accuracy, evaluator.task
    if acc.verifier is not None:
        is_correct = load_callable(acc.verifier)
    elif acc.threshold is not None:
        def is_correct(prompt: Prompt, completion: str) -> bool:
            return evaluator.scorer.score([prompt], [completion])[0] >= acc.threshold
    else:
        is_correct = task.is_correct
    if acc.format is not None:
        return is_correct, load_callable(acc.format)
    return is_correct, format_check(task) if task is not None else None


def _measure(run: Pass) -> dict[str, Metric]:
    acc = run.config.accuracy
    is_correct, follows_format = run.state
    return accuracy_metrics(is_correct, follows_format, run.evaluator.prompts, run.texts(acc.sampling, acc.samples))


SPEC = Spec(
    name="accuracy", summary="the task's verifier (or evaluation.accuracy.verifier / threshold) on each reply",
    reports="`accuracy`, and `format` where there is a format check", measure=_measure,
    metrics=("accuracy", "format"), prepare=checks,
    samples=lambda acc: [(acc.sampling, acc.samples)],
)
