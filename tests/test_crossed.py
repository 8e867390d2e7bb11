"""The crossed bootstrap over seeds × shared prompts: its variance by hand, its coverage where the nested fails."""

import numpy as np
import pytest
from scipy import stats

from itermerge.errors import ItermergeError
from itermerge.maths.crossed import (
    crossed_bootstrap_means,
    crossed_paired_difference,
    pooled_minimum_detectable_effect,
)
from itermerge.maths.paired import pooled_paired_difference

# 3 seeds × 4 prompts: seed effects (0, 1, 2), prompt effects (0, 2, 0, 2), plus an interaction R whose rows and
# columns each sum to 0: R = [[1, −1, 0, 0], [−1, 1, 0, 0], [0, 0, 0, 0]].
TABLE = np.array([[1.0, 1.0, 0.0, 2.0],
                  [0.0, 4.0, 1.0, 3.0],
                  [2.0, 4.0, 2.0, 4.0]])


def test_crossed_bootstrap_variance_by_hand():
    """With w ~ Mult(S, 1/S) and v ~ Mult(n, 1/n) the draw counts, Δ* − d̄ = (ω·d̄_s. n + ν·d̄_.i S + ωᵀ R ν)/(S n)
    for ω = w − 1, ν = v − 1 (Cov ω = I − J/S), three uncorrelated terms:
        Var* = Σ_s (d̄_s. − d̄)²/S² + Σ_i (d̄_.i − d̄)²/n² + ‖R‖²/(S n)².
    TABLE: seed means (1, 2, 3), d̄ = 2: 2/9; prompt means (1, 3, 1, 3): 4/16; ‖R‖² = 4: 4/144. Var* = 18/36 = 0.5.
    The nested bootstrap, resampling each seed's prompts apart, would give the prompt term a third of its size.
    200,000 replicates: the variance's Monte-Carlo error is about √(2/B) ≈ 0.3% of it."""
    boot = crossed_bootstrap_means(TABLE, 200_000, np.random.default_rng(0))
    assert boot.mean() == pytest.approx(2.0, abs=0.01)
    assert boot.var() == pytest.approx(0.5, rel=0.02)
    one_seed = crossed_bootstrap_means(TABLE[:1], 200_000, np.random.default_rng(1))  # prompts only: Σ(d − d̄)²/n²
    assert one_seed.var() == pytest.approx(2 / 16, rel=0.02)


def test_prompts_are_drawn_once_for_every_seed():
    """Two seeds that agree prompt by prompt, d = (0, 1) in both: the crossed replicate is the mean of one prompt draw,
    Δ* ∈ {0, 0.5, 1} with chances 1/4, 1/2, 1/4, variance 1/8; the nested one averages two independent draws,
    variance 1/16."""
    groups = [([0.0, 1.0], [0.0, 0.0]), ([0.0, 1.0], [0.0, 0.0])]
    boot = crossed_bootstrap_means(np.array([[0.0, 1.0], [0.0, 1.0]]), 100_000, np.random.default_rng(2))
    assert set(np.unique(boot)) == {0.0, 0.5, 1.0}
    assert boot.var() == pytest.approx(1 / 8, rel=0.02)
    crossed = crossed_paired_difference(groups, resamples=4000)
    assert (crossed["ci_low"], crossed["ci_high"]) == (0.0, 1.0)
    assert crossed["p_value"] == pytest.approx(0.5, abs=0.05)  # #{Δ* ≤ 0} ≈ B/4


