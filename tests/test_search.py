"""The (λ, α) search: grid, Pareto frontier and the selection rule by hand, resume, refusal of test, finalize."""

from __future__ import annotations

import json
import math

import pytest

from itermerge.checkpoint import CheckpointReader
from itermerge.config.evaluation import EvalConfig, KLConfig, PromptSource
from itermerge.config.search import SearchConfig, SelectionRule
from itermerge.errors import ItermergeError
from itermerge.evaluation import Metric
from itermerge.maths.merge import merge_weights
from itermerge.records import read_records
from itermerge.search.context import SearchContext
from itermerge.search.driver import search
from itermerge.search.grid import grid
from itermerge.search.selection import pareto_frontier, select_checkpoint, select_point

pytestmark = pytest.mark.numeric  # run again under a second kernel set: make test, ATEN_CPU_CAPABILITY=avx2

# --- pure parts -------------------------------------------------------------------------------------


def test_grid_starts_at_theta_T_without_duplicates():
    assert grid([0.0, 0.5], [0.0, 0.4]) == [(0.0, 0.0), (0.0, 0.4), (0.5, 0.0), (0.5, 0.4)]
    assert grid([0.3], [0.4])[0] == (0.0, 0.0)


def test_uniform_in_the_lams_is_the_uniform_average_of_each_T():
    """λ = uniform is (T−1)/T: T = 3 gives k = ((1+0)·(2/3)/2, ·, (1)(1/3)) = (1/3, 1/3, 1/3), the uniform average;
    T = 6 gives 5/6 and k_t = 1/6 each; λ = 1 is θ̄ alone, k = (1/2, 1/2, 0) at T = 3; T = 2 makes uniform 0.5,
    one point with an explicit 0.5. The CLI takes the token too."""
    from itermerge.cli import build_parser
    from itermerge.config.search import resolve_lams
    from itermerge.search.grid import search_grid as _grid

    cfg = SearchConfig(lams=(0.0, "uniform", 1.0), alphas=(0.0, 0.5))
    assert cfg.lams == (0.0, "uniform", 1.0) and resolve_lams(cfg.lams, 3) == [0.0, 2 / 3, 1.0]
    assert _grid(3, cfg) == [(0.0, 0.0), (0.0, 0.5), (2 / 3, 0.0), (2 / 3, 0.5), (1.0, 0.0), (1.0, 0.5)]
    assert _grid(6, cfg)[2] == (5 / 6, 0.0) and _grid(1, cfg) == [(0.0, 0.0), (0.0, 0.5)]
    assert merge_weights(3, 2 / 3, 0.0) == pytest.approx([1 / 3] * 3)
    assert merge_weights(6, 5 / 6, 0.0) == pytest.approx([1 / 6] * 6)
    assert merge_weights(3, 1.0, 0.0) == pytest.approx([0.5, 0.5, 0.0])
    assert _grid(2, SearchConfig(lams=(0.5, "uniform"), alphas=(0.0,))) == [(0.0, 0.0), (0.5, 0.0)]
    args = build_parser().parse_args(["search", "run", "--lams", "0,uniform,1"])
    assert args.lams == [0.0, "uniform", 1.0]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["search", "run", "--lams", "0,half"])


def _pt(lam, alpha, reward, acc, kl=0.0):
    m = lambda v: {"value": v, "stderr": 0.01, "n": 100}  # noqa: E731
    return {"lam": lam, "alpha": alpha, "metrics": {"reward": m(reward), "accuracy": m(acc), "kl": m(kl)}}


def test_pareto_frontier_by_hand():
    # (capability, reward): (1, 1), (2, 0), (0, 2) are not beaten on both axes; (1, 0.5) is beaten by (1, 1).
    points = [_pt(0, 0, 1.0, 1.0), _pt(0, 1, 0.0, 2.0), _pt(1, 0, 2.0, 0.0), _pt(1, 1, 0.5, 1.0)]
    assert pareto_frontier(points, "reward", "accuracy") == [2, 0, 1]
    # KL is lower-is-better. (kl, reward) = (3, 1), (1, 0), (2, 2), (1, 0.5): (2, 2) beats (3, 1), (1, 0.5) beats
    # (1, 0); the frontier, from worst to best KL, is (2, 2) then (1, 0.5).
    for p, kl in zip(points, (3.0, 1.0, 2.0, 1.0)):
        p["metrics"]["kl"]["value"] = kl
    assert pareto_frontier(points, "reward", "kl") == [2, 3]


