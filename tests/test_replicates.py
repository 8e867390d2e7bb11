"""Replicates on the tiny model: seeds that share dev and test, the T' search, and an aggregation equal to the files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import save_tiny, tiny_model

from itermerge.errors import ItermergeError
from itermerge.replicates import aggregate, load_study, parse_seeds, replicate


def tiny_study(theta0: Path) -> dict:
    run = {
        "iterations": 3, "seed": 5, "model": {"path": str(theta0)},
        "prompts": {"per_iteration": 6, "dev": 4, "test": 6, "max_prompt_length": 128},
        "sampling": {"n": 4, "max_new_tokens": 6, "batch_size": 24},
        "dpo": {"learning_rate": 1e-3, "global_batch_size": 4, "micro_batch_size": 2, "max_length": 256,
                "max_prompt_length": 128},
        "evaluation": {"max_new_tokens": 6, "reward": {"sampling": "greedy", "samples": 1}, "kl": None},
        "search": {"lams": [0.0, 0.5], "alphas": [0.0, 0.5], "at": [2]},
        "studies": {"alpha_study": False, "accuracy_matrix": False, "ensemble": False, "lambda_study": False},
    }
    return {"name": "tiny", "seeds": [0, 1], "run": run, "regimes": {"lr-a": {}}}


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("study")
    theta0 = save_tiny(root / "theta0", tiny_model(0))
    (root / "study.yaml").write_text(yaml.safe_dump(tiny_study(theta0)))
    return replicate(load_study(root / "study.yaml"), root / "out", prune_caches=True)


def _test(study_dir: Path, regime: str, seed: int, search: str = "search") -> dict:
    return json.loads((study_dir / regime / f"seed_{seed}" / search / "test.json").read_text())


def _row(test: dict, key) -> dict:
    return next(m for m in test["models"] if m["t"] == key)


def test_replicas_share_dev_and_test_and_differ_in_training(study_dir):
    runs = [study_dir / "lr-a" / f"seed_{s}" for s in (0, 1)]
    trained = [(r / "iter_01" / "prompts.jsonl").read_text() for r in runs]
    assert trained[0] != trained[1]  # the seed moves the training prompts (and sampling, data order)
    evaluated = [json.loads((r / "search" / "eval_config.json").read_text())["prompts"] for r in runs]
    assert evaluated[0] == evaluated[1] and evaluated[0]["seed"] == 5 and evaluated[0]["test_n"] == 6
    for r in runs:
        test = json.loads((r / "search" / "test.json").read_text())
        assert [m["t"] for m in test["models"]] == [0, 1, 2, 3, "best", "expo", "uniform", "merged"]
        assert all(m["metrics"]["accuracy"]["n"] == 6 and len(m["metrics"]["accuracy"]["items"]) == 6
                   for m in test["models"])
        assert not (r / "cache").exists()  # pruned: θ̄ is recomputed on demand
    # θ0 scores the same on the shared test set in every replica
    assert _row(_test(study_dir, "lr-a", 0), 0)["metrics"] == _row(_test(study_dir, "lr-a", 1), 0)["metrics"]


def test_a_T_prime_search_reuses_the_checkpoints_measured_for_T(study_dir):
    run = study_dir / "lr-a" / "seed_0"
    full, short = _test(study_dir, "lr-a", 0), _test(study_dir, "lr-a", 0, "search_T2")
    assert [m["t"] for m in short["models"]] == [0, 1, 2, "best", "expo", "uniform", "merged"]
    # T' = 2's best θt on dev is chosen among θ1, θ2 of search_T2's own dev records, by the same rule
    from itermerge.config.search import SelectionRule
    from itermerge.search.selection import select_checkpoint

    choice = json.loads((run / "search_T2" / "choice.json").read_text())
    dev_ckpts = [json.loads(line) for line in (run / "search_T2" / "checkpoints.jsonl").read_text().splitlines()]
    again = select_checkpoint(dev_ckpts, SelectionRule(**choice["rule"]))
    assert [choice["best_checkpoint"][k] for k in ("t", "reason")] == [again["t"], again["reason"]]
    assert _row(short, "best")["same_as"] == choice["best_checkpoint"]["t"] in (1, 2)
    for t in (0, 1, 2):  # the same model on the same test prompts: measured once
        assert _row(short, t)["metrics"] == _row(full, t)["metrics"] and _row(short, t)["reused_from"] == "search"
    assert _row(short, "uniform")["weights"] == pytest.approx([0.0, 0.5, 0.5])
    dev = [json.loads(line) for line in (run / "search_T2" / "checkpoints.jsonl").read_text().splitlines()]
    assert {r["t"] for r in dev if r.get("reused_from") == "search"} == {0, 1}


def test_the_aggregate_equals_the_run_files(study_dir):
    agg = json.loads((study_dir / "aggregate.json").read_text())
    assert set(agg["regimes"]) == {"lr-a"}
    for regime in ("lr-a",):
        for search, T in (("search", 3), ("search_T2", 2)):
            got = agg["regimes"][regime]["searches"][search]
            tests = [_test(study_dir, regime, s, search) for s in (0, 1)]
            assert got["T"] == T and got["seeds"] == [0, 1]
            for row in got["rows"]:
                values = [_row(t, row["t"])["metrics"]["reward"]["value"] for t in tests]
                assert row["metrics"]["reward"]["per_seed"] == values
                assert row["metrics"]["reward"]["mean"] == pytest.approx(np.mean(values))
            for pair in got["paired"]:
                for metric in ("accuracy", "reward"):
                    by_seed = [np.mean(np.subtract(_row(t, "merged")["metrics"][metric]["items"],
                                                   _row(t, pair["b"])["metrics"][metric]["items"])) for t in tests]
                    assert pair["metrics"][metric]["difference"] == pytest.approx(np.mean(by_seed))
            assert [pair["b"] for pair in got["paired"]] == ["best", T, "expo", "uniform", 0]
            choices = [json.loads((study_dir / regime / f"seed_{s}" / search / "choice.json").read_text())
                       for s in (0, 1)]
            assert got["choices"] == [{"lam": c["lam"], "alpha": c["alpha"], "expo_alpha": c["expo"]["alpha"],
                                       "best_t": c["best_checkpoint"]["t"],
                                       "expo_is_theta_T": c["expo"]["alpha"] == 0.0} for c in choices]
    assert aggregate(study_dir) == agg  # nothing is re-evaluated: the same files give the same numbers


def test_replicate_resumes_without_redoing_anything(study_dir):
    before = {p: p.stat().st_mtime_ns for p in study_dir.glob("*/seed_*/search*/test.json")}
    noted = {p: p.read_text() for p in study_dir.glob("*/seed_*/provenance.json")}
    replicate(load_study(study_dir.parent / "study.yaml"), study_dir, prune_caches=True)
    assert {p: p.stat().st_mtime_ns for p in study_dir.glob("*/seed_*/search*/test.json")} == before
    # a run the resumed study only skipped keeps one record of the code that made it
    assert len(noted) == 2 and {p: p.read_text() for p in study_dir.glob("*/seed_*/provenance.json")} == noted


def test_regimes_override_the_run_and_keep_the_shared_prompts(tmp_path):
    study = tiny_study(Path("theta0"))
    study["regimes"] = {"slow": {}, "fast": {"dpo": {"learning_rate": 3e-3}, "seed": 9}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    configs = load_study(tmp_path / "s.yaml", seeds=[2, 3]).configs()
    assert [c.dpo.learning_rate for c in configs["fast"].values()] == [3e-3, 3e-3]
    assert configs["slow"][2].dpo.learning_rate == 1e-3 and configs["slow"][2].dpo.beta == configs["fast"][2].dpo.beta
    assert [c.seed for c in configs["fast"].values()] == [2, 3]  # --seeds replaces the study's
    assert configs["slow"][3].evaluation.prompts.seed == 5 and configs["fast"][3].evaluation.prompts.seed == 9


def test_bad_studies_are_refused_by_name(tmp_path):
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]
    with pytest.raises(ItermergeError, match="'x' is not a seed"):
        parse_seeds("0,x")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"run": {"iterations": 2}, "seeds": [0, 0]}))
    with pytest.raises(ItermergeError, match="repeats a seed"):
        load_study(path)
    path.write_text(yaml.safe_dump({"run": {"iterations": 2}, "sedes": [0]}))
    with pytest.raises(ItermergeError, match="unknown study keys \\['sedes'\\]"):
        load_study(path)
    path.write_text(yaml.safe_dump({"run": {"iterations": 2, "search": {"at": [2]}}}))
    with pytest.raises(ItermergeError, match=r"search\.at"):
        load_study(path)


def test_the_results_page_carries_the_aggregate_numbers(study_dir, tmp_path):
    from itermerge.cli import main
    from itermerge.results import verdict

    out = tmp_path / "results.md"
    assert main(["results", "--study", str(study_dir), "--out", str(out)]) == 0
    page = out.read_text()
    agg = json.loads((study_dir / "aggregate.json").read_text())
    search = agg["regimes"]["lr-a"]["searches"]["search"]
    d = next(p for p in search["paired"] if p["b"] == 3)["metrics"]["reward"]
    row = next(line for line in page.splitlines()
               if line.startswith("| The merge beats θT (Table 2): merge − θT, reward | lr-a, T = 3, 2 seeds"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{d['difference']:+.3g}" and cells[3] == f"[{d['ci_low']:+.3g}, {d['ci_high']:+.3g}]"
    t = d["across_seeds"]
    assert cells[6] == f"[{t['ci_low']:+.3g}, {t['ci_high']:+.3g}]"
    sides = {"held" if lo > 0 else "contradicted" if hi < 0 else "not shown"
             for lo, hi in ((d["ci_low"], d["ci_high"]), (t["ci_low"], t["ci_high"]))}
    said = sides.pop() if len(sides) == 1 else "not shown"  # no primary declared: Holm may still overrule it
    assert cells[7] in (said, f"not shown after Holm ({said} unadjusted)")
    assert "## lr-a, T = 2 (`search_T2/`)" in page and "seed 1: (λ" in page
    answer = next(line for line in page.splitlines() if line.startswith("| lr-a, T = 3, 2 seeds |"))
    accuracy = next(p for p in search["paired"] if p["b"] == 3)["metrics"]["accuracy"]
    acc_row = next(line for line in page.splitlines()
                   if line.startswith("| The merge beats θT (Table 2): merge − θT, accuracy | lr-a, T = 3, 2 seeds"))
    assert verdict(accuracy) in acc_row
    assert answer.split("|")[4].strip() == f"{accuracy['difference']:+.3f} / {d['difference']:+.3f}: " \
        f"{acc_row.strip('|').split('|')[7].strip()} / {cells[7]}"
    best = {m: next(p for p in search["paired"] if p["b"] == "best")["metrics"][m] for m in ("accuracy", "reward")}
    assert answer.split("|")[2].strip().startswith(  # the answer leads with merge − best θt on dev
        f"{best['accuracy']['difference']:+.3f} / {best['reward']['difference']:+.3f}: ")
    expo_is_T = all(c["expo_is_theta_T"] for c in search["choices"])
    for r in search["rows"]:  # every row of the T = 3 table, mean over seeds; ExPO "= θT" where it is θT in each seed
        cell = "= θT" if r["t"] == "expo" and expo_is_T else f"{r['metrics']['accuracy']['mean']:.4g}"
        assert f"| {r['name']} | {cell}" in page
    assert main(["results", "--out", str(out)]) == 2  # nothing to read: a named error


def _fake_search(root: Path, seed: int, items: dict) -> Path:
    """search/test.json and choice.json of one seed, with per-prompt accuracy items given by hand."""
    d = root / "lr" / f"seed_{seed}" / "search"
    d.mkdir(parents=True)
    models = []
    for t, xs in items.items():
        names = {"merged": "Merged (λ=0.3, α=0.4)", "expo": "ExPO (λ=0, α=0.4)", "uniform": "Uniform",
                 "best": "Best θt on dev (Iter 1)"}
        name = names.get(t, f"Iter {t}")
        m = float(np.mean(xs))
        models.append({"t": t, "name": name, "metrics": {"accuracy": {"value": m, "stderr": 0.1, "n": len(xs),
                                                                      "items": xs}}})
        if t == "best":
            models[-1]["same_as"] = 1  # θ1's numbers: its row above
    (d / "test.json").write_text(json.dumps({"split": "test", "models": models}))
    (d / "choice.json").write_text(json.dumps({"lam": 0.3, "alpha": 0.4 * seed, "expo": {"alpha": 1.0}}))
    return d


def test_aggregation_by_hand(tmp_path):
    """Seed 0: merge [1,1,1,0] vs θ2 [1,0,0,0] → +0.5; seed 1: merge [1,1,0,0] vs θ2 [1,1,0,0] → 0: pooled +0.25,
    each seed weighing the same. Rows: θ2's accuracy 0.25 and 0.5 → mean 0.375, t interval ± t_{1,0.975}·0.125."""
    from scipy import stats

    from itermerge.maths.crossed import pooled_minimum_detectable_effect
    from itermerge.replicates import aggregate_search

    base = {0: [0, 0, 0, 0], 1: [0, 1, 0, 0], "best": [0, 1, 0, 0], "expo": [1, 0, 1, 0], "uniform": [0, 1, 1, 0]}
    dirs = [_fake_search(tmp_path, 0, {**base, 2: [1, 0, 0, 0], "merged": [1, 1, 1, 0]}),
            _fake_search(tmp_path, 1, {**base, 2: [1, 1, 0, 0], "merged": [1, 1, 0, 0]})]
    got = aggregate_search(dirs)
    assert got["T"] == 2 and got["seeds"] == [0, 1]
    vs_T = next(p for p in got["paired"] if p["b"] == 2)["metrics"]["accuracy"]
    assert vs_T["difference"] == pytest.approx(0.25) and vs_T["per_seed"] == pytest.approx([0.5, 0.0])
    assert vs_T["ci_low"] <= 0.0 <= 0.5 <= vs_T["ci_high"] + 1e-12  # two seeds that disagree: a wide interval
    # the seeds share their 4 test prompts: the crossed bootstrap, with the nested one and the t-test beside it;
    # per-seed (0.5, 0): t = 0.25 / (0.3536/√2) = 1 on 1 df, p = 2 · (1 − 0.75) = 0.5 (the Cauchy cdf at 1 is 3/4)
    assert vs_T["method"] == "crossed bootstrap" and set(vs_T["nested"]) == {"ci_low", "ci_high", "p_value"}
    assert vs_T["across_seeds"]["p_value"] == pytest.approx(0.5)
    theta2 = next(r for r in got["rows"] if r["t"] == 2)["metrics"]["accuracy"]
    assert theta2["mean"] == pytest.approx(0.375) and theta2["per_seed"] == [0.25, 0.5]
    half = stats.t.ppf(0.975, 1) * 0.125  # sd of (0.25, 0.5) is 0.1768, / √2 = 0.125
    assert (theta2["ci_low"], theta2["ci_high"]) == pytest.approx((0.375 - half, 0.375 + half))
    assert [p["b"] for p in got["paired"]] == ["best", 2, "expo", "uniform", 0]
    # merge − best θt on dev (θ1 = [0, 1, 0, 0] in both seeds): seed 0 [1,1,1,0] → +0.5, seed 1 [1,1,0,0] → +0.25
    vs_best = next(p for p in got["paired"] if p["b"] == "best")
    assert vs_best["b_name"] == "Best θt on dev (t chosen per seed)"
    assert vs_best["metrics"]["accuracy"]["difference"] == pytest.approx(0.375)
    assert vs_best["metrics"]["accuracy"]["per_seed"] == pytest.approx([0.5, 0.25])
    last = next(p for p in got["iterations"] if p["b"] == 1)["metrics"]["accuracy"]  # θ2 − θ1: 0, then +0.25
    assert last["difference"] == pytest.approx(0.125) and last["per_seed"] == pytest.approx([0.0, 0.25])
    assert got["choices"] == [{"lam": 0.3, "alpha": 0.0, "expo_alpha": 1.0, "best_t": 1, "expo_is_theta_T": False},
                              {"lam": 0.3, "alpha": 0.4, "expo_alpha": 1.0, "best_t": 1, "expo_is_theta_T": False}]
    # merge and θ2 disagree on 2 of 8 prompts: ψ = 0.25, MDE on 4 prompts = 2.8016 · √0.25 / √4
    assert got["design"]["discordant_merge_vs_T"] == 0.25
    assert got["design"]["mde_one_seed"] == pytest.approx(2.80158 * 0.5 / 2, rel=1e-4)
    # the rule's MDE reads the observed spread of merge − θ2 over seeds: sd(0.5, 0) = 0.353553, and its crossed stderr
    rule = got["design"]["mde_rule"]
    assert rule["seed_sd"] == pytest.approx(0.353553, abs=1e-6)
    assert rule == {"seed_sd": rule["seed_sd"],
                    **pooled_minimum_detectable_effect(rule["seed_sd"], 2, crossed_stderr=vs_T["stderr"])}
    assert rule["rule"] == max(rule["t_over_seeds"], rule["crossed"])


