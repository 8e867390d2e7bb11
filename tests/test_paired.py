"""Paired differences, pooled over seeds, and the power to see them: hand-derived numbers and scipy cross-checks."""

import math

import numpy as np
import pytest
from scipy import stats

from itermerge.errors import ItermergeError
from itermerge.maths.paired import (
    holm_adjust,
    mean_and_ci,
    minimum_detectable_effect,
    newcombe_phi,
    paired_difference,
    pooled_paired_difference,
)

T_3 = 3.1824463  # t_{3, 0.975}
T_2 = 4.3026527  # t_{2, 0.975}
Z = 1.9599640  # z_{0.975}
Z_POWER = 0.8416212  # z_{0.8}

# 0/1 example: n = 20 items, n11 = 6 both right, n10 = 8 a only, n01 = 2 b only, n00 = 4 both wrong.
BINARY_A = [1] * 6 + [1] * 8 + [0] * 2 + [0] * 4
BINARY_B = [1] * 6 + [0] * 8 + [1] * 2 + [0] * 4


def test_t_method_by_hand_and_against_scipy():
    """d = a − b = [2, 3, 1, 2]: mean 2, deviations [0, 1, −1, 0], var = 2/3, sd = 0.816497,
    stderr = 0.816497 / √4 = 0.408248, half = t_{3,.975} · stderr = 3.182446 · 0.408248 = 1.299228,
    interval [0.700772, 3.299228]; t = 2 / 0.408248 = 4.898979 on 3 df."""
    a, b = [3, 5, 4, 6], [1, 2, 3, 4]
    r = paired_difference(a, b, method="t")
    assert (r["mean_a"], r["mean_b"], r["difference"], r["n"], r["method"]) == (4.5, 2.5, 2.0, 4, "t")
    assert r["stderr"] == pytest.approx(math.sqrt(2 / 3) / 2)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((2 - T_3 * 0.4082483, 2 + T_3 * 0.4082483))
    assert r["ci_low"] == pytest.approx(0.700772, abs=1e-6)
    assert r["p_value"] == pytest.approx(2 * stats.t.sf(4.898979, 3), rel=1e-5)
    scipy_result = stats.ttest_rel(a, b)
    assert r["p_value"] == pytest.approx(scipy_result.pvalue)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(tuple(scipy_result.confidence_interval()))
    assert "a_only" not in r  # not 0/1 data


def test_exact_method_by_hand():
    """McNemar exact: 8 a_only of 10 discordant, X ~ Bin(10, 1/2): P(X ≥ 8) = (45 + 10 + 1)/1024,
    p = 2 · 56/1024 = 0.109375. Difference = (8 − 2)/20 = 0.3 (p_a = 14/20 = 0.7, p_b = 8/20 = 0.4).
    Newcombe method 10, z = 1.959964, z²/n = 0.192073:
      Wilson(14/20) = ((0.7 + 0.096036) ∓ 0.222617) / 1.192073 = (0.481027, 0.854523)
      Wilson(8/20)  = ((0.4 + 0.096036) ∓ 0.235203) / 1.192073 = (0.218807, 0.613418)
      AD − BC = 6·4 − 8·2 = 8 ≤ N/2 = 10, so the corrected φ = 0 (the plain φ would be 8/√(14·6·8·12) = 0.089)
      low  = 0.3 − √(0.218973² + 0.213418²) = 0.3 − √0.093496 = 0.3 − 0.305772 = −0.005772
      high = 0.3 + √(0.154523² + 0.181193²) = 0.3 + √0.056708 = 0.3 + 0.238135 = 0.538135
    The interval holds 0, as McNemar's p = 0.109 says it should; the plain φ gave [0.008, 0.527], which did not."""
    r = paired_difference(BINARY_A, BINARY_B)  # auto → exact for 0/1 data
    assert r["method"] == "exact"
    assert (r["a_only"], r["b_only"], r["n"]) == (8, 2, 20)
    assert r["difference"] == pytest.approx(0.3)
    assert r["p_value"] == pytest.approx(112 / 1024)
    assert r["p_value"] == pytest.approx(stats.binomtest(8, 10, 0.5).pvalue)
    assert r["ci_low"] == pytest.approx(-0.005772, abs=2e-6)
    assert r["ci_high"] == pytest.approx(0.538135, abs=2e-6)
    assert newcombe_phi(6, 8, 2, 4) == 0.0


