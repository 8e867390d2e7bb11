"""Learned merge weights (search.operators.learned, issue 27): coordinate ascent under the paper's rule on a hand-made
landscape, then in a search: fitted on one half of dev only (the other half can change without changing the fit),
checked once on that other half beside the rule's own choices there, tested once like every other operator."""

from __future__ import annotations

import dataclasses
import json
import statistics

import pytest

from itermerge.checkpoint import CheckpointReader
from itermerge.config.evaluation import EvalConfig
from itermerge.config.search import SearchConfig, SelectionRule
from itermerge.errors import ItermergeError
from itermerge.evaluation.metric import mean_metric
from itermerge.operators import REGISTRY, operator
from itermerge.records import read_records
from itermerge.search import learned
from itermerge.search.context import SearchContext
from itermerge.search.driver import search
from itermerge.search.selection import oriented, regressions

pytestmark = pytest.mark.numeric  # run again under a second kernel set: make test, ATEN_CPU_CAPABILITY=avx2


def landscape(reward, accuracy):
    """``measure`` for ``ascend``: each k's metrics from two functions of k, one prompt each."""
    return lambda ks: [{"reward": mean_metric([reward(k)]).to_dict(), "accuracy": mean_metric([accuracy(k)]).to_dict()}
                       for k in ks]


def test_ascent_moves_as_derived_by_hand():
    # reward −(k1 − 0.3)² − 2 (k2 − 0.7)², accuracy 1 − |k1 + k2 − 1| with tolerance 0.15 (θT's is 1): θT (0, 1)
    # has reward −0.27, the uniform (0.5, 0.5) −0.12, so the ascent starts there. Step 0.1:
    # 1: (0.6, 0.5) −0.17, (0.4, 0.5) −0.09, (0.5, 0.6) −0.06, (0.5, 0.4) −0.22          → (0.5, 0.6)
    # 2: (0.6, 0.6) −0.11 but sum 1.2, (0.4, 0.6) −0.03, (0.5, 0.7) −0.04 but sum 1.2     → (0.4, 0.6)
    # 3: (0.5, 0.6) −0.06, (0.3, 0.6) −0.02, (0.4, 0.7) −0.01, (0.4, 0.5) −0.09          → (0.4, 0.7)
    # 4: (0.5, 0.7) sum 1.2, (0.3, 0.7) 0, (0.4, 0.8) sum 1.2, (0.4, 0.6) −0.03          → (0.3, 0.7)
    # 5: every move −0.01 or −0.02 < 0: stay, step 0.05; 6: every move < 0: stay, step 0.025
    measure = landscape(lambda k: -(k[0] - 0.3) ** 2 - 2 * (k[1] - 0.7) ** 2, lambda k: 1 - abs(k[0] + k[1] - 1))
    base = {"lam": 0.0, "alpha": 0.0, "metrics": measure([(0.0, 1.0)])[0]}
    rule = SelectionRule(tolerance=0.15)
    out = learned.ascend(2, base, rule, measure, rounds=6, step=0.1)
    path = [p["weights"] for p in out["path"]]
    assert path == [pytest.approx(k) for k in ([0.5, 0.5], [0.5, 0.6], [0.4, 0.6], [0.4, 0.7], [0.3, 0.7],
                                               [0.3, 0.7], [0.3, 0.7])]
    assert [p["step"] for p in out["path"]] == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.025])
    assert out["weights"] == pytest.approx([0.3, 0.7]) and out["start"] == "the uniform average"
    assert out["metrics"]["reward"]["value"] == pytest.approx(0.0, abs=1e-12)
    assert len(out["tried"]) == 1 + 6 * 4  # the uniform average, then 2T moves a round
    by_k = {tuple(round(x, 6) for x in t["weights"]): t for t in out["tried"]}
    assert by_k[(0.6, 0.6)]["eligible"] is False and by_k[(0.4, 0.6)]["eligible"] is True