def test_the_learned_weights_join_the_aggregate_where_operators_json_tested_them_beside_this_merge(tmp_path):
    """Seed 0: merge [1,1,1,0] vs learned [1,0,1,0] → +0.25; seed 1: merge [1,1,0,0] vs learned [0,0,0,0] → +0.5:
    pooled +0.375. A seed whose operators.json was made beside another merge (α differs) does not count, and the
    claims get a "merge beats learned k_t" row only where every seed has one."""
    from itermerge.claims import study_claims
    from itermerge.replicates import aggregate_search
    from itermerge.results import _answer_section

    base = {0: [0, 0, 0, 0], 1: [0, 1, 0, 0], 2: [1, 0, 0, 0], "best": [0, 1, 0, 0], "expo": [1, 0, 1, 0],
            "uniform": [0, 1, 1, 0]}
    merged = {0: [1, 1, 1, 0], 1: [1, 1, 0, 0]}
    learned = {0: [1, 0, 1, 0], 1: [0, 0, 0, 0]}
    dirs = []
    for seed in (0, 1):
        d = _fake_search(tmp_path, seed, {**base, "merged": merged[seed]})
        test = json.loads((d / "test.json").read_text())
        test.update(lam=0.3, alpha=0.4 * seed, eval_fingerprint="f")
        (d / "test.json").write_text(json.dumps(test))
        row = {"accuracy": {"value": float(np.mean(learned[seed])), "stderr": 0.1, "n": 4, "items": learned[seed]}}
        (d / "operators.json").write_text(json.dumps({
            "split": "test", "eval_fingerprint": "f", "lam": 0.3, "alpha": 0.4 * seed, "operators": [
                {"operator": "learned", "title": "Learned k_t", "metrics": row},
                {"operator": "expo", "title": "ExPO", "metrics": row},  # test.json's expo row stays the ExPO row
                {"operator": "ties", "title": "TIES", "metrics": None}]}))  # no choice: no row
        dirs.append(d)
    got = aggregate_search(dirs)
    assert [r["t"] for r in got["rows"]] == [0, 1, 2, "best", "expo", "uniform", "merged", "learned"]
    assert got["rows"][-1]["name"] == "Learned k_t (fitted per seed on half of dev)"
    vs = next(p for p in got["paired"] if p["b"] == "learned")["metrics"]["accuracy"]
    assert vs["difference"] == pytest.approx(0.375) and vs["per_seed"] == pytest.approx([0.25, 0.5])
    agg = {"regimes": {"lr": {"searches": {"search": got}}}}
    claims = study_claims(agg)
    assert any(c.text == "The merge beats learned k_t: merge − learned k_t (fitted on half of dev), accuracy"
               for c in claims)
    answer = _answer_section(agg, claims)
    assert "| merge − θT | merge − ExPO | merge − learned k_t |" in answer and "| +0.375 / n/a: " in answer
    stale = json.loads((dirs[1] / "operators.json").read_text())
    (dirs[1] / "operators.json").write_text(json.dumps({**stale, "alpha": 9.0}))  # beside another merge
    got = aggregate_search(dirs)
    assert all(p["b"] != "learned" for p in got["paired"])
    agg = {"regimes": {"lr": {"searches": {"search": got}}}}
    assert not any("learned" in c.text for c in study_claims(agg))
    assert "learned k_t |" not in _answer_section(agg, study_claims(agg))


