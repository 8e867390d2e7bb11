"""Algorithm 2 on checkpoints: streamed to disk (torch-free), θ̄ cached, in memory for the search, mergekit export;
on a LoRA run's adapters, as one adapter."""

from itermerge.merging.basis import MergeBasis, merge_state_dicts, task_arithmetic
from itermerge.merging.lora import merge_adapters
from itermerge.merging.mean import mean_checkpoint
from itermerge.merging.mergekit import mergekit_config, mergekit_config_for
from itermerge.merging.streamed import merge_checkpoints

__all__ = [
    "MergeBasis",
    "mean_checkpoint",
    "merge_adapters",
    "merge_checkpoints",
    "merge_state_dicts",
    "mergekit_config",
    "mergekit_config_for",
    "task_arithmetic",
]
