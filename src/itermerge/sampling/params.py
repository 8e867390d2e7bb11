"""How to sample (``SamplingParams``), what comes back (``Sample``), the ``Sampler`` protocol and per-prompt seeds."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from itermerge.errors import ItermergeError


@dataclass(frozen=True)
class SamplingParams:
    """How to sample; the defaults are appendix A's training column (temperature 1, no top-p/top-k)."""

    n: int = field(default=8, metadata={"help": "K: completions per prompt"})
    temperature: float = field(default=1.0, metadata={"help": "0 means greedy decoding"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus mass kept, in (0, 1]; 1 turns it off"})
    top_k: int = field(default=0, metadata={"help": "most likely tokens kept; 0 turns it off"})
    max_new_tokens: int = field(default=1024, metadata={"help": "completion maximum length"})
    seed: int = field(default=0, metadata={"help": "same seed and prompt give the same samples"})
    presence_penalty: float = field(
        default=0.0, metadata={"help": "vLLM's: subtracted from the logit of every token already generated"}
    )
    frequency_penalty: float = field(
        default=0.0, metadata={"help": "vLLM's: subtracted once per earlier occurrence in the completion"}
    )

    def __post_init__(self) -> None:
        checks = [
            ("n", self.n, isinstance(self.n, int) and self.n >= 1, "an integer >= 1"),
            ("temperature", self.temperature, self.temperature >= 0, ">= 0 (0 is greedy)"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1] (1 turns it off)"),
            ("top_k", self.top_k, isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 is off)"),
            ("max_new_tokens", self.max_new_tokens,
             isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("seed", self.seed, isinstance(self.seed, int) and self.seed >= 0, "an integer >= 0"),
            ("presence_penalty", self.presence_penalty, -2 <= self.presence_penalty <= 2, "in [-2, 2] (as vLLM)"),
            ("frequency_penalty", self.frequency_penalty, -2 <= self.frequency_penalty <= 2,
             "in [-2, 2] (as vLLM)"),
        ]
        for name, value, ok, want in checks:
            if not ok:
                raise ItermergeError(f"SamplingParams.{name} = {value!r}: must be {want}")

    @classmethod
    def training(cls, **overrides: Any) -> SamplingParams:
        """Appendix A, "Value for Training": temperature 1.0, top-p and top-k off, no penalties."""
        return cls(**overrides)

    @classmethod
    def evaluation(cls, **overrides: Any) -> SamplingParams:
        """Appendix A, "Value for Evaluation": temperature 0.7, top-p 0.9, top-k 40, penalties 0.1."""
        values: dict[str, Any] = dict(
            temperature=0.7, top_p=0.9, top_k=40, presence_penalty=0.1, frequency_penalty=0.1
        )
        values.update(overrides)
        return cls(**values)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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
