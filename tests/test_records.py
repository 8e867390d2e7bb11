"""Records: JSONL round trips and line-numbered errors for every way a file can be wrong."""

from __future__ import annotations

import json

import pytest

from itermerge.errors import ItermergeError
from itermerge.prompts import read_prompts_jsonl
from itermerge.records import (
    Completion,
    PreferencePair,
    Prompt,
    read_jsonl,
    write_jsonl,
)

MSG = [{"role": "user", "content": "What is 2 + 3?"}]


def pair(**overrides) -> dict:
    row = dict(
        prompt_id="p0", messages=MSG, prompt_ids=[1, 5, 6], chosen="5", rejected="six",
        chosen_ids=[21, 2], rejected_ids=[84, 2], chosen_score=1.0, rejected_score=-1.5,
    )
    row.update(overrides)
    return row


def write_lines(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_round_trip_keeps_every_field(tmp_path):
    records = [
        PreferencePair(**pair(ref_chosen_logp=-1.25, ref_rejected_logp=-7.5)),
        PreferencePair(**pair(prompt_id="p1", chosen="ünïcode ✓")),
    ]
    write_jsonl(tmp_path / "pairs.jsonl", records)
    assert read_jsonl(tmp_path / "pairs.jsonl", PreferencePair) == records
    completions = [Completion("p0", 3, "5", [21, 2], True, score=0.5, scores={"brevity": -0.01})]
    write_jsonl(tmp_path / "samples.jsonl", completions)
    assert read_jsonl(tmp_path / "samples.jsonl", Completion) == completions
    prompts = [Prompt("a", MSG, answer=5, meta={"split": "dev"})]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    assert read_jsonl(tmp_path / "prompts.jsonl", Prompt) == prompts


def test_write_is_atomic_and_leaves_no_temporary(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", [PreferencePair(**pair())])
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]
    assert len((tmp_path / "pairs.jsonl").read_text().splitlines()) == 1


def test_writing_nan_fails_instead_of_producing_invalid_json(tmp_path):
    with pytest.raises(ValueError):
        write_jsonl(tmp_path / "pairs.jsonl", [PreferencePair(**pair(chosen_score=float("nan")))])
    assert not (tmp_path / "pairs.jsonl").exists()


def test_blank_lines_are_skipped_and_line_numbers_count_them(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_lines(path, [pair(), "", pair(chosen_ids=[])])
    with pytest.raises(ItermergeError, match=r'pairs\.jsonl line 3: "chosen_ids" is empty'):
        read_jsonl(path, PreferencePair)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("{not json", r"line 2: not valid JSON"),
        ("[1, 2]", r"line 2: expected a JSON object"),
        (pair(chosen=None), r'line 2: "chosen" must be a string, got None'),
        (pair(chosen_ids=[1, "x"]), r'line 2: "chosen_ids"\[1\] must be an integer'),
        (pair(chosen_ids=[1, True]), r'line 2: "chosen_ids"\[1\] must be an integer'),
        (pair(chosen_score="high"), r'line 2: "chosen_score" must be a number'),
        (pair(ref_chosen_logp="x"), r'line 2: "ref_chosen_logp" must be a number or null'),
        (pair(prompt_ids=[]), r'line 2: "prompt_ids" is empty'),
        (pair(prompt_id=""), r'line 2: "prompt_id" is empty'),
        (pair(extra=1), r"line 2: unknown field\(s\) \['extra'\] for PreferencePair"),
        ({k: v for k, v in pair().items() if k != "rejected"}, r"line 2: missing field\(s\) \['rejected'\]"),
        (pair(messages=[{"role": "bot", "content": "hi"}]), r"line 2: \"messages\"\[0\]: role 'bot' is not one of"),
        (
            pair(messages=[*MSG, {"role": "assistant", "content": "5"}]),
            r"line 2: \"messages\": the last message has role 'assistant'; a prompt must end with the user's turn",
        ),
    ],
)
def test_bad_pair_lines_are_named_by_file_and_line(tmp_path, row, message):
    path = tmp_path / "pairs.jsonl"
    write_lines(path, [pair(), row])
    with pytest.raises(ItermergeError, match=r"pairs\.jsonl " + message):
        read_jsonl(path, PreferencePair)


