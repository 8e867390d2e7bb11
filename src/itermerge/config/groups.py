"""A layer-groups file for ``itermerge merge --method groups --groups FILE.yaml``: {group: (λ, α)}."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from itermerge.config.parse import read_yaml
from itermerge.errors import ItermergeError


def read_groups(path: str | Path) -> dict[str, tuple[float, float]]:
    """A groups file: ``GROUP: [λ, α]`` or ``GROUP: {lam: λ, alpha: α}`` per line, GROUP a layer group
    (embeddings, attention, mlp, norms, head), a depth band ("layers 0-7") or ``default`` (the tensors in no group).
    """
    groups = {}
    for group, value in read_yaml(path).items():
        if isinstance(value, Mapping) and set(value) == {"lam", "alpha"}:
            value = (value["lam"], value["alpha"])
        ok = isinstance(value, (list, tuple)) and len(value) == 2
        if not ok or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ItermergeError(f"{path}: group {group!r}: {value!r}; write {group}: [λ, α], e.g. mlp: [0.3, 0.4]")
        groups[str(group)] = (float(value[0]), float(value[1]))
    return groups
