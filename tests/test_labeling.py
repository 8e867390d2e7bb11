"""Labeling: verifier specs and their failures, the reward-model scorer on a tiny classifier, pair selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_tokenizer

from itermerge.errors import ItermergeError
from itermerge.labeling import RewardModelScorer, VerifierScorer, make_scorer, select_pair
from itermerge.records import Completion, Prompt
from itermerge.tasks.arithmetic import brevity, score

pytestmark = pytest.mark.numeric  # run again under a second kernel set: make test, ATEN_CPU_CAPABILITY=avx2

P42 = Prompt("arith-17+25", [{"role": "user", "content": "What is 17 + 25?"}], answer=42)
A, B = Prompt("a", [{"role": "user", "content": "hi"}]), Prompt("b", [{"role": "user", "content": "ok"}])


def chars(text: str) -> list[int]:
    """Ids of the tiny character-level tokenizer: a printable character c has id ord(c) - 27."""
    return [ord(c) - 27 for c in text]


# --- verifiers ------------------------------------------------------------------------------------


def test_verifier_from_spec_scores_with_the_named_function():
    scorer = VerifierScorer.from_spec("itermerge.tasks.arithmetic:score")
    assert scorer.fn is score
    got = scorer.score([P42] * 3, ["42", "40", "x"])
    assert got == pytest.approx([1 - 0.002, -2 / 42 - 0.002, -1.5 - 0.001])
    assert VerifierScorer.from_spec("itermerge.tasks.arithmetic:brevity").fn is brevity


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("itermerge.tasks.arithmetic.score", r"write it as 'module:function'"),
        (":score", r"write it as 'module:function'"),
        ("itermerge.tasks.arithmetic:", r"write it as 'module:function'"),
        ("itermerge.tasks.nope:score", r"no module named 'itermerge.tasks.nope'"),
        ("itermerge.tasks.arithmetic:scroe", r"module 'itermerge.tasks.arithmetic' has no attribute 'scroe'"),
        ("itermerge.tasks.arithmetic:CORRECT", r"'CORRECT' is a float, not a function"),
    ],
)
def test_bad_verifier_specs_are_named(spec, message):
    with pytest.raises(ItermergeError, match=rf"verifier spec '{spec}': " + message):
        VerifierScorer.from_spec(spec)


def test_verifier_module_with_a_broken_import_is_not_called_missing(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text(
        "import not_installed_dependency_xyz\n"
        "class Grader:\n    @staticmethod\n    def grade(prompt, completion):\n        return 1.0\n"
    )
    (tmp_path / "my_checks2.py").write_text(
        "class Grader:\n    @staticmethod\n    def grade(prompt, completion):\n        return len(completion)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ItermergeError, match=r"importing 'my_checks' failed: No module named 'not_installed_dep"):
        VerifierScorer.from_spec("my_checks:Grader.grade")
    assert VerifierScorer.from_spec("my_checks2:Grader.grade").score([A], ["abc"]) == [3.0]


def test_verifier_failure_names_prompt_and_completion():
    def picky(prompt, completion):
        if completion == "bad":
            raise ValueError("cannot parse")
        return 0.0

    with pytest.raises(
        ItermergeError, match=r"prompt 'b', completion 1 \(batch item 3, text 'bad'\): raised ValueError: cannot parse"
    ):
        VerifierScorer(picky).score([A, A, B, B], ["x", "y", "z", "bad"])


@pytest.mark.parametrize(
    ("value", "message"),
    [(float("nan"), r"returned nan; it must return a finite float"),
     (float("inf"), r"returned inf; it must return a finite float"),
     (None, r"returned None \(NoneType\); it must return a float"),
     ("1.0", r"returned '1.0' \(str\); it must return a float"),
     (torch.tensor(1.0), r"\(Tensor\); it must return a float")],
)
def test_verifier_bad_return_values_are_named(value, message):
    with pytest.raises(ItermergeError, match=r"prompt 'a', completion 0 \(batch item 0.*" + message):
        VerifierScorer(lambda p, c: value).score([A], ["x"])


def test_verifier_accepts_bools_and_numpy_numbers():
    assert VerifierScorer(lambda p, c: c == "y").score([A, A], ["y", "n"]) == [1.0, 0.0]
    got = VerifierScorer(lambda p, c: np.float32(0.5)).score([A], ["y"])
    assert got == [0.5] and type(got[0]) is float


def test_verifier_scorer_needs_one_prompt_per_completion():
    with pytest.raises(ValueError, match=r"1 prompts for 2 completions"):
        VerifierScorer(score).score([P42], ["1", "2"])


# --- pair selection -------------------------------------------------------------------------------


def completions(scores: list[float | None]) -> list[Completion]:
    return [Completion("p", i, f"c{i}", [5, 2], True, score=s) for i, s in enumerate(scores)]


def test_select_pair_is_best_vs_worst_with_lowest_index_on_ties():
    cs = completions([0.5, 1.0, -1.0, 1.0, -1.0])
    chosen, rejected = select_pair(cs)
    assert (chosen.index, rejected.index) == (1, 2)
    chosen, rejected = select_pair(cs[::-1])  # the answer does not depend on list order
    assert (chosen.index, rejected.index) == (1, 2)


def test_select_pair_returns_none_when_nothing_to_prefer():
    assert select_pair(completions([0.3, 0.3, 0.3, 0.3])) is None
    assert select_pair(completions([0.3])) is None
    assert select_pair([]) is None


def test_select_pair_needs_scores():
    with pytest.raises(ValueError, match=r"completions \[1\] of prompt 'p' have no score"):
        select_pair(completions([0.3, None]))


# --- make_scorer ----------------------------------------------------------------------------------


def test_make_scorer_builds_a_verifier():
    scorer = make_scorer({"type": "verifier", "function": "itermerge.tasks.arithmetic:brevity"})
    assert isinstance(scorer, VerifierScorer) and scorer.score([P42], ["42"]) == [-0.02]


@pytest.mark.parametrize(
    ("spec", "message"),
    [({"type": "judge"}, r"scorer type 'judge': use one of \['reward_model', 'verifier'\]"),
     ({"function": "m:f"}, r"scorer type None: use one of"),
     ({"type": "verifier"}, r"missing key\(s\) \['function'\], unknown key\(s\) \[\]"),
     ({"type": "reward_model", "path": "x", "trust": True}, r"unknown key\(s\) \['trust'\]; allowed keys are")],
)
def test_make_scorer_errors_are_named(spec, message):
    with pytest.raises(ItermergeError, match=message):
        make_scorer(spec)


# --- reward model ---------------------------------------------------------------------------------


def save_tiny_rm(path, **overrides):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_config(num_labels=1, **overrides)).eval()
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm")
    return path, save_tiny_rm(path)


def test_reward_model_reads_the_chat_template_and_returns_the_logit(tiny_rm):
    path, model = tiny_rm
    scorer = make_scorer({"type": "reward_model", "path": str(path), "device": "cpu"})
    assert isinstance(scorer, RewardModelScorer)
    # "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n", written out by hand
    ids = [1, *chars("user"), 4, *chars("hi"), 2, 4, 1, *chars("assistant"), 4, *chars("yo"), 2, 4]
    assert scorer.encode(A, "yo") == ids
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert scorer.score([A], ["yo"]) == pytest.approx([expected], abs=1e-6)


def test_reward_model_scores_do_not_depend_on_batching(tiny_rm):
    path, _ = tiny_rm
    replies = ["a much longer reply than the others", "yo", "", "mid-size reply", "yo!"]
    prompts = [A, B, A, B, A]
    one_by_one = RewardModelScorer(path, batch_size=1).score(prompts, replies)
    batched = RewardModelScorer(path, batch_size=3).score(prompts, replies)
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    assert len({round(s, 6) for s in one_by_one}) == len(replies)  # the replies really are told apart


def test_reward_model_without_pad_id_pads_with_the_tokenizer_pad(tmp_path):
    model = save_tiny_rm(tmp_path, pad_token_id=None)
    scorer = RewardModelScorer(tmp_path, batch_size=2)
    assert scorer.pad_id == 0
    ids = scorer.encode(A, "a reply")
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert scorer.score([A, A], ["a reply", "y"])[0] == pytest.approx(expected, abs=1e-5)


def test_reward_model_errors_are_named(tmp_path, tiny_rm):
    with pytest.raises(ItermergeError, match=r"reward model '.*no_rm' could not be loaded"):
        RewardModelScorer(str(tmp_path / "no_rm"))
    with pytest.raises(ItermergeError, match=r"reward model dtype 'fp8': use one of"):
        RewardModelScorer(tiny_rm[0], dtype="fp8")
    with pytest.raises(ItermergeError, match=r"reward model batch_size=0: must be a positive integer"):
        RewardModelScorer(tiny_rm[0], batch_size=0)


def test_the_evaluation_judge_runs_where_and_as_the_labelling_judge(tiny_rm):
    """The search's evaluators get the judge on the run's device in its precision (bf16 on a GPU, or on a CPU that
    measured bf16 faster), as labelling does; it used to load in float32 whatever the run used."""
    from itermerge.config.evaluation import EvalConfig
    from itermerge.devices import Placement
    from itermerge.evaluation import Evaluator

    path, _ = tiny_rm
    judge = {"scorer": {"type": "reward_model", "path": str(path)}, "sampling": "greedy"}
    cfg = EvalConfig.from_dict({"prompts": {"task": "arithmetic", "n": 2}, "accuracy": None, "reward": judge})
    placed = Evaluator(cfg, tiny_tokenizer(), "dev", where=Placement("cpu", "bfloat16"))
    assert placed.scorer.model.dtype == torch.bfloat16 and placed.scorer.device.type == "cpu"
    assert Evaluator(cfg, tiny_tokenizer(), "dev").scorer.model.dtype == torch.float32  # unplaced: as before


def test_a_reward_model_loads_whole_after_a_zero3_accelerator_registered_itself(tiny_rm, monkeypatch):
    """After a ZeRO-3 training, transformers partitions every from_pretrained (zero.Init); the ArmoRM path was
    guarded, a generic reward model was not (issue 23 item 12): it must score with whole weights on its device."""
    import typing
    import weakref

    from transformers.integrations import deepspeed as hf_deepspeed

    class Zero3Config:
        config: typing.ClassVar[dict] = {"zero_optimization": {"stage": 3}}

        def is_zero3(self) -> bool:
            return True

    path, model = tiny_rm
    registered = Zero3Config()
    monkeypatch.setattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", weakref.ref(registered))
    assert hf_deepspeed.is_deepspeed_zero3_enabled()
    scorer = make_scorer({"type": "reward_model", "path": str(path), "device": "cpu"})  # zero.Init needs deepspeed
    assert scorer.model.score.weight.shape == model.score.weight.shape == (1, 32)
    assert hf_deepspeed.is_deepspeed_zero3_enabled()  # the registration is back for the training that follows
