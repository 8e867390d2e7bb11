"""Sampling K completions per prompt (Alg. 1, "Sample y_1:K ~ π_θ_{t-1}"): parameters, results, backends.

The backends (``hf``: our decode loop over any transformers model, ``vllm``: the paper's engine, in a process of its
own), registered in ``sampling/backends.py``, import torch and are loaded only when asked for; ``ensemble`` samples
eq. (6)'s mixture.
"""

from __future__ import annotations

from typing import Any

from itermerge.sampling.params import Sample, Sampler, SamplingParams, prompt_seeds

__all__ = ["Sample", "Sampler", "SamplingParams", "make_sampler", "prompt_seeds"]


def make_sampler(backend: str, model: Any, tokenizer: Any = None, **kwargs: Any) -> Sampler:
    """A sampler of the backend registered as ``backend`` (``sampling/backends.py``): "hf" takes a loaded model and
    its tokenizer, "vllm" a checkpoint path (vLLM loads it itself)."""
    from itermerge.sampling.backends import backend as registered

    return registered(backend).make(model, tokenizer, **kwargs)
