"""Induced rewards (eq. 4) and the studies built on them: accuracy matrix (Fig. 6), α (Table 1, Fig. 2), λ (Fig. 3-4)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from itermerge import __version__
from itermerge.errors import ItermergeError
from itermerge.logprobs import score_sequences
from itermerge.merge import MergeBasis
from itermerge.records import Completion, PreferencePair, Prompt
from itermerge.sampling import SamplingParams

ModelRef = nn.Module | str | os.PathLike  # a loaded model, or a checkpoint directory loaded when needed


# --- eq. (4) and plain statistics -----------------------------------------------------------------


def induced_rewards(
    policy: nn.Module, reference: nn.Module, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
    pad_id: int, beta: float, batch_size: int = 16, *, eos_ids: Sequence[int] | None = None,
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
    return [beta * (p - r) for p, r in zip(policy_logps, reference_logps)]


def check_beta(beta: float) -> None:
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ItermergeError(f"beta={beta!r}: the KL weight β of eq. (2) must be a positive number (the DPO run's β)")


def default_eos(model: nn.Module) -> tuple[int, ...]:
    """The EOS ids DPO training masks (``config.eos_token_id``, an int or a list)."""
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    return tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))


def check_same_vocabulary(policy: nn.Module, reference: nn.Module) -> None:
    from itermerge.ensemble import vocab_size

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


def preference_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> dict[str, Any]:
    """Fraction of pairs with r(chosen) > r(rejected); a tie counts half (a coin flip would rank it)."""
    correct = sum(c > r for c, r in zip(chosen, rejected))
    ties = sum(c == r for c, r in zip(chosen, rejected))
    n = len(chosen)
    return {"accuracy": (correct + 0.5 * ties) / n if n else None, "correct": correct, "ties": ties, "pairs": n}


def mean_sem(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and its standard error std/√n (sample std, n − 1); None for fewer than two values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def pearson(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    """(Pearson r, two-sided p-value); (None, None) when undefined (fewer than 3 points or a constant input)."""
    from scipy.stats import pearsonr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None, None
    result = pearsonr(x, y)
    return float(result.statistic), float(result.pvalue)


# --- Fig. 6: accuracy of induced reward models on preference sets from each policy -----------------


def _load(ref: ModelRef, device: str) -> nn.Module:
    if isinstance(ref, nn.Module):
        return ref
    from itermerge.checkpoint import load_model

    return load_model(ref, device=device)


def build_test_sets(
    policies: dict[str, ModelRef], tokenizer: Any, prompts: Sequence[Prompt], scorer: Any, params: SamplingParams,
    batch_size: int = 16, device: str = "cpu",
) -> dict[str, list[PreferencePair]]:
    """A preference set per policy, as in training: K samples per dev prompt, best vs worst by ``scorer``, ties dropped.

    Policies given as paths are loaded one at a time.
    """
    from itermerge.labeling import select_pair
    from itermerge.sampling import make_sampler
    from itermerge.tokenization import encode_prompt

    if not prompts:
        raise ItermergeError("build_test_sets: no prompts; give the dev prompts to sample the test preference sets from")
    prompt_ids = [encode_prompt(tokenizer, p.messages) for p in prompts]
    sets = {}
    for name, ref in policies.items():
        model = _load(ref, device)
        samples = make_sampler("hf", model, tokenizer, batch_size=batch_size).generate(prompt_ids, params)
        del model
        flat = [(p, ids, k, s) for p, ids, per in zip(prompts, prompt_ids, samples) for k, s in enumerate(per)]
        scores = scorer.score([p for p, *_ in flat], [s.text for *_, s in flat])
        by_prompt: dict[str, list[Completion]] = {}
        for (p, _, k, s), score in zip(flat, scores):
            by_prompt.setdefault(p.id, []).append(Completion(p.id, k, s.text, s.token_ids, s.finished, score=score))
        pairs = []
        for p, ids in zip(prompts, prompt_ids):
            picked = select_pair(by_prompt[p.id])
            if picked is not None:
                chosen, rejected = picked
                pairs.append(PreferencePair(p.id, p.messages, ids, chosen.text, rejected.text, chosen.token_ids,
                                            rejected.token_ids, chosen.score, rejected.score))
        sets[name] = pairs
    return sets


def accuracy_matrix(
    test_sets: dict[str, list[PreferencePair]], reward_models: dict[str, ModelRef], reference: ModelRef, beta: float,
    pad_id: int, *, batch_size: int = 16, eos_ids: Sequence[int] | None = None, device: str = "cpu",
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Fig. 6: rows = preference sets, columns = induced reward models; cell = fraction of pairs ranked right.

    A pair is ranked right when r(x, y_w) > r(x, y_l) under eq. (4), a tie counts half. θ0's
    log-probs are computed once; each column's model is loaded (if a path), scored and freed in turn.
    With ``out_dir``: ``accuracy.json`` and the heatmap ``accuracy.png`` are written there.
    """
    check_beta(beta)
    if not test_sets or not reward_models:
        raise ItermergeError("accuracy matrix: give at least one preference set (rows) and one reward model (columns)")
    for name, pairs in test_sets.items():
        if not pairs:
            raise ItermergeError(f"accuracy matrix: preference set {name!r} is empty (every prompt's samples tied?); "
                                 "sample more prompts or more completions per prompt")
    paths = {n: r for n, r in {"reference": reference, **reward_models}.items() if not isinstance(r, nn.Module)}
    if len(paths) > 1:
        check_same_tokenizer(paths)
    ref_model = _load(reference, device)
    eos = default_eos(ref_model) if eos_ids is None else tuple(eos_ids)
    ids = {name: ([p.prompt_ids for p in pairs] * 2, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs])
           for name, pairs in test_sets.items()}  # chosen then rejected, in one call per set
    ref_logps = {name: score_sequences(ref_model, x, y, pad_id, batch_size, eos_ids=eos) for name, (x, y) in ids.items()}
    cells: dict[str, dict[str, dict[str, Any]]] = {row: {} for row in test_sets}
    for column, ref in reward_models.items():
        model = _load(ref, device)
        check_same_vocabulary(model, ref_model)
        for row, (x, y) in ids.items():
            rewards = [beta * (p - r) for p, r in zip(score_sequences(model, x, y, pad_id, batch_size, eos_ids=eos),
                                                      ref_logps[row])]
            n = len(test_sets[row])
            cells[row][column] = preference_accuracy(rewards[:n], rewards[n:])
        del model
    rows, columns = list(test_sets), list(reward_models)
    result = {
        "itermerge_version": __version__,
        "what": "Fig. 6: accuracy of induced reward models (columns) on preference sets (rows); a tie counts half",
        "beta": beta, "rows": rows, "columns": columns,
        "accuracy": [[cells[r][c]["accuracy"] for c in columns] for r in rows],
        "correct": [[cells[r][c]["correct"] for c in columns] for r in rows],
        "ties": [[cells[r][c]["ties"] for c in columns] for r in rows],
        "pairs": {r: len(test_sets[r]) for r in rows},
    }
    if out_dir is not None:
        _write(result, Path(out_dir) / "accuracy.json", _plot_heatmap)
    return result


