"""LoRA benchmark: one LoRA iteration (dpo.peft) against one full iteration, Alg. 1's train stage on the same pairs.

    .venv/bin/python bench/lora_bench.py                        # SmolLM2-135M-Instruct fp32, 2 steps of 8 pairs
    .venv/bin/python bench/lora_bench.py --steps 4 --threads 1 --repeats 3
    .venv/bin/python bench/lora_bench.py --lora-from-chain      # LoRA iteration 2: θ1 = θ0 + adapter 1 (a chain)

Each side runs in its own child process (so the peak memory is its own) and does what `iteration.train` does:
read θ_{t−1} in float32, train on D_t with `train_dpo`, write the result — the full side θ_t as a full checkpoint
(save_model), the LoRA side the adapter and θ_t as θ0 plus adapters (training/peft.py). θ0's log-probs are computed
once beforehand in a preparing child (the pipeline's reference stage, not part of either side). The pairs are
dpo_bench's worked-arithmetic pairs. Reported per side: wall time of the whole stage (load + train + save) and of
training alone, training tokens/s, peak RSS (VmHWM) and peak anonymous memory (RssAnon sampled every 5 ms), and
what the iteration writes to disk: the full checkpoint's weights against the adapter (plus the chain's metadata).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "lora"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dpo_bench import MemorySampler, make_texts  # noqa: E402


def _dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file())


def _dpo_config(args: argparse.Namespace, lora: bool):
    from itermerge.config import DPOConfig
    from itermerge.config.dpo import LoraConfig

    peft = LoraConfig(r=args.r, alpha=args.alpha) if lora else None
    return DPOConfig(learning_rate=args.lora_lr if lora else args.lr, global_batch_size=args.batch,
                     micro_batch_size=args.micro_batch, peft=peft)


def prepare(args: argparse.Namespace) -> None:
    """pairs.jsonl with θ0's log-probs; with --lora-from-chain, an untimed LoRA iteration 1 (prep/iter_01)."""
    import torch

    from itermerge.checkpoint import load_model, load_tokenizer
    from itermerge.records import PreferencePair, write_jsonl
    from itermerge.tokenization import encode_completion, encode_prompt
    from itermerge.training.reference import add_reference_logprobs

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    pairs = [PreferencePair(
        prompt_id=str(i), messages=t["messages"], prompt_ids=encode_prompt(tokenizer, t["messages"]),
        chosen=t["chosen"], rejected=t["rejected"], chosen_ids=encode_completion(tokenizer, t["chosen"]),
        rejected_ids=encode_completion(tokenizer, t["rejected"]), chosen_score=1.0, rejected_score=0.0,
    ) for i, t in enumerate(make_texts(args.steps * args.batch))]
    pairs = add_reference_logprobs(load_model(args.model), pairs, _dpo_config(args, lora=False), batch_size=32,
                                   progress=False)
    OUT.mkdir(parents=True, exist_ok=True)
    write_jsonl(OUT / "pairs.jsonl", pairs)
    if args.lora_from_chain:
        from itermerge.training.peft import train_adapter

        torch.manual_seed(0)
        (OUT / "prep" / "iter_01").mkdir(parents=True, exist_ok=True)
        train_adapter(Path(args.model), pairs, _dpo_config(args, lora=True), OUT / "prep" / "iter_01", device="cpu",
                      compute_dtype=None)


def child(args: argparse.Namespace) -> None:
    import torch

    from itermerge.checkpoint import load_model, load_tokenizer, save_model
    from itermerge.checkpoint.chain import ADAPTER_WEIGHTS
    from itermerge.records import PreferencePair, read_jsonl
    from itermerge.training.loop import train_dpo
    from itermerge.training.peft import train_adapter

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pairs = read_jsonl(OUT / "pairs.jsonl", PreferencePair)
    out = OUT / args.only
    out.mkdir(parents=True, exist_ok=True)
    lora = args.only == "lora"
    policy = OUT / "prep" / "iter_01" / "model" if lora and args.lora_from_chain else Path(args.model)
    cfg = _dpo_config(args, lora)
    load = os.getloadavg()[0]  # the CPU is shared: other jobs' load skews wall time, less so CPU time
    with MemorySampler() as mem:
        start, cpu = time.perf_counter(), time.process_time()
        if lora:  # what iteration.train does with dpo.peft
            metrics = train_adapter(policy, pairs, cfg, out, device="cpu", compute_dtype=None)
        else:  # ... and without: θ_{t−1} in float32, every weight trained, θ_t saved whole
            model = load_model(policy)
            metrics = train_dpo(model, pairs, cfg, progress=False)
            save_model(model, load_tokenizer(policy), out / "model", force=True)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    written = _dir_bytes(out / "adapter", ADAPTER_WEIGHTS) if lora else _dir_bytes(out / "model", "*.safetensors")
    result = {
        "start": str(policy), "stage_wall_s": wall, "cpu_s": cpu, "train_wall_s": metrics["wall_s"],
        "tokens": metrics["tokens"], "tokens_per_s": metrics["tokens_per_s"], "loss": metrics["loss"],
        "peak_rss": mem.peak_rss, "peak_anon": mem.peak_anon, "weights_bytes": written,
        "directory_bytes": _dir_bytes(out / "model") + (_dir_bytes(out / "adapter") if lora else 0),
        "trainable_parameters": metrics["adapter"]["trainable_parameters"] if lora else None,
        "threads": torch.get_num_threads(), "load": load,
        "config": (f"LoRA r={args.r}, alpha={args.alpha}, lr={args.lora_lr:g}" if lora else f"full, lr={args.lr:g}")
        + f", {args.steps} steps × {args.batch} pairs, micro-batch {args.micro_batch}, fp32",
    }
    print("RESULT " + json.dumps(result), flush=True)


