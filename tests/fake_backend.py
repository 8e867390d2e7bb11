"""A sampler backend that exists only in the tests: one module (this) and one line in ``BACKENDS`` make it usable by
every stage. Its samples are the prompt's last token repeated, plus the weights' count of loads."""

from __future__ import annotations

import contextlib
from typing import Any

from itermerge.sampling import Sample


class EchoSampler:
    def __init__(self, model: Any = None, tokenizer: Any = None, **options: Any) -> None:
        self.loads, self.closed, self.options = 0, False, options

    def generate(self, prompt_ids, params):
        return [[Sample(text="", token_ids=[ids[-1]] * (1 + self.loads), finished=False)] * params.n
                for ids in prompt_ids]

    def update_weights(self, named_tensors) -> int:
        self.loads += 1
        return len(dict(named_tensors))

    def close(self) -> None:
        self.closed = True


class EchoBackend:
    def __init__(self) -> None:
        self.samplers: list[EchoSampler] = []

    def make(self, model, tokenizer=None, **options):
        self.samplers.append(EchoSampler(model, tokenizer, **options))
        return self.samplers[-1]

    @contextlib.contextmanager
    def stage(self, cfg, policy_path, tokenizer, where):
        sampler = self.make(policy_path, tokenizer)
        try:
            yield sampler
        finally:
            sampler.close()

    @contextlib.contextmanager
    def evaluation(self, cfg, where, theta_T):
        sampler = self.make(theta_T)

        def make_sampler(model, tokenizer, batch_size, progress):
            sampler.update_weights(model.state_dict())
            return sampler

        yield make_sampler
        sampler.close()


BACKEND = EchoBackend()
