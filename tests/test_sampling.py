"""Sampling: parameters, HF-exact logit warping, exact categorical draws, the HF backend against generate, vLLM."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import tiny_model

from itermerge.errors import ItermergeError
from itermerge.sampling import Sample, Sampler, SamplingParams, make_sampler, prompt_seeds
from itermerge.sampling.hf import HFSampler
from itermerge.sampling.logits import apply_penalties, sample_categorical, top_k_mask, top_p_mask, warp_logits
from itermerge.sampling.vllm import import_vllm, to_sample, vllm_sampling_kwargs
from itermerge.tokenization import encode_messages, stop_token_ids

pytestmark = pytest.mark.numeric  # run again under a second kernel set: make test, ATEN_CPU_CAPABILITY=avx2

INF = float("inf")
EXTRA_EOS = 73  # with initializer_range=0.5 the tiny model's greedy text hits 73 early for some prompts only


@pytest.fixture(scope="module")
def sharp_model():
    """A tiny Llama with large weights, so greedy text varies; EOS ids (2, 73) end some rows early."""
    model = tiny_model(0, initializer_range=0.5)
    model.generation_config.eos_token_id = [2, EXTRA_EOS]
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def prompts(tiny_tok):
    texts = ["hi", "what is 2+2?", "a much longer prompt than the others", "12*3=", "ok"]
    return [encode_messages(tiny_tok, [{"role": "user", "content": t}]) for t in texts]


# ---------------------------------------------------------------- parameters


def test_defaults_are_the_training_column_and_evaluation_is_appendix_a():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_new_tokens) == (8, 1.0, 1.0, 0, 1024)
    assert SamplingParams.training() == p
    e = SamplingParams.evaluation(n=2)
    assert (e.n, e.temperature, e.top_p, e.top_k) == (2, 0.7, 0.9, 40)
    assert (e.presence_penalty, e.frequency_penalty, e.max_new_tokens) == (0.1, 0.1, 1024)
    assert SamplingParams(temperature=0).greedy and not p.greedy


@pytest.mark.parametrize(
    "field, value",
    [("n", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("top_k", 2.5),
     ("max_new_tokens", 0), ("seed", -1), ("presence_penalty", 3.0), ("frequency_penalty", -2.5)],
)
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ItermergeError, match=f"SamplingParams.{field} = "):
        SamplingParams(**{field: value})


def test_prompt_seeds_follow_content_not_position():
    a, b = [5, 6, 7], [8, 9]
    s_ab, s_ba = prompt_seeds([a, b], 0), prompt_seeds([b, a], 0)
    assert s_ab == s_ba[::-1]
    assert prompt_seeds([a], 1) != prompt_seeds([a], 0)
    twice = prompt_seeds([a, a], 0)
    assert twice[0] == s_ab[0] and twice[1] != twice[0]  # a repeated prompt gets fresh samples
    assert all(0 <= s < 2**63 for s in twice)


# ---------------------------------------------------------------- logits processing, by hand


def test_top_k_keeps_the_k_best_and_their_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 5.0, 4.0], [1.0, 2.0, 2.0, 0.0, -1.0]])
    out = top_k_mask(logits, 2)
    assert out[0].tolist() == [-INF, -INF, -INF, 5.0, 4.0]
    assert out[1].tolist() == [-INF, 2.0, 2.0, -INF, -INF]
    assert top_k_mask(logits, 1)[1].tolist() == [-INF, 2.0, 2.0, -INF, -INF]  # a tie with the k-th stays
    assert torch.equal(top_k_mask(logits, 99), logits)


def test_top_p_keeps_the_smallest_nucleus_with_enough_mass():
    """probs (.5, .25, .15, .1). Ascending cumulative mass: .1, .25, .5, 1.
    top_p = .7 removes what sits at ≤ .3: {.1, .15} → keeps .5 and .25 (mass .75 ≥ .7).
    top_p = .8 removes what sits at ≤ .2: {.1} only.  top_p = .4 keeps only the best token."""
    logits = torch.tensor([[0.5, 0.25, 0.15, 0.1]]).log()
    assert torch.isinf(top_p_mask(logits, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_p_mask(logits, 0.8)).tolist() == [[False, False, False, True]]
    assert torch.isinf(top_p_mask(logits, 0.4)).tolist() == [[False, True, True, True]]
    kept = top_p_mask(logits, 0.7)
    assert kept[0, :2].tolist() == logits[0, :2].tolist()


def test_temperature_divides_the_logits_before_truncation():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    assert warp_logits(logits, 0.5, 0, 1.0).tolist() == [[4.0, 2.0, 0.0]]
    # probs at T=1 ≈ (.665, .245, .090): top_p .8 keeps two; at T=.5, (.867, .117, .016): keeps one.
    assert torch.isinf(warp_logits(logits, 1.0, 0, 0.8)).tolist() == [[False, False, True]]
    assert torch.isinf(warp_logits(logits, 0.5, 0, 0.8)).tolist() == [[False, True, True]]


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 40, 0.9), (1.3, 5, 1.0), (0.5, 0, 0.6)])
def test_warping_equals_hf_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    hf = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        hf.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        hf.append(TopPLogitsWarper(top_p))
    expected = hf(torch.zeros(6, 1, dtype=torch.long), logits.clone())
    assert torch.equal(warp_logits(logits, temperature, top_k, top_p), expected)
    if top_k or top_p < 1:
        assert torch.isinf(expected).any()  # the comparison covers truncation


def test_penalties_are_vllms():
    """logit − frequency·count − presence·[count>0]: counts (0, 1, 3), presence .5, frequency .1 →
    (1, 1 − .1 − .5, 1 − .3 − .5) = (1, .4, .2)."""
    out = apply_penalties(torch.ones(1, 3), torch.tensor([[0.0, 1.0, 3.0]]), presence=0.5, frequency=0.1)
    assert torch.allclose(out, torch.tensor([[1.0, 0.4, 0.2]]))


def test_categorical_draw_inverts_the_cdf_and_skips_removed_tokens():
    """probs (.5, 0, .25, .25) → CDF (.5, .5, .75, 1): u=.1 → 0, u=.6 → 2 (never 1), u=.8 → 3."""
    logits = torch.tensor([[0.5, 0.0, 0.25, 0.25]]).log().expand(4, 4)
    u = torch.tensor([0.0, 0.1, 0.6, 0.8], dtype=torch.float64)
    assert sample_categorical(logits, u).tolist() == [0, 0, 2, 3]


def test_categorical_frequencies_match_probabilities():
    """With N evenly spaced uniforms each token's frequency is its probability to within 1/N."""
    n = 10_000
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    drawn = sample_categorical(probs.log().expand(n, 5), u)
    freq = torch.bincount(drawn, minlength=5).double() / n
    assert (freq - probs.double()).abs().max() <= 1.0 / n + 1e-6


