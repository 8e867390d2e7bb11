"""All configured evaluators on one model: generate once per decoding mode, then each evaluator of the registry
(``evaluation/evaluators``) measures from those replies."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

from torch import nn

from itermerge.config.evaluation import EvalConfig
from itermerge.devices import Placement, scorer_spec
from itermerge.errors import ItermergeError
from itermerge.evaluation.evaluators import REGISTRY, Pass
from itermerge.evaluation.metric import Metric
from itermerge.labeling import Scorer, VerifierScorer, make_scorer
from itermerge.prompts import split_prompts
from itermerge.sampling import Sample, Sampler, SamplingParams
from itermerge.tasks import Task, get_task
from itermerge.tokenization import encode_prompt, pad_id


class Evaluator:
    """Prompts, scorer and reference model prepared once; ``evaluator(model)`` measures one model.

    The search calls it once per (λ, α) point on the same loaded model, so nothing per-point is
    loaded here. ``reference_model`` (π_ref = θ0) is needed only for the KL evaluator.
    """

    def __init__(
        self,
        config: EvalConfig,
        tokenizer: Any,
        split: str,
        *,
        reference_model: nn.Module | None = None,
        scorer: Scorer | None = None,
        make_sampler: Callable[..., Sampler] | None = None,
        progress: bool = True,
        where: Placement | None = None,
    ):
        self.config, self.tokenizer, self.split, self.progress = config, tokenizer, split, progress
        self.task: Task | None = (None if config.prompts.task is None
                                  else get_task(config.prompts.task, **config.prompts.task_options))
        self.prompts = split_prompts(config.prompts, split)
        # No max_length: an evaluation prompt is never dropped, so prompt_ids[i] belongs to prompts[i].
        self.prompt_ids: list[list[int]] = [encode_prompt(tokenizer, p.messages) for p in self.prompts]
        self.pad_id = pad_id(tokenizer)
        self.scorer = scorer
        if config.reward is not None and scorer is None:
            self.scorer = (  # a judge on the run's device in its precision, as when labelling (``where``)
                make_scorer(config.reward.scorer if where is None else scorer_spec(config.reward.scorer, where))
                if config.reward.scorer is not None
                else VerifierScorer(self.task.score, name=f"{self.task.name}.score")
            )
        self.reference_model = reference_model
        self.make_sampler = make_sampler
        self.evaluators = [spec for spec in REGISTRY.values() if spec.on(config)]
        self.state: dict[str, Any] = {}
        for spec in self.evaluators:  # each evaluator's own preparation (its checks, its prompts), once per split
            self.state[spec.name] = spec.prepare(self)

    def subset(self, start: int, stop: int) -> Evaluator:
        """The same evaluators on the prompts [start, stop) of the split alone (the budgeted search's rounds).

        A prompt's samples are seeded by its content, so its items are those of a whole-split evaluation (a prompt
        repeated in the split is seeded by its repeat number, which a subset counts from ``start``)."""
        if not 0 <= start < stop <= len(self.prompts):
            raise ItermergeError(f"prompts [{start}, {stop}) of split {self.split!r}: it has {len(self.prompts)}; give "
                                 f"0 <= start < stop <= {len(self.prompts)}")
        for spec in self.evaluators:
            problem = spec.no_subset(self)
            if problem is not None:
                raise ItermergeError(problem)
        part = copy.copy(self)
        part.prompts, part.prompt_ids = self.prompts[start:stop], self.prompt_ids[start:stop]
        return part

    def sampling_params(self, mode: str, n: int) -> SamplingParams:
        """greedy; eval = appendix A's evaluation column; exact = temperature 1 with nothing cut (for KL)."""
        common = dict(n=n, max_new_tokens=self.config.max_new_tokens, seed=self.config.prompts.seed)
        if mode == "greedy":
            return SamplingParams(temperature=0.0, **common)
        if mode == "eval":
            return SamplingParams.evaluation(**common)
        return SamplingParams.training(**common)

    def __call__(self, model: nn.Module, timings: dict[str, float] | None = None) -> dict[str, Metric]:
        """Every configured metric of ``model``, evaluator by evaluator in the registry's order; ``timings`` (if
        given) receives seconds per phase: ``generate_s``, then ``NAME_s`` per evaluator."""
        from itermerge.sampling.hf import HFSampler

        make_sampler = self.make_sampler or HFSampler
        timings = timings if timings is not None else {}
        # The largest n per decoding mode is sampled once; sample k of a prompt does not depend on n
        # (its seed is keyed on the prompt and k), so a smaller request takes the first n.
        wanted: dict[str, int] = {}
        for spec in self.evaluators:
            for mode, n in spec.samples(getattr(self.config, spec.name)):
                wanted[mode] = max(wanted.get(mode, 0), n)
        sampler = make_sampler(model, self.tokenizer, batch_size=self.config.batch_size, progress=self.progress)
        start = time.perf_counter()
        samples: dict[str, list[list[Sample]]] = {
            mode: sampler.generate(self.prompt_ids, self.sampling_params(mode, n)) for mode, n in wanted.items()
        }
        timings["generate_s"] = time.perf_counter() - start
        out: dict[str, Metric] = {}
        for spec in self.evaluators:
            start = time.perf_counter()
            out.update(spec.measure(Pass(self, model, sampler, samples, self.state[spec.name])))
            timings[f"{spec.name}_s"] = time.perf_counter() - start
        return out


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    config: EvalConfig,
    split: str,
    *,
    reference_model: nn.Module | None = None,
    progress: bool = True,
) -> dict[str, Metric]:
    """Every evaluator of ``config`` on ``model`` over ``split``: ``{"accuracy": Metric, "reward": …, …}``."""
    return Evaluator(config, tokenizer, split, reference_model=reference_model, progress=progress)(model)


def metrics_to_dict(metrics: dict[str, Metric]) -> dict[str, dict[str, Any]]:
    return {name: m.to_dict() for name, m in metrics.items()}

