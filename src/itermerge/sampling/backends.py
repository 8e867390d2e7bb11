"""The sampler backends, by name (``sampling.backend``), and the run's sampler for a stage.

A backend is one module with a ``SamplerBackend`` (``make``, ``stage``, ``evaluation``; see ``sampling/params.py``)
and one line in ``BACKENDS``; nothing else chooses between them. ``hf``: our decode loop over a transformers model
on this process's device. ``vllm``: one engine per process, each in a process of its own (``vllm_process.py``).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from itermerge.devices import scorer_spec  # noqa: F401  (where stages import it from)
from itermerge.errors import ItermergeError
from itermerge.sampling.params import Sampler, SamplerBackend

if TYPE_CHECKING:
    from itermerge.config import RunConfig
    from itermerge.devices import Placement

# name → "module:attribute" of its SamplerBackend, imported only when asked for (vllm is an optional extra).
BACKENDS: dict[str, str] = {
    "hf": "itermerge.sampling.hf:BACKEND",
    "vllm": "itermerge.sampling.vllm_process:BACKEND",
}


def check_backend(name: str) -> None:
    """Raise a named error unless ``name`` is a registered backend (it imports nothing)."""
    if name not in BACKENDS:
        raise ItermergeError(f"sampling backend {name!r} is unknown: use " + " or ".join(map(repr, BACKENDS)))


def backend(name: str) -> SamplerBackend:
    """The backend registered as ``name``."""
    check_backend(name)
    module, _, attribute = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def run_sampler(cfg: RunConfig, policy_path: str | Path, tokenizer: Any,
                where: Placement) -> contextlib.AbstractContextManager[Sampler]:
    """The configured sampler of ``policy_path`` for one stage; its memory is given back at the block's end."""
    return backend(cfg.sampling.backend).stage(cfg, policy_path, tokenizer, where)


def evaluation_sampler(cfg: RunConfig, where: Placement,
                       theta_T: str | Path) -> contextlib.AbstractContextManager[Callable[..., Sampler]]:
    """What an ``Evaluator`` samples with, for one stage: ``make_sampler(model, tokenizer, batch_size, progress)``,
    a sampler of ``model`` (``vllm``: θT's engine with ``model``'s weights loaded); released at the block's end."""
    return backend(cfg.sampling.backend).evaluation(cfg, where, theta_T)
