"""Other merge operators beside the paper's (search.operators): each value on dev predicted from its weights, the rule's
choice per operator, the chosen one tested once with paired differences, resume, named errors, and a run end to end."""

from __future__ import annotations

import dataclasses
import json
import statistics

import pytest
from conftest import save_tiny, tiny_model

from itermerge.checkpoint import CheckpointReader
from itermerge.config import from_dict
from itermerge.config.evaluation import EvalConfig
from itermerge.config.search import SearchConfig, SelectionRule
from itermerge.errors import ItermergeError
from itermerge.evaluation import Metric
from itermerge.maths.operators import ema_weights, expo_weights
from itermerge.maths.paired import paired_difference
from itermerge.merging import merge_checkpoints
from itermerge.operators import operator
from itermerge.records import read_records
from itermerge.results import write_results
from itermerge.search import operators as ops
from itermerge.search.context import SearchContext
from itermerge.search.driver import search
from itermerge.search.selection import regressions
from itermerge.tables import fmt_difference, fmt_metric

pytestmark = pytest.mark.numeric  # run again under a second kernel set: make test, ATEN_CPU_CAPABILITY=avx2

# Each metric is the mean of 4 per-prompt items, item i the sum of every 4th entry (from i) of one tensor: linear in
# θ, so a merge's items are eq. (9)'s k_t applied to the checkpoints' items. Dev and test read different tensors.
DEV = {"reward": "model.norm.weight", "accuracy": "model.layers.0.mlp.down_proj.weight"}
TEST = {"reward": "model.layers.1.post_attention_layernorm.weight", "accuracy": "model.layers.1.mlp.down_proj.weight"}
N_ITEMS = 4


def items_of(tensors, tensor_of_metric):
    out = {}
    for metric, name in tensor_of_metric.items():
        flat = tensors(name).detach().double().reshape(-1)
        out[metric] = [float(flat[i::N_ITEMS].sum()) for i in range(N_ITEMS)]
    return out


class LinearItems:
    """A fake evaluator whose metrics are linear functionals of the weights, with per-prompt items."""

    def __init__(self, tensor_of_metric):
        self.tensor_of_metric, self.calls = tensor_of_metric, 0

    def __call__(self, model, timings):
        self.calls += 1
        params = dict(model.named_parameters())
        return {m: Metric(statistics.mean(v), statistics.stdev(v) / N_ITEMS ** 0.5, N_ITEMS, tuple(v))
                for m, v in items_of(params.__getitem__, self.tensor_of_metric).items()}


def checkpoint_items(path, tensor_of_metric):
    return items_of(CheckpointReader(path).get, tensor_of_metric)


def predicted(ckpts, k, tensor_of_metric):
    """Eq. (9) on the items: L(θ0) + Σ_t k_t (L(θt) − L(θ0)), item by item."""
    per = [checkpoint_items(p, tensor_of_metric) for p in ckpts]
    return {m: [per[0][m][i] + sum(kt * (c[m][i] - per[0][m][i]) for kt, c in zip(k, per[1:]))
                for i in range(N_ITEMS)] for m in tensor_of_metric}


GRIDS = {"expo": {"alpha": [0.3, 1.0]}, "ema": {"gamma": [0.5, 0.9]}, "slerp": {"t": [0.3, 0.8]},
         "ties": {"density": [0.4, 0.8]}, "dare": {"density": [0.5], "seed": [0, 1]}, "model_stock": {}}


@pytest.fixture(scope="module")
def searched(tiny_ckpts, tmp_path_factory):
    """The paper's search and test on θ0..θ3 with the linear evaluators (the pipeline's driver), then, with
    ``search.operators`` added (which the search's stages are not keyed by), the operators' two stages."""
    root = tmp_path_factory.mktemp("operators")
    out, mean = root / "search", root / "mean"
    cfg = SearchConfig(lams=(0.0, 0.5), alphas=(0.0, 0.5), operators=GRIDS)
    dev, test = LinearItems(DEV), LinearItems(TEST)
    ctx = SearchContext(out, tiny_ckpts[0], tiny_ckpts[1:], EvalConfig(), dataclasses.replace(cfg, operators={}),
                        mean_cache=mean, merged_dir=root / "merged", evaluators={"dev": dev, "test": test},
                        progress=False)
    search(ctx, test=True)
    calls = dev.calls, test.calls
    ctx = dataclasses.replace(ctx, config=cfg)
    search(ctx, test=True)
    new = json.loads((root / "manifest.json").read_text())["stages"]["operators"]["candidates_evaluated"]
    record = json.loads((out / "operators.json").read_text())
    return {"out": out, "mean": mean, "cfg": cfg, "dev": dev, "test": test, "calls": calls, "new": new,
            "record": record, "root": root, "ctx": ctx}


def test_every_candidate_on_dev_is_what_its_weights_predict(searched, tiny_ckpts):
    out, root = searched["out"], searched["root"]
    choice = json.loads((out / "choice.json").read_text())
    lam, alpha = choice["lam"], choice["alpha"]
    records = read_records(out / "operators.jsonl")
    assert searched["new"] == len(records) == 2 + 2 + 2 + 2 + 2 + 1
    assert searched["dev"].calls == searched["calls"][0] + len(records)
    for r in records:
        p, method = r["params"], r["operator"]
        if method in ("expo", "ema"):  # linear: eq. (9) with the operator's k_t
            k = expo_weights(3, p["alpha"]) if method == "expo" else ema_weights(3, p["gamma"])
            assert r["weights"] == pytest.approx(k)
            want = predicted(tiny_ckpts, k, DEV)
        else:  # SLERP, Model Stock (per-tensor angles), TIES, DARE (sparsified): the same operator streamed to disk
            assert (p.get("lam"), p.get("alpha")) == ((lam, alpha) if method in ("ties", "dare") else (None, None))
            disk = merge_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], root / "disk" / r["key"].replace(" ", "_"),
                                     operator(method, **p), mean_cache=searched["mean"], progress=False)
            want = checkpoint_items(disk, DEV)
        for metric, items in want.items():
            got = r["metrics"][metric]
            assert got["items"] == pytest.approx(items, rel=1e-5, abs=1e-5), (r["key"], metric)
            assert got["value"] == pytest.approx(statistics.mean(items), rel=1e-5, abs=1e-5)
        assert {"merge", "eval"} <= set(r["seconds"])
    assert {r["params"]["seed"] for r in records if r["operator"] == "dare"} == {0, 1}


def test_the_rule_chooses_per_operator_as_by_hand(searched, tiny_ckpts):
    out, cfg = searched["out"], searched["cfg"]
    base = json.loads((out / "choice.json").read_text())["baseline"]  # θT on dev
    records = read_records(out / "operators.jsonl")
    chosen = ops.choose(searched["ctx"])
    assert list(chosen) == list(GRIDS)
    for method, c in chosen.items():
        mine = [r for r in records if r["operator"] == method]
        kept = [r for r in mine if r["metrics"]["accuracy"]["value"] >= base["metrics"]["accuracy"]["value"] - 1e-12]
        assert [not regressions(r, base, cfg.rule) for r in mine] == [t["eligible"] for t in c["candidates"]]
        if not kept:
            assert c["key"] is None and c["none"] == "no value kept θT's capability"
            assert "the rule keeps θT" in c["reason"]
            continue
        best = max(kept, key=lambda r: r["metrics"]["reward"]["value"])
        assert c["key"] == best["key"] and c["metrics"] == best["metrics"]
        assert c["reason"].startswith(f"{ops.Candidate(method, c['searched'], c['params']).label}: highest reward")
    # these checkpoints exercise each branch: no value eligible (ExPO), all of them, and a better one excluded (DARE)
    assert chosen["expo"]["key"] is None and all(t["eligible"] for t in chosen["ema"]["candidates"])
    assert "seed=0 had more reward but accuracy" in chosen["dare"]["reason"]
    # a rule that lets every value through picks the highest dev reward of each operator
    loose = SearchConfig(lams=cfg.lams, alphas=cfg.alphas, operators=GRIDS,
                         rule=SelectionRule(tolerance=1e9))
    for method, c in ops.choose(dataclasses.replace(searched["ctx"], config=loose)).items():
        best = max((r for r in records if r["operator"] == method), key=lambda r: r["metrics"]["reward"]["value"])
        assert c["key"] == best["key"]