def test_the_results_page_prints_the_crossed_interval_and_the_t_test_p(tmp_path):
    """The hand example above, through aggregate and the page: merge − θ2 on accuracy is +0.25 with the crossed
    interval in the claims table and the t-test's p = 0.5 beside the bootstrap's."""
    from itermerge.results import write_results

    base = {0: [0, 0, 0, 0], 1: [0, 1, 0, 0], "best": [0, 1, 0, 0], "expo": [1, 0, 1, 0], "uniform": [0, 1, 1, 0]}
    _fake_search(tmp_path, 0, {**base, 2: [1, 0, 0, 0], "merged": [1, 1, 1, 0]})
    _fake_search(tmp_path, 1, {**base, 2: [1, 1, 0, 0], "merged": [1, 1, 0, 0]})
    d = next(p for p in aggregate(tmp_path)["regimes"]["lr"]["searches"]["search"]["paired"]
             if p["b"] == 2)["metrics"]["accuracy"]
    page = write_results(tmp_path / "results.md", study=tmp_path).read_text()
    row = next(line for line in page.splitlines() if line.startswith("| The merge beats θT (Table 2): merge − θT, "
                                                                       "accuracy | lr, T = 2, 2 seeds"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == f"[{d['ci_low']:+.3g}, {d['ci_high']:+.3g}]" and cells[4] == f"{d['p_value']:.2g} / 0.5"
    assert f"+0.25 [{d['ci_low']:+.3g}, {d['ci_high']:+.3g}] p={d['p_value']:.2g}, t p=0.5" in page
    rule = aggregate(tmp_path)["regimes"]["lr"]["searches"]["search"]["design"]["mde_rule"]
    assert f"the smallest accuracy difference held with power 0.8 is {rule['rule']:.3f}" in page


@pytest.mark.parametrize(
    ("low", "high", "direction", "expected"),
    [
        (0.01, 0.05, 1, "held"),
        (-0.05, -0.01, 1, "contradicted"),
        (-0.01, 0.05, 1, "not shown"),
        (-0.05, -0.01, -1, "held"),  # a claim that the difference is < 0
        (0.01, 0.05, -1, "contradicted"),
        (-0.0775, 0.023, -1, "not shown"),  # the interval holds 0 whichever side is claimed
    ],
)
def test_verdict_reads_the_interval_on_the_claimed_side(low, high, direction, expected):
    from itermerge.results import verdict

    assert verdict({"difference": (low + high) / 2, "ci_low": low, "ci_high": high}, direction) == expected
    assert verdict({"difference": 0.1, "ci_low": None, "ci_high": None}, direction) == "not measured"


def test_verdict_over_seeds_needs_the_t_interval_too():
    from itermerge.results import verdict

    narrow = {"difference": 0.05, "ci_low": 0.03, "ci_high": 0.07}  # the bootstrap over 2 seeds
    assert verdict({**narrow, "across_seeds": {"ci_low": -0.2, "ci_high": 0.3}}) == "not shown"
    assert verdict({**narrow, "across_seeds": {"ci_low": 0.01, "ci_high": 0.09}}) == "held"
    assert verdict({**narrow, "across_seeds": {"ci_low": None, "ci_high": None}}) == "held"  # one seed: no t interval
    assert verdict({**narrow, "across_seeds": {"ci_low": 0.01, "ci_high": 0.09}}, direction=-1) == "contradicted"


def test_the_demo_claims_read_the_studies_and_a_test_without_an_interval(tmp_path):
    from itermerge.results import write_results

    demo = tmp_path / "demo"
    demo.mkdir()
    stages = {"studies/alpha": {"correlations": {"r_theta_T": {"pearson_r": -0.315, "p_value": 0.61}}},
              "studies/lambda": {"reward_correlation": -0.953},
              "studies/ensemble": {"kl_ensemble_to_model_per_token": {"merged": 0.010, "theta_T": 0.0268}}}
    (demo / "manifest.json").write_text(json.dumps({"stages": stages}))
    page = write_results(tmp_path / "results.md", demo=demo).read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in page.splitlines() if "| demo, one seed |" in line}
    alpha = next(v for k, v in rows.items() if k.startswith("α extrapolation"))
    assert alpha[2] == "-0.315" and alpha[4] == "0.61" and alpha[7] == "not shown"  # p ≥ 0.05: no verdict either way
    trade = next(v for k, v in rows.items() if k.startswith("Two criteria"))
    assert trade[7] == "in the claimed direction (one run, no interval)"
    ensemble = next(v for k, v in rows.items() if k.startswith("The merge approximates"))
    assert ensemble[2] == "+0.0168" and ensemble[7].startswith("in the claimed direction")


def test_the_primary_endpoint_is_checked_against_the_study(tmp_path):
    """primary names a comparison, a measured metric, a searched T (iterations 3 or search.at's 2) and a regime."""
    path = tmp_path / "s.yaml"

    def load(primary, regimes=None):
        study = {**tiny_study(Path("theta0")), "primary": primary}
        study["regimes"] = regimes or study["regimes"]
        path.write_text(yaml.safe_dump(study))
        return load_study(path)

    got = load({"comparison": "merge - best_theta_on_dev", "metric": "accuracy", "T": 3}).primary
    assert got.to_dict() == {"comparison": "merge - best_theta_on_dev", "metric": "accuracy", "T": 3,
                             "regime": "lr-a"} and got.baseline == "best"
    assert load({"comparison": "merge-theta_T", "metric": "reward", "T": 2}).primary.baseline == 2
    path.write_text(yaml.safe_dump(tiny_study(Path("theta0"))))
    assert load_study(path).primary is None  # optional: the page then Holm-adjusts every comparison
    for primary, message in [
        ({"comparison": "merge - best", "metric": "accuracy", "T": 3},
         r"primary.comparison = 'merge - best'; choose one of merge - best_theta_on_dev, merge - theta_T"),
        ({"comparison": "merge - theta_T", "metric": "kl", "T": 3},
         r"primary.metric = 'kl' is not measured by the study's evaluators; choose one of accuracy, format, reward"),
        ({"comparison": "merge - theta_T", "metric": "accuracy", "T": 6},
         r"primary.T = 6; regime lr-a searches T = 3, 2 \(its iterations and search.at\)"),
        ({"comparison": "merge - theta_T", "metric": "accuracy", "T": 3, "regime": "lr-b"},
         r"primary.regime = 'lr-b' is not a regime of the study; choose one of lr-a"),
        ({"comparison": "merge - theta_T", "metric": "accuracy", "t": 3}, r"primary.t is not a key"),
        ("merge - theta_T", r"primary = 'merge - theta_T'; give a mapping"),
    ]:
        with pytest.raises(ItermergeError, match=message):
            load(primary)
    with pytest.raises(ItermergeError, match=r"primary names no regime and the study has 2; add primary.regime"):
        load({"comparison": "merge - theta_T", "metric": "accuracy", "T": 3}, {"a": {}, "b": {}})


def test_study_json_records_the_commit_and_versions_of_every_run(study_dir):
    """`replicate` wrote, beside each run, the commit and the torch/transformers/accelerate/numpy versions it ran
    with; study.json gathers them, and a resumed study that only skipped finished runs adds no entry."""
    from itermerge.provenance import PACKAGES, code_commit, package_versions

    meta = json.loads((study_dir / "study.json").read_text())
    here = {"commit": code_commit(), "versions": package_versions()}
    assert set(here["versions"]) == set(PACKAGES) and meta["commit"] == here["commit"] != ""
    assert meta["runs"] == {"lr-a/seed_0": [here], "lr-a/seed_1": [here]}
    assert meta["primary"] is None  # the tiny study declares none


def test_the_commit_is_unknown_outside_a_git_checkout(tmp_path):
    from itermerge.provenance import code_commit

    assert code_commit(tmp_path) == "unknown"


def test_a_secondary_claim_needs_its_holm_adjusted_p_values_too():
    """Both intervals above 0 say held; Holm-adjusted p's of 0.03 and 0.08 leave it not shown, 0.03 and 0.04 held."""
    from itermerge.claims import Claim, claim_verdict

    d = {"difference": 0.03, "ci_low": 0.01, "ci_high": 0.05, "p_value": 0.01,
         "across_seeds": {"ci_low": 0.01, "ci_high": 0.09, "p_value": 0.02}}
    assert claim_verdict(Claim("c", "w", d, key=("r", 3, "merged", "best", "accuracy"), primary=True)) == "held"
    late = Claim("c", "w", d, key=("r", 3, "merged", 3, "accuracy"), holm={"p_value": 0.03, "t_p_value": 0.08})
    assert claim_verdict(late) == "not shown after Holm (held unadjusted)"
    late.holm["t_p_value"] = 0.04
    assert claim_verdict(late) == "held"


def test_the_results_page_leads_with_the_primary_endpoint_and_holm_adjusts_the_rest(tmp_path):
    """The hand example (two seeds, four shared prompts) with ExPO = θ2 in both seeds and a declared primary endpoint
    merge − best θt on dev (θ1 = [0, 1, 0, 0]), accuracy, T = 2. Per-seed differences and their t-test on 1 df
    (Cauchy: p = 1 − 2·atan(t)/π): merge − best (0.5, 0.25), t = 0.375/0.125 = 3, p = 0.2048 (primary, unadjusted);
    θ2 − θ0 (0.25, 0.5), the same 0.2048; θ2 − θ1 (0, 0.25), merge − θ2 (0.5, 0), merge − uniform (0.25, 0): t = 1,
    p = 0.5. ExPO is θ2 in every seed, so its comparison is left out: Holm runs over 4 t-test p's, and θ2 − θ0's
    0.2048 becomes 4 × 0.2048 = 0.82 (the others min(1, 3 × 0.5) = 1)."""
    import math

    from itermerge.results import write_results

    base = {0: [0, 0, 0, 0], 1: [0, 1, 0, 0], "best": [0, 1, 0, 0], "uniform": [0, 1, 1, 0]}
    for seed, (theta2, merged) in enumerate((([1, 0, 0, 0], [1, 1, 1, 0]), ([1, 1, 0, 0], [1, 1, 0, 0]))):
        d = _fake_search(tmp_path, seed, {**base, 2: theta2, "expo": theta2, "merged": merged})
        test = json.loads((d / "test.json").read_text())
        next(m for m in test["models"] if m["t"] == "expo")["same_as"] = 2
        (d / "test.json").write_text(json.dumps(test))
    here = {"commit": "0123abc", "versions": {"torch": "2.13.0", "transformers": "5.25.0", "accelerate": "1.16.0",
                                              "numpy": "2.4.6"}}
    run = {"iterations": 2, "model": {"path": "smollm2-135m-instruct"}, "scorer": {"type": "verifier",
           "function": "itermerge.tasks.arithmetic:score"}, "search": {"rule": {"reward": "reward",
           "capability": ["accuracy"]}}, "prompts": {"task": "arithmetic", "per_iteration": 32, "dev": 64, "test": 4}}
    (tmp_path / "study.json").write_text(json.dumps({
        "run": run, "regimes": {"lr": {}}, "commit": "0123abc", "runs": {"lr/seed_0": [here], "lr/seed_1": [here]},
        "primary": {"comparison": "merge - best_theta_on_dev", "metric": "accuracy", "T": 2, "regime": "lr"}}))
    aggregate(tmp_path)
    page = write_results(tmp_path / "results.md", study=tmp_path).read_text()
    p = 1 - 2 * math.atan(3) / math.pi
    assert f"{p:.4f}" == "0.2048"
    answer = page.split("## The answer\n", 1)[1]
    assert answer.lstrip().startswith("**Primary endpoint** (declared in the study file before the runs): The merge "
                                      "beats early stopping: merge − best θt on dev, accuracy, lr, T = 2, 2 seeds: "
                                      "+0.375")
    assert f"t-test over seeds p = {p:.2g}, unadjusted" in answer.split("\n\n")[0]
    # power of the primary endpoint: two seeds 0.25 apart have sd 0.25/√2 = 0.177; a t test on 1 df needs ~11.5 sd
    assert ("With the seeds' observed spread (sd 0.177) this design holds a difference of 2." in answer
            and "the paper's size of effect, 0.025, is below what it can see (more seeds or test prompts" in answer)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in page.splitlines() if "| lr, T = 2, 2 seeds |" in line}
    primary = next(v for k, v in rows.items() if k.startswith("**Primary endpoint:**"))
    assert primary[4].endswith(f"/ {p:.2g}") and primary[5] == "primary endpoint: unadjusted"
    alg1 = rows["Iterative DPO improves on θ0 (Alg. 1): θT − θ0, accuracy"]
    assert alg1[4].endswith(f"/ {p:.2g}") and alg1[5].endswith(f"/ {4 * p:.2g}") and f"{4 * p:.2g}" == "0.82"
    assert rows["The merge beats θT (Table 2): merge − θT, accuracy"][5].endswith("/ 1")
    assert not any("ExPO" in k for k in rows)  # = θT in every seed: no claim of its own
    paper, ours = page.split("### The paper's claims", 1)[1].split("### Ours", 1)
    assert "Table 2" in paper and "Alg. 1" in paper and "best θt on dev" not in paper.split("|", 1)[1]
    assert "**Primary endpoint:** The merge beats early stopping" in ours and "the uniform average, accuracy" in ours
    assert page.index("**Primary endpoint**") < page.index("| regime, T, seeds |") < page.index("## The claims")
    assert ("| lr, T = 2, 2 seeds | +0.375 / n/a: not shown / not measured | +0.125 / n/a: not shown / not measured "
            "| +0.250 / n/a: not shown / not measured | = θT |") in page  # merge − best, uniform, θ2; ExPO is θ2
    assert "Code commit: 0123abc (all 2 runs). Packages: torch 2.13.0, transformers 5.25.0, accelerate 1.16.0, " \
           "numpy 2.4.6 (all 2 runs)." in page
    limits = page.split("## Limitations\n", 1)[1].split("\n## ", 1)[0]
    assert "`smollm2-135m-instruct`" in limits and "one task, `arithmetic`" in limits
    assert "Prompts per iteration: 32" in limits and "Dev size: 64 dev prompts" in limits
    assert "Judge = capability" in limits and "`itermerge.tasks.arithmetic:score`" in limits


