"""A verifier scorer: any Python callable ``fn(prompt: Prompt, completion: str) -> float``, named by spec."""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable

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


def load_callable(spec: str) -> Callable:
    """Import ``"module:attr.path"`` and return the callable it names; every failure names the spec."""
    module_name, sep, attr_path = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not module_name or not attr_path:
        raise ItermergeError(
            f"verifier spec {spec!r}: write it as 'module:function', e.g. 'itermerge.tasks.arithmetic:score'"
        )
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Only the spec's own module missing is the user's typo; a missing dependency inside it is reported as such.
        if e.name and module_name.startswith(e.name):
            raise ItermergeError(f"verifier spec {spec!r}: no module named {module_name!r}; check the spelling "
                                 "and that it is importable (installed, or on PYTHONPATH)") from e
        raise ItermergeError(f"verifier spec {spec!r}: importing {module_name!r} failed: {e}") from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ItermergeError(f"verifier spec {spec!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ItermergeError(f"verifier spec {spec!r}: {attr_path!r} is a {type(obj).__name__}, not a function")
    return obj
