"""Merge benchmark: `itermerge merge --method M` vs mergekit 0.1.5 (and plain torch for the paper's merge).

    .venv/bin/python bench/merge_bench.py                  # Algorithm 2 vs task_arithmetic; builds inputs once
    .venv/bin/python bench/merge_bench.py --method ties    # one of paper expo ema groups slerp ties dare

Each method runs against the mergekit method that `--emit-mergekit-config` names (task_arithmetic, ties,
dare_linear, nuslerp) and is compared with it element by element; DARE's masks differ by construction, so
its comparison is the deterministic part (density 1) and the statistics of the drop.

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
GROUPS = "embeddings: [0.0, 0.2]\nattention: [0.5, 0.4]\nmlp: [0.2, 0.6]\n"  # norms take (λ, α) = (0.3, 0.4)
METHODS = {  # itermerge merge arguments per method (the inputs and λ, α of the paper's run)
    "paper": ["--lam", str(LAM), "--alpha", str(ALPHA)],
    "expo": ["--alpha", str(ALPHA)],
    "ema": ["--gamma", "0.8"],
    "groups": ["--groups", str(OUT / "groups.yaml"), "--lam", str(LAM), "--alpha", str(ALPHA)],
    "slerp": ["--t", "0.7", "--mean-cache", str(OUT / "mean_cache")],
    "ties": ["--lam", str(LAM), "--alpha", str(ALPHA), "--density", "0.5"],
    "dare": ["--lam", str(LAM), "--alpha", str(ALPHA), "--density", "0.5", "--seed", "0"],
}


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


def _ulps(diff, *operands):
    """|diff| in float32 ulps of the operand scale max(|operands|): where a merge cancels to nearly zero, an ulp
    of the tiny result says nothing about the arithmetic, which is exact up to the roundings of its inputs' size."""
    import numpy as np

    scale = np.abs(operands[0]).astype(np.float32)
    for x in operands[1:]:
        scale = np.maximum(scale, np.abs(x).astype(np.float32))
    return np.abs(diff) / np.spacing(scale).astype(np.float64)


def compare(method: str, paths: list[Path], ours: Path, theirs: Path) -> dict:
    """Ours vs mergekit element by element, and vs the float64 formula where the operator has one.

    Linear operators (eq. 9 with per-tensor k_t): θ0 + Σ k_t (θt − θ0) in float64. SLERP: θ0 + slerp(θ̄ − θ0,
    θT − θ0, t) in float64 from the same θ̄ (the cache both read), for ours and for mergekit's nuslerp. Errors and
    differences are in float32 ulps of the operand scale max(|θ0|, |θ|, Σ|k_t||θt − θ0|) (TIES: the k_t of
    eq. 10 before trimming). TIES: the elements that differ from mergekit are checked to be where some θt's
    |θt − θ0| ties at that tensor's k-th magnitude, which mergekit breaks by torch's (unstable) argsort.
    """
    import numpy as np

    from itermerge.checkpoint import CheckpointReader
    from itermerge.maths.operators import slerp_coefficients
    from itermerge.operators import operator

    readers = [CheckpointReader(p) for p in paths]
    a, b = CheckpointReader(ours), CheckpointReader(theirs)
    names = list(readers[0])
    op = operator(method, **_params(method)).resolve(T, names)
    bar = CheckpointReader(OUT / "mean_cache") if method == "slerp" else None
    worst_mk = worst64 = worst64_mk = 0.0
    rounded = same_mk = total = unexplained = 0
    for name in names:
        theta0 = readers[0].read(name).astype(np.float64)
        got, mk = a.read(name).astype(np.float64), b.read(name).astype(np.float64)
        exact = None
        if method == "slerp":
            d_bar, d_T = bar.read(name).astype(np.float64) - theta0, readers[-1].read(name).astype(np.float64) - theta0
            k_bar, k_T = slerp_coefficients(float(d_bar @ d_T), float(d_bar @ d_bar), float(d_T @ d_T),
                                            _params(method)["t"])
            exact = theta0 + k_bar * d_bar + k_T * d_T
            scale = [theta0, exact, np.abs(k_bar * d_bar) + np.abs(k_T * d_T)]
        else:
            k = op.weights_for(name)
            deltas = [(r.read(name).astype(np.float64) - theta0) * kt for r, kt in zip(readers[1:], k) if kt]
            scale = [theta0, sum(np.abs(d) for d in deltas) if deltas else theta0]
            if op.linear:
                exact = theta0 + sum(deltas) if deltas else theta0
                scale.append(exact)
        worst_mk = max(worst_mk, float(_ulps(got - mk, got, mk, *scale).max()))
        differ = got != mk
        same_mk += got.size - int(differ.sum())
        total += got.size
        if method == "ties" and differ.any():
            at_tie = np.zeros(got.size, dtype=bool)
            base32 = readers[0].read(name)
            for r, kt in zip(readers[1:], op.weights):
                magnitude = np.abs(r.read(name) - base32)
                kk = max(1, int(_params(method)["density"] * magnitude.size))
                if kt and kk < magnitude.size:
                    at_tie |= magnitude == np.partition(magnitude, magnitude.size - kk)[magnitude.size - kk]
            unexplained += int((differ & ~at_tie).sum())
        if exact is not None:
            worst64 = max(worst64, float(_ulps(got - exact, *scale).max()))
            worst64_mk = max(worst64_mk, float(_ulps(mk - exact, *scale).max()))
            rounded += int((got == exact.astype(np.float32)).sum())
    result = {"max_diff_vs_mergekit_ulps": worst_mk, "bit_identical_to_mergekit_fraction": same_mk / total}
    if exact is not None:
        result.update(max_err_vs_float64_ulps=worst64, correctly_rounded_fraction=rounded / total,
                      mergekit_max_err_vs_float64_ulps=worst64_mk)
    if method == "ties":
        result.update(differing_elements=total - same_mk, differing_not_at_a_kth_magnitude_tie=unexplained)
    return result


