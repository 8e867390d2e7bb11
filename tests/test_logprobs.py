"""logprobs.py against a naive full-logits computation on the tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from itermerge.errors import ItermergeError
from itermerge.logprobs import (
    CompletionLogprobs,
    collate,
    collate_grouped,
    score_grouped,
    score_sequences,
    sequence_logprobs,
    token_logprobs,
)

pytestmark = pytest.mark.numeric  # run again under a second kernel set: make test, ATEN_CPU_CAPABILITY=avx2

EOS = 2
PROMPTS = [[1, 5, 6, 7], [1, 8], [1, 9, 10, 11, 12, 13], [1, 40, 41]]
COMPLETIONS = [[20, 21, EOS], [22, 23, 24, 25, 26, EOS], [30], [50, 51, 52, 53]]


def naive_logprob(model, prompt: list[int], completion: list[int]) -> float:
    """One unpadded sequence, full (1, L, V) logits, log-softmax, then the completion's tokens one by one."""
    with torch.no_grad():
        logp = model(torch.tensor([prompt + completion])).logits.log_softmax(-1)[0]  # (L, V)
    return sum(logp[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(completion))


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds contention on a shared CPU
    yield tiny_model(0)
    torch.set_num_threads(threads)


def test_collate_pads_right_and_marks_only_completion_tokens():
    batch = collate([[1, 5], [1, 6, 7]], [[8, EOS], [9]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 8, EOS], [1, 6, 7, 9]]
    batch = collate([[1, 5], [1]], [[8, EOS], [9]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 8, EOS], [1, 9, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.completion_mask.tolist() == [[False, False, True, True], [False, True, False, False]]
    assert batch.num_tokens == 6


def test_collate_masks_only_a_trailing_eos():
    batch = collate([[1, 5], [1]], [[8, EOS], [EOS, 9]], pad_id=0, eos_ids=[EOS])
    # The trailing EOS stays in the input but is not scored; an EOS inside a completion is scored.
    assert batch.input_ids.tolist() == [[1, 5, 8, EOS], [1, EOS, 9, 0]]
    assert batch.completion_mask.tolist() == [[False, False, True, False], [False, True, True, False]]


def test_collate_rejects_an_empty_prompt_and_mismatched_lists():
    with pytest.raises(ItermergeError, match="prompt 1 is empty"):
        collate([[1], []], [[5], [6]], pad_id=0)
    with pytest.raises(ItermergeError, match="2 prompts but 1 completions"):
        collate([[1], [1]], [[5]], pad_id=0)


def test_sequence_logprobs_equal_naive_full_logits_with_padding(model):
    batch = collate(PROMPTS, COMPLETIONS, pad_id=0)
    got = sequence_logprobs(model, batch)
    want = torch.tensor([naive_logprob(model, p, c) for p, c in zip(PROMPTS, COMPLETIONS)])
    assert got.shape == (4,)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.requires_grad


def test_eos_masking_drops_exactly_the_eos_token_logprob(model):
    masked = sequence_logprobs(model, collate(PROMPTS, COMPLETIONS, pad_id=0, eos_ids=[EOS]))
    want = torch.tensor([naive_logprob(model, p, c[:-1] if c[-1] == EOS else c) for p, c in zip(PROMPTS, COMPLETIONS)])
    torch.testing.assert_close(masked, want, atol=1e-5, rtol=1e-5)
    unmasked = sequence_logprobs(model, collate(PROMPTS, COMPLETIONS, pad_id=0))
    # Completions 2 and 3 have no trailing EOS: unchanged; 0 and 1 lose a (negative) term.
    torch.testing.assert_close(masked[2:], unmasked[2:])
    assert (masked[:2] > unmasked[:2]).all()


def test_token_logprobs_are_zero_outside_the_completion_and_match_per_token(model):
    batch = collate(PROMPTS, COMPLETIONS, pad_id=0)
    per_token = token_logprobs(model, batch)
    assert per_token.shape == batch.input_ids.shape
    assert (per_token[~batch.completion_mask] == 0).all()
    assert (per_token[batch.completion_mask] < 0).all()
    # Completion 1's third token under the naive computation.
    p, c = PROMPTS[1], COMPLETIONS[1]
    with torch.no_grad():
        logp = model(torch.tensor([p + c])).logits.log_softmax(-1)[0]
    torch.testing.assert_close(per_token[1, len(p) + 2], logp[len(p) + 1, c[2]], atol=1e-5, rtol=1e-5)


def test_full_logits_fallback_matches_the_hidden_state_path(model):
    batch = collate(PROMPTS, COMPLETIONS, pad_id=0)
    fast = CompletionLogprobs(model)
    slow = CompletionLogprobs(model)
    assert fast.from_hidden_states
    slow.from_hidden_states = False
    torch.testing.assert_close(fast(batch), slow(batch), atol=1e-5, rtol=1e-5)
    slow.accepts_logits_to_keep = False  # a model without `logits_to_keep`: full logits
    torch.testing.assert_close(fast(batch), slow(batch), atol=1e-5, rtol=1e-5)


def test_a_model_that_caps_its_logits_is_scored_through_its_own_forward():
    assert not CompletionLogprobs(tiny_model(0, final_logit_softcapping=30.0)).from_hidden_states
    assert not CompletionLogprobs(tiny_model(0, logit_scale=0.5)).from_hidden_states
    assert CompletionLogprobs(tiny_model(0, logit_scale=1.0)).from_hidden_states


def test_gradients_equal_those_of_the_naive_computation(model):
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # distinct weights so a row mix-up changes the gradient
    model.zero_grad()
    (weights * sequence_logprobs(model, collate(PROMPTS, COMPLETIONS, pad_id=0))).sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for w, p, c in zip(weights, PROMPTS, COMPLETIONS):
        logp = model(torch.tensor([p + c])).logits.log_softmax(-1)[0]
        (w * sum(logp[len(p) - 1 + j, tok] for j, tok in enumerate(c))).backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in got)
    model.zero_grad()


def test_score_sequences_is_batch_size_invariant_and_keeps_order(model):
    prompts = PROMPTS * 3
    completions = COMPLETIONS[1:] + COMPLETIONS[:1] + COMPLETIONS * 2
    one = score_sequences(model, prompts, completions, pad_id=0, batch_size=1)
    many = score_sequences(model, prompts, completions, pad_id=0, batch_size=5)
    want = [naive_logprob(model, p, c) for p, c in zip(prompts, completions)]
    assert one == pytest.approx(want, abs=1e-4)
    assert many == pytest.approx(want, abs=1e-4)
    assert not model.training


def test_score_sequences_restores_training_mode_and_checks_batch_size(model):
    model.train()
    score_sequences(model, PROMPTS[:1], COMPLETIONS[:1], pad_id=0)
    assert model.training
    model.eval()
    with pytest.raises(ItermergeError, match="batch_size=0"):
        score_sequences(model, PROMPTS, COMPLETIONS, pad_id=0, batch_size=0)


# Two completions per prompt (DPO's chosen and rejected), prompts of different lengths.
GROUPS = [
    [COMPLETIONS[0], [60, 61, 62, 63, EOS]],
    [COMPLETIONS[1], [64]],
    [COMPLETIONS[2], [65, 66]],
    [[67], COMPLETIONS[3]],
]


def flat_twin(eos_ids=()):
    """The grouped rows as ordinary sequences: prompt p repeated for each of its completions."""
    return collate([p for p in PROMPTS for _ in range(2)], [c for g in GROUPS for c in g], 0, eos_ids=eos_ids)


def test_collate_grouped_layout():
    batch = collate_grouped([[1, 5], [1]], [[[8, EOS], [9]], [[10, 11, 12], [EOS]]], pad_id=0, eos_ids=[EOS])
    assert batch.group_size == 2
    assert batch.prompt_ids.tolist() == [[1, 5], [1, 0]] and batch.prompt_mask.tolist() == [[1, 1], [1, 0]]
    assert batch.completion_ids.tolist() == [[8, EOS, 0], [9, 0, 0], [10, 11, 12], [EOS, 0, 0]]
    assert batch.completion_mask.int().tolist() == [[1, 0, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert batch.num_tokens == 3 + 2 + 1 + 3 + 1
    flat = batch.flatten()
    assert flat.input_ids.tolist() == [[1, 5, 8, EOS, 0], [1, 5, 9, 0, 0], [1, 10, 11, 12, 0], [1, EOS, 0, 0, 0]]
    assert flat.completion_mask.int().tolist() == [[0, 0, 1, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [0] * 5]
    with pytest.raises(ItermergeError, match="groups of sizes"):
        collate_grouped([[1], [1]], [[[5], [6]], [[7]]], pad_id=0)


def test_grouped_prompts_give_the_same_logprobs_and_gradients_as_flat_sequences(model):
    """The prompt runs once, packed with its completions in one row (with gradients) or through its KV
    cache; nothing may change but the cost."""
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25, 2.0, -0.5])
    packed, cached = CompletionLogprobs(model), CompletionLogprobs(model)
    cached.packs_groups = False
    assert packed.packs_groups and cached.cache_argument is not None  # both paths really run
    grouped = collate_grouped(PROMPTS, GROUPS, 0, eos_ids=[EOS])
    results = []
    for scorer, batch in ((packed, grouped), (cached, grouped), (packed, flat_twin(eos_ids=[EOS]))):
        model.zero_grad()
        logps = sequence_logprobs(scorer, batch)
        (weights * logps).sum().backward()
        results.append((logps.detach(), [p.grad.clone() for p in model.parameters()]))
    model.zero_grad()
    flat, flat_grads = results.pop()
    for logps, grads in results:
        torch.testing.assert_close(logps, flat, atol=1e-5, rtol=1e-5)
        for g, f in zip(grads, flat_grads):
            torch.testing.assert_close(g, f, atol=1e-5, rtol=1e-4)
    grouped = results[0][0]
    want = [naive_logprob(model, p, c[:-1] if c[-1] == EOS else c) for p, g in zip(PROMPTS, GROUPS) for c in g]
    assert grouped.tolist() == pytest.approx(want, abs=1e-4)


def test_grouped_batches_fall_back_to_flat_sequences(model):
    """Without a usable KV cache or packing, and under gradient checkpointing without gradients, grouped rows are
    scored as flat sequences; with gradients, checkpointing keeps the packed rows."""
    batch = collate_grouped(PROMPTS, GROUPS, 0)
    want = token_logprobs(model, batch)
    no_cache = CompletionLogprobs(model)
    no_cache.cache_argument, no_cache.packs_groups = None, False
    torch.testing.assert_close(token_logprobs(no_cache, batch), want, atol=1e-5, rtol=1e-5)
    checkpointed = tiny_model(0)
    enable = (
        getattr(checkpointed, "activation_checkpointing_enable", None) or checkpointed.gradient_checkpointing_enable
    )
    enable()
    checkpointed.train()
    torch.testing.assert_close(token_logprobs(checkpointed, batch), want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(checkpointed, batch), want, atol=1e-5, rtol=1e-5)


def test_score_grouped_matches_score_sequences(model):
    grouped = score_grouped(model, PROMPTS, GROUPS, pad_id=0, batch_size=3, eos_ids=[EOS])
    flat = score_sequences(
        model, [p for p in PROMPTS for _ in range(2)], [c for g in GROUPS for c in g], pad_id=0, eos_ids=[EOS]
    )
    assert [x for pair in grouped for x in pair] == pytest.approx(flat, abs=1e-5)


def test_scoring_without_gradients_runs_the_output_layer_in_blocks(model, monkeypatch):
    """θ0's log-probs of long completions would need (N, V) logits at once; in blocks of a few rows, the same."""
    import itermerge.logprobs.structure as logprobs

    flat_whole = score_sequences(model, PROMPTS, COMPLETIONS, pad_id=0, batch_size=4)
    grouped_whole = score_grouped(model, PROMPTS, GROUPS, pad_id=0, batch_size=4)
    calls = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    monkeypatch.setattr(logprobs, "SCORE_ROWS", 3)
    try:
        flat_blocks = score_sequences(model, PROMPTS, COMPLETIONS, pad_id=0, batch_size=4)
        grouped_blocks = score_grouped(model, PROMPTS, GROUPS, pad_id=0, batch_size=4)
    finally:
        handle.remove()
    assert calls and max(calls) <= 3  # every output-layer call saw at most 3 rows
    assert flat_blocks == pytest.approx(flat_whole, abs=1e-6)
    assert [x for g in grouped_blocks for x in g] == pytest.approx([x for g in grouped_whole for x in g], abs=1e-6)
