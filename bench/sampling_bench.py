"""Sampling throughput: HF ``generate`` against ``HFSampler`` on SmolLM2-135M, same prompts, same law, one run.

    .venv/bin/python bench/sampling_bench.py                 # batches 64 and 16, K=8, 48 new tokens
    .venv/bin/python bench/sampling_bench.py --model /tmp/smol --batch 64

Each batch holds batch/K arithmetic prompts × K samples (how the pipeline samples Alg. 1's y_1:K).
Both sides sample at temperature 1 with top-p/top-k off (appendix A, training column) and stop at
EOS; tokens counted are the generated ones up to and including EOS. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import torch


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn, *args) -> tuple[int, float, float]:
    """(tokens, wall seconds, CPU seconds) of ``fn(*args)``, which returns its token count."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    tokens = fn(*args)
    return tokens, time.perf_counter() - wall, cpu_seconds() - cpu


def arithmetic_prompts(tokenizer, n: int, seed: int) -> list[list[int]]:
    from itermerge.tasks import get_task
    from itermerge.tokenization import encode_prompt

    return [encode_prompt(tokenizer, p.messages) for p in get_task("arithmetic").prompts("train", n, seed)]


def hf_generate(model, tokenizer, prompts: list[list[int]], k: int, max_new: int, eos: list[int]) -> int:
    """Tokens generated (up to EOS) by one left-padded ``generate`` call with K return sequences."""
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            num_return_sequences=k, max_new_tokens=max_new, pad_token_id=pad,
        )
    new = out[:, width:]
    is_eos = torch.isin(new, torch.tensor(eos))
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full((len(new),), new.shape[1]))
    return int(first.sum())


def sampler_generate(model, tokenizer, prompts, k: int, max_new: int, batch: int) -> int:
    from itermerge.sampling import SamplingParams
    from itermerge.sampling.hf import HFSampler

    sampler = HFSampler(model, tokenizer, batch_size=batch, progress=False)
    out = sampler.generate(prompts, SamplingParams(n=k, temperature=1.0, max_new_tokens=max_new, seed=0))
    return sum(len(s.token_ids) for row in out for s in row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 16])
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from itermerge.checkpoint import load_model, load_tokenizer, resolve_model
    from itermerge.sampling.hf import eos_token_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    model, tokenizer = load_model(path), load_tokenizer(path)
    eos = eos_token_ids(model, tokenizer)
    torch.manual_seed(0)
    rows = []
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    for batch in args.batch:
        prompts = arithmetic_prompts(tokenizer, max(1, batch // args.k), seed=batch)
        n_rows = len(prompts) * args.k
        hf = timed(hf_generate, model, tokenizer, prompts, args.k, args.max_new_tokens, eos)
        ours = timed(sampler_generate, model, tokenizer, prompts, args.k, args.max_new_tokens, batch)
        rows.append((batch, n_rows, hf, ours))
        for name, (tokens, wall, cpu) in (("generate", hf), ("HFSampler", ours)):
            print(f"batch {batch} {name}: {tokens} tokens, {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")

    print(f"\nSmolLM2-135M-Instruct fp32, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, K={args.k}, "
          f"max_new_tokens={args.max_new_tokens}, temperature 1.0\n")
    print("| batch (prompts × K) | mean tokens generate / HFSampler | generate tok/s | HFSampler tok/s | speed-up "
          "| generate / HFSampler tok per CPU-s | speed-up (CPU) |")
    print("|---|---|---|---|---|---|---|")
    for batch, n_rows, (hf_tok, hf_wall, hf_cpu), (our_tok, our_wall, our_cpu) in rows:
        hf_rate, our_rate = hf_tok / hf_wall, our_tok / our_wall
        hf_cpu_rate, our_cpu_rate = hf_tok / hf_cpu, our_tok / our_cpu
        print(f"| {batch} ({n_rows // args.k} × {args.k}) | {hf_tok / n_rows:.1f} / {our_tok / n_rows:.1f} "
              f"| {hf_rate:.0f} | {our_rate:.0f} | {our_rate / hf_rate:.2f}× "
              f"| {hf_cpu_rate:.0f} / {our_cpu_rate:.0f} | {our_cpu_rate / hf_cpu_rate:.2f}× |")


if __name__ == "__main__":
    main()
