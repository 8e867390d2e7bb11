"""RunConfig: every stage's frozen settings, parsed from YAML in this one place (unknown keys are errors)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from itermerge.dpo import DPOConfig
from itermerge.errors import ItermergeError
from itermerge.evaluation import EvalConfig
from itermerge.sampling import SamplingParams
from itermerge.search import SearchConfig


@dataclass(frozen=True)
class ModelConfig:
    """θ0: the reference policy and the start of iteration 1."""

    path: str = field(default="smollm2-135m-instruct", metadata={"help": "θ0: a directory, a Hub id, or the built-in smollm2-135m-instruct"})
    dtype: str = field(default="auto", metadata={"help": "auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda, cuda:N"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run the checkpoint's own modelling code"})

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ItermergeError(f"model.dtype = {self.dtype!r}: use auto, float32, bfloat16 or float16")


@dataclass(frozen=True)
class PromptsConfig:
    """The prompt sets X_1..X_T of Alg. 1 and the dev/test prompts of the search."""

    source: str = field(default="task", metadata={"help": "task (built-in generator), jsonl, or dataset (a local HF datasets directory)"})
    task: str = field(default="arithmetic", metadata={"help": "built-in task name (source: task); also the verifier of evaluation"})
    task_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "options of the built-in task, e.g. {low: 2, high: 30}"})
    path: str | None = field(default=None, metadata={"help": "jsonl file or dataset directory (source: jsonl/dataset); cut into T disjoint slices"})
    per_iteration: int = field(default=64, metadata={"help": "prompts per iteration (|X_t|)"})
    dev: int = field(default=100, metadata={"help": "dev and test prompts each (the search, the studies, the final test)"})
    max_prompt_length: int = field(default=1024, metadata={"help": "longest prompt in tokens (appendix C: 1,024)"})
    truncate: str = field(default="drop", metadata={"help": "a longer prompt is dropped (counted) or truncated from the left"})

    def __post_init__(self) -> None:
        if self.source not in ("task", "jsonl", "dataset"):
            raise ItermergeError(f"prompts.source = {self.source!r}: use task, jsonl or dataset")
        if self.source != "task" and not self.path:
            raise ItermergeError(f"prompts.source = {self.source}: set prompts.path to the file or directory")
        for name in ("per_iteration", "dev", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise ItermergeError(f"prompts.{name} = {getattr(self, name)}: must be a positive integer")
        if self.truncate not in ("drop", "left"):
            raise ItermergeError(f"prompts.truncate = {self.truncate!r}: use drop or left")


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling K completions per prompt (appendix A's training column by default)."""

    backend: str = field(default="hf", metadata={"help": "hf (CPU and GPU) or vllm (GPU, extra itermerge[vllm])"})
    batch_size: int = field(default=128, metadata={"help": "sequences decoded together (prompts × K); 128 keeps a CPU busy (64 is ~25 % slower per token)"})
    n: int = field(default=8, metadata={"help": "K: completions per prompt"})
    temperature: float = field(default=1.0, metadata={"help": "0 means greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus mass; 1 turns it off"})
    top_k: int = field(default=0, metadata={"help": "0 turns it off"})
    max_new_tokens: int = field(default=1024, metadata={"help": "completion maximum length"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm only"})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vllm only"})

    def __post_init__(self) -> None:
        if self.backend not in ("hf", "vllm"):
            raise ItermergeError(f"sampling.backend = {self.backend!r}: use hf or vllm")
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
    function: str = field(default="itermerge.tasks.arithmetic:score", metadata={"help": "verifier: module:function(prompt, completion) -> float"})
    path: str | None = field(default=None, metadata={"help": "reward_model: directory or Hub id"})
    trust_remote_code: bool = field(default=False, metadata={"help": "reward_model: run its own modelling code (e.g. ArmoRM)"})
    batch_size: int = field(default=8, metadata={"help": "reward_model: sequences per forward"})

    def __post_init__(self) -> None:
        if self.type not in ("verifier", "reward_model"):
            raise ItermergeError(f"scorer.type = {self.type!r}: use verifier or reward_model")
        if self.type == "reward_model" and not self.path:
            raise ItermergeError("scorer.type = reward_model: set scorer.path to the reward model")

    def spec(self) -> dict[str, Any]:
        if self.type == "verifier":
            return {"type": "verifier", "function": self.function}
        return {"type": "reward_model", "path": self.path, "trust_remote_code": self.trust_remote_code, "batch_size": self.batch_size}


@dataclass(frozen=True)
class StudiesConfig:
    """The evidence of §4.1 and §4.3: α study, λ study, accuracy matrix, merge-vs-ensemble."""

    alpha_study: bool = field(default=True, metadata={"help": "Table 1 / Fig. 2: induced rewards against α (λ = 0)"})
    alphas: list[float] = field(default_factory=lambda: [-0.5, 0.0, 0.5, 1.0, 1.5], metadata={"help": "α grid of the α study"})
    lambda_study: bool = field(default=False, metadata={"help": "Fig. 3-4: two criteria trained from θ0, merged at λ ∈ {0, .25, .5, .75, 1}"})
    second_criterion: str = field(default="itermerge.tasks.arithmetic:brevity", metadata={"help": "the λ study's other verifier"})
    accuracy_matrix: bool = field(default=True, metadata={"help": "Fig. 6: induced-reward accuracy on preference sets from π_θ1..π_θT"})
    ensemble: bool = field(default=True, metadata={"help": "eq. (6) ensemble vs the merge: KL, correlation, cost"})
    prompts: int = field(default=32, metadata={"help": "dev prompts per study"})
    n: int = field(default=4, metadata={"help": "completions per prompt in the studies"})


@dataclass(frozen=True)
class RunConfig:
    """A whole run: Alg. 1 for T iterations, then the search, the merge, the studies and the report."""

    name: str = field(default="run", metadata={"help": "run name (the default run directory is runs/NAME)"})
    seed: int = field(default=0, metadata={"help": "one seed for prompts, sampling and training"})
    iterations: int = field(default=3, metadata={"help": "T, the number of iterations of Alg. 1"})
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    studies: StudiesConfig = field(default_factory=StudiesConfig)

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ItermergeError(f"iterations = {self.iterations}: T must be at least 1")


# --- parsing ------------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file into a RunConfig; ``overrides`` are ``dotted.key=value`` strings (YAML values)."""
    path = Path(path)
    if not path.exists():
        raise ItermergeError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ItermergeError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ItermergeError(f"{path}: the top level must be a mapping of sections (model:, prompts:, …)")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ItermergeError(f"override {item!r}: write section.key=value, e.g. dpo.learning_rate=1e-5")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return from_dict(data, where=str(path))


def build(cls: type, data: dict[str, Any] | None, where: str = "config", prefix: str = "") -> Any:
    """Any stage's settings dataclass from plain data (a YAML section), with the same checks as a RunConfig."""
    return _build(cls, data or {}, where, prefix)


def from_dict(data: dict[str, Any], where: str = "config") -> RunConfig:
    data = dict(data)
    # The evaluation prompts default to the training task's dev/test splits, so a task set once applies to both.
    prompts = data.get("prompts") or {}
    if isinstance(prompts, dict) and prompts.get("source", "task") == "task":
        evaluation = dict(data.get("evaluation") or {})
        if isinstance(evaluation, dict) and "prompts" not in evaluation:
            evaluation["prompts"] = {
                "task": prompts.get("task", "arithmetic"), "task_options": prompts.get("task_options", {}),
                "n": prompts.get("dev", 100), "seed": data.get("seed", 0),
            }
            data["evaluation"] = evaluation
    return _build(RunConfig, data, where, prefix="")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(_plain(to_dict(cfg)), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: Any, where: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ItermergeError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ItermergeError(f"{where}: unknown key {prefix}{unknown[0]}; known keys here: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, where, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ItermergeError as e:
        raise ItermergeError(f"{where}: {e}") from None


def _coerce(hint: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, str):  # a section named by its first field, e.g. an lm-eval task by name
            value = {dataclasses.fields(hint)[0].name: value}
        return _build(hint, value or {}, where, key + ".")
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, where, key)
    bad = ItermergeError(f"{where}: {key} = {value!r} is not a {getattr(hint, '__name__', hint)}")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads 1e-5 (no dot) as a string: accept what float() accepts.
            try:
                return float(value)
            except (TypeError, ValueError):
                raise bad from None
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(hint)
        item = args[0] if args else Any
        items = [_coerce(item, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    return value