def test_two_level_cdf_matches_the_flat_inverse_and_never_draws_removed_tokens(monkeypatch):
    """Blocks of 16 over 1000 tokens (a ragged last block), a whole block removed: the same draws as one float64 CDF."""
    monkeypatch.setattr("itermerge.sampling.logits.CDF_BLOCK", 16)
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 1000, generator=g) ** 4
    probs[:, 32:48] = 0.0  # a removed block
    probs[:, ::7] = 0.0  # removed tokens everywhere (top-k / top-p masks)
    probs[1, 990:] = 0.0  # removed tail
    n = 2000
    u = ((torch.arange(n, dtype=torch.float64) + 0.5) / n).repeat(3)
    logits = probs.log().repeat_interleave(n, dim=0)
    drawn = sample_categorical(logits, u)
    flat = probs.double() / probs.double().sum(-1, keepdim=True)
    cdf = flat.repeat_interleave(n, dim=0).cumsum(-1)
    expected = torch.searchsorted(cdf, u[:, None], right=True).squeeze(-1)
    assert (drawn == expected).double().mean() > 0.999
    assert (logits.gather(1, drawn[:, None]) > float("-inf")).all()


# ---------------------------------------------------------------- the HF backend


def test_growing_cache_layers_equal_concatenation():
    from conftest import tiny_config
    from transformers.cache_utils import DynamicLayer

    from itermerge.sampling.kv_cache import growing_cache

    cache = growing_cache(tiny_config(), capacity=2)
    assert len(cache.layers) == 2 and not any(type(layer) is DynamicLayer for layer in cache.layers)
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(3, 2, n, 8, generator=g) for n in (3, 1, 1, 1)]  # (B, H_kv, T, D): prefill, 3 steps
    for i, chunk in enumerate(chunks):
        keys, values = cache.update(chunk, -chunk, layer_idx=0)
        expected = torch.cat(chunks[: i + 1], dim=2)
        assert torch.equal(keys, expected) and torch.equal(values, -expected)
    assert cache.get_seq_length() == 6 and cache.layers[0].capacity >= 6
    cache.batch_select_indices(torch.tensor([2, 0, 0]))
    keys, _ = cache.update(chunks[1][:3], chunks[1][:3], layer_idx=0)
    assert torch.equal(keys, torch.cat([expected[[2, 0, 0]], chunks[1]], dim=2))


