"""How close the merge (eq. 9) gets to the exact ensemble (eq. 6) it approximates, and what each costs."""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from itermerge import __version__
from itermerge.devices import CPU, Placement, load_placed, release
from itermerge.errors import ItermergeError
from itermerge.logprobs.ensemble import live_members, next_token_logprobs, scoring_batches
from itermerge.maths.ensemble import ensemble_coefficients, kl_per_position, mix_logprobs
from itermerge.maths.merge import resolve_weights
from itermerge.maths.statistics import pearson
from itermerge.merging import merge_state_dicts
from itermerge.plots import pyplot, save_figure
from itermerge.records import Prompt
from itermerge.sampling import SamplingParams
from itermerge.sampling.ensemble import ensemble_generate
from itermerge.studies.plots import plot_approximation
from itermerge.tokenization import stop_token_ids


def uniform_average(models: Sequence[nn.Module]) -> nn.Module:
    """The naive merge mean(θ1..θT) = θ0 + Σ (θt − θ0)/T, as a new model (``models`` = θ0, θ1, …, θT)."""
    T = len(models) - 1
    return merged_model(models, [1.0 / T] * T)


def approximation_error(
    models: Sequence[nn.Module], coeffs: Sequence[float], merged: nn.Module, prompt_ids: Sequence[Sequence[int]],
    params: SamplingParams, eos_ids: Sequence[int], pad_id: int, baselines: dict[str, nn.Module] | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """How close the merge is to the ensemble it approximates, on completions sampled from the ensemble.

    For each candidate (the merge, and the naive θT alone and uniform average of θ1..θT unless
    ``baselines`` replaces them): the mean over completion tokens of the full-vocabulary KL(π* ‖ π_m)
    and KL(π_m ‖ π*) at each position, and the Pearson correlation across completions of log π*(y|x)
    and log π_m(y|x). π* is the untempered per-token ensemble (sampling settings only pick the text).
    """
    return approximation_report([approximation_sums(models, coeffs, merged, prompt_ids, params, eos_ids, pad_id,
                                                    baselines, batch_size)])


@torch.no_grad()
def approximation_sums(
    models: Sequence[nn.Module], coeffs: Sequence[float], merged: nn.Module, prompt_ids: Sequence[Sequence[int]],
    params: SamplingParams, eos_ids: Sequence[int], pad_id: int, baselines: dict[str, nn.Module] | None = None,
    batch_size: int = 8, show: bool = True,
) -> dict[str, Any]:
    """``approximation_error``'s sums over these prompts (any share of them: processes add theirs up)."""
    members, live = live_members(models, coeffs)
    if baselines is None:
        baselines = {"theta_T": models[-1], "uniform_average": uniform_average(models)} if len(models) > 1 else {}
    candidates = {"merged": merged, **baselines}
    sampled = ensemble_generate(models, coeffs, prompt_ids, params, eos_ids, pad_id, batch_size, progress=show)
    flat_prompts = [list(p) for p, per in zip(prompt_ids, sampled) for _ in per]
    flat_completions = [ids for per in sampled for ids, _ in per]
    keep = [i for i, c in enumerate(flat_completions) if c]
    flat_prompts, flat_completions = [flat_prompts[i] for i in keep], [flat_completions[i] for i in keep]
    n = len(flat_completions)
    sums: dict[str, Any] = {"coefficients": list(coeffs), "models_in_ensemble": len(members), "completions": n,
                            "tokens": 0, "seq_ens": [0.0] * n, "seq": {name: [0.0] * n for name in candidates},
                            "kl_fwd": dict.fromkeys(candidates, 0.0), "kl_rev": dict.fromkeys(candidates, 0.0)}
    device = next(members[0].parameters()).device
    for idx, batch, targets in scoring_batches(flat_prompts, flat_completions, pad_id, batch_size, device):
        ens = mix_logprobs([next_token_logprobs(m, batch) for m in members], live)  # (N, V)
        row_of = torch.repeat_interleave(torch.tensor([len(flat_completions[i]) for i in idx]))  # (N,) row in batch
        _add_by_row(sums["seq_ens"], idx, row_of, ens.gather(1, targets[:, None]).squeeze(1))
        sums["tokens"] += len(targets)
        for name, model in candidates.items():
            lp = next_token_logprobs(model, batch)  # (N, V)
            sums["kl_fwd"][name] += float(kl_per_position(ens, lp).sum())
            sums["kl_rev"][name] += float(kl_per_position(lp, ens).sum())
            _add_by_row(sums["seq"][name], idx, row_of, lp.gather(1, targets[:, None]).squeeze(1))
    return sums


def approximation_report(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The per-token KLs and the correlations from every share's sums (``approximation_sums``), in share order."""
    n, tokens = sum(p["completions"] for p in parts), sum(p["tokens"] for p in parts)
    if not n:
        raise ItermergeError("the ensemble produced only empty completions; raise max_new_tokens or check the EOS ids")
    seq_ens = [x for p in parts for x in p["seq_ens"]]
    report = {}
    for name in parts[0]["seq"]:
        seq = [x for p in parts for x in p["seq"][name]]
        r, pv = pearson(seq_ens, seq)
        report[name] = {
            "kl_ensemble_to_model_per_token": sum(p["kl_fwd"][name] for p in parts) / tokens,
            "kl_model_to_ensemble_per_token": sum(p["kl_rev"][name] for p in parts) / tokens,
            "seq_logp_pearson": r, "seq_logp_pearson_p": pv,
            "mean_seq_logp": sum(seq) / n,
        }
    return {
        "coefficients": parts[0]["coefficients"], "models_in_ensemble": parts[0]["models_in_ensemble"],
        "completions": n, "tokens": tokens, "ensemble_mean_seq_logp": sum(seq_ens) / n, "candidates": report,
    }


def _add_by_row(acc: list[float], idx: list[int], row_of: Tensor, values: Tensor) -> None:
    sums = torch.zeros(len(idx)).index_add_(0, row_of, values.cpu())
    for i, s in zip(idx, sums.tolist()):
        acc[i] += s


def _param_bytes(models: Sequence[nn.Module]) -> int:
    seen, total = set(), 0
    for m in models:
        for p in m.parameters():
            if p.data_ptr() not in seen:  # tied weights count once
                seen.add(p.data_ptr())
                total += p.nbytes
    return total


def decoding_cost(
    models: Sequence[nn.Module], coeffs: Sequence[float], merged: nn.Module, prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int, pad_id: int, batch_size: int = 16, repeats: int = 1,
) -> dict[str, Any]:
    """Wall time and memory of ensemble vs merged decoding of the same number of tokens (greedy, EOS ignored).

    Memory is what decoding holds: the weights of the models it runs plus the largest KV cache, both
    measured from the tensors; on CUDA also the allocator's peak. Expected ratio ≈ (models run) : 1.
    """
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    runs = {"ensemble": (list(models), list(coeffs)), "merged": ([merged], [1.0])}
    for ms, cs in runs.values():  # warm-up: first-call allocations and kernel selection are not decoding cost
        ensemble_generate(ms, cs, prompt_ids[:1], SamplingParams(n=1, temperature=0.0, max_new_tokens=2), [], pad_id)
    out: dict[str, Any] = {}
    for _ in range(repeats):
        for name, (ms, cs) in runs.items():
            cuda = next(ms[0].parameters()).is_cuda
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            stats: dict[str, Any] = {}
            start = time.perf_counter()
            ensemble_generate(ms, cs, prompt_ids, params, [], pad_id, batch_size, stats=stats)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            if name in out and out[name]["seconds"] <= seconds:
                continue
            live = [m for m, c in zip(ms, cs) if c != 0.0]
            out[name] = {
                "seconds": seconds, "tokens": stats["tokens"], "tokens_per_s": stats["tokens"] / seconds,
                "models_run": stats["models_run"], "weights_bytes": _param_bytes(live),
                "kv_cache_bytes": stats["kv_cache_bytes"],
                "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            }
    e, m = out["ensemble"], out["merged"]
    out["time_ratio"] = e["seconds"] / m["seconds"]
    out["memory_ratio"] = (e["weights_bytes"] + e["kv_cache_bytes"]) / (m["weights_bytes"] + m["kv_cache_bytes"])
    return out


def merged_model(models: Sequence[nn.Module], weights: Sequence[float]) -> nn.Module:
    """θ0 + Σ k_t (θt − θ0) (eq. 9) as a new model in memory (``models`` = θ0, θ1, …, θT)."""
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(merge_state_dicts(models[0].state_dict(), [m.state_dict() for m in models[1:]], weights))
    return merged


def approximation_study(
    reference: str | os.PathLike, checkpoints: Sequence[str | os.PathLike], prompts: Sequence[Prompt],
    out_dir: str | os.PathLike, *, lam: float | None = None, alpha: float | None = None,
    weights: Sequence[float] | None = None, params: SamplingParams | None = None, batch_size: int = 8,
    cost_tokens: int = 32, where: Placement = CPU, note: str | None = None,
) -> dict[str, Any]:
    """Load θ0..θT, merge (λ, α) or ``weights`` in memory, and write ``approximation.json`` + ``.png`` to ``out_dir``.

    The JSON holds the inputs, the k_t and coefficients, ``approximation_error`` on completions that the
    ensemble samples for ``prompts``, and ``decoding_cost`` for ``cost_tokens`` new tokens per prompt.
    """
    part = approximation_part(reference, checkpoints, prompts, lam=lam, alpha=alpha, weights=weights, params=params,
                              batch_size=batch_size, cost_tokens=cost_tokens, where=where, with_cost=True)
    return approximation_write(reference, checkpoints, len(prompts), out_dir, [part], lam=lam, alpha=alpha,
                               weights=weights, params=params, note=note)


def _weights(checkpoints: Sequence[Any], lam: float | None, alpha: float | None, weights: Sequence[float] | None,
             prompts: int) -> list[float]:
    if not checkpoints:
        raise ItermergeError("approximation study: no checkpoints; give θ1..θT (the iterative-DPO checkpoints, "
                             "in order)")
    if not prompts:
        raise ItermergeError("approximation study: no prompts; give at least one dev prompt to sample from the "
                             "ensemble")
    return resolve_weights(len(checkpoints), lam, alpha, weights)


def approximation_part(
    reference: str | os.PathLike, checkpoints: Sequence[str | os.PathLike], prompts: Sequence[Prompt], *,
    lam: float | None = None, alpha: float | None = None, weights: Sequence[float] | None = None,
    params: SamplingParams | None = None, batch_size: int = 8, cost_tokens: int = 32, where: Placement = CPU,
    with_cost: bool = True, show: bool = True,
) -> dict[str, Any]:
    """The study on these prompts (any share of them): the sums of ``approximation_sums`` and, ``with_cost``, the
    decoding cost (measured by one process only: timings of processes sharing a machine do not add)."""
    from itermerge.checkpoint import load_tokenizer
    from itermerge.tokenization import encode_prompt, pad_id

    k = _weights(checkpoints, lam, alpha, weights, len(prompts))
    params = params or SamplingParams(n=1, temperature=1.0, max_new_tokens=64)
    tokenizer = load_tokenizer(checkpoints[-1])
    models = [load_placed(p, where) for p in [reference, *checkpoints]]
    merged = merged_model(models, k)
    prompt_ids = [encode_prompt(tokenizer, p.messages) for p in prompts]
    pad, eos = pad_id(tokenizer), list(stop_token_ids(models[-1], tokenizer))
    coeffs = ensemble_coefficients(k)
    sums = approximation_sums(models, coeffs, merged, prompt_ids, params, eos, pad, batch_size=batch_size, show=show)
    cost = None
    if with_cost:
        cost = decoding_cost(models, coeffs, merged, prompt_ids, cost_tokens, pad, batch_size=batch_size)
    release(merged, *models)
    return {"sums": sums, "cost": cost}


def approximation_write(
    reference: str | os.PathLike, checkpoints: Sequence[str | os.PathLike], prompts: int, out_dir: str | os.PathLike,
    parts: Sequence[dict[str, Any]], *, lam: float | None = None, alpha: float | None = None,
    weights: Sequence[float] | None = None, params: SamplingParams | None = None, note: str | None = None,
) -> dict[str, Any]:
    """approximation.json and .png from the shares' parts (in share order; one of them measured the cost)."""
    from itermerge.rundir import STUDY_RESULTS, atomic_write_json

    k = _weights(checkpoints, lam, alpha, weights, prompts)
    params = params or SamplingParams(n=1, temperature=1.0, max_new_tokens=64)
    result = {
        "itermerge_version": __version__,
        "what": "exact ensemble eq. (6), normalised per token, vs the merge eq. (9) that approximates it",
        "reference": str(reference), "checkpoints": [str(c) for c in checkpoints],
        "lam": lam, "alpha": alpha, "weights": k, "coefficients": ensemble_coefficients(k), "measured": note,
        "sampling": dataclasses.asdict(params), "prompts": prompts,
        "error": approximation_report([p["sums"] for p in parts]),
        "cost": next(p["cost"] for p in parts if p["cost"] is not None),
    }
    path = Path(out_dir) / STUDY_RESULTS["ensemble"]
    atomic_write_json(path, result)
    save_figure(plot_approximation(result, pyplot()), path.with_suffix(".png"))
    return result
