"""The anchor a CPU user would pick for sampling: vLLM's CPU build, run by ``bench/sampling_bench.py --sides vllm``
in the interpreter that has it (``make test-vllm`` builds ``.venv-vllm``). Not meant to be run by hand.

    .venv-vllm/bin/python bench/vllm_anchor.py --model DIR --batch 256 --k 8 --chunks 2 --max-new-tokens 48

The same workload as the other sides (``sampling_bench.arithmetic_prompts``: batch/K prompts × chunks, K samples
each, temperature 1, no top-p/top-k, EOS stops), all of it in one ``LLM.generate`` call (the engine schedules its
own batches), the engine built once off the clock. Prints one JSON line: the rounds' (tokens, wall s, CPU s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from sampling_bench import arithmetic_prompts, cpu_seconds
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from itermerge.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    prompts = arithmetic_prompts(tokenizer, max(1, args.batch // args.k) * args.chunks, seed=args.batch)
    start = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, max_num_seqs=args.batch, seed=0,
              enable_chunked_prefill=False)  # a CPU engine's generators cannot rewind a chunked prefill
    build_s = time.perf_counter() - start
    params = SamplingParams(n=args.k, temperature=1.0, top_p=1.0, top_k=0, max_tokens=args.max_new_tokens, seed=0)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(inputs[:1], SamplingParams(n=2, max_tokens=2), use_tqdm=False)  # first-call costs off the clock
    rounds = []
    for _ in range(args.repeats):
        wall, cpu = time.perf_counter(), cpu_seconds()
        out = llm.generate(inputs, params, use_tqdm=False)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        rounds.append((sum(len(c.token_ids) for o in out for c in o.outputs), wall, cpu))
    print("RESULT " + json.dumps({"rounds": rounds, "build_s": build_s, "rows": len(prompts) * args.k}), flush=True)


if __name__ == "__main__":
    main()
