"""The exact ensemble (eq. 6) against hand numbers, HFSampler, logprobs and an unbatched oracle; merge vs ensemble."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from itermerge.checkpoint import load_model
from itermerge.errors import ItermergeError
from itermerge.logprobs import collate, token_logprobs
from itermerge.logprobs.ensemble import ensemble_token_logprobs, live_members
from itermerge.maths.ensemble import (
    dera_coefficients,
    eft_coefficients,
    ensemble_coefficients,
    kl_per_position,
    merge_coefficients,
    mix_logprobs,
)
from itermerge.maths.merge import merge_weights
from itermerge.records import Prompt
from itermerge.sampling import SamplingParams
from itermerge.sampling.ensemble import EnsembleSampler, ensemble_generate
from itermerge.sampling.hf import HFSampler
from itermerge.studies.approximation import (
    approximation_error,
    approximation_study,
    decoding_cost,
    merged_model,
    uniform_average,
)

pytestmark = pytest.mark.numeric  # run again under a second kernel set: make test, ATEN_CPU_CAPABILITY=avx2

EOS, PAD = 2, 0
PROMPTS = [[1, 5, 6, 7], [1, 8], [1, 9, 10, 11, 12, 13], [1, 40, 41]]
COMPLETIONS = [[20, 21, EOS], [22, 23, 24, 25, 26, EOS], [30], [50, 51, 52, 53]]
GREEDY = SamplingParams(n=1, temperature=0.0, max_new_tokens=10)
SAMPLED = SamplingParams(n=3, temperature=0.9, top_k=40, top_p=0.9, presence_penalty=0.2, frequency_penalty=0.1,
                         max_new_tokens=10, seed=7)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds contention on a shared CPU
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sharp():
    """θ0..θ2: tiny Llamas with large weights (greedy text varies); EOS ids (2, 73) end some rows early."""
    models = [tiny_model(seed, initializer_range=0.5) for seed in (1, 2, 0)]  # θT = seed 0: 73 ends some rows
    for m in models:
        m.generation_config.eos_token_id = [EOS, 73]
    return models


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def texts(samples):
    return [[s.token_ids for s in per] for per in samples]


def test_coefficients_follow_eq_6_and_eq_10():
    # T=3, λ=0.3, α=0.4: k_t = 1.4·0.3/2 = 0.21 (t<3), k_3 = 1.4·0.7 = 0.98, c0 = 1 − 1.4 = −0.4.
    assert merge_coefficients(3, 0.3, 0.4) == pytest.approx([-0.4, 0.21, 0.21, 0.98])
    assert merge_coefficients(3, 0.3, 0.4)[1:] == pytest.approx(merge_weights(3, 0.3, 0.4))
    assert eft_coefficients(0.5, 0.25) == pytest.approx([0.25, 0.5, 0.25])
    assert dera_coefficients(2.0) == pytest.approx([-1.0, 2.0])  # β' = β/2: extrapolate away from θ0
    assert ensemble_coefficients([1.0]) == [0.0, 1.0]


def test_mix_logprobs_by_hand():
    p, q = torch.tensor([0.5, 0.5]).log(), torch.tensor([0.9, 0.1]).log()
    # c = (½, ½): ∝ √(p q) = (√.45, √.05) → (0.75, 0.25).
    assert mix_logprobs([p, q], [0.5, 0.5]).exp().tolist() == pytest.approx([0.75, 0.25], abs=1e-6)
    # c = (−1, 2): ∝ q²/p = (1.62, 0.02) → (1.62/1.64, 0.02/1.64).
    assert mix_logprobs([p, q], [-1.0, 2.0]).exp().tolist() == pytest.approx([1.62 / 1.64, 0.02 / 1.64], abs=1e-6)
    # A token one model rules out stays ruled out even under a negative coefficient (no +inf, no NaN).
    mixed = mix_logprobs([torch.tensor([1.0, 0.0]).log(), q], [-1.0, 2.0])
    assert mixed.exp().tolist() == [1.0, 0.0]  # token 1 is impossible under θ0, so token 0 takes all mass


def test_one_hot_ensemble_is_theta_T_token_for_token(sharp, tok):
    """k = (0, …, 0, 1) decodes exactly what HFSampler (its own loop) decodes from θT, greedy and sampled."""
    for params in (GREEDY, SAMPLED):
        want = texts(HFSampler(sharp[2], tok, batch_size=7, progress=False).generate(PROMPTS, params))
        got = texts(EnsembleSampler(sharp, ensemble_coefficients([0.0, 1.0]), tok, batch_size=5,
                                    progress=False).generate(PROMPTS, params))
        assert got == want
    assert any(len(ids) < GREEDY.max_new_tokens for per in want for ids in per)  # some rows did stop at an EOS


def test_a_model_mixed_with_itself_is_that_model(sharp, tok):
    """(θ, θ) with c = (−1, 2) sums to log π_θ: the negative coefficient and the renormalisation cancel exactly."""
    want = texts(HFSampler(sharp[1], tok, batch_size=4, progress=False).generate(PROMPTS, SAMPLED))
    assert (
        texts(EnsembleSampler([sharp[1], sharp[1]], [-1.0, 2.0], tok, progress=False).generate(PROMPTS, SAMPLED))
        == want
    )
    assert texts(EnsembleSampler([sharp[1]], [1.0], tok, progress=False).generate(PROMPTS, SAMPLED)) == want


def test_one_hot_scoring_equals_logprobs_py(sharp):
    batch = collate(PROMPTS, COMPLETIONS, PAD)
    want = token_logprobs(sharp[2], batch)[batch.completion_mask].detach()
    got = ensemble_token_logprobs(sharp, [0.0, 0.0, 1.0], PROMPTS, COMPLETIONS, PAD, batch_size=3)
    assert [len(x) for x in got] == [len(c) for c in COMPLETIONS]
    assert torch.tensor([v for x in got for v in x]) == pytest.approx(want, abs=1e-5)


def naive_mixture(models, coeffs, context: list[int]) -> torch.Tensor:
    """Σ c_m log_softmax(logits_m) at the last position of one unpadded sequence, renormalised: (V,)."""
    with torch.no_grad():
        total = sum(c * m(torch.tensor([context])).logits[0, -1].log_softmax(-1) for m, c in zip(models, coeffs))
    return total.log_softmax(-1)


def test_batched_cached_decoding_and_scoring_match_an_unbatched_oracle(sharp):
    """A real mixture (negative θ0 weight): batched + KV-cached equals full recomputation per token."""
    coeffs = merge_coefficients(2, 0.4, 0.5)  # (−0.5, 0.6, 0.9)
    decoded = ensemble_generate(sharp, coeffs, PROMPTS, GREEDY, [EOS, 73], PAD, batch_size=3)
    for prompt, [(ids, finished)] in zip(PROMPTS, decoded):
        context = list(prompt)
        for tok_id in ids:
            assert int(naive_mixture(sharp, coeffs, context).argmax()) == tok_id
            context.append(tok_id)
        assert finished == (ids[-1] in (EOS, 73))
    scored = ensemble_token_logprobs(sharp, coeffs, PROMPTS, COMPLETIONS, PAD, batch_size=2)
    for prompt, completion, got in zip(PROMPTS, COMPLETIONS, scored):
        want = [float(naive_mixture(sharp, coeffs, prompt + completion[:j])[t]) for j, t in enumerate(completion)]
        assert got == pytest.approx(want, abs=1e-4)


def test_kl_by_hand_and_of_a_model_with_itself(sharp):
    p, q = torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.9, 0.1]]).log()
    # KL(p‖q) = ½ ln(.5/.9) + ½ ln(.5/.1) = 0.510826
    assert float(kl_per_position(p, q)) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(5.0), abs=1e-6)
    assert float(kl_per_position(torch.tensor([[1.0, 0.0]]).log(), q)) == pytest.approx(-math.log(0.9), abs=1e-6)
    report = approximation_error([sharp[1]], [1.0], sharp[1], PROMPTS, SAMPLED, [EOS], PAD, baselines={})
    merged = report["candidates"]["merged"]
    assert merged["kl_ensemble_to_model_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert merged["kl_model_to_ensemble_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert merged["seq_logp_pearson"] == pytest.approx(1.0)
    assert report["completions"] == len(PROMPTS) * SAMPLED.n


@pytest.fixture(scope="module")
def close_models(tiny_ckpts):
    """θ0..θ3 of the shared fixture: θt = θ0 + 0.01·t·noise, the small-update regime where eq. (7) holds."""
    return [load_model(p) for p in tiny_ckpts]


def small_updates(eps: float) -> list:
    """θ0 (sharp) and θt = θ0 + eps·std(W)·noise_t: updates small next to the weights, as fine-tuning makes them."""
    base = tiny_model(0, initializer_range=0.5)
    models = [base]
    for t in range(1, 4):
        m = copy.deepcopy(base)
        g = torch.Generator().manual_seed(100 + t)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(eps * p.std() * torch.randn(p.shape, generator=g))
        models.append(m)
    return models


def test_the_merge_is_closer_to_the_ensemble_than_the_naive_alternatives():
    """§3.1 in miniature: with small updates the merge tracks the ensemble (eq. 7 holds) better than θT or the mean.

    With large ones (eps = 0.3) it does not; this test pins the regime where the paper's claim applies.
    """
    models = small_updates(0.01)
    lam, alpha = 0.5, 0.5
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=1)
    report = approximation_error(models, merge_coefficients(3, lam, alpha),
                                 merged_model(models, merge_weights(3, lam, alpha)), PROMPTS, params, [EOS], PAD)
    c = report["candidates"]
    assert set(c) == {"merged", "theta_T", "uniform_average"}
    kl = {name: c[name]["kl_ensemble_to_model_per_token"] for name in c}
    assert 0 < kl["merged"] < 0.5 * min(kl["theta_T"], kl["uniform_average"]), kl
    assert c["merged"]["seq_logp_pearson"] > c["theta_T"]["seq_logp_pearson"]
    assert report["models_in_ensemble"] == 4


def test_uniform_average_is_the_mean_of_the_checkpoints(close_models):
    avg = dict(uniform_average(close_models).named_parameters())
    for name, _ in close_models[0].named_parameters():
        mean = sum(dict(m.named_parameters())[name] for m in close_models[1:]) / 3
        assert torch.allclose(avg[name], mean, atol=1e-6), name


def test_decoding_cost_counts_the_same_tokens_and_four_times_the_memory(close_models):
    cost = decoding_cost(close_models, merge_coefficients(3, 0.5, 0.5), close_models[3], PROMPTS, 5, PAD, batch_size=4)
    e, m = cost["ensemble"], cost["merged"]
    assert e["tokens"] == m["tokens"] == len(PROMPTS) * 5  # EOS ignored: the same work for both
    assert (e["models_run"], m["models_run"]) == (4, 1)
    assert e["weights_bytes"] == 4 * m["weights_bytes"] and e["kv_cache_bytes"] == 4 * m["kv_cache_bytes"] > 0
    assert cost["memory_ratio"] == pytest.approx(4.0)
    assert cost["time_ratio"] > 0


def test_bad_inputs_are_named(sharp):
    with pytest.raises(ItermergeError, match="3 ensemble coefficients for 2 models"):
        live_members(sharp[:2], [0.0, 0.5, 0.5])
    with pytest.raises(ItermergeError, match="all 0"):
        live_members(sharp[:2], [0.0, 0.0])
    with pytest.raises(ItermergeError, match="vocabularies of sizes"):
        live_members([sharp[0], tiny_model(0, vocab_size=130)], [0.5, 0.5])
    with pytest.raises(ItermergeError, match="finite"):
        ensemble_coefficients([float("nan")])
    with pytest.raises(ItermergeError, match="prompt is empty"):
        ensemble_generate(sharp, [0, 0, 1], [[]], GREEDY, [EOS], PAD)


def test_study_writes_json_and_png(tiny_ckpts, tmp_path):
    prompts = [Prompt(id=f"p{i}", messages=[{"role": "user", "content": f"What is {i} + 1?"}]) for i in range(3)]
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=6, seed=0)
    result = approximation_study(tiny_ckpts[0], tiny_ckpts[1:], prompts, tmp_path, lam=0.5, alpha=0.2,
                                 params=params, cost_tokens=3)
    written = json.loads((tmp_path / "approximation.json").read_text())
    assert written["coefficients"] == pytest.approx([-0.2, 0.3, 0.3, 0.6])
    assert written["error"]["candidates"].keys() == result["error"]["candidates"].keys()
    assert (tmp_path / "approximation.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ItermergeError, match="no checkpoints"):
        approximation_study(tiny_ckpts[0], [], prompts, tmp_path)
    with pytest.raises(ItermergeError, match="no prompts"):
        approximation_study(tiny_ckpts[0], tiny_ckpts[1:], [], tmp_path)