def _run_child(args: argparse.Namespace, mode: str) -> dict | None:
    cmd = [sys.executable, __file__, "--only", mode, "--model", args.model, "--steps", str(args.steps),
           "--batch", str(args.batch), "--micro-batch", str(args.micro_batch), "--threads", str(args.threads),
           "--r", str(args.r), "--alpha", str(args.alpha), "--lr", str(args.lr), "--lora-lr", str(args.lora_lr),
           *(["--lora-from-chain"] if args.lora_from_chain else [])]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or (mode != "prepare" and not line):
        sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):]) if line else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="θ0: checkpoint dir or the demo alias")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per side")
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=1, help="pairs per forward")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (dpo.peft.r)")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (dpo.peft.alpha)")
    parser.add_argument("--lr", type=float, default=5e-7, help="full iteration's learning rate (appendix C)")
    parser.add_argument("--lora-lr", type=float, default=1e-4, help="LoRA iteration's learning rate")
    parser.add_argument("--lora-from-chain", action="store_true",
                        help="time LoRA iteration 2 (θ1 = θ0 + a first adapter, read as a chain) instead of 1")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of (full, LoRA), alternated so that drifts in machine speed hit both; medians")
    parser.add_argument("--only", choices=("full", "lora", "prepare"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only == "prepare":
        return prepare(args)
    if args.only:
        return child(args)

    from itermerge.checkpoint import resolve_model

    args.model = resolve_model(args.model)
    _run_child(args, "prepare")
    rounds = [{side: _run_child(args, side) for side in ("full", "lora")} for _ in range(args.repeats)]
    results = {side: sorted((r[side] for r in rounds), key=lambda x: x["tokens_per_s"])[len(rounds) // 2]
               for side in ("full", "lora")}
    full, lora = results["full"], results["lora"]
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", **results,
        "speedup_tokens_per_s": lora["tokens_per_s"] / full["tokens_per_s"],
        "speedup_stage_wall": full["stage_wall_s"] / lora["stage_wall_s"],
        "peak_rss_ratio": lora["peak_rss"] / full["peak_rss"], "peak_anon_ratio": lora["peak_anon"] / full["peak_anon"],
        "written_ratio": lora["weights_bytes"] / full["weights_bytes"], "rounds": rounds,
    }  # fmt: skip
    (OUT / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    gib, mib = 1 / 2**30, 1 / 2**20
    print(f"{'':>5} {'stage s':>8} {'train s':>8} {'cpu s':>7} {'tokens':>7} {'tok/s':>6} {'RSS GiB':>8} "
          f"{'anon GiB':>9} {'written MiB':>12} {'load':>5}")  # fmt: skip
    for side, r in results.items():
        print(f"{side:>5} {r['stage_wall_s']:8.1f} {r['train_wall_s']:8.1f} {r['cpu_s']:7.1f} {r['tokens']:7d} "
              f"{r['tokens_per_s']:6.1f} {r['peak_rss'] * gib:8.2f} {r['peak_anon'] * gib:9.2f} "
              f"{r['weights_bytes'] * mib:12.2f} {r['load']:5.1f}")  # fmt: skip
    print(f"LoRA/full: {summary['speedup_tokens_per_s']:.2f}x training tokens/s, {summary['speedup_stage_wall']:.2f}x "
          f"faster stage, peak RSS {summary['peak_rss_ratio']:.0%}, peak anon {summary['peak_anon_ratio']:.0%}, "
          f"writes {summary['written_ratio']:.2%} of the bytes ({lora['trainable_parameters']:,} trainable parameters)")
    print(f"wrote {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
