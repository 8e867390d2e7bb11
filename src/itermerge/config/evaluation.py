"""What to evaluate: frozen settings for each evaluator, validated once, with a fingerprint for resume."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from itermerge.config.parse import build
from itermerge.errors import ItermergeError

SAMPLING_MODES = ("greedy", "eval")  # "eval": appendix A's evaluation column (T 0.7, top-p 0.9, top-k 40)


@dataclass(frozen=True)
class PromptSource:
    """Where the prompts of a split come from: a built-in task's generator, or JSONL files per split."""

    task: str | None = field(default="arithmetic", metadata={"help": "built-in task (prompts and verifier)"})
    task_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "task constructor options"})
    files: dict[str, str] = field(
        default_factory=dict, metadata={"help": "split → prompts JSONL; replaces the task's generator"}
    )
    n: int = field(default=100, metadata={"help": "prompts per split (all of a file when larger)"})
    test_n: int | None = field(
        default=None, metadata={"help": "prompts in the test split, if not n (a test set large enough to see a "
                                        "small difference costs one evaluation per model, the dev set one per point)"}
    )
    seed: int = field(default=0, metadata={"help": "prompt order and sampling seed"})
    heldout_from: str | None = field(
        default=None,
        metadata={"help": "a training prompt file (or dataset directory): splits not in files are held out of it, "
                          "n each, seeded (itermerge/prompts.py); training never sees them"},
    )
    heldout_source: str = field(default="jsonl", metadata={"help": "jsonl or dataset: the format of heldout_from"})


@dataclass(frozen=True)
class AccuracyConfig:
    """Task accuracy by the task's verifier, and the answer-format rate beside it."""

    sampling: str = field(default="greedy", metadata={"help": "greedy | eval (appendix A)"})
    samples: int = field(default=1, metadata={"help": "completions per prompt (1 when greedy)"})
    verifier: str | None = field(
        default=None,
        metadata={"help": "module:is_correct(prompt, completion) -> bool deciding correctness; default the task's, or "
                          "the run verifier's module's is_correct when it has one"},
    )
    threshold: float | None = field(
        default=None, metadata={"help": "instead: a reply is correct when the reward scorer gives it at least this"}
    )
    format: str | None = field(
        default=None,
        metadata={"help": "module:follows_format(prompt, completion) -> bool for the format rate; default the task's"},
    )


@dataclass(frozen=True)
class RewardConfig:
    """The paper's "average reward": mean score of completions under a scorer."""

    scorer: dict[str, Any] | None = field(
        default=None, metadata={"help": "labeling.make_scorer spec; None = the task's own graded score"}
    )
    sampling: str = field(default="eval", metadata={"help": "greedy | eval (appendix A, as §4.2)"})
    samples: int = field(default=1, metadata={"help": "completions per prompt"})


@dataclass(frozen=True)
class KLConfig:
    """KL(π ‖ π_ref) from samples of π at temperature 1 (no truncation: the estimate needs π's own law)."""

    samples: int = field(default=1, metadata={"help": "samples per prompt"})


@dataclass(frozen=True)
class LmEvalTask:
    """One lm-eval-harness task and how it is run."""

    name: str
    num_fewshot: int | None = None
    chat_template: bool = False
    metric: str = field(default="acc", metadata={"help": "the metric key reported, e.g. acc, acc_norm"})
    filter: str = field(default="none", metadata={"help": "the filter of that metric, e.g. flexible-extract"})


# TruthfulQA's "top-1 accuracy" at 0-shot is lm-eval's truthfulqa_mc2 (the Open LLM Leaderboard's);
# gsm8k_cot holds 8 CoT exemplars, of which num_fewshot=5 keeps the first five.
PRESETS: dict[str, tuple[LmEvalTask, ...]] = {
    "paper": (
        LmEvalTask("mmlu", num_fewshot=5, chat_template=True, metric="acc"),
        LmEvalTask("truthfulqa_mc2", num_fewshot=0, chat_template=True, metric="acc"),
        LmEvalTask("arc_challenge", num_fewshot=25, chat_template=True, metric="acc"),
        LmEvalTask("hellaswag", num_fewshot=10, chat_template=False, metric="acc_norm"),
        LmEvalTask("gsm8k_cot", num_fewshot=5, chat_template=True, metric="exact_match", filter="flexible-extract"),
    ),
}


@dataclass(frozen=True)
class LmEvalConfig:
    """lm-eval-harness benchmarks (extra ``eval``): a preset or explicit tasks."""

    preset: str | None = field(default=None, metadata={"help": "'paper': the five benchmarks of Table 2"})
    tasks: tuple[LmEvalTask, ...] = ()
    include_path: str | None = field(default=None, metadata={"help": "directory of local task YAMLs"})
    limit: int | None = field(default=None, metadata={"help": "documents per task (None: all)"})
    batch_size: int = 8
    fewshot_as_multiturn: bool = False
    split_documents: bool = field(
        default=True, metadata={"help": "dev and test get disjoint halves of each benchmark's documents (a hash of "
                                        "the task and document index), so a choice made on dev is tested on unseen "
                                        "documents; false: every document for both"}
    )


@dataclass(frozen=True)
class AxisConfig:
    """An extra evaluation axis: a user's metrics on greedy replies to its own prompts (or to the split's)."""

    name: str = field(metadata={"help": "the metrics' prefix: NAME/<metric> in every table"})
    metrics: str = field(
        metadata={"help": "module:function(prompts, completions) -> {metric: [value per unit]} (a unit is a prompt, "
                          "or e.g. a constraint; each metric is the mean over its units)"}
    )
    prompts: str | None = field(
        default=None, metadata={"help": "module:function(split, n, seed) -> list[Prompt]; None: the split's own "
                                        "prompts and their accuracy replies (nothing generated twice)"}
    )
    n: int | None = field(default=None, metadata={"help": "prompts asked of the prompts function (None: its all)"})
    splits: tuple[str, ...] = field(
        default=("test",), metadata={"help": "the splits it runs on; test only by default, so the search never "
                                             "pays for it and never chooses by it"}
    )
    max_new_tokens: int | None = field(default=None, metadata={"help": "None: evaluation.max_new_tokens"})


