"""``evaluation.axes``: a user's own evaluation axes, each a metrics function on greedy replies to its own prompts
(or to the split's: the accuracy replies, nothing generated twice), reported as ``NAME/metric``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from itermerge.callables import load_callable
from itermerge.errors import ItermergeError
from itermerge.evaluation.evaluators.base import Pass, Spec
from itermerge.evaluation.metric import Metric, mean_metric
from itermerge.records import Prompt
from itermerge.sampling import SamplingParams
from itermerge.tokenization import encode_prompt

if TYPE_CHECKING:
    from itermerge.config.evaluation import AxisConfig
    from itermerge.evaluation.suite import Evaluator

Loaded = tuple["AxisConfig", list[Prompt] | None, list[list[int]] | None]


def load_axis(axis: AxisConfig, split: str, seed: int, tokenizer: Any) -> Loaded:
    """An axis with its prompts and their token ids (None for both when it reads the split's own replies)."""
    if axis.prompts is None:
        return axis, None, None
    prompts = load_callable(axis.prompts)(split, axis.n, seed)
    if not prompts:
        raise ItermergeError(f"evaluation axis {axis.name!r}: {axis.prompts} gave no {split} prompts")
    return axis, prompts, [encode_prompt(tokenizer, p.messages) for p in prompts]


def _prepare(evaluator: Evaluator) -> list[Loaded]:
    """The axes that run on the evaluator's split (test only, unless an axis says otherwise)."""
    config = evaluator.config
    return [load_axis(axis, evaluator.split, config.prompts.seed, evaluator.tokenizer) for axis in config.axes
            if evaluator.split in axis.splits]


def _measure(run: Pass) -> dict[str, Metric]:
    """Each axis's metrics function on its greedy replies; each metric the mean over the units it returned."""
    config, out = run.config, {}
    for axis, prompts, prompt_ids in run.state:
        if prompts is None:
            prompts = run.evaluator.prompts
            completions = [row[0] for row in run.texts(config.accuracy.sampling, 1)]
        else:
            params = SamplingParams(temperature=0.0, n=1, seed=config.prompts.seed,
                                    max_new_tokens=axis.max_new_tokens or config.max_new_tokens)
            completions = [row[0].text for row in run.sampler.generate(prompt_ids, params)]
        values = load_callable(axis.metrics)(prompts, completions)
        if not isinstance(values, dict) or not values:
            raise ItermergeError(f"evaluation axis {axis.name!r}: {axis.metrics} returned {values!r:.80}; it must "
                                 "return {metric: [value per unit]}")
        out.update({f"{axis.name}/{name}": mean_metric([float(v) for v in vs]) for name, vs in values.items()})
    return out


def _no_subset(evaluator: Evaluator) -> str | None:
    if any(prompts is not None for _, prompts, _ in evaluator.state.get("axes") or ()):
        return (f"evaluation.axes with prompts of their own run on split {evaluator.split!r}, so it cannot be "
                "evaluated on a prompt subset; use search.method: grid, or run the axes on test only (splits: [test])")
    return None


SPEC = Spec(
    name="axes", summary="a user's metrics function on greedy replies to its own prompts, or to the split's",
    reports="`NAME/METRIC` per axis and metric (test only by default)", measure=_measure, prepare=_prepare,
    no_subset=_no_subset,
)
