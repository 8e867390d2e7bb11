"""The transformers sampling backend: our own KV-cached decode loop over the model's forward (CPU or GPU)."""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from itermerge.errors import ItermergeError
from itermerge.logprobs import plain_output_path
from itermerge.sampling.batch import DecodeBatch
from itermerge.sampling.decode import decode
from itermerge.sampling.kv_cache import growing_cache, plain_cache
from itermerge.sampling.params import Sample, SamplingParams
from itermerge.sampling.slots import SlotBatch
from itermerge.sampling.static import StaticKV, cache_bytes, capacity_for, static_unsupported
from itermerge.tokenization import stop_token_ids

if TYPE_CHECKING:
    from itermerge.config import RunConfig
    from itermerge.devices import Placement


class HFSampler:
    """Samples with any transformers causal LM.

    Up to ``batch_size`` rows (prompt, k) decode together, taken in order of prompt length. Each
    distinct prompt is prefilled once and its KV cache copied to its K rows; ended rows leave the
    batch and waiting rows take their slots (continuous batching), so the batch stays full until the
    last prompts; only the last position's logits are computed. Temperature/top-k/top-p follow HF's
    warpers, so a sample has the law of HF ``generate``'s; greedy matches ``generate(do_sample=False)``.

    ``cuda_graphs`` (``sampling.cuda_graphs``, on GPUs only): rows decode in the fixed slots of a static KV
    cache and each decoding step is one CUDA graph replay (``sampling/static.py``, ``sampling/slots.py``);
    the same draws up to float rounding. Models it cannot serve (``static_unsupported``) decode as on CPUs.

    ``shared_prefix`` (``sampling.shared_prefix``, off the static path): the prompts prefilled together run the
    prefix they share (the chat template's system prompt) once, its KV cache expanded to every row
    (``batch.prefill``); the same logits up to float rounding, and half the prefill on the demo's prompts.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        progress: bool = True,
        num_threads: int | None = None,
        *,
        blocked_output_layer: bool = True,
        growing_kv_cache: bool = True,
        grouped_query_sdpa: bool = True,
        cuda_graphs: bool = True,
        shared_prefix: bool = True,
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
        self.eos_ids = list(stop_token_ids(model, tokenizer))
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]  # pads are masked: any id works
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        # transformers 5 renamed the forward's `past_key_values` to `cache`.
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # On CPUs the output layer runs in vocabulary blocks (see output_logits) where the logits are
        # exactly head(body(x)): a plain bias-free output layer, no soft-capping or logit scale.
        self._split = plain_output_path(model) if blocked_output_layer and self.device.type == "cpu" else None
        self.growing_kv_cache, self.grouped_query_sdpa = growing_kv_cache, grouped_query_sdpa
        self.shared_prefix = shared_prefix
        # On a GPU, decoding steps over a static cache of slots, each step one CUDA graph (sampling/static.py);
        # the reason it is off for a model that cannot (None when it can), and the cache, kept between calls.
        self.static_unsupported = static_unsupported(model) if cuda_graphs and self.device.type == "cuda" else None
        self.static_decoding = cuda_graphs and self.device.type == "cuda" and self.static_unsupported is None
        self.static_kv: StaticKV | None = None

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        """``params.n`` samples per prompt, in prompt order. Same seed and prompt → same samples."""
        if self.model is None:
            raise ItermergeError("HFSampler.generate: the sampler was closed; build a new HFSampler")
        self._check_prompts(prompt_ids)
        was_training = self.model.training
        self.model.eval()
        try:
            with _grouped_query_sdpa(self.device, self.grouped_query_sdpa):
                batch = self._slot_batch(prompt_ids, params) if self.static_decoding and prompt_ids else None
                if batch is None:
                    batch = DecodeBatch(self._forward, self._new_cache, params, self.eos_ids, self.pad_id,
                                        self.device, shared_prefix=self.shared_prefix)
                rows = decode(self._forward, self._new_cache, prompt_ids, params, self.eos_ids, self.pad_id,
                              self.device, batch_size=self.batch_size, progress=self.progress, batch=batch)
        finally:
            self.model.train(was_training)
        samples = [[Sample(self.tokenizer.decode(r.tokens, skip_special_tokens=True), r.tokens, r.finished)
                    for r in per] for per in rows]
        return [row * params.n if params.greedy else row for row in samples]

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy new weights (named as in the model's state dict) into the model, in place: its tensors, and any
        CUDA graph recorded over them, stay. Returns how many were given."""
        if self.model is None:
            raise ItermergeError("HFSampler.update_weights: the sampler was closed; build a new HFSampler")
        weights = dict(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
        if not weights:
            raise ItermergeError("HFSampler.update_weights: no tensors given; pass the state dict to load")
        unexpected = self.model.load_state_dict(weights, strict=False).unexpected_keys
        if unexpected:
            raise ItermergeError(f"HFSampler.update_weights: {len(unexpected)} tensor(s) the model does not have, "
                                 f"e.g. {unexpected[0]!r}; pass the state dict of a model of the same architecture")
        return len(weights)

    def close(self) -> None:
        """Drop the model and the static cache (the caller's references to the model keep it)."""
        self.model = self.static_kv = None

    def _slot_batch(self, prompt_ids: list[list[int]], params: SamplingParams) -> SlotBatch | None:
        """Rows in the slots of the static cache, which is kept from the last call while it is long enough; None
        (the growing cache) when a cache for every row at full length would not fit in the GPU's free memory."""
        needed = capacity_for(max(map(len, prompt_ids)) + params.max_new_tokens)
        if self.static_kv is None or self.static_kv.capacity < needed:
            self.static_kv = None  # the old buffers go before the new ones are allocated
            nbytes = cache_bytes(self.model.config, self.batch_size, needed, next(self.model.parameters()).dtype)
            if self.device.type == "cuda" and nbytes > STATIC_MEMORY_SHARE * torch.cuda.mem_get_info(self.device)[0]:
                warnings.warn(f"sampling: a static KV cache of {self.batch_size} rows × {needed} tokens needs "
                              f"{nbytes / 2**30:.1f} GiB, over {STATIC_MEMORY_SHARE:.0%} of the GPU's free memory; "
                              "decoding without CUDA graphs (lower sampling.batch_size or max_new_tokens to use them)",
                              stacklevel=3)
                return None
            self.static_kv = StaticKV(self.model, self._cache_arg, self.batch_size, needed,
                                      graphs=self.device.type == "cuda")
        return SlotBatch(self.static_kv, self._forward, self._new_cache, params, self.eos_ids, self.pad_id,
                         self.device)

    def _new_cache(self, capacity: int) -> Any:
        """A KV cache that grows in place and lets rows join mid-way, or (``growing_kv_cache=False``) the plain one."""
        return growing_cache(self.model.config, capacity) if self.growing_kv_cache else plain_cache(self.model.config)

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


STATIC_MEMORY_SHARE = 0.8  # of the GPU's free memory, at most, for the static KV cache (graphs need some too)
VOCAB_BLOCK = 4096  # output-layer rows per block in output_logits


def output_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight.T``, (B, H) × (V, H) → (B, V), computed ``VOCAB_BLOCK`` vocabulary rows at a time.

    Why (``sampling.blocked_output_layer``): one matmul streams the whole output layer (SmolLM2's is 113 MB)
    past every row block; a 4,096-row block of it (9 MB) stays in a CPU's L3 cache while all rows use it
    (docs/benchmarks.md has the step times).
    """
    out = hidden.new_empty(hidden.shape[0], weight.shape[0])
    for start in range(0, weight.shape[0], VOCAB_BLOCK):
        torch.mm(hidden, weight[start : start + VOCAB_BLOCK].t(), out=out[:, start : start + VOCAB_BLOCK])
    return out


@contextlib.contextmanager
def _grouped_query_sdpa(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Let transformers' SDPA attention pass grouped K/V heads to torch as they are (``enable_gqa``).

    With a padding mask, transformers otherwise repeats every key/value head per query group (or packs
    the queries) before the kernel; on CPU torch's own grouped-query path is faster (docs/benchmarks.md).
    Same attention, float rounding apart; ``sampling.grouped_query_sdpa`` turns it off. Left alone on GPUs, where a mask
    with ``enable_gqa`` sends SDPA to its slow math kernel.
    """
    key = "TRANSFORMERS_SDPA_FORCE_GQA"
    if device.type != "cpu" or not enabled:
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


def hf_options(cfg: RunConfig) -> dict[str, Any]:
    """The hf sampler's batch and speed settings from the run's sampling section."""
    s = cfg.sampling
    return {"batch_size": s.batch_size, "blocked_output_layer": s.blocked_output_layer,
            "growing_kv_cache": s.growing_kv_cache, "grouped_query_sdpa": s.grouped_query_sdpa,
            "cuda_graphs": s.cuda_graphs, "shared_prefix": s.shared_prefix}


class HFBackend:
    """``sampling.backend: hf`` (registered in ``sampling/backends.py``): our decode loop over a loaded model."""

    def make(self, model: Any, tokenizer: Any = None, **options: Any) -> HFSampler:
        return HFSampler(model, tokenizer, **options)

    @contextlib.contextmanager
    def stage(self, cfg: RunConfig, policy_path: str | Path, tokenizer: Any, where: Placement) -> Iterator[HFSampler]:
        """The policy loaded on this process's device, sampled with the run's speed settings; its memory given back
        at the block's end."""
        from itermerge.devices import load_placed, release

        sampler = HFSampler(load_placed(policy_path, where, cfg.model.trust_remote_code), tokenizer,
                            **hf_options(cfg))
        try:
            yield sampler
        finally:
            sampler.close()  # with the caller's reference gone too, the weights (and any CUDA graphs) go
            release()

    @contextlib.contextmanager
    def evaluation(self, cfg: RunConfig, where: Placement, theta_T: str | Path) -> Iterator[Callable[..., HFSampler]]:
        """A sampler over each evaluated model as it is (no copy), with the run's speed settings."""
        options = {k: v for k, v in hf_options(cfg).items() if k != "batch_size"}
        yield lambda model, tokenizer, batch_size, progress: HFSampler(
            model, tokenizer, batch_size=batch_size, progress=progress, **options)


BACKEND = HFBackend()
