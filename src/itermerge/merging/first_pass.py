"""First passes over blocks for operators that need whole-tensor statistics: angles (SLERP, Model Stock), top-k (TIES).

Both stream the tensors block by block like the merge itself, so the working set is a few block buffers per
thread plus, per tensor in flight, n(n+1)/2 float64 numbers per block (a Gram matrix) or one histogram per checkpoint of
2^15 or 2^16 counts (TIES) — whatever the size of the tensor. TIES's exact k-th largest |Δ| is a radix select
on the float32 bits of |Δ| (non-negative floats order as their bits do): the high 16 bits first, then the low
16 bits inside the bin that holds the k-th; a third pass runs only where ties at the k-th magnitude overflow.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from itermerge.checkpoint import dtypes
from itermerge.checkpoint.reader import CheckpointReader
from itermerge.maths.operators import dot64
from itermerge.merging.engine import Scratch, Source, reduce_blocks
from itermerge.operators.ties import TopK


def gram_matrices(base: Source, sources: Sequence[Source], names: Sequence[str], desc: str,
                  progress: bool) -> dict[str, np.ndarray]:
    """Per tensor, the (n, n) float64 Gram matrix G_pq = ⟨s_p − θ0, s_q − θ0⟩ of the n sources' task vectors.

    The float64 dots of each block are summed in block order: the same partial sums as ``maths.operators.dot64``
    over the whole tensor, so SLERP's coefficients equal ``MergeBasis``'s and the whole-tensor oracle's.
    """
    reader = base.readers[0]
    pairs = [(p, q) for p in range(len(sources)) for q in range(p, len(sources))]

    def block(name: str, i: int, scratch: Scratch) -> list[float]:
        theta0 = base.block(name, i, scratch, 0)
        d = [np.subtract(s.block(name, i, scratch, m + 1), theta0, out=scratch.get(("g", m), np.float32)[: theta0.size])
             for m, s in enumerate(sources)]
        n = max(1, theta0.size)  # one chunk: the whole block
        return [dot64(d[p], d[q], n) for p, q in pairs]

    def fold(state: dict | None, i: int, dots: list[float]) -> dict:
        state = {} if state is None else state
        state[i] = dots
        return state

    def finish(name: str, state: dict) -> np.ndarray:
        G = np.empty((len(sources), len(sources)))
        for j, (p, q) in enumerate(pairs):
            G[p, q] = G[q, p] = sum((state[i][j] for i in range(len(state))), 0.0)
        return G

    return reduce_blocks({n: reader.numel(n) for n in names}, block, fold, finish, desc, progress)


def _magnitude_bits(base: Source, sources: Sequence[Source], name: str, i: int, scratch: Scratch) -> list[np.ndarray]:
    """The float32 bits of |θ_t − θ0| for each source, on block i: (N,) uint32 each."""
    theta0 = base.block(name, i, scratch, 0)
    out = []
    for m, s in enumerate(sources):
        d = np.subtract(s.block(name, i, scratch, m + 1), theta0, out=scratch.get(("d", m), np.float32)[: theta0.size])
        out.append(np.abs(d, out=d).view(np.uint32))
    return out


def _select(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry of a histogram over ascending bins, and k's rank inside it."""
    from_top = np.cumsum(hist[::-1])
    j = int(np.searchsorted(from_top, k))
    above = int(from_top[j - 1]) if j else 0
    return hist.size - 1 - j, k - above