def test_selection_rule_on_hand_made_points():
    base = _pt(0.0, 0.0, reward=0.50, acc=0.60)
    points = [
        base,
        _pt(0.3, 0.4, reward=0.70, acc=0.61),  # more reward, capability kept: the paper's kind of pick
        _pt(0.0, 1.0, reward=0.90, acc=0.55),  # most reward but capability lost
        _pt(0.5, 0.2, reward=0.65, acc=0.60),
    ]
    choice = select_point(points, base, SelectionRule())
    assert (choice["lam"], choice["alpha"]) == (0.3, 0.4)
    assert "accuracy 0.55 < θT's 0.6" in choice["reason"] and "λ=0, α=1" in choice["reason"]
    assert choice["reward_gain"]["value"] == pytest.approx(0.2)
    assert choice["excluded"] == [{"lam": 0.0, "alpha": 1.0, "why": ["accuracy 0.55 < θT's 0.6 − 0"]}]
    # a tolerance of 0.05 admits the extrapolated point
    assert select_point(points, base, SelectionRule(tolerance=0.05))["alpha"] == 1.0
    # with KL as the capability axis (lower is better) only θT (kl 1.0) and points at or below it qualify
    for p, kl in zip(points, (1.0, 1.5, 0.9, 1.2)):
        p["metrics"]["kl"]["value"] = kl
    assert select_point(points, base, SelectionRule(capability=("kl",)))["alpha"] == 1.0
    # equal rewards: the point nearer θT wins
    tie = [base, _pt(0.2, 0.4, 0.7, 0.6), _pt(0.1, 0.2, 0.7, 0.6)]
    assert (select_point(tie, base, SelectionRule())["lam"]) == 0.1


def _ckpt(t, reward, acc):
    m = lambda v: {"value": v, "stderr": 0.01, "n": 100}  # noqa: E731
    return {"t": t, "name": f"θ{t}", "metrics": {"reward": m(reward), "accuracy": m(acc)}}


def test_best_checkpoint_on_dev_by_the_merge_rule_on_a_hand_made_table():
    """θ0..θ4 on dev, (reward, accuracy): θ0 (0.9, 0.50) · θ1 (0.2, 0.30) · θ2 (0.6, 0.33) · θ3 (0.8, 0.31) · θ4 (0.5,
    0.32). θ4 = θT sets the accuracy floor 0.32: θ1 (0.30) and θ3 (0.31) fall below it, θ2 (0.33) and θ4 keep it,
    so the rule picks θ2, reward 0.6, over θ4's 0.5; θ3's higher reward does not count, and θ0 is no candidate
    (its reward 0.9 would otherwise win). With tolerance 0.01 θ3 (0.31 = 0.32 − 0.01) is eligible and wins with 0.8;
    with no capability metric, the highest reward of θ1..θ4 is θ3's. A tie in reward goes to the later θt."""
    table = [_ckpt(0, 0.9, 0.50), _ckpt(1, 0.2, 0.30), _ckpt(2, 0.6, 0.33), _ckpt(3, 0.8, 0.31), _ckpt(4, 0.5, 0.32)]
    best = select_checkpoint(table, SelectionRule())
    assert best["t"] == 2 and best["name"] == "θ2"
    assert best["eligible"] == [2, 4] and [e["t"] for e in best["excluded"]] == [1, 3]
    assert "accuracy 0.31 < θT's 0.32" in best["excluded"][1]["why"][0]
    assert best["chosen"]["metrics"]["reward"]["value"] == 0.6
    assert select_checkpoint(table, SelectionRule(tolerance=0.01))["t"] == 3
    assert select_checkpoint(table, SelectionRule(capability=()))["t"] == 3
    tie = [_ckpt(1, 0.7, 0.4), _ckpt(2, 0.7, 0.4), _ckpt(3, 0.5, 0.4)]
    assert select_checkpoint(tie, SelectionRule())["t"] == 2
    assert select_checkpoint([_ckpt(0, 0.9, 0.5), _ckpt(1, 0.1, 0.1)], SelectionRule())["t"] == 1  # θT alone
    with pytest.raises(ItermergeError, match="no θt"):
        select_checkpoint([_ckpt(0, 0.9, 0.5)], SelectionRule())


