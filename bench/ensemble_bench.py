"""Ensemble benchmark: how close the merge gets to the exact eq. (6) ensemble, and what the ensemble costs.

    .venv/bin/python bench/ensemble_bench.py                      # θ1..θ3 = θ0 + seeded updates (synthetic)
    .venv/bin/python bench/ensemble_bench.py --run-dir runs/NAME  # θ1..θT = RUN/iter_XX/model (real DPO)

θ0 = SmolLM2-135M-Instruct (fp32). On completions that the ensemble samples for arithmetic dev prompts:
the per-token KL between the ensemble and (the merge, θT alone, the uniform mean of θ1..θT), and the
Pearson correlation of sequence log-probs. Then greedy decoding of the same tokens (EOS ignored) by
the ensemble and by the merge: wall time and memory (weights + KV cache, from the tensors). Prints
markdown rows for docs/benchmarks.md and writes bench/out/ensemble/results.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from itermerge.checkpoint import load_model, load_tokenizer, resolve_model
from itermerge.maths.ensemble import ensemble_coefficients
from itermerge.maths.merge import merge_weights
from itermerge.sampling import SamplingParams
from itermerge.studies.approximation import approximation_error, decoding_cost, merged_model
from itermerge.tasks import get_task
from itermerge.tokenization import encode_prompt, pad_id, stop_token_ids

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "ensemble"


def synthetic_checkpoints(theta0: torch.nn.Module, T: int, scale: float) -> list[torch.nn.Module]:
    """θt = θ0 + scale·t·mean|W|·noise_t per element (seeded): Adam-like updates that grow with t."""
    out = []
    for t in range(1, T + 1):
        model = copy.deepcopy(theta0)
        g = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * t * p.abs().mean() * torch.randn(p.shape, generator=g))
        out.append(model)
    return out


def run_checkpoints(run_dir: Path) -> list[Path]:
    paths = sorted(p for p in run_dir.glob("iter_*/model") if (p / "config.json").exists())
    if len(paths) < 2:
        raise SystemExit(f"{run_dir}: found {len(paths)} iter_*/model checkpoints; the ensemble needs T >= 2")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="θ0 (the run's reference)")
    ap.add_argument("--run-dir", type=Path, help="take θ1..θT from RUN/iter_*/model instead of synthetic ones")
    ap.add_argument("--scale", type=float, default=3e-3, help="synthetic update size per iteration, × mean|W|")
    ap.add_argument("--lam", type=float, default=0.3)
    ap.add_argument("--alpha", type=float, default=0.4)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    theta0 = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    if args.run_dir:
        sources = run_checkpoints(args.run_dir)
        checkpoints = [load_model(p) for p in sources]
        inputs = f"real: {args.run_dir} ({len(sources)} checkpoints)"
    else:
        checkpoints = synthetic_checkpoints(theta0, 3, args.scale)
        inputs = f"synthetic: θt = θ0 + {args.scale:g}·t·mean|W|·noise, T = 3"
    models = [theta0, *checkpoints]
    T = len(checkpoints)
    k = merge_weights(T, args.lam, args.alpha)
    coeffs = ensemble_coefficients(k)
    merged = merged_model(models, k)

    prompts = get_task("arithmetic").prompts("dev", args.prompts, seed=0)
    prompt_ids = [encode_prompt(tokenizer, p.messages) for p in prompts]
    eos, pad = list(stop_token_ids(theta0, tokenizer)), pad_id(tokenizer)
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=args.new_tokens, seed=0)

    t0 = time.perf_counter()
    error = approximation_error(models, coeffs, merged, prompt_ids, params, eos, pad, batch_size=args.prompts)
    error_s = time.perf_counter() - t0
    cost = decoding_cost(models, coeffs, merged, prompt_ids, args.new_tokens, pad, batch_size=args.prompts, repeats=2)

    result = {
        "inputs": inputs, "model": str(resolve_model(args.model)), "T": T, "lam": args.lam, "alpha": args.alpha,
        "weights": k, "coefficients": coeffs, "prompts": args.prompts, "new_tokens": args.new_tokens,
        "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "error": error, "error_seconds": error_s, "cost": cost,
        "total_seconds": time.perf_counter() - start,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(result, indent=2) + "\n")

    c = error["candidates"]
    names = {
        "merged": f"merge (λ={args.lam}, α={args.alpha})",
        "theta_T": "θT alone",
        "uniform_average": "mean(θ1..θT)",
    }
    print(f"\nSmolLM2-135M, {inputs}; ensemble c = {[round(x, 3) for x in coeffs]}; "
          f"{error['completions']} completions, {error['tokens']} tokens sampled from the ensemble\n")
    print("| candidate | KL(ens ‖ model) / token | KL(model ‖ ens) / token | Pearson r of log π(y|x) |")
    print("|---|---|---|---|")
    for key, label in names.items():
        row = c[key]
        r = row["seq_logp_pearson"]
        print(
            f"| {label} | {row['kl_ensemble_to_model_per_token']:.2e} | {row['kl_model_to_ensemble_per_token']:.2e} | "
            f"{'n/a' if r is None else f'{r:.7f}'} |"
        )
    e, m = cost["ensemble"], cost["merged"]
    mib = 2**20
    print(
        f"\n| decoding {e['tokens']} tokens (greedy, batch {args.prompts}, {args.threads} threads) | wall s "
        "| tokens/s | "
        "weights MiB | KV cache MiB |"
    )
    print("|---|---|---|---|---|")
    for label, row in ((f"ensemble ({e['models_run']} models)", e), ("merged (1 model)", m)):
        print(f"| {label} | {row['seconds']:.2f} | {row['tokens_per_s']:.1f} | {row['weights_bytes'] / mib:.0f} | "
              f"{row['kv_cache_bytes'] / mib:.1f} |")
    print(f"| ratio | {cost['time_ratio']:.2f} × | | {cost['memory_ratio']:.2f} × (weights + cache) | |")
    print(f"\ntotal {result['total_seconds']:.0f} s; results: {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