def test_a_better_reward_that_loses_capability_is_refused_until_the_step_is_small_enough():
    # reward k1 + k2, accuracy 1 − |k1 + k2 − 1|, tolerance 0.06: θT and the uniform average tie at reward 1, so the
    # ascent keeps θT (the rule's tie goes to θT). Every move of 0.1 raises the reward to 1.1 but loses 0.1 of
    # accuracy: refused, the step halves; moves of 0.05 lose only 0.05 and are taken.
    measure = landscape(lambda k: k[0] + k[1], lambda k: 1 - abs(k[0] + k[1] - 1))
    base = {"lam": 0.0, "alpha": 0.0, "metrics": measure([(0.0, 1.0)])[0]}
    out = learned.ascend(2, base, SelectionRule(tolerance=0.06), measure, rounds=2, step=0.1)
    assert out["start"] == "θT" and out["path"][1]["weights"] == [0.0, 1.0] and out["path"][1]["step"] == 0.05
    assert not any(t["eligible"] for t in out["tried"] if t["round"] == 1 and sum(t["weights"]) > 1)
    assert sum(out["weights"]) == pytest.approx(1.05) and out["metrics"]["reward"]["value"] == pytest.approx(1.05)


def test_halves_and_parts_are_named_and_exact():
    assert learned.halves(9) == {"fit": (0, 4), "check": (4, 9)}
    with pytest.raises(ItermergeError, match=r"3 dev prompts cannot be split.*prompts\.dev >= 4"):
        learned.halves(3)
    m = mean_metric([1.0, 0.0, 1.0, 1.0]).to_dict()
    assert learned.part({"accuracy": m}, 2, 4, "here")["accuracy"]["value"] == 1.0
    with pytest.raises(ItermergeError, match=r"here: metric 'reward' has no per-prompt values"):
        learned.part({"reward": {"value": 1.0, "stderr": None, "n": 4}}, 0, 2, "here", needed=("reward",))


# --- in a search, on θ0..θ3 ------------------------------------------------------------------------------------

DEV = {"reward": "model.norm.weight", "accuracy": "model.layers.0.mlp.down_proj.weight"}
TEST = {"reward": "model.layers.1.post_attention_layernorm.weight", "accuracy": "model.layers.1.mlp.down_proj.weight"}
N = 8  # dev prompts: [0, 4) fit, [4, 8) check


class ItemsPerPrompt:
    """Metrics linear in θ with per-prompt items: item i of a metric is the sum of every N-th entry (from i) of one
    tensor, times ``scale[i]``; ``seen`` lists the prompts of every evaluation (``subset`` as the real evaluator)."""

    def __init__(self, tensors, scale=(1.0,) * N):
        self.tensors, self.scale, self.prompts, self.seen = tensors, scale, list(range(N)), []

    def subset(self, start, stop):
        def evaluate(model, timings):
            self.seen.append((start, stop))
            params = dict(model.named_parameters())
            out = {}
            for metric, name in self.tensors.items():
                flat = params[name].detach().double().reshape(-1)
                out[metric] = mean_metric([self.scale[i] * float(flat[i::N].sum()) for i in range(start, stop)])
            return out
        return evaluate

    def __call__(self, model, timings):
        return self.subset(0, N)(model, timings)


def run_search(tiny_ckpts, root, scale=(1.0,) * N, settings=None):
    cfg = SearchConfig(lams=(0.0, 0.5, "uniform"), alphas=(0.0, 0.5),
                       operators={"learned": settings or {"rounds": 2, "step": 0.2}})
    dev, test = ItemsPerPrompt(DEV, scale), ItemsPerPrompt(TEST)
    ctx = SearchContext(root / "search", tiny_ckpts[0], tiny_ckpts[1:], EvalConfig(), cfg, mean_cache=root / "mean",
                        merged_dir=root / "merged", evaluators={"dev": dev, "test": test}, progress=False)
    search(ctx, test=True)
    return ctx, dev, json.loads((root / "search" / "operators.json").read_text())


