"""All configured evaluators on one model: generate once per decoding mode, then score."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

from torch import nn

from itermerge.callables import load_callable
from itermerge.config.evaluation import AxisConfig, EvalConfig
from itermerge.devices import Placement, scorer_spec
from itermerge.errors import ItermergeError
from itermerge.evaluation.kl import sequence_kl
from itermerge.evaluation.metric import Metric, mean_metric
from itermerge.evaluation.task import accuracy_metrics, format_check, load_task, mean_reward
from itermerge.labeling import Scorer, VerifierScorer, make_scorer
from itermerge.prompts import split_prompts
from itermerge.records import Prompt
from itermerge.sampling import Sample, Sampler, SamplingParams
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
        self.task = load_task(config.prompts)
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
        if config.kl is not None and reference_model is None:
            raise ItermergeError(
                "eval.kl needs the reference model π_ref (θ0): pass reference_model= (itermerge eval "
                "--reference THETA0)"
            )
        self.reference_model = reference_model
        self.make_sampler = make_sampler
        self.axes = [_load_axis(axis, split, config.prompts.seed, tokenizer) for axis in config.axes
                     if split in axis.splits]
        self.is_correct, self.follows_format = self._accuracy_checks() if config.accuracy is not None else (None, None)

    def _accuracy_checks(self) -> tuple[Callable[[Prompt, str], bool], Callable[[Prompt, str], bool] | None]:
        """What decides a correct reply (the configured verifier, a threshold on the reward scorer's score, or the
        task's verifier) and the answer-format check (configured, or the task's; none for a user's task)."""
        acc = self.config.accuracy
        if acc.verifier is not None:
            is_correct = load_callable(acc.verifier)
        elif acc.threshold is not None:
            def is_correct(prompt: Prompt, completion: str) -> bool:
                return self.scorer.score([prompt], [completion])[0] >= acc.threshold
        else:
            is_correct = self.task.is_correct
        if acc.format is not None:
            return is_correct, load_callable(acc.format)
        return is_correct, format_check(self.task) if self.task is not None else None

    def subset(self, start: int, stop: int) -> Evaluator:
        """The same evaluators on the prompts [start, stop) of the split alone (the budgeted search's rounds).

        A prompt's samples are seeded by its content, so its items are those of a whole-split evaluation (a prompt
        repeated in the split is seeded by its repeat number, which a subset counts from ``start``)."""
        if not 0 <= start < stop <= len(self.prompts):
            raise ItermergeError(f"prompts [{start}, {stop}) of split {self.split!r}: it has {len(self.prompts)}; give "
                                 f"0 <= start < stop <= {len(self.prompts)}")
        if self.config.lm_eval is not None:
            raise ItermergeError("evaluation.lm_eval measures benchmark documents, not the split's prompts, so it "
                                 "cannot be evaluated on a prompt subset; use search.method: grid with lm_eval")
        if any(prompts is not None for _, prompts, _ in self.axes):
            raise ItermergeError(f"evaluation.axes with prompts of their own run on split {self.split!r}, so it "
                                 "cannot be evaluated on a prompt subset; use search.method: grid, or run the axes "
                                 "on test only (splits: [test])")
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
        """Every configured metric of ``model``; ``timings`` (if given) receives seconds per phase."""
        from itermerge.sampling.hf import HFSampler

        make_sampler = self.make_sampler or HFSampler
        cfg, timings = self.config, timings if timings is not None else {}
        # The largest n per decoding mode is sampled once; sample k of a prompt does not depend on n
        # (its seed is keyed on the prompt and k), so a smaller request takes the first n.
        requests = [
            (section.sampling, section.samples) for section in (cfg.accuracy, cfg.reward) if section is not None
        ]
        requests += [("exact", cfg.kl.samples)] if cfg.kl is not None else []
        wanted: dict[str, int] = {}
        for mode, n in requests:
            wanted[mode] = max(wanted.get(mode, 0), n)
        sampler = make_sampler(model, self.tokenizer, batch_size=cfg.batch_size, progress=self.progress)
        start = time.perf_counter()
        samples: dict[str, list[list[Sample]]] = {
            mode: sampler.generate(self.prompt_ids, self.sampling_params(mode, n)) for mode, n in wanted.items()
        }
        timings["generate_s"] = time.perf_counter() - start

        def texts(mode: str, n: int) -> list[list[str]]:
            return [[s.text for s in row[:n]] for row in samples[mode]]

        out: dict[str, Metric] = {}
        start = time.perf_counter()
        if cfg.accuracy is not None:
            replies = texts(cfg.accuracy.sampling, cfg.accuracy.samples)
            out.update(accuracy_metrics(self.is_correct, self.follows_format, self.prompts, replies))
        if cfg.reward is not None:
            out["reward"] = mean_reward(self.scorer, self.prompts, texts(cfg.reward.sampling, cfg.reward.samples))
        timings["score_s"] = time.perf_counter() - start
        if self.axes:
            start = time.perf_counter()
            replies = texts(cfg.accuracy.sampling, 1) if cfg.accuracy is not None else None
            out.update(self._axis_metrics(sampler, replies))
            timings["axes_s"] = time.perf_counter() - start
        if cfg.kl is not None:
            start = time.perf_counter()
            ys = [[s.token_ids for s in row] for row in samples["exact"]]
            out["kl"] = sequence_kl(model, self.reference_model, self.prompt_ids, ys, self.pad_id)
            timings["kl_s"] = time.perf_counter() - start
        if cfg.lm_eval is not None:
            from itermerge.evaluation.lm_eval import resolve_tasks, run_lm_eval

            start = time.perf_counter()
            lm = cfg.lm_eval
            out.update(
                run_lm_eval(
                    model,
                    resolve_tasks(lm),
                    self.tokenizer,
                    include_path=lm.include_path,
                    limit=lm.limit,
                    batch_size=lm.batch_size,
                    fewshot_as_multiturn=lm.fewshot_as_multiturn,
                    split=self.split if lm.split_documents else None,
                )
            )
            timings["lm_eval_s"] = time.perf_counter() - start
        return out


    def _axis_metrics(self, sampler: Sampler, replies: list[list[str]] | None) -> dict[str, Metric]:
        """``NAME/metric`` of every axis on this split: greedy replies to its prompts (or the accuracy replies to the
        split's), passed to its metrics function; each metric the mean over the units it returned."""
        out: dict[str, Metric] = {}
        for axis, prompts, prompt_ids in self.axes:
            if prompts is None:
                prompts, completions = self.prompts, [row[0] for row in replies]
            else:
                params = SamplingParams(temperature=0.0, n=1, seed=self.config.prompts.seed,
                                        max_new_tokens=axis.max_new_tokens or self.config.max_new_tokens)
                completions = [row[0].text for row in sampler.generate(prompt_ids, params)]
            values = load_callable(axis.metrics)(prompts, completions)
            if not isinstance(values, dict) or not values:
                raise ItermergeError(f"evaluation axis {axis.name!r}: {axis.metrics} returned {values!r:.80}; it must "
                                     "return {metric: [value per unit]}")
            out.update({f"{axis.name}/{name}": mean_metric([float(v) for v in vs]) for name, vs in values.items()})
        return out


def _load_axis(axis: AxisConfig, split: str, seed: int, tokenizer: Any
               ) -> tuple[AxisConfig, list[Prompt] | None, list[list[int]] | None]:
    """An axis with its prompts and their token ids (None for both when it reads the split's own replies)."""
    if axis.prompts is None:
        return axis, None, None
    prompts = load_callable(axis.prompts)(split, axis.n, seed)
    if not prompts:
        raise ItermergeError(f"evaluation axis {axis.name!r}: {axis.prompts} gave no {split} prompts")
    return axis, prompts, [encode_prompt(tokenizer, p.messages) for p in prompts]


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

