"""Eq. (4), the reward a policy induces, and the DPO loss of §2 built on it: pure functions of log-probs."""

from __future__ import annotations

from typing import TypeVar

import torch.nn.functional as F
from torch import Tensor

LogProb = TypeVar("LogProb", float, Tensor)


def induced_reward(policy_logps: LogProb, reference_logps: LogProb, beta: float) -> LogProb:
    """Eq. (4): r(x, y) = β (log π(y|x) − log π_ref(y|x)), elementwise on floats or tensors of any shape.

    E.g. log π = −2.0, log π_ref = −3.0, β = 0.1 → r = 0.1.
    """
    return beta * (policy_logps - reference_logps)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The DPO loss of §2 per pair, and the induced rewards of eq. (4).

        r_θ(x, y) = β (log π_θ(y|x) − log π_θ0(y|x))                          eq. (4)
        L(θ)      = −log σ( r_θ(x, y_w) − r_θ(x, y_l) )                        §2, DPO loss

    All inputs are (B,) sums of completion-token log-probs; returns (losses, chosen_rewards,
    rejected_rewards), each (B,); the rewards are detached (they are metrics).
    """
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    logits = pi_logratios - ref_logratios  # h(y_w, y_l)
    losses = -F.logsigmoid(beta * logits)
    chosen_rewards = induced_reward(policy_chosen_logps, ref_chosen_logps, beta).detach()
    rejected_rewards = induced_reward(policy_rejected_logps, ref_rejected_logps, beta).detach()
    return losses, chosen_rewards, rejected_rewards
