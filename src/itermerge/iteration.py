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

from itermerge.checkpoint import load_tokenizer, save_model
from itermerge.config import DPOConfig, RunConfig
from itermerge.devices import Placement, load_placed, placement, release
from itermerge.errors import ItermergeError
from itermerge.labeling import make_scorer, select_pair
from itermerge.logprobs import score_sequences
from itermerge.records import Completion, PreferencePair, Prompt, ReferenceLogprobs, read_jsonl, write_jsonl
from itermerge.rundir import IterationLayout, atomic_write_json
from itermerge.runner import Shard, unshard
from itermerge.sampling.backends import run_sampler, scorer_spec
from itermerge.seeds import stage_seed
from itermerge.tokenization import encode_prompt, pad_id
from itermerge.training.loop import train_dpo
from itermerge.training.reference import add_reference_logprobs

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


def sample_shard(cfg: RunConfig, t: int, policy_path: Path, prompts: list[Prompt], shard: Shard) -> dict[str, Any]:
    """y_1:K ~ π_θ_{t−1}(·|x) for this process's share of X_t, each scored: this process's part of samples.jsonl.

    Every process encodes all prompts (cheap, and the same everywhere) and samples every ``world``-th kept one;
    a prompt's samples depend on its own seed only, so the result does not depend on the number of processes.
    The sampler is released before the scorer loads (one model of the stage on the device at a time).
    """
    tokenizer = load_tokenizer(policy_path)
    kept, prompt_ids, dropped = encode_prompts(prompts, tokenizer, cfg)
    if not kept:
        raise ItermergeError(
            f"iteration {t}: all {len(prompts)} prompts exceed prompts.max_prompt_length = "
            f"{cfg.prompts.max_prompt_length}"
        )
    mine = shard.indices(len(kept))
    where = placement(cfg.model)
    start = time.perf_counter()
    params = cfg.sampling.params(seed=stage_seed(cfg.seed, "sample", t))
    with run_sampler(cfg, policy_path, tokenizer, where) as sampler:
        samples = sampler.generate([prompt_ids[i] for i in mine], params)
        del sampler  # run_sampler gives its device memory back as the block ends
    seconds = time.perf_counter() - start
    scorer = make_scorer(scorer_spec(cfg.scorer.spec(), where))
    flat = [(kept[i], k, s) for i, group in zip(mine, samples) for k, s in enumerate(group)]
    scores = scorer.score([p for p, _, _ in flat], [s.text for _, _, s in flat])
    release(scorer)
    completions = [Completion(prompt_id=p.id, index=k, text=s.text, token_ids=list(s.token_ids), finished=s.finished,
                              score=float(v)) for (p, k, s), v in zip(flat, scores)]
    return {"kept": kept if shard.is_main else None, "dropped": dropped, "completions": completions,
            "seconds": seconds}


