"""Eq. (4) on sampled completions, and what every induced-reward study shares: checks, sampling, summaries, files."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from itermerge.devices import CPU, Placement
from itermerge.errors import ItermergeError
from itermerge.logprobs import score_sequences
from itermerge.maths.dpo import induced_reward
from itermerge.maths.statistics import mean_sem, pearson
from itermerge.plots import pyplot, save_figure
from itermerge.records import Prompt
from itermerge.sampling import SamplingParams
from itermerge.tokenization import stop_token_ids

ModelRef = nn.Module | str | os.PathLike  # a loaded model, or a checkpoint directory loaded when needed


def induced_rewards(
    policy: nn.Module,
    reference: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
    beta: float,
    batch_size: int = 16,
    *,
    eos_ids: Sequence[int] | None = None,
) -> list[float]:
    """Eq. (4): r(x, y) = β (log π(y|x) − log π_ref(y|x)), one per (prompt, completion), in input order.

    Log-probs come from ``logprobs.score_sequences``, the function DPO trains with; ``eos_ids=None``
    masks a trailing EOS of the reference's config as training does (appendix C), ``()`` scores it.
    """
    check_beta(beta)
    check_same_vocabulary(policy, reference)
    eos = default_eos(reference) if eos_ids is None else tuple(eos_ids)
    policy_logps = score_sequences(policy, prompt_ids, completion_ids, pad_id, batch_size, eos_ids=eos)
    reference_logps = score_sequences(reference, prompt_ids, completion_ids, pad_id, batch_size, eos_ids=eos)
    return [induced_reward(p, r, beta) for p, r in zip(policy_logps, reference_logps)]


def check_beta(beta: float) -> None:
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ItermergeError(f"beta={beta!r}: the KL weight β of eq. (2) must be a positive number (the DPO run's β)")


def default_eos(model: nn.Module) -> tuple[int, ...]:
    """The EOS ids DPO training masks: those the model stops on (``tokenization.stop_token_ids``)."""
    return stop_token_ids(model, required=False)


def check_same_vocabulary(policy: nn.Module, reference: nn.Module) -> None:
    from itermerge.logprobs.structure import vocab_size

    a, b = vocab_size(policy), vocab_size(reference)
    if a != b:
        raise ItermergeError(
            f"policy has a vocabulary of {a} tokens but the reference has {b}; an induced reward compares "
            "log-probs of the same token ids, so both must use θ0's tokenizer"
        )


def check_same_tokenizer(paths: dict[str, str | os.PathLike]) -> None:
    """Checkpoint directories whose tokenizers map tokens to different ids cannot share token ids."""
    from itermerge.checkpoint import load_tokenizer

    vocabs = {name: load_tokenizer(path).get_vocab() for name, path in paths.items()}
    (first, v0), *rest = vocabs.items()
    for name, v in rest:
        if v != v0:
            raise ItermergeError(
                f"{paths[name]} ({name}) has a different tokenizer from {paths[first]} ({first}); induced rewards "
                "need one tokenizer — use checkpoints fine-tuned from the same θ0"
            )


def load_ref(ref: ModelRef, where: Placement = CPU) -> nn.Module:
    """A loaded model as it is; a checkpoint directory loaded on ``where``."""
    if isinstance(ref, nn.Module):
        return ref
    from itermerge.devices import load_placed

    return load_placed(ref, where)


def sample_and_reward(
    model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], prompt_ids: list[list[int]], params: SamplingParams,
    batch_size: int, reference: nn.Module, reward_policies: dict[str, nn.Module], beta: float, eos: tuple[int, ...],
    pad_id: int, scorers: dict[str, Any], *, make_sampler: Any = None,
) -> dict[str, list[float]]:
    """Sample from ``model`` (with ``make_sampler(model, tokenizer, batch_size, progress)``, by default the hf
    sampler), then each policy's induced reward and each scorer's reward of those samples."""
    if make_sampler is None:
        from itermerge.sampling.hf import HFSampler as make_sampler

    samples = make_sampler(model, tokenizer, batch_size=batch_size, progress=False).generate(prompt_ids, params)
    xs = [ids for ids, per in zip(prompt_ids, samples) for _ in per]
    ys = [s.token_ids for per in samples for s in per]
    texts = [s.text for per in samples for s in per]
    ref = score_sequences(reference, xs, ys, pad_id, batch_size, eos_ids=eos)
    out = {"length": [float(len(y)) for y in ys]}
    for name, policy in reward_policies.items():
        out[name] = [
            induced_reward(p, r, beta)
            for p, r in zip(score_sequences(policy, xs, ys, pad_id, batch_size, eos_ids=eos), ref)
        ]
    for name, scorer in scorers.items():
        out[name] = scorer.score([p for p, per in zip(prompts, samples) for _ in per], texts)
    return out


def summarise(grid_name: str, grid: Sequence[float], per_point: list[dict[str, list[float]]]) -> dict[str, Any]:
    """Per grid point mean ± s.e. of every series, and each series' Pearson correlation with the grid."""
    series = {}
    for name in per_point[0]:
        stats = [mean_sem(point[name]) for point in per_point]
        r, p = pearson(list(grid), [m for m, _ in stats])
        series[name] = {"mean": [m for m, _ in stats], "sem": [s for _, s in stats], "pearson_r": r, "p_value": p}
    return {grid_name: list(grid), "series": series}


def encode(tokenizer: Any, prompt: Prompt) -> list[int]:
    from itermerge.tokenization import encode_prompt

    return encode_prompt(tokenizer, prompt.messages)


def progress(values: Sequence[float], desc: str, show: bool = True):
    from tqdm.auto import tqdm

    return tqdm(list(values), desc=desc, unit="point", disable=not show)


def write_study(result: dict[str, Any], json_path: Path, plot) -> None:
    """The JSON and its PNG beside it, each written atomically."""
    from itermerge.rundir import atomic_write_json

    atomic_write_json(json_path, result)
    save_figure(plot(result, pyplot()), json_path.with_suffix(".png"))
