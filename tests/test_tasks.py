"""The built-in arithmetic task: disjoint seeded splits, and verifiers whose values are derived by hand."""

from __future__ import annotations

import re

import pytest

from itermerge.errors import ItermergeError
from itermerge.records import Prompt
from itermerge.tasks import get_task
from itermerge.tasks.arithmetic import TEMPLATES, ArithmeticTask, brevity, is_correct, last_number, score


def p42(answer=42) -> Prompt:
    return Prompt("arith-17+25", [{"role": "user", "content": "What is 17 + 25? Reply with just the number."}], answer)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("42", 42.0), ("17 + 25 = 42.", 42.0), ("17-5=12", 12.0), ("it is \u22123", -3.0), ("1,000", 1000.0),
     ("3.5 apples", 3.5), ("no number", None), ("", None)],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_score_by_hand():
    # correct: 1 - 0.001 * 2 characters
    assert score(p42(), "42") == pytest.approx(0.998)
    # wrong, close: -|40 - 42| / 42 - 0.002
    assert score(p42(), "40") == pytest.approx(-2 / 42 - 0.002)
    # wrong, far: relative error 58/42 is capped at 1; 3 characters
    assert score(p42(), "100") == pytest.approx(-1.003)
    # no number at all: -1.5 - 0.007
    assert score(p42(), "no idea") == pytest.approx(-1.507)
    # the length cost stops at 0.25, so a rambling right answer still beats a short wrong one
    rambling = "x" * 400 + " 42"
    assert score(p42(), rambling) == pytest.approx(0.75)
    assert score(p42(), rambling) > score(p42(), "41")
    # answer 0: the relative error divides by max(|0|, 1)
    assert score(p42(answer=0), "1") == pytest.approx(-1.001)
    # a string answer from a user's prompt file is read as a number
    assert score(p42(answer="42"), "42") == pytest.approx(0.998)


def test_graded_scores_order_replies():
    replies = ["42", "The answer is 42.", "41", "30", "banana"]
    scores = [score(p42(), r) for r in replies]
    assert scores == sorted(scores, reverse=True)
    assert len(set(scores)) == len(scores)


def test_is_correct_reads_the_last_number():
    assert is_correct(p42(), "The answer is 42")
    assert is_correct(p42(), "42.0")
    assert not is_correct(p42(), "42 is 17 + 25")
    assert not is_correct(p42(), "")


def test_brevity_by_hand():
    assert brevity(p42(), "42") == pytest.approx(-0.02)
    assert brevity(p42(), "") == 0.0
    assert brevity(p42(), "The answer is 42.") == pytest.approx(-0.17)


def test_verifier_needs_a_numeric_answer():
    with pytest.raises(ItermergeError, match=r"prompt 'arith-17\+25' has no answer"):
        score(p42(answer=None), "42")
    with pytest.raises(ItermergeError, match=r"prompt 'arith-17\+25': answer 'forty' is not a number"):
        is_correct(p42(answer="forty"), "42")


def test_splits_are_disjoint_and_cover_the_problem_space():
    task = ArithmeticTask()
    splits = {s: task.problems(s) for s in ("train", "dev", "test")}
    # + : 29 * 29 ordered pairs in 2..30; - : pairs with a >= b, 29 * 30 / 2
    assert sum(len(v) for v in splits.values()) == 29 * 29 + 29 * 30 // 2 == 1276
    everything = [p for v in splits.values() for p in v]
    assert len(set(everything)) == 1276
    for split, fraction in (("train", 0.8), ("dev", 0.1), ("test", 0.1)):
        assert abs(len(splits[split]) / 1276 - fraction) < 0.03, split
    ids = {s: {p.id for p in task.prompts(s, len(v), seed=0)} for s, v in splits.items()}
    assert not (ids["train"] & ids["dev"] or ids["train"] & ids["test"] or ids["dev"] & ids["test"])


def test_prompts_are_seeded_and_offsets_give_new_prompts():
    task = get_task("arithmetic")
    first = task.prompts("train", 50, seed=3)
    assert first == task.prompts("train", 50, seed=3)
    assert [p.id for p in first] != [p.id for p in task.prompts("train", 50, seed=4)]
    second = task.prompts("train", 50, seed=3, offset=50)
    assert not {p.id for p in first} & {p.id for p in second}
    assert len({p.id for p in first}) == 50


def test_prompt_text_and_answer():
    task = ArithmeticTask()
    prompts = task.prompts("dev", 40, seed=0)
    patterns = [re.escape(t).replace(r"\{a\}", r"(\d+)").replace(r"\{op\}", r"([+-])").replace(r"\{b\}", r"(\d+)")
                for t in TEMPLATES]
    used = set()
    for p in prompts:
        assert len(p.messages) == 1 and p.messages[0]["role"] == "user"
        text = p.messages[0]["content"]
        matches = [(i, re.fullmatch(pat, text)) for i, pat in enumerate(patterns)]
        (i, m), = [(i, m) for i, m in matches if m]
        used.add(i)
        a, op, b = int(m[1]), m[2], int(m[3])
        assert 2 <= a <= 30 and 2 <= b <= 30
        assert p.answer == (a + b if op == "+" else a - b) and p.answer >= 0
        assert p.id == f"arith-{a}{op}{b}" and p.meta["split"] == "dev"
    assert len(used) > 1  # the phrasing varies


def test_operand_range_and_ops_are_configurable():
    task = get_task("arithmetic", low=1, high=3, ops=("+",))
    assert sum(len(task.problems(s)) for s in ("train", "dev", "test")) == 9
    assert all(p.meta["op"] == "+" for p in task.prompts("train", len(task.problems("train")), seed=0))


def test_asking_for_too_many_prompts_is_named():
    task = ArithmeticTask(low=1, high=3)
    n = len(task.problems("train"))
    with pytest.raises(ItermergeError, match=rf"asked for {n} train prompts from offset 1, but the split has {n}"):
        task.prompts("train", n, seed=0, offset=1)
    with pytest.raises(ItermergeError, match=r"split 'val': the arithmetic task has splits \['train', 'dev', 'test'\]"):
        task.prompts("val", 1, seed=0)


def test_bad_task_names_and_options():
    with pytest.raises(ItermergeError, match=r"task 'gsm8k' is not built in; known tasks: \['arithmetic'\]"):
        get_task("gsm8k")
    with pytest.raises(ItermergeError, match=r"task 'arithmetic': bad options \['hgih'\]"):
        get_task("arithmetic", hgih=3)
    with pytest.raises(ItermergeError, match=r"low=5, high=3; need integers 0 <= low <= high"):
        ArithmeticTask(low=5, high=3)
    with pytest.raises(ItermergeError, match=r"ops \['\*'\] not supported"):
        ArithmeticTask(ops=("*",))
