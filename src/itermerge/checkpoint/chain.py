"""θ_t of a LoRA run as θ0 plus adapters: the adapter_chain.json format, peft's LoRA adapters read without torch, and
θ_t's tensors computed block by block in float32 (what `CheckpointReader` reads for such a directory).

Why: with ``dpo.peft`` θ_t = θ_{t−1} + Δ_t, Δ_t = scale_t · B_t A_t (peft's LoRA, scale = lora_alpha / r), so a run
needs to keep only the adapters. A chain directory holds θ0's config and tokenizer and ``adapter_chain.json``: θ0's
path and the adapters' paths (relative, so a copied run directory still reads) with their content hashes. Every
reader of the directory (the sampler, the search's `MergeBasis`, the streamed merge, the studies) gets
θ_n = (((θ0 + Δ1) + Δ2) … + Δn), each sum rounded to float32 — exactly the weights iteration n+1 trained on.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import xxhash

from itermerge.checkpoint.dtypes import CHUNK, FLOAT_DTYPES, OWN_FILES, ST_STORAGE, WEIGHT_SUFFIXES, to_float32
from itermerge.errors import ItermergeError

CHAIN_NAME = "adapter_chain.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's state-dict keys: base_model.model.<module>.lora_A.weight
# Rows of Δ computed together: a fixed tiling, so an element's product is the same whichever block asks for it (a
# whole-tensor read, a streamed block) and every reader of θ_t gets the same bits.
ROW_TILE = 64
# adapter_config.json settings under which the update is not scale · B A on a Linear weight.
_UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "alpha_pattern", "target_parameters",
                "trainable_token_indices", "layer_replication", "use_qalora")


class Tensors(Protocol):
    """What the chain needs of a checkpoint reader (`CheckpointReader`)."""

    path: Path

    def __iter__(self) -> Iterator[str]: ...
    def __contains__(self, name: str) -> bool: ...
    def dtype(self, name: str) -> str: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def numel(self, name: str) -> int: ...
    def read(self, name: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray: ...
    def read_chunk(self, name: str, index: int, out: np.ndarray) -> np.ndarray: ...
    def content_hash(self) -> str: ...
    def file_stats(self) -> list[list[Any]]: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class LowRank:
    """One weight's update Δ = scale · B A: A (r, in), B (out, r), float32."""

    A: np.ndarray
    B: np.ndarray
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True)
class LoraAdapter:
    """A peft LoRA adapter: θ0's tensor name (``model.layers.0.self_attn.q_proj.weight``) → its low-rank update."""

    path: Path
    config: dict[str, Any]
    updates: dict[str, LowRank]
    hash: str  # of adapter_model.safetensors

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")


@dataclass(frozen=True)
class ChainSpec:
    """A chain directory: θ0 and the adapters Δ1..Δn (absolute paths) with their recorded content hashes."""

    path: Path
    base: Path
    adapters: tuple[Path, ...]
    hashes: tuple[str, ...]


def is_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def file_hash(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def chain_spec(path: str | os.PathLike) -> ChainSpec | None:
    """The chain a directory holds (None for an ordinary checkpoint); each adapter checked against its recorded hash."""
    path = Path(path)
    file = path / CHAIN_NAME
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
        base, entries = Path(data["base"]), [(path / e["path"], e["hash"]) for e in data["adapters"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ItermergeError(f"{file}: not an adapter chain ({e}); rerun the iteration that wrote {path}") from e
    base = base if base.is_absolute() else path / base
    for adapter, recorded in entries:
        weights = adapter / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise ItermergeError(f"{file}: θ is θ0 plus adapter {os.path.normpath(adapter)}, whose {ADAPTER_WEIGHTS} "
                                 f"is missing; restore it, or delete {path} and rerun the iteration that wrote it")
        if file_hash(weights) != recorded:
            raise ItermergeError(f"{os.path.normpath(weights)}: changed since {file} was written (its hash was "
                                 f"{recorded[:16]}…); restore it, or delete {path} and later iterations and rerun")
    return ChainSpec(path, base, tuple(Path(os.path.normpath(a)) for a, _ in entries), tuple(h for _, h in entries))


def write_chain(tmp: Path, final: Path, base: str | os.PathLike, adapters: Sequence[Path]) -> None:
    """Make ``tmp`` (to be renamed to ``final``) the chain θ0 + ``adapters``: θ0's config and tokenizer, and the
    adapters' paths relative to ``final``. An adapter may be ``final`` itself (a merge written as one adapter)."""
    base = Path(os.path.abspath(base))
    for f in base.iterdir():  # what `CheckpointReader.metadata_files` copies: everything but weights
        if f.is_file() and f.suffix not in WEIGHT_SUFFIXES and f.name not in OWN_FILES and not (tmp / f.name).exists():
            shutil.copy2(f, tmp / f.name)
    final = Path(os.path.abspath(final))
    entries = []
    for a in map(lambda p: Path(os.path.abspath(p)), adapters):
        weights = (tmp if a == final else a) / ADAPTER_WEIGHTS
        entries.append({"path": os.path.relpath(a, final), "hash": file_hash(weights)})
    (tmp / CHAIN_NAME).write_text(json.dumps({
        "what": "θ = (((θ0 + Δ1) + Δ2) … + Δn) in float32, Δs = scale_s · B_s A_s (peft LoRA, scale = lora_alpha / r); "
                "read it with itermerge (CheckpointReader, load_model)",
        "base": str(base), "adapters": entries,
    }, indent=2) + "\n")


def read_adapter(path: str | os.PathLike, tensors: Tensors) -> LoraAdapter:
    """A peft LoRA adapter directory as low-rank updates; ``tensors`` reads its adapter_model.safetensors (and is
    closed after).

    Only plain LoRA on Linear weights is a sum of low-rank updates: DoRA, biases, modules_to_save, per-module
    alphas and the like are refused by name."""
    path = Path(path)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ItermergeError(f"{path / ADAPTER_CONFIG}: not a readable adapter config ({e})") from e
    bad = [k for k in _UNSUPPORTED if config.get(k)] + (["bias"] if config.get("bias", "none") != "none" else [])
    if config.get("peft_type", "LORA") != "LORA" or bad:
        what = f"sets {bad[0]} = {config.get(bad[0])!r}" if bad else f"is a {config.get('peft_type')} adapter"
        raise ItermergeError(f"{path}: {what}; only plain LoRA (Δ = lora_alpha / r · B A on Linear weights) is merged "
                             "exactly as a sum of adapters — merge full checkpoints instead")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key in tensors:
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ItermergeError(f"{path}: tensor {key!r} is not a LoRA A or B of a Linear layer; merge full "
                                 "checkpoints instead")
        st, raw = tensors.dtype(key), tensors.read(key)
        array = to_float32(raw, st, np.empty(raw.size, dtype=np.float32)).reshape(tensors.shape(key))
        pairs.setdefault(f"{m.group(1)}.weight", {})[m.group(2)] = np.ascontiguousarray(array, dtype=np.float32)
    tensors.close()
    updates = {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"} or ab["A"].ndim != 2 or ab["B"].shape != (ab["B"].shape[0], ab["A"].shape[0]):
            raise ItermergeError(f"{path}: {name!r} has no matching lora_A (r, in) and lora_B (out, r); the adapter "
                                 "is incomplete — re-save it")
        r = ab["A"].shape[0]
        scale = float(config.get("lora_alpha", 8)) / (math.sqrt(r) if config.get("use_rslora") else r)
        updates[name] = LowRank(ab["A"], ab["B"], scale)
    if not updates:
        raise ItermergeError(f"{path}: the adapter holds no LoRA weights")
    return LoraAdapter(path, config, updates, file_hash(path / ADAPTER_WEIGHTS))


def check_fits(adapter: LoraAdapter, base: Tensors) -> None:
    """Refuse an adapter whose layers are not θ0's (another base model)."""
    for name, u in adapter.updates.items():
        shape = (u.B.shape[0], u.A.shape[1])
        if name not in base or base.shape(name) != shape:
            found = f"θ0 has {base.shape(name)}" if name in base else "θ0 has no such tensor"
            raise ItermergeError(f"{adapter.path}: adapts {name!r} as {shape} but {found} ({base.path}); the adapter "
                                 "was trained on another base model — give its own θ0 as the reference")


def add_delta(x: np.ndarray, update: LowRank, shape: tuple[int, ...], start: int) -> np.ndarray:
    """x += Δ.flat[start : start + len(x)] in float32, Δ = scale · B A computed tile by tile of ROW_TILE rows as peft
    computes it (the product, then the scale); x is elements [start, stop) of a (out, in) tensor, flattened."""
    cols, stop = shape[1], start + x.size
    scale = np.float32(update.scale)
    for r0 in range(start // cols // ROW_TILE * ROW_TILE, -(-stop // cols), ROW_TILE):
        r1 = min(r0 + ROW_TILE, shape[0])
        delta = np.matmul(update.B[r0:r1], update.A).reshape(-1)  # (rows · in,)
        delta *= scale
        lo, hi = max(start, r0 * cols), min(stop, r1 * cols)
        part = x[lo - start : hi - start]
        np.add(part, delta[lo - r0 * cols : hi - r0 * cols], out=part)
    return x


class AdapterChain:
    """θ_n = (((θ0 + Δ1) + Δ2) … + Δn) tensor by tensor in float32, read in any range of elements."""

    def __init__(self, spec: ChainSpec, base: Tensors, adapters: Sequence[LoraAdapter]):
        for adapter in adapters:
            check_fits(adapter, base)
        self.spec, self.base, self.adapters = spec, base, list(adapters)

    def targets(self) -> list[str]:
        """θ0's tensors the adapters change."""
        return sorted({name for a in self.adapters for name in a.updates})

    def layout(self) -> Iterable[tuple[str, str, tuple[int, ...], int]]:
        """(name, dtype, shape, numel) of every tensor: floating-point ones as float32."""
        for name in self.base:
            st = self.base.dtype(name)
            yield name, "F32" if st in FLOAT_DTYPES else st, self.base.shape(name), self.base.numel(name)

    def read(self, name: str, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Elements [start, stop) of θ_n's tensor into ``out`` (float32 for floating-point tensors)."""
        st = self.base.dtype(name)
        if st not in FLOAT_DTYPES:
            return self.base.read(name, start, stop, out)
        raw = out if st == "F32" else np.empty(stop - start, dtype=ST_STORAGE[st])
        if start % CHUNK == 0 and stop == min(start + CHUNK, self.base.numel(name)):
            raw = self.base.read_chunk(name, start // CHUNK, raw)  # digested: θ0's content hash needs no second read
        else:
            raw = self.base.read(name, start, stop, raw)
        x = to_float32(raw, st, out)
        for adapter in self.adapters:
            if name in adapter.updates:
                add_delta(x, adapter.updates[name], self.base.shape(name), start)
        return x

    def content_hash(self) -> str:
        """θ0's content hash and the adapters' (θ_n is a function of them)."""
        h = xxhash.xxh3_128(b"itermerge adapter chain\0")
        h.update(self.base.content_hash().encode())
        for digest in self.spec.hashes:
            h.update(digest.encode())
        return h.hexdigest()

    def file_stats(self) -> list[list[Any]]:
        files = [self.spec.path / CHAIN_NAME, *(a / ADAPTER_WEIGHTS for a in self.spec.adapters)]
        return [[f.name, (s := f.stat()).st_size, s.st_mtime_ns] for f in files] + self.base.file_stats()

    def close(self) -> None:
        self.base.close()
