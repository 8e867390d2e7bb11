"""The exact ensemble of eq. (6), decoded and scored per token (its distance to the merge: approximation.py).

Eq. (6): log π*(y|x) = (1 − Σk_t) log π_θ0(y|x) + Σ_t k_t log π_θt(y|x) + const. The constant normalises
over all sequences y and is intractable. As EFT (Mitchell et al., 2024) and DeRa (Liu et al., 2024) do,
the mixture is normalised per token instead:

    log π*(y_i | x, y_<i) = log_softmax_v( Σ_m c_m log π_m(v | x, y_<i) ),   c = (1 − Σk, k_1, …, k_T)

which equals eq. (6) when one coefficient is 1 and is the standard tractable approximation otherwise.
The coefficient vectors of the special cases:

- a merge (λ, α):  ``merge_coefficients(T, lam, alpha)`` on (θ0, θ1, …, θT), the k_t of eq. (10);
- EFT, two reward directions r_a, r_b weighted k_a, k_b: ``eft_coefficients(k_a, k_b)`` on (θ0, θa, θb);
- DeRa, the aligned model re-aligned with β' = β / r: ``dera_coefficients(r)`` on (θ0, θ_aligned).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from itermerge.errors import ItermergeError
from itermerge.logprobs import collate
from itermerge.merge import merge_weights
from itermerge.sampling import Sample, SamplingParams, prompt_seeds
from itermerge.sampling.batch import row_uniforms
from itermerge.sampling.hf import eos_token_ids
from itermerge.sampling.logits import apply_penalties, sample_categorical, warp_logits

# --- coefficients ---------------------------------------------------------------------------------


def ensemble_coefficients(weights: Sequence[float]) -> list[float]:
    """Eq. (6), second line: c = (1 − Σ_t k_t, k_1, …, k_T), the coefficients of (θ0, θ1, …, θT)."""
    weights = [float(k) for k in weights]
    if not weights or not all(math.isfinite(k) for k in weights):
        raise ItermergeError(f"ensemble weights {weights}: give one finite k_t per checkpoint θ1..θT")
    return [1.0 - sum(weights), *weights]


def merge_coefficients(T: int, lam: float, alpha: float) -> list[float]:
    """The ensemble that the merge (λ, α) approximates: eq. (10)'s k_t put into eq. (6)."""
    return ensemble_coefficients(merge_weights(T, lam, alpha))


def eft_coefficients(k_a: float, k_b: float) -> list[float]:
    """EFT with two reward directions: π ∝ π_θ0 · exp((k_a r_a + k_b r_b)/β), on models (θ0, θa, θb)."""
    return ensemble_coefficients([k_a, k_b])


def dera_coefficients(beta_ratio: float) -> list[float]:
    """DeRa: π_θ0^(1−r) π_aligned^r on (θ0, θ_aligned), the policy of KL weight β/r (r = β/β').

    It is EFT with one direction, where the reference induces the zero reward (paper §5).
    """
    return ensemble_coefficients([beta_ratio])


# --- the per-token mixture ----------------------------------------------------------------------


def mix_logprobs(logps: Sequence[Tensor], coeffs: Sequence[float]) -> Tensor:
    """log_softmax(Σ_m c_m log π_m): the per-token ensemble distribution. Each (*S, V) → (*S, V).

    A token that a model with c_m ≠ 0 gives probability 0 stays impossible: with c_m < 0 the product
    would otherwise be +inf. Models with c_m = 0 are not read.
    """
    total, impossible = None, None
    for lp, c in zip(logps, coeffs):
        if c == 0.0:
            continue
        zero = torch.isneginf(lp)
        term = c * lp.float().masked_fill(zero, 0.0)
        total = term if total is None else total.add_(term)
        impossible = zero if impossible is None else impossible | zero
    if total is None:
        raise ItermergeError(f"ensemble coefficients {list(coeffs)} are all 0; at least one model must have weight")
    return total.masked_fill_(impossible, -math.inf).log_softmax(-1)


# --- decoding -------------------------------------------------------------------------------------


def live_members(models: Sequence[nn.Module], coeffs: Sequence[float]) -> tuple[list[nn.Module], list[float]]:
    """The models with c_m ≠ 0 and their coefficients, after checking that they can be mixed."""
    if len(models) != len(coeffs):
        raise ItermergeError(
            f"{len(coeffs)} ensemble coefficients for {len(models)} models; give one per model, θ0 first "
            "(ensemble_coefficients(k) turns k_1..k_T into the T+1 coefficients)"
        )
    if not models:
        raise ItermergeError("the ensemble has no models; pass θ0, θ1, …, θT")
    if not all(math.isfinite(c) for c in coeffs):
        raise ItermergeError(f"ensemble coefficients {list(coeffs)}: every coefficient must be finite")
    vocab = [vocab_size(m) for m in models]
    if len(set(vocab)) > 1:
        raise ItermergeError(
            f"ensemble models have vocabularies of sizes {vocab}; log-probs can only be mixed over one tokenizer — "
            "use checkpoints fine-tuned from the same θ0"
        )
    devices = {next(m.parameters()).device for m in models}
    if len(devices) > 1:
        raise ItermergeError(f"ensemble models are on devices {sorted(map(str, devices))}; load them all on one device")
    live = [(m, float(c)) for m, c in zip(models, coeffs) if c != 0.0]
    if not live:
        raise ItermergeError(f"ensemble coefficients {list(coeffs)} are all 0; at least one model must have weight")
    return [m for m, _ in live], [c for _, c in live]


