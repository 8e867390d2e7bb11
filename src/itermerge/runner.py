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
import pickle
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from itermerge.devices import peak_memory_gib, reset_peak_memory
from itermerge.integrity import check, prove
from itermerge.rundir import Manifest, atomic_write_bytes

StageFn = Callable[[], "dict[str, Any] | None"]


class Shard:
    """This process's share of a data-parallel stage: every ``world``-th item from ``rank`` on (strided, so that
    items sorted by cost spread evenly), and how many it took."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world, self.taken = rank, world, 0

    def take(self, items: Sequence[Any]) -> list[Any]:
        mine = list(items[self.rank :: self.world])
        self.taken += len(mine)
        return mine

    def indices(self, n: int) -> list[int]:
        """The positions in 0..n-1 that are this process's (``take(range(n))``)."""
        return self.take(range(n))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def unshard(parts: Sequence[Sequence[Any]], n: int) -> list[Any]:
    """The items of strided parts (``Shard.take`` of each rank, in rank order) back in their original order."""
    out: list[Any] = [None] * n
    for rank, part in enumerate(parts):
        out[rank :: len(parts)] = part
    return out


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
        old, repaired, skip = self._begin(name, key)
        if skip:
            return old
        reset_peak_memory()
        start = time.perf_counter()
        record = (fn() or {}) if self.is_main or everyone else None
        if record is not None:
            record = {**record, **_costs(start)}
        return self._finish(name, record, outputs, key, old, repaired)

    def sharded(
        self, name: str, work: Callable[[Shard], Any], finish: Callable[[list[Any]], dict[str, Any] | None], *,
        outputs: Sequence[str | os.PathLike] = (), key: Any = None,
    ) -> dict[str, Any]:
        """A data-parallel stage: ``work(shard)`` runs on every process, each on its own share of the items
        (``shard.take``), and returns its part; ``finish(parts)``, on the main process, gets the parts in rank
        order and writes the stage's files. Each process's share (items, seconds) is recorded as ``shards``.

        Parts travel through files under run_dir/.shards (no size limit, no collective but the barrier).
        """
        old, repaired, skip = self._begin(name, key)
        if skip:
            return old
        shard = Shard(self.rank, self.world)
        reset_peak_memory()
        start = time.perf_counter()
        part = work(shard)
        share = {"rank": shard.rank, "items": shard.taken, **_costs(start)}
        parts = self._gather(name, (part, share))
        record = None
        if self.is_main:
            begun = time.perf_counter()
            record = finish([p for p, _ in parts]) or {}
            record["shards"] = [s for _, s in parts]
            record["finish_seconds"] = round(time.perf_counter() - begun, 3)
        return self._finish(name, record, outputs, key, old, repaired)

    @property
    def rank(self) -> int:
        return 0 if self.accelerator is None else self.accelerator.process_index

    @property
    def world(self) -> int:
        return 1 if self.accelerator is None else self.accelerator.num_processes

    def _begin(self, name: str, key: Any) -> tuple[dict[str, Any] | None, bool, bool]:
        """(the recorded stage or None, whether its files were damaged and it is being repaired, whether it can be
        skipped), having said why a recorded stage is run again."""
        old = self.manifest.get(name)
        if self.done(name, key) and self.redo_rest is None:
            problems = check(old.get("files", []), self.run_dir, deep=self.verify)
            if not problems:
                return old, False, True
            self._say(f"── {name}: its files changed since it finished ({'; '.join(problems)}); redoing it")
            return old, True, False
        if old is not None and self.redo_rest is not None:
            self._say(f"── {name}: redone, because {self.redo_rest} was")
            self._remove(old)  # appended files (search points) must not carry results made from the old inputs
        else:
            self._say(f"── {name}")
        return old, False, False

    def _finish(self, name: str, record: dict[str, Any] | None, outputs: Sequence[str | os.PathLike], key: Any,
                old: dict[str, Any] | None, repaired: bool) -> dict[str, Any]:
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

    def _gather(self, name: str, part: Any) -> list[Any]:
        """Every process's ``part``, in rank order, on the main process (one process: just this one)."""
        if self.accelerator is None or self.world == 1:
            return [part]
        folder = self.run_dir / ".shards" / name.replace("/", "__")
        atomic_write_bytes(folder / f"part-{self.rank:05d}-of-{self.world:05d}.pkl", pickle.dumps(part))
        self.accelerator.wait_for_everyone()
        parts = []
        if self.is_main:
            parts = [pickle.loads((folder / f"part-{r:05d}-of-{self.world:05d}.pkl").read_bytes())
                     for r in range(self.world)]
            shutil.rmtree(folder, ignore_errors=True)
        return parts

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

    def _say(self, text: str) -> None:  # the main process speaks for all
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


def _costs(start: float) -> dict[str, Any]:
    """Wall seconds since ``start`` and, on a GPU, the most device memory torch held meanwhile."""
    peak = peak_memory_gib()
    return {"seconds": round(time.perf_counter() - start, 3), **({"device_peak_gib": peak} if peak is not None else {})}


def _hashes(proofs: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """What decides whether a redone stage's files came out the same: each file's content, a checkpoint's weights
    (the files beside them hold timings, which differ every time)."""
    return [(p["path"], p.get("hash")) for p in proofs]


def _plain(value: Any) -> Any:
    """``value`` as the manifest stores it (tuples become lists), so a recorded key compares equal."""
    return json.loads(json.dumps(value, default=str))
