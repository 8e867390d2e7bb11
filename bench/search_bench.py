"""Search benchmark: where a (λ, α) point's time goes on SmolLM2-135M (in-memory merge vs evaluation).

    .venv/bin/python bench/search_bench.py [--prompts 32] [--max-new-tokens 16]

Inputs: θ0 = SmolLM2-135M-Instruct (fp32) and θ1..θ3 from bench/merge_bench.py (θ0 + DPO-sized updates,
built there on first use). Measures (1) ``MergeBasis.apply_to`` alone, median of repeats, against the
memory-traffic floor of reading θ0, θ̄, θT and writing θ once; (2) a 2×2 search (``search.driver.search``) with greedy
accuracy, sampled reward and KL on the arithmetic dev split, per-point breakdown from points.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "search"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--merge-only", action="store_true", help="measure apply_to and skip the 2×2 search")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "bench"))
    from merge_bench import build_inputs

    from itermerge.checkpoint import load_model
    from itermerge.config.evaluation import EvalConfig, KLConfig, PromptSource
    from itermerge.config.search import SearchConfig
    from itermerge.merging import MergeBasis
    from itermerge.records import read_records
    from itermerge.search.context import SearchContext
    from itermerge.search.driver import search

    paths = build_inputs()
    reference, checkpoints = paths[0], paths[1:4]
    OUT.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    basis = MergeBasis.from_checkpoints(reference, checkpoints, mean_cache=OUT / "mean_cache")
    basis_s = time.perf_counter() - start
    model = load_model(checkpoints[-1])
    n_params = sum(p.numel() for p in model.parameters())
    times = []
    for i in range(args.repeats):
        lam, alpha = (0.3, 0.4) if i % 2 else (0.2, 1.0)
        start = time.perf_counter()
        basis.apply_to(model, lam, alpha)
        times.append(time.perf_counter() - start)
    # The floor: stream three fp32 inputs and write one output once, at the copy bandwidth of this machine.
    a, b = torch.zeros(n_params), torch.zeros(n_params)
    b.copy_(a)  # fault the pages in first
    start = time.perf_counter()
    for _ in range(3):
        b.copy_(a)
    copy_s = (time.perf_counter() - start) / 3  # one read + one write of the model
    floor_s = 2 * copy_s  # 3 reads + 1 write ≈ two copies
    del basis, a, b, model
    result = {"params": n_params, "basis_load_s": basis_s, "apply_to_s": times,
              "apply_to_median_s": statistics.median(times), "floor_s": floor_s, "threads": torch.get_num_threads()}
    if args.merge_only:
        print(json.dumps(result, indent=2))
        return

    shutil.rmtree(OUT / "run", ignore_errors=True)
    (OUT / "manifest.json").unlink(missing_ok=True)  # the driver's stages are recorded beside the search
    evc = EvalConfig(prompts=PromptSource(n=args.prompts), max_new_tokens=args.max_new_tokens, kl=KLConfig())
    start = time.perf_counter()
    search(SearchContext(OUT / "run", reference, checkpoints, evc, SearchConfig(lams=(0.0, 0.3), alphas=(0.0, 0.4)),
                         mean_cache=OUT / "mean_cache", progress=False))
    search_s = time.perf_counter() - start
    points = read_records(OUT / "run" / "points.jsonl")
    phases = sorted({k for p in points for k in p["seconds"]})
    breakdown = {k: statistics.mean(p["seconds"].get(k, 0.0) for p in points) for k in phases}
    result.update(prompts=args.prompts, max_new_tokens=args.max_new_tokens, search_s=search_s, points=len(points),
                  per_point_mean_s=breakdown)
    (OUT / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