def vocab_size(model: nn.Module) -> int:
    """Rows of the output layer (what log-probs range over), else ``config.vocab_size``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


class _Member:
    """One model of the ensemble with its own KV cache."""

    def __init__(self, model: nn.Module):
        self.model = model
        # transformers 5 renamed the forward's `past_key_values` to `cache`.
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.cache: Any = None

    def start(self) -> None:
        from transformers import DynamicCache

        try:
            self.cache = DynamicCache(config=self.model.config)  # transformers 5: layer types from the config
        except TypeError:
            self.cache = DynamicCache()

    def next_logprobs(self, **inputs: Tensor) -> Tensor:
        """log π(· | context) at each row's last position, appending to this model's cache: (B, V) float32."""
        out = self.model(**inputs, use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache})
        return out.logits[:, -1].float().log_softmax(-1)

    def cache_bytes(self) -> int:
        layers = getattr(self.cache, "layers", None) or []
        return sum(t.nbytes for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                   if isinstance(t, Tensor))


@torch.inference_mode()
def _decode(
    members: list[_Member], coeffs: list[float], prompt_ids: Sequence[Sequence[int]], chunk: list[tuple[int, int]],
    seeds: list[int], params: SamplingParams, eos_ids: Sequence[int], pad_id: int,
) -> tuple[list[tuple[list[int], bool]], int]:
    """Decode rows (prompt index, k) together → ((token ids, finished) per row, KV-cache bytes held at the end).

    The loop of ``sampling.hf.HFSampler`` with the model's logits replaced by the mixture: each distinct
    prompt is prefilled once per model and its cache copied to its rows, finished rows are dropped from
    every cache, and row k of a prompt draws from the same uniforms, so a one-model ensemble returns
    exactly what HFSampler returns for that model.
    """
    dev, max_new = next(members[0].model.parameters()).device, params.max_new_tokens
    distinct = list(dict.fromkeys(p for p, _ in chunk))
    row_prompt = torch.tensor([distinct.index(p) for p, _ in chunk], device=dev)  # (B,)
    lengths = torch.tensor([len(prompt_ids[p]) for p in distinct], device=dev)  # (U,)
    width = int(lengths.max())
    input_ids = torch.full((len(distinct), width), pad_id, dtype=torch.long, device=dev)
    for i, p in enumerate(distinct):  # left padding: every row's next token sits at the same column
        input_ids[i, width - len(prompt_ids[p]):] = torch.tensor(list(prompt_ids[p]), device=dev)
    mask = (torch.arange(width, device=dev) >= (width - lengths)[:, None]).long()  # (U, W)
    positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
    for m in members:
        m.start()
    logps = mix_logprobs([m.next_logprobs(input_ids=input_ids, attention_mask=mask, position_ids=positions)
                          for m in members], coeffs)[row_prompt]  # (B, V)
    for m in members:
        m.cache.batch_select_indices(row_prompt)
    mask, next_pos = mask[row_prompt], lengths[row_prompt]

    n_rows = len(chunk)
    uniforms = None if params.greedy else torch.from_numpy(
        np.stack([row_uniforms(seeds[p], k, max_new) for p, k in chunk])).to(dev)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=dev)
    out: list[list[int]] = [[] for _ in chunk]
    finished = [False] * n_rows
    counts = torch.zeros_like(logps) if params.presence_penalty or params.frequency_penalty else None
    row = torch.arange(n_rows, device=dev)  # batch position → chunk row
    for step in range(max_new):
        logits = logps if counts is None else apply_penalties(logps, counts, params.presence_penalty,
                                                              params.frequency_penalty)
        if uniforms is None:
            tokens = logits.argmax(-1)  # (B,)
        else:
            tokens = sample_categorical(warp_logits(logits, params.temperature, params.top_k, params.top_p),
                                        uniforms[row, step])
        ended = torch.isin(tokens, eos)
        for r, tok, end in zip(row.tolist(), tokens.tolist(), ended.tolist()):
            out[r].append(tok)
            finished[r] = end
        if step == max_new - 1 or bool(ended.all()):
            break
        if counts is not None:
            counts.scatter_add_(1, tokens[:, None], torch.ones_like(counts[:, :1]))
        if bool(ended.any()):  # finished rows leave the batch and every model's cache
            keep = (~ended).nonzero().squeeze(1)
            for m in members:
                m.cache.batch_select_indices(keep)
            mask, next_pos, row, tokens = mask[keep], next_pos[keep], row[keep], tokens[keep]
            counts = counts[keep] if counts is not None else None
        mask = torch.cat([mask, mask.new_ones(len(row), 1)], dim=1)
        logps = mix_logprobs([m.next_logprobs(input_ids=tokens[:, None], attention_mask=mask,
                                              position_ids=next_pos[:, None]) for m in members], coeffs)
        next_pos = next_pos + 1
    cache = sum(m.cache_bytes() for m in members)
    for m in members:
        m.cache = None  # free the caches between batches
    return list(zip(out, finished)), cache


def ensemble_generate(
    models: Sequence[nn.Module], coeffs: Sequence[float], prompt_ids: Sequence[Sequence[int]], params: SamplingParams,
    eos_ids: Sequence[int], pad_id: int, batch_size: int = 16, progress: bool = False, stats: dict | None = None,
) -> list[list[tuple[list[int], bool]]]:
    """``params.n`` completions per prompt from the per-token ensemble: [prompt][k] → (token ids, finished).

    Token ids end with the EOS when finished. Seeds as ``HFSampler``: a prompt gets the same samples
    whatever it is batched with. ``stats`` (if given) receives the tokens decoded, the models run and
    the largest KV cache held at the end of a batch (bytes, all models together).
    """
    member_models, live = live_members(models, coeffs)
    if batch_size < 1:
        raise ItermergeError(f"ensemble batch_size={batch_size}: must be >= 1")
    if any(len(p) == 0 for p in prompt_ids):
        raise ItermergeError("ensemble_generate: a prompt is empty; encode prompts with the chat template first")
    members = [_Member(m) for m in member_models]
    seeds = prompt_seeds([list(p) for p in prompt_ids], params.seed)
    rows = sorted(((p, k) for p in range(len(prompt_ids)) for k in range(params.n)),
                  key=lambda r: (len(prompt_ids[r[0]]), r[0], r[1]))
    results: list[list[Any]] = [[None] * params.n for _ in prompt_ids]
    peak_cache, tokens = 0, 0
    was_training = [m.training for m in member_models]
    for m in member_models:
        m.eval()
    try:
        for lo in tqdm(range(0, len(rows), batch_size), desc=f"ensemble of {len(members)}", unit="batch",
                       disable=not progress):
            chunk = rows[lo:lo + batch_size]
            decoded, cache = _decode(members, live, prompt_ids, chunk, seeds, params, eos_ids, pad_id)
            peak_cache = max(peak_cache, cache)
            for (p, k), (ids, done) in zip(chunk, decoded):
                results[p][k] = (ids, done)
                tokens += len(ids)
    finally:
        for m, training in zip(member_models, was_training):
            m.train(training)
    if stats is not None:
        stats.update(tokens=tokens, kv_cache_bytes=peak_cache, models_run=len(members))
    return results


class EnsembleSampler:
    """The ensemble as a ``sampling.Sampler``: anything that samples from a model can sample from eq. (6)."""

    def __init__(self, models: Sequence[nn.Module], coeffs: Sequence[float], tokenizer: Any, batch_size: int = 16,
                 progress: bool = True):
        live_members(models, coeffs)
        self.models, self.coeffs, self.tokenizer = list(models), list(coeffs), tokenizer
        self.batch_size, self.progress = batch_size, progress
        self.eos_ids = eos_token_ids(self.models[-1], tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        out = ensemble_generate(self.models, self.coeffs, prompt_ids, params, self.eos_ids, self.pad_id,
                                self.batch_size, self.progress)
        return [[Sample(self.tokenizer.decode(ids, skip_special_tokens=True), ids, done) for ids, done in per]
                for per in out]


# --- scoring given text ---------------------------------------------------------------------------


def next_token_logprobs(model: nn.Module, batch) -> Tensor:
    """log π(· | x, y_<i) over the whole vocabulary at each scored completion position: (N, V), N = scored tokens."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return logits[:, :-1][batch.completion_mask[:, 1:]].float().log_softmax(-1)  # (N, V)


