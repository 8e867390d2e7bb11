"""Fig. 6: the accuracy of each induced reward model (eq. 4) on preference sets sampled from each policy."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from itermerge import __version__
from itermerge.errors import ItermergeError
from itermerge.logprobs import score_sequences
from itermerge.maths.dpo import induced_reward
from itermerge.maths.statistics import preference_accuracy
from itermerge.records import Completion, PreferencePair, Prompt
from itermerge.sampling import SamplingParams
from itermerge.studies.induced import (
    ModelRef,
    check_beta,
    check_same_tokenizer,
    check_same_vocabulary,
    default_eos,
    load_ref,
    write_study,
)
from itermerge.studies.plots import plot_heatmap


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
        raise ItermergeError(
            "build_test_sets: no prompts; give the dev prompts to sample the test preference sets from"
        )
    prompt_ids = [encode_prompt(tokenizer, p.messages) for p in prompts]
    sets = {}
    for name, ref in policies.items():
        model = load_ref(ref, device)
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
    ref_model = load_ref(reference, device)
    eos = default_eos(ref_model) if eos_ids is None else tuple(eos_ids)
    ids = {name: ([p.prompt_ids for p in pairs] * 2, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs])
           for name, pairs in test_sets.items()}  # chosen then rejected, in one call per set
    ref_logps = {
        name: score_sequences(ref_model, x, y, pad_id, batch_size, eos_ids=eos) for name, (x, y) in ids.items()
    }
    cells: dict[str, dict[str, dict[str, Any]]] = {row: {} for row in test_sets}
    for column, ref in reward_models.items():
        model = load_ref(ref, device)
        check_same_vocabulary(model, ref_model)
        for row, (x, y) in ids.items():
            policy_logps = score_sequences(model, x, y, pad_id, batch_size, eos_ids=eos)
            rewards = [induced_reward(p, r, beta) for p, r in zip(policy_logps, ref_logps[row])]
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
        write_study(result, Path(out_dir) / "accuracy.json", plot_heatmap)
    return result
