"""How to sample (``SamplingParams``), what comes back (``Sample``), the ``Sampler`` protocol and per-prompt seeds."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from itermerge.config.sampling_params import SamplingParams

__all__ = ["Sample", "Sampler", "SamplingParams", "prompt_seeds"]


@dataclass(frozen=True)
class Sample:
    """One completion: ``token_ids`` end with the EOS token when ``finished``; ``text`` has no special tokens."""

    text: str
    token_ids: list[int]
    finished: bool


@runtime_checkable
class Sampler(Protocol):
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        """``params.n`` samples for each prompt (token ids with the chat template applied), in prompt order."""
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