def test_result_carries_the_nested_and_t_intervals_beside_it():
    """Per-seed differences (1, 1.5, 0.5) as in test_paired's hand example, on 3 shared prompts each:
    t = 1 / (0.5/√3) = 3.4641 on 2 df; the nested interval is `pooled_paired_difference`'s own."""
    groups = [([1, 2, 3], [0, 1, 2]), ([2, 2, 3], [1, 0, 1.5]), ([0, 1, 1], [0, 0, 0.5])]
    r = crossed_paired_difference(groups, resamples=2000)
    assert r["per_seed"] == pytest.approx([1.0, 1.5, 0.5]) and r["difference"] == pytest.approx(1.0)
    assert r["method"] == "crossed bootstrap" and r["seeds"] == 3 and r["n_per_seed"] == [3, 3, 3]
    assert r["across_seeds"]["p_value"] == pytest.approx(2 * stats.t.sf(3.4641016, 2))
    assert r["across_seeds"]["p_value"] == pytest.approx(stats.ttest_1samp([1.0, 1.5, 0.5], 0).pvalue)
    nested = pooled_paired_difference(groups, resamples=2000)
    assert r["nested"] == {k: nested[k] for k in ("ci_low", "ci_high", "p_value")}
    assert r == crossed_paired_difference(groups, resamples=2000)  # seeded
    assert r["ci_low"] <= 1.0 <= r["ci_high"]


def _simulate(rng: np.random.Generator, sims: int, seeds: int, prompts: int, sd_seed: float, sd_prompt: float,
              sd_noise: float, effect: float) -> np.ndarray:
    """(sims, S, n) differences d_si = δ + u_s + p_i + e_si: p_i shared by every seed of a study."""
    u = rng.normal(0, sd_seed, (sims, seeds, 1))
    p = rng.normal(0, sd_prompt, (sims, 1, prompts))
    return effect + u + p + rng.normal(0, sd_noise, (sims, seeds, prompts))


def test_crossed_intervals_cover_where_the_nested_under_covers():
    """200 studies of 5 seeds × 40 shared prompts, δ = 0.1, σ_seed = 0.05, σ_prompt = 0.5, σ_noise = 0.3.
    True Var(Δ̂) = σ_u²/S + σ_p²/n + σ_e²/(S n) = 0.0005 + 0.00625 + 0.00045 = 0.0072.
    Crossed bootstrap (expected Var*, see the by-hand test): (S−1)/S²·(σ_u² + σ_e²/n) + (n−1)/n²·(σ_p² + σ_e²/S)
    + (S−1)(n−1)σ_e²/(S n)² = 0.00076 + 0.00653 + 0.00035 = 0.0076: slightly wide, coverage ≈ 95-96%.
    Nested: 0.00076 + (σ_p² + σ_e²)/(n S) = 0.00076 + 0.0017 = 0.0025: sd ratio √(0.0025/0.0072) = 0.59, coverage
    ≈ P(|Z| < 1.96 · 0.59) ≈ 75%. The t interval over seeds sees only σ_u² + σ_e²/n: ≈ 60-70%.
    Binomial error of a coverage near 0.95 over 200 studies is ±0.015."""
    rng, effect = np.random.default_rng(11), 0.1
    data = _simulate(rng, 200, 5, 40, sd_seed=0.05, sd_prompt=0.5, sd_noise=0.3, effect=effect)
    covered = {"crossed": 0, "nested": 0, "t": 0}
    for k, d in enumerate(data):
        r = crossed_paired_difference([(row, np.zeros_like(row)) for row in d], resamples=1000, seed=k)
        for name, ci in (("crossed", r), ("nested", r["nested"]), ("t", r["across_seeds"])):
            covered[name] += ci["ci_low"] <= effect <= ci["ci_high"]
    rate = {name: count / len(data) for name, count in covered.items()}
    assert rate["crossed"] >= 0.90, rate
    assert rate["nested"] <= 0.85, rate
    assert rate["t"] <= 0.85, rate


def _covers(d: np.ndarray, effect: float, seed: int) -> bool:
    boot = crossed_bootstrap_means(d, 1000, np.random.default_rng(seed))
    low, high = np.quantile(boot, [0.025, 0.975])
    return bool(low <= effect <= high)


