"""The (λ, α) search within a budget (successive halving): schedule by hand, the same choice as the grid for a
third of its prompt-evaluations, prompt ranges pieced together, resume, rounds as stages, named errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from itermerge.checkpoint import load_model, load_tokenizer
from itermerge.config import from_dict
from itermerge.config.evaluation import EvalConfig, LmEvalConfig, PromptSource
from itermerge.config.parse import build
from itermerge.config.search import (
    DEFAULT_ALPHAS,
    DEFAULT_LAMS,
    HALVING_ALPHAS,
    HALVING_LAMS,
    HalvingConfig,
    SearchConfig,
)
from itermerge.errors import ItermergeError
from itermerge.evaluation import Evaluator, mean_metric
from itermerge.merging import MergeBasis
from itermerge.records import read_records
from itermerge.search.budget import Round, covered, dev_size, schedule
from itermerge.search.context import SearchContext
from itermerge.search.driver import search

pytestmark = pytest.mark.numeric  # run again under a second kernel set: make test, ATEN_CPU_CAPABILITY=avx2

R_TENSOR, A_TENSOR = "model.norm.weight", "model.layers.0.mlp.down_proj.weight"


class PromptLinearEvaluator:
    """Reward on prompt i = R(θ) + c_i, accuracy on prompt i = A(θ) + d_i: R and A are sums of one tensor each
    (linear in θ, as test_search.py's LinearEvaluator), c_i and d_i a difficulty per prompt that every model shares.
    So every prefix of the prompts ranks the points as the whole split does: successive halving must find the
    grid's choice. ``evaluated`` lists the prompt range of every call."""

    def __init__(self, n: int):
        self.prompts = list(range(n))
        self.evaluated: list[tuple[int, int]] = []

    def subset(self, start: int, stop: int):
        def evaluate(model, timings):
            self.evaluated.append((start, stop))
            params = dict(model.named_parameters())
            r, a = (float(params[name].detach().double().sum()) for name in (R_TENSOR, A_TENSOR))
            return {"reward": mean_metric([r + (i * 37 % 11) / 10 for i in range(start, stop)]),
                    "accuracy": mean_metric([a + (i * 13 % 7) / 10 for i in range(start, stop)])}
        return evaluate

    def __call__(self, model, timings):  # the whole split, as ``Evaluator`` measures one model
        return self.subset(0, len(self.prompts))(model, timings)

    def prompt_evaluations(self) -> int:
        return sum(stop - start for start, stop in self.evaluated)


N, T = 81, 3  # dev prompts; θ1..θ3
HALVING = SearchConfig(method="halving", halving=HalvingConfig(eta=3, min_prompts=9))
GRID = SearchConfig(lams=HALVING.lams, alphas=HALVING.alphas)  # the same 7 × 7 grid, every point on every prompt


def test_schedule_by_hand():
    # 80 prompts, 48 points: 8 prompts keep ⌈48/3⌉ = 16; 24 keep 6; 72 keep 2; the 2 finalists get all 80
    assert schedule(80, 48, HalvingConfig()) == [Round(8, 16), Round(24, 6), Round(72, 2), Round(80, 0)]
    # 81 prompts, first round 9: 48·9 + 16·18 + 6·54 = 1044 prompt-evaluations, θT's 81 aside
    assert schedule(N, 48, HALVING.halving) == [Round(9, 16), Round(27, 6), Round(81, 0)]
    # once one point is left it goes straight to every prompt; a first round of all prompts is the grid
    assert schedule(100, 4, HalvingConfig(eta=4, min_prompts=5)) == [Round(5, 1), Round(100, 0)]
    assert schedule(6, 48, HalvingConfig(min_prompts=6)) == [Round(6, 0)]
    assert schedule(80, 1, HalvingConfig()) == [Round(80, 0)]


def test_halving_defaults_to_a_finer_grid_and_the_grid_is_unchanged():
    assert (SearchConfig().lams, SearchConfig().alphas) == (DEFAULT_LAMS, DEFAULT_ALPHAS)
    assert (HALVING.lams, HALVING.alphas) == (HALVING_LAMS, HALVING_ALPHAS) and len(HALVING_LAMS) == 7 == len(
        HALVING_ALPHAS)
    assert SearchConfig(method="halving", lams=(0.0, 0.3)).lams == (0.0, 0.3)


def test_covered_pieces_prompt_ranges_together():
    rec = lambda start, stop: {"lam": 0.3, "alpha": 0.4, "start": start, "stop": stop,  # noqa: E731
                               "metrics": {"reward": {"items": [float(i) for i in range(start, stop)]}}}
    assert covered([rec(0, 2), rec(2, 6)], 6) == (6, {"reward": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]})
    assert covered([rec(0, 2), rec(3, 6)], 6) == (2, {"reward": [0.0, 1.0]})  # prompt 2 is missing
    assert covered([rec(0, 8)], 3) == (3, {"reward": [0.0, 1.0, 2.0]})  # a longer record covers a prefix
    assert covered([rec(0, 2), rec(0, 4), rec(4, 5)], 5)[1]["reward"] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_budgeted_search_finds_the_grids_choice_for_a_third_of_the_prompts(tiny_ckpts, tmp_path):
    full = PromptLinearEvaluator(N)
    grid_choice = search(SearchContext(tmp_path / "grid", tiny_ckpts[0], tiny_ckpts[1:], EvalConfig(), GRID,
                                       mean_cache=tmp_path / "mean", evaluators={"dev": full}, progress=False))
    grid_points = read_records(tmp_path / "grid" / "points.jsonl")
    assert len(grid_points) == 49 and full.prompt_evaluations() == (49 + T) * N  # the points, then θ0..θ2
    # Unambiguous: no point's accuracy within 1e-6 of θT's, and the best eligible reward ahead of the next by 1e-6.
    value = lambda p, m: p["metrics"][m]["value"]  # noqa: E731
    base = next(p for p in grid_points if (p["lam"], p["alpha"]) == (0.0, 0.0))
    assert min(abs(value(p, "accuracy") - value(base, "accuracy")) for p in grid_points if p is not base) > 1e-6
    rewards = sorted((value(p, "reward") for p in grid_points if value(p, "accuracy") >= value(base, "accuracy")),
                     reverse=True)
    assert rewards[0] - rewards[1] > 1e-6 and (grid_choice["lam"], grid_choice["alpha"]) != (0.0, 0.0)

    ev, out = PromptLinearEvaluator(N), tmp_path / "halving"
    ctx = SearchContext(out, tiny_ckpts[0], tiny_ckpts[1:], EvalConfig(), HALVING, mean_cache=tmp_path / "mean",
                        evaluators={"dev": ev}, progress=False)
    choice = search(ctx)
    assert (choice["lam"], choice["alpha"]) == (grid_choice["lam"], grid_choice["alpha"])
    assert choice["reward_gain"]["value"] == pytest.approx(grid_choice["reward_gain"]["value"], abs=1e-8)
    assert choice["expo"]["alpha"] == grid_choice["expo"]["alpha"]  # the λ = 0 line keeps a finalist of its own
    # Cost: 48·9 + 16·18 + 6·54 = 1044 for the points (+ at most 18 + 54 for the λ = 0 line's own finalist) and 81
    # for θT, against 49·81 = 3969: at most a third. θ0..θ2 on every prompt, for the report, as the grid.
    points_cost = ev.prompt_evaluations() - T * N
    assert 1044 + N <= points_cost <= 1044 + 18 + 54 + N and points_cost <= 49 * N / 3
    budget = choice["budget"]
    assert budget["prompt_evaluations"] == points_cost and budget["grid_prompt_evaluations"] == 49 * N
    assert [r["prompts"] for r in budget["rounds"]] == [9, 27, 81] and budget["rounds"][0]["points"] == 48
    # each evaluation covered only prompts the point lacked: round r adds [n_{r−1}, n_r)
    assert set(ev.evaluated) == {(0, 9), (9, 27), (27, 81), (0, 81)}

    # The finalists' items over every dev prompt are those of one whole-split evaluation, prompt by prompt.
    halving_points = {(p["lam"], p["alpha"]): p for p in read_records(out / "points.jsonl")}
    assert len(halving_points) == 1 + len(budget["finalists"]) and (0.0, 0.0) in halving_points
    for p in grid_points:
        mine = halving_points.get((p["lam"], p["alpha"]))
        if mine is not None:
            for m in ("reward", "accuracy"):
                assert mine["metrics"][m]["items"] == p["metrics"][m]["items"]
                assert mine["metrics"][m]["value"] == pytest.approx(p["metrics"][m]["value"], abs=1e-8)
                assert mine["metrics"][m]["n"] == N
    chosen = halving_points[(choice["lam"], choice["alpha"])]
    assert chosen["rounds"] == [0, 1, 2] and chosen["cost"]["prompts"] == N and chosen["method"] == "halving"
    # what every candidate cost, in the rounds' files: θT once on all prompts, every other point from prompt 0
    records = [r for path in sorted((out / "rounds").glob("round_*.jsonl")) for r in read_records(path)]
    assert sum(r["stop"] - r["start"] for r in records) == points_cost
    assert all({"merge", "eval"} <= set(r["seconds"]) for r in records)

    # A rerun evaluates nothing. A torn last record of round 1 is evaluated again, alone in its round; the stages
    # after it are redone from their records removed (as in any run: round 2's finalists on [27, 81), then θ0..θ2),
    # with the same choice.
    calls = len(ev.evaluated)
    assert search(ctx)["lam"] == choice["lam"]
    assert len(ev.evaluated) == calls
    lines = (out / "rounds" / "round_1.jsonl").read_text().splitlines(keepends=True)
    (out / "rounds" / "round_1.jsonl").write_text("".join(lines[:-1]) + lines[-1][:30])
    again = search(ctx)
    assert ev.evaluated[calls:] == [(9, 27)] + [(27, 81)] * budget["rounds"][2]["points"] + [(0, N)] * T
    assert (again["lam"], again["alpha"]) == (choice["lam"], choice["alpha"])
    assert len(read_records(out / "points.jsonl")) == len(halving_points)


