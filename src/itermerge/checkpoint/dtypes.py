"""Safetensors dtypes as numpy sees them: names, sizes, and float32 decoding/encoding without torch."""

from __future__ import annotations

from typing import Any

import numpy as np
import xxhash

from itermerge.errors import ItermergeError

INDEX_NAME = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files a merge writes itself, or that describe another merge: never copied from θT. A LoRA run's θ_t names its
# adapters (checkpoint/chain.py): a copy of those files would make full weights read as θ0 plus the adapters.
OWN_FILES = {INDEX_NAME, "merge.json", "mean.json", "adapter_chain.json", "adapter_config.json"}
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
