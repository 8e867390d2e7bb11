"""Where a run's prompts come from: a built-in task, a JSONL file, an HF dataset directory, or RLHFlow's
iterative-prompt format; the training slices X_1..X_T and the dev/test prompts held out of a user's file.

A prompt row is one of ``{"prompt": "text"}``, ``{"messages": [chat]}`` or ``{"context_messages": [chat]}``
(RLHFlow's iterative-prompt sets, which the paper trained on), with optional ``id``, ``answer`` and ``meta``;
any other keys are kept in ``meta``, where a verifier can read them (test cases, a rubric, the source).

Held-out dev and test prompts: when the evaluation holds its prompts out of the training file (the default for a
user's file without ``prompts.dev_path`` / ``test_path``: ``evaluation.prompts.heldout_from``), ``n`` prompts
of it are held out for dev (and as many for test), chosen by a permutation seeded with
``stage_seed(seed, "prompts/heldout")``; the training slices X_t are then cut, in file order, from the rest,
so no dev or test prompt is ever trained on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from itermerge.config.evaluation import PromptSource
from itermerge.errors import ItermergeError
from itermerge.records import Message, Prompt, check_messages, json_lines
from itermerge.seeds import stage_seed

if TYPE_CHECKING:
    from itermerge.config import RunConfig

PROMPT_KEYS = ("prompt", "messages", "context_messages")
SOURCES = ("jsonl", "dataset")
HELDOUT_SPLITS = ("dev", "test")


def prompt_from_row(row: dict[str, Any], where: str, default_id: str) -> Prompt:
    """One prompt from a row of a prompt file or dataset; every problem names ``where`` (file and line or row)."""
    given = [k for k in PROMPT_KEYS if row.get(k) is not None]
    if len(given) != 1:
        raise ItermergeError(
            f'{where}: give exactly one of "prompt" (a string), "messages" or "context_messages" (a chat list); '
            f"found {given or sorted(row)}"
        )
    key = given[0]
    if key == "prompt":
        text = row["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise ItermergeError(f'{where}: "prompt" must be a non-empty string, got {text!r:.80}')
        messages: list[Message] = [{"role": "user", "content": text}]
    else:
        messages = check_messages(row[key], f'{where}: "{key}"')
    pid = row.get("id", default_id)
    if isinstance(pid, bool) or not isinstance(pid, (str, int)) or str(pid) == "":
        raise ItermergeError(f'{where}: "id" must be a non-empty string or an integer, got {pid!r}')
    answer = row.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        raise ItermergeError(f'{where}: "answer" must be a string or a number, got {answer!r:.80}')
    meta = row.get("meta") or {}
    if not isinstance(meta, dict):
        raise ItermergeError(f'{where}: "meta" must be an object, got {meta!r:.80}')
    extra = {k: v for k, v in row.items() if k not in (*PROMPT_KEYS, "id", "answer", "meta")}
    return Prompt(id=str(pid), messages=[dict(m) for m in messages], answer=answer, meta={**extra, **meta})


def _unique(prompts: Iterable[tuple[Prompt, str]], path: str | os.PathLike) -> list[Prompt]:
    seen: dict[str, str] = {}
    out = []
    for p, where in prompts:
        if p.id in seen:
            raise ItermergeError(f'{where}: "id" {p.id!r} already used at {seen[p.id]}; ids must be unique')
        seen[p.id] = where.removeprefix(f"{path} ")
        out.append(p)
    if not out:
        raise ItermergeError(f'{path}: no prompts in the file; write one JSON object a line, e.g. {{"prompt": "..."}}')
    return out


def read_prompts_jsonl(path: str | os.PathLike) -> list[Prompt]:
    """A user's prompt file, one JSON object a line (see the module doc); ids default to ``<file stem>-<line>``."""
    def rows() -> Iterable[tuple[Prompt, str]]:
        for lineno, obj in json_lines(path):
            where = f"{path} line {lineno}"
            if not isinstance(obj, dict):
                raise ItermergeError(f'{where}: expected an object like {{"prompt": "..."}}, got {obj!r:.80}')
            yield prompt_from_row(obj, where, f"{Path(path).stem}-{lineno}"), where

    return _unique(rows(), path)


