"""The studies as stages of a run: what each reads from the run directory, how the processes share its work out,
and what the main process writes under studies/ and records.

Each study is a pair: ``*_work(…, shard)`` runs on every process over its share (α or λ points, policies,
reward-model columns, prompts) on its own device, and ``*_finish(…, parts)`` puts the shares together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path
from typing import Any

from itermerge.checkpoint import load_tokenizer
from itermerge.config import RunConfig
from itermerge.devices import load_placed, placement, release
from itermerge.labeling import make_scorer
from itermerge.records import PreferencePair, Prompt, read_jsonl, write_jsonl
from itermerge.rundir import RunLayout
from itermerge.runner import Shard, unshard
from itermerge.sampling import SamplingParams
from itermerge.sampling.backends import evaluation_sampler, scorer_spec
from itermerge.seeds import stage_seed


def dev_prompts(cfg: RunConfig, n: int) -> list[Prompt]:
    """``n`` dev prompts of the run for the studies (never the test split): a built-in task's in an order of their
    own, else the first ``n`` of the evaluation's dev prompts (the held-out split itself is never redrawn)."""
    from itermerge.prompts import split_prompts

    source = cfg.evaluation.prompts
    if source.task is not None and "dev" not in source.files:
        return split_prompts(replace(source, n=n, seed=stage_seed(cfg.seed, "studies/prompts")), "dev")
    return split_prompts(source, "dev")[:n]


def study_params(cfg: RunConfig, mode: str | None = None) -> SamplingParams:
    """How a study samples: ``studies.sampling`` = eval is appendix A's evaluation column (as §4.1 generates),
    train the training column (then r_θ/β also estimates KL(π_θ ‖ π_θ0)); ``studies.n`` completions per prompt."""
    seed = stage_seed(cfg.seed, "studies/sampling")
    if (mode or cfg.studies.sampling) == "train":
        return replace(cfg.sampling.params(seed=seed), n=cfg.studies.n)
    return SamplingParams.evaluation(n=cfg.studies.n, max_new_tokens=cfg.evaluation.max_new_tokens, seed=seed)


