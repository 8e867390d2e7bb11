"""Evaluation: the evaluators (``evaluators/``: task accuracy and format, mean reward, a user's axes, KL to the
reference, lm-eval-harness benchmarks, one module each), the loop that runs them on a model (``suite``) and the one
way a run builds it (``build``).

Their settings are ``itermerge.config.evaluation``.
"""

import importlib
from typing import Any

# Loaded when first used, so that the declarations (``evaluators``, ``metric``) are read without torch: the search's
# selection rule and the report name their directions.
_WHERE = {
    "build_evaluator": "build", "run_evaluation": "build",
    "accuracy_metrics": "evaluators.accuracy", "is_bare_number": "evaluators.accuracy",
    "task_accuracy": "evaluators.accuracy", "sequence_kl": "evaluators.kl", "mean_reward": "evaluators.reward",
    "Metric": "metric", "clustered_mean": "metric", "mean_metric": "metric",
    "Evaluator": "suite", "evaluate": "suite", "metrics_to_dict": "suite",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'itermerge.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"itermerge.evaluation.{_WHERE[name]}"), name)


__all__ = [
    "Evaluator",
    "Metric",
    "accuracy_metrics",
    "build_evaluator",
    "clustered_mean",
    "evaluate",
    "is_bare_number",
    "mean_metric",
    "mean_reward",
    "metrics_to_dict",
    "run_evaluation",
    "sequence_kl",
    "task_accuracy",
]
