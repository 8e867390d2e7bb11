"""A fake ``vllm`` for offline tests: vLLM's call signatures (0.8–0.10 era), a deterministic toy engine."""

from vllm.entrypoints.llm import LLM
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams

__version__ = "0.10.1"

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
