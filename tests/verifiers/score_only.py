"""A verifier with a score and nothing else: accuracy cannot be decided from it."""


def score(prompt, completion: str) -> float:
    return -len(completion) / 100