def test_nan_and_infinity_are_rejected_on_read(tmp_path):
    path = tmp_path / "samples.jsonl"
    write_lines(path, ['{"prompt_id": "p", "index": 0, "text": "", "token_ids": [2], "finished": true, "score": NaN}'])
    with pytest.raises(ItermergeError, match=r'line 1: "score" must be a number or null, got nan'):
        read_jsonl(path, Completion)
    write_lines(path, ['{"prompt_id": "p", "index": 0, "text": "", "token_ids": [2], "finished": true, '
                       '"scores": {"b": Infinity}}'])
    with pytest.raises(ItermergeError, match=r"line 1: \"scores\"\['b'\] must be a finite number"):
        read_jsonl(path, Completion)


def test_completion_field_types(tmp_path):
    path = tmp_path / "samples.jsonl"
    good = {"prompt_id": "p", "index": 0, "text": "", "token_ids": [2], "finished": True}
    write_lines(path, [good])
    assert read_jsonl(path, Completion) == [Completion("p", 0, "", [2], True)]
    write_lines(path, [dict(good, finished=1)])
    with pytest.raises(ItermergeError, match=r'"finished" must be true or false, got 1'):
        read_jsonl(path, Completion)
    write_lines(path, [dict(good, index=1.5)])
    with pytest.raises(ItermergeError, match=r'"index" must be an integer, got 1.5'):
        read_jsonl(path, Completion)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ItermergeError, match=r"nope\.jsonl: file not found"):
        read_jsonl(tmp_path / "nope.jsonl", Completion)


def test_prompt_file_keeps_other_keys_in_meta_and_reads_rlhflow_rows(tmp_path):
    """RLHFlow's iterative-prompt rows carry the chat as context_messages; keys we do not know go to meta."""
    path = tmp_path / "rlhflow.jsonl"
    chat = [{"content": "Write a haiku.", "role": "user"}]
    rows = [{"context_messages": chat, "source": "ultrafeedback"}, {"prompt": "x", "tests": [1, 2]}]
    write_lines(path, rows)
    first, second = read_prompts_jsonl(path)
    assert first == Prompt("rlhflow-1", chat, meta={"source": "ultrafeedback"})
    assert second.meta == {"tests": [1, 2]}


def test_prompt_file_accepts_prompt_or_messages(tmp_path):
    path = tmp_path / "mine.jsonl"
    chat = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    write_lines(
        path, [{"prompt": "What is 2 + 3?", "answer": 5}, {"messages": chat, "id": 7}, {"prompt": "x", "id": "q"}]
    )
    prompts = read_prompts_jsonl(path)
    assert prompts == [
        Prompt("mine-1", [{"role": "user", "content": "What is 2 + 3?"}], answer=5),
        Prompt("7", chat),
        Prompt("q", [{"role": "user", "content": "x"}]),
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "a", "messages": MSG}, r'line 2: give exactly one of "prompt"'),
        ({"id": "x"}, r'line 2: give exactly one of "prompt"'),
        ({"prompt": "  "}, r'line 2: "prompt" must be a non-empty string'),
        ({"prompt": "a", "id": "dup"}, r"line 2: \"id\" 'dup' already used at line 1"),
        ({"prompt": "a", "answer": [5]}, r'line 2: "answer" must be a string or a number'),
        ({"messages": []}, r'line 2: "messages" must be a non-empty list'),
        (
            {"messages": [{"role": "user"}]},
            r'line 2: "messages"\[0\] must be an object with exactly "role" and "content"',
        ),
    ],
)
def test_bad_prompt_lines_are_named(tmp_path, row, message):
    path = tmp_path / "mine.jsonl"
    write_lines(path, [{"prompt": "ok", "id": "dup"}, row])
    with pytest.raises(ItermergeError, match=r"mine\.jsonl " + message):
        read_prompts_jsonl(path)


def test_empty_prompt_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ItermergeError, match=r"empty\.jsonl: no prompts in the file"):
        read_prompts_jsonl(path)
