"""The transformers sampling backend: our own KV-cached decode loop over the model's forward (CPU or GPU)."""

from __future__ import annotations

import inspect
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from itermerge.errors import ItermergeError
from itermerge.sampling import Sample, SamplingParams, prompt_seeds
from itermerge.sampling.kv_cache import growing_cache
from itermerge.sampling.logits import apply_penalties, sample_categorical, warp_logits

# Finished rows stay in the batch (their tokens ignored) until they are this fraction of it; then
# the batch and its KV cache are compacted. Dropping at once would copy the cache on every finish.
COMPACT_FRACTION = 1 / 8
INITIAL_ROOM = 128  # KV-cache slots reserved for new tokens before the first doubling


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


def row_uniforms(prompt_seed: int, k: int, steps: int) -> np.ndarray:
    """The uniforms that drive sample k of a prompt, one per decoding step: (steps,) float64 in [0, 1)."""
    return np.random.default_rng([prompt_seed, k]).random(steps)


class HFSampler:
    """Samples with any transformers causal LM.

    Rows (prompt, k) are sorted by prompt length and decoded ``batch_size`` at a time; each distinct
    prompt of a batch is prefilled once and its KV cache copied to its K rows; finished rows leave
    the batch; only the last position's logits are computed. Temperature/top-k/top-p follow HF's
    warpers, so the law of a sample is HF ``generate``'s; greedy matches ``generate(do_sample=False)``.
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

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        """``params.n`` samples per prompt, in prompt order. Same seed and prompt → same samples."""
        self._check_prompts(prompt_ids)
        seeds = prompt_seeds(prompt_ids, params.seed)
        per_prompt = 1 if params.greedy else params.n  # greedy samples are all the same: decode one
        rows = sorted(
            ((p, k) for p in range(len(prompt_ids)) for k in range(per_prompt)),
            key=lambda row: (len(prompt_ids[row[0]]), row[0], row[1]),
        )
        results: list[list[Sample]] = [[] for _ in prompt_ids]
        was_training = self.model.training
        self.model.eval()
        start, n_tokens = time.perf_counter(), 0
        bar = tqdm(total=len(rows), unit="sample", desc="sampling", disable=not self.progress)
        try:
            for lo in range(0, len(rows), self.batch_size):
                chunk = rows[lo : lo + self.batch_size]
                with torch.inference_mode():
                    outputs = self._decode(prompt_ids, chunk, seeds, params)
                for (p, _), (ids, finished) in zip(chunk, outputs):  # rows of a prompt come in k order
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    results[p].append(Sample(text=text, token_ids=ids, finished=finished))
                    n_tokens += len(ids)
                bar.update(len(chunk))
                bar.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - start):.1f}")
        finally:
            bar.close()
            self.model.train(was_training)
        return [row * params.n for row in results] if params.greedy else results

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
        out = self.model(**inputs, use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        return out.logits[:, -1, :].float()

    def _decode(
        self, prompt_ids: list[list[int]], chunk: list[tuple[int, int]], seeds: list[int], params: SamplingParams
    ) -> list[tuple[list[int], bool]]:
        """Decode one batch of rows (prompt index, k); returns (token ids, finished) per row."""
        dev, max_new = self.device, params.max_new_tokens
        distinct = list(dict.fromkeys(p for p, _ in chunk))
        row_prompt = torch.tensor([distinct.index(p) for p, _ in chunk], device=dev)  # (B,)
        lengths = torch.tensor([len(prompt_ids[p]) for p in distinct], device=dev)  # (U,)
        width = int(lengths.max())
        input_ids = torch.full((len(distinct), width), self.pad_id, dtype=torch.long, device=dev)
        for i, p in enumerate(distinct):  # left padding: every row's next token sits at the same column
            input_ids[i, width - len(prompt_ids[p]) :] = torch.tensor(prompt_ids[p], device=dev)
        mask = (torch.arange(width, device=dev) >= (width - lengths)[:, None]).long()  # (U, W)
        positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)  # as HF generate
        cache = growing_cache(self.model.config, capacity=width + min(max_new, INITIAL_ROOM))

        # Prefill each distinct prompt once, then give each of its rows a copy of its cache.
        logits = self._forward(cache, input_ids=input_ids, attention_mask=mask, position_ids=positions)
        logits, mask, next_pos = logits[row_prompt], mask[row_prompt], lengths[row_prompt]
        cache.batch_select_indices(row_prompt)

        n_rows = len(chunk)
        if params.greedy:
            uniforms = None
        else:
            uniforms = torch.from_numpy(np.stack([row_uniforms(seeds[p], k, max_new) for p, k in chunk])).to(dev)
        eos = torch.tensor(self.eos_ids, device=dev)
        out_tokens = torch.full((n_rows, max_new), self.pad_id, dtype=torch.long, device=dev)
        out_len = torch.zeros(n_rows, dtype=torch.long, device=dev)
        finished = torch.zeros(n_rows, dtype=torch.bool, device=dev)
        penalize = params.presence_penalty != 0 or params.frequency_penalty != 0
        counts = torch.zeros(n_rows, logits.size(-1), device=dev) if penalize else None
        row = torch.arange(n_rows, device=dev)  # batch position → chunk row
        dead = torch.zeros(n_rows, dtype=torch.bool, device=dev)  # finished but still in the batch

        for step in range(max_new):
            if counts is not None:
                logits = apply_penalties(logits, counts, params.presence_penalty, params.frequency_penalty)
            if uniforms is None:
                tokens = logits.argmax(dim=-1)  # (B,)
            else:
                warped = warp_logits(logits, params.temperature, params.top_k, params.top_p)
                tokens = sample_categorical(warped, uniforms[row, step])
            live_rows = row[~dead]
            out_tokens[live_rows, step] = tokens[~dead]
            out_len[live_rows] += 1
            ended = ~dead & torch.isin(tokens, eos)
            finished[row[ended]] = True
            dead |= ended
            if step == max_new - 1 or bool(dead.all()):
                break
            if counts is not None:
                counts.scatter_add_(1, tokens[:, None], torch.ones_like(counts[:, :1]))
            if int(dead.sum()) >= max(1, COMPACT_FRACTION * len(row)):
                keep = (~dead).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                mask, next_pos, row, tokens, dead = mask[keep], next_pos[keep], row[keep], tokens[keep], dead[keep]
                counts = counts[keep] if counts is not None else None
            mask = torch.cat([mask, mask.new_ones(len(row), 1)], dim=1)
            logits = self._forward(
                cache, input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos[:, None]
            )
            next_pos = next_pos + 1

        lens, done = out_len.tolist(), finished.tolist()
        return [(out_tokens[i, : lens[i]].tolist(), done[i]) for i in range(n_rows)]
