"""Algorithm 2 as stages of a run, the one way the search runs (the pipeline, ``itermerge search``, the tests and
the benches): θ̄ cached, the (λ, α) points on dev, the rule, the chosen merge written and tested once beside the
baselines, the other operators; each stage shared out among the processes and resumable."""

from __future__ import annotations

import dataclasses
import os
from functools import partial
from pathlib import Path
from typing import Any

from itermerge.config import RunConfig
from itermerge.devices import placement
from itermerge.rundir import RunLayout
from itermerge.runner import Shard, StageRunner
from itermerge.search import budget, points
from itermerge.search import finalize as fin
from itermerge.search.context import SearchContext


def run_context(cfg: RunConfig, run_dir: Path, reference: str | os.PathLike | None = None,
                at: int | None = None) -> SearchContext:
    """The search of ``run_dir`` as ``cfg`` sets it up: θ0 and θ1..θT (θ1..θ_T' alone for ``at`` = T', in
    search_T{T'}/, the merge kept in memory), on the run's device in its precision, sampling with its backend."""
    from itermerge.sampling.backends import evaluation_sampler

    theta0, checkpoints = fin.run_paths(run_dir, reference)
    checkpoints = checkpoints if at is None else checkpoints[:at]
    run, where = RunLayout(run_dir), placement(cfg.model)
    return SearchContext(run.search(at).dir, theta0, tuple(checkpoints), cfg.evaluation, cfg.search,
                         mean_cache=run.mean_cache(at), merged_dir=run.merged if at is None else None, where=where,
                         samplers=partial(evaluation_sampler, cfg, where, checkpoints[-1]),
                         tag="" if at is None else f"_T{at}")


def search(ctx: SearchContext, *, test: bool = False) -> dict[str, Any]:
    """``search_and_test`` on one process, in the run directory that holds ``ctx.search_dir`` (its manifest records
    the stages): what the tests and benches call. Returns choice.json."""
    import json

    search_and_test(StageRunner(ctx.search_dir.parent), ctx, test=test)
    return json.loads(ctx.files.choice.read_text())


def search_and_test(runner: StageRunner, ctx: SearchContext, *, test: bool = True) -> dict[str, Any]:
    """Algorithm 2: θ̄ cached, the (λ, α) grid on dev (each point merged in memory, the points shared out among the
    processes; or successive halving's rounds), the paper's rule; then the chosen merge written (to
    ``ctx.merged_dir``) and tested once beside the baselines (the models shared out likewise); with
    ``search.operators`` and no ``tag``, each other operator chosen on dev by the same rule and tested once beside
    it (operators.json). Returns the search stage's record."""
    from itermerge.search.grid import check_split

    check_split(ctx.config.split)
    files, tag, config = ctx.files, ctx.tag, ctx.config
    if ctx.T >= 3 and ctx.mean_cache is not None:  # Alg. 2, line 1: θ̄ = mean(θ1..θ_{T−1}), once
        runner(f"mean{tag}", partial(mean_of, list(ctx.checkpoints[:-1]), ctx.mean_cache), outputs=[ctx.mean_cache])
    fingerprint = ctx.eval_config.fingerprint()
    halving = config.method == "halving"
    n_dev = budget.context_dev_size(ctx) if halving else 0

    def work(shard: Shard, evaluate: Any) -> Any:
        with ctx.stage(shard) as mine:
            return evaluate(mine)

    unkeyed = {"at", "operators"} | (set() if halving else {"method", "halving"})  # as before these existed
    key = {"search": {k: v for k, v in dataclasses.asdict(config).items() if k not in unkeyed},
           "evaluation": fingerprint}
    for r in range(len(budget.plan(ctx.T, config, n_dev)) if halving else 0):  # a barrier each
        runner.sharded(f"search{tag}/round_{r}", partial(work, evaluate=partial(_round, r=r, n=n_dev)),
                       partial(budget.round_record, ctx, r, n_dev), key=key, outputs=[files.round(r)])
    points_of = partial(points.evaluate_points, among=() if halving else None)  # halving: θ0..θ_{T−1} only
    choice = runner.sharded(f"search{tag}", partial(work, evaluate=points_of), partial(_choose, ctx, n_dev), key=key,
                            outputs=[files.points, files.checkpoints, files.choice, files.eval_config])
    if not test:
        return choice
    key = {"lam": choice["lam"], "alpha": choice["alpha"]}
    if ctx.merged_dir is not None:
        runner("merge", partial(fin.write_merge, ctx), key=key, outputs=[ctx.merged_dir])

    def write_test(parts: list[list[dict[str, Any]]]) -> dict[str, Any]:
        record = fin.write_test(ctx, parts)
        return {"lam": record["lam"], "alpha": record["alpha"], "models": [m["name"] for m in record["models"]]}

    table = "baselines, best θt on dev"  # a new baseline row: a finished run rewrites test.json (nothing re-evaluated)
    runner.sharded(f"test_eval{tag}", partial(work, evaluate=fin.evaluate_test), write_test,
                   key={**key, "evaluation": fingerprint, "table": table}, outputs=[files.test])
    if config.operators and not tag:  # other operators: each chosen on dev by the same rule, tested once
        from itermerge.search import operators as ops

        op_key = {**key, "operators": config.operators, "rule": config.rule.to_dict(), "evaluation": fingerprint}
        dev = runner.sharded("operators", partial(work, evaluate=ops.evaluate_dev), partial(ops.choice_record, ctx),
                             key=op_key, outputs=[files.operator_records])
        runner.sharded("operators_test", partial(work, evaluate=ops.evaluate_test), partial(ops.write_test, ctx),
                       key={**op_key, "chosen": dev["chosen"]}, outputs=[files.operators])
    return choice


def _round(ctx: SearchContext, r: int, n: int) -> int:
    return budget.evaluate_round(ctx, r, n)


def _choose(ctx: SearchContext, n_dev: int, parts: list[int]) -> dict[str, Any]:
    """The search stage's record: the choice (and, for halving, what the rounds cost)."""
    if ctx.config.method == "halving":
        choice = budget.choose(ctx, n_dev)
        return {"lam": choice["lam"], "alpha": choice["alpha"], "points_evaluated": sum(parts),
                "prompt_evaluations": choice["budget"]["prompt_evaluations"]}
    choice = points.choose(ctx)
    return {"lam": choice["lam"], "alpha": choice["alpha"], "points_evaluated": sum(parts)}


def mean_of(intermediates: list[Path], cache: Path) -> dict[str, Any]:
    """θ̄ written to ``cache`` unless it already holds the mean of exactly these checkpoints."""
    from itermerge.checkpoint import CheckpointReader
    from itermerge.merging.mean import mean_cache_hashes, mean_checkpoint

    reused = mean_cache_hashes(cache, [CheckpointReader(p) for p in intermediates]) is not None
    if not reused:
        mean_checkpoint(intermediates, cache, force=True)
    return {"checkpoints": len(intermediates), "reused": reused}
