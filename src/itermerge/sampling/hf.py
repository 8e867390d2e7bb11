"""The transformers sampling backend: our own KV-cached decode loop over the model's forward (CPU or GPU)."""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from itermerge.errors import ItermergeError
from itermerge.logprobs import plain_output_path
from itermerge.sampling import Sample, SamplingParams, prompt_seeds
from itermerge.sampling.batch import DecodeBatch

# Rows join (waiting rows fill free slots) or leave (ended rows are dropped) once that changes at
# least this fraction of the batch: each change copies the KV cache, so doing it at every finish
# would cost more than the dead rows' compute it saves.
CHANGE_FRACTION = 1 / 8


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a completion: generation_config's EOS (int or list), else the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = getattr(model.config, "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        raise ItermergeError(
            "the model has no EOS token (generation_config.eos_token_id, config.eos_token_id and the "
            "tokenizer's eos_token_id are all unset): set generation_config.eos_token_id in the checkpoint"
        )
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


class HFSampler:
    """Samples with any transformers causal LM.

    Up to ``batch_size`` rows (prompt, k) decode together, taken in order of prompt length. Each
    distinct prompt is prefilled once and its KV cache copied to its K rows; ended rows leave the
    batch and waiting rows take their slots (continuous batching), so the batch stays full until the
    last prompts; only the last position's logits are computed. Temperature/top-k/top-p follow HF's
    warpers, so a sample has the law of HF ``generate``'s; greedy matches ``generate(do_sample=False)``.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        progress: bool = True,
        num_threads: int | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ItermergeError(f"HFSampler batch_size = {batch_size!r}: must be an integer >= 1")
        if device is not None:
            model.to(device)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.device = next(model.parameters()).device
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]  # pads are masked: any id works
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        # transformers 5 renamed the forward's `past_key_values` to `cache`.
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # On CPUs the output layer runs in vocabulary blocks (see output_logits) where the logits are
        # exactly head(body(x)): a plain bias-free output layer, no soft-capping or logit scale.
        self._split = plain_output_path(model) if self.device.type == "cpu" else None

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        """``params.n`` samples per prompt, in prompt order. Same seed and prompt → same samples."""
        self._check_prompts(prompt_ids)
        seeds = prompt_seeds(prompt_ids, params.seed)
        per_prompt = 1 if params.greedy else params.n  # greedy samples are all the same: decode one
        rows = sorted(  # by prompt length, so rows that decode together need little padding
            ((p, k) for p in range(len(prompt_ids)) for k in range(per_prompt)),
            key=lambda row: (len(prompt_ids[row[0]]), row[0], row[1]),
        )
        results: list[list[Sample | None]] = [[None] * per_prompt for _ in prompt_ids]
        batch = DecodeBatch(self._forward, self.model.config, params, self.eos_ids, self.pad_id, self.device)
        change = max(1, math.ceil(self.batch_size * CHANGE_FRACTION))
        taken, n_tokens, start = 0, 0, time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(total=len(rows), unit="sample", desc="sampling", disable=not self.progress)
        try:
            with torch.inference_mode(), _grouped_query_sdpa(self.device):
                while True:
                    waiting, room = len(rows) - taken, self.batch_size - batch.live
                    if waiting and room >= min(change, waiting) and batch.can_admit():
                        batch.admit(prompt_ids, rows[taken : taken + room], seeds)
                        taken += min(room, waiting)
                    elif batch.live and batch.size - batch.live >= max(1, CHANGE_FRACTION * batch.size):
                        batch.drop_ended()
                    if batch.live == 0:
                        break
                    for row in batch.sample():
                        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
                        results[row.prompt][row.k] = Sample(text=text, token_ids=row.tokens, finished=row.finished)
                        n_tokens += len(row.tokens)
                        bar.update(1)
                        bar.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - start):.1f}", refresh=False)
                    if batch.live:
                        batch.forward()
        finally:
            bar.close()
            self.model.train(was_training)
        return [row * params.n if params.greedy else row for row in results]  # type: ignore[misc]

    def _check_prompts(self, prompt_ids: list[list[int]]) -> None:
        for i, ids in enumerate(prompt_ids):
            if len(ids) == 0:
                raise ItermergeError(f"prompt_ids[{i}] is empty: every prompt needs at least one token")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ItermergeError(
                    f"prompt_ids[{i}] has token id {bad[0]} outside the model's vocabulary [0, {self.vocab_size}): "
                    "encode prompts with this model's tokenizer"
                )

    def _forward(self, cache: Any, **inputs: torch.Tensor) -> torch.Tensor:
        """Last-position logits (B, V) in float32, appending this step's keys/values to ``cache``."""
        if self._split is None:
            out = self.model(**inputs, use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
            return out.logits[:, -1, :].float()
        head, body_cache_arg = self._split
        hidden = self.model.base_model(**inputs, use_cache=True, **{body_cache_arg: cache})[0]
        return output_logits(hidden[:, -1, :], head.weight).float()


VOCAB_BLOCK = 4096  # output-layer rows per block in output_logits


def output_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight.T``, (B, H) × (V, H) → (B, V), computed ``VOCAB_BLOCK`` vocabulary rows at a time.

    Why: one matmul streams the whole output layer (113 MB for SmolLM2) past every row block; a 4,096-row
    block of it (9 MB) stays in this CPU's 32 MB L3 cache while all rows use it. At batch 128 on 2 cores
    that is ~24 % faster (115 against 152 ms a step), ~5 % of a decoding step.
    """
    out = hidden.new_empty(hidden.shape[0], weight.shape[0])
    for start in range(0, weight.shape[0], VOCAB_BLOCK):
        torch.mm(hidden, weight[start : start + VOCAB_BLOCK].t(), out=out[:, start : start + VOCAB_BLOCK])
    return out


@contextlib.contextmanager
def _grouped_query_sdpa(device: torch.device) -> Iterator[None]:
    """Let transformers' SDPA attention pass grouped K/V heads to torch as they are (``enable_gqa``).

    With a padding mask, transformers otherwise repeats every key/value head per query group (or packs
    the queries) before the kernel; on CPU torch's own grouped-query path is ~10 % faster per decoding
    step for SmolLM2 at batch 128. Same attention, float rounding apart. Left alone on GPUs, where a mask
    with ``enable_gqa`` sends SDPA to its slow math kernel.
    """
    key = "TRANSFORMERS_SDPA_FORCE_GQA"
    if device.type != "cpu":
        yield
        return
    previous = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous
