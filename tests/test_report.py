"""The report: its tables carry exactly the recorded numbers; optional sections appear only when their files do."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from itermerge.config.evaluation import EvalConfig
from itermerge.config.search import SearchConfig
from itermerge.evaluation import Metric
from itermerge.records import read_records
from itermerge.report import fmt_metric, write_report
from itermerge.rundir import Manifest
from itermerge.search.context import SearchContext
from itermerge.search.driver import search


class PlaneEvaluator:
    """reward, accuracy and kl as fixed linear functionals of the weights, with a made-up stderr and n."""

    def __call__(self, model, timings):
        p = dict(model.named_parameters())
        s = lambda name: float(p[name].detach().double().sum())  # noqa: E731
        timings["generate_s"] = 0.0
        return {
            "accuracy": Metric(s("model.layers.0.mlp.down_proj.weight"), 0.01, 50),
            "reward": Metric(s("model.norm.weight") / 32, 0.02, 50),
            "kl": Metric(abs(s("model.layers.1.mlp.up_proj.weight")), 0.05, 50),
        }


@pytest.fixture(scope="module")
def run_dir(tiny_ckpts, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    for t, ckpt in enumerate(tiny_ckpts[1:], start=1):
        shutil.copytree(ckpt, run / f"iter_{t:02d}" / "model")
        (run / f"iter_{t:02d}" / "metrics.json").write_text(
            json.dumps({"loss": 0.69 - 0.01 * t, "seconds": {"train": 1.5}})
        )
    Manifest(run).set_meta("reference", str(tiny_ckpts[0]))
    (run / "config.yaml").write_text("model: tiny\niterations: 3\n")
    from itermerge.search.finalize import run_paths

    reference, checkpoints = run_paths(run)
    cfg = SearchConfig(lams=(0.0, 0.3, 0.6), alphas=(0.0, 0.4, 1.0))
    search(SearchContext(run / "search", reference, checkpoints, EvalConfig(), cfg,
                         mean_cache=run / "cache" / "mean_intermediate", merged_dir=run / "merged",
                         evaluators={"dev": PlaneEvaluator(), "test": PlaneEvaluator()}, progress=False), test=True)
    return run


def _table_rows(text: str, heading: str) -> dict[str, list[str]]:
    """{model: [cells]} of the Markdown table under ``heading``."""
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| model") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_report_numbers_match_the_run_files(run_dir):
    report = write_report(run_dir).read_text()
    search = run_dir / "search"
    choice = json.loads((search / "choice.json").read_text())
    dev = _table_rows(report, "## Table 2 style, dev split")
    names = ["accuracy", "reward", "kl"]  # the table's column order (METRIC_ORDER)
    for c in read_records(search / "checkpoints.jsonl"):
        assert dev[c["name"]] == [fmt_metric(c["metrics"][n]) for n in names]
    chosen_point = next(p for p in read_records(search / "points.jsonl")
                        if (p["lam"], p["alpha"]) == (choice["lam"], choice["alpha"]))
    merged = next(v for k, v in dev.items() if k.startswith("Merged"))
    base = next(c for c in read_records(search / "checkpoints.jsonl") if c["t"] == 3)
    for cell, n in zip(merged, names):
        value, delta = (
            chosen_point["metrics"][n]["value"],
            chosen_point["metrics"][n]["value"] - base["metrics"][n]["value"],
        )
        assert cell == f"{fmt_metric(chosen_point['metrics'][n])} ({delta:+.3g})", (cell, value)
    assert "accuracy (n=50)" in report and "kl ↓ (n=50)" in report
    test = _table_rows(report, "## Table 2 style, test split")
    recorded = json.loads((search / "test.json").read_text())["models"]
    assert list(test) == [m["name"] for m in recorded]
    assert test["θ0"] == [fmt_metric(recorded[0]["metrics"][n]) for n in names]
    assert f"λ = {choice['lam']:g}, α = {choice['alpha']:g}" in report
    assert (search / "pareto.png").stat().st_size > 10_000
    assert "model: tiny" in report and "## Iterations" in report and "| loss |" in report
    assert "## Studies" not in report  # no studies/ in this run


def test_report_shows_studies_when_present(run_dir):
    studies = run_dir / "studies"
    studies.mkdir(exist_ok=True)
    (studies / "alpha").mkdir()
    (studies / "accuracy").mkdir()
    (studies / "alpha" / "alpha.json").write_text(
        json.dumps(
            {
                "what": "Table 1 / Fig. 2: scaling α with λ = 0",
                "alpha": [0.0, 0.5, 1.0],
                "series": {
                    "r_merged": {
                        "mean": [0.1, 0.2, 0.3],
                        "sem": [0.01, 0.01, 0.02],
                        "pearson_r": 0.999,
                        "p_value": 0.02,
                    }
                },
            }
        )
    )
    (studies / "accuracy" / "accuracy.json").write_text(json.dumps({
        "rows": ["theta1", "theta2"], "columns": ["theta1", "merged"], "accuracy": [[0.6, 0.7], [0.55, 0.65]]}))
    try:
        report = write_report(run_dir).read_text()
    finally:
        shutil.rmtree(studies)
    assert "### alpha" in report and "| 0.5 | 0.2 ± 0.01 |" in report and "r_merged: r = 0.999" in report
    assert "| theta2 | 0.550 | 0.650 |" in report


def test_report_without_a_search(tmp_path):
    (tmp_path / "config.yaml").write_text("x: 1\n")
    text = write_report(tmp_path).read_text()
    assert "No search results" in text and "x: 1" in text
    assert not re.search(r"Table 2", text)


def test_pareto_labels_never_overlap_where_points_crowd(tmp_path, monkeypatch):
    """A 7×7 grid whose points pile up (a discrete metric: many share one spot, as the demo's top right does): every
    label drawn sits clear of every other label and inside its panel; the frontier is labelled first."""
    from itermerge import plots
    from itermerge.report import plot_pareto

    lams, alphas = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    points = [{"lam": lam, "alpha": a, "metrics": {
        "accuracy": {"value": round(0.5 + 0.02 * min(i, 3) - 0.01 * j, 2), "stderr": 0.01, "n": 80},
        "reward": {"value": round(0.1 + 0.01 * min(j, 2), 2), "stderr": 0.01, "n": 80}}}
        for i, lam in enumerate(lams) for j, a in enumerate(alphas)]
    choice = {"rule": {"reward": "reward", "capability": ["accuracy"]}, "split": "dev", "lam": 0.3, "alpha": 0.2,
              "chosen": {"metrics": points[3 * 7 + 2]["metrics"]}}
    drawn = []
    real = plots.annotate_apart

    def spy(ax, labels, **kw):
        left_out = real(ax, labels, **kw)
        renderer = ax.figure.canvas.get_renderer()
        drawn.append(([t.get_window_extent(renderer) for t in ax.texts], ax.get_window_extent(renderer),
                      [t.get_text() for t in ax.texts], left_out, labels))
        return left_out

    monkeypatch.setattr("itermerge.report.annotate_apart", spy)
    plot_pareto(points, [], choice, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    (boxes, panel, texts, left_out, labels), = drawn
    assert len(texts) + left_out == len(labels) == 49 and len(texts) >= 10  # crowded, yet many labels fit
    for i, a in enumerate(boxes):
        assert panel.x0 <= a.x0 and a.x1 <= panel.x1 and panel.y0 <= a.y0 and a.y1 <= panel.y1, texts[i]
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (texts[i], texts)
    assert texts[0].startswith("λ=")  # a frontier point, named in full
