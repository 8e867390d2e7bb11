"""A user's Python function named in a config: ``"package.module:function"`` or ``"path/to/file.py:function"``.

Torch-free, so that the configuration can look a verifier up (does its module also define ``is_correct``?)
without loading the stages that will call it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from itermerge.errors import ItermergeError

EXAMPLE = "'itermerge.tasks.arithmetic:score' or 'examples/custom_task/caps.py:score'"


def split_spec(spec: str) -> tuple[str, str]:
    """``"module:attr"`` → (module, attr); a malformed spec is an error naming it."""
    module, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not module or not attr:
        raise ItermergeError(f"verifier spec {spec!r}: write it as 'module:function' or 'file.py:function', "
                             f"e.g. {EXAMPLE}")
    return module, attr


def import_module_of(spec: str) -> ModuleType:
    """The module a spec names: a dotted module on sys.path, or a ``.py`` file (relative to the working directory)."""
    module_name, _ = split_spec(spec)
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ItermergeError(f"verifier spec {spec!r}: no file {path} (a path relative to the working directory, "
                                 f"{Path.cwd()})")
        name = f"itermerge_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        if name in sys.modules:
            return sys.modules[name]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise ItermergeError(f"verifier spec {spec!r}: running {path} failed: {type(e).__name__}: {e}") from e
        return module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Only the spec's own module missing is the user's typo; a missing dependency inside it is reported as such.
        if e.name and module_name.startswith(e.name):
            raise ItermergeError(
                f"verifier spec {spec!r}: no module named {module_name!r}; check the spelling and that it is "
                "importable (installed, on PYTHONPATH), or name its file: path/to/module.py:function"
            ) from e
        raise ItermergeError(f"verifier spec {spec!r}: importing {module_name!r} failed: {e}") from e


def load_callable(spec: str) -> Callable:
    """Import what ``spec`` names (``module:function`` or ``module:Class.method``) and return it."""
    module_name, attr_path = split_spec(spec)
    obj = import_module_of(spec)
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ItermergeError(f"verifier spec {spec!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ItermergeError(f"verifier spec {spec!r}: {attr_path!r} is a {type(obj).__name__}, not a function")
    return obj


def sibling(spec: str, name: str) -> str | None:
    """The spec of function ``name`` beside the one ``spec`` names, if its module defines it (e.g. a verifier's
    ``is_correct`` beside its ``score``), else None."""
    module, _ = split_spec(spec)
    return f"{module}:{name}" if callable(getattr(import_module_of(spec), name, None)) else None
