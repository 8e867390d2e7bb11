"""The one way a run builds its evaluators: on the run's device in its precision (measured once, recorded in the
manifest), sampling with its backend and speed settings, the judge placed like the policy."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from itermerge.checkpoint import load_tokenizer
from itermerge.devices import Placement, load_placed, placement, release, settle_precision
from itermerge.evaluation.suite import Evaluator

if TYPE_CHECKING:
    from torch import nn

    from itermerge.config import EvalConfig, RunConfig


def build_evaluator(eval_config: EvalConfig, split: str, theta_T: str | os.PathLike,
                    reference: str | os.PathLike | None, where: Placement, make_sampler: Callable[..., Any] | None,
                    *, progress: bool = False) -> Evaluator:
    """The evaluators of ``eval_config`` on ``split``, as every stage builds them: the tokenizer of ``theta_T``, the
    reference model (for KL) and the judge placed like the policy (``where``: its device, its precision), sampling
    with ``make_sampler`` (``evaluation_sampler``'s; None: the HF sampler with default settings)."""
    ref_model = load_placed(reference, where) if eval_config.kl is not None and reference is not None else None
    return Evaluator(eval_config, load_tokenizer(theta_T), split, reference_model=ref_model, progress=progress,
                     make_sampler=make_sampler, where=where)


@contextlib.contextmanager
def run_evaluation(cfg: RunConfig, split: str, checkpoint: str | os.PathLike, *,
                   reference: str | os.PathLike | None = None, precision: dict[str, Any] | None = None,
                   progress: bool = True) -> Iterator[tuple[nn.Module, Evaluator]]:
    """``checkpoint`` loaded and its evaluators built from a run config as the search and the test stage build
    them (``model.device``/``dtype``, ``sampling.backend`` and the speed settings): the same model gives the same
    numbers here as in the run. ``precision``: the run's measured CPU precision (manifest.json ``precision``), which
    ``model.dtype: auto`` then uses instead of measuring again."""
    from itermerge.sampling.backends import evaluation_sampler

    if precision is not None:
        settle_precision(precision)
    where = placement(cfg.model)
    with evaluation_sampler(cfg, where, Path(checkpoint)) as make_sampler:
        model = load_placed(checkpoint, where, cfg.model.trust_remote_code)
        try:
            yield model, build_evaluator(cfg.evaluation, split, checkpoint, reference, where, make_sampler,
                                         progress=progress)
        finally:
            release(model)