@pytest.fixture(scope="module")
def fitted(tiny_ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("learned")
    ctx, dev, record = run_search(tiny_ckpts, root)
    return {"ctx": ctx, "dev": dev, "record": record, "root": root}


def items_of(path, tensors):
    reader = CheckpointReader(path)
    return {m: [float(reader.get(name).double().reshape(-1)[i::N].sum()) for i in range(N)]
            for m, name in tensors.items()}


def test_the_fit_measures_only_its_half_and_each_k_is_eq9_on_the_checkpoints(fitted, tiny_ckpts):
    dev, ctx = fitted["dev"], fitted["ctx"]
    records = [r for r in read_records(ctx.files.operator_records) if r["operator"] == "learned"]
    fit = [r for r in records if r["half"] == "fit"]
    check = [r for r in records if r["half"] == "check"]
    assert len(check) == 1 and check[0]["prompts"] == [4, 8] and all(r["prompts"] == [0, 4] for r in fit)
    # the whole split for the grid and θ0..θ2; the fit half for every k the ascent tried; the check half once
    row = next(o for o in fitted["record"]["operators"] if o["operator"] == "learned")
    distinct = {tuple(t["searched"]["weights"]) for t in row["dev"]["candidates"]}  # a move back is measured once
    assert len(row["dev"]["candidates"]) == 1 + 2 * 2 * 3 and len(distinct) >= 1 + 2 * 3
    assert dev.seen.count((4, 8)) == 1 and dev.seen.count((0, 4)) == len(fit) == len(distinct)
    assert set(dev.seen) == {(0, N), (0, 4), (4, 8)}
    per = [items_of(p, DEV) for p in tiny_ckpts]
    for r in records:
        (start, stop), k = r["prompts"], r["weights"]
        for metric in DEV:
            want = [per[0][metric][i] + sum(kt * (c[metric][i] - per[0][metric][i]) for kt, c in zip(k, per[1:]))
                    for i in range(start, stop)]
            assert r["metrics"][metric]["items"] == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_the_choice_is_the_rules_at_every_step_of_the_ascent(fitted):
    row = next(o for o in fitted["record"]["operators"] if o["operator"] == "learned")
    rule = fitted["ctx"].config.rule
    choice = json.loads(fitted["ctx"].files.choice.read_text())
    theta_T = {"metrics": learned.part(choice["baseline"]["metrics"], 0, 4, "θT")}
    tried = row["dev"]["candidates"]
    assert row["params"]["weights"] == row["searched"]["weights"] and len(row["params"]["weights"]) == 3
    for r in (1, 2):  # the point kept after round r is eligible and no eligible move of that round beat it
        mine = [t for t in tried if t["round"] == r]
        kept = [t for t in tried if t["searched"]["weights"] == row["params"]["weights"]]
        assert kept and not regressions(kept[0], theta_T, rule)
        assert all(t["eligible"] == (not regressions(t, theta_T, rule)) for t in mine)
    # each move raises the reward, so the fitted k beats every eligible k tried and θT on the fit half
    final = oriented({"metrics": row["dev"]["metrics"]}, rule.reward)
    assert all(final >= oriented(t, rule.reward) for t in tried if t["eligible"])
    assert final >= oriented(theta_T, rule.reward)


def test_the_check_half_cannot_change_the_fit(fitted, tiny_ckpts, tmp_path):
    """The same search with every check-half prompt's items scaled by −3: the fit and every fit record are the same,
    only the check (and the grid's full-dev choice) differs."""
    _, _, record = run_search(tiny_ckpts, tmp_path, scale=(1.0,) * 4 + (-3.0,) * 4)
    a = next(o for o in fitted["record"]["operators"] if o["operator"] == "learned")
    b = next(o for o in record["operators"] if o["operator"] == "learned")
    assert a["params"] == b["params"] and a["dev"]["candidates"] == [
        {**t, "seconds": u["seconds"]} for t, u in zip(b["dev"]["candidates"], a["dev"]["candidates"])]
    check_a, check_b = a["dev"]["check"], b["dev"]["check"]
    assert check_b["models"][0]["metrics"]["reward"]["value"] == pytest.approx(
        -3 * check_a["models"][0]["metrics"]["reward"]["value"], rel=1e-6)


def test_the_check_compares_with_the_rules_choices_on_the_fit_half(fitted):
    row = next(o for o in fitted["record"]["operators"] if o["operator"] == "learned")
    check = row["dev"]["check"]
    assert check["halves"] == {"fit": [0, 4], "check": [4, 8]} and check["uniform_in_grid"] is True
    assert [m["t"] for m in check["models"]] == ["learned", "paper", "uniform", check["best_checkpoint"], 3]
    points = read_records(fitted["ctx"].files.points)
    uniform = next(p for p in points if (p["lam"], p["alpha"]) == pytest.approx((2 / 3, 0.0)))
    got = next(m for m in check["models"] if m["t"] == "uniform")["metrics"]["reward"]
    assert got["items"] == pytest.approx(uniform["metrics"]["reward"]["items"][4:])
    assert got["value"] == pytest.approx(statistics.mean(uniform["metrics"]["reward"]["items"][4:]))
    paired = {p["b"]: p for p in check["paired"]}
    assert set(paired) == {"paper", "uniform", check["best_checkpoint"], 3}
    mine = check["models"][0]["metrics"]["reward"]["items"]
    want = statistics.mean(mine) - statistics.mean(uniform["metrics"]["reward"]["items"][4:])
    assert paired["uniform"]["metrics"]["reward"]["difference"] == pytest.approx(want)


def test_the_fitted_weights_are_tested_once_and_a_rerun_measures_nothing(fitted, tiny_ckpts):
    row = next(o for o in fitted["record"]["operators"] if o["operator"] == "learned")
    assert row["title"] == "Learned k_t" and row["label"].startswith("k=(") and row["metrics"]["reward"]["n"] == N
    assert {p["b"] for p in row["paired"]} == {"merged", 3}
    k = row["params"]["weights"]
    assert row["weights"] == pytest.approx(k)
    per = items_of(tiny_ckpts[0], TEST), [items_of(p, TEST) for p in tiny_ckpts[1:]]
    want = [per[0]["reward"][i] + sum(kt * (c["reward"][i] - per[0]["reward"][i]) for kt, c in zip(k, per[1]))
            for i in range(N)]
    assert row["metrics"]["reward"]["items"] == pytest.approx(want, rel=1e-5, abs=1e-5)
    ctx, dev = fitted["ctx"], fitted["dev"]
    before = len(dev.seen)
    search(dataclasses.replace(ctx, evaluators={"dev": dev, "test": ctx.evaluators["test"]}), test=True)
    assert len(dev.seen) == before


def test_learned_is_an_operator_and_its_settings_are_checked():
    assert operator("learned", weights=[0.2, 0.3, 0.5]).resolve(3, []).weights == (0.2, 0.3, 0.5)
    with pytest.raises(ItermergeError, match=r"--method learned needs --weights"):
        operator("learned")
    with pytest.raises(ItermergeError, match=r"3 weights for T = 2"):
        operator("learned", weights=[0.2, 0.3, 0.5]).resolve(2, [])
    assert REGISTRY["learned"].search == "fit"
    assert SearchConfig(operators={"learned": {}}).operators == {"learned": {}}
    with pytest.raises(ItermergeError, match=r"search\.operators\.learned\.rounds: learned is fitted on dev, not "
                                             r"searched over a grid; give one value"):
        SearchConfig(operators={"learned": {"rounds": [2, 3]}})
    with pytest.raises(ItermergeError, match=r"search\.operators\.learned\.step: -0\.1 is not a number > 0"):
        SearchConfig(operators={"learned": {"step": -0.1}})
    with pytest.raises(ItermergeError, match=r"search\.operators\.learned\.weights: learned takes rounds, step"):
        SearchConfig(operators={"learned": {"weights": [0.5, 0.5]}})


def test_the_report_shows_the_check_beside_the_operators_table(fitted):
    from itermerge.report import _operators_section

    choice = json.loads(fitted["ctx"].files.choice.read_text())
    text = _operators_section(fitted["record"], choice)
    assert "| Learned k_t | k=(" in text  # its row in the operators' table, tested once
    assert "Learned k_t checked on dev prompts [4, 8), which its fit never read" in text
    assert "| Learned k_t − | accuracy | reward |" in text and "| Uniform average of θ1..θT |" in text


def test_a_run_config_refuses_what_the_fit_cannot_split_before_anything_runs():
    from itermerge.config import from_dict

    learned_on = {"search": {"operators": {"learned": {}}}}
    assert from_dict({**learned_on, "prompts": {"dev": 4}}).search.operators == {"learned": {}}
    with pytest.raises(ItermergeError, match=r"search\.operators\.learned: 3 dev prompts \(prompts\.dev, "
                                             r"evaluation\.prompts\.n\) cannot be split.*prompts\.dev >= 4"):
        from_dict({**learned_on, "prompts": {"dev": 3}})
    with pytest.raises(ItermergeError, match=r"search\.operators\.learned: evaluation\.lm_eval measures benchmark "
                                             r"documents"):
        from_dict({**learned_on, "evaluation": {"lm_eval": {"tasks": ["arc_easy"]}}})
