"""The same merge as a mergekit config: eq. (9) is task arithmetic with base θ0, unnormalised, in float32."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from itermerge.checkpoint.dtypes import parse_dtype, torch_name

if TYPE_CHECKING:
    import torch


def mergekit_config(
    reference: str | os.PathLike,
    checkpoints: Sequence[str | os.PathLike],
    weights: Sequence[float],
    dtype: str | torch.dtype | None = None,
) -> str:
    """The mergekit YAML that reproduces eq. (9): task arithmetic with base θ0, unnormalised, float32 compute."""
    lines = [
        "# Reproduces `itermerge merge` with mergekit (mergekit-yaml THIS_FILE OUT_DIR):",
        "# eq. (9) is task arithmetic with base θ0 and weights k_t, unnormalised, computed in float32.",
        "merge_method: task_arithmetic",
        f"base_model: {json.dumps(str(reference))}",
        "models:",
    ]
    for path, k in zip(checkpoints, weights):
        if k != 0.0:
            lines += [f"  - model: {json.dumps(str(path))}", "    parameters:", f"      weight: {k!r}"]
    lines += ["parameters:", "  normalize: false", "dtype: float32"]
    st = parse_dtype(dtype)
    if st is not None:
        lines.append(f"out_dtype: {torch_name(st)}")
    return "\n".join(lines) + "\n"
