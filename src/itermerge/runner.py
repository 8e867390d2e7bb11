"""The stage runner: every stage of a run goes through it, runs once, and only it writes the manifest.

A stage is a function that computes, writes its files atomically and returns a record (a JSON-able dict). The
runner skips a stage the manifest records as finished (with the same ``key``, when one is given), otherwise
runs it and records what it returned together with a proof of each file it declared (size, mtime, content
hash: ``integrity.prove``), so a run killed at any moment resumes at the first unfinished stage, and a finished
stage whose files were since removed or changed is redone, with every stage after it, instead of trusted.

Under a distributed launch it is the one place that decides which process runs what: the main process runs a
stage and the others wait, except a stage that ``everyone`` runs (DPO training); only the main process writes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from itermerge.integrity import check, prove
from itermerge.rundir import Manifest

StageFn = Callable[[], "dict[str, Any] | None"]


class StageRunner:
    """Runs the stages of one run directory; ``accelerator`` is the launcher's (None on one process).

    ``verify``: check every finished stage's files by content (not only existence, size and mtime).
    """

    def __init__(self, run_dir: str | os.PathLike, accelerator: Any = None, *, verify: bool = False, lock: Any = None):
        self.run_dir = Path(run_dir)
        self.accelerator = accelerator
        self.verify = verify
        self.lock = lock  # the run directory's RunLock, held by the main process
        self.manifest = Manifest(self.run_dir)
        self.redo_rest: str | None = None  # the stage whose changed files force every later stage to be redone

    def close(self) -> None:
        """Release the run directory's lock (the process's end releases it too)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> StageRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def done(self, name: str, key: Any = None) -> bool:
        """Whether ``name`` finished (under the same ``key``, when the stage has one)."""
        record = self.manifest.get(name)
        return record is not None and (key is None or record.get("key") == _plain(key))

    def __call__(
        self, name: str, fn: StageFn, *, outputs: Sequence[str | os.PathLike] = (), everyone: bool = False,
        key: Any = None,
    ) -> dict[str, Any]:
        """Run stage ``name`` unless it finished and its files are as it left them; returns its record.

        ``outputs``: the files and directories the stage writes, proved after it (checked on every resume).
        ``key``: what the stage's result depends on beyond the run's training config (e.g. the search grid);
        a recorded stage with another key is run again. ``everyone``: every process runs it (a collective).
        """
        old, repaired = self.manifest.get(name), False
        if self.done(name, key) and self.redo_rest is None:
            problems = check(old.get("files", []), self.run_dir, deep=self.verify)
            if not problems:
                return old
            self._say(f"── {name}: its files changed since it finished ({'; '.join(problems)}); redoing it")
            repaired = True
        elif old is not None and self.redo_rest is not None:
            self._say(f"── {name}: redone, because {self.redo_rest} was")
            self._remove(old)  # appended files (search points) must not carry results made from the old inputs
        elif self.is_main:
            print(f"── {name}", flush=True)
        record = (fn() or {}) if self.is_main or everyone else None
        if self.is_main:
            files = prove(list(outputs), self.run_dir)
            if repaired and _hashes(old.get("files", [])) != _hashes(files):
                self.redo_rest = name  # its files came out different: everything after it used the old ones
            extra = {"key": _plain(key)} if key is not None else {}
            self.manifest.record(name, {**(record or {}), **extra, "files": files})
        self.barrier()
        if self.accelerator is not None:
            self.redo_rest = self._shared(self.redo_rest)
        return self.manifest.get(name)

    def barrier(self) -> None:
        """Every process waits here; then each reads what the main process recorded."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
            self.manifest.reload()

    def _shared(self, value: Any) -> Any:
        """The main process's ``value`` on every process."""
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def _say(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def _remove(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        for proof in record.get("files", []):
            path = self.run_dir / proof["path"]
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def stage_states(run_dir: str | os.PathLike, deep: bool = False) -> list[tuple[str, str]]:
    """(stage, state) for every stage the manifest records, without changing anything: "ok", the problems with
    its files in words, or "no proof" for a stage recorded before stages proved their files."""
    manifest = Manifest(run_dir)
    states = []
    for name, record in manifest.stages.items():
        if "files" not in record:
            states.append((name, "no proof (recorded by an older itermerge; trusted as it is)"))
            continue
        problems = check(record["files"], Path(run_dir), deep=deep)
        states.append((name, "; ".join(problems) if problems else "ok"))
    return states


def _hashes(proofs: list[dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    return [(p["path"], p.get("hash"), p.get("meta_hash")) for p in proofs]


def _plain(value: Any) -> Any:
    """``value`` as the manifest stores it (tuples become lists), so a recorded key compares equal."""
    return json.loads(json.dumps(value, default=str))