def test_bad_settings_get_named_errors(tiny_ckpts, tmp_path):
    with pytest.raises(ItermergeError, match=r"search\.method = 'bayes'"):
        SearchConfig(method="bayes")
    for bad, message in [({"eta": 1}, r"search\.halving\.eta = 1"), ({"eta": 2.5}, r"search\.halving\.eta = 2\.5"),
                         ({"min_prompts": 0}, r"search\.halving\.min_prompts = 0")]:
        with pytest.raises(ItermergeError, match=message):
            build(SearchConfig, {"method": "halving", "halving": bad}, "run.yaml", prefix="search.")
    with pytest.raises(ItermergeError, match=r"unknown key search\.halving\.rounds"):
        build(SearchConfig, {"halving": {"rounds": 3}}, "run.yaml", prefix="search.")
    with pytest.raises(ItermergeError, match="lm_eval"):
        dev_size(EvalConfig(lm_eval=LmEvalConfig(preset="paper")), "dev")
    with pytest.raises(ItermergeError, match="refuses split 'test'"):
        search(SearchContext(tmp_path / "s", tiny_ckpts[0], tiny_ckpts[1:], EvalConfig(),
                             SearchConfig(method="halving", split="test"),
                             evaluators={"dev": PromptLinearEvaluator(9)}))
    evaluator = Evaluator(EvalConfig(prompts=PromptSource(n=3)), load_tokenizer(tiny_ckpts[0]), "dev", progress=False)
    with pytest.raises(ItermergeError, match=r"prompts \[2, 5\) of split 'dev': it has 3"):
        evaluator.subset(2, 5)


