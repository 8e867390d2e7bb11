"""Reading HF checkpoint directories' safetensors without torch or mmap: blocks by ``preadv``, digested as they pass.

A safetensors file is an 8-byte length, a JSON header and the raw little-endian tensors, tiled without
holes, so numpy reads it directly; the merge path never imports torch and never page-faults a memory map
(docs/benchmarks.md has what each costs).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import xxhash

from itermerge.checkpoint import dtypes
from itermerge.checkpoint.chain import AdapterChain, chain_spec, read_adapter
from itermerge.checkpoint.dtypes import (
    INDEX_NAME,
    OWN_FILES,
    ST_STORAGE,
    WEIGHT_SUFFIXES,
    chunk_digest,
    itemsize,
    n_chunks,
)
from itermerge.checkpoint.hub import hub_snapshot, looks_like_hub_id
from itermerge.errors import ItermergeError

if TYPE_CHECKING:
    import torch


class _Tensor(NamedTuple):
    """Where one tensor lives: its file, byte offset, dtype and shape."""

    name: str
    file: Path
    offset: int
    dtype: str
    shape: tuple[int, ...]
    numel: int


class CheckpointReader:
    """Read the tensors of an HF checkpoint directory, whole or in blocks, without torch or mmap.

    Accepts ``model.safetensors``, shards with ``model.safetensors.index.json``, or shards without an
    index. Pickle checkpoints (``.bin``) are refused: loading them runs arbitrary code. ``read`` fills
    numpy buffers with ``preadv`` (thread-safe); ``get`` returns a torch tensor for in-memory use.
    Every block read through ``read_chunk`` is digested on the way, so a streamed merge gets the
    inputs' content hashes without reading them twice.

    A LoRA run's θ_t (a directory with adapter_chain.json) reads as θ0 plus its adapters, computed in float32 as
    blocks are asked for (checkpoint/chain.py); ``chain=False`` reads such a directory's own safetensors instead.
    """

    def __init__(self, path: str | os.PathLike, *, chain: bool = True):
        if looks_like_hub_id(path):  # θ0 named by its Hub id, as the 8B examples do
            path = hub_snapshot(str(path))
        self.path = Path(path)
        if not self.path.is_dir():
            hint = " (pass the checkpoint directory, not a file)" if self.path.is_file() else ""
            raise ItermergeError(f"{self.path}: no such checkpoint directory{hint}")
        spec = chain_spec(self.path) if chain else None
        self.chain = None if spec is None else AdapterChain(spec, CheckpointReader(spec.base), [
            read_adapter(a, CheckpointReader(a, chain=False)) for a in spec.adapters])
        self.files = self._weight_files() if self.chain is None else []
        self._tensors: dict[str, _Tensor] = {}
        self._fds: dict[Path, int] = {}
        self._header_bytes: dict[Path, bytes] = {}
        self._digests: dict[tuple[str, int], bytes] = {}
        self._lock = threading.Lock()
        for f in self.files:
            for t in self._open(f):
                if t.name in self._tensors:
                    raise ItermergeError(
                        f"{self.path}: tensor {t.name!r} appears in both {self._tensors[t.name].file.name} and {f.name}"
                    )
                self._tensors[t.name] = t
        for name, st, shape, numel in self.chain.layout() if self.chain is not None else ():
            self._tensors[name] = _Tensor(name, self.path, 0, st, shape, numel)
        if not self._tensors:
            raise ItermergeError(f"{self.path}: the safetensors files hold no tensors")
        self.config = self._read_config()

    def _weight_files(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ItermergeError(
                    f"{index}: not a safetensors index ({e}); regenerate it or remove it to read the shards directly"
                ) from e
            files = sorted({self.path / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise ItermergeError(
                    f"{index}: shard(s) {', '.join(missing)} named in the index are missing from {self.path}"
                )
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            return files
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        if pickles:
            raise ItermergeError(
                f"{self.path}: only pickle weights ({', '.join(pickles)}); itermerge never unpickles (it "
                "runs arbitrary code). "
                "Convert in a trusted environment: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )
        raise ItermergeError(f"{self.path}: no model weights (*.safetensors) in this directory")

    def _open(self, f: Path) -> list[_Tensor]:
        """Parse and check a safetensors header; the file stays open for positional reads."""
        corrupt = "the file is truncated or corrupt — re-save or re-download it"
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError as e:
            raise ItermergeError(f"{f}: not a readable safetensors file ({e})") from e
        self._fds[f] = fd
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, 8, 0)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            raw = os.pread(fd, n, 8)
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ItermergeError(f"{f}: not a readable safetensors file ({e}); {corrupt}") from e
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self._header_bytes[f] = head + raw
        header.pop("__metadata__", None)
        base, tensors = 8 + n, []
        for name, info in header.items():
            try:
                begin, end = (int(x) for x in info["data_offsets"])
                dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
                numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
                nbytes = numel * itemsize(dtype)
            except (KeyError, TypeError, ValueError) as e:
                raise ItermergeError(
                    f"{f}: tensor {name!r} has a malformed header entry ({e}); the file is corrupt"
                ) from e
            if end - begin != nbytes or begin < 0 or base + end > size:
                raise ItermergeError(
                    f"{f}: tensor {name!r} needs bytes {begin}..{end} of the data but the file holds "
                    f"{size - base}; {corrupt}"
                )
            tensors.append(_Tensor(name, f, base + begin, dtype, shape, numel))
        # The format tiles the data section without holes; checking it makes the content hash cover every byte.
        pos = base
        for t in sorted(tensors, key=lambda t: t.offset):
            if t.offset != pos:
                raise ItermergeError(
                    f"{f}: bytes {pos - base}..{t.offset - base} of the data belong to no tensor; {corrupt}"
                )
            pos += t.numel * itemsize(t.dtype)
        if pos != size:
            raise ItermergeError(f"{f}: {size - pos} bytes after the last tensor; {corrupt}")
        return tensors

    def _read_config(self) -> dict[str, Any]:
        cfg = self.path / "config.json"
        if not cfg.exists():
            return {}
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise ItermergeError(f"{cfg}: not valid JSON ({e})") from e

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    def dtype(self, name: str) -> str:
        """The safetensors dtype name: 'F32', 'BF16', 'F16', 'I64', …"""
        return self._tensors[name].dtype

    def numel(self, name: str) -> int:
        return self._tensors[name].numel

    def read(self, name: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Elements [start, stop) of the flattened tensor in its storage dtype (BF16 as uint16 bits)."""
        t = self._tensors[name]
        stop = t.numel if stop is None else stop
        if out is None:
            out = np.empty(stop - start, dtype=ST_STORAGE[t.dtype])
        out = out[: stop - start]
        if self.chain is not None:
            return self.chain.read(name, start, stop, out)
        size = itemsize(t.dtype)
        view, offset, fd = memoryview(out).cast("B"), t.offset + start * size, self._fds[t.file]
        while view.nbytes:
            n = self._pread_into(fd, view, offset)
            if n <= 0:
                raise ItermergeError(
                    f"{t.file}: ended inside tensor {name!r}; the file changed or was truncated while being read"
                )
            view, offset = view[n:], offset + n
        return out

    if hasattr(os, "preadv"):
        def _pread_into(self, fd: int, view: memoryview, offset: int) -> int:
            return os.preadv(fd, [view], offset)
    else:  # macOS: a seek and a read, serialised
        def _pread_into(self, fd: int, view: memoryview, offset: int) -> int:
            with self._lock:
                os.lseek(fd, offset, os.SEEK_SET)
                return os.readv(fd, [view])

    def read_chunk(self, name: str, index: int, out: np.ndarray) -> np.ndarray:
        """Block ``index`` (dtypes.CHUNK elements) of a tensor, digested for ``content_hash`` as it passes."""
        start = index * dtypes.CHUNK
        raw = self.read(name, start, min(start + dtypes.CHUNK, self._tensors[name].numel), out)
        self._digests[(name, index)] = chunk_digest(raw)
        return raw

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor as a torch tensor (a fresh copy; the file is never modified)."""
        import torch

        t = self._tensors[name]
        raw = self.read(name)
        if t.dtype in ("F8_E4M3", "F8_E5M2"):
            return (
                torch.from_numpy(raw)
                .view(torch.float8_e4m3fn if t.dtype == "F8_E4M3" else torch.float8_e5m2)
                .view(t.shape)
            )
        tensor = torch.from_numpy(raw)
        return (tensor.view(torch.bfloat16) if t.dtype == "BF16" else tensor).view(t.shape)

    def close(self) -> None:
        if self.chain is not None:
            self.chain.close()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def file_stats(self) -> list[list[Any]]:
        """(name, size, mtime_ns) of each weight file: a cheap fingerprint that vouches for a recorded hash."""
        if self.chain is not None:
            return self.chain.file_stats()
        return [[f.name, (s := f.stat()).st_size, s.st_mtime_ns] for f in self.files]

    def content_hash(self) -> str:
        """xxh3-128 over each weight file's name, header and the xxh3-128 of every dtypes.CHUNK-element block.

        A tree hash over the same bytes as a flat one, so the blocks a merge has already read are not
        read again; blocks not yet read are read here.
        """
        if self.chain is not None:
            return self.chain.content_hash()
        buf = None
        h = xxhash.xxh3_128()
        for f in self.files:
            h.update(f.name.encode())
            h.update(self._header_bytes[f])
            for t in sorted((t for t in self._tensors.values() if t.file == f), key=lambda t: t.offset):
                for i in range(n_chunks(t.numel)):
                    digest = self._digests.get((t.name, i))
                    if digest is None:
                        if buf is None:
                            buf = np.empty(dtypes.CHUNK * 8, dtype=np.uint8)
                        self.read_chunk(t.name, i, buf.view(ST_STORAGE[t.dtype]))
                        digest = self._digests[(t.name, i)]
                    h.update(digest)
        return h.hexdigest()

    def metadata_files(self) -> list[Path]:
        """Everything but weights: config, generation config, tokenizer, chat template, remote code."""
        return sorted(
            p for p in self.path.iterdir()
            if p.is_file() and p.suffix not in WEIGHT_SUFFIXES and p.name not in OWN_FILES
        )


def check_compatible(readers: list[CheckpointReader]) -> None:
    """Refuse to combine checkpoints that are not the same architecture with the same tensors."""
    first = readers[0]
    arch0 = first.config.get("architectures"), first.config.get("model_type")
    tie0 = first.config.get("tie_word_embeddings")
    names0 = set(first.keys())
    for r in readers[1:]:
        arch = r.config.get("architectures"), r.config.get("model_type")
        if first.config and r.config and arch != arch0:
            raise ItermergeError(
                f"{r.path}: architecture {arch} differs from {first.path}'s {arch0}; merge only checkpoints "
                "fine-tuned from the same θ0"
            )
        if first.config and r.config and r.config.get("tie_word_embeddings") != tie0:
            raise ItermergeError(
                f"{r.path}: tie_word_embeddings={r.config.get('tie_word_embeddings')} but {first.path} has {tie0}; "
                "tied and untied embeddings cannot be merged tensor by tensor — re-save both the same way"
            )
        names = set(r.keys())
        if names != names0:
            extra, missing = sorted(names - names0), sorted(names0 - names)
            detail = "; ".join(s for s in (
                f"extra {extra[:3]}{'…' if len(extra) > 3 else ''}" if extra else "",
                f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}" if missing else "",
            ) if s)
            raise ItermergeError(
                f"{r.path}: tensor names differ from {first.path} ({detail}); merge only checkpoints of the "
                "same architecture"
            )
        vocab0, vocab = first.config.get("vocab_size"), r.config.get("vocab_size")
        if vocab0 is not None and vocab is not None and vocab0 != vocab:
            raise ItermergeError(
                f"{r.path}: vocab_size {vocab} differs from {first.path}'s {vocab0}; the checkpoints must "
                "share θ0's tokenizer "
                "(resize the embeddings to the same vocabulary first)"
            )
        for name in names0:
            if r.shape(name) != first.shape(name):
                raise ItermergeError(
                    f"{r.path}: tensor {name!r} has shape {r.shape(name)} but {first.path} has {first.shape(name)}"
                )
