"""The stages of one iteration of Algorithm 1, each writing its files atomically under iter_XX/."""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from itermerge.checkpoint import load_model, load_tokenizer, save_model
from itermerge.config import DPOConfig, RunConfig
from itermerge.errors import ItermergeError
from itermerge.labeling import make_scorer, select_pair
from itermerge.logprobs import score_sequences
from itermerge.records import Completion, PreferencePair, Prompt, ReferenceLogprobs, read_jsonl, write_jsonl
from itermerge.rundir import atomic_write_json
from itermerge.sampling import make_sampler
from itermerge.seeds import stage_seed
from itermerge.tokenization import encode_prompt, pad_id
from itermerge.training.loop import train_dpo
from itermerge.training.reference import add_reference_logprobs


def resolve_device(cfg: RunConfig) -> tuple[str, torch.dtype]:
    """``auto``: CUDA in bfloat16 when present, else CPU in float32 (bf16 matmul is ~4× slower on CPUs)."""
    device = cfg.model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ItermergeError(f"model.device = {device}: no CUDA device is visible; use device: cpu or auto")
    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


def hf_sampler_options(cfg: RunConfig) -> dict[str, Any]:
    """The hf sampler's batch and speed settings from the run's sampling section."""
    s = cfg.sampling
    return {"batch_size": s.batch_size, "blocked_output_layer": s.blocked_output_layer,
            "growing_kv_cache": s.growing_kv_cache, "grouped_query_sdpa": s.grouped_query_sdpa}


def load_policy(path: str | Path, cfg: RunConfig):
    device, dtype = resolve_device(cfg)
    return load_model(path, dtype=dtype, device=device, trust_remote_code=cfg.model.trust_remote_code)


# --- prompts ------------------------------------------------------------------------------------


def encode_prompts(prompts: list[Prompt], tokenizer, cfg: RunConfig) -> tuple[list[Prompt], list[list[int]], int]:
    """Chat template applied; over-long prompts dropped or left-truncated. Returns (kept, ids, dropped)."""
    kept, ids = [], []
    for p in prompts:
        x = encode_prompt(tokenizer, p.messages, cfg.prompts.max_prompt_length, cfg.prompts.truncate)
        if x is not None:
            kept.append(p)
            ids.append(x)
    return kept, ids, len(prompts) - len(kept)


# --- Alg. 1, line by line -------------------------------------------------------------------------


def sample_and_score(cfg: RunConfig, t: int, policy_path: Path, prompts: list[Prompt], out: Path) -> dict[str, Any]:
    """y_1:K ~ π_θ_{t−1}(·|x) for x ∈ X_t, each scored: writes samples.jsonl."""
    tokenizer = load_tokenizer(policy_path)
    kept, prompt_ids, dropped = encode_prompts(prompts, tokenizer, cfg)
    if not kept:
        raise ItermergeError(
            f"iteration {t}: all {len(prompts)} prompts exceed prompts.max_prompt_length = "
            f"{cfg.prompts.max_prompt_length}"
        )
    start = time.perf_counter()
    if cfg.sampling.backend == "vllm":
        sampler = make_sampler("vllm", str(policy_path), tensor_parallel_size=cfg.sampling.tensor_parallel_size,
                               gpu_memory_utilization=cfg.sampling.gpu_memory_utilization)
    else:
        sampler = make_sampler("hf", load_policy(policy_path, cfg), tokenizer, **hf_sampler_options(cfg))
    samples = sampler.generate(prompt_ids, cfg.sampling.params(seed=stage_seed(cfg.seed, "sample", t)))
    sample_seconds = time.perf_counter() - start
    del sampler
    scorer = make_scorer(cfg.scorer.spec())
    flat = [(p, k, s) for p, group in zip(kept, samples) for k, s in enumerate(group)]
    scores = scorer.score([p for p, _, _ in flat], [s.text for _, _, s in flat])
    completions = [
        Completion(
            prompt_id=p.id, index=k, text=s.text, token_ids=list(s.token_ids), finished=s.finished, score=float(v)
        )
        for (p, k, s), v in zip(flat, scores)
    ]
    write_jsonl(out / "prompts.jsonl", kept)
    write_jsonl(out / "samples.jsonl", completions)
    tokens = sum(len(c.token_ids) for c in completions)
    return {
        "prompts": len(kept),
        "prompts_dropped_too_long": dropped,
        "samples": len(completions),
        "mean_score": sum(scores) / len(scores),
        "mean_completion_tokens": tokens / len(completions),
        "finished_fraction": sum(c.finished for c in completions) / len(completions),
        "sampling_seconds": round(sample_seconds, 2),
        "sampling_tokens_per_second": round(tokens / max(sample_seconds, 1e-9), 1),
    }


