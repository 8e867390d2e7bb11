"""Paired differences over seeds that share their test prompts: a crossed (two-way) bootstrap, seeds × prompts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import integrate, optimize, stats

from itermerge.errors import ItermergeError
from itermerge.maths.paired import (
    _CHUNK,
    _check,
    _percentile,
    mean_and_ci,
    pooled_paired_difference,
    seed_differences,
)


def seed_prompt_differences(groups: Sequence[tuple[Sequence[float], Sequence[float]]], where: str) -> np.ndarray:
    """The (S, n) table D[s, i] = a_s[i] − b_s[i] of S seeds scored on the same n prompts in the same order."""
    rows = seed_differences(groups, where)
    for i, d in enumerate(rows):
        if d.size != rows[0].size:
            raise ItermergeError(f"{where}: groups[{i}] has {d.size} prompts and groups[0] has {rows[0].size}; the "
                                 "crossed design needs every seed scored on the same prompts (else use "
                                 "pooled_paired_difference, which resamples each seed's prompts on their own)")
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
                           "stderr": None,
                           "per_seed": per_seed, "n_per_seed": [n] * S, "seeds": S, "across_seeds": across,
                           "nested": {k: nested[k] for k in ("ci_low", "ci_high", "p_value")},
                           "method": "crossed bootstrap", "confidence": confidence, "note": None}
    if S * n < 2:
        out["note"] = "one seed with one prompt gives no spread: the interval and p-value need more prompts or seeds"
        return out
    boot = crossed_bootstrap_means(d, resamples, np.random.default_rng(seed))
    out["ci_low"], out["ci_high"], out["p_value"] = _percentile(boot, confidence)
    out["stderr"] = float(boot.std(ddof=1))  # the crossed bootstrap's standard error of Δ̂, for the power
    if S == 1:
        out["note"] = "one seed: the interval covers prompt sampling only, not seed-to-seed spread"
    return out


def pooled_minimum_detectable_effect(seed_sd: float, seeds: int, *, crossed_stderr: float | None = None,
                                     alpha: float = 0.05, power: float = 0.8) -> dict[str, float | None]:
    """Smallest pooled difference δ that `results.verdict` calls held with the given power, from the observed spread.

    The rule needs two intervals to exclude 0 (level α each):
      t over seeds: the one-sample t test of S per-seed differences with sd `seed_sd` (their observed spread, which
          carries the seed-to-seed term and the prompt noise within a seed): δ_t solves
          P(|T| > t_{S−1, 1−α/2}) = power, T ~ noncentral t(S − 1, δ √S / seed_sd)   (`_t_test_power`);
          the normal rule of thumb (t_{S−1,1−α/2} + t_{S−1,power}) · seed_sd / √S is close but not exact.
      crossed bootstrap: δ_c = (z_{1−α/2} + z_power) · crossed_stderr (its standard error, seeds and prompts).
    Returns t_over_seeds, crossed (None without a stderr) and rule = max of the two: needing both costs power, so
    at δ = rule the weaker interval has the asked-for power and the pair a little less (the two read the same
    data, so little less) — a slight under-statement of the rule's true MDE.
    Example: S = 5, seed_sd = 0.02: δ_t = 0.0336 (thumb rule (2.7764 + 0.9410) · 0.02/√5 = 0.0332); with a crossed
    stderr of 0.015, δ_c = 2.8016 · 0.015 = 0.0420, so the rule's MDE is 0.0420, 4.2 accuracy points.
    """
    where = "pooled_minimum_detectable_effect"
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 2:
        raise ItermergeError(f"{where}: seeds={seeds!r}; the t interval over seeds needs at least 2 seeds")
    for name, value in (("seed_sd", seed_sd), ("crossed_stderr", crossed_stderr)):
        if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
            raise ItermergeError(f"{where}: {name}={value!r}; give a positive, finite standard deviation")
    for name, value in (("alpha", alpha), ("power", power)):
        if not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ItermergeError(f"{where}: {name}={value!r}; give a number strictly between 0 and 1")
    df, scale = seeds - 1, seed_sd / math.sqrt(seeds)
    crit = float(stats.t.ppf(1 - alpha / 2, df))

    def shortfall(delta: float) -> float:  # power of the two-sided t test at δ, minus the power asked for
        return _t_test_power(delta / scale, df, crit) - power

    high = scale
    while shortfall(high) < 0:
        high *= 2
    delta_t = float(optimize.brentq(shortfall, 0.0, high, xtol=1e-12 * high))
    delta_c = None if crossed_stderr is None else float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) \
        * crossed_stderr
    return {"t_over_seeds": delta_t, "crossed": delta_c, "rule": max(delta_t, delta_c or 0.0)}


def _t_test_power(nc: float, df: int, crit: float) -> float:
    """P(|T| > crit) for T ~ noncentral t(df, nc), from scipy.stats.nct; where that returns NaN (1 degree of freedom,
    a large nc) from its definition T = (Z + nc) / √(V/df), V ~ χ²_df:
    E_V[Φ(nc − crit √(V/df)) + Φ(−nc − crit √(V/df))], integrated over V's quantile u ∈ (0, 1)."""
    direct = float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))
    if math.isfinite(direct):
        return direct

    def tails(u: float) -> float:
        s = math.sqrt(stats.chi2.ppf(u, df) / df)
        return float(stats.norm.cdf(nc - crit * s) + stats.norm.cdf(-nc - crit * s))

    return float(integrate.quad(tails, 0.0, 1.0, epsabs=1e-10)[0])