def test_another_tasks_study_gets_a_section_of_its_own_with_every_test_axis(tmp_path):
    """A study of another task (--task-study): its own design, answer and claims (a Holm family of its own), and each
    search's table with the test-only axes beside accuracy; the main study's page is unchanged by it."""
    from itermerge.cli import main

    base = {0: [0, 0, 0, 0], 1: [0, 1, 0, 0], "best": [0, 1, 0, 0], "expo": [1, 0, 1, 0], "uniform": [0, 1, 1, 0]}
    for seed, merged in ((0, [1, 1, 1, 0]), (1, [1, 1, 0, 0])):
        d = _fake_search(tmp_path / "task", seed, {**base, 2: [1, 0, 0, 0], "merged": merged})
        test = json.loads((d / "test.json").read_text())
        for m in test["models"]:  # the axis: merged loses one arithmetic prompt of four against every other row
            items = [1.0, 1.0, 0.0, 0.0] if m["t"] == "merged" else [1.0, 1.0, 1.0, 0.0]
            m["metrics"]["arith/accuracy"] = {"value": sum(items) / 4, "stderr": 0.25, "n": 4, "items": items}
        (d / "test.json").write_text(json.dumps(test))
    agg = aggregate(tmp_path / "task")
    search = agg["regimes"]["lr"]["searches"]["search"]
    theta_T = next(p for p in search["paired"] if p["b"] == 2)["metrics"]
    assert theta_T["arith/accuracy"]["difference"] == pytest.approx(-0.25)
    out = tmp_path / "results.md"
    assert main(["results", "--task-study", str(tmp_path / "task"), "--out", str(out)]) == 0
    page = out.read_text()
    assert f"## Another task: the study `{tmp_path / 'task'}`" in page and "### Its claims" in page
    assert "| lr, T = 2, 2 seeds |" in page  # its answer
    table = next(line for line in page.splitlines() if line.startswith("| model | accuracy (mean over seeds"))
    assert "arith/accuracy (mean over seeds, 95% CI)" in table
    lines = page.splitlines()
    merged_row = next(line for line in lines if line.startswith("| Merged"))
    assert merged_row.endswith("| 0.5 [+0.5, +0.5] |")  # its arith/accuracy in both seeds; every other row 0.75
    assert next(line for line in lines if line.startswith("| Iter 2 | 0.25")).endswith("| 0.75 [+0.75, +0.75] |")
    minus_T = next(line for line in lines if line.startswith("| Iter 2 | +"))  # merge − θT, paired, per metric
    assert minus_T.split("|")[2].strip().startswith(f"{theta_T['accuracy']['difference']:+.3g} [")
    assert minus_T.split("|")[3].strip().startswith("-0.25 [")