# --- Table 1 / Fig. 2: scaling α with λ = 0 -------------------------------------------------------


def _sample_and_reward(
    model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], prompt_ids: list[list[int]], params: SamplingParams,
    batch_size: int, reference: nn.Module, reward_policies: dict[str, nn.Module], beta: float, eos: tuple[int, ...],
    pad_id: int, scorers: dict[str, Any],
) -> dict[str, list[float]]:
    """Sample from ``model``, then each policy's induced reward and each scorer's reward of those samples."""
    from itermerge.sampling import make_sampler

    samples = make_sampler("hf", model, tokenizer, batch_size=batch_size, progress=False).generate(prompt_ids, params)
    xs = [ids for ids, per in zip(prompt_ids, samples) for _ in per]
    ys = [s.token_ids for per in samples for s in per]
    texts = [s.text for per in samples for s in per]
    ref = score_sequences(reference, xs, ys, pad_id, batch_size, eos_ids=eos)
    out = {"length": [float(len(y)) for y in ys]}
    for name, policy in reward_policies.items():
        out[name] = [beta * (p - r) for p, r in zip(score_sequences(policy, xs, ys, pad_id, batch_size, eos_ids=eos), ref)]
    for name, scorer in scorers.items():
        out[name] = scorer.score([p for p, per in zip(prompts, samples) for _ in per], texts)
    return out