def test_reward_gain_is_paired_when_the_points_keep_their_prompts():
    """Same 5 prompts: d = chosen − θT = [.1, .1, .2, .1, 0], mean 0.1, sd(d) = √(0.02 / 4), se = sd / √5 ≈ 0.0316,
    a third of the unpaired √(se_a² + se_b²) ≈ 0.1; the bootstrap interval of mean(d) lies within [0, 0.2]."""
    base_items = [0.1, 0.2, 0.3, 0.4, 0.5]
    d = [0.1, 0.1, 0.2, 0.1, 0.0]
    top_items = [b + x for b, x in zip(base_items, d)]
    base, top = _pt(0.0, 0.0, 0.3, 0.6), _pt(0.3, 0.4, 0.4, 0.6)
    base["metrics"]["reward"] = Metric(0.3, 0.0707, 5, tuple(base_items)).to_dict()
    top["metrics"]["reward"] = Metric(0.4, 0.0707, 5, tuple(top_items)).to_dict()
    gain = select_point([base, top], base, SelectionRule())["reward_gain"]
    assert gain["paired"] is True and gain["n"] == 5
    assert gain["value"] == pytest.approx(0.1)
    assert gain["stderr"] == pytest.approx(math.sqrt(0.02 / 4) / math.sqrt(5))
    assert 0.0 <= gain["ci_low"] < 0.1 < gain["ci_high"] <= 0.2 and gain["method"] == "bootstrap"
    # without per-prompt values: the unpaired difference, flagged as such
    base["metrics"]["reward"].pop("items"), top["metrics"]["reward"].pop("items")
    gain = select_point([base, top], base, SelectionRule())["reward_gain"]
    assert gain["paired"] is False and gain["stderr"] == pytest.approx(math.hypot(0.0707, 0.0707))


def test_search_refuses_test_split(tiny_ckpts, tmp_path):
    with pytest.raises(ItermergeError, match="refuses split 'test'"):
        _search(tmp_path / "s", tiny_ckpts, EvalConfig(), SearchConfig(split="test"))
    assert not (tmp_path / "s").exists()


# --- the search on tiny checkpoints with a linear evaluator ------------------------------------------------
# reward(θ) = Σ of one tensor, accuracy(θ) = Σ of another: both linear in θ, so every point's value is
# predicted by eq. (9)-(10) from the checkpoints' values alone: L(θ) = L(θ0) + Σ_t k_t (L(θt) − L(θ0)).

R_TENSOR, A_TENSOR = "model.norm.weight", "model.layers.0.mlp.down_proj.weight"


class LinearEvaluator:
    def __init__(self):
        self.calls = 0

    def __call__(self, model, timings):
        self.calls += 1
        params = dict(model.named_parameters())
        value = lambda name: float(params[name].detach().double().sum())  # noqa: E731
        return {"reward": Metric(value(R_TENSOR), 0.0, 1), "accuracy": Metric(value(A_TENSOR), 0.0, 1)}


def _search(out, ckpts, evc, cfg, *, ev=None, test=False, **kw):
    """The search driver (the pipeline's) on one process in ``out``'s parent, ``ev`` evaluating dev and test."""
    evaluators = {} if ev is None else {"dev": ev, "test": ev}
    return search(SearchContext(out, ckpts[0], ckpts[1:], evc, cfg, evaluators=evaluators, progress=False, **kw),
                  test=test)


def _linear(ckpts, name, k):
    vals = [float(CheckpointReader(p).get(name).double().sum()) for p in ckpts]
    return vals[0] + sum(kt * (v - vals[0]) for kt, v in zip(k, vals[1:]))


