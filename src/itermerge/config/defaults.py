"""Evaluation defaults that follow the run: what a user leaves out is evaluated on their own task, not on ours.

Applied to the plain data of a config before it is built, so the resolved config (run_dir/config.yaml) shows
every choice made here:

- ``evaluation.prompts``: a built-in task's dev/test splits; for a user's prompt file, ``prompts.dev_path`` /
  ``prompts.test_path`` where given, else dev and test prompts held out of the training file;
- ``evaluation.reward.scorer``: the run's own scorer (the judge that labelled the pairs);
- ``evaluation.accuracy`` for a user's task: on when the verifier's module also defines ``is_correct``
  (and ``follows_format`` for the format rate), off otherwise;
- ``search.rule.capability``: ``[accuracy]`` when accuracy is measured, else none (the rule then picks the
  highest reward).
"""

from __future__ import annotations

from typing import Any

from itermerge.callables import sibling
from itermerge.errors import ItermergeError


def follow_the_run(data: dict[str, Any], scorer: dict[str, Any] | None) -> dict[str, Any]:
    """``data`` with the defaults above filled in; anything the user wrote is kept as written. ``scorer``: the run
    scorer's spec (``ScorerConfig.spec()``), None when the scorer section is malformed (the build says so)."""
    data = dict(data)
    prompts = data.get("prompts") or {}
    evaluation = data.get("evaluation") if data.get("evaluation") is not None else {}
    if not isinstance(prompts, dict) or not isinstance(evaluation, dict):
        return data  # the builder names the malformed section
    evaluation = dict(evaluation)
    own_task = prompts.get("source", "task") != "task"
    files = {split: prompts[f"{split}_path"] for split in ("dev", "test") if prompts.get(f"{split}_path")}
    if "prompts" not in evaluation:
        common = {"n": prompts.get("dev", 100), "seed": data.get("seed", 0), "files": files,
                  **({"test_n": prompts["test"]} if prompts.get("test") is not None else {})}
        if own_task:
            evaluation["prompts"] = {**common, "task": None, "heldout_source": prompts.get("source"),
                                     "heldout_from": prompts.get("path") if len(files) < 2 else None}
        else:
            evaluation["prompts"] = {**common, "task": prompts.get("task", "arithmetic"),
                                     "task_options": prompts.get("task_options", {})}
    reward = evaluation.get("reward", {})
    if isinstance(reward, dict) and "scorer" not in reward and scorer is not None:
        evaluation["reward"] = {**reward, "scorer": scorer}
    task_given = isinstance(evaluation.get("prompts"), dict) and evaluation["prompts"].get("task") is not None
    accuracy = evaluation.get("accuracy", {})
    if own_task and not task_given and isinstance(accuracy, dict) and not _decided(accuracy):
        verifier = scorer.get("function") if scorer and scorer.get("type") == "verifier" else None
        is_correct = _sibling(verifier, "is_correct")
        if is_correct is not None:
            evaluation["accuracy"] = {**accuracy, "verifier": is_correct,
                                      **({"format": f} if (f := _sibling(verifier, "follows_format")) else {})}
        elif "accuracy" not in evaluation:
            evaluation["accuracy"] = None  # nothing decides correctness: the user did not ask for it either
    data["evaluation"] = evaluation
    if evaluation.get("accuracy", {}) is None:
        search = dict(data.get("search") or {})
        rule = search.get("rule") if search.get("rule") is not None else {}
        if isinstance(rule, dict) and "capability" not in rule:
            search["rule"] = {**rule, "capability": []}
            data["search"] = search
    return data


def _sibling(verifier: str | None, name: str) -> str | None:
    """``sibling``, except that a verifier whose module does not import is taken to have the function: the build
    then goes through and the preflight check reports the import failure beside every other problem."""
    if not verifier:
        return None
    try:
        return sibling(verifier, name)
    except ItermergeError:
        return f"{verifier.partition(':')[0]}:{name}" if name == "is_correct" else None


def _decided(accuracy: dict[str, Any]) -> bool:
    return accuracy.get("verifier") is not None or accuracy.get("threshold") is not None