def _summarise(grid_name: str, grid: Sequence[float], per_point: list[dict[str, list[float]]]) -> dict[str, Any]:
    """Per grid point mean ± s.e. of every series, and each series' Pearson correlation with the grid."""
    series = {}
    for name in per_point[0]:
        stats = [mean_sem(point[name]) for point in per_point]
        r, p = pearson(list(grid), [m for m, _ in stats])
        series[name] = {"mean": [m for m, _ in stats], "sem": [s for _, s in stats], "pearson_r": r, "p_value": p}
    return {grid_name: list(grid), "series": series}


def alpha_study(
    basis: MergeBasis, model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], scorer: Any, alphas: Sequence[float],
    reference_model: nn.Module, theta_T_model: nn.Module, beta: float, params: SamplingParams,
    out_dir: str | os.PathLike, *, batch_size: int = 16, eos_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Table 1 / Fig. 2: for each α (λ = 0) merge into ``model`` in place, sample on ``prompts``, and report per α
    the merge's own induced reward r_θ(α), θT's r_θT of the same completions, and the scorer's reward (mean ±
    s.e.), with each mean's Pearson r and p-value against α. r_θ(α)/β is also the sampled estimate of
    KL(π_θ(α) ‖ π_θ0) at temperature 1. Writes ``alpha.json`` and ``alpha.png``; ``model`` ends at the last α.
    """
    from itermerge.tokenization import pad_id as pad_of

    check_beta(beta)
    if len(alphas) < 3:
        raise ItermergeError(f"alphas={list(alphas)}: a Pearson correlation against α needs at least 3 values")
    if not prompts:
        raise ItermergeError("alpha study: no prompts; give the dev prompts to sample from")
    check_same_vocabulary(model, reference_model)
    check_same_vocabulary(theta_T_model, reference_model)
    eos = default_eos(reference_model) if eos_ids is None else tuple(eos_ids)
    prompt_ids = [_encode(tokenizer, p) for p in prompts]
    per_alpha = []
    for alpha in _progress(alphas, "α study"):
        basis.apply_to(model, 0.0, alpha)
        per_alpha.append(_sample_and_reward(
            model, tokenizer, prompts, prompt_ids, params, batch_size, reference_model,
            {"r_merged": model, "r_theta_T": theta_T_model}, beta, eos, pad_of(tokenizer), {"score": scorer}))
    result = {"itermerge_version": __version__, "what": "Table 1 / Fig. 2: scaling α with λ = 0", "beta": beta,
              "prompts": len(prompts), "samples_per_prompt": params.n, **_summarise("alpha", alphas, per_alpha)}
    _write(result, Path(out_dir) / "alpha.json", _plot_curves)
    return result


# --- Fig. 3-4: two criteria, θ(λ) = λ θa + (1 − λ) θb -------------------------------------------------


def lambda_study(
    theta0: str | os.PathLike, theta_a: str | os.PathLike, theta_b: str | os.PathLike, prompts: Sequence[Prompt],
    out_dir: str | os.PathLike, *, beta: float, params: SamplingParams,
    lambdas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), scorers: dict[str, Any] | None = None,
    names: tuple[str, str] = ("a", "b"), batch_size: int = 16, device: str = "cpu",
    eos_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Fig. 3-4: θa and θb trained from θ0 under two criteria, merged as θ(λ) = λ θa + (1 − λ) θb (α = 0).

    That is eq. (10) with T = 2, checkpoints (θ1, θ2) = (θa, θb): k = (λ, 1 − λ), so λ = 1 is θa and
    λ = 0 is θb (the paper's "λ = 0 helpful, λ = 1 harmless" with θa harmless, θb helpful). Per λ:
    completions sampled from θ(λ), both induced rewards r_θa and r_θb (and ``scorers``) of them, mean ±
    s.e., each against λ, and the Pearson correlation of the two rewards across λ (Fig. 4).
    Writes ``lambda.json`` and ``lambda.png``.
    """
    import copy

    from itermerge.checkpoint import load_model, load_tokenizer
    from itermerge.tokenization import pad_id as pad_of

    check_beta(beta)
    if len(lambdas) < 3:
        raise ItermergeError(f"lambdas={list(lambdas)}: a correlation across λ needs at least 3 values")
    if not prompts:
        raise ItermergeError("lambda study: no prompts; give the dev prompts to sample from")
    check_same_tokenizer({"theta0": theta0, names[0]: theta_a, names[1]: theta_b})
    tokenizer = load_tokenizer(theta_b)
    reference, policy_a, policy_b = (load_model(p, device=device) for p in (theta0, theta_a, theta_b))
    basis = MergeBasis.from_checkpoints(theta0, [theta_a, theta_b])  # T = 2: θ̄ = θa, θT = θb
    model = copy.deepcopy(policy_b)
    eos = default_eos(reference) if eos_ids is None else tuple(eos_ids)
    prompt_ids = [_encode(tokenizer, p) for p in prompts]
    rewards = {f"r_{names[0]}": policy_a, f"r_{names[1]}": policy_b}
    per_lambda = []
    for lam in _progress(lambdas, "λ study"):
        basis.apply_to(model, lam, 0.0)
        per_lambda.append(_sample_and_reward(model, tokenizer, prompts, prompt_ids, params, batch_size, reference,
                                             rewards, beta, eos, pad_of(tokenizer), scorers or {}))
    summary = _summarise("lambda", lambdas, per_lambda)
    r, p = pearson(*(summary["series"][k]["mean"] for k in rewards))
    result = {"itermerge_version": __version__, "what": "Fig. 3-4: θ(λ) = λ θa + (1 − λ) θb, α = 0", "beta": beta,
              "theta0": str(theta0), "theta_a": str(theta_a), "theta_b": str(theta_b), "names": list(names),
              "prompts": len(prompts), "samples_per_prompt": params.n, **summary,
              "reward_correlation": {"between": list(rewards), "pearson_r": r, "p_value": p}}
    _write(result, Path(out_dir) / "lambda.json", _plot_curves)
    return result