def make_pairs(prompts_path: Path, samples_path: Path, tokenizer, cfg: RunConfig, out: Path, t: int) -> dict[str, Any]:
    """(x, y_w, y_l) ← label-pref(x; y_1:K): best vs worst, ties dropped and counted. Writes pairs.jsonl."""
    prompts = {p.id: p for p in read_jsonl(prompts_path, Prompt)}
    by_prompt: dict[str, list[Completion]] = defaultdict(list)
    for c in read_jsonl(samples_path, Completion):
        by_prompt[c.prompt_id].append(c)
    pairs, ties = [], 0
    for pid, group in by_prompt.items():
        chosen_rejected = select_pair(group)
        if chosen_rejected is None:
            ties += 1
            continue
        chosen, rejected = chosen_rejected
        p = prompts[pid]
        x = encode_prompt(tokenizer, p.messages, cfg.prompts.max_prompt_length, cfg.prompts.truncate)
        pairs.append(PreferencePair(
            prompt_id=pid, messages=p.messages, prompt_ids=x, chosen=chosen.text, rejected=rejected.text,
            chosen_ids=chosen.token_ids, rejected_ids=rejected.token_ids,
            chosen_score=chosen.score, rejected_score=rejected.score,
        ))
    if not pairs:
        raise ItermergeError(
            f"iteration {t}: all {len(by_prompt)} prompts tied (every sample scored the same); no pairs to learn from. "
            "Use a more graded scorer, more samples (sampling.n) or a higher temperature"
        )
    write_jsonl(out / "pairs.jsonl", pairs)
    return {"pairs": len(pairs), "ties_dropped": ties, "tie_rate": ties / len(by_prompt),
            "mean_chosen_score": sum(p.chosen_score for p in pairs) / len(pairs),
            "mean_rejected_score": sum(p.rejected_score for p in pairs) / len(pairs)}