def test_search_end_to_end_on_a_3x3_grid(tiny_ckpts, tmp_path):
    cfg = SearchConfig(lams=(0.0, 0.3, 0.6), alphas=(0.0, 0.4, 1.0))
    ev, out = LinearEvaluator(), tmp_path / "search"
    choice = _search(out, tiny_ckpts, EvalConfig(), cfg, mean_cache=tmp_path / "mean", ev=ev)
    points = read_records(out / "points.jsonl")
    assert (points[0]["lam"], points[0]["alpha"]) == (0.0, 0.0)
    assert len(points) == 9 and ev.calls == 9 + 3  # the grid, then θ0, θ1, θ2 (θ3 is the (0, 0) point)
    for p in points:
        k = merge_weights(3, p["lam"], p["alpha"])
        assert p["weights"] == pytest.approx(k)
        assert p["metrics"]["reward"]["value"] == pytest.approx(_linear(tiny_ckpts, R_TENSOR, k), rel=1e-5, abs=1e-4)
        assert p["metrics"]["accuracy"]["value"] == pytest.approx(_linear(tiny_ckpts, A_TENSOR, k), rel=1e-5, abs=1e-4)
        assert set(p["seconds"]) >= {"merge", "eval"}
    ckpts = read_records(out / "checkpoints.jsonl")
    assert sorted(c["t"] for c in ckpts) == [0, 1, 2, 3]
    theta1 = next(c for c in ckpts if c["t"] == 1)
    assert theta1["metrics"]["reward"]["value"] == pytest.approx(_linear(tiny_ckpts, R_TENSOR, [1, 0, 0]), abs=1e-4)
    # the choice is the rule applied to what points.jsonl holds
    base = next(p for p in points if (p["lam"], p["alpha"]) == (0.0, 0.0))
    expected = select_point(points, base, SelectionRule())
    assert (choice["lam"], choice["alpha"]) == (expected["lam"], expected["alpha"])
    assert json.loads((out / "choice.json").read_text())["lam"] == choice["lam"]

    # a rerun evaluates nothing; a torn last line (crash mid-append) is cut off and only that point redone
    _search(out, tiny_ckpts, EvalConfig(), cfg, mean_cache=tmp_path / "mean", ev=ev)
    assert ev.calls == 12
    lines = (out / "points.jsonl").read_text().splitlines(keepends=True)
    (out / "points.jsonl").write_text("".join(lines[:-1]) + lines[-1][:25])
    _search(out, tiny_ckpts, EvalConfig(), cfg, mean_cache=tmp_path / "mean", ev=ev)
    assert ev.calls == 13 and len(read_records(out / "points.jsonl")) == 9
    # a wider grid evaluates only the new points; another evaluator config redoes everything
    wider = SearchConfig(lams=cfg.lams, alphas=(*cfg.alphas, 1.5))
    _search(out, tiny_ckpts, EvalConfig(), wider, mean_cache=tmp_path / "mean", ev=ev)
    assert ev.calls == 16
    other = EvalConfig(prompts=PromptSource(n=7))
    _search(out, tiny_ckpts, other, cfg, mean_cache=tmp_path / "mean", ev=ev)
    assert ev.calls == 16 + 12