def _encode(tokenizer: Any, prompt: Prompt) -> list[int]:
    from itermerge.tokenization import encode_prompt

    return encode_prompt(tokenizer, prompt.messages)


def _progress(values: Sequence[float], desc: str):
    from tqdm.auto import tqdm

    return tqdm(list(values), desc=desc, unit="point")


# --- files ----------------------------------------------------------------------------------------


def _write(result: dict[str, Any], json_path: Path, plot) -> None:
    """The JSON and its PNG beside it, each written atomically."""
    from itermerge.rundir import atomic_write_json

    atomic_write_json(json_path, result)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot(result, plt)
    tmp = json_path.with_name(f".{json_path.stem}.png.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, json_path.with_suffix(".png"))


def _plot_heatmap(result: dict[str, Any], plt):
    acc = [[float("nan") if v is None else v for v in row] for row in result["accuracy"]]
    fig, ax = plt.subplots(figsize=(1.2 * len(result["columns"]) + 3.5, 0.8 * len(result["rows"]) + 1.8))
    image = ax.imshow(acc, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(result["columns"])), [f"r_{c}" for c in result["columns"]])
    ax.set_yticks(range(len(result["rows"])), [f"from {r}" for r in result["rows"]])
    for i, row in enumerate(acc):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k", fontsize=9)
    ax.set_xlabel("induced reward model")
    ax.set_ylabel("preference set sampled from")
    fig.colorbar(image, ax=ax, label="accuracy (ties count half)")
    fig.tight_layout()
    return fig


