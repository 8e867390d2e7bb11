"""Induced rewards (eq. 4), the accuracy matrix on a set whose answer is known, and the α / λ studies on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import save_tiny, tiny_model, tiny_tokenizer

from itermerge.checkpoint import load_model
from itermerge.errors import ItermergeError
from itermerge.labeling import VerifierScorer
from itermerge.maths.statistics import mean_sem, preference_accuracy
from itermerge.merging import MergeBasis
from itermerge.records import PreferencePair, Prompt
from itermerge.sampling import SamplingParams
from itermerge.sampling.hf import HFSampler
from itermerge.studies.accuracy_matrix import accuracy_matrix, build_test_sets
from itermerge.studies.alpha import alpha_study
from itermerge.studies.induced import induced_rewards
from itermerge.studies.lambdas import lambda_study
from itermerge.tasks.arithmetic import brevity
from itermerge.tokenization import encode_prompt

pytestmark = pytest.mark.numeric  # run again under a second kernel set: make test, ATEN_CPU_CAPABILITY=avx2

EOS, PAD = 2, 0
PROMPTS = [[1, 5, 6, 7], [1, 8], [1, 9, 10, 11, 12, 13], [1, 40, 41]]
COMPLETIONS = [[20, 21, EOS], [22, 23, 24, 25, 26, EOS], [30], [50, 51, 52, 53]]
PARAMS = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds contention on a shared CPU
    yield
    torch.set_num_threads(threads)


def dev_prompts(n: int = 3) -> list[Prompt]:
    return [Prompt(id=f"p{i}", messages=[{"role": "user", "content": f"What is {i} + {i}?"}], answer=2 * i)
            for i in range(n)]


def naive_logprob(model, prompt, completion) -> float:
    with torch.no_grad():
        logp = model(torch.tensor([prompt + completion])).logits.log_softmax(-1)[0]  # (L, V)
    return sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(completion))


def test_induced_reward_is_beta_times_the_log_ratio_with_the_trailing_eos_masked():
    policy, reference = tiny_model(1, initializer_range=0.5), tiny_model(0)
    got = induced_rewards(policy, reference, PROMPTS, COMPLETIONS, PAD, beta=0.1, batch_size=3)
    for r, x, y in zip(got, PROMPTS, COMPLETIONS):
        scored = y[:-1] if y[-1] == EOS else y  # as DPO training scores it (appendix C)
        assert r == pytest.approx(
            0.1 * (naive_logprob(policy, x, scored) - naive_logprob(reference, x, scored)), abs=1e-5
        )
    with_eos = induced_rewards(policy, reference, PROMPTS, COMPLETIONS, PAD, beta=0.1, eos_ids=())
    assert with_eos[0] != pytest.approx(got[0]) and with_eos[2] == pytest.approx(got[2])  # [30] has no EOS
    assert induced_rewards(reference, reference, PROMPTS, COMPLETIONS, PAD, beta=0.1) == [0.0] * 4


def test_bad_induced_reward_inputs_are_named():
    with pytest.raises(ItermergeError, match="vocabulary of 130 tokens but the reference has 128"):
        induced_rewards(tiny_model(0, vocab_size=130), tiny_model(0), PROMPTS, COMPLETIONS, PAD, beta=0.1)
    with pytest.raises(ItermergeError, match="beta=0"):
        induced_rewards(tiny_model(0), tiny_model(0), PROMPTS, COMPLETIONS, PAD, beta=0)


def test_accuracy_and_standard_error_by_hand():
    # 1 > 0 right, 2 = 2 tie, 3 < 4 wrong, 0 > -1 right: (2 + ½) / 4.
    assert preference_accuracy([1, 2, 3, 0], [0, 2, 4, -1]) == {"accuracy": 0.625, "correct": 2, "ties": 1, "pairs": 4}
    assert mean_sem([1.0, 2.0, 3.0]) == (2.0, pytest.approx(1 / math.sqrt(3)))
    assert mean_sem([5.0]) == (5.0, None)


@pytest.fixture(scope="module")
def known_answer(tmp_path_factory):
    """θ0 nearly uniform; a sharp policy; chosen = the sharp model's greedy text, rejected = fixed other tokens."""
    root = tmp_path_factory.mktemp("known")
    sharp = tiny_model(1, initializer_range=0.5)
    theta0 = save_tiny(root / "theta0", tiny_model(0))
    sharp_dir = save_tiny(root / "sharp", sharp)
    greedy = HFSampler(sharp, tiny_tokenizer(), progress=False).generate(
        PROMPTS, SamplingParams(n=1, temperature=0.0, max_new_tokens=6))
    g = torch.Generator().manual_seed(0)
    pairs = []
    for i, (x, [s]) in enumerate(zip(PROMPTS, greedy)):
        rejected = torch.randint(5, 128, (len(s.token_ids),), generator=g).tolist()
        pairs.append(
            PreferencePair(f"p{i}", [{"role": "user", "content": "?"}], x, "c", "r", s.token_ids, rejected, 1.0, 0.0)
        )
    swapped = [PreferencePair(p.prompt_id, p.messages, p.prompt_ids, p.rejected, p.chosen, p.rejected_ids, p.chosen_ids,
                              1.0, 0.0) for p in pairs]
    return theta0, sharp_dir, pairs, swapped


