"""Paired differences over seeds that share their test prompts: a crossed (two-way) bootstrap, seeds × prompts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from itermerge.errors import ItermergeError
from itermerge.maths.paired import _CHUNK, _check, _paired_items, _percentile, mean_and_ci, pooled_paired_difference


def seed_prompt_differences(groups: Sequence[tuple[Sequence[float], Sequence[float]]], where: str) -> np.ndarray:
    """The (S, n) table D[s, i] = a_s[i] − b_s[i] of S seeds scored on the same n prompts in the same order."""
    if isinstance(groups, (str, bytes)) or not hasattr(groups, "__len__") or len(groups) == 0:
        raise ItermergeError(f"{where}: groups={groups!r}; give a non-empty list of (a, b) pairs, one per seed")
    rows = []
    for i, pair in enumerate(groups):
        if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
            raise ItermergeError(f"{where}: groups[{i}] is not an (a, b) pair; give each seed as (a_scores, b_scores)")
        a, b = _paired_items(pair[0], pair[1], f"{where}: groups[{i}]")
        if rows and a.size != rows[0].size:
            raise ItermergeError(f"{where}: groups[{i}] has {a.size} prompts and groups[0] has {rows[0].size}; the "
                                 "crossed design needs every seed scored on the same prompts (else use "
                                 "pooled_paired_difference, which resamples each seed's prompts on their own)")
        rows.append(a - b)
    return np.stack(rows)  # (S, n)


def crossed_bootstrap_means(d: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Grand means of `resamples` two-way resamples of the (S, n) table d -> (resamples,).

    Replicate r draws S seeds and n prompts with replacement, once each, and takes the mean of the S × n cells they
    cross: with w_r (S,) and v_r (n,) the draw counts, Δ*_r = w_r · d · v_r / (S n). The same prompt draw applies
    to every seed, as in the study every seed was scored on the same prompts."""
    S, n = d.shape
    rows = max(1, _CHUNK // max(S, n))
    out = np.empty(resamples)
    for start in range(0, resamples, rows):
        stop = min(start + rows, resamples)
        w = rng.multinomial(S, np.full(S, 1 / S), size=stop - start)  # (r, S)
        v = rng.multinomial(n, np.full(n, 1 / n), size=stop - start)  # (r, n)
        out[start:stop] = np.einsum("rs,rn,sn->r", w, v, d, optimize=True) / (S * n)
    return out


def crossed_paired_difference(groups: Sequence[tuple[Sequence[float], Sequence[float]]], *,
                              confidence: float = 0.95, resamples: int = 10000, seed: int = 0) -> dict[str, Any]:
    """The paired difference pooled over S training seeds that were all scored on the same n test prompts.

    groups: S pairs (a_s, b_s), each (n,) per-prompt scores in one shared prompt order. Estimand as
    `pooled_paired_difference`: Δ = (1/S) Σ_s mean_i (a_s[i] − b_s[i]).

    Population: the interval speaks about the mean difference over NEW training seeds and NEW prompts drawn as these
    were (the dev set that chose each seed's (λ, α), and the rest of the recipe, held fixed). A seed's difference on
    prompt i is d_si = Δ + u_s + p_i + e_si: u the seed's luck, p_i what prompt i does to both models in every
    seed, e the rest. Var(Δ̂) = σ_u²/S + σ_p²/n + σ_e²/(S n), and the shared p_i do not average out over seeds.

    Three intervals, each in the result:
      ci_low/ci_high, p_value: the crossed bootstrap (`crossed_bootstrap_means`): seeds and prompts resampled
          jointly, one prompt draw per replicate applied to every seed (Owen 2007, "the pigeonhole bootstrap"); its
          variance carries σ_u²/S and σ_p²/n and overstates σ_e²/(S n) about threefold, so it errs wide on item noise,
          while with few seeds its seed part errs narrow ((S − 1)/S, and a percentile has no t quantile).
      nested: the hierarchical bootstrap of `pooled_paired_difference` (prompts resampled within each seed
          independently): it sees σ_p²/(S n), not σ_p²/n, and under-covers when prompts vary more than seeds.
      across_seeds: the t interval over the S per-seed differences (S − 1 df) and its one-sample t-test p-value:
          conditional on these n prompts (it sees σ_u² and σ_e²/n, not σ_p²).
    `results.verdict` reads ci_low/ci_high and across_seeds and asks both to agree.
    """
    where = "crossed_paired_difference"
    _check(confidence, resamples, where)
    d = seed_prompt_differences(groups, where)  # (S, n)
    S, n = d.shape
    per_seed = [float(x) for x in d.mean(axis=1)]
    across = mean_and_ci(per_seed, confidence)
    if S >= 2 and across["stderr"]:
        across["p_value"] = float(stats.ttest_1samp(per_seed, 0.0).pvalue)
    else:
        across["p_value"] = None if S < 2 else float(across["mean"] == 0)
    nested = pooled_paired_difference(groups, confidence=confidence, resamples=resamples, seed=seed)
    out: dict[str, Any] = {"difference": float(d.mean()), "ci_low": None, "ci_high": None, "p_value": None,
                           "per_seed": per_seed, "n_per_seed": [n] * S, "seeds": S, "across_seeds": across,
                           "nested": {k: nested[k] for k in ("ci_low", "ci_high", "p_value")},
                           "method": "crossed bootstrap", "confidence": confidence, "note": None}
    if S * n < 2:
        out["note"] = "one seed with one prompt gives no spread: the interval and p-value need more prompts or seeds"
        return out
    boot = crossed_bootstrap_means(d, resamples, np.random.default_rng(seed))
    out["ci_low"], out["ci_high"], out["p_value"] = _percentile(boot, confidence)
    if S == 1:
        out["note"] = "one seed: the interval covers prompt sampling only, not seed-to-seed spread"
    return out