def _correlations(result: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records of an α or λ study: each series' Pearson r (and p) against the grid."""
    return {name: {"pearson_r": s["pearson_r"], "p_value": s["p_value"]} for name, s in result["series"].items()}


def _scorer(cfg: RunConfig, function: str | None = None) -> Any:
    spec = cfg.scorer.spec() if function is None else {"type": "verifier", "function": function}
    return make_scorer(scorer_spec(spec, placement(cfg.model)))


# --- Table 1 / Fig. 2: α ------------------------------------------------------------------------------------


def alpha_work(cfg: RunConfig, run_dir: Path, thetas: list[Path], shard: Shard) -> list[dict[str, list[float]]]:
    """This process's α points of the α study (λ = 0): the merge's samples and their induced rewards."""
    from itermerge.merging import MergeBasis
    from itermerge.studies.alpha import alpha_points, check_alphas

    check_alphas(cfg.studies.alphas)
    alphas = shard.take(list(cfg.studies.alphas))
    where, theta0 = placement(cfg.model), thetas[0]
    with evaluation_sampler(cfg, where, thetas[-1]) as make_sampler:  # a vLLM engine starts only for a first item
        if not alphas:
            return []
        basis = MergeBasis.from_checkpoints(theta0, thetas[1:], mean_cache=RunLayout(run_dir).mean_cache())
        model, reference, theta_T = (load_placed(p, where) for p in (theta0, theta0, thetas[-1]))
        per_alpha = alpha_points(basis, model, load_tokenizer(theta0), dev_prompts(cfg, cfg.studies.prompts),
                                 _scorer(cfg), alphas, reference, theta_T, cfg.dpo.beta, study_params(cfg),
                                 batch_size=cfg.sampling.batch_size, make_sampler=make_sampler, show=shard.is_main)
    release(model, reference, theta_T, basis)
    return per_alpha


def alpha_finish(cfg: RunConfig, run_dir: Path, parts: list[list[dict[str, list[float]]]]) -> dict[str, Any]:
    from itermerge.studies.alpha import alpha_result

    alphas = list(cfg.studies.alphas)
    result = alpha_result(alphas, unshard(parts, len(alphas)), cfg.dpo.beta, len(dev_prompts(cfg, cfg.studies.prompts)),
                          cfg.studies.n, RunLayout(run_dir).study("alpha"))
    return {"correlations": _correlations(result)}


# --- Fig. 6: the accuracy matrix --------------------------------------------------------------------------------


def accuracy_sets_work(cfg: RunConfig, thetas: list[Path], shard: Shard) -> dict[str, list[PreferencePair]]:
    """This process's preference sets: sampled from its policies π_θt on dev prompts, best vs worst as in training."""
    from itermerge.studies.accuracy_matrix import build_test_sets

    policies = dict(shard.take([(f"theta{t}", p) for t, p in enumerate(thetas) if t > 0]))
    where = placement(cfg.model)
    with evaluation_sampler(cfg, where, thetas[-1]) as make_sampler:  # a vLLM engine starts only for a first item
        if not policies:
            return {}
        return build_test_sets(policies, load_tokenizer(thetas[0]), dev_prompts(cfg, cfg.studies.prompts),
                               _scorer(cfg), study_params(cfg, "train"), batch_size=cfg.sampling.batch_size,
                               where=where, make_sampler=make_sampler)


def accuracy_sets_finish(run_dir: Path, parts: list[dict[str, list[PreferencePair]]]) -> dict[str, Any]:
    sets = {name: pairs for part in parts for name, pairs in part.items()}
    for name, pairs in sets.items():
        write_jsonl(RunLayout(run_dir).study("accuracy") / "sets" / f"{name}.jsonl", pairs)
    return {"pairs": {name: len(pairs) for name, pairs in sorted(sets.items())}}


def _sets(run_dir: Path, thetas: list[Path]) -> dict[str, list[PreferencePair]]:
    folder = RunLayout(run_dir).study("accuracy") / "sets"
    return {f"theta{t}": read_jsonl(folder / f"theta{t}.jsonl", PreferencePair) for t in range(1, len(thetas))}


def accuracy_work(cfg: RunConfig, run_dir: Path, thetas: list[Path], merged: Path, shard: Shard) -> dict[str, Any]:
    """This process's columns of the matrix (θ0's log-probs among them): log π of every set's pairs."""
    from itermerge.studies.accuracy_matrix import REFERENCE, check_sets, column_logprobs
    from itermerge.tokenization import pad_id, stop_token_ids

    sets = _sets(run_dir, thetas)
    columns = {REFERENCE: thetas[0], **{f"theta{t}": p for t, p in enumerate(thetas) if t > 0}, "merged": merged}
    check_sets(sets, columns, cfg.dpo.beta)
    mine = dict(shard.take(list(columns.items())))
    return column_logprobs(sets, mine, pad_id(load_tokenizer(thetas[0])), stop_token_ids(thetas[0], required=False),
                           batch_size=cfg.sampling.batch_size, where=placement(cfg.model))


def accuracy_finish(cfg: RunConfig, run_dir: Path, thetas: list[Path], parts: list[dict[str, Any]]) -> dict[str, Any]:
    from itermerge.studies.accuracy_matrix import accuracy_result

    logps = {column: value for part in parts for column, value in part.items()}
    columns = [f"theta{t}" for t in range(1, len(thetas))] + ["merged"]
    result = accuracy_result(_sets(run_dir, thetas), logps, columns, cfg.dpo.beta, RunLayout(run_dir).study("accuracy"))
    return {"rows": len(result["rows"]), "columns": len(columns), "merged_column": [r[-1] for r in result["accuracy"]]}


# --- merge vs the exact ensemble of eq. (6) ---------------------------------------------------------------------


def measured_point(cfg: RunConfig, lam: float, alpha: float) -> tuple[float, float, str]:
    """The (λ, α) the ensemble study measures, and why. Where the choice is θT (λ = 0, α = 0) or θ0 (α = −1)
    itself, its ensemble is one model and there is nothing to approximate: ``studies.ensemble_fallback`` then."""
    if lam == 0.0 and alpha in (0.0, -1.0):
        fallback = tuple(cfg.studies.ensemble_fallback)
        return (*fallback, f"the search chose {'θT' if alpha == 0.0 else 'θ0'} itself (an ensemble of one model), "
                           f"so studies.ensemble_fallback (λ, α) = {fallback} is measured instead")
    return lam, alpha, "the chosen merge"


def _ensemble_setup(cfg: RunConfig, thetas: list[Path], lam: float, alpha: float) -> dict[str, Any]:
    lam_m, alpha_m, _ = measured_point(cfg, lam, alpha)
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=min(cfg.sampling.max_new_tokens, 48),
                            seed=stage_seed(cfg.seed, "studies/ensemble"))
    return {"lam": lam_m if len(thetas) > 2 else 0.0, "alpha": alpha_m, "params": params}