def test_crossed_intervals_cover_when_seeds_and_prompts_both_vary():
    """σ_seed = σ_prompt = 0.1, σ_noise = 0.3, 5 seeds × 40 prompts, 200 studies: the crossed interval still covers
    ≥ 90%: true Var 0.002 + 0.00025 + 0.00045 = 0.0027, expected Var* 0.00196 + 0.00068 + 0.00035 = 0.0030; the seed
    term, read from 5 seeds, is the noisy one."""
    rng, effect = np.random.default_rng(12), -0.05
    data = _simulate(rng, 200, 5, 40, sd_seed=0.1, sd_prompt=0.1, sd_noise=0.3, effect=effect)
    covered = sum(_covers(d, effect, k) for k, d in enumerate(data))
    assert covered / len(data) >= 0.90


def test_pooled_minimum_detectable_effect_by_hand():
    """S = 5 seeds whose differences spread with sd 0.02: the normal rule of thumb gives (t_{4,.975} + t_{4,.8}) ·
    0.02/√5 = (2.776445 + 0.940965) · 0.0089443 = 0.033250; the noncentral t solves a little higher, 0.033640.
    A crossed stderr of 0.015: δ_c = (1.959964 + 0.841621) · 0.015 = 0.042024, the larger, so the rule's MDE."""
    r = pooled_minimum_detectable_effect(0.02, 5, crossed_stderr=0.015)
    assert r["t_over_seeds"] == pytest.approx(0.033640, abs=1e-6)
    assert 0.033250 < r["t_over_seeds"] < 0.0345
    assert r["crossed"] == pytest.approx(0.042024, abs=1e-6)
    assert r["rule"] == r["crossed"]
    no_crossed = pooled_minimum_detectable_effect(0.02, 5)
    assert no_crossed["crossed"] is None and no_crossed["rule"] == no_crossed["t_over_seeds"]
    assert pooled_minimum_detectable_effect(0.02, 20)["t_over_seeds"] < r["t_over_seeds"]  # more seeds see less
    # 2 seeds, 1 df, where scipy's noncentral t returns NaN: from its definition, 11.5499 sd (the thumb rule's
    # (12.7062 + 1.3764)/√2 = 9.958 is far off with 1 df); 200,000 simulated pairs of seeds reject 79.9% of the time
    assert pooled_minimum_detectable_effect(1.0, 2)["t_over_seeds"] == pytest.approx(11.5499, abs=1e-3)


def test_pooled_minimum_detectable_effect_has_the_power_it_claims():
    """Simulated studies of 5 seeds at δ = δ_t: the t test over seeds rejects 80% of the time (±0.7% at 4000)."""
    rng = np.random.default_rng(13)
    delta = pooled_minimum_detectable_effect(0.02, 5)["t_over_seeds"]
    per_seed = rng.normal(delta, 0.02, size=(4000, 5))
    p = stats.ttest_1samp(per_seed, 0.0, axis=1).pvalue
    assert np.mean(p < 0.05) == pytest.approx(0.8, abs=0.025)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"seed_sd": 0.02, "seeds": 1}, "seeds=1"),
    ({"seed_sd": 0.0, "seeds": 5}, "seed_sd=0.0"),
    ({"seed_sd": 0.02, "seeds": 5, "crossed_stderr": -1.0}, "crossed_stderr=-1.0"),
    ({"seed_sd": 0.02, "seeds": 5, "power": 1.0}, "power=1.0"),
])
def test_pooled_minimum_detectable_effect_bad_inputs(kwargs, message):
    with pytest.raises(ItermergeError, match=message):
        pooled_minimum_detectable_effect(**kwargs)


@pytest.mark.parametrize(("groups", "message"), [
    ([], "non-empty list"),
    ([([1, 2], [1, 2]), ([1, 2, 3], [1, 2, 3])], r"groups\[1\] has 3 prompts and groups\[0\] has 2"),
    ([([1, 2], [1, 2], [3, 4])], r"groups\[0\] is not an \(a, b\) pair"),
    ([([1, float("nan")], [1, 2])], r"groups\[0\]: a\[1\] = nan"),
])
def test_crossed_bad_inputs_name_the_problem(groups, message):
    with pytest.raises(ItermergeError, match=message):
        crossed_paired_difference(groups)
