"""Run-directory integrity: one process per run directory, proofs of stage outputs, finite weights."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import xxhash

from itermerge.errors import ItermergeError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; RunLock warns once and proceeds
    fcntl = None

LOCK_NAME = ".lock"
READ_BLOCK = 1 << 20  # bytes per read when hashing a file
FINITE_BLOCK = 1 << 20  # elements per read when scanning a tensor for NaN/Inf
# Formats numpy cannot test with isfinite, stored as raw bits: a value is NaN/Inf when (bits & mask) == mask.
NONFINITE_BITS = {"BF16": 0x7F80, "F8_E4M3": 0x7F, "F8_E5M2": 0x7C}
NUMPY_FLOATS = {"F64", "F32", "F16"}

# Lock files this process holds → [fd, holds, pid]: nested RunLocks on one run directory share one flock.
_HELD: dict[str, list[int]] = {}
_HELD_GUARD = threading.Lock()
_warned_no_fcntl = False


def _reader(path: Path):
    from itermerge.checkpoint.reader import CheckpointReader

    return CheckpointReader(path)


class RunLock:
    """An advisory ``flock`` on ``run_dir/.lock``: one process per run directory.

    The kernel drops the lock when the holder's last descriptor closes, so a killed holder (even
    SIGKILL) never leaves a stale lock, and the file itself is never deleted (deleting it would let
    two processes lock two different files). The holder writes its PID, host, start time and command
    into the file so a refused process can say who holds it. Re-entrant within a process: any number
    of nested ``acquire`` calls, on this object or another RunLock of the same directory, share one
    lock, released when the last of them is. The descriptor is close-on-exec, but a child made by a
    bare ``fork`` shares it and keeps the lock held until it exits too.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._holds = 0

    def acquire(self) -> RunLock:
        global _warned_no_fcntl
        key = os.path.abspath(self.path)
        with _HELD_GUARD:
            entry = _HELD.get(key)
            if entry is not None and entry[2] == os.getpid():
                entry[1] += 1
            elif fcntl is None:
                if not _warned_no_fcntl:
                    warnings.warn("this platform has no fcntl: run directories are not locked", stacklevel=2)
                    _warned_no_fcntl = True
                _HELD[key] = [-1, 1, os.getpid()]
            else:
                _HELD[key] = [self._lock(), 1, os.getpid()]
        self._holds += 1
        return self

    def release(self) -> None:
        if not self._holds:
            return
        self._holds -= 1
        key = os.path.abspath(self.path)
        with _HELD_GUARD:
            entry = _HELD[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _HELD[key]
                if entry[0] >= 0:
                    os.close(entry[0])  # closing the last descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _lock(self) -> int:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ItermergeError(
                f"{self.path}: cannot open the run lock ({e}); the run directory must be a writable directory"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ItermergeError(
                f"{self.run_dir}: run directory in use by {holder}; wait for that process to finish, "
                "or give this run another run directory"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return fd


def _read_holder(fd: int) -> str:
    """Who holds the lock, in words; the holder writes itself in just after locking, so retry briefly."""
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 1 << 16, 0))
            command = " ".join(str(a) for a in info["argv"])
            return f"PID {info['pid']} on {info['host']} since {info['started_at']} ({command})"
        except (ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "another process (its PID is not yet written to the lock file)"


# --- proofs of stage outputs -----------------------------------------------------------------------


def _file_hash(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            h.update(block)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def _tree_hash(directory: Path, files: list[Path]) -> str:
    """xxh3-128 over each file's name relative to ``directory`` and the xxh3-128 of its bytes."""
    h = xxhash.xxh3_128()
    for f in files:
        h.update(f.relative_to(directory).as_posix().encode() + b"\0")
        h.update(bytes.fromhex(_file_hash(f)))
    return h.hexdigest()


def _hashes(full: Path, kind: str) -> dict[str, str]:
    """A checkpoint's "hash" is its weights' content hash, as a merge records it; "meta_hash" covers the rest."""
    if kind == "file":
        return {"hash": _file_hash(full)}
    if kind == "dir":
        return {"hash": _tree_hash(full, _files(full))}
    reader = _reader(full)
    try:
        weights = reader.content_hash()
    finally:
        reader.close()
    return {"hash": weights, "meta_hash": _tree_hash(full, [f for f in _files(full) if f.suffix != ".safetensors"])}


def _stats(full: Path) -> dict[str, list[int]]:
    """Relative name → [size, mtime_ns] of every file in a directory."""
    return {f.relative_to(full).as_posix(): [(s := f.stat()).st_size, s.st_mtime_ns] for f in _files(full)}


def prove(paths: list[Path], root: Path) -> list[dict[str, Any]]:
    """One record per output of a stage, for ``check`` to vouch for it later.

    ``paths`` are paths as one opens them (absolute, or relative to the current directory) and must
    lie under ``root``; records name them relative to ``root``, so a copied run directory still checks.
    A directory records the total size and latest mtime of its files, plus each file's in ``files``.
    """
    root_abs, records = os.path.abspath(root), []
    for p in paths:
        full = Path(os.path.abspath(p))
        if not full.is_relative_to(root_abs):
            raise ItermergeError(f"{p}: an output to prove lies outside the run directory {root}; pass paths under it")
        rel = full.relative_to(root_abs).as_posix()
        if full.is_file():
            st = full.stat()
            records.append({"path": rel, "kind": "file", "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                            **_hashes(full, "file")})
        elif full.is_dir():
            kind = "checkpoint" if any(full.glob("*.safetensors")) else "dir"
            stats = _stats(full)
            records.append({"path": rel, "kind": kind, "size": sum(s for s, _ in stats.values()),
                            "mtime_ns": max((m for _, m in stats.values()), default=full.stat().st_mtime_ns),
                            "files": stats, **_hashes(full, kind)})
        else:
            raise ItermergeError(f"{p}: an output to prove does not exist; prove a stage's outputs after writing them")
    return records


def check(proofs: list[dict[str, Any]], root: Path, deep: bool = False) -> list[str]:
    """Problems, in words, with the outputs ``proofs`` describe under ``root``; [] when all hold.

    Cheap checks first (existence, sizes, mtimes); the content is hashed only where an mtime changed
    or ``deep``. A changed mtime over the same content is no problem: copies keep the content, not the
    mtimes. ``deep`` also catches bytes edited in place with the mtime put back.
    """
    problems: list[str] = []
    for i, proof in enumerate(proofs):
        try:
            rel, kind, size, mtime = (proof[k] for k in ("path", "kind", "size", "mtime_ns"))
            files = proof["files"] if kind != "file" else None
            digests = {k: proof[k] for k in (("hash", "meta_hash") if kind == "checkpoint" else ("hash",))}
        except (KeyError, TypeError) as e:
            raise ItermergeError(
                f"proof {i} ({proof!r}): malformed, no {e}; re-run the stage that wrote it to record it again"
            ) from e
        full = Path(root) / rel
        if not full.exists():
            problems.append(f"{rel}: missing")
            continue
        if full.is_dir() != (files is not None):
            was, is_now = ("a directory", "a file") if files is not None else ("a file", "a directory")
            problems.append(f"{rel}: {is_now} now, {was} when proved")
            continue
        if kind == "file":
            st = full.stat()
            found = _size_problems(rel, {"": [size, mtime]}, {"": [st.st_size, st.st_mtime_ns]})
            moved = st.st_mtime_ns != mtime
        else:
            now = _stats(full)
            found = _size_problems(rel, files, now)
            moved = any(now[name][1] != m for name, (_, m) in files.items())
        problems += found
        if found or not (moved or deep):
            continue  # a size problem is reported without reading the bytes
        try:
            new = _hashes(full, kind)
        except ItermergeError as e:
            problems.append(f"{rel}: unreadable ({e})")
            continue
        for key, what in (("hash", "content changed"), ("meta_hash", "files beside the weights changed")):
            if key in digests and new[key] != digests[key]:
                problems.append(f"{rel}: {what} ({key} {digests[key][:16]}… → {new[key][:16]}…)")
    return problems


def _size_problems(rel: str, then: dict[str, list[int]], now: dict[str, list[int]]) -> list[str]:
    """Missing, added and resized files; names are relative to ``rel`` ("" is ``rel`` itself)."""
    problems = []
    for name in sorted(then.keys() | now.keys()):
        where = f"{rel}/{name}" if name else rel
        if name not in now:
            problems.append(f"{where}: missing")
        elif name not in then:
            problems.append(f"{where}: not in the proof (added later?)")
        elif now[name][0] != then[name][0]:
            old, new = then[name][0], now[name][0]
            problems.append(f"{where}: size {old} → {new} ({'truncated?' if new < old else 'grew'})")
    return problems


# --- finite weights ----------------------------------------------------------------------------------


def nonfinite_tensors(checkpoint_dir: str | os.PathLike) -> list[str]:
    """Names of the tensors of a safetensors checkpoint that hold NaN or ±Inf, read in blocks (no torch)."""
    import numpy as np

    reader = _reader(Path(checkpoint_dir))
    bad = []
    try:
        for name in reader:
            dtype, numel = reader.dtype(name), reader.numel(name)
            if dtype not in NUMPY_FLOATS and dtype not in NONFINITE_BITS:
                continue  # integers and booleans are always finite
            mask = NONFINITE_BITS.get(dtype)
            for start in range(0, numel, FINITE_BLOCK):
                raw = reader.read(name, start, min(start + FINITE_BLOCK, numel))
                finite = np.isfinite(raw).all() if mask is None else not np.any((raw & mask) == mask)
                if not finite:
                    bad.append(name)
                    break
    finally:
        reader.close()
    return bad
