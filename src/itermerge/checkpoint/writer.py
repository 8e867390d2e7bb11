"""Writing sharded safetensors laid out in advance (``pwrite`` at planned offsets, from any thread), plus an index."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from itermerge.checkpoint.dtypes import INDEX_NAME, ST_STORAGE, itemsize
from itermerge.checkpoint.reader import CheckpointReader
from itermerge.errors import ItermergeError


class ShardedWriter:
    """Safetensors shards laid out in advance, plus an index, like save_pretrained.

    Every tensor's name, shape and dtype is known before the first is computed, so each shard's
    header is written up front and the file sized; blocks are then written at their offsets with
    ``pwrite`` from any thread, in any order.
    """

    def __init__(self, out_dir: Path, plan: list[tuple[str, tuple[int, ...], str]], max_shard_bytes: int = 5 * 10**9):
        self.out_dir = Path(out_dir)
        shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = _nbytes(shape, dtype)
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, shape, dtype))
            size += nbytes
        n = len(shards)
        self.names = (
            ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.total_size = sum(_nbytes(shape, dtype) for _, shape, dtype in plan)
        self._where: dict[str, tuple[int, int, str]] = {}  # name → (fd, byte offset, dtype)
        self._fds: list[int] = []
        try:
            for i, shard in enumerate(shards):
                header, offset = {"__metadata__": {"format": "pt"}}, 0
                for name, shape, dtype in shard:
                    nbytes = _nbytes(shape, dtype)
                    header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                    offset += nbytes
                raw = json.dumps(header, separators=(",", ":")).encode()
                raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
                fd = os.open(self.out_dir / self.names[i], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
                os.ftruncate(fd, 8 + len(raw) + offset)
                for name, _, dtype in shard:
                    self._where[name] = (fd, 8 + len(raw) + header[name]["data_offsets"][0], dtype)
            self.weight_map = {name: self.names[i] for i, shard in enumerate(shards) for name, _, _ in shard}
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        """Elements [start, start + len(data)) of tensor ``name``, already in its storage dtype."""
        fd, offset, dtype = self._where[name]
        if data.dtype != ST_STORAGE[dtype]:
            raise AssertionError(f"writer expected {dtype} for {name}, got {data.dtype}")
        view, offset = memoryview(np.ascontiguousarray(data)).cast("B"), offset + start * data.itemsize
        while view.nbytes:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def close(self) -> list[Path]:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return [self.out_dir / n for n in self.names]

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * itemsize(dtype)


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1024' → bytes (decimal units, as save_pretrained)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            t, factor = t[: -len(unit)], mult
            break
    else:
        factor = 1
    try:
        value = int(float(t) * factor)
    except ValueError:
        value = 0
    if value <= 0:
        raise ItermergeError(f"--max-shard-size {text!r}: not a size; write e.g. 5GB or 500MB")
    return value


def copy_metadata(src: CheckpointReader, dst: Path) -> None:
    for f in src.metadata_files():
        shutil.copy2(f, dst / f.name)
