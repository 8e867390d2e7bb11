"""Learned k_t: eq. (9)'s k_1..k_T fitted on one half of dev and checked on the other (issue 27; search/learned.py).

Merged, it is eq. (9) with the fitted k_t (``--weights``), as the paper's merge with explicit weights. In the
search (``search.operators.learned``) the k_t are not a grid: coordinate ascent from the uniform average (k_t = 1/T),
each round trying k_t ± ``step`` for every t, keeping the move the paper's rule prefers on the fit half (the highest
reward that keeps θT's capability) and halving the step when no move beats the current k, for ``rounds`` rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from itermerge.operators.base import Param, Resolved, Spec
from itermerge.operators.paper import WEIGHTS

ROUNDS = Param("rounds", "rounds of coordinate ascent on the fit half of dev (default 3)", kind="integer",
               rule="a whole number >= 1", meaning="each round evaluates 2T moves", check=lambda v: v >= 1,
               default=3)
STEP = Param("step", "the first round's move of one k_t (default 0.1; halved after a round without a better move)",
             rule="a number > 0", meaning="the size of a move of one k_t", check=lambda v: v > 0, default=0.1)


def _resolve(given: dict[str, Any], T: int, names: Sequence[str]) -> Resolved:
    k = tuple(float(x) for x in given["weights"])
    if len(k) != T:
        from itermerge.errors import ItermergeError

        raise ItermergeError(f"--method learned --weights {list(k)}: {len(k)} weights for T = {T} checkpoints; give "
                             "one k_t per checkpoint (search/operators.json records the fitted ones)")
    return Resolved("learned", {"method": "learned", "weights": list(k)}, k)


SPEC = Spec(
    name="learned", title="Learned k_t", summary="eq. (9) with k_1..k_T fitted on half of dev (--weights)",
    description="eq. (9) with k_1..k_T fitted by coordinate ascent on one half of dev under the paper's rule, checked "
                "on the other half; merged as θ0 + Σ_t k_t (θ_t − θ0), float32 arithmetic",
    params=(replace(WEIGHTS, required=True, help="the fitted k_1,...,k_T (search/operators.json)"),),
    resolve=_resolve, searched=(), search="fit", fitted=(ROUNDS, STEP), min_T=2,
    why="weights θ1..θT against each other", mergekit="task_arithmetic", shared_k=True,
)
