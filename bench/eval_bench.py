"""Greedy evaluation of θ0 on the demo model: the prompts prefilled whole against ``sampling.shared_prefix``, one run.

    .venv/bin/python bench/eval_bench.py                          # 80 and 400 arithmetic dev prompts, batch 128
    .venv/bin/python bench/eval_bench.py --prompts 80 --rounds 5  # rounds alternate the sides; the best is shown

What the search pays for one (λ, α) point: ``Evaluator(model)`` with the demo's evaluation (greedy accuracy and
the verifier's reward on the same replies, max_new_tokens 24, batch 128) on dev prompts of the arithmetic task
(``--high`` 60 so that 400 dev prompts exist). ``plain``: HFSampler with ``shared_prefix=False`` (every prompt
prefilled whole, left-padded); ``shared``: its default (the chat template's prefix run once per admitted group,
its KV cache expanded to the rows). Every other setting is the sampler's default on both sides. The replies of
the two sides are compared one by one. Prints a markdown table of each side's fastest round (other jobs on the
machine only ever add time; every round is printed too), prefill s being the time inside ``batch.prefill``. CPU s
is the process's CPU time: with ``--threads 1`` it barely moves when other jobs share the cores (with 2 threads on
a busy 2-core machine, torch's threads also wait on each other and the wall time jumps from round to round).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import torch

SIDES = ("plain", "shared")


def evaluator(tokenizer, n: int, high: int, max_new: int, batch: int):
    from itermerge.config.evaluation import AccuracyConfig, EvalConfig, PromptSource, RewardConfig
    from itermerge.evaluation.suite import Evaluator

    cfg = EvalConfig(prompts=PromptSource(n=n, task_options={"high": high}), max_new_tokens=max_new,
                     batch_size=batch, accuracy=AccuracyConfig(sampling="greedy"),
                     reward=RewardConfig(sampling="greedy", samples=1), kl=None)
    return Evaluator(cfg, tokenizer, "dev", progress=False)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_side(model, ev, side: str) -> tuple[float, float, float, list[list[int]], float]:
    """(wall s, CPU s, prefill s, each prompt's greedy token ids, accuracy) of one evaluation with ``side``'s
    sampler."""
    import itermerge.sampling.batch as batch_module
    from itermerge.sampling.hf import HFSampler

    replies: list[list[int]] = []
    prefill_s = [0.0]
    real_prefill = batch_module.prefill

    def timed_prefill(*args, **kwargs):
        start = time.perf_counter()
        out = real_prefill(*args, **kwargs)
        prefill_s[0] += time.perf_counter() - start
        return out

    def make_sampler(model, tokenizer, batch_size, progress):
        sampler = HFSampler(model, tokenizer, batch_size=batch_size, progress=progress,
                            shared_prefix=side == "shared")
        generate = sampler.generate

        def recording(prompt_ids, params):
            out = generate(prompt_ids, params)
            replies.extend(row[0].token_ids for row in out)
            return out

        sampler.generate = recording
        return sampler

    ev.make_sampler = make_sampler
    batch_module.prefill = timed_prefill
    try:
        start, cpu = time.perf_counter(), cpu_seconds()
        metrics = ev(model)
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    finally:
        batch_module.prefill = real_prefill
    return wall, cpu, prefill_s[0], replies, metrics["accuracy"].value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF checkpoint (default: the cached demo model)")
    ap.add_argument("--prompts", type=int, nargs="+", default=[80, 400])
    ap.add_argument("--high", type=int, default=60, help="arithmetic operands up to this (60: 400+ dev prompts)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from itermerge.checkpoint import load_model, load_tokenizer, resolve_model

    torch.set_num_threads(args.threads)
    path = args.model or resolve_model("smollm2-135m-instruct")
    model, tokenizer = load_model(path), load_tokenizer(path)
    model.eval()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({args.threads} threads); load average before: {os.getloadavg()}")
    rows = []
    for n in args.prompts:
        ev = evaluator(tokenizer, n, args.high, args.max_new_tokens, args.batch)
        run_side(model, ev, "shared")  # warm-up (allocator, lazy imports), off the clock
        results: dict[str, list[tuple[float, float, float]]] = {side: [] for side in SIDES}
        replies: dict[str, list[list[int]]] = {}
        for r in range(args.rounds):
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                wall, cpu, prefill_s, out, accuracy = run_side(model, ev, side)
                results[side].append((wall, cpu, prefill_s))
                replies[side] = out
                print(f"  {n} prompts, round {r + 1}, {side}: {wall:.2f} s, CPU {cpu:.2f} s "
                      f"(prefill {prefill_s:.2f} s), accuracy {accuracy:.4f}; load average {os.getloadavg()[0]:.2f}",
                      flush=True)
        differ = sum(a != b for a, b in zip(replies["plain"], replies["shared"]))
        best = {side: min(results[side]) for side in SIDES}  # (wall, CPU, prefill) of the fastest round
        for side in SIDES:
            wall, cpu, prefill_s = best[side]
            rows.append((n, side, wall, cpu, prefill_s, n / wall, best["plain"][0] / wall, best["plain"][1] / cpu,
                         differ))
    print(f"load average after: {os.getloadavg()}\n")
    print("| prompts | side | wall s | CPU s | prefill s | prompts/s | speed-up (wall) | (CPU) | replies differing |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, side, wall, cpu, prefill_s, rate, ratio, cpu_ratio, differ in rows:
        print(f"| {n} | {side} | {wall:.2f} | {cpu:.2f} | {prefill_s:.2f} | {rate:.1f} | {ratio:.2f}× "
              f"| {cpu_ratio:.2f}× | {differ} / {n} |")


if __name__ == "__main__":
    main()
