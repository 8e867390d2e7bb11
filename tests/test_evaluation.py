"""Evaluators: metrics with hand-derived numbers, the KL estimate against the exact value, lm-eval offline."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch
from conftest import save_tiny, tiny_model, tiny_tokenizer

from itermerge.config.evaluation import AccuracyConfig, EvalConfig, KLConfig, LmEvalTask, PromptSource, RewardConfig
from itermerge.errors import ItermergeError
from itermerge.evaluation import (
    Evaluator,
    Metric,
    clustered_mean,
    is_bare_number,
    mean_metric,
    sequence_kl,
    task_accuracy,
)
from itermerge.logprobs import score_sequences
from itermerge.prompts import split_prompts
from itermerge.sampling import Sample
from itermerge.tasks import get_task
from itermerge.tokenization import encode_prompt

# --- metrics ------------------------------------------------------------------------------------


def test_mean_metric_by_hand():
    # [1, 0, 1, 1]: mean 0.75; s² = (3·0.25² + 0.75²) / 3 = 0.25; se = 0.5 / √4 = 0.25.
    m = mean_metric([1.0, 0.0, 1.0, 1.0])
    assert m == Metric(0.75, 0.25, 4, (1.0, 0.0, 1.0, 1.0))  # each prompt's value kept, for paired comparisons
    assert mean_metric([3.0]) == Metric(3.0, None, 1, (3.0,))
    assert Metric.from_dict(m.to_dict()) == m
    with pytest.raises(ItermergeError):
        mean_metric([])


def test_clustered_mean_uses_prompts_as_units():
    # per-prompt means [0.5, 1.0]: mean 0.75, s = √(2·0.25²) = 0.3536, se = s / √2 = 0.25; n = 2 prompts, not 4 samples.
    m = clustered_mean([[1.0, 0.0], [1.0, 1.0]])
    assert (m.value, m.n, m.items) == (0.75, 2, (0.5, 1.0))
    assert m.stderr == pytest.approx(0.25)


def test_bare_number():
    assert is_bare_number(None, "42") and is_bare_number(None, " 42.") and is_bare_number(None, "-3")
    assert (
        not is_bare_number(None, "The answer is 42.")
        and not is_bare_number(None, "")
        and not is_bare_number(None, "4 2")
    )


# --- task accuracy and reward -----------------------------------------------------------------------


def _replies(prompts):
    """Correct and bare, correct but wordy, wrong and bare, no number: accuracy 1/2, format 1/2."""
    a = [int(p.answer) for p in prompts]
    return [[str(a[0])], [f"The answer is {a[1]}."], [str(a[2] + 1)], ["I do not know"]]


def test_task_accuracy_separates_correctness_from_format():
    task = get_task("arithmetic")
    prompts = task.prompts("dev", 4, seed=0)
    out = task_accuracy(task, prompts, _replies(prompts))
    # per-prompt correctness [1, 1, 0, 0]: mean 0.5, s = √(1/3), se = √(1/3) / 2
    assert out["accuracy"] == Metric(0.5, pytest.approx(math.sqrt(1 / 3) / 2), 4, (1.0, 1.0, 0.0, 0.0))
    # per-prompt format [1, 0, 1, 0]: the same mean, from different replies
    assert out["format"].value == 0.5


class FakeSampler:
    """Returns fixed replies (the first; "nonsense" as a second sample) and records the parameters asked for."""

    def __init__(self, replies: list[list[str]]):
        self.replies, self.calls = replies, []

    def __call__(self, model, tokenizer, batch_size=64, progress=True):  # stands in for HFSampler(...)
        return self

    def generate(self, prompt_ids, params):
        self.calls.append(params)
        rows = [[Sample(r[0], [5], True), Sample("nonsense", [5], True)] for r in self.replies]
        return [row[: params.n] for row in rows]


def test_evaluator_wires_modes_and_scores_by_hand(tiny_tok):
    cfg = EvalConfig(prompts=PromptSource(n=4), max_new_tokens=8, accuracy=AccuracyConfig(sampling="greedy"),
                     reward=RewardConfig(sampling="eval", samples=2))
    task, prompts = get_task("arithmetic"), split_prompts(cfg.prompts, "dev")
    sampler = FakeSampler(_replies(prompts))
    out = Evaluator(cfg, tiny_tok, "dev", make_sampler=sampler, progress=False)(tiny_model(0))
    greedy, sampled = sorted(sampler.calls, key=lambda p: p.temperature)
    assert (greedy.temperature, greedy.n) == (0.0, 1)
    assert (sampled.temperature, sampled.top_p, sampled.top_k, sampled.n) == (0.7, 0.9, 40, 2)  # appendix A
    assert out["accuracy"].value == 0.5 and out["format"].value == 0.5
    # reward: the task's graded score, 1 − 0.001·len for a correct reply, −1.5 − 0.008 for "nonsense" (8 chars)
    a0 = int(prompts[0].answer)
    assert task.score(prompts[0], str(a0)) == pytest.approx(1 - 0.001 * len(str(a0)))
    per_prompt = [(task.score(p, r[0]) + (-1.5 - 0.008)) / 2 for p, r in zip(prompts, sampler.replies)]
    assert out["reward"] == Metric(pytest.approx(sum(per_prompt) / 4), pytest.approx(mean_metric(per_prompt).stderr), 4,
                                   pytest.approx(tuple(per_prompt)))


def test_config_errors_name_the_fix():
    with pytest.raises(ItermergeError, match="greedy"):
        EvalConfig(accuracy=AccuracyConfig(sampling="greedy", samples=4))
    with pytest.raises(ItermergeError, match="unknown key"):
        EvalConfig.from_dict({"reward": {"scorer": None, "sampels": 2}})
    with pytest.raises(ItermergeError, match="sampling"):
        EvalConfig.from_dict({"accuracy": {"sampling": "beam"}})
    a = EvalConfig.from_dict({"prompts": {"n": 10}, "kl": {"samples": 2}, "lm_eval": {"tasks": ["x"]}})
    assert a.kl == KLConfig(samples=2) and a.lm_eval.tasks == (LmEvalTask("x"),)
    assert a.fingerprint() != EvalConfig.from_dict({"prompts": {"n": 11}, "kl": {"samples": 2}}).fingerprint()
    assert EvalConfig.from_dict({"kl": None}).kl is None


# --- KL -------------------------------------------------------------------------------------------


def test_kl_matches_the_exact_value_on_one_token():
    """One-token replies: the exact KL is Σ_y p(y) log p(y)/q(y) over the vocabulary; sampling y ~ p must agree."""
    tok = tiny_tokenizer()
    policy, reference = tiny_model(0), tiny_model(1)
    with torch.no_grad():
        policy.model.norm.weight.mul_(5.0)  # sharpen π so that the KL is large next to the sampling error
    prompt = encode_prompt(tok, [{"role": "user", "content": "hi"}])
    with torch.no_grad():
        logp = torch.log_softmax(policy(torch.tensor([prompt])).logits[0, -1], -1)
        logq = torch.log_softmax(reference(torch.tensor([prompt])).logits[0, -1], -1)
    exact = float((logp.exp() * (logp - logq)).sum())
    assert exact > 0.2
    ys = torch.multinomial(logp.exp(), 2000, replacement=True, generator=torch.Generator().manual_seed(0)).tolist()
    est = sequence_kl(policy, reference, [prompt] * len(ys), [[[y]] for y in ys], pad_id=0, batch_size=1000)
    assert est.n == 2000
    assert abs(est.value - exact) < 4 * est.stderr
    assert est.stderr < 0.05


def test_kl_of_a_model_with_itself_is_zero(tiny_tok):
    m = tiny_model(0)
    cfg = EvalConfig(prompts=PromptSource(n=3), max_new_tokens=6, accuracy=None, reward=None, kl=KLConfig(samples=2))
    out = Evaluator(cfg, tiny_tok, "dev", reference_model=tiny_model(0), progress=False)(m)
    assert out["kl"] == Metric(0.0, 0.0, 3, (0.0, 0.0, 0.0))
    other = Evaluator(cfg, tiny_tok, "dev", reference_model=tiny_model(1), progress=False)(m)
    assert other["kl"].value != 0.0
    with pytest.raises(ItermergeError, match="reference"):
        Evaluator(cfg, tiny_tok, "dev")


# --- lm-eval-harness ----------------------------------------------------------------------------


def _local_task(tmp_path, model, tok):
    """Four two-way questions; labels set from the model's own preference on two and against it on two (acc = 1/2)."""
    questions = ["2 + 3 =", "4 + 4 =", "The sky is", "Cats say"]
    choices = [["5", "7"], ["9", "8"], ["blue", "green"], ["meow", "woof"]]
    prefers = []
    for q, cs in zip(questions, choices):
        ctx = tok(q, add_special_tokens=False)["input_ids"]
        lls = score_sequences(
            model, [ctx] * 2, [tok(" " + c, add_special_tokens=False)["input_ids"] for c in cs], pad_id=0
        )
        prefers.append(int(lls[1] > lls[0]))
    labels = [prefers[0], prefers[1], 1 - prefers[2], 1 - prefers[3]]
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n"
                            for q, c, y in zip(questions, choices, labels)))
    (tmp_path / "tiny.yaml").write_text(
        "task: itermerge_tiny\ndataset_path: json\ndataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'cache'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
    )
    return tmp_path


@pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed (pip install 'itermerge[eval]')"
)
def test_lm_eval_local_task_offline(tmp_path):
    from itermerge.evaluation.evaluators.lm_eval import run_lm_eval

    tok, model = tiny_tokenizer(), tiny_model(0)
    tasks_dir = _local_task(tmp_path / "tasks", model, tok)
    out = run_lm_eval(model, [LmEvalTask("itermerge_tiny")], tok, include_path=tasks_dir, batch_size=4)
    # per-document correctness [1, 1, 0, 0] by construction: acc 0.5, se = √(1/3) / 2 (ddof 1, as lm-eval)
    assert out["lm_eval/itermerge_tiny"] == Metric(0.5, pytest.approx(math.sqrt(1 / 3) / 2), 4, (1.0, 1.0, 0.0, 0.0))
    assert out["lm_eval/average"].value == 0.5
    from_disk = run_lm_eval(save_tiny(tmp_path / "ckpt", model, tok), [LmEvalTask("itermerge_tiny")],
                            include_path=tasks_dir, device="cpu")
    assert from_disk["lm_eval/itermerge_tiny"].value == 0.5


def test_lm_eval_missing_names_the_extra(monkeypatch):
    from itermerge.evaluation.evaluators.lm_eval import run_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(ItermergeError, match=r"pip install 'itermerge\[eval\]'"):
        run_lm_eval(tiny_model(0), [LmEvalTask("x")], tiny_tokenizer())