def test_eos_ids_come_from_generation_config(sharp_model, tiny_tok):
    assert stop_token_ids(sharp_model, tiny_tok) == (2, EXTRA_EOS)
    assert stop_token_ids(tiny_model(0), tiny_tok) == (2,)


@pytest.mark.parametrize(
    "room, refill",
    [(128, True), (1, True), (128, False)],  # room 1: cache buffers double mid-way; no refill: batch by batch
)
def test_greedy_matches_hf_generate_token_for_token(sharp_model, tiny_tok, prompts, room, refill, monkeypatch):
    import itermerge.sampling.batch as batch_module

    joins = []
    real_append = batch_module.append_rows
    monkeypatch.setattr(batch_module, "INITIAL_ROOM", room)
    monkeypatch.setattr(batch_module, "append_rows", lambda *a: joins.append(1) or real_append(*a))
    # sampling.growing_kv_cache off: transformers' own cache, which rows join only when the batch is empty
    sampler = HFSampler(sharp_model, tiny_tok, batch_size=3, progress=False, growing_kv_cache=refill)  # 5 greedy rows
    assert isinstance(sampler, Sampler)
    out = sampler.generate(prompts, SamplingParams(n=2, temperature=0, max_new_tokens=24))
    assert bool(joins) == refill  # rows did join a running batch (or, without refill, never did)
    finished = []
    for ids, samples in zip(prompts, out):
        ref = sharp_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)[0, len(ids) :].tolist()
        if ref[-1] == 0 or ref[-1] in (2, EXTRA_EOS):  # generate pads after EOS: cut at the first EOS
            ref = ref[: next(i for i, t in enumerate(ref) if t in (2, EXTRA_EOS)) + 1]
        assert samples[0].token_ids == ref and samples[1].token_ids == ref
        finished.append(samples[0].finished)
        assert samples[0].finished == (ref[-1] in (2, EXTRA_EOS))
    assert any(finished) and not all(finished)  # both ways of ending were exercised


def test_greedy_penalties_match_an_uncached_reference_loop(sharp_model, tiny_tok, prompts):
    params = SamplingParams(n=1, temperature=0, max_new_tokens=12, presence_penalty=1.5, frequency_penalty=0.7)
    sampler = HFSampler(sharp_model, tiny_tok, batch_size=3, progress=False)
    out = sampler.generate(prompts, params)
    changed = False
    for ids, (sample,) in zip(prompts, out):
        seq, counts, ref = list(ids), torch.zeros(1, 128), []
        with torch.no_grad():
            for _ in range(params.max_new_tokens):
                logits = sharp_model(torch.tensor([seq])).logits[:, -1]
                token = int(apply_penalties(logits, counts, 1.5, 0.7).argmax())
                ref.append(token)
                changed |= token != int(logits.argmax())
                if token in (2, EXTRA_EOS):
                    break
                seq.append(token)
                counts[0, token] += 1
        assert sample.token_ids == ref
    assert changed  # the penalties did change some choice


