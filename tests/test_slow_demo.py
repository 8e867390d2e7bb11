"""The real thing, once: `itermerge demo --quick` on SmolLM2-135M end to end (make test runs the slow marker)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _finite_numbers(obj) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _finite_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _finite_numbers(v)]
    return [obj] if isinstance(obj, float) else []


def test_quick_demo_end_to_end(tmp_path):
    from itermerge.cli import main

    run_dir = Path(os.environ.get("ITERMERGE_SLOW_RUN_DIR", tmp_path / "demo-quick"))
    assert main(["demo", "--quick", "--run-dir", str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    for section in ("Table 2 style, dev split", "test split", "Fig. 5", "accuracy", "alpha", "approximation"):
        assert section in report, section
    for png in (
        "search/pareto.png",
        "studies/alpha/alpha.png",
        "studies/accuracy/accuracy.png",
        "studies/ensemble/approximation.png",
    ):
        assert (run_dir / png).stat().st_size > 1000, png
    test = json.loads((run_dir / "search" / "test.json").read_text())
    numbers = _finite_numbers(test)
    assert numbers and all(math.isfinite(x) for x in numbers)
    for t in (1, 2):
        metrics = json.loads((run_dir / f"iter_{t:02d}" / "metrics.json").read_text())
        assert math.isfinite(metrics["loss"]) and metrics["pairs"] > 0
    assert (run_dir / "merged" / "merge.json").exists()