def test_rounds_are_stages_of_the_pipeline_with_the_real_evaluators(tiny_ckpts, tmp_path):
    """6 dev prompts, a 2 × 2 grid (3 points besides θT), eta 2 from 2 prompts: rounds of 2, 4 and 6 prompts, each a
    stage, keeping 2 then 1 (plus the best of the λ = 0 line when it is not among them); greedy accuracy, reward
    and KL through the HF sampler, the finalists' items those of one whole-split evaluation (the same samples; KL's
    float32 log-probs differ by ~1e-6 between batch shapes); a rerun runs no stage."""
    from itermerge.pipeline import search_and_test
    from itermerge.runner import StageRunner

    run_dir = tmp_path / "run"
    for t, ckpt in enumerate(tiny_ckpts[1:], start=1):
        shutil.copytree(ckpt, run_dir / f"iter_{t:02d}" / "model")
    cfg = from_dict({
        "iterations": T, "model": {"path": str(tiny_ckpts[0])}, "prompts": {"dev": 6},
        "evaluation": {"max_new_tokens": 4, "kl": {"samples": 1}},
        "search": {"method": "halving", "lams": [0.0, 0.5], "alphas": [0.0, 0.5],
                   "halving": {"eta": 2, "min_prompts": 2}},
    })
    record = search_and_test(StageRunner(run_dir), cfg, run_dir, test=False, reference=tiny_ckpts[0])
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    rounds = [stages[f"search/round_{r}"] for r in range(3)]
    assert [r["prompts"] for r in rounds] == [2, 4, 6] and rounds[0]["points"] == 3
    assert rounds[0]["evaluated"] == 4  # θT on all 6 prompts, then 3 points on 2
    for r in (0, 1):
        assert rounds[r + 1]["points"] == len(rounds[r]["kept"]) <= (2, 1)[r] + 1
        assert any(lam == 0.0 for lam, _ in rounds[r]["kept"])  # ExPO's line keeps a point in the race
    choice = json.loads((run_dir / "search" / "choice.json").read_text())
    assert (record["lam"], record["alpha"]) == (choice["lam"], choice["alpha"])
    assert choice["budget"]["prompt_evaluations"] == 6 + sum(r["points"] * 2 for r in rounds)
    assert record["prompt_evaluations"] == choice["budget"]["prompt_evaluations"]
    assert sorted(c["t"] for c in read_records(run_dir / "search" / "checkpoints.jsonl")) == [0, 1, 2, 3]

    # the finalists, pieced together from three rounds, against one evaluation on all 6 prompts each
    model, reference = load_model(tiny_ckpts[-1]), load_model(tiny_ckpts[0])
    basis = MergeBasis.from_checkpoints(tiny_ckpts[0], tiny_ckpts[1:],
                                        mean_cache=run_dir / "cache" / "mean_intermediate")
    evaluator = Evaluator(cfg.evaluation, load_tokenizer(tiny_ckpts[-1]), "dev", reference_model=reference,
                          progress=False)
    pieced = {(p["lam"], p["alpha"]): p for p in read_records(run_dir / "search" / "points.jsonl")}
    for lam, alpha in choice["budget"]["finalists"]:
        basis.apply_to(model, lam, alpha)
        assert pieced[(lam, alpha)]["rounds"] == [0, 1, 2]
        for name, metric in evaluator(model).items():
            got = pieced[(lam, alpha)]["metrics"][name]["items"]
            assert got == pytest.approx(list(metric.items), rel=1e-4, abs=1e-6)
        assert any(not math.isclose(v, 0.0) for v in pieced[(lam, alpha)]["metrics"]["kl"]["items"])

    from itermerge.report import write_report

    report = write_report(run_dir).read_text()  # the report reads the finalists as it reads a grid's points
    assert f"## Chosen merge: λ = {choice['lam']:g}, α = {choice['alpha']:g}" in report
    assert f"{len(choice['budget']['finalists']) + 1} points" in report

    sizes = {p.name: p.stat().st_size for p in (run_dir / "search" / "rounds").iterdir()}
    again = search_and_test(StageRunner(run_dir), cfg, run_dir, test=False, reference=tiny_ckpts[0])
    assert again == record and sizes == {p.name: p.stat().st_size for p in (run_dir / "search" / "rounds").iterdir()}
