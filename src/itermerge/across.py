"""Regimes against each other, seed by seed on the test prompts they share (a study file's ``across: REGIME``).

A study's regimes differ in one setting (the learning rate; the DPO reference policy of issue 27) and share the dev
and test prompts, so regime A's model of seed s and regime B's of the same seed were scored on the same prompts:
their difference is paired prompt by prompt and pooled over seeds like every comparison within a regime. The anchor
regime's merge is compared with each other regime's θT and merge, and the anchor's θT with theirs: "the paper's
fixed reference and merge against TR-DPO's soft update, with and without the merge".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from itermerge.rundir import ReplicateLayout, SearchLayout

# (the anchor's row, the other regime's row): a row key of test.json, "T" standing for θT
COMPARED = (("merged", "T"), ("merged", "merged"), ("T", "T"))


def pool_rows(a_rows: Sequence[dict[str, Any]], b_rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Row a − row b per metric both hold per prompt, seed by seed (``a_rows[s]`` against ``b_rows[s]``), pooled:
    the crossed bootstrap when every seed has the same number of prompts (shared test prompts), else the
    hierarchical one."""
    from itermerge.maths.crossed import crossed_paired_difference
    from itermerge.maths.paired import pooled_paired_difference

    metrics = {}
    for name in a_rows[0]["metrics"]:
        groups = [(a["metrics"][name].get("items"), b["metrics"].get(name, {}).get("items"))
                  for a, b in zip(a_rows, b_rows)]
        if all(a is not None and b is not None and len(a) == len(b) for a, b in groups):
            shared = len({len(a) for a, _ in groups}) == 1
            metrics[name] = (crossed_paired_difference if shared else pooled_paired_difference)(groups)
    return metrics


def across_regimes(out: str | Path, anchor: str, regimes: Sequence[str]) -> dict[str, Any]:
    """{"anchor", "searches": {search: [comparison, …]}}: for every other regime and every search both ran (search,
    search_T3, …), the anchor's row minus the other's for each of ``COMPARED``, over the seeds both finished."""
    layout = ReplicateLayout(Path(out))
    searches: dict[str, list[dict[str, Any]]] = {}
    for other in (r for r in regimes if r != anchor):
        for name in _search_names(layout.root / anchor):
            pairs = _paired_tests(layout, anchor, other, name)
            if not pairs:
                continue
            for a_key, b_key in COMPARED:
                rows = [(_row(a, a_key), _row(b, b_key)) for a, b in pairs.values()]
                if any(a is None or b is None for a, b in rows):
                    continue
                searches.setdefault(name, []).append({
                    "a": [anchor, a_key], "b": [other, b_key], "seeds": sorted(pairs),
                    "a_name": f"{anchor}: {_label(a_key)}", "b_name": f"{other}: {_label(b_key)}",
                    "metrics": pool_rows([a for a, _ in rows], [b for _, b in rows])})
    return {"anchor": anchor, "searches": searches}


def _search_names(regime_dir: Path) -> list[str]:
    return sorted({t.parent.name for t in regime_dir.glob("seed_*/search*/test.json")})


def _paired_tests(layout: ReplicateLayout, a: str, b: str, search: str) -> dict[int, tuple[dict, dict]]:
    """{seed: (regime a's test.json, regime b's)} for the seeds where both finished ``search``."""
    out = {}
    for path in sorted((layout.root / a).glob(f"seed_*/{search}/test.json")):
        seed = int(path.parent.parent.name.split("_")[1])
        other = SearchLayout(layout.run(b, seed) / search).test
        if other.exists():
            out[seed] = (json.loads(path.read_text()), json.loads(other.read_text()))
    return out


def _row(test: dict[str, Any], key: str) -> dict[str, Any] | None:
    T = max(m["t"] for m in test["models"] if isinstance(m["t"], int))
    want = T if key == "T" else key
    return next((m for m in test["models"] if m["t"] == want), None)


def _label(key: str) -> str:
    return "θT" if key == "T" else "its merge"
