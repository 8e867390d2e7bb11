"""LoRA iterations (``dpo.peft``): θ_t = θ_{t−1} + (α/r) B_t A_t, a fresh `peft` adapter trained by `train_dpo` on D_t,
kept as the adapter (iter_XX/adapter) and θ_t as θ0 plus adapters 1..t (iter_XX/model, checkpoint/chain.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from itermerge.checkpoint.chain import ADAPTER_WEIGHTS, chain_spec, write_chain
from itermerge.config.dpo import DPOConfig, LoraConfig
from itermerge.devices import Placement, load_placed
from itermerge.errors import ItermergeError
from itermerge.rundir import IterationLayout, atomic_dir
from itermerge.training.loop import train_dpo

if TYPE_CHECKING:
    from itermerge.records import PreferencePair


def check_target_modules(model: nn.Module, targets: Sequence[str]) -> None:
    """Each ``dpo.peft.target_modules`` entry names (or ends) at least one module of θ0, and only Linear layers whose
    weight is their own (a LoRA on a tied output layer would change a weight θ0's checkpoint does not hold)."""
    modules = dict(model.named_modules())
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in modules.items() if isinstance(m, nn.Linear)})
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for target in targets:
        matched = {name: m for name, m in modules.items() if name == target or name.endswith(f".{target}")}
        if not matched:
            raise ItermergeError(f"dpo.peft.target_modules: {target!r} matches no module of θ0; its linear layers are "
                                 f"named {linear}")
        for name, m in matched.items():
            if not isinstance(m, nn.Linear):
                raise ItermergeError(f"dpo.peft.target_modules: {target!r} matches {name}, a {type(m).__name__}; name "
                                     f"linear layers ({linear})")
            if embedding is not None and m.weight is getattr(embedding, "weight", None):
                raise ItermergeError(f"dpo.peft.target_modules: {target!r} matches {name}, whose weight is tied to the "
                                     "input embedding; leave it out")


def train_adapter(
    policy_path: Path, pairs: Sequence[PreferencePair], cfg: DPOConfig, out: Path, *, device: str,
    compute_dtype: torch.dtype | None, accelerator: Any = None, trust_remote_code: bool = False, label: str = "",
) -> dict[str, Any]:
    """θ_t = θ_{t−1} + a LoRA adapter trained by DPO on D_t (the reference log-probs in ``pairs`` are θ0's).

    θ_{t−1} (θ0, or θ0 plus adapters 1..t−1) is read in float32; only the adapter trains. The main process writes
    out/adapter (peft's save_pretrained) and out/model, the chain θ0 + adapters 1..t, with training_metrics.json.
    """
    try:
        import peft
    except ImportError as e:
        raise ItermergeError("dpo.peft needs the peft library: pip install 'itermerge[peft]'") from e
    lora: LoraConfig = cfg.peft
    previous = chain_spec(policy_path)
    base, adapters = (Path(policy_path), ()) if previous is None else (previous.base, previous.adapters)
    if not base.is_dir():
        raise ItermergeError(f"dpo.peft: θ0 = {base} is not a local directory; θ_t is kept as θ0 plus adapters, so θ0 "
                             "must be one (download it and set model.path to it)")
    model = load_placed(policy_path, Placement(device, "float32"), trust_remote_code)
    check_target_modules(model, lora.target_modules)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        bias="none",
    ))
    inner = wrapped.get_base_model()  # the same modules, LoRA layers inside: what train_dpo scores and steps
    if cfg.gradient_checkpointing:  # reentrant checkpointing (transformers 4's default) passes no gradient to the
        inner.enable_input_require_grads()  # adapters unless a layer's input wants one; θ0's embedding is frozen
    metrics = train_dpo(inner, pairs, cfg, accelerator=accelerator, compute_dtype=compute_dtype, label=label)
    trained = {n: p for n, p in inner.named_parameters() if p.requires_grad}
    metrics["adapter"] = {"r": lora.r, "alpha": lora.alpha, "target_modules": list(lora.target_modules),
                          "trainable_parameters": sum(p.numel() for p in trained.values())}
    if accelerator is not None and not accelerator.is_main_process:
        return metrics
    bad = next((n for n, p in trained.items() if not torch.isfinite(p).all()), None)
    if bad is not None:  # finite or nothing, as for full weights
        raise ItermergeError(f"{label}adapter tensor {bad!r} holds NaN or Inf; nothing was saved. Lower "
                             f"dpo.learning_rate (now {cfg.learning_rate:g}) and rerun to continue")
    wrapped.eval()
    files = IterationLayout(Path(out))
    with atomic_dir(files.adapter, force=True) as tmp:
        wrapped.save_pretrained(tmp)
    metrics["adapter"]["bytes"] = os.path.getsize(files.adapter / ADAPTER_WEIGHTS)
    with atomic_dir(files.model, force=True) as tmp:
        write_chain(tmp, files.model, base, [*adapters, files.adapter])
        (tmp / IterationLayout.training_metrics).write_text(json.dumps(metrics, indent=2, default=float))
    return metrics