def write_samples(out: Path, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The processes' parts of X_t's samples in prompt order: writes prompts.jsonl and samples.jsonl."""
    kept = parts[0]["kept"]
    by_prompt: dict[str, list[Completion]] = {}
    for part in parts:
        for c in part["completions"]:
            by_prompt.setdefault(c.prompt_id, []).append(c)
    completions = [c for p in kept for c in by_prompt[p.id]]
    write_jsonl(IterationLayout(out).prompts, kept)
    write_jsonl(IterationLayout(out).samples, completions)
    tokens = sum(len(c.token_ids) for c in completions)
    seconds = max(part["seconds"] for part in parts)  # the processes sampled at the same time
    scores = [c.score for c in completions]
    return {
        "prompts": len(kept),
        "prompts_dropped_too_long": parts[0]["dropped"],
        "samples": len(completions),
        "mean_score": sum(scores) / len(scores),
        "mean_completion_tokens": tokens / len(completions),
        "finished_fraction": sum(c.finished for c in completions) / len(completions),
        "sampling_seconds": round(seconds, 2),
        "sampling_tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
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
    write_jsonl(IterationLayout(out).pairs, pairs)
    return {"pairs": len(pairs), "ties_dropped": ties, "tie_rate": ties / len(by_prompt),
            "mean_chosen_score": sum(p.chosen_score for p in pairs) / len(pairs),
            "mean_rejected_score": sum(p.rejected_score for p in pairs) / len(pairs)}


def reference_path(cfg: RunConfig, theta0: Path, sampler_path: Path) -> Path:
    """Whose log-probs of D_t the reference stage stores: θ0's for dpo.reference = fixed (Alg. 1), else the
    iteration's start θ_{t−1}'s (previous uses them throughout; soft and hard until their first update)."""
    return theta0 if cfg.dpo.reference == "fixed" else sampler_path


def reference_shard(cfg: RunConfig, theta0: Path, sampler_path: Path, out: Path, t: int,
                    shard: Shard) -> dict[str, Any]:
    """log π_ref of this process's share of the pairs' chosen and rejected completions, once (π_ref as
    `reference_path` says: θ0 under the paper's fixed reference); and its share of the KL(π_θ{t−1} ‖ π_θ0) estimate
    from each prompt's first sample (an unbiased draw of π_θ{t−1})."""
    pairs = shard.take(read_jsonl(IterationLayout(out).pairs, PreferencePair))
    where = placement(cfg.model)
    start = time.perf_counter()
    source = reference_path(cfg, theta0, sampler_path)
    reference = load_placed(source, where, cfg.model.trust_remote_code)
    pairs = add_reference_logprobs(reference, pairs, dpo_config(cfg, t), batch_size=cfg.sampling.batch_size // 4 or 1,
                                   progress=shard.is_main)
    seconds = time.perf_counter() - start
    if source != theta0:
        release(reference)
        reference = None
    prompt_ids = {p.prompt_id: p.prompt_ids for p in pairs}
    samples = read_jsonl(IterationLayout(out).samples, Completion)
    first = [c for c in samples if c.index == 0 and c.prompt_id in prompt_ids]
    kl_terms: list[float] = []
    if t > 1 and first:
        xs, ys = [prompt_ids[c.prompt_id] for c in first], [c.token_ids for c in first]
        pad = pad_id(load_tokenizer(theta0))
        reference = reference or load_placed(theta0, where, cfg.model.trust_remote_code)
        ref_lp = score_sequences(reference, xs, ys, pad, batch_size=16)
        release(reference)
        del reference
        policy = load_placed(sampler_path, where, cfg.model.trust_remote_code)
        kl_terms = [a - b for a, b in zip(score_sequences(policy, xs, ys, pad, batch_size=16), ref_lp)]
    return {"refs": [ReferenceLogprobs(p.prompt_id, p.ref_chosen_logp, p.ref_rejected_logp) for p in pairs],
            "kl_terms": kl_terms, "seconds": seconds, "source": str(source)}


def write_reference(out: Path, theta0: Path, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The reference's log-probs in pair order: writes reference_logprobs.jsonl."""
    refs = unshard([part["refs"] for part in parts], sum(len(part["refs"]) for part in parts))
    write_jsonl(IterationLayout(out).reference_logprobs, refs)
    terms = [x for part in parts for x in part["kl_terms"]]
    return {"reference": parts[0].get("source", str(theta0)),
            "reference_seconds": round(max(part["seconds"] for part in parts), 2),
            "kl_sampler_to_reference": sum(terms) / len(terms) if terms else 0.0, "kl_samples": len(terms)}


def pairs_with_reference(out: Path) -> list[PreferencePair]:
    """D_t as training reads it: pairs.jsonl joined with θ0's log-probs from reference_logprobs.jsonl (each file has
    one writer, so each stage's files can be proved on their own; runs made before kept them in pairs.jsonl)."""
    pairs = read_jsonl(IterationLayout(out).pairs, PreferencePair)
    path = IterationLayout(out).reference_logprobs
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
    """θ_t ← argmin_θ L(θ; D_t) starting from θ_{t−1}, on D_t only; saved as iter_XX/model (with dpo.peft: the
    adapter as iter_XX/adapter, and iter_XX/model as θ0 plus adapters 1..t)."""
    pairs = pairs_with_reference(out)
    torch.manual_seed(stage_seed(cfg.seed, "train", t))
    where = placement(cfg.model)
    device, dtype = where.device, where.torch_dtype
    deepspeed = _launcher_flag("ACCELERATE_USE_DEEPSPEED")
    if cfg.dpo.peft is not None:  # θ_t = θ_{t−1} + B_t A_t: only a LoRA adapter trains (training/peft.py)
        from itermerge.training.peft import train_adapter

        if deepspeed:
            raise ItermergeError("dpo.peft: LoRA iterations run on one process or under DDP, not under DeepSpeed "
                                 "(an adapter is small enough to need no ZeRO); launch without a DeepSpeed config")
        return train_adapter(policy_path, pairs, dpo_config(cfg, t), out, device=device, compute_dtype=dtype,
                             accelerator=accelerator, trust_remote_code=cfg.model.trust_remote_code,
                             label=f"iteration {t}: ")
    # Weights train in float32 (read as such, so a float32 θ_{t−1} is not first rounded to 16 bits) and the
    # forward runs in the configured dtype; DeepSpeed keeps its own float32 master copy of a 16-bit model.
    model = load_placed(policy_path, Placement(device, where.dtype if deepspeed else "float32"),
                        cfg.model.trust_remote_code, partitioned=_launcher_flag("ACCELERATE_DEEPSPEED_ZERO3_INIT"))
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
        save_model(model, tokenizer, IterationLayout(out).model, force=True, state_dict=gathered or None,
                   extra=[(IterationLayout.training_metrics, json.dumps(metrics, indent=2, default=float))])
    return metrics


def _launcher_flag(name: str) -> bool:
    """A boolean that `accelerate launch` passes its processes in the environment (absent: false)."""
    return os.environ.get(name, "false").lower() == "true"


PER_STAGE = ("seconds", "finish_seconds", "device_peak_gib", "shards")  # kept apart by stage in metrics.json


def write_metrics(out: Path, t: int, stages: dict[str, Any]) -> None:
    """metrics.json: every number the iteration's stages recorded; their wall time, device memory and each process's
    share (items, seconds) by stage."""
    merged: dict[str, Any] = {"iteration": t}
    for stage, info in stages.items():
        for key, value in (info or {}).items():
            if key in PER_STAGE:
                merged.setdefault(key, {})[stage] = value
            elif key not in ("finished_at", "files", "key"):
                merged[key] = value
    atomic_write_json(IterationLayout(out).metrics, merged)
