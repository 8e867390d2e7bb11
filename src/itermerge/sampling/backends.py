"""The run's sampler, built from its config for one stage and released at its end: ``hf`` (our decode loop over
a transformers model on this process's device) or ``vllm`` (one engine per process, torn down explicitly)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from itermerge.devices import scorer_spec  # noqa: F401  (where stages import it from)
from itermerge.sampling.params import Sampler

if TYPE_CHECKING:
    from itermerge.config import RunConfig
    from itermerge.devices import Placement


def hf_options(cfg: RunConfig) -> dict[str, Any]:
    """The hf sampler's batch and speed settings from the run's sampling section."""
    s = cfg.sampling
    return {"batch_size": s.batch_size, "blocked_output_layer": s.blocked_output_layer,
            "growing_kv_cache": s.growing_kv_cache, "grouped_query_sdpa": s.grouped_query_sdpa,
            "cuda_graphs": s.cuda_graphs, "shared_prefix": s.shared_prefix}


@contextlib.contextmanager
def run_sampler(cfg: RunConfig, policy_path: str | Path, tokenizer: Any, where: Placement) -> Iterator[Sampler]:
    """The configured sampler of ``policy_path`` for one stage; its device memory is given back afterwards."""
    from itermerge.devices import load_placed, release

    if cfg.sampling.backend == "vllm":
        from itermerge.sampling.vllm import VLLMSampler

        with VLLMSampler(str(policy_path), tensor_parallel_size=cfg.sampling.tensor_parallel_size,
                         gpu_memory_utilization=cfg.sampling.gpu_memory_utilization, dtype=where.dtype) as sampler:
            yield sampler
        return
    from itermerge.sampling.hf import HFSampler

    model = load_placed(policy_path, where, cfg.model.trust_remote_code)
    sampler = HFSampler(model, tokenizer, **hf_options(cfg))
    del model
    try:
        yield sampler
    finally:
        del sampler  # with the caller's reference gone too, the weights (and any CUDA graphs) go
        release()


@contextlib.contextmanager
def evaluation_sampler(cfg: RunConfig, where: Placement, theta_T: str | Path) -> Iterator[Any]:
    """What an ``Evaluator`` samples with, for one stage: ``make_sampler(model, tokenizer, batch_size, progress)``.

    ``hf``: our sampler over the model being evaluated, with the run's speed settings. ``vllm``: one engine per
    process, built once from θT (on entry under a launcher: every process builds it, with items or not), into which
    each evaluated model's weights are loaded in place (the search's merges never go to disk); torn down when the
    stage ends.
    """
    if cfg.sampling.backend != "vllm":
        from itermerge.sampling.hf import HFSampler

        options = {k: v for k, v in hf_options(cfg).items() if k != "batch_size"}
        yield lambda model, tokenizer, batch_size, progress: HFSampler(
            model, tokenizer, batch_size=batch_size, progress=progress, **options)
        return
    from itermerge.sampling.vllm import VLLMSampler

    engine: list[VLLMSampler] = []

    def build() -> None:
        engine.append(VLLMSampler(str(theta_T), tensor_parallel_size=cfg.sampling.tensor_parallel_size,
                                  gpu_memory_utilization=cfg.sampling.gpu_memory_utilization, dtype=where.dtype))

    def make_sampler(model: Any, tokenizer: Any, batch_size: int, progress: bool) -> VLLMSampler:
        if not engine:
            build()
        engine[0].update_weights(dict(model.state_dict()))
        return engine[0]

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under a launcher an engine's build runs collectives over every process: each builds it on entering the
        # stage, also one with no items of its own (it would otherwise leave the others waiting until the timeout).
        build()

    try:
        yield make_sampler
    finally:
        if engine:
            engine[0].close()