def top_magnitudes(base: Source, sources: Sequence[Source], names: Sequence[str], density: float,
                   progress: bool) -> dict[str, list[TopK | None]]:
    """Per tensor and source θ_t, which entries of Δ_t = θ_t − θ0 ``ties_trim`` keeps (None: all of them).

    k = max(1, ⌊density · numel⌋) per tensor, as the oracle ``ties_trim`` and mergekit's magnitude pruning.
    """
    reader: CheckpointReader = base.readers[0]
    numel = {n: reader.numel(n) for n in names}
    k = {n: max(1, int(density * numel[n])) for n in names}
    M = len(sources)

    def add(state, i, value):
        return value if state is None else state + value

    def high(name: str, i: int, scratch: Scratch) -> np.ndarray:  # (M, 2^15): bins of the high 16 bits
        bits = _magnitude_bits(base, sources, name, i, scratch)
        return np.stack([np.bincount(b >> 16, minlength=1 << 15) for b in bits])

    wanted = [n for n in names if k[n] < numel[n]]
    bins = reduce_blocks({n: numel[n] for n in wanted}, high, add,
                         lambda n, h: [_select(row, k[n]) for row in h], "TIES top-k (1/2)", progress)

    def low(name: str, i: int, scratch: Scratch) -> np.ndarray:  # (M, 2^16): low 16 bits inside the chosen bin
        bits = _magnitude_bits(base, sources, name, i, scratch)
        return np.stack([np.bincount(b[(b >> 16) == hb] & 0xFFFF, minlength=1 << 16)
                         for b, (hb, _) in zip(bits, bins[name])])

    def kth(name: str, hist: np.ndarray) -> list[tuple[int, int, int]]:  # (kth bits, ties kept, ties in all)
        found = []
        for (hb, rank), row in zip(bins[name], hist):
            lb, quota = _select(row, rank)
            found.append(((hb << 16) | lb, quota, int(row[lb])))
        return found

    selected = reduce_blocks({n: numel[n] for n in wanted}, low, add, kth, "TIES top-k (2/2)", progress)
    result: dict[str, list[TopK | None]] = {n: [None] * M for n in names}
    overflow = {}
    for name, per_source in selected.items():
        for m, (bits, quota, ties) in enumerate(per_source):
            value = float(np.uint32(bits).view(np.float32))
            result[name][m] = TopK(value, numel[name] - 1)
            if ties > quota and value > 0.0:  # zeros add nothing, whichever of them are kept
                overflow[(name, m)] = (bits, quota)
    if overflow:
        for (name, m), last in _last_ties(base, sources, overflow, progress).items():
            result[name][m] = TopK(result[name][m].kth, last)
    return result


def _last_ties(base: Source, sources: Sequence[Source], overflow: dict[tuple[str, int], tuple[int, int]],
               progress: bool) -> dict[tuple[str, int], int]:
    """Where more entries tie at the k-th |Δ| than k leaves room for: the flat index of the last tie kept.

    Counts the ties per block (a third pass, over these tensors only), then reads again the one block that
    holds the quota-th tie of each.
    """
    reader = base.readers[0]
    need: dict[str, dict[int, tuple[int, int]]] = {}
    for (name, m), target in overflow.items():
        need.setdefault(name, {})[m] = target

    def count(name: str, i: int, scratch: Scratch) -> dict[int, int]:
        bits = _magnitude_bits(base, sources, name, i, scratch)
        return {m: int(np.count_nonzero(bits[m] == target)) for m, (target, _) in need[name].items()}

    def fold(state: dict | None, i: int, counts: dict) -> dict:
        state = {} if state is None else state
        state[i] = counts
        return state

    def finish(name: str, state: dict) -> dict[int, int]:
        last = {}
        for m, (target, quota) in need[name].items():
            seen = 0
            for i in range(len(state)):
                if seen + state[i][m] >= quota:
                    hits = np.flatnonzero(_magnitude_bits(base, [sources[m]], name, i, Scratch())[0] == target)
                    last[m] = i * dtypes.CHUNK + int(hits[quota - seen - 1])
                    break
                seen += state[i][m]
        return last

    found = reduce_blocks({n: reader.numel(n) for n in need}, count, fold, finish, "TIES ties at the k-th", progress)
    return {(name, m): index for name, per_source in found.items() for m, index in per_source.items()}
