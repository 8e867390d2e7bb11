"""The vLLM sampling backend (the paper's engine, appendix A), behind the same ``Sampler`` protocol; optional extra."""

from __future__ import annotations

from typing import Any

from itermerge.errors import ItermergeError
from itermerge.sampling.params import Sample, SamplingParams, prompt_seeds


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:
        raise ItermergeError(
            f"sampling backend 'vllm' needs the vllm package ({err}): pip install 'itermerge[vllm]', "
            "or use the 'hf' backend"
        ) from err
    return vllm


def vllm_sampling_kwargs(params: SamplingParams, eos_ids: list[int], request_seed: int) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one prompt: the same law as our ``SamplingParams``.

    vLLM turns top-k off with −1 (we use 0); it stops at ``stop_token_ids`` (every EOS id of the
    generation config, as the hf backend does). Greedy asks for one sample, which the caller repeats:
    older vLLM rejects n > 1 without sampling, and greedy samples are identical anyway.
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


def eos_ids_of(model_path: str, tokenizer_eos: int | None) -> list[int]:
    """EOS ids from the checkpoint's generation_config.json, else the tokenizer's."""
    from transformers import GenerationConfig

    try:
        ids = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        ids = None
    if ids is None:
        ids = tokenizer_eos
    if ids is None:
        raise ItermergeError(f"{model_path}: no EOS token in generation_config.json or the tokenizer; set one")
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


class VLLMSampler:
    """Samples with vLLM (GPU). The K samples of a prompt are one request with its own seed."""

    def __init__(
        self,
        model_path: str,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "bfloat16",
        progress: bool = True,
    ) -> None:
        vllm = import_vllm()
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=model_path,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
        )
        self.eos_ids = eos_ids_of(model_path, self.llm.get_tokenizer().eos_token_id)
        self.progress = progress

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        """``params.n`` samples per prompt, in prompt order."""
        if not prompt_ids:
            return []
        requests = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        per_request = [
            self._vllm.SamplingParams(**vllm_sampling_kwargs(params, self.eos_ids, seed))
            for seed in prompt_seeds(prompt_ids, params.seed)
        ]
        outputs = self.llm.generate(requests, per_request, use_tqdm=self.progress)
        results = []
        for out in outputs:
            samples = [to_sample(c.text, c.token_ids, c.finish_reason, self.eos_ids) for c in out.outputs]
            results.append(samples * params.n if params.greedy else samples)
        return results
