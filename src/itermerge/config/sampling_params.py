"""How to sample: ``SamplingParams``, the record a run's config makes and every sampler takes (so it sits below both:
``itermerge.sampling`` re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