def reference_logprobs(cfg: RunConfig, theta0: Path, sampler_path: Path, out: Path, t: int) -> dict[str, Any]:
    """log π_θ0 of every chosen and rejected completion, once (the reference is θ0, never θ_{t−1}).

    Also estimates KL(π_θ{t−1} ‖ π_θ0) from the first sample of each prompt (an unbiased draw of π_θ{t−1}).
    """
    pairs = read_jsonl(out / "pairs.jsonl", PreferencePair)
    dpo_cfg = dpo_config(cfg, t)
    start = time.perf_counter()
    reference = load_policy(theta0, cfg)
    pairs = add_reference_logprobs(reference, pairs, dpo_cfg, batch_size=cfg.sampling.batch_size // 4 or 1)
    seconds = time.perf_counter() - start
    first = [c for c in read_jsonl(out / "samples.jsonl", Completion) if c.index == 0]
    prompt_ids = {p.prompt_id: p.prompt_ids for p in pairs}
    first = [c for c in first if c.prompt_id in prompt_ids]
    kl = 0.0
    if t > 1 and first:
        xs, ys = [prompt_ids[c.prompt_id] for c in first], [c.token_ids for c in first]
        pad = pad_id(load_tokenizer(theta0))
        ref_lp = score_sequences(reference, xs, ys, pad, batch_size=16)
        del reference
        policy_lp = score_sequences(load_policy(sampler_path, cfg), xs, ys, pad, batch_size=16)
        kl = sum(a - b for a, b in zip(policy_lp, ref_lp)) / len(first)
    write_jsonl(out / "reference_logprobs.jsonl",
                [ReferenceLogprobs(p.prompt_id, p.ref_chosen_logp, p.ref_rejected_logp) for p in pairs])
    return {"reference": str(theta0), "reference_seconds": round(seconds, 2), "kl_sampler_to_reference": kl,
            "kl_samples": len(first) if t > 1 else 0}


def pairs_with_reference(out: Path) -> list[PreferencePair]:
    """D_t as training reads it: pairs.jsonl joined with θ0's log-probs from reference_logprobs.jsonl (each file has
    one writer, so each stage's files can be proved on their own; runs made before kept them in pairs.jsonl)."""
    pairs = read_jsonl(out / "pairs.jsonl", PreferencePair)
    path = out / "reference_logprobs.jsonl"
    if not path.exists():
        return pairs
    ref = {r.prompt_id: r for r in read_jsonl(path, ReferenceLogprobs)}
    missing = [p.prompt_id for p in pairs if p.prompt_id not in ref]
    if missing:
        raise ItermergeError(f"{path}: no reference log-probs for prompt {missing[0]!r} of pairs.jsonl; the two files "
                             "come from different runs — delete reference_logprobs.jsonl and rerun to recompute it")
    return [replace(p, ref_chosen_logp=ref[p.prompt_id].ref_chosen_logp,
                    ref_rejected_logp=ref[p.prompt_id].ref_rejected_logp) for p in pairs]


def dpo_config(cfg: RunConfig, t: int) -> DPOConfig:
    return replace(cfg.dpo, seed=stage_seed(cfg.seed, "train", t))


def train(cfg: RunConfig, t: int, policy_path: Path, out: Path, accelerator=None) -> dict[str, Any]:
    """θ_t ← argmin_θ L(θ; D_t) starting from θ_{t−1}, on D_t only; saved as iter_XX/model."""
    pairs = pairs_with_reference(out)
    torch.manual_seed(stage_seed(cfg.seed, "train", t))
    device, dtype = resolve_device(cfg)
    deepspeed = _launcher_flag("ACCELERATE_USE_DEEPSPEED")
    # Weights train in float32 (read as such, so a float32 θ_{t−1} is not first rounded to 16 bits) and the
    # forward runs in the configured dtype; DeepSpeed keeps its own float32 master copy of a 16-bit model.
    model = load_model(
        policy_path, dtype=dtype if deepspeed else torch.float32, device=device,
        trust_remote_code=cfg.model.trust_remote_code,
        partitioned=_launcher_flag("ACCELERATE_DEEPSPEED_ZERO3_INIT"),
    )
    tokenizer = load_tokenizer(policy_path)
    gathered: dict[str, torch.Tensor] = {}  # the trained weights, when ZeRO-3 leaves each process only a shard
    metrics = train_dpo(model, pairs, dpo_config(cfg, t), accelerator=accelerator, state_dict=gathered,
                        compute_dtype=None if deepspeed else dtype, master_weights_from=policy_path,
                        label=f"iteration {t}: ")
    if accelerator is None or accelerator.is_main_process:
        weights = gathered or dict(model.named_parameters())
        bad = next((n for n, w in weights.items() if w.is_floating_point() and not torch.isfinite(w).all()), None)
        if bad is not None:  # finite or nothing: a non-finite θ_t is never written as finished
            raise ItermergeError(
                f"iteration {t}: tensor {bad!r} of the trained θ{t} holds NaN or Inf; nothing was saved. Lower "
                f"dpo.learning_rate (now {cfg.dpo.learning_rate:g}) and rerun to continue"
            )
        model.eval()
        save_model(model, tokenizer, out / "model", force=True, state_dict=gathered or None,
                   extra=[("training_metrics.json", json.dumps(metrics, indent=2, default=float))])
    return metrics


def _launcher_flag(name: str) -> bool:
    """A boolean that `accelerate launch` passes its processes in the environment (absent: false)."""
    return os.environ.get(name, "false").lower() == "true"


def write_metrics(out: Path, t: int, stages: dict[str, Any]) -> None:
    merged: dict[str, Any] = {"iteration": t}
    for info in stages.values():
        merged.update({k: v for k, v in (info or {}).items() if k not in ("finished_at", "files", "key")})
    atomic_write_json(out / "metrics.json", merged)