def test_samples_are_reproducible_and_independent_of_batching(sharp_model, tiny_tok, prompts):
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=16, seed=7)
    a = HFSampler(sharp_model, tiny_tok, batch_size=64, progress=False).generate(prompts, params)
    b = HFSampler(sharp_model, tiny_tok, batch_size=2, progress=False).generate(prompts, params)
    c = HFSampler(sharp_model, tiny_tok, batch_size=5, progress=False).generate(prompts[::-1], params)
    assert a == b == c[::-1]
    texts = [s.text for row in a for s in row]
    assert len(set(texts)) > len(texts) // 2  # samples differ between k and between prompts
    other = HFSampler(sharp_model, tiny_tok, progress=False).generate(
        prompts, SamplingParams(**{**params.__dict__, "seed": 8})
    )
    assert other != a


def test_sample_contract_eos_kept_in_ids_and_dropped_from_text(sharp_model, tiny_tok, prompts):
    out = HFSampler(sharp_model, tiny_tok, progress=False).generate(prompts, SamplingParams(n=4, max_new_tokens=20))
    assert [len(row) for row in out] == [4] * len(prompts)
    samples = [s for row in out for s in row]
    assert any(s.finished for s in samples) and not all(s.finished for s in samples)
    for s in samples:
        assert isinstance(s, Sample)
        eos_at = [i for i, t in enumerate(s.token_ids) if t in (2, EXTRA_EOS)]
        if s.finished:
            assert eos_at == [len(s.token_ids) - 1]
        else:
            assert eos_at == [] and len(s.token_ids) == 20
        assert s.text == tiny_tok.decode(s.token_ids, skip_special_tokens=True)
        assert "<|im_end|>" not in s.text


def test_top_k_one_sampling_is_greedy(sharp_model, tiny_tok, prompts):
    sampler = HFSampler(sharp_model, tiny_tok, progress=False)
    greedy = sampler.generate(prompts, SamplingParams(n=1, temperature=0, max_new_tokens=10))
    top1 = sampler.generate(prompts, SamplingParams(n=2, temperature=1.3, top_k=1, max_new_tokens=10))
    assert [[s.token_ids for s in row] for row in top1] == [[row[0].token_ids] * 2 for row in greedy]


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 6, 0.9)])
def test_first_token_law_is_the_warped_softmax(sharp_model, tiny_tok, prompts, temperature, top_k, top_p):
    """N draws of the first token: each token's frequency lies within 5 standard errors of its
    probability under HF's warping of the model's logits (false alarm odds ~1e-6 per token)."""
    n, ids = 3000, prompts[1]
    with torch.no_grad():
        logits = sharp_model(torch.tensor([ids])).logits[:, -1]
    probs = warp_logits(logits, temperature, top_k, top_p).softmax(-1)[0].double()
    params = SamplingParams(n=n, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=1)
    (samples,) = HFSampler(sharp_model, tiny_tok, batch_size=n, progress=False).generate([ids], params)
    freq = torch.bincount(torch.tensor([s.token_ids[0] for s in samples]), minlength=128).double() / n
    assert (freq[probs == 0] == 0).all()
    bound = 5 * (probs * (1 - probs) / n).sqrt() + 1e-9
    assert ((freq - probs).abs() <= bound).all()
    assert (probs > 0.01).sum() >= 2  # a law with several likely tokens, so the check has teeth


def test_user_mistakes_are_named(sharp_model, tiny_tok):
    sampler = HFSampler(sharp_model, tiny_tok, progress=False)
    with pytest.raises(ItermergeError, match=r"prompt_ids\[1\] is empty"):
        sampler.generate([[5, 6], []], SamplingParams(n=1, max_new_tokens=2))
    with pytest.raises(ItermergeError, match=r"prompt_ids\[0\] has token id 500"):
        sampler.generate([[5, 500]], SamplingParams(n=1, max_new_tokens=2))
    with pytest.raises(ItermergeError, match="batch_size = 0"):
        HFSampler(sharp_model, tiny_tok, batch_size=0)
    assert sampler.generate([], SamplingParams()) == []


