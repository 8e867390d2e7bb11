"""Helpers for the DPO tests: deterministic pairs, and a worker that trains under torch.distributed (gloo, CPU)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

EOS = 2


def make_pairs(n: int, seed: int = 0) -> list:
    """n preference pairs of random token ids (prompt starts with BOS, completions end with EOS), no ref log-probs."""
    from itermerge.records import PreferencePair

    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        prompt = [1, *torch.randint(5, 100, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()]
        chosen = [*torch.randint(5, 100, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist(), EOS]
        rejected = [*torch.randint(5, 100, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist(), EOS]
        pairs.append(
            PreferencePair(
                prompt_id=f"p{i}",
                messages=[{"role": "user", "content": f"question {i}"}],
                prompt_ids=prompt,
                chosen="good",
                rejected="bad",
                chosen_ids=chosen,
                rejected_ids=rejected,
                chosen_score=1.0,
                rejected_score=0.0,
            )
        )
    return pairs


def train_in_process_group(
    rank: int, world_size: int, port: int, cfg_kwargs: dict, out_dir: str, dtype: str = "float32"
) -> None:
    """One rank of `torch.multiprocessing.spawn`: train the tiny θ0 (in ``dtype``) with an Accelerator(cpu=True)
    over gloo.

    Rank 0 writes the trained weights (state.pt) and the metrics (metrics.json) to ``out_dir``.
    """
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
        LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo",
    )  # fmt: skip
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from conftest import rmsnorm_float64_forward, tiny_model

    from itermerge.config import DPOConfig
    from itermerge.training.loop import train_dpo
    from itermerge.training.reference import add_reference_logprobs

    cfg = DPOConfig(**cfg_kwargs)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world_size, accelerator.num_processes
    if dtype == "float64":  # as the float64_rmsnorm fixture does in the parent process
        from transformers.models.llama import modeling_llama

        modeling_llama.LlamaRMSNorm.forward = rmsnorm_float64_forward
    model = tiny_model(0).to(getattr(torch, dtype))
    pairs = add_reference_logprobs(tiny_model(0).to(getattr(torch, dtype)), make_pairs(10), cfg, progress=False)
    metrics = train_dpo(model, pairs, cfg, accelerator=accelerator, progress=False)
    if rank == 0:
        torch.save(model.state_dict(), Path(out_dir) / "state.pt")
        (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
