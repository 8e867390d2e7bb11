"""Layer groups: eq. (9) with eq. (10)'s k_t from a (λ, α) per layer group or depth band, the rest --lam/--alpha."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from itermerge.errors import ItermergeError
from itermerge.maths.merge import merge_weights
from itermerge.maths.operators import resolve_group_coefficients
from itermerge.operators.base import Param, Resolved, Spec
from itermerge.operators.paper import ALPHA, LAM

GROUPS = Param("groups", "a YAML file, GROUP: [λ, α] per line, GROUP one of embeddings, attention, mlp, norms, "
               "head, 'layers a-b' or default (else --lam/--alpha)", kind="groups", rule="a mapping {group: (λ, α)}",
               check=lambda v: isinstance(v, Mapping), required=True)


def _resolve(given: dict[str, Any], T: int, names: Sequence[str]) -> Resolved:
    groups, lam, alpha = dict(given["groups"]), given.get("lam"), given.get("alpha")
    default = groups.pop("default", None)
    if default is not None and (lam is not None or alpha is not None):
        raise ItermergeError("the groups file sets `default` and --lam/--alpha were given too; keep one of the two")
    default = tuple(default) if default is not None else (lam or 0.0, alpha or 0.0)
    coefficients = resolve_group_coefficients(names, groups, default)
    params = {"method": "groups", "groups": {g: list(pair) for g, pair in groups.items()}, "default": list(default)}
    per_tensor = {name: tuple(merge_weights(T, lam_g, alpha_g)) for name, (lam_g, alpha_g) in coefficients.items()}
    return Resolved("groups", params, tensor_weights=per_tensor)


SPEC = Spec(
    name="groups", title="Layer groups", summary="(λ, α) per layer group (--groups)",
    description="eq. (9) with eq. (10)'s k_t from (λ, α) per layer group, float32 arithmetic",
    params=(LAM, ALPHA, GROUPS), resolve=_resolve, mergekit="task_arithmetic",
)
