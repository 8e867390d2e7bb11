"""Fig. 3-4 (§4.1.2): the direction of the induced reward, θ(λ) = λ θa + (1 − λ) θb for two criteria, α = 0."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from itermerge import __version__
from itermerge.devices import CPU, Placement, load_placed, release
from itermerge.errors import ItermergeError
from itermerge.maths.statistics import pearson
from itermerge.merging import MergeBasis
from itermerge.records import Prompt
from itermerge.rundir import STUDY_RESULTS
from itermerge.sampling import SamplingParams
from itermerge.studies.induced import (
    check_beta,
    check_same_tokenizer,
    default_eos,
    encode,
    progress,
    sample_and_reward,
    summarise,
    write_study,
)
from itermerge.studies.plots import plot_curves

LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def lambda_study(
    theta0: str | os.PathLike, theta_a: str | os.PathLike, theta_b: str | os.PathLike, prompts: Sequence[Prompt],
    out_dir: str | os.PathLike, *, beta: float, params: SamplingParams,
    lambdas: Sequence[float] = LAMBDAS, scorers: dict[str, Any] | None = None,
    names: tuple[str, str] = ("a", "b"), batch_size: int = 16, where: Placement = CPU,
    eos_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Fig. 3-4: θa and θb trained from θ0 under two criteria, merged as θ(λ) = λ θa + (1 − λ) θb (α = 0).

    That is eq. (10) with T = 2, checkpoints (θ1, θ2) = (θa, θb): k = (λ, 1 − λ), so λ = 1 is θa and
    λ = 0 is θb (the paper's "λ = 0 helpful, λ = 1 harmless" with θa harmless, θb helpful). Per λ:
    completions sampled from θ(λ), both induced rewards r_θa and r_θb (and ``scorers``) of them, mean ±
    s.e., each against λ, and the Pearson correlation of the two rewards across λ (Fig. 4).
    Writes ``lambda.json`` and ``lambda.png``.
    """
    check_lambdas(lambdas)
    per_lambda = lambda_points(theta0, theta_a, theta_b, prompts, lambdas, beta=beta, params=params, scorers=scorers,
                               names=names, batch_size=batch_size, where=where, eos_ids=eos_ids)
    return lambda_result(theta0, theta_a, theta_b, lambdas, per_lambda, out_dir, beta=beta, names=names,
                         prompts=len(prompts), samples_per_prompt=params.n)


def check_lambdas(lambdas: Sequence[float]) -> None:
    if len(lambdas) < 3:
        raise ItermergeError(f"lambdas={list(lambdas)}: a correlation across λ needs at least 3 values")


def lambda_points(
    theta0: str | os.PathLike, theta_a: str | os.PathLike, theta_b: str | os.PathLike, prompts: Sequence[Prompt],
    lambdas: Sequence[float], *, beta: float, params: SamplingParams, scorers: dict[str, Any] | None = None,
    names: tuple[str, str] = ("a", "b"), batch_size: int = 16, where: Placement = CPU,
    eos_ids: Sequence[int] | None = None, make_sampler: Any = None, show: bool = True,
) -> list[dict[str, list[float]]]:
    """The λ study at the given λ (any subset: processes share the grid out), one dict of series per λ."""
    import copy

    from itermerge.checkpoint import load_tokenizer
    from itermerge.tokenization import pad_id as pad_of

    check_beta(beta)
    if not prompts:
        raise ItermergeError("lambda study: no prompts; give the dev prompts to sample from")
    check_same_tokenizer({"theta0": theta0, names[0]: theta_a, names[1]: theta_b})
    if not lambdas:
        return []
    tokenizer = load_tokenizer(theta_b)
    reference, policy_a, policy_b = (load_placed(p, where) for p in (theta0, theta_a, theta_b))
    basis = MergeBasis.from_checkpoints(theta0, [theta_a, theta_b])  # T = 2: θ̄ = θa, θT = θb
    model = copy.deepcopy(policy_b)
    eos = default_eos(reference) if eos_ids is None else tuple(eos_ids)
    prompt_ids = [encode(tokenizer, p) for p in prompts]
    rewards = {f"r_{names[0]}": policy_a, f"r_{names[1]}": policy_b}
    per_lambda = []
    for lam in progress(lambdas, "λ study", show):
        basis.apply_to(model, lam, 0.0)
        per_lambda.append(sample_and_reward(model, tokenizer, prompts, prompt_ids, params, batch_size, reference,
                                             rewards, beta, eos, pad_of(tokenizer), scorers or {},
                                             make_sampler=make_sampler))
    release(model, reference, policy_a, policy_b, basis)
    return per_lambda


def lambda_result(
    theta0: str | os.PathLike, theta_a: str | os.PathLike, theta_b: str | os.PathLike, lambdas: Sequence[float],
    per_lambda: list[dict[str, list[float]]], out_dir: str | os.PathLike, *, beta: float, names: tuple[str, str],
    prompts: int, samples_per_prompt: int,
) -> dict[str, Any]:
    """The λ study's summary over the whole grid, with the two rewards' correlation (Fig. 4): lambda.json and .png."""
    summary = summarise("lambda", lambdas, per_lambda)
    rewards = [f"r_{names[0]}", f"r_{names[1]}"]
    r, p = pearson(*(summary["series"][k]["mean"] for k in rewards))
    result = {"itermerge_version": __version__, "what": "Fig. 3-4: θ(λ) = λ θa + (1 − λ) θb, α = 0", "beta": beta,
              "theta0": str(theta0), "theta_a": str(theta_a), "theta_b": str(theta_b), "names": list(names),
              "prompts": prompts, "samples_per_prompt": samples_per_prompt, **summary,
              "reward_correlation": {"between": rewards, "pearson_r": r, "p_value": p}}
    write_study(result, Path(out_dir) / STUDY_RESULTS["lambda"], plot_curves)
    return result
