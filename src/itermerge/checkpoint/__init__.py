"""Checkpoint I/O: the torch-free safetensors format (reader, writer, dtypes), HF models, the demo model."""

from itermerge.checkpoint.hf import load_model, load_tokenizer, resolve_model, save_model
from itermerge.checkpoint.reader import CheckpointReader, check_compatible
from itermerge.checkpoint.writer import ShardedWriter

__all__ = ["CheckpointReader", "ShardedWriter", "check_compatible", "load_model", "load_tokenizer", "resolve_model",
           "save_model"]
