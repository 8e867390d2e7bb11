"""Built-in verifiable task: small sums and differences asked as a user would, graded by the last number.

Sized for SmolLM2-135M-Instruct on a CPU: with operands in 2..30 the model answers some right and many
wrong, so best-vs-worst pairs at K=4 rarely tie. Problems (a, op, b) are hash-partitioned into disjoint
train/dev/test splits. Two criteria, both verifier callables ``fn(prompt, completion) -> float``:

- ``itermerge.tasks.arithmetic:score``   correctness, graded (the main reward);
- ``itermerge.tasks.arithmetic:brevity`` shorter is better (the second criterion of the λ study, §4.1.2).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass

from itermerge.errors import ItermergeError
from itermerge.records import Prompt

SPLITS = ("train", "dev", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, dev, test share of the (a, op, b) space
OPS = ("+", "-")
TEMPLATES = (
    "What is {a} {op} {b}? Reply with just the number.",
    "What is {a} {op} {b}? Answer with only the number.",
    "Compute {a} {op} {b}. Reply with just the number.",
    "How much is {a} {op} {b}? Reply with just the number.",
)

# score(): correct 1; wrong -min(relative error, 1) in [-1, 0); no number -1.5; then minus a length term
# capped at 0.25, so length breaks ties inside a grade but never lifts a wrong answer above a right one.
CORRECT, NO_NUMBER = 1.0, -1.5
LENGTH_COST_PER_CHAR, LENGTH_COST_CAP = 0.001, 0.25
BREVITY_CHARS = 100.0  # brevity() = -len(completion) / BREVITY_CHARS

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (``"17 + 25 = 42."`` → 42.0), or None when there is none."""
    found = _NUMBER.findall(text.replace("\u2212", "-").replace(",", ""))
    return float(found[-1]) if found else None


def expected_answer(prompt: Prompt) -> float:
    """The prompt's reference answer as a number; verifiers need one."""
    if prompt.answer is None:
        raise ItermergeError(
            f"prompt {prompt.id!r} has no answer; the arithmetic verifier needs one (add \"answer\" to the prompt file)"
        )
    try:
        value = float(prompt.answer)
    except (TypeError, ValueError) as e:
        raise ItermergeError(f"prompt {prompt.id!r}: answer {prompt.answer!r} is not a number") from e
    if not math.isfinite(value):
        raise ItermergeError(f"prompt {prompt.id!r}: answer {prompt.answer!r} is not a finite number")
    return value


def is_correct(prompt: Prompt, completion: str) -> bool:
    """True when the last number of the reply equals the answer."""
    got = last_number(completion)
    return got is not None and math.isclose(got, expected_answer(prompt), abs_tol=1e-9)


def score(prompt: Prompt, completion: str) -> float:
    """Graded correctness: 1 if right, -min(|got - y| / max(|y|, 1), 1) if wrong, -1.5 if no number,
    minus 0.001 per character (at most 0.25). E.g. y=42: "42" → 0.998, "40" → -2/42 - 0.002 ≈ -0.0496, "" → -1.5.
    """
    answer = expected_answer(prompt)
    got = last_number(completion)
    if got is None:
        grade = NO_NUMBER
    elif math.isclose(got, answer, abs_tol=1e-9):
        grade = CORRECT
    else:
        grade = -min(abs(got - answer) / max(abs(answer), 1.0), 1.0)
    return grade - min(LENGTH_COST_PER_CHAR * len(completion), LENGTH_COST_CAP)


def brevity(prompt: Prompt, completion: str) -> float:
    """Shorter is better: -len(completion) / 100 characters (``"42"`` → -0.02). Ignores correctness."""
    return -len(completion) / BREVITY_CHARS


def problem_id(a: int, op: str, b: int) -> str:
    return f"arith-{a}{op}{b}"