def _table(n11: int, n10: int, n01: int, n00: int) -> tuple[list[int], list[int]]:
    """0/1 items of a and b from Newcombe's cells A = both right, B = a only, C = b only, D = both wrong."""
    return [1] * (n11 + n10) + [0] * (n01 + n00), [1] * n11 + [0] * n10 + [1] * n01 + [0] * n00


@pytest.mark.parametrize(("cells", "published"), [
    ((6, 8, 2, 4), (-0.006, 0.538)),  # issue 26: the published method, agreeing with McNemar's p = 0.109
    ((20, 12, 2, 16), (0.0562, 0.3292)),  # Newcombe (1998) worked example, method 10 (ratesci's test of it)
    ((1, 1, 7, 12), (-0.507, -0.026)),  # Fagerland, Lydersen & Laake (2014, Stat. Med.) Bentur et al. example
    ((8, 3, 1, 2), (-0.1574, 0.4136)),  # Tang et al. (2010) example, MOVER-Wilson with Newcombe's φ
])
def test_newcombe_method_10_matches_published_examples(cells, published):
    """Each published interval to the digits it was printed with (half a unit of its last digit)."""
    a, b = _table(*cells)
    r = paired_difference(a, b, method="exact")
    assert r["difference"] == pytest.approx((cells[1] - cells[2]) / sum(cells))
    digits = len(str(published[0]).split(".")[1])
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(published, abs=0.5 * 10 ** -digits)


def test_newcombe_phi_correction_by_hand():
    """(20, 12, 2, 16), N = 50: AD − BC = 320 − 24 = 296 > N/2, EFGH = 32·18·22·28 = 354816, √ = 595.6643;
    φ = (296 − 25)/595.6643 = 0.454954, where the plain φ = 296/595.6643 = 0.496924 gave [0.0618, 0.3242].
    (36, 12, 2, 0): AD − BC = −24 < 0 is kept, φ = −24/√(48·2·38·12) = −24/209.2272 = −0.114708, a wider interval
    than φ = 0 would give: [0.0569, 0.3404] against [0.0645, 0.3372]. An empty margin gives φ = 0."""
    assert newcombe_phi(20, 12, 2, 16) == pytest.approx(0.454954, abs=1e-6)
    assert newcombe_phi(36, 12, 2, 0) == pytest.approx(-0.114708, abs=1e-6)
    assert newcombe_phi(5, 5, 0, 0) == 0.0
    a, b = _table(36, 12, 2, 0)
    r = paired_difference(a, b, method="exact")
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.0569, 0.3404), abs=5e-5)


def test_exact_agrees_with_binomtest_on_random_data_and_stays_in_range():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 2, 150), rng.integers(0, 2, 150)
    r = paired_difference(a, b, method="exact")
    a_only, b_only = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
    assert (r["a_only"], r["b_only"]) == (a_only, b_only)
    assert r["p_value"] == pytest.approx(stats.binomtest(a_only, a_only + b_only, 0.5).pvalue)
    assert -1 <= r["ci_low"] < r["difference"] < r["ci_high"] <= 1


def test_exact_with_no_discordant_items_gives_p_one():
    """Identical 0/1 results: no discordant pair, no evidence either way, p = 1, interval around 0."""
    r = paired_difference([1, 0, 1, 1, 0], [1, 0, 1, 1, 0])
    assert (r["a_only"], r["b_only"], r["difference"], r["p_value"]) == (0, 0, 0.0, 1.0)
    assert r["ci_low"] < 0 < r["ci_high"]


def test_auto_picks_bootstrap_for_continuous_scores():
    r = paired_difference([0.5, 1.2, -0.3], [0.1, 1.0, -0.2])
    assert r["method"] == "bootstrap" and "a_only" not in r


def test_bootstrap_close_to_t_for_normal_differences():
    """d ~ N(0.3, 1), n = 400: stderr ≈ 0.05, t half-width ≈ 0.098; the percentile bootstrap of a mean agrees to
    Monte-Carlo error (≈ 0.0015 per endpoint at 10000 resamples) plus the n vs n − 1 in its variance (0.1%)."""
    rng = np.random.default_rng(0)
    b = rng.normal(0, 1, 400)
    a = b + rng.normal(0.3, 1, 400)
    boot, t = paired_difference(a, b, method="bootstrap"), paired_difference(a, b, method="t")
    assert boot["ci_low"] == pytest.approx(t["ci_low"], abs=0.01)
    assert boot["ci_high"] == pytest.approx(t["ci_high"], abs=0.01)
    assert boot["ci_low"] > 0 and boot["p_value"] < 0.001  # t ≈ 6: no resample mean reaches 0, p = 2/10001