def test_make_sampler_backends(sharp_model, tiny_tok):
    assert isinstance(make_sampler("hf", sharp_model, tiny_tok, batch_size=8, progress=False), HFSampler)
    with pytest.raises(ItermergeError, match="backend 'sglang' is unknown: use 'hf' or 'vllm'"):
        make_sampler("sglang", sharp_model, tiny_tok)
    with pytest.raises(ItermergeError, match="needs a checkpoint path"):
        make_sampler("vllm", sharp_model, tiny_tok)


def test_sampling_restores_training_mode(sharp_model, tiny_tok, prompts):
    sharp_model.train()
    try:
        HFSampler(sharp_model, tiny_tok, progress=False).generate(prompts[:1], SamplingParams(n=1, max_new_tokens=2))
        assert sharp_model.training
    finally:
        sharp_model.eval()


# ---------------------------------------------------------------- the vLLM backend (mapping only; no vLLM here)


def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ItermergeError, match=r"pip install 'itermerge\[vllm\]'"):
        import_vllm()
    with pytest.raises(ItermergeError, match=r"itermerge\[vllm\]"):
        make_sampler("vllm", "/some/checkpoint")


def test_vllm_params_mapping():
    kw = vllm_sampling_kwargs(SamplingParams.evaluation(n=8, max_new_tokens=64), [2, 7], request_seed=11)
    assert kw == dict(n=8, temperature=0.7, top_p=0.9, top_k=40, presence_penalty=0.1, frequency_penalty=0.1,
                      max_tokens=64, seed=11, stop_token_ids=[2, 7], skip_special_tokens=True)
    train = vllm_sampling_kwargs(SamplingParams(), [2], request_seed=0)
    assert (train["top_k"], train["top_p"], train["temperature"], train["n"]) == (-1, 1.0, 1.0, 8)
    assert vllm_sampling_kwargs(SamplingParams(n=4, temperature=0), [2], 0)["n"] == 1


def test_vllm_outputs_become_samples():
    assert to_sample("hi", [5, 2], "stop", [2]) == Sample("hi", [5, 2], True)
    assert to_sample("hi", [5], "stop", [2]) == Sample("hi", [5, 2], True)  # EOS put back if dropped
    assert to_sample("hi", [5, 6], "length", [2]) == Sample("hi", [5, 6], False)


# ---------------------------------------------------------------- the real model, once


@pytest.mark.slow
def test_greedy_matches_generate_on_smollm2():
    """batch_size 2 for 3 prompts: the third joins the running batch when a short answer ends."""
    from itermerge.checkpoint import load_model, load_tokenizer, resolve_model
    from itermerge.tokenization import encode_prompt

    path = resolve_model("smollm2-135m-instruct")
    model, tok = load_model(path), load_tokenizer(path)
    questions = ["What is 17 + 25? Reply with just the number.", "Name a prime number larger than 10.", "Say hi."]
    ids = [encode_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(n=1, temperature=0, max_new_tokens=48)
    out = HFSampler(model, tok, batch_size=2, progress=False).generate(ids, params)
    for prompt, (sample,) in zip(ids, out):
        ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=48)[0, len(prompt) :].tolist()
        assert sample.token_ids == ref
    assert any(s.finished for (s,) in out)


def test_every_sampler_speed_setting_off_gives_the_same_samples(sharp_model, tiny_tok, prompts):
    """sampling.blocked_output_layer, growing_kv_cache and grouped_query_sdpa off (``--plain``): the same samples."""
    plain = dict(blocked_output_layer=False, growing_kv_cache=False, grouped_query_sdpa=False, shared_prefix=False)
    for params in (
        SamplingParams(n=1, temperature=0, max_new_tokens=16),
        SamplingParams(n=3, max_new_tokens=16, seed=5),
    ):
        fast = HFSampler(sharp_model, tiny_tok, batch_size=4, progress=False)
        slow = HFSampler(sharp_model, tiny_tok, batch_size=4, progress=False, **plain)
        assert fast._split is not None and slow._split is None  # the settings did switch the path
        assert fast.generate(prompts, params) == slow.generate(prompts, params)


