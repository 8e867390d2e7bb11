"""Labeling (Alg. 1 "label-pref"): score the K samples of each prompt, keep best vs worst as a pair."""

from __future__ import annotations

from typing import Any, Protocol

from itermerge.errors import ItermergeError
from itermerge.labeling.reward_model import RewardModelScorer
from itermerge.labeling.verifier import VerifierScorer
from itermerge.records import Completion, Prompt

__all__ = ["RewardModelScorer", "Scorer", "VerifierScorer", "make_scorer", "select_pair"]


class Scorer(Protocol):
    """Scores completions; ``prompts[i]`` is the prompt of ``completions[i]``, higher is better."""

    def score(self, prompts: list[Prompt], completions: list[str]) -> list[float]: ...


def select_pair(completions: list[Completion]) -> tuple[Completion, Completion] | None:
    """(chosen, rejected) = (best, worst) by ``score``; None when all scores tie (no preference to learn).

    Among equal bests (or equal worsts) the lowest ``index`` wins, so the choice does not depend on
    list order. Scores must already be set.
    """
    unscored = [c.index for c in completions if c.score is None]
    if unscored:
        raise ValueError(f"select_pair: completions {unscored} of prompt {completions[0].prompt_id!r} have no score")
    if len(completions) < 2:
        return None
    chosen = min(completions, key=lambda c: (-c.score, c.index))
    rejected = min(completions, key=lambda c: (c.score, c.index))
    if chosen.score == rejected.score:
        return None
    return chosen, rejected


_SCORER_KEYS = {
    "verifier": ({"type", "function"}, {"type", "function"}),
    "reward_model": ({"type", "path"}, {"type", "path", "trust_remote_code", "batch_size", "device", "dtype"}),
}


def make_scorer(spec: dict[str, Any]) -> Scorer:
    """A scorer from a config dict, e.g. ``{"type": "verifier", "function": "itermerge.tasks.arithmetic:score"}``
    or ``{"type": "reward_model", "path": "RM_DIR", "trust_remote_code": False}``.
    """
    if not isinstance(spec, dict) or spec.get("type") not in _SCORER_KEYS:
        got = spec.get("type") if isinstance(spec, dict) else spec
        raise ItermergeError(f"scorer type {got!r}: use one of {sorted(_SCORER_KEYS)} (scorer.type in the config)")
    required, allowed = _SCORER_KEYS[spec["type"]]
    missing, unknown = sorted(required - set(spec)), sorted(set(spec) - allowed)
    if missing or unknown:
        raise ItermergeError(
            f"scorer of type {spec['type']!r}: missing key(s) {missing}, unknown key(s) {unknown}; "
            f"allowed keys are {sorted(allowed)}"
        )
    options = {k: v for k, v in spec.items() if k != "type"}
    if spec["type"] == "verifier":
        return VerifierScorer.from_spec(options["function"])
    return RewardModelScorer(**options)
