"""What every stage of the search shares (``SearchContext``), and its one evaluation loop: one model loaded; for
each item its weights set (a θ_t from disk, a merge in memory), the evaluators run, the record appended."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from itermerge.checkpoint import CheckpointReader
from itermerge.config.evaluation import EvalConfig
from itermerge.config.search import SearchConfig
from itermerge.devices import CPU, Placement, load_placed, release
from itermerge.errors import ItermergeError
from itermerge.evaluation import Metric, build_evaluator, metrics_to_dict
from itermerge.merging import MergeBasis
from itermerge.records import append_record
from itermerge.rundir import SearchLayout
from itermerge.runner import Shard

EvaluateFn = Callable[[nn.Module, dict[str, float]], dict[str, Metric]]  # (model, timings) -> metrics
SamplerScope = Callable[[], contextlib.AbstractContextManager[Any]]  # entered once per stage: yields make_sampler
Item = TypeVar("Item")


@dataclass(frozen=True)
class SearchContext:
    """The search of one run (or of its first T' iterations): where its records go, the models it merges, how it
    evaluates them and on what, and, inside a stage (``stage``), this process's share and sampler.

    ``samplers``: entered once per stage by every process (vLLM builds its engine there), it yields the
    ``make_sampler`` the evaluators sample with (None: the HF sampler). ``evaluators``: {split: an evaluator that
    replaces the one built from ``eval_config``} (tests, benches; the fingerprint still keys the records, so give a
    config that names what it measures). ``merged_dir``: where the chosen merge is written (None: kept in memory).
    ``tag``: what the stages' names carry ("_T2" for the search of θ1, θ2 alone)."""

    search_dir: Path
    reference: Path
    checkpoints: tuple[Path, ...]
    eval_config: EvalConfig
    config: SearchConfig = field(default_factory=SearchConfig)
    mean_cache: Path | None = None
    merged_dir: Path | None = None
    test_split: str = "test"
    where: Placement = CPU
    samplers: SamplerScope = contextlib.nullcontext
    evaluators: Mapping[str, Any] = field(default_factory=dict)
    progress: bool = True
    tag: str = ""
    shard: Shard = field(default_factory=Shard)
    make_sampler: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        fix = object.__setattr__  # paths as given (str or Path) become Paths, once
        fix(self, "search_dir", Path(self.search_dir))
        fix(self, "reference", Path(self.reference))
        fix(self, "checkpoints", tuple(Path(c) for c in self.checkpoints))
        for name in ("mean_cache", "merged_dir"):
            if getattr(self, name) is not None:
                fix(self, name, Path(getattr(self, name)))
        if not self.checkpoints:
            raise ItermergeError(f"search in {self.search_dir}: no checkpoints θ1..θT given")

    @property
    def T(self) -> int:
        return len(self.checkpoints)

    @property
    def files(self) -> SearchLayout:
        """Where this search's records go."""
        return SearchLayout(self.search_dir)

    @property
    def show(self) -> bool:
        """Whether this process draws progress bars (the main one, when asked)."""
        return self.progress and self.shard.is_main

    def stamp(self, split: str | None = None) -> dict[str, str]:
        """What keys a record to these evaluators on ``split`` (the search's own by default)."""
        return {"split": split or self.config.split, "eval_fingerprint": self.eval_config.fingerprint()}

    def same(self, record: Mapping[str, Any], split: str | None = None) -> bool:
        """Whether ``record`` was measured by these evaluators on ``split``."""
        return all(record.get(k) == v for k, v in self.stamp(split).items())

    @contextlib.contextmanager
    def stage(self, shard: Shard) -> Iterator[SearchContext]:
        """This context for one process's share of a stage, with the stage's sampler (entered by every process)."""
        with self.samplers() as make_sampler:
            yield dataclasses.replace(self, shard=shard, make_sampler=make_sampler)

    def evaluator(self, split: str) -> Any:
        """The evaluators of ``split``: the given one, else built from ``eval_config`` as every stage builds them."""
        if split in self.evaluators:
            return self.evaluators[split]
        return build_evaluator(self.eval_config, split, self.checkpoints[-1], self.reference, self.where,
                               self.make_sampler)


class Bench:
    """One loaded model (θT's architecture on the context's device, in its dtype) whose weights each item sets: a
    checkpoint from disk (``load``) or a merge in memory from a basis (``basis``), one basis in memory at a time."""

    def __init__(self, ctx: SearchContext):
        self.ctx, self.model = ctx, load_placed(ctx.checkpoints[-1], ctx.where)
        self._basis: MergeBasis | None = None
        self._each: bool | None = None
        self.basis_s = 0.0  # seconds spent building bases since the loop last read it

    def basis(self, each: bool = False) -> MergeBasis:
        """The merge basis over (θ0, θ̄, θT), or over every θ_t (``each``: EMA, Model Stock), built when first asked."""
        if self._basis is None or self._each != each:
            start, self._basis, self._each = time.perf_counter(), None, each
            release()
            self._basis = MergeBasis.from_checkpoints(self.ctx.reference, self.ctx.checkpoints,
                                                      mean_cache=self.ctx.mean_cache, each=each)
            self.basis_s += time.perf_counter() - start
        return self._basis

    def drop_basis(self) -> None:
        self._basis, self._each = None, None

    def merge(self, lam: float, alpha: float) -> str:
        """Eq. (9)-(10) at (λ, α) into the model (Algorithm 2, in memory); refused if it overflowed."""
        self.basis().apply_to(self.model, lam, alpha)
        refuse_non_finite(self.model, f"search point λ={lam:g}, α={alpha:g}",
                          "take this α out of search.alphas or evaluate in float32 (model.dtype: float32)")
        return "merge"

    def load(self, path: str | os.PathLike) -> str:
        load_weights_into(self.model, path)
        return "load"

    def close(self) -> None:
        model, basis, self.model, self._basis = self.model, self._basis, None, None
        release(model, basis)


def evaluate_each(
    ctx: SearchContext, split: str, items: Sequence[Item], set_weights: Callable[[Bench, Item], str],
    record: Callable[[Item, dict[str, Any], dict[str, float]], dict[str, Any]], *, desc: str,
    append_to: Callable[[Item], Path] | None = None, prompts: Callable[[Item], tuple[int, int]] | None = None,
) -> list[dict[str, Any]]:
    """The search's one evaluation loop (grid, halving rounds, test, other operators): the model loaded once; for
    each item ``set_weights(bench, item)`` (it names its step, "merge" or "load", for the seconds), the evaluators
    of ``split`` (on the prompts [start, stop) that ``prompts(item)`` gives, else all), then ``record(item, metrics,
    seconds)``, appended to ``append_to(item)`` as it finishes so that a rerun evaluates only what is missing.
    Returns the records, in the order of ``items``."""
    if not items:
        return []
    bench, evaluate, rows = Bench(ctx), ctx.evaluator(split), []
    try:
        for item in tqdm(items, desc=desc, unit="model", disable=not ctx.show):
            start = time.perf_counter()
            step = set_weights(bench, item)
            built, bench.basis_s = bench.basis_s, 0.0
            seconds = {**({"basis": built} if built else {}), step: time.perf_counter() - start - built}
            fn = evaluate if prompts is None else evaluate.subset(*prompts(item))
            metrics, timings = timed_eval(fn, bench.model)
            row = record(item, metrics_to_dict(metrics), {**seconds, **timings})
            if append_to is not None:
                append_record(append_to(item), row)
            rows.append(row)
    finally:  # a refused merge or a failed evaluation frees the model and basis too (a caller may go on)
        bench.close()
    return rows


@torch.no_grad()
def load_weights_into(model: nn.Module, path: str | os.PathLike) -> None:
    """Overwrite the model's parameters with a checkpoint's, so one loaded model serves every evaluation."""
    reader = CheckpointReader(path)
    for name, p in model.named_parameters():
        if name not in reader:
            raise ItermergeError(
                f"{path}: has no tensor {name!r}; all checkpoints of a search must share θ0's architecture"
            )
        p.copy_(reader.get(name))


def timed_eval(evaluate_fn: EvaluateFn, model: nn.Module) -> tuple[dict[str, Metric], dict[str, float]]:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    metrics = evaluate_fn(model, timings)
    return metrics, {"eval": time.perf_counter() - start, **timings}


@torch.no_grad()
def refuse_non_finite(model: nn.Module, what: str, remedy: str) -> None:
    """A merge whose weights overflowed (a very large α, in 16 bits) is refused by name, never evaluated."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ItermergeError(f"{what}: tensor {name!r} of the merge holds NaN or Inf (it overflows {p.dtype}); "
                                 f"{remedy}")
