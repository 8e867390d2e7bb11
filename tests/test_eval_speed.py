"""Cheaper evaluation: the prompts' common prefix prefilled once (``sampling.shared_prefix``), ended rows dropped.

Every test compares the fast path against the plain one and against a reference computed without any batching.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import itermerge.sampling.batch as batch_module
from itermerge.sampling import SamplingParams
from itermerge.sampling.batch import DecodeBatch, prefill, shared_prefix_length
from itermerge.sampling.hf import HFSampler
from itermerge.sampling.kv_cache import can_expand_rows, expand_rows, growing_cache, plain_cache
from itermerge.tokenization import encode_messages

pytestmark = pytest.mark.numeric  # run again under a second kernel set: make test, ATEN_CPU_CAPABILITY=avx2

EOS = (2, 73)  # 73: an extra stop id that the sharp model's greedy text hits early for some prompts only
SYSTEM = {"role": "system", "content": "You are a terse calculator. Reply with a number."}
MAX_NEW = 20
QUESTIONS = ["hi", "what is 2+2?", "a much longer prompt than the others", "12*3=", "ok", "x" * 20, "7-1"]


@pytest.fixture(scope="module")
def sharp_model():
    """A tiny 2-layer Llama with large weights, so greedy text varies from prompt to prompt."""
    model = tiny_model(0, initializer_range=0.5)
    model.generation_config.eos_token_id = list(EOS)
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def prompts(tiny_tok):
    """A chat template with a system prompt: 64 shared tokens, then user turns of 2 to 36 characters."""
    return [encode_messages(tiny_tok, [SYSTEM, {"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(sharp_model, prompts) -> list[list[int]]:
    return [reference_greedy(sharp_model, ids, MAX_NEW) for ids in prompts]


def reference_greedy(model, ids: list[int], max_new: int) -> list[int]:
    """Greedy tokens of one prompt by full forwards without cache, padding or batching: the definition."""
    seq, out = list(ids), []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            out.append(token)
            if token in EOS:
                break
            seq.append(token)
    return out


def prefills(monkeypatch) -> list[tuple[int, int]]:
    """Records (prompts, shared tokens) of every prefill."""
    seen: list[tuple[int, int]] = []
    real = batch_module.prefill

    def recording(forward, new_cache, prompt_ids, *args, **kwargs):
        seen.append((len(prompt_ids), kwargs.get("shared", 0)))
        return real(forward, new_cache, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(batch_module, "prefill", recording)
    return seen


# ---------------------------------------------------------------- the prefix, by hand


def test_shared_prefix_length_leaves_every_prompt_a_token_of_its_own():
    a, b, c = [1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 8, 9], [1, 2, 3, 4, 5, 6]
    assert shared_prefix_length([a, b]) == 6  # they agree on 6 tokens
    assert shared_prefix_length([a, b, c]) == 5  # c is all prefix: its last token stays its own
    assert shared_prefix_length([a, a]) == 6  # identical prompts: all but the last token
    assert shared_prefix_length([a]) == 0  # nothing to share with
    assert shared_prefix_length([a, [1, 2, 3, 9]]) == 0  # 3 tokens: under MIN_SHARED_PREFIX = 4


@pytest.mark.parametrize("growing", [True, False])
def test_expanded_prefix_is_the_prefix_in_every_row(growing):
    cfg = tiny_model(0).config
    cache = growing_cache(cfg, 16) if growing else plain_cache(cfg)
    assert can_expand_rows(cache)
    keys = torch.randn(1, 2, 5, 8)
    for layer in cache.layers:
        layer.update(keys, -keys)
    expand_rows(cache, 3)
    for layer in cache.layers:
        assert layer.keys.shape == (3, 2, 5, 8) and torch.equal(layer.keys, keys.expand(3, -1, -1, -1))
        assert torch.equal(layer.values, -keys.expand(3, -1, -1, -1))
        if not growing:
            assert layer.keys.stride(0) == 0  # a view of the one row, not a copy
    assert cache.get_seq_length() == 5


def test_shared_prefill_gives_each_prompts_own_logits(sharp_model, tiny_tok, prompts):
    """The last-position logits of the shared prefill are each prompt's alone (full forward, batch 1), its mask has
    the prefix, the padding and the rest where they belong, and a row's next position is its length."""
    shared = shared_prefix_length(prompts)
    assert shared > 40  # the system turn
    with torch.no_grad():
        plain = [sharp_model(torch.tensor([p])).logits[0, -1] for p in prompts]
        forward = HFSampler(sharp_model, tiny_tok, progress=False)._forward
        cache, logits, mask, lengths = prefill(forward, lambda n: growing_cache(sharp_model.config, n), prompts, 0,
                                               torch.device("cpu"), room=4, shared=shared)
    torch.testing.assert_close(logits, torch.stack(plain), rtol=1e-4, atol=1e-4)
    width = max(map(len, prompts))
    assert mask.shape == (len(prompts), width) and cache.get_seq_length() == width
    for row, p in zip(mask.tolist(), prompts):
        assert row == [1] * shared + [0] * (width - len(p)) + [1] * (len(p) - shared)
    assert lengths.tolist() == [len(p) for p in prompts]