def read_prompt_dataset(path: str | os.PathLike) -> list[Prompt]:
    """An HF ``datasets`` directory (``save_to_disk``); of a DatasetDict, its ``train`` split (or its only one)."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError as e:
        raise ItermergeError("prompts.source = dataset needs the datasets package: pip install datasets") from e
    if not Path(path).is_dir():
        raise ItermergeError(f"{path}: no such dataset directory (prompts.source: dataset reads a save_to_disk folder)")
    try:
        data = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise ItermergeError(f"{path}: not a dataset saved with save_to_disk ({e})") from e
    if isinstance(data, DatasetDict):
        if "train" not in data and len(data) != 1:
            raise ItermergeError(f"{path}: a DatasetDict with splits {sorted(data)} and no 'train'; save one split")
        data = data["train"] if "train" in data else next(iter(data.values()))
    rows = ((prompt_from_row(dict(row), f"{path} row {i}", f"{Path(path).name}-{i}"), f"{path} row {i}")
            for i, row in enumerate(data))
    return _unique(rows, path)


def read_prompts(path: str | os.PathLike, source: str = "jsonl") -> list[Prompt]:
    """The prompts of a JSONL file (``source="jsonl"``) or an HF dataset directory (``"dataset"``)."""
    if source not in SOURCES:
        raise ItermergeError(f"prompt source {source!r}: use one of {list(SOURCES)}")
    return read_prompts_jsonl(path) if source == "jsonl" else read_prompt_dataset(path)


def content_key(prompt: Prompt) -> str:
    """What makes two prompts the same prompt, whatever their ids: the conversation itself, each message's whitespace
    collapsed ("What is 2+2?" and "What is  2+2? " are one prompt)."""
    messages = [{**m, "content": " ".join(str(m.get("content", "")).split())} for m in prompt.messages]
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def text_groups(pool: Sequence[Prompt]) -> list[list[int]]:
    """The indices of ``pool`` grouped by ``content_key``, groups in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pool):
        groups.setdefault(content_key(p), []).append(i)
    return list(groups.values())


def duplicate_note(pool: Sequence[Prompt]) -> str | None:
    """One line for the user when ``pool`` repeats texts: how many, and what the held-out split does with them."""
    groups = text_groups(pool)
    if len(groups) == len(pool):
        return None
    repeated = sum(len(g) > 1 for g in groups)
    return (f"{len(pool)} prompts, {len(groups)} distinct texts: {repeated} texts appear more than once "
            f"({len(pool) - len(groups)} repeats); dev and test hold distinct texts out, each with every copy of it")


def heldout(
    pool: Sequence[Prompt], splits: Sequence[str], n: int, seed: int, test_n: int | None = None
) -> tuple[list[Prompt], dict[str, list[Prompt]]]:
    """(the training pool in file order, {split: its held-out prompts}) for each of ``splits`` (dev, test): n dev
    prompts and ``test_n`` (default n) test prompts.

    Identical texts (``content_key``) are one unit: a held-out text leaves the training pool with every copy of it,
    so no dev or test text is ever trained on, and a held-out split holds distinct texts (each its first copy in the
    file). The texts are chosen by a permutation seeded with ``stage_seed(seed, "prompts/heldout")``: dev takes its
    first n, test the next test_n; a split always gets the same prompts for the same file, sizes and seed, whichever
    other splits are held out (for a file without repeats, the permutation of its rows).
    """
    import numpy as np

    if not splits:
        return list(pool), {}
    groups = text_groups(pool)
    sizes = {"dev": n, "test": n if test_n is None else test_n}
    need = sum(sizes[s] for s in HELDOUT_SPLITS)
    if len(groups) <= need:
        repeats = f" ({len(pool)} rows with repeats)" if len(groups) < len(pool) else ""
        raise ItermergeError(
            f"{len(groups)} distinct prompts{repeats} cannot give {sizes['dev']} dev and {sizes['test']} test prompts "
            "held out of them and leave any to train on; add prompts, lower prompts.dev (or prompts.test), or give "
            "prompts.dev_path and prompts.test_path"
        )
    order = np.random.default_rng(stage_seed(seed, "prompts/heldout")).permutation(len(groups))
    picked, start = {}, 0
    for split in HELDOUT_SPLITS:
        picked[split] = [groups[int(g)] for g in order[start : start + sizes[split]]]
        start += sizes[split]
    out = {split: [pool[group[0]] for group in picked[split]] for split in splits}
    removed = {i for split in splits for group in picked[split] for i in group}
    return [p for i, p in enumerate(pool) if i not in removed], out


