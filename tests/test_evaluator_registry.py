"""Every evaluator in the registry is reachable from the CLI, the config, the evaluation loop and the report: a new
evaluator is one module, its config section and one registry line, and this test enumerates them."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from conftest import tiny_model, tiny_tokenizer

from itermerge.cli import build_parser
from itermerge.config import from_dict
from itermerge.errors import ItermergeError
from itermerge.evaluation import Evaluator, metrics_to_dict
from itermerge.evaluation.evaluators import REGISTRY, lower_is_better, markdown_table, metric_order
from itermerge.tables import metrics_table

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"
AXIS = "itermerge.tasks.instruction_following:arithmetic_metrics"

# Each evaluator alone on, as a user writes its section under `evaluation:` (lm_eval's task is written per test).
SECTIONS = {
    "accuracy": {},
    "reward": {},
    "axes": [{"name": "arith", "metrics": AXIS, "splits": ["dev"]}],
    "kl": {"samples": 2},
    "lm_eval": {"tasks": [{"name": "itermerge_tiny"}], "split_documents": False, "batch_size": 4},
}


def alone(name: str, **extra) -> dict:
    """An evaluation section with ``name`` the only evaluator on (the arithmetic task's 4 dev prompts)."""
    section = {**SECTIONS[name], **extra} if isinstance(SECTIONS[name], dict) else SECTIONS[name]
    return {"prompts": {"n": 4}, "max_new_tokens": 4, "batch_size": 8, "accuracy": None, "reward": None,
            name: section, **({"accuracy": {}} if name == "axes" else {})}  # an axis on the split reads its replies


def test_every_registered_evaluator_has_a_case_here():
    assert set(SECTIONS) == set(REGISTRY), "add the new evaluator's config section to SECTIONS"


@pytest.mark.parametrize("name", list(REGISTRY))
def test_the_eval_cli_lists_the_evaluator_and_the_config_turns_it_on(name):
    spec = REGISTRY[name]
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = re.sub(r"\s+", " ", sub.choices["eval"].format_help())
    summary = re.sub(r"\s+", " ", spec.summary)
    assert f"evaluation.{name}: {summary}" in text
    cfg = from_dict({"evaluation": alone(name)}).evaluation
    assert [s.name for s in REGISTRY.values() if s.on(cfg)] == (["accuracy", name] if name == "axes" else [name])
    assert set(spec.metrics) <= set(cfg.metrics())  # a selection rule may name what it always reports


@pytest.mark.parametrize("name", list(REGISTRY))
def test_the_evaluator_measures_what_it_declares_and_the_report_shows_it(name, tmp_path):
    """On a 2-layer model: the loop runs the evaluator, its metrics are the names it declares (an axis's and a
    benchmark's prefixed), its time is recorded under its name, and the report's table has a column for each, marked
    ↓ exactly where it declared lower is better."""
    spec, tok, model = REGISTRY[name], tiny_tokenizer(), tiny_model(0)
    extra = {}
    if name == "lm_eval":
        if importlib.util.find_spec("lm_eval") is None:
            pytest.skip("lm-eval not installed (pip install 'itermerge[eval]')")
        from test_evaluation import _local_task

        extra = {"include_path": str(_local_task(tmp_path / "tasks", model, tok))}
    cfg = from_dict({"evaluation": alone(name, **extra)}).evaluation
    reference = tiny_model(1) if spec.needs_reference else None
    timings: dict[str, float] = {}
    out = Evaluator(cfg, tok, "dev", reference_model=reference, progress=False)(model, timings)
    prefixed = {"axes": "arith/", "lm_eval": "lm_eval/"}.get(name)
    mine = [m for m in out if (m.startswith(prefixed) if prefixed else m in spec.metrics)]
    assert mine and (set(mine) == set(spec.metrics) if not prefixed else len(mine) >= 1), out
    assert f"{name}_s" in timings and "generate_s" in timings
    header = metrics_table([("θ", {"metrics": metrics_to_dict(out)})]).splitlines()[0]
    for metric in mine:
        arrow = " ↓" if metric in spec.lower_is_better else ""
        assert f"| {metric}{arrow} (n=" in header, (metric, header)


@pytest.mark.parametrize("name", [n for n, s in REGISTRY.items() if s.needs_reference])
def test_an_evaluator_that_reads_the_reference_refuses_to_start_without_it(name):
    cfg = from_dict({"evaluation": alone(name)}).evaluation
    with pytest.raises(ItermergeError, match="reference"):
        Evaluator(cfg, tiny_tokenizer(), "dev", progress=False)


def test_directions_and_table_order_come_from_the_declarations():
    assert lower_is_better() == frozenset().union(*(s.lower_is_better for s in REGISTRY.values())) == {"kl"}
    assert metric_order() == ("accuracy", "format", "reward", "kl")


def test_the_design_page_holds_the_generated_evaluators_table():
    text = DESIGN.read_text()
    start, end = "<!-- evaluators table: itermerge.evaluation.evaluators.markdown_table() -->\n", \
        "<!-- end evaluators table -->"
    assert start in text and end in text, f"{DESIGN}: the markers around the evaluators table are missing"
    assert text.split(start)[1].split(end)[0] == markdown_table(), (
        "docs/design.md's evaluators table is stale; regenerate it with python -c 'from "
        "itermerge.evaluation.evaluators import markdown_table; print(markdown_table(), end=\"\")'")