@dataclass(frozen=True)
class EvalConfig:
    """Every evaluator the search, ``itermerge eval`` and the report use; None turns one off."""

    prompts: PromptSource = field(default_factory=PromptSource)
    max_new_tokens: int = 64
    batch_size: int = field(default=128, metadata={"help": "sampler rows per batch"})
    accuracy: AccuracyConfig | None = field(default_factory=AccuracyConfig)
    reward: RewardConfig | None = field(default_factory=RewardConfig)
    kl: KLConfig | None = None
    lm_eval: LmEvalConfig | None = None
    axes: tuple[AxisConfig, ...] = field(
        default=(), metadata={"help": "extra axes beside accuracy and reward, e.g. another benchmark scored by its "
                                      "own code (examples/instruction_following/config.yaml)"}
    )

    def __post_init__(self) -> None:
        positive = [
            ("max_new_tokens", self.max_new_tokens),
            ("batch_size", self.batch_size),
            ("prompts.n", self.prompts.n),
        ]
        positive += [
            (f"{name}.samples", getattr(self, name).samples)
            for name in ("accuracy", "reward", "kl")
            if getattr(self, name)
        ]
        for name, value in positive:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ItermergeError(f"eval.{name} = {value!r}: must be an integer >= 1")
        for name in ("accuracy", "reward"):
            section = getattr(self, name)
            if section is None:
                continue
            if section.sampling not in SAMPLING_MODES:
                raise ItermergeError(f"eval.{name}.sampling = {section.sampling!r}: use one of {list(SAMPLING_MODES)}")
            if section.sampling == "greedy" and section.samples != 1:
                raise ItermergeError(
                    f"eval.{name}.samples = {section.samples} with greedy decoding gives identical copies; "
                    "set samples: 1 or sampling: eval"
                )
        if self.prompts.task is None and not self.prompts.files and not self.prompts.heldout_from:
            raise ItermergeError(
                "eval.prompts: give a task (e.g. arithmetic), files {dev: dev.jsonl, test: test.jsonl}, or heldout_from"
            )
        accuracy = self.accuracy
        if accuracy is not None and accuracy.verifier is not None and accuracy.threshold is not None:
            raise ItermergeError("eval.accuracy: give verifier or threshold, not both")
        if accuracy is not None and accuracy.threshold is not None and self.reward is None:
            raise ItermergeError("eval.accuracy.threshold reads the reward scorer's scores; turn eval.reward on")
        decided = accuracy is not None and (accuracy.verifier is not None or accuracy.threshold is not None)
        if accuracy is not None and self.prompts.task is None and not decided:
            raise ItermergeError(
                "eval.accuracy: nothing decides whether a reply is correct (no built-in task); set accuracy.verifier "
                "(module:is_correct), accuracy.threshold (on the reward scorer's score), or accuracy: null"
            )
        if self.reward is not None and self.reward.scorer is None and self.prompts.task is None:
            raise ItermergeError("eval.reward.scorer is unset and there is no task to score with; give a scorer spec")
        if self.lm_eval is not None and not (self.lm_eval.preset or self.lm_eval.tasks):
            raise ItermergeError("eval.lm_eval: give a preset (paper) or a list of tasks")
        self._check_axes()

    def _check_axes(self) -> None:
        names = [axis.name for axis in self.axes]
        for i, axis in enumerate(self.axes):
            where = f"eval.axes[{i}] ({axis.name!r})"
            if not axis.name or "/" in axis.name or names.count(axis.name) > 1:
                raise ItermergeError(f"{where}: a name must be non-empty, without '/', and unique among {names}")
            if not axis.splits or any(s not in ("dev", "test") for s in axis.splits):
                raise ItermergeError(f"{where}.splits = {list(axis.splits)}: use dev and/or test")
            if axis.prompts is None and self.accuracy is None:
                raise ItermergeError(f"{where}: without its own prompts it reads the accuracy replies; turn "
                                     "eval.accuracy on or give the axis a prompts function")
            for key in ("n", "max_new_tokens"):
                value = getattr(axis, key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    raise ItermergeError(f"{where}.{key} = {value!r}: must be an integer >= 1 or null")

    def metrics(self) -> list[str]:
        """The names of the metrics these evaluators produce (what a selection rule may name)."""
        names = []
        if self.accuracy is not None:
            names.append("accuracy")
            if self.accuracy.format is not None or self.prompts.task is not None:
                names.append("format")
        names += ["reward"] * (self.reward is not None) + ["kl"] * (self.kl is not None)
        if self.lm_eval is not None:
            tasks = [*PRESETS.get(self.lm_eval.preset or "", ()), *self.lm_eval.tasks]
            names += [f"lm_eval/{t.name}" for t in tasks] + ["lm_eval/average"]
        return names

    def fingerprint(self) -> str:
        """A short hash of these settings: search points are reused only under the same evaluators."""
        settings = dataclasses.asdict(self)
        if not settings["axes"]:  # added after runs were made: at its default it leaves their records valid
            del settings["axes"]
        text = json.dumps(settings, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, obj: dict[str, Any] | None, where: str = "eval") -> EvalConfig:
        """Build from plain data (a YAML section) with ``itermerge.config``'s one parser; a null section is off."""
        return build(cls, obj, where, prefix="eval.")
