"""Regimes against each other (a study file's ``across:``): the anchor's merge and θT against each other regime's θT
and merge, seed by seed on the shared test prompts, pooled over the seeds both finished; by hand on 4 prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from itermerge.across import across_regimes
from itermerge.claims import study_claims
from itermerge.errors import ItermergeError
from itermerge.replicates import aggregate, load_study


def fake_run(root: Path, regime: str, seed: int, theta_T: list[int], merged: list[int]) -> None:
    """search/test.json (θ0, θ1, θ2 = θT, the baselines, the merge: 0/1 accuracy per prompt) and choice.json."""
    d = root / regime / f"seed_{seed}" / "search"
    d.mkdir(parents=True)
    rows = {0: [0, 0, 0, 0], 1: [0, 1, 0, 0], 2: theta_T, "best": [0, 1, 0, 0], "expo": theta_T,
            "uniform": [0, 1, 1, 0], "merged": merged}
    models = [{"t": t, "name": str(t), "metrics": {"accuracy": {"value": sum(xs) / 4, "stderr": 0.1, "n": 4,
                                                                "items": xs}}} for t, xs in rows.items()]
    (d / "test.json").write_text(json.dumps({"split": "test", "models": models}))
    (d / "choice.json").write_text(json.dumps({"lam": 0.3, "alpha": 0.4, "expo": {"alpha": 0.0}}))


@pytest.fixture
def study(tmp_path):
    # fixed: θT [1,0,0,0] and merge [1,1,1,0] (seed 0); θT [1,1,0,0] and merge [1,1,0,0] (seed 1)
    # soft:  θT [0,0,0,0] and merge [1,1,0,0] (seed 0); θT [1,0,0,0] and merge [1,1,1,1] (seed 1)
    fake_run(tmp_path, "fixed", 0, [1, 0, 0, 0], [1, 1, 1, 0])
    fake_run(tmp_path, "fixed", 1, [1, 1, 0, 0], [1, 1, 0, 0])
    fake_run(tmp_path, "soft", 0, [0, 0, 0, 0], [1, 1, 0, 0])
    fake_run(tmp_path, "soft", 1, [1, 0, 0, 0], [1, 1, 1, 1])
    (tmp_path / "study.json").write_text(json.dumps({"name": "ref", "across": "fixed"}))
    return tmp_path


def test_the_anchor_against_each_regime_by_hand(study):
    got = across_regimes(study, "fixed", ["fixed", "soft"])
    assert got["anchor"] == "fixed" and list(got["searches"]) == ["search"]
    by = {(tuple(c["a"]), tuple(c["b"])): c for c in got["searches"]["search"]}
    assert set(by) == {(("fixed", "merged"), ("soft", "T")), (("fixed", "merged"), ("soft", "merged")),
                       (("fixed", "T"), ("soft", "T"))}
    # fixed's merge − soft's θT: seed 0 0.75 − 0 = +0.75, seed 1 0.5 − 0.25 = +0.25: pooled +0.5
    d = by[(("fixed", "merged"), ("soft", "T"))]
    assert d["metrics"]["accuracy"]["difference"] == pytest.approx(0.5)
    assert d["metrics"]["accuracy"]["per_seed"] == pytest.approx([0.75, 0.25]) and d["seeds"] == [0, 1]
    assert d["a_name"] == "fixed: its merge" and d["b_name"] == "soft: θT"
    # merge − merge: 0.75 − 0.5 = +0.25, 0.5 − 1 = −0.5: pooled −0.125; θT − θT: +0.25, +0.25
    assert by[(("fixed", "merged"), ("soft", "merged"))]["metrics"]["accuracy"]["difference"] == pytest.approx(-0.125)
    assert by[(("fixed", "T"), ("soft", "T"))]["metrics"]["accuracy"]["per_seed"] == pytest.approx([0.25, 0.25])


def test_only_the_seeds_both_regimes_finished_are_paired(study):
    import shutil

    shutil.rmtree(study / "soft" / "seed_1")
    got = across_regimes(study, "fixed", ["fixed", "soft"])
    d = next(c for c in got["searches"]["search"] if c["b"] == ["soft", "T"] and c["a"] == ["fixed", "merged"])
    assert d["seeds"] == [0] and d["metrics"]["accuracy"]["difference"] == pytest.approx(0.75)


def test_the_aggregate_the_claims_and_the_page_carry_them(study, tmp_path):
    from itermerge.results import write_results

    agg = aggregate(study)
    assert agg["across"]["anchor"] == "fixed" and len(agg["across"]["searches"]["search"]) == 3
    claims = [c for c in study_claims(agg) if c.text.startswith("*Across regimes:*")]
    assert [c.text for c in claims][:2] == ["*Across regimes:* fixed: its merge beats soft: θT, accuracy",
                                            "*Across regimes:* fixed: its merge beats soft: θT, reward"]
    assert claims[0].d["difference"] == pytest.approx(0.5) and claims[1].d is None and claims[0].group == "ours"
    page = write_results(tmp_path / "page.md", study=study).read_text()
    assert "### Across regimes: fixed against each other regime" in page
    assert "| search | fixed: its merge − soft: θT | +0.5" in page
    # beside another study of the same task (`itermerge results --other-study`): a section of its own, its claims
    main = tmp_path / "main"
    fake_run(main, "lr", 0, [1, 0, 0, 0], [1, 1, 0, 0])
    aggregate(main)
    page = write_results(tmp_path / "both.md", study=main, others=[study]).read_text()
    mine, other = page.split("## Another study of this task:")
    assert "| lr, T = 2, 1 seed |" in mine and "Across regimes" not in mine
    assert "### Its answer" in other and "| fixed, T = 2, 2 seeds |" in other
    assert "| search | fixed: its merge − soft: θT | +0.5" in other and "### Its claims" in other


def test_a_study_file_names_a_regime_to_compare_across(tmp_path):
    run = {"iterations": 1, "prompts": {"dev": 4}}
    ok = tmp_path / "ok.yaml"
    ok.write_text(json.dumps({"run": run, "regimes": {"a": {}, "b": {}}, "across": "a"}))
    assert load_study(ok).across == "a"
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"run": run, "regimes": {"a": {}, "b": {}}, "across": "c"}))
    with pytest.raises(ItermergeError, match=r"bad\.yaml: across = 'c': name the regime the others are compared "
                                             r"with, one of a, b"):
        load_study(bad)
