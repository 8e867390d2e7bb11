"""What a merge operator declares (``Spec``, its ``Param``s), the operator a user asks for (``Operator``, its
parameters checked once, here), and what it resolves to for θ1..θT (``Resolved``: eq. 9's weights, a Gram rule
or a per-block kernel) — the one contract between an operator's module and the CLI, config, search and engine."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from itermerge.errors import ItermergeError


@dataclass(frozen=True)
class Param:
    """One parameter of an operator: ``kind`` number | integer | numbers (k_1..k_T) | groups (a mapping),
    ``rule``/``meaning`` what a valid value is and does (both in every error), ``check`` the rule in code."""

    name: str
    help: str
    kind: str = "number"
    rule: str = "a finite number"
    meaning: str = ""
    check: Callable[[Any], bool] | None = None
    required: bool = False
    default: Any = None
    symbol: str = ""

    @property
    def flag(self) -> str:
        return f"--{self.name.replace('_', '-')}"

    @property
    def label(self) -> str:
        """How a table writes it: α, γ, λ, or the name."""
        return self.symbol or self.name

    def valid(self, value: Any) -> bool:
        if self.kind in ("number", "integer"):
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or (self.kind == "integer" and not isinstance(value, int)):
                return False
        return self.check is None or bool(self.check(value))

    @property
    def problem(self) -> str:
        """``rule`` and ``meaning`` in words: what the error says a value must be."""
        return f"{self.rule} ({self.meaning})" if self.meaning else self.rule


class FirstPasses(Protocol):
    """What the streaming engine computes for an operator before it merges (merging/first_pass.py)."""

    def top_magnitudes(self, ts: Sequence[int], density: float) -> Mapping[str, Sequence[Any]]:
        """Per tensor, which entries of each Δ_t (t in ``ts``, 1-based) TIES keeps."""
        ...


class Kernel(Protocol):
    """A per-block rule that is not eq. (9) with fixed weights (TIES, DARE): run on the task vectors Δ_t of the
    checkpoints with k_t ≠ 0 (``ts``), after ``prepare`` has found each tensor's state (first passes, seeds)."""

    def prepare(self, passes: FirstPasses, ts: Sequence[int], names: Sequence[str]) -> Mapping[str, Any]: ...

    def __call__(self, out: Any, theta0: Any, deltas: Sequence[Any], weights: Sequence[float], state: Any,
                 start: int, tmp: Any) -> Any: ...


@dataclass(frozen=True)
class Gram:
    """Weights that depend on each tensor's angles: ``weights(G)`` → k per vector, G the float64 Gram matrix of the
    task vectors of ``on`` — "mean_last" (θ̄ − θ0, θT − θ0) or "each" (θ1 − θ0, …, θT − θ0)."""

    on: str
    weights: Callable[[Any], tuple[float, ...]]


@dataclass(frozen=True)
class Resolved:
    """An operator resolved for θ1..θT: ``weights`` k_1..k_T (fixed, or those TIES/DARE apply to the sparsified
    task vectors), per tensor in ``tensor_weights`` (layer groups), a ``gram`` rule (SLERP, Model Stock: weights
    from a first pass over each tensor's angles) or a ``kernel`` (TIES, DARE). ``params`` is what merge.json
    records."""

    method: str
    params: dict[str, Any]
    weights: tuple[float, ...] | None = None
    tensor_weights: Mapping[str, tuple[float, ...]] | None = None
    gram: Gram | None = None
    kernel: Kernel | None = None

    @property
    def linear(self) -> bool:
        """Eq. (9) with k_t fixed before the tensors are read: the merge is linear in θ0..θT (and in LoRA adapters)."""
        return self.gram is None and self.kernel is None

    def weights_for(self, name: str) -> tuple[float, ...]:
        if self.tensor_weights is not None:
            return self.tensor_weights[name]
        if self.weights is None:
            raise ItermergeError(f"--method {self.method}: its weights depend on each tensor's angles, not fixed k_t")
        return self.weights


@dataclass(frozen=True)
class Spec:
    """One merge operator, declared once in its module; the registry (``itermerge.operators``) lists them.

    ``resolve(given, T, names)`` turns checked parameters into a ``Resolved`` for T checkpoints and the float
    tensors ``names``. ``searched``: the parameters ``search.operators`` ranges over (None: not searchable);
    ``search`` how a candidate is merged there — "basis" (in memory from θ0, θ̄, θT), "each" (in memory from
    every θ_t when T ≥ 3), "disk" (streamed to a temporary directory) or "fit" (its parameters fitted on one half
    of dev and checked on the other, search/learned.py, merged as "each"; ``fitted``: the fit's settings, one value
    each in ``search.operators``); ``takes_choice``: the candidate takes
    the search's chosen (λ, α). ``min_T`` checkpoints are needed, ``why`` says why. ``mergekit``: its
    merge_method, if one reproduces it, and what differs (``mergekit_note``). ``shared_k``: eq. (9) with one k per
    checkpoint for every tensor. ``linearity``: in words, for the docs table (``Resolved.linear`` decides).
    """

    name: str
    title: str
    summary: str
    description: str
    params: tuple[Param, ...]
    resolve: Callable[[dict[str, Any], int, Sequence[str]], Resolved]
    searched: tuple[str, ...] | None = None
    search: str = "basis"
    fitted: tuple[Param, ...] = ()
    takes_choice: bool = False
    min_T: int = 1
    why: str = ""
    mergekit: str | None = None
    mergekit_note: str = ""
    shared_k: bool = False
    linearity: str = "yes"

    def param(self, name: str) -> Param:
        return next(p for p in (*self.params, *self.fitted) if p.name == name)

    def check(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The given parameters (None: not given), checked against the declaration: a parameter of another operator,
        a missing required one, or a value outside its rule is a named error. Returns them made plain."""
        given = {k: v for k, v in given.items() if v is not None}
        takes = {p.name for p in self.params}
        extra = [k for k in given if k not in takes]
        if extra:
            flags = ", ".join(p.flag for p in self.params) or "no parameters"
            raise ItermergeError(f"--{extra[0].replace('_', '-')} does not apply to --method {self.name}; "
                                 f"it takes {flags}")
        for p in self.params:
            if p.required and p.name not in given:
                raise ItermergeError(f"--method {self.name} needs {p.flag}")
            if p.name in given and not p.valid(given[p.name]):
                raise ItermergeError(f"{p.flag} {given[p.name]!r}: must be {p.problem}")
        return {k: list(v) if self.param(k).kind == "numbers" else v for k, v in given.items()}


@dataclass(frozen=True)
class Operator:
    """An operator with its parameters checked (``Spec.check``): what ``merge_checkpoints``, ``merge_adapters``
    and the search take. ``resolve(T, names)`` gives eq. (9)'s weights or the rule for those checkpoints."""

    spec: Spec
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.spec.name

    def resolve(self, T: int, names: Sequence[str]) -> Resolved:
        if self.spec.min_T > T:
            raise ItermergeError(f"--method {self.method} {self.spec.why}: give at least {self.spec.min_T} "
                                 "checkpoints")
        return self.spec.resolve(dict(self.params), T, names)
