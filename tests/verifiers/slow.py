"""A verifier that takes its time, so that a run holds its run directory long enough for a second one to knock."""

import time


def score(prompt, completion: str) -> float:
    time.sleep(0.25)
    return -len(completion) / 100
