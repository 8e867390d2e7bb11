"""Table 1 / Fig. 2 (§4.1.1): the magnitude of the induced reward, α scaled with λ = 0."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from itermerge import __version__
from itermerge.errors import ItermergeError
from itermerge.merging import MergeBasis
from itermerge.records import Prompt
from itermerge.rundir import STUDY_RESULTS
from itermerge.sampling import SamplingParams
from itermerge.studies.induced import (
    check_beta,
    check_same_vocabulary,
    default_eos,
    encode,
    progress,
    sample_and_reward,
    summarise,
    write_study,
)
from itermerge.studies.plots import plot_curves


def alpha_study(
    basis: MergeBasis,
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    scorer: Any,
    alphas: Sequence[float],
    reference_model: nn.Module,
    theta_T_model: nn.Module,
    beta: float,
    params: SamplingParams,
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 16,
    eos_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Table 1 / Fig. 2: for each α (λ = 0) merge into ``model`` in place, sample on ``prompts``, and report per α
    the merge's own induced reward r_θ(α), θT's r_θT of the same completions, and the scorer's reward (mean ±
    s.e.), with each mean's Pearson r and p-value against α. r_θ(α)/β is also the sampled estimate of
    KL(π_θ(α) ‖ π_θ0) at temperature 1. Writes ``alpha.json`` and ``alpha.png``; ``model`` ends at the last α.
    """
    check_alphas(alphas)
    per_alpha = alpha_points(basis, model, tokenizer, prompts, scorer, alphas, reference_model, theta_T_model, beta,
                             params, batch_size=batch_size, eos_ids=eos_ids)
    return alpha_result(alphas, per_alpha, beta, len(prompts), params.n, out_dir)


def check_alphas(alphas: Sequence[float]) -> None:
    if len(alphas) < 3:
        raise ItermergeError(f"alphas={list(alphas)}: a Pearson correlation against α needs at least 3 values")


def alpha_points(
    basis: MergeBasis, model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], scorer: Any,
    alphas: Sequence[float], reference_model: nn.Module, theta_T_model: nn.Module, beta: float,
    params: SamplingParams, *, batch_size: int = 16, eos_ids: Sequence[int] | None = None,
    make_sampler: Any = None, show: bool = True,
) -> list[dict[str, list[float]]]:
    """The α study at the given α (any subset of the grid: processes share the grid out), one dict per α of the
    series sampled there (``sample_and_reward``)."""
    from itermerge.tokenization import pad_id as pad_of

    check_beta(beta)
    if not prompts:
        raise ItermergeError("alpha study: no prompts; give the dev prompts to sample from")
    check_same_vocabulary(model, reference_model)
    check_same_vocabulary(theta_T_model, reference_model)
    eos = default_eos(reference_model) if eos_ids is None else tuple(eos_ids)
    prompt_ids = [encode(tokenizer, p) for p in prompts]
    per_alpha = []
    for alpha in progress(alphas, "α study", show):
        basis.apply_to(model, 0.0, alpha)
        per_alpha.append(sample_and_reward(
            model, tokenizer, prompts, prompt_ids, params, batch_size, reference_model,
            {"r_merged": model, "r_theta_T": theta_T_model}, beta, eos, pad_of(tokenizer), {"score": scorer},
            make_sampler=make_sampler))
    return per_alpha


def alpha_result(alphas: Sequence[float], per_alpha: list[dict[str, list[float]]], beta: float, prompts: int,
                 samples_per_prompt: int, out_dir: str | os.PathLike) -> dict[str, Any]:
    """The α study's summary over the whole grid: written as ``alpha.json`` and ``alpha.png``."""
    result = {"itermerge_version": __version__, "what": "Table 1 / Fig. 2: scaling α with λ = 0", "beta": beta,
              "prompts": prompts, "samples_per_prompt": samples_per_prompt,
              **summarise("alpha", alphas, per_alpha)}
    write_study(result, Path(out_dir) / STUDY_RESULTS["alpha"], plot_curves)
    return result
