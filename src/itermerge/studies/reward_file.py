"""Eq. (4) over a file: the induced rewards of a pairs.jsonl or samples.jsonl (``itermerge reward --pairs``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from itermerge.errors import ItermergeError
from itermerge.maths.statistics import mean_sem, pearson, preference_accuracy
from itermerge.records import Completion, PreferencePair, Prompt
from itermerge.studies.induced import check_beta, check_same_tokenizer, check_same_vocabulary, induced_rewards


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
        r = induced_rewards(
            pi, ref, xs + xs, [p.chosen_ids for p in rows] + [p.rejected_ids for p in rows], pad, beta, batch_size
        )
        chosen, rejected = r[: len(rows)], r[len(rows):]
        records = [
            {"prompt_id": p.prompt_id, "reward_chosen": c, "reward_rejected": j}
            for p, c, j in zip(rows, chosen, rejected)
        ]
        summary = {"pairs": len(rows), "beta": beta, **preference_accuracy(chosen, rejected),
                   "mean_reward_chosen": mean_sem(chosen)[0], "mean_reward_rejected": mean_sem(rejected)[0]}
    elif samples is not None:
        from itermerge.tokenization import encode_prompt

        completions = read_jsonl(samples, Completion)
        prompts_path = Path(samples).with_name("prompts.jsonl")
        if not prompts_path.exists():
            raise ItermergeError(
                f"{prompts_path}: missing; samples.jsonl holds prompt ids, and their prompts are read from "
                "prompts.jsonl beside it"
            )
        if not completions:
            raise ItermergeError(f"{samples}: no completions in the file")
        tokenizer = load_tokenizer(policy)
        ids = {p.id: encode_prompt(tokenizer, p.messages) for p in read_jsonl(prompts_path, Prompt)}
        missing = [c.prompt_id for c in completions if c.prompt_id not in ids]
        if missing:
            raise ItermergeError(f"{samples}: prompt id {missing[0]!r} is not in {prompts_path}")
        r = induced_rewards(
            pi, ref, [ids[c.prompt_id] for c in completions], [c.token_ids for c in completions], pad, beta, batch_size
        )
        records = [
            {"prompt_id": c.prompt_id, "index": c.index, "reward": v, "score": c.score} for c, v in zip(completions, r)
        ]
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
