"""Models and tokenizers as transformers objects: load (whole weights, any device and dtype) and save atomically."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from itermerge.checkpoint.chain import chain_spec
from itermerge.checkpoint.demo import DEMO_MODEL, demo_checkpoint
from itermerge.checkpoint.reader import CheckpointReader
from itermerge.errors import ItermergeError

if TYPE_CHECKING:
    import torch


def resolve_model(spec: str | os.PathLike) -> str:
    """A model reference → something ``from_pretrained`` takes: the demo alias, a directory, or a Hub id."""
    spec = str(spec)
    if spec == DEMO_MODEL:
        return str(demo_checkpoint())
    if Path(spec).exists():
        return spec
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ItermergeError(
            f"model {spec!r}: no such directory, and not a Hub id (org/name) nor the built-in {DEMO_MODEL!r}"
        )
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
    """A causal LM in eval mode; fp32 by default (the run's measured precision is passed in).

    The weights are whole even where a DeepSpeed ZeRO-3 accelerator exists in this process, unless
    ``partitioned`` (training, when the launcher's ``zero3_init_flag`` asks for zero.Init).

    A LoRA run's θ_t (θ0 plus adapters, checkpoint/chain.py) loads as θ0 with the adapted weights read through
    `CheckpointReader`, in float32, then cast: the same θ_t every other reader of the directory gets.
    """
    from transformers import AutoModelForCausalLM

    spec = chain_spec(path) if Path(path).is_dir() else None
    if spec is not None and partitioned:
        raise ItermergeError(f"model {path}: θ0 plus LoRA adapters cannot load partitioned (ZeRO-3); dpo.peft trains "
                             "on one process or under DDP")
    try:
        with contextlib.nullcontext() if partitioned else whole_weights():
            model = AutoModelForCausalLM.from_pretrained(
                resolve_model(path) if spec is None else spec.base, dtype=dtype if spec is None else "float32",
                trust_remote_code=trust_remote_code,
            )
    except (OSError, ValueError) as e:
        raise ItermergeError(f"model {path}: cannot be loaded ({e})") from e
    if spec is not None:
        _apply_chain(model, path)
        model = model.to(_torch_dtype(dtype))
    return model.to(device).eval()


def _apply_chain(model, path: str | os.PathLike) -> None:
    """θ0's adapted weights replaced by θ_t's (the tensors the adapters change; the rest is θ0 already)."""
    import torch

    reader = CheckpointReader(path)
    params = dict(model.named_parameters())
    try:
        with torch.no_grad():
            for name in reader.chain.targets():
                if name not in params:
                    raise ItermergeError(f"model {path}: an adapter changes {name!r}, which θ0's model has no "
                                         "parameter for (a tied weight?); adapt layers whose weights are their own")
                params[name].copy_(reader.get(name))
    finally:
        reader.close()


def _torch_dtype(dtype):
    import torch

    return dtype if isinstance(dtype, torch.dtype) else torch.float32 if dtype == "auto" else getattr(torch, dtype)


@contextlib.contextmanager
def whole_weights() -> Iterator[None]:
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
