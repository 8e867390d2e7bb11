"""Every seed of a run, from one function: a stage redone after a crash draws exactly what it drew the first time."""

from __future__ import annotations


def stage_seed(run_seed: int, stage: str, t: int = 0) -> int:
    """The seed of stage ``stage`` of iteration ``t`` (0 outside the iterations) of a run seeded ``run_seed``.

        seed = (run_seed · 1,000,003 + t · 1,009 + Σ ord(c) for c in stage) mod 2³¹

    e.g. stage_seed(0, "sample", 1) = 1,009 + 642 = 1,651. Deterministic across processes and Python versions
    (no ``hash()``); distinct stages of one run get distinct seeds as long as their names' character sums differ,
    which holds for every name used here. The formula is kept as it is so that existing runs reproduce.
    Names used: "sample" and "train" per iteration; "studies/prompts", "studies/sampling", "studies/ensemble".
    """
    return (run_seed * 1_000_003 + t * 1009 + sum(map(ord, stage))) % (2**31)
