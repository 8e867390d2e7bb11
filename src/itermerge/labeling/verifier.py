"""A verifier scorer: any Python callable ``fn(prompt: Prompt, completion: str) -> float``, named by spec."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

from itermerge.callables import load_callable
from itermerge.errors import ItermergeError
from itermerge.records import Prompt

Verifier = Callable[[Prompt, str], float]


class VerifierScorer:
    """Scores each completion with ``fn``; a verifier that fails, or returns NaN or a non-number, is reported
    with the prompt id and the completion's position, since a silent bad score corrupts the pairs."""

    def __init__(self, fn: Verifier, name: str | None = None):
        if not callable(fn):
            raise ItermergeError(f"verifier {fn!r} is not callable; pass fn(prompt, completion) -> float")
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", repr(fn))

    @classmethod
    def from_spec(cls, spec: str) -> VerifierScorer:
        """``"package.module:function"`` (or ``module:Class.method``) → a scorer calling that function."""
        return cls(load_callable(spec), name=spec)

    def score(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(
                f"{len(prompts)} prompts for {len(completions)} completions; pass one prompt per completion"
            )
        scores, k_of = [], {}
        for i, (prompt, text) in enumerate(zip(prompts, completions)):
            k = k_of[prompt.id] = k_of.get(prompt.id, -1) + 1  # position among this prompt's completions
            where = f"verifier {self.name}: prompt {prompt.id!r}, completion {k} (batch item {i}, text {text!r:.60})"
            try:
                value = self.fn(prompt, text)
            except Exception as e:
                raise ItermergeError(f"{where}: raised {type(e).__name__}: {e}") from e
            if not isinstance(value, numbers.Real):
                raise ItermergeError(
                    f"{where}: returned {value!r:.60} ({type(value).__name__}); it must return a float"
                )
            value = float(value)
            if not math.isfinite(value):
                raise ItermergeError(f"{where}: returned {value}; it must return a finite float")
            scores.append(value)
        return scores
