"""Run directory: atomic writes, the stage manifest, and resume."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itermerge.errors import ItermergeError


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary sibling, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if _write_error(e):
            raise write_failed(path, e) from e
        raise
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _write_error(e):
            raise write_failed(path, e) from e
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, then rename it onto ``path`` (a reader never sees half of it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _write_error(e):
            raise write_failed(path, e) from e
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``final`` only if the block completes.

    An existing ``final`` is refused unless ``force``; on any error the temporary directory is
    removed, so a crash never leaves a half-written output under the final name.
    """
    final = Path(final)
    if final.exists() and not force:
        raise ItermergeError(f"{final}: output directory exists; choose another path or pass --force to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _write_error(e):
            raise write_failed(final, e) from e
        raise


# What a failing write looks like: a full disk, a quota, a file too large, a read-only or failing device.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def _write_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _WRITE_ERRNOS


def write_failed(path: Path, error: OSError) -> ItermergeError:
    """A write that failed (a full disk, a quota, permissions): what was there before is intact, and the run resumes."""
    before = f"the previous {path.name} is intact" if path.exists() else f"nothing was written under {path.name}"
    return ItermergeError(f"{path}: writing failed ({error.strerror or error}); {before}. Free space (or fix the "
                          "cause) and rerun the same command: finished stages are kept")


class Manifest:
    """``manifest.json``: each completed stage and what it recorded; written atomically.

    A stage is recorded only after its files are complete, so a stage missing here is redone
    from scratch on resume; a stage present here is skipped while its files match what it recorded
    (``integrity``: size and mtime, or content under ``--verify``) and redone when they do not.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / "manifest.json"
        self.reload()

    def reload(self) -> None:
        """Read the file again (another process, the main one under a distributed launch, wrote it)."""
        self.data: dict[str, Any] = {"stages": {}}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError as e:
                raise ItermergeError(
                    f"{self.path}: not valid JSON ({e}); it is written atomically, so this file was edited "
                    "by hand — restore it or start a new run directory"
                ) from e

    @property
    def stages(self) -> dict[str, Any]:
        return self.data.setdefault("stages", {})

    def done(self, stage: str) -> bool:
        return stage in self.stages

    def get(self, stage: str) -> Any:
        return self.stages.get(stage)

    def record(self, stage: str, info: dict[str, Any] | None = None) -> None:
        self.stages[stage] = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **(info or {})}
        atomic_write_json(self.path, self.data)

    def set_meta(self, key: str, value: Any) -> None:
        self.data[key] = value
        atomic_write_json(self.path, self.data)


# --- where each file of a run lives -----------------------------------------------------------------------


@dataclass(frozen=True)
class IterationLayout:
    """The files of one iteration of Algorithm 1, iter_XX/: its prompts, θ_{t−1}'s samples, the pairs, the
    reference's log-probs, θ_t (and its adapter) and the metrics."""

    dir: Path

    prompts = property(lambda self: self.dir / "prompts.jsonl")  # X_t, as sampled
    samples = property(lambda self: self.dir / "samples.jsonl")  # K completions per prompt from θ_{t−1}
    pairs = property(lambda self: self.dir / "pairs.jsonl")  # D_t: best vs worst (ties dropped)
    reference_logprobs = property(lambda self: self.dir / "reference_logprobs.jsonl")  # π_ref's, computed once
    model = property(lambda self: self.dir / "model")  # θ_t
    adapter = property(lambda self: self.dir / "adapter")  # θ_t's LoRA adapter (dpo.peft)
    metrics = property(lambda self: self.dir / "metrics.json")  # the iteration's numbers (report.md's table)
    training_metrics = "training_metrics.json"  # written inside model/ beside the weights


@dataclass(frozen=True)
class SearchLayout:
    """The files of one search directory: search/ (θ1..θT), or search_T{T'}/ (θ1..θ_T' alone)."""

    dir: Path

    points = property(lambda self: self.dir / "points.jsonl")  # the (λ, α) points on dev, one record each
    checkpoints = property(lambda self: self.dir / "checkpoints.jsonl")  # θ0..θT on dev
    choice = property(lambda self: self.dir / "choice.json")  # the rule's choice, ExPO's α, the best θt on dev
    test = property(lambda self: self.dir / "test.json")  # the test table
    eval_config = property(lambda self: self.dir / "eval_config.json")  # what measured them
    operator_records = property(lambda self: self.dir / "operators.jsonl")  # other operators' candidates on dev
    operators = property(lambda self: self.dir / "operators.json")  # each operator's choice, tested once
    pareto = property(lambda self: self.dir / "pareto.png")
    rounds = property(lambda self: self.dir / "rounds")  # successive halving's rounds

    def round(self, r: int) -> Path:
        return self.rounds / f"round_{r}.jsonl"

    def round_files(self) -> list[Path]:
        return sorted(self.rounds.glob("round_*.jsonl"))

    @property
    def at(self) -> int | None:
        """T' of a search_T{T'}/ directory; None for the search of every iteration."""
        tail = self.dir.name[len(SEARCH):]
        return int(tail[2:]) if tail.startswith("_T") and tail[2:].isdigit() else None


SEARCH = "search"


@dataclass(frozen=True)
class RunLayout:
    """Every name in a run directory, so that no module spells one: iter_XX/ per iteration of Algorithm 1, the
    searches, the merge, the caches, the studies, the manifest, the config and the report."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.yaml")
    manifest = property(lambda self: self.root / "manifest.json")
    report = property(lambda self: self.root / "report.md")
    merged = property(lambda self: self.root / "merged")  # the chosen merge, written once
    pruned = property(lambda self: self.root / "pruned.json")  # weights a finished study run let go (replicates)
    cache = property(lambda self: self.root / "cache")  # what can be recomputed (θ̄)
    studies = property(lambda self: self.root / "studies")

    def iteration(self, t: int) -> Path:
        """iter_XX/: iteration t's prompts, samples, pairs, θ0's log-probs, θ_t (model/, adapter/) and metrics."""
        return self.root / f"iter_{t:02d}"

    def iterations(self) -> list[Path]:
        """The iteration directories present, in order."""
        return sorted(p for p in self.root.glob("iter_*") if p.is_dir())

    def files(self, t: int) -> IterationLayout:
        """The files of iteration t (``IterationLayout``)."""
        return IterationLayout(self.iteration(t))

    def checkpoints(self) -> list[Path]:
        """θ1..θT present: iter_XX/model, in order."""
        return [m for m in (IterationLayout(p).model for p in self.iterations()) if m.is_dir()]

    def mean_cache(self, at: int | None = None) -> Path:
        """θ̄ = mean(θ1..θ_{T−1}) (of θ1..θ_{T'−1} for the search of the first T' iterations)."""
        return self.cache / f"mean_intermediate{_tag(at)}"

    def search(self, at: int | None = None) -> SearchLayout:
        return SearchLayout(self.root / f"{SEARCH}{_tag(at)}")

    def searches(self) -> list[SearchLayout]:
        """The search directories present (search*/): every iteration's first, then each T' in increasing order,
        then any other (a bench's search_grid/ beside its search_halving/), by name."""
        found = [SearchLayout(p) for p in self.root.glob(f"{SEARCH}*") if p.is_dir()]
        return sorted(found, key=lambda s: (s.dir.name != SEARCH, s.at is None, s.at or 0, s.dir.name))

    provenance = property(lambda self: self.root / "provenance.json")  # the code and versions of each invocation
    wall_time = property(lambda self: self.root / "wall_time.json")  # the wall seconds of each invocation

    def study(self, name: str) -> Path:
        return self.studies / name

    def study_result(self, name: str) -> Path:
        """studies/NAME/RESULT.json: a study's numbers (``STUDY_RESULTS``); its plot is the same name in PNG."""
        if name not in STUDY_RESULTS:
            raise ItermergeError(f"study {name!r}: not one of {', '.join(STUDY_RESULTS)}")
        return self.study(name) / STUDY_RESULTS[name]


# Each study's result file in studies/NAME/ (the ensemble study measures the merge's approximation of eq. 6).
STUDY_RESULTS = {"alpha": "alpha.json", "accuracy": "accuracy.json", "ensemble": "approximation.json",
                 "lambda": "lambda.json"}


@dataclass(frozen=True)
class ReplicateLayout:
    """A replicated study's directory (``itermerge replicate``): one run directory per regime and seed, the study as
    run (study.json) and what its runs pool to (aggregate.json)."""

    root: Path

    record = property(lambda self: self.root / "study.json")
    aggregate = property(lambda self: self.root / "aggregate.json")

    def run(self, regime: str, seed: int) -> Path:
        return self.root / regime / f"seed_{seed}"


def _tag(at: int | None) -> str:
    return "" if at is None else f"_T{at}"
