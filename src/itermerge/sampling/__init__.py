"""Sampling K completions per prompt (Alg. 1, "Sample y_1:K ~ π_θ_{t-1}"): parameters, results, backends.

The backends (``hf``: our decode loop over any transformers model, ``vllm``: the paper's engine, ``ensemble``:
eq. (6)'s mixture) import torch and are loaded by ``make_sampler`` only when asked for.
"""

from __future__ import annotations

from typing import Any

from itermerge.errors import ItermergeError
from itermerge.sampling.params import Sample, Sampler, SamplingParams, prompt_seeds

__all__ = ["Sample", "Sampler", "SamplingParams", "make_sampler", "prompt_seeds"]


def make_sampler(backend: str, model: Any, tokenizer: Any = None, **kwargs: Any) -> Sampler:
    """The sampler for ``backend``: "hf" (a loaded model + tokenizer) or "vllm" (``model`` is a checkpoint path)."""
    if backend == "hf":
        from itermerge.sampling.hf import HFSampler

        return HFSampler(model, tokenizer, **kwargs)
    if backend == "vllm":
        from pathlib import Path

        from itermerge.sampling.vllm import VLLMSampler

        if not isinstance(model, (str, Path)):
            raise ItermergeError(
                f"sampling backend 'vllm' needs a checkpoint path, got a {type(model).__name__}; "
                "pass the model directory (vLLM loads it itself)"
            )
        return VLLMSampler(str(model), **kwargs)
    raise ItermergeError(f"sampling backend {backend!r} is unknown: use 'hf' or 'vllm'")


