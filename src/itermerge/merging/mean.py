"""θ̄ = mean(θ1..θ_{T−1}), Algorithm 2's cached average, written once and reused while its inputs are unchanged."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from itermerge import __version__
from itermerge.checkpoint.dtypes import FLOAT_DTYPES, ST_STORAGE
from itermerge.checkpoint.reader import CheckpointReader, check_compatible
from itermerge.checkpoint.writer import ShardedWriter, copy_metadata
from itermerge.errors import ItermergeError
from itermerge.merging.engine import Scratch, chunk_len, float_block, read_for_hash, refuse_fp8, stream_blocks
from itermerge.rundir import atomic_dir, atomic_write_json


def mean_checkpoint(
    checkpoints: Sequence[str | os.PathLike], out: str | os.PathLike, force: bool = False, progress: bool = True
) -> Path:
    """Write θ̄ = mean(θ1..θ_{T−1}) in float32 with ``mean.json`` recording its inputs' content hashes."""
    if not checkpoints:
        raise ItermergeError("the mean of intermediate checkpoints needs at least one checkpoint")
    readers = [CheckpointReader(p) for p in checkpoints]
    check_compatible(readers)
    first, n = readers[0], np.float32(len(readers))
    names = first.keys()
    plan = [
        (name, first.shape(name), "F32" if first.dtype(name) in FLOAT_DTYPES else first.dtype(name)) for name in names
    ]
    refuse_fp8(first, names)

    def block(name: str, i: int, scratch: Scratch) -> np.ndarray:
        if first.dtype(name) not in FLOAT_DTYPES:
            read_for_hash(readers[:-1], name, i, scratch)
            return readers[-1].read_chunk(name, i, scratch.get("out", ST_STORAGE[readers[-1].dtype(name)]))
        acc = scratch.get("acc", np.float32)[: chunk_len(first, name, i)]
        for m, r in enumerate(readers):
            x = float_block(r, name, i, scratch, 0)
            if m == 0:
                np.copyto(acc, x)
            else:
                np.add(acc, x, out=acc)
        return np.divide(acc, n, out=acc)

    with atomic_dir(out, force=force) as tmp:
        writer = ShardedWriter(tmp, plan)
        stream_blocks(writer, plan, {name: first.numel(name) for name in names}, block, "θ̄ = mean(θ1..θT−1)", progress)
        copy_metadata(readers[-1], tmp)
        atomic_write_json(tmp / "mean.json", {
            "itermerge_version": __version__,
            "what": "mean of intermediate checkpoints θ1..θ_(T−1) (Algorithm 2's θ̄), float32",
            "inputs": [{"path": str(r.path), "hash": r.content_hash(), "files": r.file_stats()} for r in readers],
        })
    return Path(out)


def mean_cache_hashes(cache: Path, intermediates: Sequence[CheckpointReader]) -> list[str] | None:
    """The inputs' hashes if ``cache`` holds θ̄ of exactly these checkpoints, else None.

    A recorded hash is trusted when the files' sizes and modification times are unchanged (as git
    and make do); otherwise the checkpoints are hashed again and compared.
    """
    meta = cache / "mean.json"
    if not meta.exists():
        return None
    recorded = json.loads(meta.read_text()).get("inputs", [])
    if len(recorded) != len(intermediates):
        return None
    hashes = []
    for entry, r in zip(recorded, intermediates):
        if entry.get("files") != r.file_stats() and entry.get("hash") != r.content_hash():
            return None
        hashes.append(entry.get("hash"))
    return hashes
