"""The same merges as mergekit configs: eq. (9) is task arithmetic with base θ0, unnormalised, in float32."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from itermerge.checkpoint.dtypes import FLOAT_DTYPES, parse_dtype, torch_name
from itermerge.errors import ItermergeError
from itermerge.operators import Operator

if TYPE_CHECKING:
    import torch

_NOTES = {
    "task_arithmetic": ["eq. (9) is task arithmetic with base θ0 and weights k_t, unnormalised, computed in float32."],
    "ties": ["TIES, normalize: false (eq. 10's k_t keep their magnitude): each θ_t − θ0 trimmed to its top `density`",
             "magnitudes per tensor, signs elected from Σ k_t Δ̃_t, the agreeing entries summed. Ties at the k-th",
             "magnitude: mergekit keeps those torch's argsort puts first, itermerge the lowest indices."],
    "dare_linear": ["DARE: the random masks differ (mergekit draws them from torch's RNG, see mergekit-yaml",
                    "--random-seed; itermerge from numpy's PCG64 per tensor and checkpoint), and mergekit rescales",
                    "each kept Δ_t to its L1 norm (rescale: true) where itermerge divides by density: equal in",
                    "expectation."],
}


def mergekit_config(
    reference: str | os.PathLike,
    checkpoints: Sequence[str | os.PathLike],
    weights: Sequence[float],
    dtype: str | torch.dtype | None = None,
    *,
    method: str = "task_arithmetic",
    density: float | None = None,
    tensor_weights: Mapping[str, Sequence[float]] | None = None,
) -> str:
    """The mergekit YAML of eq. (9) and its sparsified variants: base θ0, weights k_t, unnormalised, float32 compute.

    ``method``: task_arithmetic, ties or dare_linear (with ``density``). ``tensor_weights``: per-tensor k_t (layer
    groups), written as mergekit filters on exact tensor names (a filter matches any name that contains it, the
    first match wins, so longer names come first).
    """
    lines = ["# Reproduces `itermerge merge` with mergekit (mergekit-yaml THIS_FILE OUT_DIR):",
             *(f"# {note}" for note in _NOTES[method]), f"merge_method: {method}",
             f"base_model: {json.dumps(str(reference))}", "models:"]
    for t, path in enumerate(checkpoints):
        if tensor_weights is None:
            if weights[t] == 0.0:
                continue
            setting = [f"      weight: {weights[t]!r}"]
        else:
            values = {name: float(k[t]) for name, k in tensor_weights.items()}
            if not any(values.values()):
                continue
            setting = ["      weight:", *_filtered(values)]
        lines += [f"  - model: {json.dumps(str(path))}", "    parameters:", *setting]
        if density is not None:
            lines.append(f"      density: {density!r}")
    lines += ["parameters:", "  normalize: false"]
    if method == "dare_linear":
        lines.append("  rescale: true")
    return _finish(lines, dtype)


def mergekit_slerp_config(
    reference: str | os.PathLike, theta_bar: str | os.PathLike, theta_T: str | os.PathLike, t: float,
    dtype: str | torch.dtype | None = None,
) -> str:
    """θ0 + slerp(θ̄ − θ0, θT − θ0, t) as mergekit's nuslerp with base θ0 (its `slerp` interpolates the weights)."""
    lines = [
        "# Reproduces `itermerge merge --method slerp` with mergekit (mergekit-yaml THIS_FILE OUT_DIR):",
        "# SLERP of the task vectors θ̄ − θ0 and θT − θ0, one angle per flattened tensor: mergekit's nuslerp with",
        "# base θ0 (its `slerp` interpolates θ̄ and θT themselves). nuslerp computes the angle in float32 and falls",
        "# back to the lerp only for colinear vectors (itermerge: float64, and the lerp when |cos| > 0.9995).",
        "merge_method: nuslerp", f"base_model: {json.dumps(str(reference))}", "models:",
        f"  - model: {json.dumps(str(theta_bar))}", "    parameters:", f"      weight: {1.0 - t!r}",
        f"  - model: {json.dumps(str(theta_T))}", "    parameters:", f"      weight: {float(t)!r}",
        "parameters:", "  nuslerp_flatten: true", "  nuslerp_row_wise: false",
    ]
    return _finish(lines, dtype)