def test_accuracy_matrix_on_a_set_whose_answer_is_known(known_answer, tmp_path):
    """The sharp policy ranks its own greedy text above other tokens: 1 on the set, 0 on the swapped set.
    θ0's induced reward is 0 everywhere, so every pair ties: 0.5 (ties count half)."""
    theta0, sharp, pairs, swapped = known_answer
    result = accuracy_matrix({"right": pairs, "swapped": swapped}, {"sharp": sharp, "theta0": theta0}, theta0,
                             beta=0.1, pad_id=PAD, out_dir=tmp_path)
    assert result["accuracy"] == [[1.0, 0.5], [0.0, 0.5]]
    assert result["ties"] == [[0, 4], [0, 4]] and result["pairs"] == {"right": 4, "swapped": 4}
    assert json.loads((tmp_path / "accuracy.json").read_text())["accuracy"] == result["accuracy"]
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_accuracy_matrix_refuses_empty_sets_and_other_tokenizers(known_answer, tmp_path):
    theta0, sharp, pairs, _ = known_answer
    with pytest.raises(ItermergeError, match="preference set 'empty' is empty"):
        accuracy_matrix({"empty": []}, {"sharp": sharp}, theta0, beta=0.1, pad_id=PAD)
    other = tiny_tokenizer()
    other.add_tokens(["<extra>"])
    stranger = save_tiny(tmp_path / "stranger", tiny_model(2), other)
    with pytest.raises(ItermergeError, match="different tokenizer"):
        accuracy_matrix({"right": pairs}, {"stranger": stranger}, theta0, beta=0.1, pad_id=PAD)


def test_build_test_sets_keeps_best_against_worst(tiny_ckpts):
    tok = tiny_tokenizer()
    scorer = VerifierScorer(lambda prompt, text: float(sum(map(ord, text)) % 7), name="ord-sum mod 7")
    sets = build_test_sets({"theta1": tiny_ckpts[1], "theta2": load_model(tiny_ckpts[2])}, tok, dev_prompts(4),
                           scorer, SamplingParams(n=4, temperature=1.0, max_new_tokens=6, seed=0))
    assert set(sets) == {"theta1", "theta2"}
    for pairs in sets.values():
        assert 1 <= len(pairs) <= 4
        for p in pairs:
            assert p.chosen_score > p.rejected_score
            assert p.chosen_score == sum(map(ord, p.chosen)) % 7
            assert p.prompt_ids == encode_prompt(tok, dev_prompts(4)[int(p.prompt_id[1:])].messages)


def test_alpha_study_hand_points(tiny_ckpts, tmp_path):
    """α = −1 merges back to θ0 (its own induced reward is 0); α = 0 is θT (r_merged = r_θT sample by sample)."""
    basis = MergeBasis.from_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], mean_cache=tmp_path / "mean")
    reference, theta_T, model = (load_model(p) for p in (tiny_ckpts[0], tiny_ckpts[3], tiny_ckpts[0]))
    alphas = [-1.0, 0.0, 0.5, 1.0]
    result = alpha_study(basis, model, tiny_tokenizer(), dev_prompts(), VerifierScorer(brevity), alphas, reference,
                         theta_T, 0.1, PARAMS, tmp_path)
    merged, own_T = result["series"]["r_merged"], result["series"]["r_theta_T"]
    assert merged["mean"][0] == 0.0
    assert merged["mean"][1] == pytest.approx(own_T["mean"][1], abs=1e-6)
    assert result["alpha"] == alphas and set(result["series"]) == {"length", "r_merged", "r_theta_T", "score"}
    assert all(-1 <= s["pearson_r"] <= 1 for s in result["series"].values() if s["pearson_r"] is not None)
    assert (tmp_path / "alpha.png").exists() and json.loads((tmp_path / "alpha.json").read_text())["beta"] == 0.1
    with pytest.raises(ItermergeError, match="at least 3"):
        alpha_study(basis, model, tiny_tokenizer(), dev_prompts(), VerifierScorer(brevity), [0.0, 1.0], reference,
                    theta_T, 0.1, PARAMS, tmp_path)


def test_lambda_study_lambda_one_is_theta_a(tiny_ckpts, tmp_path):
    """λ = 1 samples from θa itself: its r_a equals the induced reward of θa's own samples computed directly."""
    theta0, theta_a, theta_b = tiny_ckpts[:3]
    prompts = dev_prompts()
    result = lambda_study(theta0, theta_a, theta_b, prompts, tmp_path, beta=0.1, params=PARAMS,
                          lambdas=(0.0, 0.5, 1.0), scorers={"brevity": VerifierScorer(brevity)}, names=("a", "b"))
    tok, policy_a, reference = tiny_tokenizer(), load_model(theta_a), load_model(theta0)
    ids = [encode_prompt(tok, p.messages) for p in prompts]
    samples = HFSampler(policy_a, tok, progress=False).generate(ids, PARAMS)
    xs = [x for x, per in zip(ids, samples) for _ in per]
    direct = induced_rewards(policy_a, reference, xs, [s.token_ids for per in samples for s in per], PAD, beta=0.1)
    assert result["series"]["r_a"]["mean"][-1] == pytest.approx(sum(direct) / len(direct), abs=1e-6)
    assert result["reward_correlation"]["between"] == ["r_a", "r_b"]
    assert set(result["series"]) == {"length", "r_a", "r_b", "brevity"}
    assert (tmp_path / "lambda.png").read_bytes()[:4] == b"\x89PNG"