def test_paper_preset_lists_appendix_d():
    from itermerge.evaluation.evaluators.lm_eval import PRESETS

    shots = {t.name: (t.num_fewshot, t.chat_template) for t in PRESETS["paper"]}
    assert shots == {"mmlu": (5, True), "truthfulqa_mc2": (0, True), "arc_challenge": (25, True),
                     "hellaswag": (10, False), "gsm8k_cot": (5, True)}


@pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed (pip install 'itermerge[eval]')"
)
def test_lm_eval_dev_and_test_never_share_a_document(tmp_path):
    """The capability axis's dev documents (the search's) and test documents (the final table's) are disjoint halves
    of the benchmark, fixed by a hash; each split's score is the mean over exactly its documents."""
    from itermerge.evaluation.evaluators.lm_eval import _task_manager, document_split, run_lm_eval

    tok, model = tiny_tokenizer(), tiny_model(0)
    tasks_dir = _local_task(tmp_path / "tasks", model, tok)
    manager = _task_manager(("itermerge_tiny",), str(tasks_dir))
    dev, test = (document_split("itermerge_tiny", manager, s)["itermerge_tiny"] for s in ("dev", "test"))
    assert not set(dev) & set(test) and sorted(dev + test) == [0, 1, 2, 3]
    assert dev == document_split("itermerge_tiny", manager, "dev")["itermerge_tiny"]  # deterministic
    correct = [1.0, 1.0, 0.0, 0.0]  # by construction of _local_task
    assert dev and test
    for split, ids in (("dev", dev), ("test", test)):
        got = run_lm_eval(model, [LmEvalTask("itermerge_tiny")], tok, include_path=tasks_dir, batch_size=4,
                          split=split)["lm_eval/itermerge_tiny"]
        assert got.n == len(ids) and got.value == pytest.approx(sum(correct[i] for i in ids) / len(ids))
        assert got.items == tuple(correct[i] for i in ids)