def test_bootstrap_is_deterministic_under_the_seed():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=60), rng.normal(size=60)
    first = paired_difference(a, b, method="bootstrap", seed=7, resamples=2000)
    assert first == paired_difference(a, b, method="bootstrap", seed=7, resamples=2000)
    other = paired_difference(a, b, method="bootstrap", seed=8, resamples=2000)
    assert (other["ci_low"], other["ci_high"]) != (first["ci_low"], first["ci_high"])


def test_bootstrap_p_value_of_identical_models_is_one():
    """d ≡ 0: every resample mean is 0, so #{≤ 0} = #{≥ 0} = B and p = min(1, 2(B + 1)/(B + 1)) = 1."""
    r = paired_difference([0.2, 0.5, 0.9], [0.2, 0.5, 0.9], method="bootstrap")
    assert (r["ci_low"], r["ci_high"], r["p_value"]) == (0.0, 0.0, 1.0)
    assert type(r["p_value"]) is float  # plain floats, so the result writes to JSON as it is


def test_t_with_no_spread_collapses_to_a_point_with_a_note():
    """d ≡ 1: sd(d) = 0, ttest_rel would return nan; the interval is [1, 1] and p its limit, 0."""
    r = paired_difference([1, 2, 3], [0, 1, 2], method="t")
    assert (r["ci_low"], r["ci_high"], r["stderr"], r["p_value"]) == (1.0, 1.0, 0.0, 0.0)
    assert "same amount" in r["note"]


def test_pairing_matters_for_correlated_models():
    """b = 0..10 in 50 steps, a = b + 0.1 ± 0.05: the item spread (sd ≈ 2.98) is shared, so d = a − b is 0.15, 0.05
    alternating, sd(d) ≈ 0.0505, paired interval ≈ 0.1 ± 0.014 — excludes 0. Treated as unpaired, the stderr is
    √(2 · 8.85 / 50) ≈ 0.59 and the interval (≈ −1.08, 1.28) straddles 0."""
    b = np.linspace(0, 10, 50)
    a = b + 0.1 + 0.05 * (-1) ** np.arange(50)
    unpaired = stats.ttest_ind(a, b).confidence_interval()
    assert unpaired.low < 0 < unpaired.high
    for method in ("t", "bootstrap"):
        r = paired_difference(a, b, method=method)
        assert 0.08 < r["ci_low"] < 0.1 < r["ci_high"] < 0.12, method
        assert r["p_value"] < 0.001


def test_one_item_gives_none_with_a_note():
    r = paired_difference([1.0], [0.0])
    assert (r["ci_low"], r["ci_high"], r["stderr"], r["p_value"]) == (None, None, None, None)
    assert r["difference"] == 1.0 and "at least 2 items" in r["note"]
    one = mean_and_ci([0.3])
    assert one["mean"] == 0.3 and one["ci_low"] is None and "at least 2" in one["note"]


@pytest.mark.parametrize(("a", "b", "kwargs", "message"), [
    ([1, 2, 3], [1, 2], {}, "a has 3 items and b has 2"),
    ([1, float("nan"), 3], [1, 2, 3], {}, r"a\[1\] = nan"),
    ([1, 2, 3], [float("inf"), 2, 3], {}, r"b\[0\] = inf"),
    ([], [], {}, "non-empty"),
    ([[1, 2], [3, 4]], [[1, 2], [3, 4]], {}, r"shape \(2, 2\)"),
    (["x", "y"], [1, 2], {}, "not a list of numbers"),
    ([0.5, 1], [0, 1], {"method": "exact"}, "needs 0/1 scores"),
    ([1, 0], [0, 1], {"method": "mcnemar"}, "method='mcnemar'"),
    ([1, 0], [0, 1], {"confidence": 95}, "confidence=95"),
    ([1, 0], [0, 1], {"resamples": 10}, "resamples=10"),
])
def test_bad_inputs_name_the_problem(a, b, kwargs, message):
    with pytest.raises(ItermergeError, match=message):
        paired_difference(a, b, **kwargs)