def dare_statistics(paths: list[Path], ours: Path, theirs: Path, density: float) -> dict:
    """DARE's masks differ (numpy's PCG64 per tensor here, torch's RNG in mergekit), so compare what both promise.

    - entries where every θ_t's delta was dropped equal θ0: expected fraction (1 − density)^T;
    - E[merge] = the task-arithmetic merge: the mean signed deviation, relative to ‖TA − θ0‖, is ≈ 0;
    - the spread: ‖merge − TA‖ / ‖TA − θ0‖, the same for both up to mergekit's L1 rescaling (vs 1/density).
    """
    import numpy as np

    from itermerge.checkpoint import CheckpointReader
    from itermerge.maths.merge import merge_weights

    k = merge_weights(T, LAM, ALPHA)
    readers = [CheckpointReader(p) for p in paths]
    outs = {"ours": CheckpointReader(ours), "mergekit": CheckpointReader(theirs)}
    sums = {who: {"at_theta0": 0, "bias": 0.0, "spread": 0.0} for who in outs}
    total, norm = 0, 0.0
    for name in readers[0]:
        theta0 = readers[0].read(name).astype(np.float64)
        ta = theta0 + sum(kt * (r.read(name).astype(np.float64) - theta0) for r, kt in zip(readers[1:], k))
        norm += float(((ta - theta0) ** 2).sum())
        total += theta0.size
        for who, r in outs.items():
            got = r.read(name).astype(np.float64)
            sums[who]["at_theta0"] += int((got == theta0).sum())
            sums[who]["bias"] += float((got - ta).sum())
            sums[who]["spread"] += float(((got - ta) ** 2).sum())
    rms = (norm / total) ** 0.5
    return {
        "expected_at_theta0_fraction": (1 - density) ** T,
        **{f"{who}_at_theta0_fraction": v["at_theta0"] / total for who, v in sums.items()},
        **{f"{who}_mean_deviation_rel": v["bias"] / total / rms for who, v in sums.items()},
        **{f"{who}_spread_rel": (v["spread"] / norm) ** 0.5 for who, v in sums.items()},
    }


def _params(method: str) -> dict:
    """METHODS[method] as merge_checkpoints keywords."""
    from itermerge.config.groups import read_groups

    args, params = METHODS[method], {}
    for flag, value in zip(args[::2], args[1::2]):
        key = flag[2:].replace("-", "_")
        if key == "mean_cache":
            continue
        params[key] = read_groups(value) if key == "groups" else int(value) if key == "seed" else float(value)
    return params


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


def itermerge_cmd(paths: list[Path], method: str, out: Path, extra: list[str] = ()) -> list[str]:
    return [str(ROOT / ".venv" / "bin" / "itermerge"), "merge", "--reference", str(paths[0]), "--checkpoints",
            *map(str, paths[1:]), "--method", method, *METHODS[method], *extra, "--out", str(out), "--force",
            "--quiet"]


