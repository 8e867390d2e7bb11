"""Merge benchmark: `itermerge merge` vs mergekit 0.1.5 task_arithmetic vs plain torch, same inputs, same run.

    .venv/bin/python bench/merge_bench.py            # builds inputs once under bench/out/, then measures

Inputs: θ0 = SmolLM2-135M-Instruct (fp32), θ1..θ6 = θ0 + seeded per-element updates of DPO size.
All runs read from a warm page cache (each is repeated; the median is reported). Memory: peak RSS
(VmHWM) and peak anonymous memory (RssAnon, sampled every 2 ms from /proc/PID/status) of the
process; RSS counts the memory-mapped checkpoint pages, anonymous memory is the real working set.
mergekit runs from its own venv (.bench-venv, created on first use with mergekit==0.1.5).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "merge"
BENCH_VENV = ROOT / ".bench-venv"
T, LAM, ALPHA = 6, 0.3, 0.4


def build_inputs() -> list[Path]:
    import torch
    from safetensors.torch import load_file, save_file

    from itermerge.checkpoint.demo import demo_checkpoint

    theta0 = demo_checkpoint()
    paths = [theta0]
    base = load_file(str(theta0 / "model.safetensors"))
    for t in range(1, T + 1):
        d = OUT / "inputs" / f"theta{t}"
        paths.append(d)
        if (d / "model.safetensors").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(t)
        # Adam-like updates: every element moves ~1e-4·t of the tensor's scale, whatever its own size.
        sd = {
            n: (w + 1e-4 * t * w.abs().mean() * torch.randn(w.shape, generator=g)).contiguous() for n, w in base.items()
        }
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        for f in theta0.iterdir():
            if f.suffix != ".safetensors":
                (d / f.name).write_bytes(f.read_bytes())
    return paths


def ensure_mergekit() -> Path:
    exe = BENCH_VENV / "bin" / "mergekit-yaml"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        pip = [str(BENCH_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "mergekit==0.1.5", "torch==2.13.0"], check=True)
    return exe


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time, peak RSS and peak anonymous memory of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = {"anon": 0, "hwm": 0}

    def sample():
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
                peak["anon"] = max(peak["anon"], int(fields["RssAnon"].split()[0]) * 1024)
                peak["hwm"] = max(peak["hwm"], int(fields["VmHWM"].split()[0]) * 1024)
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{err.decode()[-3000:]}")
    return {"wall_s": wall, "peak_rss_gb": peak["hwm"] / 1e9, "peak_anon_gb": peak["anon"] / 1e9}


PLAIN_TORCH = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file, save_file
    paths, k, out = sys.argv[1:8], [float(x) for x in sys.argv[8].split(",")], sys.argv[9]
    sds = [load_file(p + "/model.safetensors") for p in paths]
    def merge(n):
        base = sds[0][n].float()
        return (base + sum(kt * (sd[n].float() - base) for kt, sd in zip(k, sds[1:]))).contiguous()
    merged = {n: merge(n) for n in sds[0]}
    save_file(merged, out, metadata={"format": "pt"})
""")