def test_mean_and_ci_by_hand():
    """Per-seed values [1, 1.5, 0.5]: mean 1, sd 0.5, stderr 0.5/√3 = 0.288675, half = 4.302653 · 0.288675
    = 1.242068, interval [−0.242068, 2.242068]."""
    r = mean_and_ci([1.0, 1.5, 0.5])
    assert r["mean"] == 1.0 and r["n"] == 3
    assert r["stderr"] == pytest.approx(0.288675, abs=1e-6)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((-0.242068, 2.242068), abs=1e-6)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((1 - T_2 * 0.5 / math.sqrt(3), 1 + T_2 * 0.5 / math.sqrt(3)))


def test_pooled_weighs_seeds_equally_with_the_t_summary_by_hand():
    """Seed differences: [1, 1, 1] → 1, [1, 2] → 1.5, [1, 0, 1, 0] → 0.5. Each seed weighs the same:
    Δ = (1 + 1.5 + 0.5)/3 = 1.0, where pooling items would give (3 + 3 + 2)/9 = 0.889."""
    groups = [([1, 2, 3], [0, 1, 2]), ([2, 2], [1, 0]), ([0, 1, 1, 0], [0, 0, 0, 0])]
    r = pooled_paired_difference(groups, resamples=2000)
    assert r["per_seed"] == [1.0, 1.5, 0.5] and r["n_per_seed"] == [3, 2, 4] and r["seeds"] == 3
    assert r["difference"] == 1.0
    assert r["across_seeds"] == mean_and_ci([1.0, 1.5, 0.5])
    assert r["ci_low"] <= 1.0 <= r["ci_high"]


def test_pooled_two_stage_bootstrap_by_hand():
    """Two seeds with no item noise, d ≡ 0 and d ≡ 1: a replicate draws the seeds (0,0), (0,1)/(1,0), (1,1) with
    chances 1/4, 1/2, 1/4, so Δ* ∈ {0, 0.5, 1}; the 2.5% and 97.5% percentiles are 0 and 1, and
    #{Δ* ≤ 0} ≈ B/4 gives p ≈ 2 · 0.25 = 0.5."""
    r = pooled_paired_difference([([1, 1, 1], [1, 1, 1]), ([2, 2], [1, 1])], resamples=10000)
    assert r["difference"] == 0.5
    assert (r["ci_low"], r["ci_high"]) == (0.0, 1.0)
    assert r["p_value"] == pytest.approx(0.5, abs=0.03)


def test_pooled_carries_seed_to_seed_spread():
    """Five seeds disagree (differences −0.2 … 0.6) with little item noise: lumping all items into one paired
    sample hides that the seeds are the replicates; the two-stage interval is several times wider."""
    rng = np.random.default_rng(2)
    groups = []
    for shift in (-0.2, 0.0, 0.2, 0.4, 0.6):
        b = rng.normal(size=100)
        groups.append((b + shift + rng.normal(0, 0.05, 100), b))
    pooled = pooled_paired_difference(groups, resamples=4000)
    lumped = paired_difference(np.concatenate([g[0] for g in groups]), np.concatenate([g[1] for g in groups]),
                               method="bootstrap", resamples=4000)
    assert pooled["ci_high"] - pooled["ci_low"] > 3 * (lumped["ci_high"] - lumped["ci_low"])
    assert pooled["ci_low"] < 0.2 < pooled["ci_high"]


def test_pooled_one_seed_is_the_item_bootstrap():
    rng = np.random.default_rng(4)
    a, b = rng.normal(0.2, 1, 300), rng.normal(0, 1, 300)
    pooled = pooled_paired_difference([(a, b)], seed=3)
    single = paired_difference(a, b, method="bootstrap", seed=3)
    assert pooled["difference"] == pytest.approx(single["difference"])
    assert pooled["ci_low"] == pytest.approx(single["ci_low"], abs=0.01)
    assert pooled["ci_high"] == pytest.approx(single["ci_high"], abs=0.01)
    assert "one seed" in pooled["note"] and pooled["across_seeds"]["ci_low"] is None
    assert pooled == pooled_paired_difference([(a, b)], seed=3)


@pytest.mark.parametrize(("groups", "message"), [
    ([], "non-empty list"),
    ([([1, 2], [1, 2]), ([1, 2, 3], [1, 2])], r"groups\[1\]: a has 3 items and b has 2"),
    ([([1, 2], [1, 2], [3, 4])], r"groups\[0\] is not an \(a, b\) pair"),
    ([([1, float("nan")], [1, 2])], r"groups\[0\]: a\[1\] = nan"),
])
def test_pooled_bad_inputs_name_the_problem(groups, message):
    with pytest.raises(ItermergeError, match=message):
        pooled_paired_difference(groups)


