"""dpo.reference while θ_t trains: π_ref fixed (θ0 or θ_{t−1}, its log-probs stored once) or moved by TR-DPO's updates.

``fixed`` and ``previous`` never move within an iteration, so the loop reads their log-probs from the pairs (computed
once by the reference stage: θ0's, or θ_{t−1}'s). ``soft`` and ``hard`` start at θ_{t−1} (the same stored log-probs
serve until the first update) and then move after optimizer steps; from then on the loop scores the step's pairs
under the current reference, a forward without gradients. The reference is kept as the values of the policy's
trainable parameters only: every weight for full training, the adapter's for LoRA, whose frozen base the policy and
the reference share (the reference is an adapter state, TRL issue 3108's case).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from itermerge.config.dpo import DPOConfig
from itermerge.errors import ItermergeError

STORED_AS = {"fixed": "theta_0", "previous": "theta_{t-1}", "soft": "theta_{t-1}", "hard": "theta_{t-1}"}


@torch.no_grad()
def soft_update(reference: Tensor, theta: Tensor, alpha: float) -> Tensor:
    """TR-DPO's soft update, in place: θ_ref ← α θ + (1 − α) θ_ref (Gorbatovski et al., 2024). Any shape."""
    return reference.mul_(1.0 - alpha).add_(theta, alpha=alpha)


class MovingReference:
    """The reference of one DPO iteration: which log-probs a step compares against, and its update after a step.

    ``module``: the scorer whose forward gives per-token log-probs (the unwrapped `CompletionLogprobs`); its trainable
    parameters, as they are when this is built (θ_{t−1}), are the reference's start for ``soft`` and ``hard``.
    """

    def __init__(self, module: nn.Module, cfg: DPOConfig):
        self.policy, self.alpha, self.every = cfg.reference, cfg.reference_alpha, cfg.reference_sync_steps
        self.module = module
        self.trained = {n: p for n, p in module.named_parameters() if p.requires_grad}
        moves = self.policy in ("soft", "hard")
        self.weights = {n: p.detach().clone() for n, p in self.trained.items()} if moves else {}
        self.stored = True  # the pairs' log-probs are this reference's (nothing moved yet)
        self.updates = 0
        self.last_copy = 0  # hard: the optimizer step whose θ the reference holds (0: the start)

    def logprobs(self, inputs) -> Tensor | None:
        """Per-token log π_ref of ``inputs`` (as the scorer's forward), or None while the stored ones are exact."""
        if self.stored:
            return None
        with torch.no_grad():
            return functional_call(self.module, self.weights, (inputs,), strict=False)

    def after_step(self, step: int) -> None:
        """Move the reference after optimizer step ``step`` (0-based), as TR-DPO does (every process the same)."""
        if self.policy == "soft":
            for name, p in self.trained.items():
                soft_update(self.weights[name], p.detach(), self.alpha)
        elif self.policy == "hard" and (step + 1) % self.every == 0:
            with torch.no_grad():
                for name, p in self.trained.items():
                    self.weights[name].copy_(p.detach())
            self.last_copy = step + 1
        else:
            return
        self.updates += 1
        self.stored = False

    def describe(self) -> str:
        """What the reference is now, as the manifest records it for each step."""
        if self.stored:
            return STORED_AS[self.policy]
        if self.policy == "soft":
            return f"soft(alpha={self.alpha:g}) after {self.updates} updates from theta_{{t-1}}"
        return f"policy after step {self.last_copy}"

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {"policy": self.policy, "start": STORED_AS[self.policy], "updates": self.updates}
        if self.policy == "soft":
            out["alpha"] = self.alpha
        if self.policy == "hard":
            out["sync_steps"] = self.every
        return out


def check_reference_supported(cfg: DPOConfig, sharded: bool, deepspeed: bool) -> None:
    """``soft``/``hard`` need the whole trainable weights on every process; refuse where a launcher shards them."""
    if cfg.reference in ("soft", "hard") and (sharded or deepspeed):
        raise ItermergeError(
            f"dpo.reference = {cfg.reference!r} runs on one process or under DDP, not under DeepSpeed or FSDP (the "
            "reference update needs every process to hold the whole trained weights; under ZeRO-3 they are sharded, "
            "TRL issue 1971). Launch without a DeepSpeed/FSDP config, or use dpo.reference = fixed or previous"
        )
