"""How to sample (``SamplingParams``), what comes back (``Sample``), the ``Sampler`` protocol and per-prompt seeds."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from itermerge.config.sampling_params import SamplingParams

__all__ = ["Sample", "Sampler", "SamplerBackend", "SamplingParams", "prompt_seeds"]


@dataclass(frozen=True)
class Sample:
    """One completion: ``token_ids`` end with the EOS token when ``finished``; ``text`` has no special tokens."""

    text: str
    token_ids: list[int]
    finished: bool


@runtime_checkable
class Sampler(Protocol):
    """What every backend's sampler does (``sampling/backends.py`` registers the backends)."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        """``params.n`` samples for each prompt (token ids with the chat template applied), in prompt order."""
        ...

    def update_weights(self, named_tensors: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> int:
        """Load new weights (named as in the Hugging Face checkpoint) in place; returns how many were given."""
        ...

    def close(self) -> Any:
        """Give back what the sampler holds (device memory, an engine's process); it samples no more."""
        ...


class SamplerBackend(Protocol):
    """One ``sampling.backend``: how its samplers are built, for a stage and for an evaluation."""

    def make(self, model: Any, tokenizer: Any = None, **options: Any) -> Sampler:
        """A sampler of ``model`` (what it is depends on the backend: a loaded model, a checkpoint path)."""
        ...

    def stage(self, cfg: Any, policy_path: str | Path, tokenizer: Any, where: Any) -> AbstractContextManager[Sampler]:
        """The sampling stage's sampler of the policy at ``policy_path``, released at the block's end."""
        ...

    def evaluation(self, cfg: Any, where: Any, theta_T: str | Path) -> AbstractContextManager[Callable[..., Sampler]]:
        """``make_sampler(model, tokenizer, batch_size, progress)`` for the models a stage evaluates."""
        ...


def prompt_seeds(prompt_ids: list[list[int]], seed: int) -> list[int]:
    """One 63-bit seed per prompt from (seed, the prompt's tokens, which repeat of that prompt it is).

    Keyed on content rather than position so that a prompt gets the same samples whatever else is
    sampled with it, and however the caller splits the work (resume, other batch sizes).
    """
    seen: Counter[bytes] = Counter()
    seeds = []
    for ids in prompt_ids:
        digest = hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).digest()
        occurrence = seen[digest]
        seen[digest] += 1
        entropy = [seed, int.from_bytes(digest, "little"), occurrence]
        seeds.append(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1)
    return seeds
