"""vLLM's ``LLM`` with its call signatures, around a toy engine that records every call.

A completion is drawn from the request's seed, the prompt and the weights the prompt's prefix-cache
entry was computed with, so the tests can see per-request seeds, in-place weight loads and cache
resets at work. Without a request seed the engine's own generator (seeded by ``LLM(seed=...)``) is used.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import pickle
import weakref
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams

# LLM.__init__'s keyword-only parameters (vllm/entrypoints/llm.py) ...
LLM_PARAMETERS = {
    "task", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code", "allowed_local_media_path",
    "tensor_parallel_size", "dtype", "quantization", "revision", "tokenizer_revision", "seed",
    "gpu_memory_utilization", "swap_space", "cpu_offload_gb", "enforce_eager", "max_seq_len_to_capture",
    "disable_custom_all_reduce", "disable_async_output_proc", "hf_token", "hf_overrides", "mm_processor_kwargs",
    "override_pooler_config", "compilation_config",
}
# ... and the EngineArgs fields its **kwargs reach that a caller here could pass.
ENGINE_ARGS = {
    "distributed_executor_backend", "enable_prefix_caching", "max_model_len", "max_num_seqs",
    "max_num_batched_tokens", "enable_sleep_mode", "pipeline_parallel_size", "data_parallel_size",
    "disable_log_stats", "load_format", "kv_cache_dtype", "enable_chunked_prefill", "worker_extension_cls",
}
LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING")
EOS = 2


class FakeModel:
    """The ``nn.Module`` in the worker; ``load_weights`` takes (name, tensor) pairs, as vLLM's models do."""

    def __init__(self) -> None:
        self.weights: dict[str, Any] = {}
        self.load_calls: list[list[tuple[str, Any]]] = []

    def load_weights(self, weights: Any) -> set[str]:
        weights = list(weights)
        self.load_calls.append(weights)
        self.weights.update(weights)
        return {name for name, _ in weights}

    def fingerprint(self) -> int:
        digest = hashlib.blake2b(digest_size=8)
        for name in sorted(self.weights):
            digest.update(name.encode())
            digest.update(self.weights[name].detach().cpu().numpy().tobytes())
        return int.from_bytes(digest.digest(), "little")


class Worker:
    def __init__(self, model: FakeModel) -> None:
        self.model_runner = SimpleNamespace(model=model)

    def get_model(self) -> FakeModel:
        return self.model_runner.model

    def apply_model(self, func: Callable[[Any], Any]) -> Any:
        return func(self.get_model())


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - LLM_PARAMETERS - ENGINE_ARGS)
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument {unknown[0]!r}")
        self.init_kwargs = {"model": model, **kwargs}
        self.env = {name: os.environ.get(name) for name in LAUNCH_ENV}
        backend = kwargs.get("distributed_executor_backend")
        if backend == "external_launcher":
            # env:// initialisation of torch.distributed, and the worker on cuda:LOCAL_RANK
            missing = [n for n in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if n not in os.environ]
            if missing:
                raise KeyError(missing[0])
            self.device = f"cuda:{os.environ['LOCAL_RANK']}"
        else:
            self.device = "cuda:0"
        # V1 runs the engine core in a child process unless told not to (external_launcher forces it in).
        self.multiprocess = backend != "external_launcher" and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0"
        self.model = FakeModel()
        self._worker = Worker(self.model)
        self.llm_engine = (
            SimpleNamespace() if self.multiprocess
            else SimpleNamespace(model_executor=SimpleNamespace(driver_worker=self._worker))
        )
        self._engine_rng = np.random.default_rng(kwargs.get("seed"))
        self._request_counter = itertools.count()
        self.prefix_cache: dict[tuple[int, ...], int] = {}
        self.prefix_cache_resets = 0
        self.generate_calls: list[dict[str, Any]] = []
        self.apply_model_calls = 0
        # vLLM 0.32's InprocClient: weakref.finalize(self, engine_core.shutdown), whose cleanup_dist_env_and_memory
        # destroys torch's default process group, whoever made it.
        weakref.finalize(self, _engine_core_shutdown)

    def get_tokenizer(self) -> Any:
        return SimpleNamespace(eos_token_id=EOS)

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: Any = None,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if isinstance(sampling_params, Sequence):
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("The lengths of prompts and params must be the same.")
        self.generate_calls.append(dict(prompts=prompts, params=params, use_tqdm=use_tqdm))
        return [self._run(prompt, sp) for prompt, sp in zip(prompts, params)]

    def _run(self, prompt: dict[str, Any], sp: SamplingParams) -> RequestOutput:
        ids = [int(i) for i in prompt["prompt_token_ids"]]
        kv = self.prefix_cache.setdefault(tuple(ids), self.model.fingerprint())  # computed once, then reused
        greedy = sp.temperature < 1e-5
        seed = 0 if greedy else sp.seed if sp.seed is not None else int(self._engine_rng.integers(2**62))
        rng = np.random.default_rng([seed, kv, *ids])
        outputs = []
        for index in range(sp.n):
            tokens = [int(t) for t in rng.integers(10, 100, size=sp.max_tokens)]
            stops = bool(sp.stop_token_ids) and rng.random() < 0.5
            if stops:
                tokens = tokens[: int(rng.integers(1, sp.max_tokens + 1))]
                tokens[-1] = sp.stop_token_ids[int(rng.integers(len(sp.stop_token_ids)))]
            text = " ".join(str(t) for t in tokens if not (sp.skip_special_tokens and t in sp.stop_token_ids))
            outputs.append(CompletionOutput(
                index=index, text=text, token_ids=tokens, finish_reason="stop" if stops else "length",
                stop_reason=tokens[-1] if stops else None,
            ))
        return RequestOutput(str(next(self._request_counter)), None, ids, outputs)

    def collective_rpc(
        self, method: str | Callable[..., Any], timeout: float | None = None, args: tuple = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        if self.multiprocess:  # sent to the engine-core process
            method, args, kwargs = pickle.loads(pickle.dumps((method, args, kwargs)))
        func = method if callable(method) else getattr(type(self._worker), method)
        return [func(self._worker, *args, **(kwargs or {}))]

    def apply_model(self, func: Callable[[Any], Any]) -> list[Any]:
        self.apply_model_calls += 1
        return self.collective_rpc("apply_model", args=(func,))

    def reset_prefix_cache(self, device: Any = None) -> bool:
        self.prefix_cache.clear()
        self.prefix_cache_resets += 1
        return True


def _engine_core_shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