def test_the_chosen_operators_are_tested_once_with_paired_differences(searched, tiny_ckpts):
    out, record = searched["out"], searched["record"]
    test = json.loads((out / "test.json").read_text())
    rows = {r["t"]: r for r in test["models"]}
    chosen = ops.choose(searched["ctx"])
    tested = [o for o in record["operators"] if o["key"] is not None]
    assert searched["test"].calls == searched["calls"][1] + len(tested)
    assert [o["operator"] for o in record["operators"]] == list(GRIDS)
    assert (record["lam"], record["alpha"]) == (test["lam"], test["alpha"])
    for o in record["operators"]:
        assert o["key"] == chosen[o["operator"]]["key"]
        if o["key"] is None:
            assert o["metrics"] is None and o["paired"] == []
            continue
        # its test numbers are its merge's: the dev record's weights (expo, ema) or the merge on disk
        dev_row = next(r for r in read_records(out / "operators.jsonl") if r["key"] == o["key"])
        if o["weights"] is not None and o["operator"] in ("expo", "ema"):
            want = predicted(tiny_ckpts, dev_row["weights"], TEST)
            assert o["metrics"]["reward"]["items"] == pytest.approx(want["reward"], rel=1e-5, abs=1e-5)
        # the paired differences: this operator's items minus the chosen merge's and θT's, prompt by prompt
        against = {p["b"]: p["metrics"] for p in o["paired"]}
        assert set(against) == {"merged", 3}
        for b, row in (("merged", rows["merged"]), (3, rows[3])):
            for metric in ("reward", "accuracy"):
                a_items, b_items = o["metrics"][metric]["items"], row["metrics"][metric]["items"]
                d = against[b][metric]
                assert d["difference"] == pytest.approx(statistics.mean(x - y for x, y in zip(a_items, b_items)))
                expected = paired_difference(a_items, b_items)
                assert (d["ci_low"], d["ci_high"], d["p_value"]) == (expected["ci_low"], expected["ci_high"],
                                                                     expected["p_value"])
    assert record["operators"] == ops.write_test(searched["ctx"], [])["operators"]


def test_a_rerun_evaluates_nothing_and_a_new_value_only_itself(searched, tiny_ckpts):
    ctx, cfg, dev, test = (searched[k] for k in ("ctx", "cfg", "dev", "test"))
    before = dev.calls, test.calls
    assert ops.evaluate_dev(ctx) == 0 and ops.evaluate_test(ctx) == []
    assert (dev.calls, test.calls) == before
    wider = dataclasses.replace(ctx, config=SearchConfig(lams=cfg.lams, alphas=cfg.alphas,
                                                         operators={**GRIDS, "ema": {"gamma": [0.5, 0.9, 1.0]}}))
    assert ops.evaluate_dev(wider) == 1
    record = ops.write_test(wider, [ops.evaluate_test(wider)])
    ema = next(o for o in record["operators"] if o["operator"] == "ema")
    assert test.calls - before[1] == (0 if ema["key"] == searched["record"]["operators"][1]["key"] else 1)
    assert len(ema["dev"]["candidates"]) == 3


@pytest.mark.parametrize("operators, message", [
    ({"magic": {"alpha": [0.1]}}, r"search.operators.magic: not an operator.*expo, ema, slerp, ties, dare"),
    ({"groups": {"lam": [0.1]}}, r"search.operators.groups: not an operator"),
    ({"ema": {"t": [0.5]}}, r"search.operators.ema.t: ema takes gamma"),
    ({"ties": {}}, r"search.operators.ties: give density"),
    ({"ema": {"gamma": [0.5, 1.5]}}, r"search.operators.ema.gamma: 1.5 is not a number in \(0, 1\]"),
    ({"dare": {"density": [0.0]}}, r"search.operators.dare.density: 0.0 is not a number in \(0, 1\]"),
    ({"dare": {"density": [0.5], "seed": [-1]}}, r"search.operators.dare.seed: -1 is not a whole number"),
    ({"slerp": {"t": [float("nan")]}}, r"search.operators.slerp.t: nan is not a finite number"),
    ({"slerp": {"t": []}}, r"search.operators.slerp.t is empty"),
    ({"expo": {"alpha": [0.5, 0.5]}}, r"search.operators.expo.alpha: 0.5 is listed twice"),
    ({"expo": [0.5]}, r"search.operators.expo = \[0.5\]: give its parameter's values"),
])
def test_a_bad_operator_or_value_is_a_named_error(operators, message):
    with pytest.raises(ItermergeError, match=message):
        from_dict({"search": {"operators": operators}})


def test_one_value_is_a_list_of_one_and_the_default_is_off():
    assert SearchConfig().operators == {}
    assert SearchConfig(operators={"ties": {"density": 0.5}}).operators == {"ties": {"density": (0.5,)}}


