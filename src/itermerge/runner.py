"""The stage runner: every stage of a run goes through it, runs once, and only it writes the manifest.

A stage is a function that computes, writes its files atomically and returns a record (a JSON-able dict). The
runner skips a stage the manifest records as finished (with the same ``key``, when one is given), otherwise
runs it and records what it returned, so a run killed at any moment resumes at the first unfinished stage.
Under a distributed launch it is the one place that decides which process runs what: the main process runs
a stage and the others wait, except a stage that ``everyone`` runs (DPO training); only the main process writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from itermerge.rundir import Manifest

StageFn = Callable[[], "dict[str, Any] | None"]


class StageRunner:
    """Runs the stages of one run directory; ``accelerator`` is the launcher's (None on one process)."""

    def __init__(self, run_dir: str | os.PathLike, accelerator: Any = None):
        self.run_dir = Path(run_dir)
        self.accelerator = accelerator
        self.manifest = Manifest(self.run_dir)

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def done(self, name: str, key: Any = None) -> bool:
        """Whether ``name`` finished (under the same ``key``, when the stage has one)."""
        record = self.manifest.get(name)
        return record is not None and (key is None or record.get("key") == _plain(key))

    def __call__(self, name: str, fn: StageFn, *, everyone: bool = False, key: Any = None) -> dict[str, Any]:
        """Run stage ``name`` unless it finished; returns its record.

        ``key``: what the stage's result depends on beyond the run's training config (e.g. the search grid);
        a recorded stage with another key is run again. ``everyone``: every process runs it (a collective).
        """
        if self.done(name, key):
            return self.manifest.get(name)
        if self.is_main:
            print(f"── {name}", flush=True)
        record = (fn() or {}) if self.is_main or everyone else None
        if self.is_main:
            self.manifest.record(name, {**(record or {}), **({"key": _plain(key)} if key is not None else {})})
        self.barrier()
        return self.manifest.get(name)

    def barrier(self) -> None:
        """Every process waits here; then each reads what the main process recorded."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
            self.manifest.reload()


def _plain(value: Any) -> Any:
    """``value`` as the manifest stores it (tuples become lists), so a recorded key compares equal."""
    return json.loads(json.dumps(value, default=str))
