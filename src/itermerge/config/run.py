"""RunConfig: every stage's frozen settings, parsed from YAML in this one place (unknown keys are errors)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itermerge.config.defaults import follow_the_run
from itermerge.config.dpo import DPOConfig
from itermerge.config.evaluation import EvalConfig
from itermerge.config.parse import build, read_yaml, to_dict
from itermerge.config.sampling_params import SamplingParams
from itermerge.config.search import SearchConfig
from itermerge.errors import ItermergeError


@dataclass(frozen=True)
class ModelConfig:
    """θ0: the reference policy and the start of iteration 1."""

    path: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "θ0: a directory, a Hub id, or the built-in smollm2-135m-instruct"},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "auto (bfloat16 on GPU; on CPU the faster of the two, measured), float32, bfloat16, float16"},
    )
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda, cuda:N"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run the checkpoint's own modelling code"})

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ItermergeError(f"model.dtype = {self.dtype!r}: use auto, float32, bfloat16 or float16")


@dataclass(frozen=True)
class PromptsConfig:
    """The prompt sets X_1..X_T of Alg. 1 and the dev/test prompts of the search."""

    source: str = field(
        default="task",
        metadata={"help": "task (built-in generator), jsonl, or dataset (a local HF datasets directory)"},
    )
    task: str = field(
        default="arithmetic", metadata={"help": "built-in task name (source: task); also the verifier of evaluation"}
    )
    task_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "options of the built-in task, e.g. {low: 2, high: 30}"}
    )
    path: str | None = field(
        default=None,
        metadata={"help": "jsonl file or dataset directory (source: jsonl/dataset); cut into T disjoint slices"},
    )
    dev_path: str | None = field(
        default=None,
        metadata={"help": "dev prompts (JSONL or dataset directory) for the search and studies; if unset, prompts.dev "
                          "prompts are held out of the training file (source: jsonl/dataset)"},
    )
    test_path: str | None = field(
        default=None, metadata={"help": "test prompts, used once on the chosen merge; if unset, held out likewise"}
    )
    per_iteration: int = field(default=64, metadata={"help": "prompts per iteration (|X_t|)"})
    dev: int = field(
        default=100, metadata={"help": "dev and test prompts each (the search, the studies, the final test)"}
    )
    test: int | None = field(
        default=None, metadata={"help": "test prompts, if not prompts.dev (e.g. 400 to see a 5-point difference)"}
    )
    max_prompt_length: int = field(default=1024, metadata={"help": "longest prompt in tokens (appendix C: 1,024)"})
    truncate: str = field(
        default="drop", metadata={"help": "a longer prompt is dropped (counted) or truncated from the left"}
    )

    def __post_init__(self) -> None:
        if self.source not in ("task", "jsonl", "dataset"):
            raise ItermergeError(f"prompts.source = {self.source!r}: use task, jsonl or dataset")
        if self.source != "task" and not self.path:
            raise ItermergeError(f"prompts.source = {self.source}: set prompts.path to the file or directory")
        for name in ("per_iteration", "dev", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise ItermergeError(f"prompts.{name} = {getattr(self, name)}: must be a positive integer")
        if self.test is not None and (isinstance(self.test, bool) or not isinstance(self.test, int) or self.test < 1):
            raise ItermergeError(f"prompts.test = {self.test!r}: must be a positive integer, or absent (= prompts.dev)")
        if self.truncate not in ("drop", "left"):
            raise ItermergeError(f"prompts.truncate = {self.truncate!r}: use drop or left")


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling K completions per prompt (appendix A's training column by default)."""

    backend: str = field(default="hf", metadata={"help": "hf (CPU and GPU) or vllm (GPU, extra itermerge[vllm])"})
    batch_size: int = field(
        default=128,
        metadata={"help": "sequences decoded together (prompts × K); 128 keeps a CPU busy (docs/benchmarks.md)"},
    )
    n: int = field(default=8, metadata={"help": "K: completions per prompt"})
    temperature: float = field(default=1.0, metadata={"help": "0 means greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus mass; 1 turns it off"})
    top_k: int = field(default=0, metadata={"help": "0 turns it off"})
    max_new_tokens: int = field(default=1024, metadata={"help": "completion maximum length"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm only"})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vllm only"})
    vllm_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "vllm only: more keyword arguments of vllm.LLM, e.g. {enforce_eager: true, "
                          "max_model_len: 4096}"})
    # Speed settings of the hf backend: each on by default, same samples up to float rounding; off (or `--plain`)
    # to compare against the plain path. Measured in docs/benchmarks.md.
    blocked_output_layer: bool = field(
        default=True, metadata={"help": "hf on CPU: the output layer in 4,096-row vocabulary blocks that stay in cache"}
    )
    growing_kv_cache: bool = field(
        default=True,
        metadata={"help": "hf: KV cache appended in place with room to grow (rows join mid-way), not re-concatenated"})
    grouped_query_sdpa: bool = field(
        default=True, metadata={"help": "hf on CPU: grouped K/V heads passed to torch's SDPA as they are"})
    cuda_graphs: bool = field(
        default=True, metadata={"help": "hf on GPU: static KV cache of slots, each decoding step one CUDA graph"})
    shared_prefix: bool = field(
        default=True, metadata={"help": "hf: the prompt prefix a batch shares (the chat template's system turn) "
                                        "prefilled once, its KV cache expanded to the rows"})

    def __post_init__(self) -> None:
        # backend: the registered names are checked by preflight (sampling/backends.py holds them)
        if self.n < 2:
            raise ItermergeError(f"sampling.n = {self.n}: K must be at least 2 to form a best-vs-worst pair")
        if self.batch_size < 1:
            raise ItermergeError(f"sampling.batch_size = {self.batch_size}: must be a positive integer")
        self.params(0)  # validates temperature, top_p, top_k, max_new_tokens

    def params(self, seed: int) -> SamplingParams:
        return SamplingParams(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, seed=seed)


