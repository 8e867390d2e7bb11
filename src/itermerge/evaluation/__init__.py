"""Evaluators: task accuracy and format, mean reward, KL to the reference, lm-eval-harness benchmarks.

Their settings are ``itermerge.config.evaluation``.
"""

from itermerge.evaluation.build import build_evaluator, run_evaluation
from itermerge.evaluation.kl import sequence_kl
from itermerge.evaluation.metric import Metric, clustered_mean, mean_metric
from itermerge.evaluation.suite import Evaluator, evaluate, metrics_to_dict
from itermerge.evaluation.task import accuracy_metrics, is_bare_number, mean_reward, task_accuracy

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