def compare(paths: list[Path], ours: Path, theirs: Path) -> dict:
    """Ours vs the float64 formula and vs mergekit.

    Errors are in float32 ulps of the operand scale, ulp(max(|θ0|, |θ|, Σ|k_t||θt − θ0|)): where the
    merge cancels to nearly zero, an ulp of the tiny result says nothing about the arithmetic, which
    is exact up to the roundings of its inputs' size.
    """
    import torch

    from itermerge.checkpoint import CheckpointReader
    from itermerge.maths.merge import merge_weights

    k = merge_weights(T, LAM, ALPHA)
    readers = [CheckpointReader(p) for p in paths]
    a, b = CheckpointReader(ours), CheckpointReader(theirs)
    worst64 = worst_mk = 0.0
    rounded = same_mk = total = 0
    for name in readers[0]:
        theta0 = readers[0].get(name).double()
        deltas = [r.get(name).double() - theta0 for r in readers[1:]]
        exact = theta0 + sum(kt * d for kt, d in zip(k, deltas))
        weighted = sum(abs(kt) * d.abs() for kt, d in zip(k, deltas))
        scale = torch.maximum(torch.maximum(exact.abs(), theta0.abs()), weighted).float()
        ulp = (torch.nextafter(scale, torch.tensor(float("inf"))) - scale).double()
        got, mk = a.get(name).double(), b.get(name).double()
        worst64 = max(worst64, ((got - exact).abs() / ulp).max().item())
        worst_mk = max(worst_mk, ((got - mk).abs() / ulp).max().item())
        rounded += (got == exact.float().double()).sum().item()
        same_mk += (got == mk).sum().item()
        total += got.numel()
    return {
        "max_err_vs_float64_ulps": worst64, "correctly_rounded_fraction": rounded / total,
        "max_diff_vs_mergekit_ulps": worst_mk, "bit_identical_to_mergekit_fraction": same_mk / total,
    }


def in_memory_point(paths: list[Path], repeats: int = 5) -> dict:
    import torch

    from itermerge.checkpoint import load_model
    from itermerge.merging import MergeBasis

    torch.set_num_threads(os.cpu_count() or 1)
    basis = MergeBasis.from_checkpoints(paths[0], paths[1:], mean_cache=OUT / "mean_cache")
    model = load_model(paths[0])
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        basis.apply_to(model, 0.1 * i, 0.4)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    paths = build_inputs()
    mergekit = ensure_mergekit()
    from itermerge.maths.merge import merge_weights
    from itermerge.merging import mergekit_config

    k = merge_weights(T, LAM, ALPHA)
    (OUT / "mergekit.yaml").write_text(mergekit_config(paths[0], paths[1:], k))
    itermerge = ROOT / ".venv" / "bin" / "itermerge"
    runs = {
        "mergekit 0.1.5 task_arithmetic": [
            str(mergekit),
            str(OUT / "mergekit.yaml"),
            str(OUT / "mk_out"),
            "--allow-crimes",
            "--no-copy-tokenizer",
        ],
        "plain torch (load all, fp32)": [
            sys.executable,
            "-c",
            PLAIN_TORCH,
            *map(str, paths),
            ",".join(map(str, k)),
            str(OUT / "torch.safetensors"),
        ],
        "itermerge merge": [
            str(itermerge),
            "merge",
            "--reference",
            str(paths[0]),
            "--checkpoints",
            *map(str, paths[1:]),
            "--lam",
            str(LAM),
            "--alpha",
            str(ALPHA),
            "--out",
            str(OUT / "ours"),
            "--force",
            "--quiet",
        ],
    }
    for cmd in runs.values():  # warm the page cache and the interpreters
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {}
    for name, cmd in runs.items():
        samples = [measure(cmd) for _ in range(args.repeats)]
        results[name] = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
        print(f"{name:34s} wall {results[name]['wall_s']:6.2f} s  peak RSS {results[name]['peak_rss_gb']:.2f} GB  "
              f"peak anon {results[name]['peak_anon_gb']:.2f} GB", flush=True)
    accuracy = compare(paths, OUT / "ours", OUT / "mk_out")
    point = in_memory_point(paths)
    anchor = results["mergekit 0.1.5 task_arithmetic"]["wall_s"]
    ours = results["itermerge merge"]
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "inputs": f"SmolLM2-135M fp32, T={T}, λ={LAM}, α={ALPHA}", "results": results, "accuracy": accuracy,
        "in_memory_point": point, "speedup_vs_mergekit": anchor / ours["wall_s"],
    }
    (OUT / "results.json").write_text(json.dumps(summary, indent=2))
    print(
        json.dumps(
            {"speedup_vs_mergekit": round(anchor / ours["wall_s"], 2), **accuracy, "in_memory_point": point}, indent=2
        )
    )


if __name__ == "__main__":
    main()
