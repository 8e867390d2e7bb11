"""The records that flow between stages (prompts, completions, preference pairs) and their JSONL files."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

from itermerge.errors import ItermergeError
from itermerge.rundir import atomic_write_text

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
Answer = str | int | float


@dataclass(frozen=True)
class Prompt:
    """One prompt: a chat conversation ending in a user turn, and (for verifiable tasks) its answer."""

    id: str
    messages: list[Message]
    answer: Answer | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Completion:
    """One sampled reply; ``index`` is k in 0..K-1 among the prompt's samples, ``scores`` one per criterion."""

    prompt_id: str
    index: int
    text: str
    token_ids: list[int]
    finished: bool
    score: float | None = None
    scores: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PreferencePair:
    """A row of D_t (Alg. 1): chosen y_w and rejected y_l for prompt x, with θ0's log-probs once computed."""

    prompt_id: str
    messages: list[Message]
    prompt_ids: list[int]
    chosen: str
    rejected: str
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_score: float
    rejected_score: float
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None


@dataclass(frozen=True)
class ReferenceLogprobs:
    """log π_θ0 of one pair's chosen and rejected completion (Alg. 1's fixed reference), computed once."""

    prompt_id: str
    ref_chosen_logp: float
    ref_rejected_logp: float


Record = TypeVar("Record", Prompt, Completion, PreferencePair, ReferenceLogprobs)

# Fields that must not be empty when read back: an empty one means the stage that wrote it is broken
# or the file was edited, and training on it would fail much later with a shape error.
_NON_EMPTY: dict[type, tuple[str, ...]] = {
    Prompt: ("id", "messages"),
    Completion: ("prompt_id",),
    PreferencePair: ("prompt_id", "messages", "prompt_ids", "chosen_ids", "rejected_ids"),
    ReferenceLogprobs: ("prompt_id",),
}
_ROLES = ("system", "user", "assistant")


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
    """Write dataclass records one JSON object a line, atomically (readers never see half a file)."""
    lines = [json.dumps(dataclasses.asdict(r), ensure_ascii=False, allow_nan=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_jsonl(path: str | os.PathLike, cls: type[Record]) -> list[Record]:
    """Read records of type ``cls``; every problem is reported as ``FILE line N: …``. Blank lines are skipped."""
    out = []
    for lineno, obj in json_lines(path):
        where = f"{path} line {lineno}"
        if not isinstance(obj, dict):
            raise ItermergeError(f"{where}: expected a JSON object with the fields of {cls.__name__}, got {obj!r:.80}")
        out.append(_from_dict(cls, obj, where))
    return out


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The objects of a JSONL file that is appended to as work finishes (search points, per-prompt results);
    none if it does not exist. A torn last line (a crash mid-write) is cut off the file, so the work is redone."""
    p = Path(path)
    if not p.exists():
        return []
    text = p.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        p.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    records = []
    for lineno, obj in json_lines(p, hint="; delete that line to redo it"):
        if not isinstance(obj, dict):
            raise ItermergeError(
                f"{path} line {lineno}: expected a JSON object, got {obj!r:.80}; delete that line to redo it"
            )
        records.append(obj)
    return records


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON object as a line and flush it to disk (``read_records`` cuts a torn last line)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def json_lines(path: str | os.PathLike, hint: str = "") -> Iterable[tuple[int, Any]]:
    """Yield (1-based line number, parsed object) for each non-blank line."""
    p = Path(path)
    if not p.is_file():
        raise ItermergeError(f"{path}: file not found; check the path")
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ItermergeError(f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno}){hint}") from e


def _from_dict(cls: type[Record], obj: dict[str, Any], where: str) -> Record:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(obj) - set(fields))
    if unknown:
        raise ItermergeError(f"{where}: unknown field(s) {unknown} for {cls.__name__}; known: {list(fields)}")
    required = [
        n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [n for n in required if n not in obj]
    if missing:
        raise ItermergeError(f"{where}: missing field(s) {missing} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    for name, value in obj.items():
        _check_type(value, hints[name], f'{where}: "{name}"')
    for name in _NON_EMPTY[cls]:
        if name in obj and len(obj[name]) == 0:
            raise ItermergeError(f'{where}: "{name}" is empty')
    if "messages" in obj:
        check_messages(obj["messages"], f'{where}: "messages"')
    return cls(**obj)


def _check_type(value: Any, hint: Any, where: str) -> None:
    """Raise unless ``value`` (parsed JSON) fits ``hint``; covers the types our records use."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        for arm in args:
            try:
                return _check_type(value, arm, where)
            except ItermergeError:
                continue
        raise ItermergeError(f"{where} must be {_type_name(hint)}, got {value!r:.80}")
    if hint is type(None):
        ok = value is None
    elif hint is Any:
        ok = True
    elif hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise ItermergeError(f"{where} must be a finite number, got {value!r}")
    elif hint is str:
        ok = isinstance(value, str)
    elif origin is list:
        if not isinstance(value, list):
            raise ItermergeError(f"{where} must be {_type_name(hint)}, got {value!r:.80}")
        for i, item in enumerate(value):
            _check_type(item, args[0], f"{where}[{i}]")
        return
    elif origin is dict:
        if not isinstance(value, dict):
            raise ItermergeError(f"{where} must be {_type_name(hint)}, got {value!r:.80}")
        for k, item in value.items():
            _check_type(item, args[1], f"{where}[{k!r}]")
        return
    else:  # pragma: no cover - a new field type in a record needs a case here
        raise AssertionError(f"unhandled record field type {hint}")
    if not ok:
        raise ItermergeError(f"{where} must be {_type_name(hint)}, got {value!r:.80}")


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "null"
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) is list:
        return "a list"
    if typing.get_origin(hint) is dict:
        return "an object"
    return str(hint)


def check_messages(messages: Any, where: str) -> list[Message]:
    """A chat is a non-empty list of {"role", "content"} objects whose last turn is the user's."""
    if not isinstance(messages, list) or not messages:
        raise ItermergeError(
            f'{where} must be a non-empty list of {{"role": ..., "content": ...}}, got {messages!r:.80}'
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ItermergeError(f'{where}[{i}] must be an object with exactly "role" and "content", got {m!r:.80}')
        if m["role"] not in _ROLES:
            raise ItermergeError(f"{where}[{i}]: role {m['role']!r} is not one of {list(_ROLES)}")
        if not isinstance(m["content"], str):
            raise ItermergeError(f'{where}[{i}]: "content" must be a string, got {m["content"]!r:.80}')
    if messages[-1]["role"] != "user":
        raise ItermergeError(
            f"{where}: the last message has role {messages[-1]['role']!r}; a prompt must end with the user's turn"
        )
    return messages