# ---------------------------------------------------------------- the registry of backends


def test_every_registered_backend_resolves_to_the_protocols():
    """Each BACKENDS entry is a SamplerBackend; the samplers it makes have generate, update_weights and close."""
    from itermerge.sampling.backends import BACKENDS, backend
    from itermerge.sampling.hf import HFSampler
    from itermerge.sampling.params import SamplerBackend
    from itermerge.sampling.vllm_process import VLLMSampler

    assert sorted(BACKENDS) == ["hf", "vllm"]
    for name in BACKENDS:
        entry = backend(name)
        assert all(callable(getattr(entry, m, None)) for m in SamplerBackend.__dict__ if not m.startswith("_")
                   and callable(SamplerBackend.__dict__[m])), name
    assert {"generate", "update_weights", "close"} <= set(dir(HFSampler)) & set(dir(VLLMSampler))


def test_hf_sampler_loads_weights_in_place_and_closes(sharp_model, tiny_tok, prompts):
    import copy

    other = copy.deepcopy(sharp_model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    params = SamplingParams(n=2, max_new_tokens=4, seed=1)
    sampler = make_sampler("hf", copy.deepcopy(sharp_model), tiny_tok, progress=False)
    before = sampler.generate(prompts[:3], params)
    weight = sampler.model.lm_head.weight
    assert sampler.update_weights(other.state_dict()) == len(other.state_dict())
    assert sampler.model.lm_head.weight is weight  # in place
    assert sampler.generate(prompts[:3], params) == HFSampler(other, tiny_tok, progress=False).generate(prompts[:3],
                                                                                                        params)
    sampler.update_weights(sharp_model.state_dict())
    assert sampler.generate(prompts[:3], params) == before
    with pytest.raises(ItermergeError, match=r"1 tensor\(s\) the model does not have, e.g. 'extra.weight'"):
        sampler.update_weights({"extra.weight": torch.ones(1)})
    sampler.close()
    with pytest.raises(ItermergeError, match="closed; build a new HFSampler"):
        sampler.generate(prompts[:1], params)


def test_a_new_backend_is_one_module_and_one_registry_line(tiny_ckpts, monkeypatch):
    """tests/fake_backend.py, registered by one line, samples a run's stage and its evaluations."""
    import fake_backend

    from itermerge import iteration
    from itermerge.config import from_dict
    from itermerge.devices import CPU
    from itermerge.prompts import training_prompts
    from itermerge.runner import Shard
    from itermerge.sampling.backends import BACKENDS, evaluation_sampler

    monkeypatch.setitem(BACKENDS, "echo", "fake_backend:BACKEND")  # the one line
    cfg = from_dict({"model": {"path": str(tiny_ckpts[0])}, "sampling": {"backend": "echo", "n": 2},
                     "prompts": {"per_iteration": 3}})
    prompts = training_prompts(cfg, 1)
    out = iteration.sample_shard(cfg, 1, tiny_ckpts[0], prompts, Shard())
    (stage,) = fake_backend.BACKEND.samplers
    assert stage.closed and len(out["completions"]) == 3 * 2
    assert all(len(c.token_ids) == 1 for c in out["completions"])
    with evaluation_sampler(cfg, CPU, tiny_ckpts[-1]) as make:
        assert make(torch.nn.Linear(2, 2), None, 1, False).generate([[4, 9]], SamplingParams(n=1)) == [
            [Sample(text="", token_ids=[9, 9], finished=False)]]
    assert fake_backend.BACKEND.samplers[-1].closed


def test_preflight_names_an_unknown_backend(tiny_ckpts):
    from itermerge.config import from_dict
    from itermerge.preflight import preflight

    cfg = from_dict({"model": {"path": str(tiny_ckpts[0])}, "sampling": {"backend": "sglang"}})
    with pytest.raises(ItermergeError, match=r"sampling.backend: sampling backend 'sglang' is unknown: use 'hf' or "
                                             r"'vllm'"):
        preflight(cfg)
    preflight(from_dict({"model": {"path": str(tiny_ckpts[0])}, "sampling": {"backend": "vllm"}}))
