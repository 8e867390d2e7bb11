"""The evidence of §4.1 and §4.3 on a run directory: α study, λ study, accuracy matrix, merge vs ensemble."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from itermerge.checkpoint import load_model, load_tokenizer
from itermerge.config import RunConfig
from itermerge.errors import ItermergeError
from itermerge.labeling import make_scorer
from itermerge.records import Prompt
from itermerge.sampling import SamplingParams
from itermerge.tasks import get_task


def dev_prompts(cfg: RunConfig, n: int) -> list[Prompt]:
    """Dev prompts of the run's task for the studies (never the test split)."""
    source = cfg.evaluation.prompts
    if source.task is None:
        from itermerge.records import read_prompts_jsonl

        if "dev" not in source.files:
            raise ItermergeError("studies need dev prompts: set evaluation.prompts.task or evaluation.prompts.files.dev")
        return read_prompts_jsonl(source.files["dev"])[:n]
    return get_task(source.task, **source.task_options).prompts("dev", n, seed=cfg.seed + 17)


def study_params(cfg: RunConfig) -> SamplingParams:
    """The studies sample as training does (the induced rewards of the policy's own samples), shorter."""
    return replace(cfg.sampling.params(seed=cfg.seed + 23), n=cfg.studies.n)


def alpha_study(cfg: RunConfig, run_dir: Path, thetas: list[Path]) -> dict[str, Any]:
    """Table 1 / Fig. 2: λ = 0, α on a grid; induced rewards of the merge's samples against α."""
    from itermerge.merge import MergeBasis
    from itermerge.rewards import alpha_study as study

    theta0, checkpoints = thetas[0], thetas[1:]
    basis = MergeBasis.from_checkpoints(theta0, checkpoints, mean_cache=run_dir / "cache" / "mean_intermediate")
    result = study(
        basis, load_model(theta0), load_tokenizer(theta0), dev_prompts(cfg, cfg.studies.prompts),
        make_scorer(cfg.scorer.spec()), list(cfg.studies.alphas), load_model(theta0), load_model(checkpoints[-1]),
        cfg.dpo.beta, study_params(cfg), run_dir / "studies" / "alpha", batch_size=cfg.sampling.batch_size,
    )
    return {"pearson": {k: v for k, v in result.items() if "pearson" in k}}


def accuracy_matrix(cfg: RunConfig, run_dir: Path, thetas: list[Path], merged: Path) -> dict[str, Any]:
    """Fig. 6: preference sets sampled from π_θ1..π_θT (scored as in training) × reward models θ1..θT, merged."""
    from itermerge.rewards import accuracy_matrix as matrix
    from itermerge.rewards import build_test_sets
    from itermerge.tokenization import pad_id

    tokenizer = load_tokenizer(thetas[0])
    policies = {f"θ{t}": p for t, p in enumerate(thetas) if t > 0}
    sets = build_test_sets(policies, tokenizer, dev_prompts(cfg, cfg.studies.prompts), make_scorer(cfg.scorer.spec()),
                           study_params(cfg), batch_size=cfg.sampling.batch_size)
    matrix(sets, {**policies, "merged": merged}, thetas[0], cfg.dpo.beta, pad_id(tokenizer),
             out_dir=run_dir / "studies" / "accuracy")
    return {"rows": len(sets), "columns": len(policies) + 1}


def ensemble_study(cfg: RunConfig, run_dir: Path, thetas: list[Path], lam: float, alpha: float) -> dict[str, Any]:
    """★ How far the merge is from the exact eq. (6) ensemble it approximates, and what the ensemble costs."""
    from itermerge.approximation import approximation_study

    if lam == 0.0 and alpha in (0.0, -1.0):
        # The choice is θT or θ0 itself: the ensemble is one model. Measure the paper's Llama pick instead.
        lam, alpha = 0.3, 0.4
    result = approximation_study(
        thetas[0], thetas[1:], dev_prompts(cfg, max(2, cfg.studies.prompts // 4)), run_dir / "studies" / "ensemble",
        lam=lam if len(thetas) > 2 else 0.0, alpha=alpha,
        params=SamplingParams(n=1, temperature=1.0, max_new_tokens=min(cfg.sampling.max_new_tokens, 48), seed=cfg.seed),
        batch_size=cfg.sampling.batch_size,
    )
    return {"lam": result["lam"], "alpha": result["alpha"]}


def lambda_study(cfg: RunConfig, run_dir: Path, thetas: list[Path]) -> dict[str, Any]:
    """Fig. 3-4: θa = θ1 (the run's criterion), θb = one iteration from θ0 under the second criterion."""
    from itermerge.pipeline import iterate
    from itermerge.rewards import lambda_study as study

    second = replace(cfg, iterations=1, scorer=replace(cfg.scorer, type="verifier", function=cfg.studies.second_criterion))
    theta_b = iterate(second, run_dir / "studies" / "lambda" / "second_criterion")[1]
    scorers = {"score": make_scorer(cfg.scorer.spec()), "second": make_scorer(second.scorer.spec())}
    result = study(thetas[0], thetas[1], theta_b, dev_prompts(cfg, cfg.studies.prompts), run_dir / "studies" / "lambda",
                   beta=cfg.dpo.beta, params=study_params(cfg), scorers=scorers,
                   names=("criterion", "second"), batch_size=cfg.sampling.batch_size)
    return {"pearson": {k: v for k, v in result.items() if "pearson" in k}}
