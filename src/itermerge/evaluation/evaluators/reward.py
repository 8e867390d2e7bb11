"""``evaluation.reward``: the paper's "average reward" (§4.2), the mean score of replies under the judge (the run's
scorer, a reward model, or the task's own graded score)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from itermerge.evaluation.evaluators.base import Pass, Spec, one_list_per_prompt
from itermerge.evaluation.metric import Metric, clustered_mean

if TYPE_CHECKING:
    from itermerge.labeling import Scorer
    from itermerge.records import Prompt


def mean_reward(scorer: Scorer, prompts: Sequence[Prompt], completions: Sequence[Sequence[str]]) -> Metric:
    """Mean over prompts of the mean score of their replies."""
    one_list_per_prompt(prompts, completions)
    flat_prompts = [p for p, cs in zip(prompts, completions) for _ in cs]
    scores = scorer.score(flat_prompts, [c for cs in completions for c in cs])
    groups, i = [], 0
    for cs in completions:
        groups.append(scores[i : i + len(cs)])
        i += len(cs)
    return clustered_mean(groups)


def _measure(run: Pass) -> dict[str, Metric]:
    reward = run.config.reward
    return {"reward": mean_reward(run.evaluator.scorer, run.evaluator.prompts, run.texts(reward.sampling,
                                                                                          reward.samples))}


SPEC = Spec(
    name="reward", summary="the judge's mean score of each prompt's replies (evaluation.reward.scorer, else the "
                           "task's graded score)",
    reports="`reward`", measure=_measure, metrics=("reward",),
    samples=lambda reward: [(reward.sampling, reward.samples)],
)
