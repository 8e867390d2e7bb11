"""The streaming engine: every tensor cut into blocks, computed on a thread per core, written at planned offsets."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, as_completed, wait
from typing import Any

import numpy as np
from tqdm import tqdm

from itermerge.checkpoint import dtypes
from itermerge.checkpoint.dtypes import ST_STORAGE, from_float32, to_float32
from itermerge.checkpoint.reader import CheckpointReader
from itermerge.checkpoint.writer import ShardedWriter
from itermerge.errors import ItermergeError


class Scratch:
    """One worker's buffers, reused for every block: a few MiB, whatever the model's size."""

    def __init__(self) -> None:
        self._bufs: dict[Any, np.ndarray] = {}

    def get(self, key: Any, dtype: Any) -> np.ndarray:
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = np.empty(dtypes.CHUNK * 8, dtype=np.uint8)
        return buf.view(dtype)


BlockFn = Callable[[str, int, Scratch], np.ndarray]


def stream_blocks(writer: ShardedWriter, plan: Sequence[tuple[str, tuple[int, ...], str]], numel: Mapping[str, int],
            block: BlockFn, desc: str, progress: bool) -> None:
    """Compute every CHUNK-element block of every planned tensor with ``block``, write it in place, close the writer.

    Blocks run on one thread per core (numpy releases the GIL), each with its own scratch buffers,
    so the working set is a few MiB per core plus what numpy allocates; a failing block cancels the rest.
    """
    jobs = [(name, i) for name, _, _ in plan for i in range(dtypes.n_chunks(numel[name]))]
    local = threading.local()

    def run(job: tuple[str, int]) -> int:
        scratch = getattr(local, "scratch", None)
        if scratch is None:
            scratch = local.scratch = Scratch()
        name, i = job
        raw = block(name, i, scratch)
        writer.write(name, i * dtypes.CHUNK, raw)
        return raw.nbytes

    workers = max(1, min(os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=writer.total_size, desc=desc, unit="B", unit_scale=True, disable=not progress,
    ) as bar:
        pending: set = set()
        try:
            for job in jobs:  # a bounded window of blocks in flight
                pending.add(pool.submit(run, job))
                if len(pending) >= 4 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    bar.update(sum(f.result() for f in done))
            for f in as_completed(pending):
                bar.update(f.result())
        except BaseException:  # an error or Ctrl-C: drop the queued blocks, let running ones finish
            for f in pending:
                f.cancel()
            writer.abort()
            raise
    writer.close()


def reduce_blocks(numel: Mapping[str, int], block: Callable[[str, int, Scratch], Any],
                  fold: Callable[[Any, int, Any], Any], finish: Callable[[str, Any], Any],
                  desc: str, progress: bool) -> dict[str, Any]:
    """A first pass: ``block`` on every block of every tensor on the thread pool, reduced per tensor.

    Each result is folded into its tensor's state in the calling thread, ``state = fold(state, i, result)``
    (state starts as None; blocks arrive in any order), and ``finish(name, state)`` turns a tensor's state
    into its result as soon as its last block is in, so only the tensors in flight hold state.
    """
    jobs = [(name, i) for name, n in numel.items() for i in range(dtypes.n_chunks(n))]
    remaining = {name: dtypes.n_chunks(n) for name, n in numel.items()}
    states: dict[str, Any] = {}
    results: dict[str, Any] = {}
    local = threading.local()

    def run(job: tuple[str, int]) -> tuple[str, int, Any]:
        scratch = getattr(local, "scratch", None)
        if scratch is None:
            scratch = local.scratch = Scratch()
        return (*job, block(*job, scratch))

    def take(done) -> None:
        for f in done:
            name, i, value = f.result()
            states[name] = fold(states.get(name), i, value)
            remaining[name] -= 1
            if remaining[name] == 0:
                results[name] = finish(name, states.pop(name))

    workers = max(1, min(os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(jobs), desc=desc, unit="block", disable=not progress,
    ) as bar:
        pending: set = set()
        try:
            for job in jobs:
                pending.add(pool.submit(run, job))
                if len(pending) >= 4 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    take(done)
                    bar.update(len(done))
            take(as_completed(pending))
            bar.update(len(pending))
        except BaseException:
            for f in pending:
                f.cancel()
            raise
    return results


def chunk_len(reader: CheckpointReader, name: str, i: int) -> int:
    return min(dtypes.CHUNK, reader.numel(name) - i * dtypes.CHUNK)


def float_block(reader: CheckpointReader, name: str, i: int, scratch: Scratch, slot: int) -> np.ndarray:
    """Block i of a tensor as float32 (read through the reader, so it is digested on the way)."""
    st = reader.dtype(name)
    raw = reader.read_chunk(name, i, scratch.get(("raw", slot), ST_STORAGE[st]))
    return to_float32(raw, st, scratch.get(("f32", slot), np.float32)[: raw.size])


class Source:
    """One input of a merge, block by block in float32: a checkpoint, or the mean of several (θ̄ as it streams).

    The mean is computed as ``mean_checkpoint`` computes it (sum in order, then one division), so a θ̄ cache and
    a θ̄ computed on the fly give the same bits.
    """

    def __init__(self, readers: Sequence[CheckpointReader]):
        self.readers = tuple(readers)

    @property
    def reader(self) -> CheckpointReader | None:
        """The checkpoint itself when this source is one (an exact copy of it can be written), else None."""
        return self.readers[0] if len(self.readers) == 1 else None

    def block(self, name: str, i: int, scratch: Scratch, slot: int) -> np.ndarray:
        if len(self.readers) == 1:
            return float_block(self.readers[0], name, i, scratch, slot)
        acc = scratch.get(("mean", slot), np.float32)[: chunk_len(self.readers[0], name, i)]
        for m, r in enumerate(self.readers):
            x = float_block(r, name, i, scratch, slot)
            if m == 0:
                np.copyto(acc, x)
            else:
                np.add(acc, x, out=acc)
        return np.divide(acc, np.float32(len(self.readers)), out=acc)


def read_for_hash(readers: Sequence[CheckpointReader], name: str, i: int, scratch: Scratch) -> None:
    """Read block i of inputs that the block does not otherwise need, only so their content hash is complete."""
    for r in readers:
        r.read_chunk(name, i, scratch.get("hash", ST_STORAGE[r.dtype(name)]))


def encode_block(x: np.ndarray, st: str, scratch: Scratch) -> np.ndarray:
    return from_float32(x, st, scratch.get("out", ST_STORAGE[st])[: x.size], scratch.get("bits", np.uint32)[: x.size])


def refuse_fp8(reader: CheckpointReader, names: Sequence[str]) -> None:
    fp8 = [n for n in names if reader.dtype(n).startswith("F8")]
    if fp8:
        raise ItermergeError(
            f"{reader.path}: tensor {fp8[0]!r} is {reader.dtype(fp8[0])}; float8 checkpoints cannot be merged "
            "in float32 faithfully — dequantise them to bfloat16 or float32 first"
        )