def mergekit_plain_config(reference: str | os.PathLike, checkpoints: Sequence[str | os.PathLike], method: str,
                          note: str, dtype: str | torch.dtype | None = None) -> str:
    """A mergekit method that takes only its base θ0 and the models θ1..θT (Model Stock), with what differs in
    ``note``."""
    lines = [f"# Reproduces `itermerge merge` with mergekit (mergekit-yaml THIS_FILE OUT_DIR): {method}.",
             *(f"# {line}" for line in note.splitlines()), f"merge_method: {method}",
             f"base_model: {json.dumps(str(reference))}", "models:",
             *(f"  - model: {json.dumps(str(path))}" for path in checkpoints)]
    return _finish(lines, dtype)


def mergekit_config_for(
    op: Operator, reference: str | os.PathLike, checkpoints: Sequence[str | os.PathLike],
    dtype: str | torch.dtype | None = None, *, mean_cache: str | os.PathLike | None = None,
) -> str:
    """The mergekit YAML of one ``itermerge merge --method ...`` (``op``: the operator and its parameters)."""
    from itermerge.checkpoint.reader import CheckpointReader

    if op.spec.mergekit is None:
        raise ItermergeError(f"--emit-mergekit-config: mergekit has no method that reproduces --method {op.method}")
    base = CheckpointReader(reference)
    floats = [n for n in base if base.dtype(n) in FLOAT_DTYPES]
    # Absolute paths: the YAML may run from elsewhere, and mergekit takes a bare name for a Hub repository.
    reference, checkpoints = os.path.abspath(reference), [os.path.abspath(p) for p in checkpoints]
    mean_cache = None if mean_cache is None else os.path.abspath(mean_cache)
    resolved = op.resolve(len(checkpoints), floats)
    if resolved.gram is not None and resolved.gram.on == "mean_last":
        if len(checkpoints) > 2 and mean_cache is None:
            raise ItermergeError(f"--emit-mergekit-config with --method {op.method} and T ≥ 3 needs --mean-cache DIR: "
                                 "mergekit reads θ̄ from that directory, which the merge writes")
        theta_bar = checkpoints[0] if len(checkpoints) == 2 else mean_cache
        return mergekit_slerp_config(reference, theta_bar, checkpoints[-1], float(op.params["t"]), dtype)
    if resolved.gram is not None:
        return mergekit_plain_config(reference, checkpoints, op.spec.mergekit, op.spec.mergekit_note, dtype)
    tensor_weights = resolved.tensor_weights
    uniform = tensor_weights is None or len(set(tensor_weights.values())) == 1
    weights = resolved.weights if tensor_weights is None else next(iter(tensor_weights.values()))
    density = None if op.params.get("density") is None else float(op.params["density"])
    return mergekit_config(reference, checkpoints, weights, dtype, method=op.spec.mergekit,
                           density=density, tensor_weights=None if uniform else tensor_weights)


def _filtered(values: Mapping[str, float]) -> list[str]:
    """A mergekit weight list: the most common value as the default, the other tensors by exact-name filter.

    A filter matches every name containing it, so a default-valued name that contains a listed one is listed too.
    """
    counts: dict[float, int] = {}
    for v in values.values():
        counts[v] = counts.get(v, 0) + 1
    default = max(counts, key=counts.get)
    listed = {n for n, v in values.items() if v != default}
    grown = True
    while grown:
        extra = {n for n in values if n not in listed and any(m in n for m in listed)}
        listed |= extra
        grown = bool(extra)
    lines = []
    for name in sorted(listed, key=lambda n: (-len(n), n)):
        lines += [f"        - filter: {json.dumps(name)}", f"          value: {values[name]!r}"]
    return [*lines, f"        - value: {default!r}"]


def _finish(lines: list[str], dtype: str | torch.dtype | None) -> str:
    lines.append("dtype: float32")
    st = parse_dtype(dtype)
    if st is not None:
        lines.append(f"out_dtype: {torch_name(st)}")
    return "\n".join(lines) + "\n"