def _plot_curves(result: dict[str, Any], plt):
    """One panel per series (rewards have different scales), mean ± s.e. against the grid; Fig. 4's scatter for λ."""
    grid_name = "alpha" if "alpha" in result else "lambda"
    grid, series = result[grid_name], result["series"]
    pairs = result.get("reward_correlation")
    panels = len(series) + (1 if pairs else 0)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.2), squeeze=False)
    for ax, (name, s) in zip(axes[0], series.items()):
        ax.errorbar(grid, s["mean"], yerr=[e or 0.0 for e in s["sem"]], marker="o", capsize=3)
        ax.set_xlabel("α" if grid_name == "alpha" else "λ")
        r = s["pearson_r"]
        ax.set_title(f"{name}" + (f"  (r = {r:.3f})" if r is not None else ""), fontsize=9)
    if pairs:
        a, b = pairs["between"]
        ax = axes[0][-1]
        ax.plot(series[a]["mean"], series[b]["mean"], marker="o")
        for lam, x, y in zip(grid, series[a]["mean"], series[b]["mean"]):
            ax.annotate(f"λ={lam:g}", (x, y), fontsize=7)
        ax.set_xlabel(a)
        ax.set_ylabel(b)
        r = pairs["pearson_r"]
        ax.set_title("rewards across λ" + (f"  (r = {r:.3f})" if r is not None else ""), fontsize=9)
    fig.tight_layout()
    return fig


# --- eq. (4) over a file (`itermerge reward --policy P --reference R --pairs/--samples FILE`) ---------------


def reward_file(
    policy: str | os.PathLike, reference: str | os.PathLike, *, pairs: str | os.PathLike | None = None,
    samples: str | os.PathLike | None = None, beta: float = 0.1, out: str | os.PathLike | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Induced rewards of every completion in a pairs.jsonl (chosen and rejected, and the ranking accuracy)
    or a samples.jsonl (prompts read from the prompts.jsonl beside it); per-record rewards to ``out``."""
    from itermerge.checkpoint import load_model, load_tokenizer
    from itermerge.records import read_jsonl
    from itermerge.tokenization import pad_id

    check_beta(beta)
    check_same_tokenizer({"policy": policy, "reference": reference})
    pi, ref = load_model(policy), load_model(reference)
    check_same_vocabulary(pi, ref)
    pad = pad_id(load_tokenizer(reference))
    if pairs is not None:
        rows = read_jsonl(pairs, PreferencePair)
        if not rows:
            raise ItermergeError(f"{pairs}: no preference pairs in the file")
        xs = [p.prompt_ids for p in rows]
        r = induced_rewards(pi, ref, xs + xs, [p.chosen_ids for p in rows] + [p.rejected_ids for p in rows], pad, beta, batch_size)
        chosen, rejected = r[: len(rows)], r[len(rows):]
        records = [{"prompt_id": p.prompt_id, "reward_chosen": c, "reward_rejected": j} for p, c, j in zip(rows, chosen, rejected)]
        summary = {"pairs": len(rows), "beta": beta, **preference_accuracy(chosen, rejected),
                   "mean_reward_chosen": mean_sem(chosen)[0], "mean_reward_rejected": mean_sem(rejected)[0]}
    elif samples is not None:
        from itermerge.tokenization import encode_prompt

        completions = read_jsonl(samples, Completion)
        prompts_path = Path(samples).with_name("prompts.jsonl")
        if not prompts_path.exists():
            raise ItermergeError(f"{prompts_path}: missing; samples.jsonl holds prompt ids, and their prompts are read from prompts.jsonl beside it")
        if not completions:
            raise ItermergeError(f"{samples}: no completions in the file")
        tokenizer = load_tokenizer(policy)
        ids = {p.id: encode_prompt(tokenizer, p.messages) for p in read_jsonl(prompts_path, Prompt)}
        missing = [c.prompt_id for c in completions if c.prompt_id not in ids]
        if missing:
            raise ItermergeError(f"{samples}: prompt id {missing[0]!r} is not in {prompts_path}")
        r = induced_rewards(pi, ref, [ids[c.prompt_id] for c in completions], [c.token_ids for c in completions], pad, beta, batch_size)
        records = [{"prompt_id": c.prompt_id, "index": c.index, "reward": v, "score": c.score} for c, v in zip(completions, r)]
        mean, sem = mean_sem(r)
        summary = {"completions": len(r), "beta": beta, "mean_reward": mean, "stderr": sem}
        scores = [c.score for c in completions]
        if all(s is not None for s in scores):
            summary["pearson_with_score"] = pearson(r, scores)[0]
    else:
        raise ItermergeError("reward_file: give pairs= or samples=")
    if out is not None:
        from itermerge.rundir import atomic_write_text

        atomic_write_text(out, "".join(json.dumps(rec) + "\n" for rec in records))
    return summary