@dataclass(frozen=True)
class ScorerConfig:
    """Who labels the preference: a Python verifier or an HF reward model."""

    type: str = field(default="verifier", metadata={"help": "verifier or reward_model"})
    function: str = field(
        default="itermerge.tasks.arithmetic:score",
        metadata={"help": "verifier: module:function(prompt, completion) -> float"},
    )
    path: str | None = field(default=None, metadata={"help": "reward_model: directory or Hub id"})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "reward_model: run its own modelling code (e.g. ArmoRM)"}
    )
    batch_size: int = field(default=8, metadata={"help": "reward_model: sequences per forward"})

    def __post_init__(self) -> None:
        if self.type not in ("verifier", "reward_model"):
            raise ItermergeError(f"scorer.type = {self.type!r}: use verifier or reward_model")
        if self.type == "reward_model" and not self.path:
            raise ItermergeError("scorer.type = reward_model: set scorer.path to the reward model")

    def spec(self) -> dict[str, Any]:
        if self.type == "verifier":
            return {"type": "verifier", "function": self.function}
        return {
            "type": "reward_model",
            "path": self.path,
            "trust_remote_code": self.trust_remote_code,
            "batch_size": self.batch_size,
        }


@dataclass(frozen=True)
class StudiesConfig:
    """The evidence of §4.1 and §4.3: α study, λ study, accuracy matrix, merge-vs-ensemble."""

    alpha_study: bool = field(default=True, metadata={"help": "Table 1 / Fig. 2: induced rewards against α (λ = 0)"})
    alphas: list[float] = field(
        default_factory=lambda: [-0.5, 0.0, 0.5, 1.0, 1.5], metadata={"help": "α grid of the α study"}
    )
    lambda_study: bool = field(
        default=False, metadata={"help": "Fig. 3-4: two criteria trained from θ0, merged at λ ∈ {0, .25, .5, .75, 1}"}
    )
    second_criterion: str = field(
        default="itermerge.tasks.arithmetic:brevity", metadata={"help": "the λ study's other verifier"}
    )
    accuracy_matrix: bool = field(
        default=True, metadata={"help": "Fig. 6: induced-reward accuracy on preference sets from π_θ1..π_θT"}
    )
    ensemble: bool = field(default=True, metadata={"help": "eq. (6) ensemble vs the merge: KL, correlation, cost"})
    ensemble_fallback: tuple[float, float] = field(
        default=(0.3, 0.4),
        metadata={"help": "(λ, α) the ensemble study measures when the search chose θT or θ0 itself (whose ensemble "
                          "is one model); default the paper's Llama-3-8B pick. The report says when it is used"},
    )
    prompts: int = field(default=32, metadata={"help": "dev prompts per study"})
    n: int = field(default=4, metadata={"help": "completions per prompt in the studies"})
    sampling: str = field(
        default="eval",
        metadata={"help": "how the α and λ studies sample: eval (appendix A's evaluation column, as §4.1) or train "
                          "(the training column; then r_θ/β also estimates KL to θ0)"},
    )

    def __post_init__(self) -> None:
        if len(self.ensemble_fallback) != 2:
            raise ItermergeError(
                f"studies.ensemble_fallback = {list(self.ensemble_fallback)}: give [λ, α], e.g. [0.3, 0.4]"
            )
        for name in ("prompts", "n"):
            if getattr(self, name) < 1:
                raise ItermergeError(f"studies.{name} = {getattr(self, name)}: must be a positive integer")
        if self.sampling not in ("eval", "train"):
            raise ItermergeError(f"studies.sampling = {self.sampling!r}: use eval or train")


