"""A finished study run without its weights: ``replicate --prune-checkpoints`` keeps the records a study reads and
lets θ1..θT and the merge go, listing them in pruned.json so that a rerun skips the run (or refuses it under
another config) rather than redoing it stage by stage without weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from itermerge.config import RunConfig, as_recorded
from itermerge.errors import ItermergeError
from itermerge.rundir import RunLayout, atomic_write_json

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def prune_weights(run_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    """Delete a finished run's weights (θ1..θT's model/ and the merge's; adapters are small and stay), after
    recording in pruned.json what went, how many bytes, and the config the run was made with: a study reads only
    the records (search/*.json, provenance, wall time), and ``pruned`` lets a rerun skip the run. The record is
    written first, so a crash midway leaves a run that the next ``pruned`` call finishes pruning."""
    layout = RunLayout(run_dir)
    files = sorted(str(f.relative_to(run_dir)) for d in [*layout.checkpoints(), layout.merged] if d.is_dir()
                   for f in d.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    record = {"files": files, "bytes": sum((run_dir / f).stat().st_size for f in files), "config": as_recorded(cfg),
              "why": "itermerge replicate --prune-checkpoints: a finished study run keeps its records, not its weights"}
    atomic_write_json(layout.pruned, record)
    for f in files:
        (run_dir / f).unlink(missing_ok=True)
    return record


def pruned(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether ``run_dir`` is a finished run whose weights ``prune_weights`` let go (finishing a pruning a crash cut
    short); refused when ``cfg`` is not the config it was made with, since a run without weights cannot be redone
    stage by stage."""
    path = RunLayout(run_dir).pruned
    if not path.exists():
        return False
    record = json.loads(path.read_text())
    recorded = as_recorded(record["config"], where=str(path))  # settings added since then compare as their defaults
    made, now = ({k: v for k, v in c.items() if k != "name"} for c in (recorded, as_recorded(cfg)))
    if made != now:
        changed = sorted(k for k in set(made) | set(now) if made.get(k) != now.get(k))
        raise ItermergeError(f"{run_dir}: its weights were pruned ({path.name}) and this study asks for a different "
                             f"{', '.join(changed)} section; a run without weights cannot be redone stage by stage: "
                             f"delete {run_dir} to run it again, or rerun the study it was made with")
    for f in record["files"]:
        (run_dir / f).unlink(missing_ok=True)
    return True
