"""``evaluation.kl``: KL(π ‖ π_ref) estimated from samples of π, the alignment-tax axis of the search."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from itermerge.errors import ItermergeError
from itermerge.evaluation.evaluators.base import Pass, Spec
from itermerge.evaluation.metric import Metric, clustered_mean

if TYPE_CHECKING:
    from torch import nn

    from itermerge.evaluation.suite import Evaluator


def sequence_kl(
    policy: nn.Module,
    reference: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    batch_size: int = 16,
) -> Metric:
    """KL(π(·|x) ‖ π_ref(·|x)) ≈ mean over y ~ π of log π(y|x) − log π_ref(y|x), in nats per sequence.

    ``completion_ids[i]`` are samples of π for prompt i, drawn at temperature 1 without top-p/top-k
    (the Monte-Carlo estimate is unbiased only under π's own law), each ending in EOS when finished:
    EOS is scored, since the probability of stopping is part of π. A sample cut at the length limit
    estimates the KL of the length-capped distribution. Standard error over prompts (``clustered_mean``).
    """
    from itermerge.logprobs import score_sequences

    flat_prompts = [p for p, ys in zip(prompt_ids, completion_ids) for _ in ys]
    flat_ys = [y for ys in completion_ids for y in ys]
    logp = score_sequences(policy, flat_prompts, flat_ys, pad_id, batch_size)
    logp_ref = score_sequences(reference, flat_prompts, flat_ys, pad_id, batch_size)
    groups, i = [], 0
    for ys in completion_ids:
        groups.append([a - b for a, b in zip(logp[i : i + len(ys)], logp_ref[i : i + len(ys)])])
        i += len(ys)
    return clustered_mean(groups)


def _prepare(evaluator: Evaluator) -> None:
    if evaluator.reference_model is None:
        raise ItermergeError("eval.kl needs the reference model π_ref (θ0): pass reference_model= (itermerge eval "
                             "--reference THETA0)")


def _measure(run: Pass) -> dict[str, Metric]:
    ev = run.evaluator
    ys = [[s.token_ids for s in row] for row in run.samples["exact"]]
    return {"kl": sequence_kl(run.model, ev.reference_model, ev.prompt_ids, ys, ev.pad_id)}


SPEC = Spec(
    name="kl", summary="KL(π ‖ π_ref) in nats per reply, from replies sampled at temperature 1 with nothing cut",
    reports="`kl` (lower is better)", measure=_measure, metrics=("kl",), prepare=_prepare,
    samples=lambda kl: [("exact", kl.samples)], lower_is_better=frozenset({"kl"}), needs_reference=True,
)
