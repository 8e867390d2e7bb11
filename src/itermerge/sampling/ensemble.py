"""Sampling from the exact ensemble of eq. (6): the one decode loop over a forward that mixes the models' log-probs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from itermerge.errors import ItermergeError
from itermerge.logprobs.ensemble import live_members
from itermerge.maths.ensemble import mix_logprobs
from itermerge.sampling.decode import decode
from itermerge.sampling.kv_cache import growing_cache
from itermerge.sampling.params import Sample, SamplingParams
from itermerge.tokenization import stop_token_ids


class EnsembleCache:
    """One KV cache per model, seen as one: the decode loop selects, drops and appends rows in all of them at once.

    ``layers`` lists every model's layers in order, so ``kv_cache.append_rows`` and ``can_append_rows`` treat
    the ensemble as one deeper model.
    """

    def __init__(self, caches: list[Any]):
        self.caches = caches

    @property
    def layers(self) -> list[Any]:
        return [layer for cache in self.caches for layer in cache.layers]

    def batch_select_indices(self, indices: Tensor) -> None:
        for cache in self.caches:
            cache.batch_select_indices(indices)

    def get_seq_length(self) -> int:
        return self.caches[0].get_seq_length()

    def nbytes(self) -> int:
        """Bytes of keys and values held for the tokens seen so far, all models together."""
        return sum(t.nbytes for layer in self.layers for t in (layer.keys, layer.values) if isinstance(t, Tensor))


class _Mixture:
    """The forward of the decode loop: each model's next-token log-probs, mixed per token by eq. (6)'s coefficients."""

    def __init__(self, models: list[nn.Module], coeffs: list[float]):
        self.models, self.coeffs = models, coeffs
        self.peak_cache_bytes = 0

    def new_cache(self, capacity: int) -> EnsembleCache:
        return EnsembleCache([growing_cache(m.config, capacity) for m in self.models])

    def __call__(self, cache: EnsembleCache, **inputs: Tensor) -> Tensor:
        logps = [
            m(**inputs, use_cache=True, logits_to_keep=1, **{_cache_arg(m): c}).logits[:, -1].float().log_softmax(-1)
            for m, c in zip(self.models, cache.caches)
        ]
        self.peak_cache_bytes = max(self.peak_cache_bytes, cache.nbytes())
        return mix_logprobs(logps, self.coeffs)  # (B, V)


def _cache_arg(model: nn.Module) -> str:
    import inspect

    # transformers 5 renamed the forward's `past_key_values` to `cache`.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def ensemble_generate(
    models: Sequence[nn.Module], coeffs: Sequence[float], prompt_ids: Sequence[Sequence[int]], params: SamplingParams,
    eos_ids: Sequence[int], pad_id: int, batch_size: int = 16, progress: bool = False, stats: dict | None = None,
) -> list[list[tuple[list[int], bool]]]:
    """``params.n`` completions per prompt from the per-token ensemble: [prompt][k] → (token ids, finished).

    The decode loop is HFSampler's (``sampling.decode``) with the mixture as the forward, so a one-model
    ensemble samples exactly what HFSampler samples. ``stats`` (if given) receives the tokens decoded, the
    models run and the largest KV cache held (bytes, all models together). An empty ``eos_ids`` never stops.
    """
    member_models, live = live_members(models, coeffs)
    if batch_size < 1:
        raise ItermergeError(f"ensemble batch_size={batch_size}: must be >= 1")
    if any(len(p) == 0 for p in prompt_ids):
        raise ItermergeError("ensemble_generate: a prompt is empty; encode prompts with the chat template first")
    mixture = _Mixture(member_models, live)
    device = next(member_models[0].parameters()).device
    was_training = [m.training for m in member_models]
    for m in member_models:
        m.eval()
    try:
        rows = decode(mixture, mixture.new_cache, prompt_ids, params, eos_ids, pad_id, device,
                      batch_size=batch_size, progress=progress, desc=f"ensemble of {len(member_models)}")
    finally:
        for m, training in zip(member_models, was_training):
            m.train(training)
    out = [[(r.tokens, r.finished) for r in per] * (params.n if params.greedy else 1) for per in rows]
    if stats is not None:
        stats.update(tokens=sum(len(r.tokens) for per in rows for r in per), kv_cache_bytes=mixture.peak_cache_bytes,
                     models_run=len(member_models))
    return out


class EnsembleSampler:
    """The ensemble as a ``sampling.Sampler``: anything that samples from a model can sample from eq. (6)."""

    def __init__(self, models: Sequence[nn.Module], coeffs: Sequence[float], tokenizer: Any, batch_size: int = 16,
                 progress: bool = True):
        live_members(models, coeffs)
        self.models, self.coeffs, self.tokenizer = list(models), list(coeffs), tokenizer
        self.batch_size, self.progress = batch_size, progress
        self.eos_ids = list(stop_token_ids(self.models[-1], tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        out = ensemble_generate(self.models, self.coeffs, prompt_ids, params, self.eos_ids, self.pad_id,
                                self.batch_size, self.progress)
        return [[Sample(self.tokenizer.decode(ids, skip_special_tokens=True), ids, done) for ids, done in per]
                for per in out]


__all__ = ["EnsembleCache", "EnsembleSampler", "ensemble_generate"]