def test_pruned_checkpoints_keep_the_records_and_a_rerun_skips_the_run(study_dir, tmp_path):
    import shutil

    from itermerge.pruning import pruned

    out = tmp_path / "out"
    shutil.copytree(study_dir / "lr-a" / "seed_0", out / "lr-a" / "seed_0")  # a finished run, weights and all
    study = load_study(study_dir.parent / "study.yaml", seeds=[0])
    records = {p: p.read_bytes() for p in (out / "lr-a" / "seed_0").glob("search*/*.json")}
    weights = sorted(out.glob("lr-a/seed_0/**/*.safetensors"))
    assert len(weights) == 4  # θ1..θ3 and the merge
    size = sum(p.stat().st_size for p in weights)

    replicate(study, out, prune_checkpoints=True)
    run = out / "lr-a" / "seed_0"
    record = json.loads((run / "pruned.json").read_text())
    assert record["files"] == sorted(str(p.relative_to(run)) for p in weights) and record["bytes"] == size
    assert not any(p.exists() for p in weights)
    assert {p: p.read_bytes() for p in run.glob("search*/*.json")} == records  # the records the study reads stay
    agg = json.loads((out / "aggregate.json").read_text())
    assert agg["regimes"]["lr-a"]["searches"]["search"]["seeds"] == [0]

    replicate(study, out, prune_checkpoints=True)  # skipped: nothing to redo without weights, nothing redone
    assert {p: p.read_bytes() for p in run.glob("search*/*.json")} == records

    weights[0].write_bytes(b"left by a crash midway")  # pruned.json is written before any file goes
    config = study.configs()["lr-a"][0]
    assert pruned(run, config) and not weights[0].exists()

    older = json.loads((run / "pruned.json").read_text())  # made before dpo.reference existed: it reads as its default
    assert older["config"]["dpo"].pop("reference") == "fixed"
    (run / "pruned.json").write_text(json.dumps(older))
    assert pruned(run, config)

    changed = tiny_study(Path("theta0"))
    changed["run"]["model"]["path"] = json.loads((run / "pruned.json").read_text())["config"]["model"]["path"]
    changed["run"]["dpo"]["learning_rate"] = 2e-3
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    with pytest.raises(ItermergeError, match=r"seed_0: its weights were pruned \(pruned\.json\) and this study asks "
                                             r"for a different dpo section; .*delete .*seed_0 to run it again"):
        replicate(load_study(tmp_path / "changed.yaml", seeds=[0]), out, prune_checkpoints=True)