def ensemble_work(cfg: RunConfig, thetas: list[Path], lam: float, alpha: float, shard: Shard) -> dict[str, Any] | None:
    """This process's prompts of the merge-vs-ensemble study; the main process also measures the decoding cost."""
    from itermerge.studies.approximation import approximation_part

    prompts = shard.take(dev_prompts(cfg, max(2, cfg.studies.prompts // 4)))
    if not prompts:
        return None
    return approximation_part(thetas[0], thetas[1:], prompts, **_ensemble_setup(cfg, thetas, lam, alpha),
                              batch_size=cfg.sampling.batch_size, where=placement(cfg.model),
                              with_cost=shard.is_main, show=shard.is_main)


def ensemble_finish(cfg: RunConfig, run_dir: Path, thetas: list[Path], lam: float, alpha: float,
                    parts: list[dict[str, Any] | None]) -> dict[str, Any]:
    from itermerge.studies.approximation import approximation_write

    setup, why = _ensemble_setup(cfg, thetas, lam, alpha), measured_point(cfg, lam, alpha)[2]
    result = approximation_write(thetas[0], thetas[1:], len(dev_prompts(cfg, max(2, cfg.studies.prompts // 4))),
                                 RunLayout(run_dir).study("ensemble"), [p for p in parts if p is not None], note=why,
                                 **setup)
    kl = {name: c["kl_ensemble_to_model_per_token"] for name, c in result["error"]["candidates"].items()}
    return {"lam": result["lam"], "alpha": result["alpha"], "measured": why, "kl_ensemble_to_model_per_token": kl,
            "time_ratio": (result.get("cost") or {}).get("time_ratio"),
            "sampling": dataclasses.asdict(setup["params"])}


# --- Fig. 3-4: λ ------------------------------------------------------------------------------------------------


def lambda_work(cfg: RunConfig, thetas: list[Path], theta_b: Path, shard: Shard) -> list[dict[str, list[float]]]:
    """This process's λ points: θa = θ1 (the run's criterion), θb (one iteration under the second criterion)."""
    from itermerge.studies.lambdas import LAMBDAS, lambda_points

    where = placement(cfg.model)
    scorers = {"score": _scorer(cfg), "second": _scorer(cfg, cfg.studies.second_criterion)}
    with evaluation_sampler(cfg, where, thetas[-1]) as make_sampler:
        return lambda_points(thetas[0], thetas[1], theta_b, dev_prompts(cfg, cfg.studies.prompts),
                             shard.take(list(LAMBDAS)), beta=cfg.dpo.beta, params=study_params(cfg), scorers=scorers,
                             names=("criterion", "second"), batch_size=cfg.sampling.batch_size, where=where,
                             make_sampler=make_sampler, show=shard.is_main)


def lambda_finish(cfg: RunConfig, run_dir: Path, thetas: list[Path], theta_b: Path,
                  parts: list[list[dict[str, list[float]]]]) -> dict[str, Any]:
    from itermerge.studies.lambdas import LAMBDAS, lambda_result

    result = lambda_result(thetas[0], thetas[1], theta_b, LAMBDAS, unshard(parts, len(LAMBDAS)),
                           RunLayout(run_dir).study("lambda"), beta=cfg.dpo.beta, names=("criterion", "second"),
                           prompts=len(dev_prompts(cfg, cfg.studies.prompts)), samples_per_prompt=cfg.studies.n)
    return {"correlations": _correlations(result), "reward_correlation": result["reward_correlation"]["pearson_r"]}


def second_criterion(cfg: RunConfig) -> RunConfig:
    """The λ study's other run: one iteration from θ0, labelled by ``studies.second_criterion`` instead."""
    return replace(
        cfg, iterations=1, scorer=replace(cfg.scorer, type="verifier", function=cfg.studies.second_criterion)
    )
