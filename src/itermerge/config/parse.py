"""YAML into frozen settings dataclasses: coercion, overrides and unknown-key errors, for any dataclass.

This module imports nothing from the project but its error type, so every settings module can use it
without pulling in torch or the stages that use the settings.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from itermerge.errors import ItermergeError


def read_yaml(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """A YAML file of sections as a dict; ``overrides`` are ``dotted.key=value`` strings (YAML values)."""
    path = Path(path)
    if not path.exists():
        raise ItermergeError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ItermergeError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ItermergeError(f"{path}: the top level must be a mapping of sections (model:, prompts:, …)")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ItermergeError(f"override {item!r}: write section.key=value, e.g. dpo.learning_rate=1e-5")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ItermergeError(f"override {item!r}: {p} is {child!r}, not a section; set {p}={{...}} instead")
            node = child
        node[leaf] = yaml.safe_load(value)
    return data


def build(cls: type, data: dict[str, Any] | None, where: str = "config", prefix: str = "") -> Any:
    """A settings dataclass from plain data (a YAML section), every value coerced to its field's type.

    An unknown key, or a value of the wrong type, is an error naming the key, the file and what is known.
    """
    return _build(cls, data or {}, where, prefix)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(_plain(to_dict(cfg)), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: Any, where: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ItermergeError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ItermergeError(f"{where}: unknown key {prefix}{unknown[0]}; known keys here: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, where, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ItermergeError as e:
        raise ItermergeError(f"{where}: {e}") from None


def _coerce(hint: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, str):  # a section named by its first field, e.g. an lm-eval task by name
            value = {dataclasses.fields(hint)[0].name: value}
        return _build(hint, value or {}, where, key + ".")
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, where, key)
    bad = ItermergeError(f"{where}: {key} = {value!r} is not a {getattr(hint, '__name__', hint)}")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads 1e-5 (no dot) as a string: accept what float() accepts.
            try:
                return float(value)
            except (TypeError, ValueError):
                raise bad from None
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(hint)
        item = args[0] if args else Any
        items = [_coerce(item, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    return value
