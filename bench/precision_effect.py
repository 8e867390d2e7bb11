"""Does the precision change the science? θ0 and θT of a finished run evaluated on its test prompts in float32 and in
bfloat16, the same sampler and settings as the run's test stage, paired prompt by prompt.

    .venv/bin/python bench/precision_effect.py runs/demo          # θ0 and θT of the demo, fp32 against bf16

Prints, per model and metric, both values and the paired difference bf16 − fp32 with its interval
(``maths.paired.paired_difference``), and writes them to bench/out/precision/RUN.json. The merge itself is float32
arithmetic whatever the compute precision (merging/), so it is not measured here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()

    from itermerge.config import load_config
    from itermerge.devices import Placement, cpu_precision, load_placed, release
    from itermerge.evaluation import build_evaluator
    from itermerge.maths.paired import paired_difference
    from itermerge.sampling.backends import evaluation_sampler

    run_dir = Path(args.run_dir)
    cfg = load_config(run_dir / "config.yaml")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    theta0, theta_T = manifest["reference"], run_dir / f"iter_{cfg.iterations:02d}" / "model"
    probe = cpu_precision()
    print(f"{probe['cpu']}: probe fp32 {probe.get('float32_gflops')} / bf16 {probe.get('bfloat16_gflops')} GFLOP/s")
    results: dict[str, dict] = {}
    for dtype in ("float32", "bfloat16"):
        where = Placement("cpu", dtype)
        with evaluation_sampler(cfg, where, theta_T) as make_sampler:
            evaluate = build_evaluator(cfg.evaluation, args.split, theta_T, theta0, where, make_sampler)
            for name, path in (("theta0", theta0), ("theta_T", theta_T)):
                model = load_placed(path, where)
                start = time.perf_counter()
                metrics = evaluate(model)
                results.setdefault(name, {})[dtype] = {"seconds": time.perf_counter() - start, **{
                    k: {"value": m.value, "items": list(m.items)} for k, m in metrics.items()}}
                release(model)
    rows = []
    for name, by_dtype in results.items():
        for metric in by_dtype["float32"]:
            if metric == "seconds":
                continue
            a, b = by_dtype["bfloat16"][metric]["items"], by_dtype["float32"][metric]["items"]
            diff = paired_difference(a, b)
            rows.append({"model": name, "metric": metric, "float32": by_dtype["float32"][metric]["value"],
                         "bfloat16": by_dtype["bfloat16"][metric]["value"], **diff})
    print("| model | metric | fp32 | bf16 | bf16 − fp32 [95 % CI] | p |\n|---|---|---|---|---|---|")
    def num(x: float | None, spec: str) -> str:
        return "—" if x is None else format(x, spec)

    for r in rows:
        print(f"| {r['model']} | {r['metric']} | {r['float32']:.4f} | {r['bfloat16']:.4f} | {r['difference']:+.4f} "
              f"[{num(r['ci_low'], '+.4f')}, {num(r['ci_high'], '+.4f')}] | {num(r['p_value'], '.3g')} |")
    for name, by_dtype in results.items():
        fp32, bf16 = by_dtype["float32"]["seconds"], by_dtype["bfloat16"]["seconds"]
        print(f"{name}: evaluation {fp32:.1f} s fp32, {bf16:.1f} s bf16")
    out = ROOT / "bench" / "out" / "precision"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{run_dir.name}.json").write_text(json.dumps({"probe": probe, "rows": rows, "seconds": {
        n: {d: v["seconds"] for d, v in by.items()} for n, by in results.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
