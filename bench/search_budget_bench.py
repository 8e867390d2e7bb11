"""The (λ, α) search within a budget against the full grid, on a finished run: same choice, at what cost?

    .venv/bin/python bench/search_budget_bench.py --run-dir runs/demo [--eta 3] [--min-prompts 8]

On a run directory with T ≥ 2 (``itermerge demo`` makes one), with the run's evaluation config, rule, split and
sampler, both through the pipeline's search driver (``search.driver.search``): (1) the full 7 × 7 grid
(``HALVING_LAMS`` × ``HALVING_ALPHAS``), every point on every dev prompt; (2) successive halving over the same grid
(``search.method: halving``). Prints both choices, the paired difference of the two chosen points' dev reward
(``maths.paired.paired_difference`` on the grid's own per-prompt items of each: both points are in the grid),
whether they are the same point or within one paired standard error, and the cost ratio of the (λ, α) points
(θ0..θ_{T−1} aside: both evaluate them once, for the report; the halving run reuses the grid's) in
prompt-evaluations and in seconds (merge + evaluation). Also checks that the halving choice's items, pieced
together over the rounds, match the grid's single evaluation of it.

Writes under --out (default bench/out/search_budget): search_grid/, search_halving/ (started afresh unless
--resume) and results.json. Nothing is written to the run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished run with iter_01..iter_T (T ≥ 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "search_budget")
    parser.add_argument("--eta", type=int, default=None, help="default: the run's search.halving.eta")
    parser.add_argument("--min-prompts", type=int, default=None, help="default: the run's search.halving.min_prompts")
    parser.add_argument("--resume", action="store_true", help="keep what an earlier run of this bench evaluated")
    args = parser.parse_args()

    from itermerge.config import load_config
    from itermerge.config.search import HALVING_ALPHAS, HALVING_LAMS, HalvingConfig
    from itermerge.devices import placement
    from itermerge.maths.paired import paired_difference
    from itermerge.records import read_records
    from itermerge.sampling.backends import evaluation_sampler
    from itermerge.search.context import SearchContext
    from itermerge.search.driver import search
    from itermerge.search.finalize import run_paths

    cfg = load_config(args.run_dir / "config.yaml")
    theta0, checkpoints = run_paths(args.run_dir)
    if len(checkpoints) < 2:
        raise SystemExit(f"{args.run_dir}: T = {len(checkpoints)}; the bench needs T ≥ 2 (a λ axis)")
    halving = HalvingConfig(eta=args.eta or cfg.search.halving.eta,
                            min_prompts=args.min_prompts or cfg.search.halving.min_prompts)
    grid_cfg = dataclasses.replace(cfg.search, method="grid", lams=HALVING_LAMS, alphas=HALVING_ALPHAS, at=())
    halving_cfg = dataclasses.replace(grid_cfg, method="halving", halving=halving)
    out, where = args.out, placement(cfg.model)
    dirs = {"grid": out / "search_grid", "halving": out / "search_halving"}  # siblings: θ0..θ_{T−1} measured once
    if not args.resume:
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
        (out / "manifest.json").unlink(missing_ok=True)  # the driver's stages are recorded beside the searches
    out.mkdir(parents=True, exist_ok=True)

    wall, choices = {}, {}
    samplers = partial(evaluation_sampler, cfg, where, checkpoints[-1])
    for name, config in (("grid", grid_cfg), ("halving", halving_cfg)):
        start = time.perf_counter()
        choices[name] = search(SearchContext(dirs[name], theta0, checkpoints, cfg.evaluation, config,
                                             mean_cache=out / "mean_intermediate", where=where, samplers=samplers,
                                             tag=f"_{name}"))
        wall[name] = time.perf_counter() - start

    reward = cfg.search.rule.reward
    grid_points = {(p["lam"], p["alpha"]): p for p in read_records(dirs["grid"] / "points.jsonl")}
    at = {name: (c["lam"], c["alpha"]) for name, c in choices.items()}
    items = {name: grid_points[at[name]]["metrics"][reward]["items"] for name in at}
    d = paired_difference(items["halving"], items["grid"])
    pieced = next(p for p in read_records(dirs["halving"] / "points.jsonl") if (p["lam"], p["alpha"]) == at["halving"])
    n_dev = len(items["grid"])
    grid_prompts = len(grid_points) * n_dev
    grid_seconds = sum(p["seconds"].get("merge", 0.0) + p["seconds"]["eval"] for p in grid_points.values())
    budget = choices["halving"]["budget"]
    result = {
        "run_dir": str(args.run_dir), "T": len(checkpoints), "dev_prompts": n_dev, "grid": f"{len(HALVING_LAMS)} × "
        f"{len(HALVING_ALPHAS)}", "halving": halving.to_dict(), "rule": cfg.search.rule.to_dict(),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "choice": {name: {"lam": at[name][0], "alpha": at[name][1], "reason": c["reason"],
                          "reward_gain": c["reward_gain"]["value"], "expo_alpha": c["expo"]["alpha"],
                          "dev_in_grid": {m: grid_points[at[name]]["metrics"][m]["value"]
                                          for m in cfg.search.rule.metrics}}
                   for name, c in choices.items()},
        "halving_minus_grid": {k: d.get(k) for k in ("difference", "stderr", "ci_low", "ci_high", "p_value", "method",
                                                     "n")},
        "same_point": at["halving"] == at["grid"],
        "within_one_paired_se": at["halving"] == at["grid"] or (d["stderr"] is not None
                                                                and abs(d["difference"]) <= d["stderr"]),
        "pieced_vs_single_max_abs": max(abs(a - b) for a, b in zip(pieced["metrics"][reward]["items"],
                                                                   items["halving"])),
        "rounds": budget["rounds"], "finalists": budget["finalists"],
        "cost": {"prompt_evaluations": {"grid": grid_prompts, "halving": budget["prompt_evaluations"],
                                        "ratio": budget["prompt_evaluations"] / grid_prompts},
                 "seconds": {"grid": round(grid_seconds, 1), "halving": budget["seconds"],
                             "ratio": budget["seconds"] / grid_seconds},
                 "wall_seconds_with_checkpoints": {k: round(v, 1) for k, v in wall.items()}},
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
