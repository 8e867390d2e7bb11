"""Fig. 6: the accuracy of each induced reward model (eq. 4) on preference sets sampled from each policy."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from itermerge import __version__
from itermerge.devices import CPU, Placement, release
from itermerge.errors import ItermergeError
from itermerge.logprobs import score_sequences
from itermerge.maths.dpo import induced_reward
from itermerge.maths.statistics import preference_accuracy
from itermerge.records import Completion, PreferencePair, Prompt
from itermerge.rundir import STUDY_RESULTS
from itermerge.sampling import SamplingParams
from itermerge.studies.induced import (
    ModelRef,
    check_beta,
    check_same_tokenizer,
    default_eos,
    load_ref,
    write_study,
)
from itermerge.studies.plots import plot_heatmap


def build_test_sets(
    policies: dict[str, ModelRef], tokenizer: Any, prompts: Sequence[Prompt], scorer: Any, params: SamplingParams,
    batch_size: int = 16, where: Placement = CPU, make_sampler: Any = None,
) -> dict[str, list[PreferencePair]]:
    """A preference set per policy, as in training: K samples per dev prompt, best vs worst by ``scorer``, ties dropped.

    Policies given as paths are loaded one at a time, on ``where``; ``make_sampler(model, tokenizer, batch_size,
    progress)`` samples (by default the hf sampler).
    """
    from itermerge.labeling import select_pair
    from itermerge.tokenization import encode_prompt

    if make_sampler is None:
        from itermerge.sampling.hf import HFSampler as make_sampler

    if not prompts:
        raise ItermergeError(
            "build_test_sets: no prompts; give the dev prompts to sample the test preference sets from"
        )
    prompt_ids = [encode_prompt(tokenizer, p.messages) for p in prompts]
    sets = {}
    for name, ref in policies.items():
        model = load_ref(ref, where)
        samples = make_sampler(model, tokenizer, batch_size=batch_size, progress=False).generate(prompt_ids, params)
        release(model)
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
    pad_id: int, *, batch_size: int = 16, eos_ids: Sequence[int] | None = None, where: Placement = CPU,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Fig. 6: rows = preference sets, columns = induced reward models; cell = fraction of pairs ranked right.

    A pair is ranked right when r(x, y_w) > r(x, y_l) under eq. (4), a tie counts half. θ0's
    log-probs are computed once; each column's model is loaded (if a path), scored and freed in turn.
    With ``out_dir``: ``accuracy.json`` and the heatmap ``accuracy.png`` are written there.
    """
    check_sets(test_sets, reward_models, beta)
    paths = {n: r for n, r in {"reference": reference, **reward_models}.items() if not isinstance(r, nn.Module)}
    if len(paths) > 1:
        check_same_tokenizer(paths)
    ref_model = load_ref(reference, where)
    eos = default_eos(ref_model) if eos_ids is None else tuple(eos_ids)
    logps = column_logprobs(test_sets, {REFERENCE: ref_model, **reward_models}, pad_id, eos, batch_size=batch_size,
                            where=where)
    return accuracy_result(test_sets, logps, list(reward_models), beta, out_dir)


REFERENCE = "reference"  # the column of θ0's log-probs, against which every other column's reward is measured


def check_sets(test_sets: dict[str, list[PreferencePair]], reward_models: dict[str, Any], beta: float) -> None:
    check_beta(beta)
    if not test_sets or not reward_models:
        raise ItermergeError("accuracy matrix: give at least one preference set (rows) and one reward model (columns)")
    for name, pairs in test_sets.items():
        if not pairs:
            raise ItermergeError(f"accuracy matrix: preference set {name!r} is empty (every prompt's samples tied?); "
                                 "sample more prompts or more completions per prompt")


def column_logprobs(
    test_sets: dict[str, list[PreferencePair]], models: dict[str, ModelRef], pad_id: int, eos: Sequence[int], *,
    batch_size: int = 16, where: Placement = CPU,
) -> dict[str, dict[str, Any]]:
    """{column: {"vocab": size, "rows": {row: log π of each pair's chosen then rejected completion}}} for the given
    columns (any subset: processes share the columns out); each model is loaded, scored and freed in turn."""
    from itermerge.logprobs.structure import vocab_size

    ids = {name: ([p.prompt_ids for p in pairs] * 2, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs])
           for name, pairs in test_sets.items()}  # chosen then rejected, in one call per set
    out = {}
    for column, ref in models.items():
        model = load_ref(ref, where)
        out[column] = {"vocab": vocab_size(model), "rows": {
            row: score_sequences(model, x, y, pad_id, batch_size, eos_ids=tuple(eos)) for row, (x, y) in ids.items()}}
        release(model)
        del model
    return out


def accuracy_result(
    test_sets: dict[str, list[PreferencePair]], logps: dict[str, dict[str, Any]], columns: list[str], beta: float,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The matrix from every column's log-probs (``column_logprobs``, the reference's among them): eq. (4) rewards,
    each pair ranked right or not; written as accuracy.json and accuracy.png when ``out_dir`` is given."""
    reference = logps[REFERENCE]
    for column in columns:
        if logps[column]["vocab"] != reference["vocab"]:
            raise ItermergeError(
                f"reward model {column!r} has a vocabulary of {logps[column]['vocab']} tokens but the reference has "
                f"{reference['vocab']}; an induced reward compares log-probs of the same token ids"
            )
    cells: dict[str, dict[str, dict[str, Any]]] = {row: {} for row in test_sets}
    for column in columns:
        for row, pairs in test_sets.items():
            rewards = [induced_reward(p, r, beta) for p, r in zip(logps[column]["rows"][row], reference["rows"][row])]
            cells[row][column] = preference_accuracy(rewards[: len(pairs)], rewards[len(pairs) :])
    rows = list(test_sets)
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
        write_study(result, Path(out_dir) / STUDY_RESULTS["accuracy"], plot_heatmap)
    return result