def test_minimum_detectable_effect_by_hand():
    """δ = (z_{.975} + z_{.8}) σ_d / √n = 2.801585 σ_d / √n:
    McNemar, n = 400, ψ = 0.2: 2.801585 · 0.447214 / 20 = 0.062645;
    ψ unknown, baseline 0.5: ψ = 2 · 0.5 · 0.5 = 0.5, 2.801585 · 0.707107 / 20 = 0.099051;
    continuous, sd = 1, n = 100: 2.801585 / 10 = 0.280158."""
    assert minimum_detectable_effect(400, discordant=0.2) == pytest.approx(0.062645, abs=1e-6)
    assert minimum_detectable_effect(400) == pytest.approx(0.099051, abs=1e-6)
    assert minimum_detectable_effect(100, sd=1.0) == pytest.approx(0.280158, abs=1e-6)
    assert minimum_detectable_effect(100, sd=1.0) == pytest.approx((Z + Z_POWER) / 10)


def test_minimum_detectable_effect_has_the_power_it_claims():
    """Simulate the designs at δ = MDE: the test should reject about 80% of the time."""
    rng = np.random.default_rng(5)
    delta = minimum_detectable_effect(400, discordant=0.2)
    counts = rng.multinomial(400, [0.1 + delta / 2, 0.1 - delta / 2, 0.8], size=5000)  # (a only, b only, agree)
    z = (counts[:, 0] - counts[:, 1]) / np.sqrt(counts[:, 0] + counts[:, 1])  # McNemar's normal statistic
    assert np.mean(np.abs(z) > Z) == pytest.approx(0.8, abs=0.03)
    delta = minimum_detectable_effect(100, sd=1.0)
    d = rng.normal(delta, 1.0, size=(3000, 100))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / 10)
    assert np.mean(np.abs(t) > stats.t.ppf(0.975, 99)) == pytest.approx(0.8, abs=0.03)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n": 1}, "n=1"),
    ({"n": 100, "alpha": 0}, "alpha=0"),
    ({"n": 100, "power": 1.2}, "power=1.2"),
    ({"n": 100, "discordant": 0.0}, "discordant=0.0"),
    ({"n": 100, "sd": -1.0}, "sd=-1.0"),
    ({"n": 100, "sd": 1.0, "discordant": 0.2}, "not both"),
])
def test_minimum_detectable_effect_bad_inputs(kwargs, message):
    with pytest.raises(ItermergeError, match=message):
        minimum_detectable_effect(**kwargs)


def test_holm_adjust_by_hand():
    """m = 4, p = (0.01, 0.04, 0.03, 0.005): sorted 0.005, 0.01, 0.03, 0.04 times m − j + 1 = 4, 3, 2, 1 gives
    0.02, 0.03, 0.06, 0.04; the running max makes it monotone, 0.02, 0.03, 0.06, 0.06; back in the given order
    (0.03, 0.06, 0.06, 0.02). At α = 0.05 Holm rejects the first and last; Bonferroni (4p) would give
    (0.04, 0.16, 0.12, 0.02) and reject the same two, uncorrected all four."""
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_adjust_caps_at_one_keeps_ties_and_edges():
    """(0.6, 0.7): 2 · 0.6 = 1.2 → 1, then max(1, 0.7) = 1. Equal p-values get one adjusted value:
    (0.02, 0.02, 0.5) → 3 · 0.02 = 0.06, max(0.06, 2 · 0.02) = 0.06, max(0.06, 0.5) = 0.5. One test is left alone."""
    assert holm_adjust([0.6, 0.7]) == [1.0, 1.0]
    assert holm_adjust([0.02, 0.02, 0.5]) == pytest.approx([0.06, 0.06, 0.5])
    assert holm_adjust([0.012]) == [0.012]
    assert holm_adjust([]) == []
    rng = np.random.default_rng(6)
    p = rng.uniform(size=30)
    adjusted = np.array(holm_adjust(p))
    assert np.all(adjusted >= p) and np.all(adjusted <= 1)
    assert np.all(np.diff(adjusted[np.argsort(p)]) >= 0)  # monotone in the raw p


@pytest.mark.parametrize(("p", "message"), [([0.1, 1.5], r"p_values\[1\] = 1.5"), ([0.1, float("nan")], "nan")])
def test_holm_adjust_bad_inputs(p, message):
    with pytest.raises(ItermergeError, match=message):
        holm_adjust(p)