def test_finalize_writes_the_chosen_merge_and_tests_it_once_beside_the_baselines(tiny_ckpts, tmp_path):
    cfg = SearchConfig(lams=(0.0, 0.5), alphas=(0.0, 0.5))
    ev, out = LinearEvaluator(), tmp_path / "search"
    kw = dict(mean_cache=tmp_path / "mean", merged_dir=tmp_path / "merged", ev=ev)
    choice = _search(out, tiny_ckpts, EvalConfig(), cfg, **kw)
    calls = ev.calls
    _search(out, tiny_ckpts, EvalConfig(), cfg, test=True, **kw)
    record = json.loads((out / "test.json").read_text())
    rows = {m["t"]: m for m in record["models"]}
    assert list(rows) == [0, 1, 2, 3, "best", "expo", "uniform", "merged"]
    best = choice["best_checkpoint"]["t"]  # the best θt on dev is that θt's weights, its numbers not measured again
    assert rows["best"]["same_as"] == best and rows["best"]["metrics"] == rows[best]["metrics"]
    # ExPO is the rule's pick on the λ = 0 line: θ0 + (1+α)(θ3 − θ0); the uniform average is (θ1 + θ2 + θ3) / 3
    a = choice["expo"]["alpha"]
    assert choice["expo"]["lam"] == 0.0 and a in cfg.alphas
    assert rows["expo"]["weights"] == pytest.approx([-a, 0.0, 0.0, 1 + a])
    assert rows["uniform"]["weights"] == pytest.approx([0.0, 1 / 3, 1 / 3, 1 / 3])
    assert rows["merged"]["weights"] == pytest.approx([-choice["alpha"], *merge_weights(3, choice["lam"],
                                                                                         choice["alpha"])])
    for t in (1, 2, 3):
        assert rows[t]["weights"] == [float(i == t) for i in range(4)]
    # every row's numbers are its weights' (the evaluator is linear in θ): the merged model on disk included
    for m in rows.values():
        assert m["metrics"]["reward"]["value"] == pytest.approx(_linear(tiny_ckpts, R_TENSOR, m["weights"][1:]),
                                                                rel=1e-5, abs=1e-4)
    # a row equal to an earlier one is not evaluated again, and says whose numbers it carries
    distinct = {tuple(round(w, 9) for w in m["weights"]) for m in rows.values()}
    assert ev.calls == calls + len(distinct)
    assert all(rows[m["same_as"]]["metrics"] == m["metrics"] for m in rows.values() if m.get("same_as") is not None)
    merge_meta = json.loads((tmp_path / "merged" / "merge.json").read_text())
    assert (merge_meta["lam"], merge_meta["alpha"]) == (choice["lam"], choice["alpha"])
    # the merge against every other row, paired (n = 1 here: no interval)
    assert [p["b"] for p in record["paired"]] == [0, 1, 2, 3, "best", "expo", "uniform"]
    _search(out, tiny_ckpts, EvalConfig(), cfg, test=True, **kw)
    assert ev.calls == calls + len(distinct)  # test numbers are measured once


def _dev(reward, acc):
    return {"reward": {"value": reward, "stderr": 0.01, "n": 4}, "accuracy": {"value": acc, "stderr": 0.01, "n": 4}}


def _acc(items):
    return {"accuracy": {"value": sum(items) / len(items), "stderr": 0.1, "n": len(items), "items": items}}


