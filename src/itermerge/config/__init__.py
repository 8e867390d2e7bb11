"""Settings: every stage's frozen dataclass, parsed from YAML in one place; imports nothing heavy (no torch)."""

from itermerge.config.dpo import DPOConfig
from itermerge.config.evaluation import EvalConfig
from itermerge.config.parse import build, to_dict, to_yaml
from itermerge.config.run import RunConfig, as_recorded, from_dict, load_config
from itermerge.config.search import SearchConfig, SelectionRule

# `--plain`: every speed and memory setting off, so a run takes the plain reference path of each stage.
PLAIN = (
    "dpo.lean_activations=false", "dpo.grads_into_weights=false", "dpo.flat_buffers=false", "dpo.fused_adamw=false",
    "sampling.blocked_output_layer=false", "sampling.growing_kv_cache=false", "sampling.grouped_query_sdpa=false",
    "sampling.cuda_graphs=false", "sampling.shared_prefix=false",
)

__all__ = [
    "PLAIN", "DPOConfig", "EvalConfig", "RunConfig", "SearchConfig", "SelectionRule",
    "as_recorded", "build", "from_dict", "load_config", "to_dict", "to_yaml",
]