def mergekit_cmd(mergekit: Path, config: Path, out: Path) -> list[str]:
    return [str(mergekit), str(config), str(out), "--allow-crimes", "--no-copy-tokenizer"]


def accuracy_of(method: str, paths: list[Path], ours: Path, theirs: Path, mergekit: Path) -> dict:
    if method != "dare":
        return compare(method, paths, ours, theirs)
    # DARE's random masks differ: the drop's statistics, and density 1 (no drop) bit for bit.
    accuracy = dare_statistics(paths, ours, theirs, density=0.5)
    one = OUT / "mergekit_dare_density1.yaml"
    subprocess.run(itermerge_cmd(paths, method, OUT / "ours_dare1", ["--density", "1", "--emit-mergekit-config",
                                                                     str(one)]), check=True, stdout=subprocess.DEVNULL)
    subprocess.run(mergekit_cmd(mergekit, one, OUT / "mk_dare1"), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    accuracy["density_1"] = compare("paper", paths, OUT / "ours_dare1", OUT / "mk_dare1")
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="paper", choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare-only", action="store_true", help="recompute the accuracy of the last run's outputs")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "groups.yaml").write_text(GROUPS)
    paths = build_inputs()
    mergekit = ensure_mergekit()
    from itermerge.checkpoint import CheckpointReader
    from itermerge.maths.merge import merge_weights
    from itermerge.merging import mean_checkpoint
    from itermerge.merging.mean import mean_cache_hashes

    method = args.method
    if method == "slerp" and mean_cache_hashes(OUT / "mean_cache", [CheckpointReader(p) for p in paths[1:-1]]) is None:
        mean_checkpoint(paths[1:-1], OUT / "mean_cache", force=True)  # θ̄, read by both (nuslerp needs a model)
    paper = method == "paper"
    ours_dir, mk_dir = (OUT / "ours", OUT / "mk_out") if paper else (OUT / f"ours_{method}", OUT / f"mk_{method}")
    config = OUT / ("mergekit.yaml" if paper else f"mergekit_{method}.yaml")
    results_file = OUT / ("results.json" if paper else f"results_{method}.json")
    if args.compare_only:
        summary = json.loads(results_file.read_text())
        summary["accuracy"] = accuracy_of(method, paths, ours_dir, mk_dir, mergekit)
        results_file.write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary["accuracy"], indent=2))
        return
    subprocess.run(itermerge_cmd(paths, method, ours_dir, ["--emit-mergekit-config", str(config)]), check=True,
                   stdout=subprocess.DEVNULL)
    mk_name = f"mergekit 0.1.5 {config.read_text().split('merge_method: ')[1].split()[0]}"
    runs = {mk_name: mergekit_cmd(mergekit, config, mk_dir)}
    if paper:
        k = merge_weights(T, LAM, ALPHA)
        runs["plain torch (load all, fp32)"] = [sys.executable, "-c", PLAIN_TORCH, *map(str, paths),
                                                ",".join(map(str, k)), str(OUT / "torch.safetensors")]
    runs[f"itermerge merge --method {method}"] = itermerge_cmd(paths, method, ours_dir)
    for cmd in runs.values():  # warm the page cache and the interpreters
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {}
    for name, cmd in runs.items():
        samples = [measure(cmd) for _ in range(args.repeats)]
        results[name] = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
        print(f"{name:40s} wall {results[name]['wall_s']:7.2f} s  peak RSS {results[name]['peak_rss_gb']:.2f} GB  "
              f"peak anon {results[name]['peak_anon_gb']:.2f} GB", flush=True)
    accuracy = accuracy_of(method, paths, ours_dir, mk_dir, mergekit)
    anchor, ours = results[mk_name]["wall_s"], results[f"itermerge merge --method {method}"]
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "inputs": f"SmolLM2-135M fp32, T={T}", "method": method, "itermerge_args": METHODS[method],
        "results": results, "accuracy": accuracy, "speedup_vs_mergekit": anchor / ours["wall_s"],
    }
    if paper:
        summary["in_memory_point"] = in_memory_point(paths)
    results_file.write_text(json.dumps(summary, indent=2))
    print(json.dumps({"speedup_vs_mergekit": round(anchor / ours["wall_s"], 2), **accuracy}, indent=2))


if __name__ == "__main__":
    main()