def _hash_unit(key: str) -> float:
    """A stable number in [0, 1) per key (Python's hash() is salted per process, so not usable here)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def hash_split(key: str) -> str:
    """The split ``key`` belongs to (train 80%, dev 10%, test 10%), fixed by a hash of it: disjoint whatever the
    seed, the same on every machine."""
    u, edge = _hash_unit(key), 0.0
    for split, fraction in zip(SPLITS, SPLIT_FRACTIONS):
        edge += fraction
        if u < edge:
            return split
    return SPLITS[-1]


def split_of(a: int, op: str, b: int) -> str:
    """The split a problem belongs to, fixed by a hash of (a, op, b)."""
    return hash_split(problem_id(a, op, b))


def make_prompt(a: int, op: str, b: int, split: str) -> Prompt:
    """One problem as a user would ask it; the phrasing is fixed per problem, so ids map to one text."""
    template = TEMPLATES[int(_hash_unit("template:" + problem_id(a, op, b)) * len(TEMPLATES))]
    answer = a + b if op == "+" else a - b
    return Prompt(
        id=problem_id(a, op, b),
        messages=[{"role": "user", "content": template.format(a=a, op=op, b=b)}],
        answer=answer,
        meta={"task": "arithmetic", "a": a, "op": op, "b": b, "split": split},
    )


@dataclass(frozen=True)
class ArithmeticTask:
    """``a op b`` with a, b in [low, high]; subtraction keeps a >= b so answers are never negative."""

    low: int = 2
    high: int = 30
    ops: tuple[str, ...] = OPS
    name: str = "arithmetic"

    def __post_init__(self) -> None:
        if not (isinstance(self.low, int) and isinstance(self.high, int)) or not 0 <= self.low <= self.high:
            raise ItermergeError(
                f"arithmetic task: low={self.low!r}, high={self.high!r}; need integers 0 <= low <= high"
            )
        bad = [op for op in self.ops if op not in OPS] or ([] if self.ops else ["(none)"])
        if bad:
            raise ItermergeError(f"arithmetic task: ops {bad} not supported; choose from {list(OPS)}")
        object.__setattr__(self, "ops", tuple(self.ops))

    @property
    def criteria(self) -> dict[str, str]:
        """Verifier specs by criterion name, for ``VerifierScorer.from_spec``."""
        return {"score": f"{__name__}:score", "brevity": f"{__name__}:brevity"}

    def problems(self, split: str) -> list[tuple[int, str, int]]:
        """All (a, op, b) of one split, in a fixed order."""
        if split not in SPLITS:
            raise ItermergeError(f"split {split!r}: the arithmetic task has splits {list(SPLITS)}")
        r = range(self.low, self.high + 1)
        every = [(a, op, b) for op in self.ops for a in r for b in r if op == "+" or a >= b]
        return [p for p in every if split_of(*p) == split]

    def prompts(self, split: str, n: int, seed: int, offset: int = 0) -> list[Prompt]:
        """``n`` prompts of ``split``: the split shuffled by ``seed``, then items [offset, offset + n).

        Same seed, offsets 0, n, 2n, … give disjoint prompt sets (one per iteration); a different seed
        gives another order of the same split.
        """
        pool = self.problems(split)
        if n < 1 or offset < 0:
            raise ItermergeError(f"arithmetic task: n={n}, offset={offset}; need n >= 1 and offset >= 0")
        if offset + n > len(pool):
            raise ItermergeError(
                f"arithmetic task: asked for {n} {split} prompts from offset {offset}, but the split has "
                f"{len(pool)} (operands {self.low}..{self.high}, ops {list(self.ops)}); ask for fewer or widen "
                "the operand range"
            )
        random.Random(seed).shuffle(pool)
        return [make_prompt(a, op, b, split) for a, op, b in pool[offset : offset + n]]

    def score(self, prompt: Prompt, completion: str) -> float:
        return score(prompt, completion)

    def is_correct(self, prompt: Prompt, completion: str) -> bool:
        return is_correct(prompt, completion)