def test_best_theta_on_dev_is_a_test_row_and_the_merge_is_paired_against_it(tmp_path):
    """Dev by hand, (reward, accuracy): θ0 (0.9, 0.50), θ1 (0.2, 0.30), θ2 (0.6, 0.33), θT = θ3 = the (0, 0) point
    (0.5, 0.32); points (0, 0.5) (0.4, 0.35) and (0.5, 0) (0.7, 0.33). The rule keeps accuracy ≥ 0.32: the merge is
    (0.5, 0) (reward 0.7); ExPO on the λ = 0 line is α = 0 (0.5 > 0.4), i.e. θT; the best θt is θ2 (θ1 falls below
    0.32, θ0 is no candidate). On 4 test prompts θ2 scores [1, 1, 0, 0] and the merge [1, 1, 1, 0]: merge − best θt
    on dev = +0.25, one discordant prompt (exact McNemar p = 1), the same as merge − θ2; the row is θ2's, unmeasured."""
    from itermerge.report import _test_table
    from itermerge.search.finalize import write_test
    from itermerge.search.points import choose

    out, ev, cfg = tmp_path / "search", EvalConfig(), SearchConfig(lams=(0.0, 0.5), alphas=(0.0, 0.5))
    out.mkdir()
    stamp = {"split": "dev", "eval_fingerprint": ev.fingerprint()}
    ckpts = [tmp_path / f"theta{t}" for t in (1, 2, 3)]
    (out / "checkpoints.jsonl").write_text("".join(
        json.dumps({"t": t, "name": f"Iter {t}", "path": str(tmp_path / f"theta{t}"), **stamp, "metrics": _dev(*m)})
        + "\n" for t, m in ((0, (0.9, 0.50)), (1, (0.2, 0.30)), (2, (0.6, 0.33)))))
    (out / "points.jsonl").write_text("".join(
        json.dumps({"lam": lam, "alpha": a, **stamp, "metrics": _dev(*m), "seconds": {}}) + "\n"
        for lam, a, m in ((0.0, 0.0, (0.5, 0.32)), (0.0, 0.5, (0.4, 0.35)), (0.5, 0.0, (0.7, 0.33)))))
    ctx = SearchContext(out, tmp_path / "theta0", ckpts, ev, cfg)
    choice = choose(ctx)
    assert (choice["lam"], choice["alpha"], choice["expo"]["alpha"]) == (0.5, 0.0, 0.0)
    best = json.loads((out / "choice.json").read_text())["best_checkpoint"]
    assert best["t"] == 2 and best["eligible"] == [2, 3] and best["excluded"][0]["t"] == 1
    assert best["reason"].startswith("highest reward (0.6")
    measured = {0: [0, 0, 0, 0], 1: [0, 1, 0, 0], 2: [1, 1, 0, 0], 3: [1, 0, 0, 0], "uniform": [0, 1, 1, 0],
                "merged": [1, 1, 1, 0]}
    parts = [[{"t": t, "name": str(t), "metrics": _acc(items), "seconds": {}} for t, items in measured.items()]]
    record = write_test(ctx, parts)
    rows = {m["t"]: m for m in record["models"]}
    assert list(rows) == [0, 1, 2, 3, "best", "expo", "uniform", "merged"]
    assert rows["best"]["name"] == "Best θt on dev (Iter 2)" and rows["best"]["same_as"] == 2
    assert rows["best"]["metrics"] == rows[2]["metrics"] and rows["expo"]["same_as"] == 3
    vs = {p["b"]: p["metrics"]["accuracy"] for p in record["paired"]}
    assert vs["best"]["difference"] == 0.25 and (vs["best"]["a_only"], vs["best"]["b_only"]) == (1, 0)
    assert vs["best"]["p_value"] == pytest.approx(1.0) and vs["best"] == vs[2]
    table = _test_table(record)  # the report: ExPO is θT here, so its rows say so instead of repeating θT's numbers
    assert "| ExPO (λ=0, α=0) | = θT |" in table and "| ExPO (λ=0, α=0) | = merge − θT |" in table
    assert "| Best θt on dev (Iter 2) | 0.5 ± 0.1 |" in table and "| Best θt on dev (Iter 2) | +0.25 [" in table


def test_search_with_the_real_evaluators(tiny_ckpts, tmp_path):
    """Greedy accuracy, reward and KL through the HF sampler on a 2×2 grid; θ0's KL to itself is exactly 0."""
    evc = EvalConfig(prompts=PromptSource(n=3), max_new_tokens=4, kl=KLConfig(samples=1))
    choice = _search(tmp_path / "s", tiny_ckpts, evc, SearchConfig(lams=(0.0, 0.5), alphas=(0.0, 0.5)),
                     mean_cache=tmp_path / "mean")
    points = read_records(tmp_path / "s" / "points.jsonl")
    assert len(points) == 4 and set(points[0]["metrics"]) == {"accuracy", "format", "reward", "kl"}
    assert all(p["metrics"]["reward"]["n"] == 3 for p in points)
    theta0 = next(c for c in read_records(tmp_path / "s" / "checkpoints.jsonl") if c["t"] == 0)
    assert theta0["metrics"]["kl"] == {"value": 0.0, "stderr": 0.0, "n": 3, "items": [0.0, 0.0, 0.0]}
    assert {"generate_s", "kl_s"} <= set(points[0]["seconds"])
    assert choice["eval_fingerprint"] == evc.fingerprint()
    assert any(p["metrics"]["kl"]["value"] != 0.0 for p in points)