def test_candidates_carry_the_searchs_choice_where_they_take_it():
    grids = SearchConfig(operators={"slerp": {"t": [0.5]}, "ties": {"density": [0.3, 0.6]},
                                    "dare": {"density": [0.5]}}).operators
    got = ops.candidates(grids, 3, 0.3, 0.4)
    assert [c.key for c in got] == ["slerp t=0.5", "ties density=0.3 lam=0.3 alpha=0.4",
                                    "ties density=0.6 lam=0.3 alpha=0.4", "dare density=0.5 seed=0 lam=0.3 alpha=0.4"]
    assert got[1].name == "TIES (density=0.3; λ=0.3, α=0.4)" and got[3].label == "density=0.5, seed=0"
    assert [c.method for c in ops.candidates(grids, 1, 0.0, 0.4)] == ["ties", "ties", "dare"]  # SLERP needs T ≥ 2


def test_a_run_with_operators_writes_operators_json_and_the_report_section(tmp_path):
    from test_pipeline import tiny_run_config

    from itermerge.pipeline import run

    theta0 = save_tiny(tmp_path / "theta0", tiny_model(0))
    off = {"alpha_study": False, "accuracy_matrix": False, "ensemble": False, "lambda_study": False}
    cfg = tiny_run_config(theta0, studies=off, evaluation={"max_new_tokens": 6, "prompts": {"n": 4}},
                          search={"lams": [0.0, 0.5], "alphas": [0.0, 0.5],
                                  "rule": {"reward": "reward", "capability": [], "tolerance": 0.0},
                                  "operators": {"ema": {"gamma": [0.5]}, "slerp": {"t": [0.3, 0.7]},
                                                "ties": {"density": [0.5]}, "dare": {"density": [0.5]}}})
    run_dir = tmp_path / "run"
    run(from_dict(cfg), run_dir)
    record = json.loads((run_dir / "search" / "operators.json").read_text())
    assert [o["operator"] for o in record["operators"]] == ["ema", "slerp", "ties", "dare"]
    assert all(o["metrics"]["reward"]["n"] == 4 and {p["b"] for p in o["paired"]} == {"merged", 2}
               for o in record["operators"])  # no capability metric: every operator has a choice
    assert len(read_records(run_dir / "search" / "operators.jsonl")) == 5
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert stages["operators"]["candidates_evaluated"] == 5 and "operators_test" in stages
    report = (run_dir / "report.md").read_text()
    assert "## Other merge operators (dev-chosen, tested once)" in report
    section = report.split("## Other merge operators (dev-chosen, tested once)")[1].split("\n## ")[0]
    for o in record["operators"]:  # one row each: the operator, its value, its test numbers, − the paper's merge
        row = next(line for line in section.splitlines() if line.startswith(f"| {o['title']} | {o['label']} |"))
        merge_minus = next(p for p in o["paired"] if p["b"] == "merged")["metrics"]["reward"]
        assert fmt_metric(o["metrics"]["reward"]) in row and fmt_difference(merge_minus) in row
    # docs/results.md from the same files: accuracy and reward only, every number read from operators.json
    page = write_results(tmp_path / "results.md", demo=run_dir).read_text()
    table = page.split("## Merge operators on the demo model (`run/search/operators.json`)")[1]
    assert "| model | value chosen on dev | accuracy | reward | accuracy: − merge (95% CI, p) |" in table
    assert "format" not in table.split("\n\n")[2]
    for o in record["operators"]:
        merge_minus = next(p for p in o["paired"] if p["b"] == "merged")["metrics"]
        assert (f"| {o['title']} | {o['label']} | {fmt_metric(o['metrics']['accuracy'])} | "
                f"{fmt_metric(o['metrics']['reward'])} | {fmt_difference(merge_minus['accuracy'])} | "
                f"{fmt_difference(merge_minus['reward'])} |") in table


def test_the_report_shows_the_operators_of_this_choice_only(searched, tmp_path):
    import shutil

    from itermerge.report import write_report

    run_dir = tmp_path / "run"
    shutil.copytree(searched["out"], run_dir / "search")
    record = json.loads((run_dir / "search" / "operators.json").read_text())
    section = write_report(run_dir).read_text().split("## Other merge operators (dev-chosen, tested once)\n")[1]
    assert "| ExPO | none: no value kept θT's capability |" in section  # the rule kept θT for ExPO's values
    assert f"- ExPO: {record['operators'][0]['dev']['reason']}." in section
    stock = next(o for o in record["operators"] if o["operator"] == "model_stock")  # no parameters: its title alone
    assert stock["name"] == "Model Stock" and f"| Model Stock | {stock['label'] if stock['key'] else 'none'}" in section
    record["lam"] += 0.1  # compared with another choice of (λ, α): not this report's
    (run_dir / "search" / "operators.json").write_text(json.dumps(record))
    assert "Other merge operators" not in write_report(run_dir).read_text()
