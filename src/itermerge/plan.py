"""Will a config fit? Each stage's peak memory per device, computed from the model configs alone (parameters counted
on the meta device, no weights read) and the run's batch sizes; ``itermerge plan`` prints it and preflight refuses
a config that cannot fit on the GPUs it runs on.

What each stage holds at its peak, as the code runs it (``w`` = bytes per weight in ``model.dtype``):

- sample: the policy (P·w) and the sampler's KV cache for ``sampling.batch_size`` rows of prompt + completion
  tokens; with vLLM, the engine's ``gpu_memory_utilization`` share of the device instead (it must hold the weights
  and one full sequence).
- score: the judge (a reward model, J·w) and one batch's activations.
- reference: θ0 (P·w), a batch of 32 pairs' hidden states, and the output layer's 512-row logit blocks in float32.
- train: AdamW's float32 state (master weights, gradients, two moments: 16 bytes a parameter; ZeRO-3 shards it over
  the GPUs and gathers one layer at a time), the activations of a micro-batch (Korthikanti et al.'s 34·s·b·h bytes
  a layer at 16 bits; with gradient checkpointing the layer inputs plus one layer), and the micro-batch's logits
  in float32 with their gradient.
- search / test: the model being measured, θ0 when KL is measured, the judge, and the evaluation's sampler (its KV
  cache, or the vLLM engine's share): all resident at once. On the host, ``MergeBasis`` reads θ0, θ̄ and θT (float32
  on disk, 12 bytes a parameter) block by block: their pages sit in the page cache once per host, shared by every
  process, and each process holds only block buffers.

A plan is an estimate of the largest terms, not an allocator trace: allocator fragmentation and CUDA's own context
(~0.5-1 GiB) come on top, so a stage above 90 % of a device is flagged as tight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from itermerge.errors import ItermergeError

if TYPE_CHECKING:
    from itermerge.config import RunConfig

GiB = 2**30
TIGHT = 0.9  # of a device: above it a stage is flagged (fragmentation and the CUDA context are not counted)
REFERENCE_PAIRS = 32  # pairs per forward when θ0's log-probs are computed (training/reference.py)
SCORE_ROWS = 512  # output-layer rows per block when scoring without gradients (logprobs/structure.py)
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shapes:
    """What memory depends on in a causal LM: parameters, layers, hidden size, KV heads × head size, vocabulary."""

    params: int
    layers: int
    hidden: int
    kv_width: int  # key/value heads × head dimension
    vocab: int
    largest_layer: int  # parameters of the largest decoder layer (what ZeRO-3 gathers at once)

    @classmethod
    def of(cls, path: str, backbone_only: bool = False) -> Shapes:
        """Shapes of the checkpoint at ``path`` (a directory, or a Hub id: only its config.json is read)."""
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        from itermerge.checkpoint import resolve_model

        try:
            config = AutoConfig.from_pretrained(resolve_model(path))
        except (OSError, ValueError) as e:
            raise ItermergeError(f"plan: no model config for {path!r} ({str(e).splitlines()[0]}); give a local "
                                 "directory with its config.json, or run where the Hub is reachable") from None
        with torch.device("meta"):
            model = (AutoModel if backbone_only else AutoModelForCausalLM).from_config(config)
        layers = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
        blocks = max(layers, key=len) if layers else []
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(params=sum(p.numel() for p in model.parameters()), layers=config.num_hidden_layers,
                   hidden=config.hidden_size, kv_width=kv_heads * head_dim, vocab=config.vocab_size,
                   largest_layer=max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0))


@dataclass
class Stage:
    name: str
    parts: dict[str, float] = field(default_factory=dict)  # what the stage holds on one device, bytes

    @property
    def device_bytes(self) -> float:
        return sum(self.parts.values())


@dataclass
class Plan:
    stages: list[Stage]
    host_bytes: float  # per host, shared by the processes: the page cache of θ0, θ̄, θT in float32
    gpus: int
    device_bytes: float | None  # one device's memory; None: not checked (a CPU run)
    engine_floor: float = 0.0  # what a vLLM engine must hold: the weights and one full sequence's KV cache
    engine_bytes: float | None = None

    def problems(self) -> list[str]:
        if self.device_bytes is None:
            return []
        short = [] if self.engine_bytes is None or self.engine_bytes >= self.engine_floor else [
            f"the vLLM engine gets {self.engine_bytes / GiB:.1f} GiB (sampling.gpu_memory_utilization of the device) "
            f"but needs {self.engine_floor / GiB:.1f} GiB for the weights and one full sequence"]
        return short + [f"stage {s.name} needs {s.device_bytes / GiB:.1f} GiB a device ({_parts(s)}), but a device has "
                f"{self.device_bytes / GiB:.1f} GiB" for s in self.stages if s.device_bytes > self.device_bytes]

    def table(self) -> str:
        cap = self.device_bytes
        lines = ["| stage | GiB per device | of the device | what it holds (GiB) |", "|---|---|---|---|"]
        for s in self.stages:
            share = "" if cap is None else f"{s.device_bytes / cap:.0%}" + (
                " **does not fit**" if s.device_bytes > cap else " tight" if s.device_bytes > TIGHT * cap else "")
            lines.append(f"| {s.name} | {s.device_bytes / GiB:.1f} | {share} | {_parts(s)} |")
        lines.append(f"\nHost page cache, shared by the {self.gpus} processes: {self.host_bytes / GiB:.1f} GiB "
                     "(the search reads θ0, θ̄ and θT in float32 in blocks; each process holds only block buffers).")
        return "\n".join(lines)


def _parts(stage: Stage) -> str:
    return ", ".join(f"{k} {v / GiB:.1f}" for k, v in stage.parts.items() if v >= 0.05 * GiB) or "-"


def parse_memory(text: str) -> float:
    """``80GiB``, ``141 GB``, ``80`` (GiB) → bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(GiB|GB|G|MiB|MB)?\s*", str(text))
    if not m:
        raise ItermergeError(f"--gpu-memory {text!r}: give a size such as 80GiB or 141GB")
    scale = {"GiB": GiB, "G": GiB, None: GiB, "GB": 1e9, "MiB": 2**20, "MB": 1e6}[m.group(2)]
    return float(m.group(1)) * scale


