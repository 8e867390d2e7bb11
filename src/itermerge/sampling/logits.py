"""Next-token logits processing as HF's warpers and vLLM's penalties define it, and exact categorical sampling."""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """vLLM's presence/frequency penalties: logits − frequency·count − presence·[count > 0].

    logits (B, V); counts (B, V): how often each token occurs in the completion so far (the prompt
    does not count, as in vLLM). Applied to the raw logits, before temperature.
    """
    if frequency:
        logits = logits - frequency * counts
    if presence:
        logits = logits - presence * (counts > 0).to(logits.dtype)
    return logits


def top_k_mask(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """HF ``TopKLogitsWarper``: tokens scoring below the k-th best go to −inf (ties with it stay). (B, V)."""
    k = min(top_k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """HF ``TopPLogitsWarper``: keep the smallest set of most likely tokens holding mass ≥ top_p. (B, V).

    Sorted ascending, a token goes when the mass up to and including it is ≤ 1 − top_p; the most
    likely token always stays.
    """
    sorted_logits, order = torch.sort(logits, descending=False)  # (B, V)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def warp_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """HF's sampling order: divide by temperature, then top-k, then top-p. (B, V) → (B, V)."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        logits = top_k_mask(logits, top_k)
    if top_p < 1.0:
        logits = top_p_mask(logits, top_p)
    return logits


CDF_BLOCK = 256  # tokens per block of the two-level inverse CDF


def sample_categorical(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one token per row from softmax(logits) by inverting its CDF at ``uniforms``.

    logits (B, V), uniforms (B,) in [0, 1) → tokens (B,). The same law as ``torch.multinomial``
    (what HF uses), but each row's draw depends only on its own uniform, so a row's samples do not
    depend on which other rows share its batch. Tokens of probability 0 (−inf) are never drawn.

    Two levels, because a float64 cumulative sum over a 49k vocabulary was a fifth of a CPU decoding step
    (docs/benchmarks.md): the CDF of the blocks' masses (blocks summed
    in float32, accumulated in float64) picks the block, then a float64 CDF inside that block picks
    the token. The rounding of a block's mass is ~1e-7 of it, far below 1/V.
    """
    probs = logits.softmax(dim=-1)
    rows, vocab = probs.shape
    n_blocks = -(-vocab // CDF_BLOCK)
    if n_blocks * CDF_BLOCK != vocab:
        probs = torch.nn.functional.pad(probs, (0, n_blocks * CDF_BLOCK - vocab))
    blocks = probs.view(rows, n_blocks, CDF_BLOCK)
    mass = blocks.sum(dim=-1).double()  # (B, n_blocks)
    cdf = mass.cumsum(dim=-1)
    target = uniforms.to(torch.float64) * cdf[:, -1]  # (B,)
    index = torch.arange(rows, device=probs.device)
    # The first block whose cumulative mass exceeds the target; a block of zero mass is never chosen.
    j = torch.searchsorted(cdf, target[:, None], right=True).squeeze(-1).clamp_(max=n_blocks - 1)
    last_block = n_blocks - 1 - (mass > 0).flip(-1).int().argmax(dim=-1)
    j = torch.where(mass[index, j] > 0, j, last_block)
    before = torch.where(j > 0, cdf[index, (j - 1).clamp(min=0)], torch.zeros_like(target))
    inner = blocks[index, j]  # (B, CDF_BLOCK)
    inner_cdf = before[:, None] + inner.cumsum(dim=-1, dtype=torch.float64)
    i = torch.searchsorted(inner_cdf, target[:, None], right=True).squeeze(-1)
    # Where the block's float32 mass and its float64 CDF disagree in the last bits: its last positive token.
    i = torch.minimum(i, CDF_BLOCK - 1 - (inner > 0).flip(-1).int().argmax(dim=-1))
    return j * CDF_BLOCK + i
