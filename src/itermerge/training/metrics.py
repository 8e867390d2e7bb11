"""The numbers a DPO iteration reports: each optimizer step's, and the iteration's over all steps."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor


def step_metrics(rows: Tensor, step: int, lr: float, grad_norm: Tensor | float | None) -> dict[str, float]:
    """Mean loss, preference accuracy and rewards of one step over all processes' real pairs (weight 1)."""
    rows = rows[rows[:, 3] > 0]
    loss, chosen, rejected = rows[:, 0], rows[:, 1], rows[:, 2]
    return {
        "step": step + 1,
        "lr": lr,
        "pairs": len(rows),
        "loss": loss.mean().item(),
        "accuracy": (chosen > rejected).float().mean().item(),
        "reward_margin": (chosen - rejected).mean().item(),
        "chosen_reward": chosen.mean().item(),
        "rejected_reward": rejected.mean().item(),
        "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
    }


def run_metrics(history: list[dict[str, float]], num_tokens: int, wall: float) -> dict[str, Any]:
    pairs = sum(h["pairs"] for h in history)

    def mean(key: str) -> float:
        return sum(h[key] * h["pairs"] for h in history) / pairs

    return {
        "loss": mean("loss"),
        "accuracy": mean("accuracy"),
        "reward_margin": mean("reward_margin"),
        "chosen_reward": mean("chosen_reward"),
        "rejected_reward": mean("rejected_reward"),
        "first_step_loss": history[0]["loss"],
        "last_step_loss": history[-1]["loss"],
        "last_step_accuracy": history[-1]["accuracy"],
        "steps": len(history),
        "pairs_seen": pairs,
        "tokens": num_tokens,
        "tokens_per_s": num_tokens / wall,
        "wall_s": wall,
        "history": history,
    }