def plan(cfg: RunConfig, gpus: int = 1, device_bytes: float | None = None, zero_stage: int = 0,
         shapes: dict[str, Shapes] | None = None) -> Plan:
    """Each stage's per-device peak for ``cfg`` on ``gpus`` devices of ``device_bytes`` (None: do not check) under
    ZeRO stage ``zero_stage`` (0: DDP or one device; 3: parameters, gradients and optimizer state sharded)."""
    if gpus < 1 or zero_stage not in (0, 3):
        raise ItermergeError(f"plan: gpus = {gpus}, zero_stage = {zero_stage}; give gpus >= 1 and zero stage 0 or 3")
    shapes = dict(shapes or {})
    policy = shapes.get("policy") or Shapes.of(cfg.model.path)
    w = BYTES["bfloat16" if cfg.model.dtype == "auto" else cfg.model.dtype]
    judges = {s["path"] for s in _judge_specs(cfg)}
    judge = next(iter(judges), None)
    j = (shapes.get("judge") or Shapes.of(judge, backbone_only=True)) if judge else None
    kv = 2 * policy.layers * policy.kv_width * w  # bytes a token in the KV cache
    s, ev = cfg.sampling, cfg.evaluation
    vllm = s.backend == "vllm"
    engine = s.gpu_memory_utilization * device_bytes if vllm and device_bytes else None

    def sampler(rows: int, tokens: int) -> dict[str, float]:
        if engine is not None:
            return {"vLLM engine": engine}
        return {"policy": policy.params * w, "KV cache": rows * tokens * kv, "logits": rows * policy.vocab * 4}

    sample_tokens = cfg.prompts.max_prompt_length + s.max_new_tokens
    eval_tokens = cfg.prompts.max_prompt_length + ev.max_new_tokens
    stages = [Stage("sample", sampler(s.batch_size, sample_tokens))]
    if cfg.scorer.type == "reward_model" and j is not None:
        rows = cfg.scorer.batch_size
        stages.append(Stage("score", {"judge": j.params * w, "activations": 4 * rows * sample_tokens * j.hidden * w}))
    d = cfg.dpo
    stages.append(Stage("reference", {
        "θ0": policy.params * w, "activations": 4 * 2 * REFERENCE_PAIRS * d.max_length * policy.hidden * w,
        "logit blocks": SCORE_ROWS * policy.vocab * 4}))
    stages.append(Stage("train", _train(policy, d, w, gpus if zero_stage == 3 else 1)))
    resident = {"model": policy.params * w}
    if ev.kl is not None:
        resident["θ0 (KL)"] = policy.params * w
    if j is not None and (ev.reward is not None and ev.reward.scorer is not None):
        resident["judge"] = j.params * w
    for name in ("search", "test"):
        stages.append(Stage(name, {**resident, **sampler(ev.batch_size, eval_tokens)}))
    return Plan(stages, host_bytes=12 * policy.params, gpus=gpus, device_bytes=device_bytes,
                engine_floor=policy.params * w + sample_tokens * kv, engine_bytes=engine)


def _judge_specs(cfg: RunConfig) -> list[dict[str, Any]]:
    specs = [cfg.scorer.spec()]
    reward = cfg.evaluation.reward
    if reward is not None and reward.scorer is not None:
        specs.append(reward.scorer)
    return [s for s in specs if s.get("type") == "reward_model" and s.get("path")]


def _train(policy: Shapes, d: Any, w: int, shards: int) -> dict[str, float]:
    tokens = d.micro_batch_size * 2 * d.max_length  # chosen and rejected of each pair
    per_layer = 34 * tokens * policy.hidden * w / 2  # Korthikanti et al., at 16 bits: scale by w / 2
    acts = (policy.layers * tokens * policy.hidden * w + per_layer) if d.gradient_checkpointing else (
        policy.layers * per_layer)
    parts = {"AdamW state": 16 * policy.params / shards, "activations": acts,
             "logits": tokens * policy.vocab * (w + 8)}  # 16-bit logits, their float32 log-softmax and gradient
    if shards > 1:
        parts["gathered layer"] = 2 * policy.largest_layer * w
    return parts


def check_fits(cfg: RunConfig) -> str | None:
    """For preflight: the problem when ``cfg`` runs on CUDA and a stage cannot fit this process's GPU; else None."""
    import os

    import torch

    if not torch.cuda.is_available() or cfg.model.device == "cpu":
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    zero = 3 if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" else 0
    total = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
    try:
        problems = plan(cfg, gpus=world, device_bytes=total, zero_stage=zero).problems()
    except ItermergeError as e:  # a model whose config cannot be read here: loading it will say why
        print(f"preflight: memory not planned ({e})", flush=True)
        return None
    if not problems:
        return None
    return ("; ".join(problems) + ". Lower the batch sizes (sampling, evaluation, dpo.micro_batch_size), turn on "
            "dpo.gradient_checkpointing, use ZeRO-3 across more GPUs, or lower sampling.gpu_memory_utilization "
            "(itermerge plan CONFIG shows every stage)")
