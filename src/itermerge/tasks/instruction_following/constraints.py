"""IFEval's constraints on our base instructions: sampled with IFEval's own registry, checked by its own rules."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from itermerge.errors import ItermergeError
from itermerge.records import Prompt
from itermerge.tasks.instruction_following.offline import INSTALL_HINT, offline_nltk
from itermerge.tasks.instruction_following.templates import SPLITS, base_instructions

MAX_CONSTRAINTS = 3
REPEAT_PROMPT = "combination:repeat_prompt"  # its argument is the request itself, not sampled


@functools.lru_cache(maxsize=1)
def registry() -> tuple[dict[str, Any], dict[str, set[str]]]:
    """IFEval's checker classes by instruction id, and which ids conflict (made symmetric, as IFEval does)."""
    offline_nltk()
    try:
        from if_verifiable.ifeval import instructions_registry as reg
    except ImportError as e:
        raise ItermergeError(f"the instruction-following task needs if-verifiable: {INSTALL_HINT}") from e
    conflicts = {k: set(v) for k, v in reg.INSTRUCTION_CONFLICTS.items()}
    return dict(reg.INSTRUCTION_DICT), reg.conflict_make(conflicts)


@contextlib.contextmanager
def seeded_random(key: str) -> Iterator[None]:
    """IFEval's checkers draw their arguments from the global ``random``; seed it by ``key``, then restore it."""
    state = random.getstate()
    random.seed(hashlib.sha256(key.encode()).hexdigest())
    try:
        yield
    finally:
        random.setstate(state)


def sample_constraints(base: str, key: str) -> tuple[list[str], list[dict[str, Any]], list[str]]:
    """1-3 non-conflicting IFEval constraints for ``base``, their arguments as IFEval's ``build_description`` samples
    them, and their descriptions; the same ``key`` gives the same draw on every machine."""
    checkers, conflicts = registry()
    ids: list[str] = []
    kwargs: list[dict[str, Any]] = []
    texts: list[str] = []
    with seeded_random(key):
        count = random.randint(1, MAX_CONSTRAINTS)
        while len(ids) < count:
            free = sorted(i for i in checkers if not any(i in conflicts[j] or j in conflicts[i] for j in ids))
            if not free:
                break
            chosen = random.choice(free)
            checker = checkers[chosen](chosen)
            texts.append(checker.build_description(prompt_to_repeat=base) if chosen == REPEAT_PROMPT
                         else checker.build_description())
            ids.append(chosen)
            kwargs.append({k: v for k, v in (checker.get_instruction_args() or {}).items() if v is not None})
    return ids, kwargs, texts


def make_row(base: str, split: str) -> dict[str, Any]:
    """One prompt row: the base instruction, then its constraints' descriptions (IFEval's wording)."""
    key = hashlib.sha256(base.encode()).hexdigest()[:12]
    ids, kwargs, texts = sample_constraints(base, f"constraints:{key}")
    return {"id": f"if-{split}-{key}", "prompt": " ".join([base, *texts]), "base": base, "split": split,
            "instruction_id_list": ids, "kwargs": kwargs}


def rows(split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` rows of ``split``: its base instructions shuffled by ``seed``, the first ``n``."""
    if split not in SPLITS:
        raise ItermergeError(f"split {split!r}: the instruction-following task has splits {list(SPLITS)}")
    pool = base_instructions(split)
    if not 1 <= n <= len(pool):
        raise ItermergeError(f"instruction-following task: asked for {n} {split} prompts; the split has "
                             f"{len(pool)} base instructions; ask for 1..{len(pool)}")
    random.Random(seed).shuffle(pool)
    return [make_row(base, split) for base in pool[:n]]


def write_splits(out_dir: str | Path, counts: dict[str, int], seed: int = 0) -> dict[str, Path]:
    """``OUT/{train,dev,test}.jsonl`` with ``counts[split]`` rows each; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in counts.items():
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows(split, n, seed)), encoding="utf-8")
    return paths


def judge(prompt: Prompt, completion: str) -> tuple[list[Any], Any]:
    """IFEval's strict and loose verdicts on one reply, per constraint and pooled
    (``if_verifiable.common.evaluate_instructions``: the reply as written, and for loose also without its first
    and/or last line and without asterisks)."""
    from if_verifiable.common import evaluate_instructions

    ids, kwargs = prompt.meta.get("instruction_id_list"), prompt.meta.get("kwargs")
    if not ids or not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise ItermergeError(f"prompt {prompt.id!r}: needs 'instruction_id_list' and a 'kwargs' list of the same "
                             "length (write the prompts with python -m itermerge.tasks.instruction_following)")
    checkers, _ = registry()
    unknown = [i for i in ids if i not in checkers]
    if unknown:
        raise ItermergeError(f"prompt {prompt.id!r}: instruction ids {unknown} are not IFEval's; known: "
                             f"{sorted(checkers)}")
    text = prompt.messages[-1]["content"] if prompt.messages else ""
    return evaluate_instructions(completion, ids, kwargs, text, checkers)


def evaluate(prompt: Prompt, completion: str) -> Any:
    """The pooled verdicts (``partial_loose``, ``binary_strict``, …) of ``judge``."""
    return judge(prompt, completion)[1]


def ifeval_metrics(prompts: Sequence[Prompt], completions: Sequence[str]) -> dict[str, list[float]]:
    """IFEval's four numbers: prompt-level strict/loose (one value per prompt: all its constraints met) and
    instruction-level strict/loose (one value per constraint, pooled over prompts as IFEval pools them). An empty
    reply meets no constraint."""
    out: dict[str, list[float]] = {"prompt_strict": [], "prompt_loose": [], "inst_strict": [], "inst_loose": []}
    for prompt, completion in zip(prompts, completions, strict=True):
        results, _ = judge(prompt, completion)
        empty = [0.0] * len(prompt.meta["instruction_id_list"])
        strict = [float(r.strict_pass) for r in results] or empty
        loose = [float(r.loose_pass) for r in results] or empty
        out["prompt_strict"].append(float(all(strict)))
        out["prompt_loose"].append(float(all(loose)))
        out["inst_strict"] += strict
        out["inst_loose"] += loose
    return out