def training_pool(cfg: RunConfig) -> list[Prompt]:
    """The prompts iterations may train on, in file order: the file less the dev/test prompts the evaluation holds
    out of it (the evaluation's own ``heldout_from``, n and seed, so both sides agree by construction)."""
    pc, source = cfg.prompts, cfg.evaluation.prompts
    pool = read_prompts(pc.path, pc.source)
    if source.heldout_from is None or Path(source.heldout_from) != Path(pc.path):
        return pool
    held = [split for split in HELDOUT_SPLITS if split not in source.files]
    return heldout(pool, held, source.n, source.seed, test_n=source.test_n)[0]


def repeated_prompts_note(cfg: RunConfig) -> str | None:
    """``duplicate_note`` of the run's prompt file (None for a built-in task or a file without repeats)."""
    return None if cfg.prompts.source == "task" else duplicate_note(read_prompts(cfg.prompts.path, cfg.prompts.source))


def training_prompts(cfg: RunConfig, t: int) -> list[Prompt]:
    """X_t: the t-th disjoint slice of the training prompts (a built-in task's train split, or the user's file)."""
    n = cfg.prompts.per_iteration
    if cfg.prompts.source == "task":
        from itermerge.tasks import get_task

        task = get_task(cfg.prompts.task, **cfg.prompts.task_options)
        return task.prompts("train", n, seed=cfg.seed, offset=(t - 1) * n)
    pool = training_pool(cfg)
    if len(pool) < t * n:
        held = " after the dev and test prompts held out" if cfg.evaluation.prompts.heldout_from else ""
        raise ItermergeError(
            f"{cfg.prompts.path}: {len(pool)} prompts{held}, but iteration {t} needs prompts "
            f"{(t - 1) * n + 1}..{t * n} (prompts.per_iteration = {n}); add prompts or lower prompts.per_iteration"
        )
    return pool[(t - 1) * n : t * n]


def split_prompts(source: PromptSource, split: str) -> list[Prompt]:
    """The first ``source.n`` prompts of ``split`` (dev or test): from ``source.files[split]``, held out of
    ``source.heldout_from``, or from the built-in task's split."""
    n = source.test_n if split == "test" and source.test_n is not None else source.n
    if split in source.files:
        path = source.files[split]
        return read_prompts(path, "dataset" if Path(path).is_dir() else "jsonl")[:n]
    if source.heldout_from is not None and split in HELDOUT_SPLITS:
        held = [s for s in HELDOUT_SPLITS if s not in source.files]
        pool = read_prompts(source.heldout_from, source.heldout_source)
        return heldout(pool, held, source.n, source.seed, test_n=source.test_n)[1][split]
    if source.task is None:
        raise ItermergeError(
            f"eval.prompts: no prompts for split {split!r}; add files: {{{split}: PATH.jsonl}} or set a task"
        )
    from itermerge.tasks import get_task

    return get_task(source.task, **source.task_options).prompts(split, n, source.seed)