@pytest.mark.parametrize("broken", ["positions", "mask"])
def test_a_misaligned_prefix_is_caught(sharp_model, tiny_tok, prompts, broken):
    """The check above fails when the rest of a prompt is not aligned with the shared prefix: position ids that
    restart at 0 after it (as if it were not there), or a mask that also hides the prefix's last token."""
    shared = shared_prefix_length(prompts)
    real = HFSampler(sharp_model, tiny_tok, progress=False)._forward

    def misaligned(cache, **inputs):
        if inputs["input_ids"].shape[0] > 1:  # the call for the rest of each prompt
            if broken == "positions":
                inputs["position_ids"] = (inputs["position_ids"] - shared).clamp(min=0)
            else:
                inputs["attention_mask"] = inputs["attention_mask"].clone()
                inputs["attention_mask"][:, shared - 1] = 0
        return real(cache, **inputs)

    with torch.no_grad():
        plain = torch.stack([sharp_model(torch.tensor([p])).logits[0, -1] for p in prompts])
        _, logits, _, _ = prefill(misaligned, lambda n: growing_cache(sharp_model.config, n), prompts, 0,
                                  torch.device("cpu"), room=4, shared=shared)
    assert not torch.allclose(logits, plain, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- whole generations


@pytest.mark.parametrize(
    "batch_size, room, growing",
    [(8, 128, True), (3, 128, True), (3, 1, True), (3, 128, False)],
)  # all rows at once; rows joining mid-way; cache buffers doubling mid-way; transformers' own cache, batch by batch
def test_shared_prefix_greedy_is_the_plain_greedy_and_the_reference(
    sharp_model, tiny_tok, prompts, reference, batch_size, room, growing, monkeypatch
):
    monkeypatch.setattr(batch_module, "INITIAL_ROOM", room)
    params = SamplingParams(n=1, temperature=0, max_new_tokens=MAX_NEW)
    plain = HFSampler(sharp_model, tiny_tok, batch_size=batch_size, progress=False, shared_prefix=False,
                      growing_kv_cache=growing).generate(prompts, params)
    seen, joins = prefills(monkeypatch), []
    real_append = batch_module.append_rows
    monkeypatch.setattr(batch_module, "append_rows", lambda *a: joins.append(1) or real_append(*a))
    fast = HFSampler(sharp_model, tiny_tok, batch_size=batch_size, progress=False,
                     growing_kv_cache=growing).generate(prompts, params)
    assert bool(joins) == (growing and batch_size < len(prompts))  # rows with a shared prefix joined mid-way
    # The default: every group of prompts prefilled together shared its system turn (a lone prompt has no one to).
    assert all(shared > 40 for n, shared in seen if n > 1) and any(n > 1 for n, _ in seen)
    assert fast == plain
    assert [sample.token_ids for (sample,) in fast] == reference
    ends = [s.finished for (s,) in fast]
    assert any(ends) and not all(ends)  # rows ended by EOS and by length


def test_ended_rows_leave_the_batch_and_keep_their_tokens(sharp_model, tiny_tok, prompts, reference, monkeypatch):
    """One batch of all rows: the steps run on fewer rows once some have ended, and those rows still come back
    whole (EOS included) and equal to the reference."""
    widths: list[int] = []
    real_forward = DecodeBatch.forward
    monkeypatch.setattr(DecodeBatch, "forward", lambda self: widths.append(self.size) or real_forward(self))
    out = HFSampler(sharp_model, tiny_tok, batch_size=len(prompts), progress=False).generate(
        prompts, SamplingParams(n=1, temperature=0, max_new_tokens=MAX_NEW))
    assert widths[0] == len(prompts) and widths[-1] < widths[0]  # rows were dropped
    lengths = [len(s.token_ids) for (s,) in out]
    assert sum(widths) < len(widths) * len(prompts)  # fewer row-steps than without dropping
    early = [s for (s,) in out if s.finished and len(s.token_ids) < MAX_NEW]
    assert early and all(s.token_ids[-1] in EOS for s in early)
    assert [sample.token_ids for (sample,) in out] == reference
    assert max(lengths) == MAX_NEW


def test_sampling_keeps_its_seeded_draws(sharp_model, tiny_tok, prompts):
    """Temperature 1, K = 3: the shared prefix changes no draw (each row's uniforms are keyed on its prompt and k)."""
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=16, seed=7)
    fast = HFSampler(sharp_model, tiny_tok, batch_size=4, progress=False).generate(prompts, params)
    plain = HFSampler(sharp_model, tiny_tok, batch_size=4, progress=False, shared_prefix=False).generate(
        prompts, params)
    assert fast == plain
    assert len({s.text for row in fast for s in row}) > len(prompts)  # the samples do differ


def test_shared_prefix_off_prefills_prompts_whole(sharp_model, tiny_tok, prompts, monkeypatch):
    seen = prefills(monkeypatch)
    HFSampler(sharp_model, tiny_tok, batch_size=4, progress=False, shared_prefix=False).generate(
        prompts, SamplingParams(n=1, temperature=0, max_new_tokens=4))
    assert seen and {shared for _, shared in seen} == {0}
