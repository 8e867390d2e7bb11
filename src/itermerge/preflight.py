"""The whole config checked against itself before the first iteration: a mismatch is a named error at start-up,
not after hours of training.

Every check runs and every problem is reported at once: the prompt files exist and parse and hold enough
prompts for T iterations, dev and test never overlap a training prompt, the scorers import and score one
sample, every evaluator has what it needs, and the selection rule names metrics that some evaluator produces.
Nothing here loads a model's weights.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from itermerge.config import RunConfig
from itermerge.errors import ItermergeError
from itermerge.records import Prompt
from itermerge.sampling.backends import check_backend


def preflight(cfg: RunConfig) -> None:
    """Raise one ``ItermergeError`` listing every problem of ``cfg``; return quietly when there is none."""
    problems: list[str] = []

    def check(what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except ItermergeError as e:
            problems.append(f"{what}: {e}")
        return None

    from itermerge.prompts import content_key, split_prompts, training_prompts

    train = check("prompts", lambda: [p for t in range(1, cfg.iterations + 1) for p in training_prompts(cfg, t)])
    sample = (train or [None])[0]
    held = {split: check(f"evaluation {split} prompts", lambda s=split: split_prompts(cfg.evaluation.prompts, s))
            for split in ("dev", "test")}
    for split, prompts in held.items():
        if prompts is not None and not prompts:
            problems.append(f"evaluation {split} prompts: none; give prompts.{split}_path or more prompts")
        if prompts and train:
            seen = {content_key(p): p.id for p in train}
            clash = next((p for p in prompts if content_key(p) in seen), None)
            if clash is not None:
                problems.append(f"evaluation {split} prompts: {clash.id!r} is also training prompt "
                                f"{seen[content_key(clash)]!r}; dev and test prompts must never be trained on")
    sample = sample or next((p for ps in held.values() if ps for p in ps), None)
    check("scorer", lambda: _check_scorer(cfg.scorer.spec(), sample))
    check("sampling.backend", lambda: check_backend(cfg.sampling.backend))
    ev = cfg.evaluation
    if ev.reward is not None and ev.reward.scorer is not None and ev.reward.scorer != cfg.scorer.spec():
        check("evaluation.reward.scorer", lambda: _check_scorer(ev.reward.scorer, sample))
    if ev.accuracy is not None:
        for name in ("verifier", "format"):
            spec = getattr(ev.accuracy, name)
            if spec is not None:
                check(f"evaluation.accuracy.{name}", lambda spec=spec: _check_predicate(spec, sample))
    if ev.lm_eval is not None:
        check("evaluation.lm_eval", _check_lm_eval)
        if cfg.search.method == "halving":
            problems.append("search.method = halving evaluates points on subsets of the dev prompts, but "
                            "evaluation.lm_eval scores benchmark documents, which cannot be cut the same way; use "
                            "search.method: grid, or drop lm_eval from the evaluation")
    for axis in ev.axes:  # an axis that fails at the test, after the training, would cost the whole run
        check(f"evaluation.axes {axis.name!r}", lambda axis=axis: _check_axis(axis, ev.prompts.seed))
        if axis.prompts is not None and "dev" in axis.splits and cfg.search.method == "halving":
            problems.append(f"evaluation.axes {axis.name!r} runs on dev with prompts of its own, which the halving "
                            "search cannot cut into rounds; use search.method: grid, or splits: [test]")
    if cfg.model.device != "cpu":  # on CUDA: every stage's peak against this GPU (itermerge plan shows them)
        from itermerge.plan import check_fits

        too_big = check_fits(cfg)
        if too_big:
            problems.append(f"memory: {too_big}")
    if cfg.dpo.peft is not None and cfg.sampling.backend == "vllm":
        problems.append("dpo.peft with sampling.backend = vllm: vLLM loads θ_t from a checkpoint directory, and a LoRA "
                        "run keeps θ_t as θ0 plus adapters; use sampling.backend: hf, or full training")
    if cfg.dpo.peft is not None:
        from itermerge.checkpoint import resolve_model

        check("dpo.peft.target_modules", lambda: _check_targets(resolve_model(cfg.model.path), cfg.dpo.peft))
    sharding = [v for v in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP") if os.environ.get(v) == "true"]
    if cfg.dpo.reference in ("soft", "hard") and sharding:
        problems.append(f"dpo.reference = {cfg.dpo.reference} under {sharding[0]}: the reference update needs the "
                        "whole trained weights on every process (ZeRO-3 and FSDP shard them, TRL issue 1971); launch "
                        "with DDP or on one process, or use dpo.reference: fixed or previous")
    produced = ev.metrics()
    rule = cfg.search.rule
    for metric in rule.metrics:
        if metric not in produced:
            problems.append(
                f"search.rule names metric {metric!r}, which no evaluator produces (they produce "
                f"{', '.join(produced) or 'nothing'}); turn its evaluator on or name another metric"
            )
    if cfg.studies.lambda_study:
        check("studies.second_criterion", lambda: _check_scorer(
            {"type": "verifier", "function": cfg.studies.second_criterion}, sample))
    if problems:
        raise ItermergeError("the config does not hold together (nothing was sampled or trained):\n  - "
                             + "\n  - ".join(problems))


def _check_scorer(spec: dict[str, Any], sample: Prompt | None) -> None:
    """A verifier imports and scores one sample finitely; a reward model's directory holds a config (or it is a
    Hub id). Its weights are not loaded here."""
    if spec.get("type") == "verifier":
        from itermerge.labeling.verifier import VerifierScorer

        scorer = VerifierScorer.from_spec(spec["function"])
        if sample is not None:
            scorer.score([sample], [_plausible_reply(sample)])
        return
    path = Path(str(spec.get("path")))
    if path.exists() and not (path / "config.json").is_file():
        raise ItermergeError(f"reward model {path}: no config.json in it; give an HF checkpoint directory")
    if not path.exists() and str(path).count("/") != 1:
        raise ItermergeError(f"reward model {path}: no such directory, and not a Hub id (org/name)")


def _check_predicate(spec: str, sample: Prompt | None) -> None:
    from itermerge.callables import load_callable

    fn = load_callable(spec)
    if sample is not None:
        try:
            value = fn(sample, _plausible_reply(sample))
        except Exception as e:
            raise ItermergeError(f"{spec} raised {type(e).__name__}: {e} on prompt {sample.id!r}") from e
        if not isinstance(value, (bool, int)) and not (isinstance(value, float) and math.isfinite(value)):
            raise ItermergeError(f"{spec} returned {value!r:.60} on prompt {sample.id!r}; it must return True or False")


def _check_axis(axis: Any, seed: int) -> None:
    """The axis's functions import, and its prompts function gives prompts for each of its splits."""
    from itermerge.callables import load_callable

    load_callable(axis.metrics)
    if axis.prompts is None:
        return
    make = load_callable(axis.prompts)
    for split in axis.splits:
        prompts = make(split, axis.n, seed)
        if not prompts or not all(isinstance(p, Prompt) for p in prompts):
            raise ItermergeError(f"{axis.prompts}({split!r}, {axis.n}, {seed}) gave {prompts!r:.80}; it must return "
                                 "a non-empty list of itermerge.records.Prompt")


def _check_lm_eval() -> None:
    from itermerge.evaluation.evaluators.lm_eval import require_lm_eval

    require_lm_eval()


def _plausible_reply(prompt: Prompt) -> str:
    """A reply to try a scorer on: the prompt's answer when it has one (a verifier should accept it)."""
    return str(prompt.answer) if prompt.answer is not None else "OK"


def _check_targets(theta0: Any, peft: Any) -> None:
    """Every LoRA target module names linear layers of θ0: its architecture built on the meta device from its
    config (no weights read, so this costs the same for 135M and 8B)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from itermerge.training.peft import check_target_modules

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(theta0))
    check_target_modules(model, peft.target_modules)
