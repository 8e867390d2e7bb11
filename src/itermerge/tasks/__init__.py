"""Built-in tasks: prompt generators with disjoint train/dev/test splits and their verifiers."""

from __future__ import annotations

from typing import Any, Protocol

from itermerge.errors import ItermergeError
from itermerge.records import Prompt


class Task(Protocol):
    """A verifiable task: prompts per split, a graded score, and a pass/fail check."""

    name: str

    def prompts(self, split: str, n: int, seed: int, offset: int = 0) -> list[Prompt]: ...

    def score(self, prompt: Prompt, completion: str) -> float: ...

    def is_correct(self, prompt: Prompt, completion: str) -> bool: ...


def get_task(name: str, **options: Any) -> Task:
    """The built-in task called ``name``; ``options`` go to its constructor (e.g. ``low=2, high=30``)."""
    from itermerge.tasks.arithmetic import ArithmeticTask

    known: dict[str, type] = {"arithmetic": ArithmeticTask}
    if name not in known:
        raise ItermergeError(f"task {name!r} is not built in; known tasks: {sorted(known)}")
    try:
        return known[name](**options)
    except TypeError as e:
        raise ItermergeError(f"task {name!r}: bad options {sorted(options)} ({e})") from e