def scoring_batches(prompt_ids, completion_ids, pad_id: int, batch_size: int, device):
    """(indices, batch, targets) in batches of similar length; every completion token is scored (EOS too)."""
    order = sorted(range(len(prompt_ids)), key=lambda i: -(len(prompt_ids[i]) + len(completion_ids[i])))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([prompt_ids[i] for i in idx], [completion_ids[i] for i in idx], pad_id).to(device)
        yield idx, batch, batch.input_ids[:, 1:][batch.completion_mask[:, 1:]]  # targets (N,)


@torch.no_grad()
def ensemble_token_logprobs(
    models: Sequence[nn.Module], coeffs: Sequence[float], prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8,
) -> list[list[float]]:
    """log π*(y_i | x, y_<i) of each token of each given completion under the per-token ensemble, in input order."""
    members, live = live_members(models, coeffs)
    out: list[list[float]] = [[] for _ in prompt_ids]
    for idx, batch, targets in scoring_batches(prompt_ids, completion_ids, pad_id, batch_size, next(members[0].parameters()).device):
        mixed = mix_logprobs([next_token_logprobs(m, batch) for m in members], live)  # (N, V)
        values = mixed.gather(1, targets[:, None]).squeeze(1).tolist()
        for i in idx:  # rows come in batch order, each sequence's tokens consecutively
            n = len(completion_ids[i])
            out[i], values = values[:n], values[n:]
    return out
