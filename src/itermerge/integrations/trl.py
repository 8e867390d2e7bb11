"""From TRL: a `transformers.TrainerCallback` that keeps a TRL run's checkpoints in itermerge's layout and merges them.

Give it to a `trl.DPOTrainer` (or any `transformers.Trainer`): it saves the starting model as ``RUN/theta0`` (unless
``reference`` names θ0), each epoch's model (or each ``train()`` call's, for an iterative loop that builds one trainer
per round) as ``RUN/iter_XX/model``, and at the end of training the merge of θ0..θT as ``RUN/merged`` by the paper's
rule or any operator of ``itermerge merge --method``. ``itermerge merge`` and ``itermerge search RUN --reference
RUN/theta0 --config …`` then read the run as they read Algorithm 1's. The callback needs transformers only; TRL itself
is never imported here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from itermerge.checkpoint import save_model
from itermerge.errors import ItermergeError
from itermerge.merging import merge_checkpoints
from itermerge.operators import operator
from itermerge.rundir import IterationLayout, RunLayout

SAVE_EVERY = ("epoch", "train")


class IterMergeCallback(TrainerCallback):
    """θ0, θ1..θT of a Trainer run saved as itermerge checkpoints under ``run_dir``, merged when training ends.

    ``save_every``: "epoch" (θ_t after epoch t) or "train" (θ_t after the t-th ``trainer.train()`` this callback
    sees: one trainer per round of an iterative loop, each given the same callback). ``method`` and ``params``: the
    merge, as ``itermerge merge`` takes them (``lam``, ``alpha``, ``weights``, ``gamma``, ``t``, ``density``, ``seed``,
    ``groups``); ``merge=False`` saves the checkpoints only. Only the main process writes; the model must be whole on
    it (one process or DDP; under ZeRO-3 gather it or save with the trainer instead).
    """

    def __init__(self, run_dir: str | os.PathLike, *, reference: str | os.PathLike | None = None,
                 save_every: str = "epoch", method: str = "paper", merge: bool = True, **params: Any):
        if save_every not in SAVE_EVERY:
            raise ItermergeError(f"IterMergeCallback(save_every={save_every!r}): choose one of {SAVE_EVERY}")
        self.op = operator(method, **params) if merge else None  # a typo fails now, before training
        if self.op is not None:  # and what the merge resolves at the end, on a T = 2 stand-in
            self.op.resolve(2, ())
        self.run_dir, self.save_every, self.method, self.merge, self.params = (
            Path(run_dir), save_every, method, merge, params)
        self.reference = Path(reference) if reference is not None else None
        if self.reference is not None and not self.reference.is_dir():
            raise ItermergeError(f"IterMergeCallback(reference={str(reference)!r}): not a checkpoint directory; give "
                                 "θ0's directory, or leave reference out to save the starting model as θ0")

    def checkpoints(self) -> list[Path]:
        """θ1..θT saved so far, in order."""
        return RunLayout(self.run_dir).checkpoints()

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.reference is None and state.is_world_process_zero:
            self.reference = save_model(model, processing_class, self.run_dir / "theta0", force=True)
        elif self.reference is None:
            self.reference = self.run_dir / "theta0"

    def on_epoch_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.save_every == "epoch":
            self._save(state, model, processing_class)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.save_every == "train":
            self._save(state, model, processing_class)
        if self.merge and state.is_world_process_zero and self.checkpoints():
            merge_checkpoints(self.reference, self.checkpoints(), self.run_dir / "merged", self.op, force=True,
                              progress=False)

    def _save(self, state, model, tokenizer) -> None:
        """θ_t as RUN/iter_XX/model (XX = one more than the checkpoints already there), with the trainer's log."""
        if not state.is_world_process_zero:
            return
        if hasattr(model, "peft_config"):
            raise ItermergeError("IterMergeCallback: the model is a peft model; itermerge keeps a LoRA run as θ0 plus "
                                 "adapters (dpo.peft) — save with merge_and_unload(), or train full weights")
        t = len(self.checkpoints()) + 1
        was_training = model.training
        model.eval()
        log = json.dumps({"global_step": state.global_step, "epoch": state.epoch, "log_history": state.log_history},
                         indent=2, default=float)
        save_model(model, tokenizer, RunLayout(self.run_dir).files(t).model, force=True,
                   extra=[(IterationLayout.training_metrics, log)])
        model.train(was_training)
