"""The verifier of the example task: write a word in capital letters, and nothing else.

itermerge calls ``score(prompt, completion)`` for every sampled reply (``scorer.function:
examples/custom_task/caps.py:score``). ``prompt`` is an ``itermerge.records.Prompt`` (``.id``, ``.messages``,
``.answer``, ``.meta`` with any extra keys of the prompt file's row); ``completion`` is the reply's text.
Because this module also defines ``is_correct`` and ``follows_format``, the evaluation reports accuracy and
format rate for this task too.
"""

from __future__ import annotations

PUNCTUATION = " \t\n.!?\"'`*"


def reply_word(completion: str) -> str:
    """The reply without surrounding spaces, quotes and final punctuation."""
    return completion.strip().strip(PUNCTUATION)


def score(prompt, completion: str) -> float:
    """1 for exactly the answer; otherwise, graded below 0: the share of the answer's letters matched in place by
    the reply's first word (case counts), less a little for length, so that a nearer miss ranks higher."""
    answer, reply = str(prompt.answer), reply_word(completion)
    if reply == answer:
        return 1.0
    first = reply.split()[0] if reply.split() else ""
    matched = sum(a == b for a, b in zip(first, answer)) / len(answer)
    return matched - 1.0 - min(len(completion), 200) / 1000


def is_correct(prompt, completion: str) -> bool:
    return reply_word(completion) == str(prompt.answer)


def follows_format(prompt, completion: str) -> bool:
    """One word in capital letters, as the prompt asks (right or wrong)."""
    reply = reply_word(completion)
    return len(reply.split()) == 1 and reply.isupper()