@dataclass(frozen=True)
class RunConfig:
    """A whole run: Alg. 1 for T iterations, then the search, the merge, the studies and the report."""

    name: str = field(default="run", metadata={"help": "run name (the default run directory is runs/NAME)"})
    seed: int = field(default=0, metadata={"help": "one seed for prompts, sampling and training"})
    iterations: int = field(default=3, metadata={"help": "T, the number of iterations of Alg. 1"})
    timeout_minutes: int = field(
        default=240,
        metadata={"help": "under a launcher, how long a process may wait for the others (the process group's and "
                          "DeepSpeed's timeout); every stage is shared out, so a wait is at most one unit of another "
                          "process's share (one search point with lm-eval at the paper's size: under 2 h)"},
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    studies: StudiesConfig = field(default_factory=StudiesConfig)

    def __post_init__(self) -> None:
        if self.timeout_minutes < 1:
            raise ItermergeError(f"timeout_minutes = {self.timeout_minutes}: must be a positive number of minutes")
        if self.iterations < 1:
            raise ItermergeError(f"iterations = {self.iterations}: T must be at least 1")
        late = [t for t in self.search.at if t >= self.iterations]
        if late:
            raise ItermergeError(f"search.at = {list(self.search.at)}: T' = {late[0]} is not below iterations = "
                                 f"{self.iterations}; the full run's search is already T = {self.iterations}")
        if "learned" in self.search.operators:  # fitted on one half of dev, checked on the other (search/learned.py)
            if self.evaluation.lm_eval is not None:
                raise ItermergeError("search.operators.learned: evaluation.lm_eval measures benchmark documents, which "
                                     "cannot be split into a fit half and a check half of dev; leave learned out of "
                                     "search.operators or evaluation.lm_eval out of the run")
            if self.evaluation.prompts.n < 4:
                raise ItermergeError(f"search.operators.learned: {self.evaluation.prompts.n} dev prompts (prompts.dev, "
                                     "evaluation.prompts.n) cannot be split into a fit half and a check half of at "
                                     "least 2 each; give prompts.dev >= 4")


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file into a RunConfig; ``overrides`` are ``dotted.key=value`` strings (YAML values)."""
    return from_dict(read_yaml(path, overrides), where=str(path))


def from_dict(data: dict[str, Any], where: str = "config") -> RunConfig:
    """A RunConfig from plain data; the evaluation's defaults follow the run (``config.defaults``)."""
    scorer = data.get("scorer") if data.get("scorer") is not None else {}
    try:
        spec = build(ScorerConfig, scorer, where, prefix="scorer.").spec() if isinstance(scorer, dict) else None
    except ItermergeError:
        spec = None  # the whole build below names the problem in its place
    return build(RunConfig, follow_the_run(data, spec), where)


def as_recorded(config: RunConfig | dict[str, Any], where: str = "manifest.json") -> dict[str, Any]:
    """A config as a run records it (plain JSON: tuples become lists). A recorded dict is read through ``from_dict``
    so settings added since the run was made compare as their defaults; one holding a key no longer known stays as
    recorded, so the difference shows where it is compared."""
    if isinstance(config, dict):
        try:
            config = from_dict(config, where=where)
        except ItermergeError:
            return json.loads(json.dumps(config))
    return json.loads(json.dumps(to_dict(config)))
