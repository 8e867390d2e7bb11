"""The studies as stages of a run: what each reads from the run directory, writes under studies/, and records."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from itermerge.checkpoint import load_model, load_tokenizer
from itermerge.config import RunConfig
from itermerge.labeling import make_scorer
from itermerge.records import Prompt
from itermerge.sampling import SamplingParams
from itermerge.seeds import stage_seed


def dev_prompts(cfg: RunConfig, n: int) -> list[Prompt]:
    """``n`` dev prompts of the run for the studies (never the test split): a built-in task's in an order of their
    own, else the first ``n`` of the evaluation's dev prompts (the held-out split itself is never redrawn)."""
    from itermerge.prompts import split_prompts

    source = cfg.evaluation.prompts
    if source.task is not None and "dev" not in source.files:
        return split_prompts(replace(source, n=n, seed=stage_seed(cfg.seed, "studies/prompts")), "dev")
    return split_prompts(source, "dev")[:n]


def study_params(cfg: RunConfig) -> SamplingParams:
    """The studies sample as training does (the induced rewards of the policy's own samples), shorter."""
    return replace(cfg.sampling.params(seed=stage_seed(cfg.seed, "studies/sampling")), n=cfg.studies.n)


def _correlations(result: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records of an α or λ study: each series' Pearson r (and p) against the grid."""
    return {name: {"pearson_r": s["pearson_r"], "p_value": s["p_value"]} for name, s in result["series"].items()}


def alpha_study(cfg: RunConfig, run_dir: Path, thetas: list[Path]) -> dict[str, Any]:
    """Table 1 / Fig. 2: λ = 0, α on a grid; induced rewards of the merge's samples against α."""
    from itermerge.merging import MergeBasis
    from itermerge.studies.alpha import alpha_study as study

    theta0, checkpoints = thetas[0], thetas[1:]
    basis = MergeBasis.from_checkpoints(theta0, checkpoints, mean_cache=run_dir / "cache" / "mean_intermediate")
    result = study(
        basis, load_model(theta0), load_tokenizer(theta0), dev_prompts(cfg, cfg.studies.prompts),
        make_scorer(cfg.scorer.spec()), list(cfg.studies.alphas), load_model(theta0), load_model(checkpoints[-1]),
        cfg.dpo.beta, study_params(cfg), run_dir / "studies" / "alpha", batch_size=cfg.sampling.batch_size,
    )
    return {"correlations": _correlations(result)}


def accuracy_matrix(cfg: RunConfig, run_dir: Path, thetas: list[Path], merged: Path) -> dict[str, Any]:
    """Fig. 6: preference sets sampled from π_θ1..π_θT (scored as in training) × reward models θ1..θT, merged."""
    from itermerge.studies.accuracy_matrix import accuracy_matrix as matrix
    from itermerge.studies.accuracy_matrix import build_test_sets
    from itermerge.tokenization import pad_id

    tokenizer = load_tokenizer(thetas[0])
    policies = {f"θ{t}": p for t, p in enumerate(thetas) if t > 0}
    sets = build_test_sets(policies, tokenizer, dev_prompts(cfg, cfg.studies.prompts), make_scorer(cfg.scorer.spec()),
                           study_params(cfg), batch_size=cfg.sampling.batch_size)
    result = matrix(sets, {**policies, "merged": merged}, thetas[0], cfg.dpo.beta, pad_id(tokenizer),
                    out_dir=run_dir / "studies" / "accuracy")
    return {"rows": len(sets), "columns": len(policies) + 1,
            "merged_column": [row[-1] for row in result["accuracy"]]}


def ensemble_study(cfg: RunConfig, run_dir: Path, thetas: list[Path], lam: float, alpha: float) -> dict[str, Any]:
    """How far the chosen merge is from the exact eq. (6) ensemble it approximates, and what the ensemble costs.

    Where the choice is θT (λ = 0, α = 0) or θ0 (α = −1) itself, its ensemble is one model and there is nothing
    to approximate: the study then measures ``studies.ensemble_fallback`` and records that it did.
    """
    from itermerge.studies.approximation import approximation_study

    measured, why = (lam, alpha), "the chosen merge"
    if lam == 0.0 and alpha in (0.0, -1.0):
        measured = tuple(cfg.studies.ensemble_fallback)
        why = (f"the search chose {'θT' if alpha == 0.0 else 'θ0'} itself (an ensemble of one model), so "
               f"studies.ensemble_fallback (λ, α) = {measured} is measured instead")
    lam_m, alpha_m = measured
    result = approximation_study(
        thetas[0], thetas[1:], dev_prompts(cfg, max(2, cfg.studies.prompts // 4)), run_dir / "studies" / "ensemble",
        lam=lam_m if len(thetas) > 2 else 0.0, alpha=alpha_m,
        params=SamplingParams(n=1, temperature=1.0, max_new_tokens=min(cfg.sampling.max_new_tokens, 48),
                              seed=stage_seed(cfg.seed, "studies/ensemble")),
        batch_size=cfg.sampling.batch_size, note=why,
    )
    return {"lam": result["lam"], "alpha": result["alpha"], "measured": why}


def lambda_study(cfg: RunConfig, run_dir: Path, thetas: list[Path], theta_b: Path) -> dict[str, Any]:
    """Fig. 3-4: θa = θ1 (the run's criterion) and θb (one iteration from θ0 under the second criterion)."""
    from itermerge.studies.lambdas import lambda_study as study

    scorers = {"score": make_scorer(cfg.scorer.spec()), "second": make_scorer(second_criterion(cfg).scorer.spec())}
    result = study(thetas[0], thetas[1], theta_b, dev_prompts(cfg, cfg.studies.prompts), run_dir / "studies" / "lambda",
                   beta=cfg.dpo.beta, params=study_params(cfg), scorers=scorers,
                   names=("criterion", "second"), batch_size=cfg.sampling.batch_size)
    return {"correlations": _correlations(result), "reward_correlation": result["reward_correlation"]["pearson_r"]}


def second_criterion(cfg: RunConfig) -> RunConfig:
    """The λ study's other run: one iteration from θ0, labelled by ``studies.second_criterion`` instead."""
    return replace(
        cfg, iterations=1, scorer=replace(cfg.scorer, type="verifier", function=cfg.studies.second_criterion)
    )
