"""DPO benchmark: TRL 1.16 DPOTrainer vs our whole DPO stage (θ0 log-probs + train_dpo), same pairs, same run.

    .venv/bin/python bench/dpo_bench.py                 # SmolLM2-135M-Instruct fp32, 2 steps of 8 pairs each
    .venv/bin/python bench/dpo_bench.py --model /tmp/smol --steps 3
    .venv/bin/python bench/dpo_bench.py --threads 1     # on a shared CPU: no OpenMP thread stalls; compare CPU s

Each side runs in its own child process (so the peak memory is its own): TRL with an explicit
ref_model = θ0 and its defaults otherwise (gradient checkpointing on, log-probs of the reference
computed at every step); ours computes θ0's log-probs once with `add_reference_logprobs` (inside the
timed region) and then trains with only the policy in memory. Tokens = prompt + completion tokens of
chosen and rejected, as each side tokenizes them. The FLOP floor is 8·N_params·tokens (forward 2 + backward 4 for
the policy, 2 for the reference forward) at the GFLOP/s this CPU's matmul reaches in the precision used, measured
in each child before its run (``devices.matmul_gflops``). ``--dtype``: float32, bfloat16 (both sides compute under
bf16 autocast with float32 weights: TRL's ``bf16=True``, our ``compute_dtype``) or auto (what ``model.dtype: auto``
picks on this CPU). Memory: peak RSS (VmHWM) and
peak anonymous memory (RssAnon, sampled every 5 ms) of the child; RSS also counts mapped checkpoint pages.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "dpo"


def worked_answer(a: int, op: str, b: int, slip: bool) -> str:
    """A worked sum or difference, tens then ones; with ``slip`` the ones step is off by ten."""
    verb, tens, ones = ("add" if op == "+" else "subtract"), b // 10 * 10, b % 10
    mid = a + tens if op == "+" else a - tens
    result = (a + b if op == "+" else a - b) + (10 if slip and op == "+" else -10 if slip else 0)
    step = f"{mid} {op} {ones} is {result}, carrying the ten" if slip else f"{mid} {op} {ones} = {result}"
    return (
        f"We start from {a} and {verb} {b}: first the tens, {a} {op} {tens} = {mid}, then the ones, {step}. "
        f"So {a} {op} {b} = {result}. The answer is {result}."
    )


def make_texts(n: int) -> list[dict]:
    """n arithmetic prompts with a correct worked answer (chosen) and a slipped one (rejected), ~60-70 tokens each."""
    from itermerge.tasks.arithmetic import ArithmeticTask

    rows = []
    for prompt in ArithmeticTask().prompts("train", n, seed=0):
        a, op, b = prompt.meta["a"], prompt.meta["op"], prompt.meta["b"]
        chosen, rejected = worked_answer(a, op, b, slip=False), worked_answer(a, op, b, slip=True)
        rows.append({"messages": prompt.messages, "chosen": chosen, "rejected": rejected})
    return rows


class MemorySampler:
    """Peak RssAnon of this process, sampled every 5 ms on a thread; VmHWM read at the end."""

    def __init__(self) -> None:
        self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _status() -> dict[str, int]:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "VmHWM")}

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, self._status()["RssAnon"])
            time.sleep(0.005)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = self._status()["VmHWM"]


def run_trl(model_path: str, texts: list[dict], steps: int, batch: int, dtype: str) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from itermerge.checkpoint import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_path)
    dataset = Dataset.from_list(
        [{"prompt": t["messages"], "chosen": [{"role": "assistant", "content": t["chosen"]}],
          "rejected": [{"role": "assistant", "content": t["rejected"]}]} for t in texts]
    )  # fmt: skip
    args = DPOConfig(
        output_dir=str(OUT / "trl"), beta=0.1, learning_rate=5e-7, per_device_train_batch_size=batch,
        max_steps=steps, bf16=dtype == "bfloat16", use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
        dataloader_num_workers=0,
    )  # fmt: skip
    policy, reference = load_model(model_path), load_model(model_path)
    trainer = DPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    rows = trainer.train_dataset
    start, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    # Sequential sampler order is not guaranteed; all pairs are used when steps × batch = pairs.
    tokens = sum(
        2 * len(p) + len(c) + len(r) for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"])
    )
    tokens = tokens * steps * batch // len(rows)
    return {"wall_s": wall, "cpu_s": cpu, "tokens": tokens, "params": policy.num_parameters(),
            "config": f"TRL defaults (gradient checkpointing on), ref_model=θ0, {dtype}"}  # fmt: skip


def run_ours(model_path: str, texts: list[dict], steps: int, batch: int, micro: int, reference_batch: int,
             dtype: str) -> dict:
    import torch

    from itermerge.checkpoint import load_model, load_tokenizer
    from itermerge.config import DPOConfig
    from itermerge.records import PreferencePair
    from itermerge.tokenization import encode_completion, encode_prompt
    from itermerge.training.loop import train_dpo
    from itermerge.training.reference import add_reference_logprobs

    tokenizer = load_tokenizer(model_path)
    pairs = []
    for i, t in enumerate(texts):
        pairs.append(
            PreferencePair(
                prompt_id=str(i), messages=t["messages"], prompt_ids=encode_prompt(tokenizer, t["messages"]),
                chosen=t["chosen"], rejected=t["rejected"], chosen_ids=encode_completion(tokenizer, t["chosen"]),
                rejected_ids=encode_completion(tokenizer, t["rejected"]), chosen_score=1.0, rejected_score=0.0,
            )
        )  # fmt: skip
    cfg = DPOConfig(learning_rate=5e-7, global_batch_size=batch, micro_batch_size=micro)
    # Iteration 1 of Alg. 1: θ0 is both the reference and the starting policy, loaded once.
    model = load_model(model_path)
    start, cpu = time.perf_counter(), time.process_time()
    low = torch.bfloat16 if dtype == "bfloat16" else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low is not None):
        pairs = add_reference_logprobs(model, pairs, cfg, batch_size=reference_batch, progress=False)
    ref_s = time.perf_counter() - start
    metrics = train_dpo(model, pairs, cfg, progress=False, compute_dtype=low)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "wall_s": wall, "cpu_s": cpu, "reference_s": ref_s, "train_s": metrics["wall_s"], "tokens": metrics["tokens"],
        "params": model.num_parameters(), "loss": metrics["loss"],
        "config": f"micro_batch_size={micro}, θ0 log-probs {reference_batch} pairs per forward, {dtype}",
    }  # fmt: skip


def child(args: argparse.Namespace) -> None:
    import torch

    from itermerge.devices import matmul_gflops

    torch.set_num_threads(args.threads)
    floor = matmul_gflops(getattr(torch, args.dtype), n=1024, seconds=1.0) * 1e9  # this CPU, these threads
    texts = make_texts(args.steps * args.batch)
    load = os.getloadavg()[0]  # the CPU is shared: other jobs' load skews wall time, less so CPU time
    with MemorySampler() as mem:
        if args.only == "trl":
            result = run_trl(args.model, texts, args.steps, args.batch, args.dtype)
        else:
            result = run_ours(args.model, texts, args.steps, args.batch, args.micro_batch, args.reference_batch,
                              args.dtype)
    result.update(peak_rss=mem.peak_rss, peak_anon=mem.peak_anon, threads=torch.get_num_threads(), load=load)
    result["tokens_per_s"] = result["tokens"] / result["wall_s"]
    result["matmul_gflops"] = floor / 1e9
    result["flop_floor_fraction"] = 8 * result["params"] * result["tokens"] / floor / result["wall_s"]
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="checkpoint dir or the demo alias")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per side")
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=1, help="our pairs per forward (TRL: the whole batch)")
    parser.add_argument(
        "--reference-batch",
        type=int,
        default=32,
        help="pairs per forward of θ0's log-probs; the pipeline uses sampling.batch_size // 4 (128 gives 32)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of (TRL, ours), alternated so that drifts in machine speed hit both sides; medians reported",
    )
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="compute precision of both sides; auto: what model.dtype auto picks on this CPU")
    parser.add_argument("--only", choices=("trl", "ours"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        return child(args)

    from itermerge.checkpoint import resolve_model
    from itermerge.devices import cpu_precision

    cpu = cpu_precision()
    if args.dtype == "auto":
        args.dtype = cpu["dtype"]
    flags = f"AMX {'yes' if cpu['amx_bf16'] else 'no'}, AVX512-BF16 {'yes' if cpu['avx512_bf16'] else 'no'}"
    print(f"{cpu['cpu']}: {flags}; probe fp32 {cpu.get('float32_gflops')} / bf16 {cpu.get('bfloat16_gflops')} GFLOP/s;"
          f" running {args.dtype}")

    model = resolve_model(args.model)
    rounds: list[dict[str, dict]] = []
    for _ in range(args.repeats):
        rounds.append({})
        for side in ("trl", "ours"):
            cmd = [sys.executable, __file__, "--only", side, "--model", model, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--micro-batch", str(args.micro_batch), "--threads", str(args.threads),
                   "--reference-batch", str(args.reference_batch), "--dtype", args.dtype]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
            rounds[-1][side] = json.loads(line[-1][len("RESULT ") :])
    # Each side's median run by tokens/s; the per-round ratios show the spread.
    results = {
        side: sorted((r[side] for r in rounds), key=lambda x: x["tokens_per_s"])[len(rounds) // 2]
        for side in ("trl", "ours")
    }
    round_ratios = [r["ours"]["tokens_per_s"] / r["trl"]["tokens_per_s"] for r in rounds]
    trl, ours = results["trl"], results["ours"]
    summary = {
        "machine": f"{cpu['cpu']}, {os.cpu_count()} cores, AMX {cpu['amx_bf16']}, AVX512-BF16 {cpu['avx512_bf16']}",
        "dtype": args.dtype, "probe": cpu,
        "steps": args.steps, "pairs_per_step": args.batch, "threads": args.threads, **results,
        "speedup_tokens_per_s": ours["tokens_per_s"] / trl["tokens_per_s"],
        "speedup_tokens_per_cpu_s": (ours["tokens"] / ours["cpu_s"]) / (trl["tokens"] / trl["cpu_s"]),
        "peak_rss_ratio": ours["peak_rss"] / trl["peak_rss"],
        "peak_anon_ratio": ours["peak_anon"] / trl["peak_anon"],
        "round_speedups": round_ratios, "rounds": rounds,
    }  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    gb = 1 / 2**30
    print(f"{'':>6} {'wall s':>7} {'s/step':>7} {'cpu s':>7} {'tokens':>7} {'tok/s':>6} {'floor':>6} {'RSS GiB':>9} "
          f"{'anon GiB':>9} {'load':>5}")  # fmt: skip
    for side, r in results.items():
        print(
            f"{side:>6} {r['wall_s']:7.1f} {r['wall_s'] / args.steps:7.2f} {r['cpu_s']:7.1f} {r['tokens']:7d} "
            f"{r['tokens_per_s']:6.1f} {r['flop_floor_fraction']:6.0%} {r['peak_rss'] * gb:9.2f} "
            f"{r['peak_anon'] * gb:9.2f} {r['load']:5.1f}"
        )
    print(f"ours/TRL: {summary['speedup_tokens_per_s']:.2f}x tokens/s ({summary['speedup_tokens_per_cpu_s']:.2f}x per "
          f"CPU second), peak RSS {summary['peak_rss_ratio']:.0%}, peak anon {summary['peak_anon_ratio']:.0%}; "
          f"θ0 log-probs took {ours['reference_s']:.1f} s of ours")  # fmt: skip
    if len(rounds) > 1:
        print("tokens/s ratio per round: " + ", ".join(f"{x:.2f}x" for x in round_ratios))
    print(f"wrote {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
