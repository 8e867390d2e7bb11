"""The CUDA path in one short run: bf16 sampling against HF ``generate``, Alg. 1 on one GPU, and Alg. 1 under
``accelerate launch`` with DeepSpeed ZeRO-3 (examples/accelerate_zero3.yaml), the weights checked after each; and
the paper's path (``--real-path``): the vLLM backend, an ArmoRM-shaped judge at random init, every process.

    python bench/gpu_check.py --tokenizer DIR --out DIR --real-path [--processes N] [--dry-run]   # <= 10 min
    python bench/gpu_check.py --tokenizer DIR --out DIR [--skip-zero3]
    python bench/gpu_check.py --tokenizer DIR --out DIR --graphs-only   # the CUDA-graph sampling table alone
    python bench/gpu_check.py --tokenizer DIR --out DIR --run-only      # `itermerge run` on one GPU, per stage

θ0 has SmolLM2-135M's architecture with seeded random weights (no weights are downloaded): the point is
the GPU code path and its throughput, not what the model learns. ``--tokenizer`` is a directory with
SmolLM2's config.json and tokenizer files (e.g. the cached demo checkpoint). The completions are scored
by length (``itermerge.tasks.arithmetic:brevity``), which random text never ties. Every step records
its numbers or its error in OUT/gpu_check.json, and a failed step does not stop the others.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

RESULTS: dict[str, object] = {}

CONFIG = """\
name: gpu-check
seed: 0
iterations: 2
model: {{path: {theta0}, device: {device}}}
prompts: {{source: task, task: arithmetic, per_iteration: 64, dev: 8, max_prompt_length: 256}}
sampling: {{n: 4, temperature: 1.0, max_new_tokens: 64, batch_size: 256}}
scorer: {{type: verifier, function: "itermerge.tasks.arithmetic:brevity"}}
dpo: {{learning_rate: 5.0e-7, global_batch_size: 16, micro_batch_size: 4, warmup_ratio: 0.1,
       max_length: 384, max_prompt_length: 256}}
"""


def step(name: str):
    def wrap(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            print(f"== {name}", flush=True)
            try:
                RESULTS[name] = {"ok": True, **(fn(*args, **kwargs) or {})}
            except Exception as e:  # every step reports, none stops the others
                traceback.print_exc()
                RESULTS[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[-2000:]}
            RESULTS[name]["seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps({name: RESULTS[name]}, default=str), flush=True)

        return run

    return wrap


@step("environment")
def environment() -> dict:
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    for name in ("accelerate", "deepspeed"):
        try:
            info[name] = __import__(name).__version__
        except Exception as e:
            info[name] = f"missing ({e})"
    return info


@step("theta0")
def make_theta0(tokenizer_dir: Path, out: Path) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "generation_config", "special_tokens")):
            shutil.copy(f, out / f.name)
    return {"parameters": sum(p.numel() for p in model.parameters())}


@step("sampling")
def sampling(theta0: Path, batches: list[int], max_new: int, device: str) -> dict:
    import torch
    from sampling_bench import arithmetic_prompts, hf_generate, hf_generate_loop, sampler_generate, timed

    from itermerge.checkpoint import load_model, load_tokenizer
    from itermerge.sampling import SamplingParams
    from itermerge.sampling.hf import HFSampler
    from itermerge.tokenization import stop_token_ids

    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model, tokenizer = load_model(theta0, dtype=dtype, device=device), load_tokenizer(theta0)
    eos, k = list(stop_token_ids(model, tokenizer)), 8
    warm = arithmetic_prompts(tokenizer, 2, seed=1)
    hf_generate(model, tokenizer, warm, 2, 4, eos)
    sampler_generate(model, tokenizer, warm, 2, 4, 4)
    rows = {}
    for batch in batches:
        prompts = arithmetic_prompts(tokenizer, 2 * batch // k, seed=batch)
        hf = timed(hf_generate_loop, model, tokenizer, prompts, batch // k, k, max_new, eos)
        ours = timed(sampler_generate, model, tokenizer, prompts, k, max_new, batch)
        rows[f"batch_{batch}"] = {
            "generate_tok_s": round(hf[0] / hf[1]), "sampler_tok_s": round(ours[0] / ours[1]),
            "speedup": round((ours[0] / ours[1]) / (hf[0] / hf[1]), 2), "tokens": [hf[0], ours[0]],
        }
        print(rows[f"batch_{batch}"], flush=True)
    # greedy: the same tokens as generate(do_sample=False), one prompt per call (no padding differences)
    prompts = arithmetic_prompts(tokenizer, 8, seed=3)
    ours = HFSampler(model, tokenizer, batch_size=8, progress=False).generate(
        prompts, SamplingParams(n=2, temperature=0.0, max_new_tokens=32, seed=0))
    same, prefix = 0, []
    for p, row in zip(prompts, ours):
        with torch.inference_mode():
            ref = model.generate(torch.tensor([p], device=device), do_sample=False, max_new_tokens=32)[
                0, len(p) :
            ].tolist()
        mine = row[0].token_ids
        same += mine == ref[: len(mine)]
        prefix.append(next((i for i, (a, b) in enumerate(zip(mine, ref)) if a != b), min(len(mine), len(ref))))
    rows["greedy_identical"] = f"{same}/{len(prompts)}"
    rows["greedy_common_prefix"] = prefix
    return rows


@step("sampling_cuda_graphs")
def sampling_cuda_graphs(theta0: Path, device: str, rows: list[int], max_new: int, repeats: int) -> dict:
    """The CUDA-graph decode path (``sampling.cuda_graphs``) against ``generate`` and the eager decode loop, in bf16:
    a table of tokens/s at each row count (alternated rounds, medians), then its greedy output against
    ``generate``'s one prompt at a time, and its samples with graphs against the same static cache run eagerly."""
    import torch
    from sampling_bench import arithmetic_prompts, hf_generate, make_sampler, measure, print_table, summary

    from itermerge.checkpoint import load_model, load_tokenizer
    from itermerge.sampling import SamplingParams
    from itermerge.tokenization import stop_token_ids

    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model, tokenizer = load_model(theta0, dtype=dtype, device=device), load_tokenizer(theta0)
    eos, k, sides = list(stop_token_ids(model, tokenizer)), 8, ["generate", "graphs", "eager"]
    warm = arithmetic_prompts(tokenizer, 2, seed=1)
    hf_generate(model, tokenizer, warm, 2, 4, eos)
    records = measure(model, tokenizer, eos, rows, sides, k=k, chunks=2, max_new=max_new, repeats=repeats)
    table = summary(records)
    print(f"\n{torch.cuda.get_device_name() if device.startswith('cuda') else device}, {dtype}, K={k}, "
          f"max_new_tokens={max_new}, 2 batches of prompts, median of {repeats} alternated rounds\n", flush=True)
    print_table(table, sides, k, chunks=2)
    out: dict[str, object] = {"table": table}
    sampler = make_sampler(model, tokenizer, 8, "graphs")
    out["static_decoding"], out["static_unsupported"] = sampler.static_decoding, sampler.static_unsupported
    prompts = arithmetic_prompts(tokenizer, 8, seed=3)
    greedy = sampler.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=32))
    same, prefix = 0, []
    for p, (mine,) in zip(prompts, greedy):
        with torch.inference_mode():
            ref = model.generate(torch.tensor([p], device=device), do_sample=False, max_new_tokens=32)
        ref = ref[0, len(p) :].tolist()
        same += mine.token_ids == ref[: len(mine.token_ids)]
        prefix.append(next((i for i, (a, b) in enumerate(zip(mine.token_ids, ref)) if a != b), len(mine.token_ids)))
    out["greedy_identical_to_generate"], out["greedy_common_prefix"] = f"{same}/{len(prompts)}", prefix
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=32, seed=5)
    graphed = sampler.generate(prompts, params)
    if sampler.static_kv is not None:
        sampler.static_kv.use_graphs = False
        out["graphs_equal_eager_static_step"] = sampler.generate(prompts, params) == graphed
        out["graphs_captured"] = len(sampler.static_kv.graphs)
    if device.startswith("cuda"):
        out["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def weights(path: Path) -> dict[str, np.ndarray]:
    from itermerge.checkpoint import CheckpointReader
    from itermerge.checkpoint.dtypes import to_float32

    reader = CheckpointReader(path)
    try:
        out = {}
        for name in reader.keys():  # noqa: SIM118 - a reader, not a dict
            raw = reader.read(name)
            out[name] = to_float32(raw, reader.dtype(name), np.empty(raw.shape, np.float32)).copy()
        out["__dtype__"] = reader.dtype(reader.keys()[0])
        return out
    finally:
        reader.close()


def compare(before: dict, after: dict) -> dict:
    names = [n for n in before if n != "__dtype__"]
    moved = sum(int((before[n] != after[n]).sum()) for n in names)
    total = sum(before[n].size for n in names)
    return {"saved_dtype": after["__dtype__"], "moved_fraction": round(moved / total, 4),
            "max_abs_change": float(max(np.abs(after[n] - before[n]).max() for n in names)),
            "finite": bool(all(np.isfinite(after[n]).all() for n in names))}


def run_iterate(cmd: list[str], run_dir: Path, theta0: Path, log: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1", DS_ACCELERATOR="cuda")
    with log.open("w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=240)
    tail = log.read_text()[-3000:]
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {tail}")
    base = weights(theta0)
    out: dict[str, object] = {}
    prev = base
    for t in (1, 2):
        now = weights(run_dir / f"iter_{t:02d}" / "model")
        metrics = json.loads((run_dir / f"iter_{t:02d}" / "metrics.json").read_text())
        out[f"theta{t}"] = {
            "vs_theta0": compare(base, now),
            "vs_previous": compare(prev, now),
            **{
                k: metrics.get(k)
                for k in ("pairs", "loss", "accuracy", "sampling_tokens_per_second", "tokens_per_s", "wall_s")
            },
        }
        prev = now
    return out


@step("iterate_one_gpu")
def iterate_one_gpu(config: Path, work: Path, theta0: Path) -> dict:
    cmd = [sys.executable, "-m", "itermerge.cli", "iterate", str(config), "--run-dir", str(work / "plain")]
    return run_iterate(cmd, work / "plain", theta0, work / "plain.log")


@step("iterate_zero3")
def iterate_zero3(config: Path, work: Path, theta0: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "examples/accelerate_zero3.yaml"),
        "--num_processes",
        "1",
        "-m",
        "itermerge.cli",
        "iterate",
        str(config),
        "--run-dir",
        str(work / "zero3"),
    ]
    out = run_iterate(cmd, work / "zero3", theta0, work / "zero3.log")
    # the same samples and pairs as the one-GPU run? then the two θ1 updates should point the same way
    same_pairs = (work / "plain/iter_01/pairs.jsonl").read_bytes() == (work / "zero3/iter_01/pairs.jsonl").read_bytes()
    out["same_pairs_as_one_gpu"] = same_pairs
    base = weights(theta0)
    names = [n for n in base if n != "__dtype__"]
    for t in (1, 2):
        a, b = weights(work / f"plain/iter_0{t}/model"), weights(work / f"zero3/iter_0{t}/model")
        da = np.concatenate([(a[n] - base[n]).ravel() for n in names])
        db = np.concatenate([(b[n] - base[n]).ravel() for n in names])
        out[f"theta{t}_minus_theta0_cosine_vs_one_gpu"] = float(
            da @ db / (np.linalg.norm(da) * np.linalg.norm(db) + 1e-30)
        )
        out[f"theta{t}_minus_theta0_norm_ratio"] = float(np.linalg.norm(db) / (np.linalg.norm(da) + 1e-30))
    return out


RUN_EXTRA = """\
evaluation: {{max_new_tokens: 32, batch_size: 256, accuracy: {{sampling: greedy}},
             reward: {{sampling: greedy, samples: 1}}, kl: {{samples: 1}}}}
search: {{lams: [0.0, 0.5], alphas: [0.0, 0.5], at: []}}
studies: {{alpha_study: true, alphas: [0.0, 0.5, 1.0], accuracy_matrix: true, ensemble: true,
          lambda_study: true, prompts: 8, n: 2}}
"""


@step("run_one_gpu")
def run_one_gpu(config: Path, work: Path, theta0: Path) -> dict:
    """`itermerge run` end to end on one GPU (T = 2, a 2×2 search, the test, every study, the report): each
    stage's wall time and the peak device memory torch held during it (0 or absent would mean CPU work)."""
    run_config = work / "gpu_run.yaml"
    run_config.write_text(config.read_text() + RUN_EXTRA.format())
    run_dir = work / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    log = work / "run.log"
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "itermerge.cli", "run", str(run_config), "--run-dir",
                               str(run_dir)], env=env, stdout=f, stderr=subprocess.STDOUT, timeout=540)
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {log.read_text()[-3000:]}")
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    table = {}
    for name, record in stages.items():
        shares = record.get("shards") or [record]
        peaks = [s.get("device_peak_gib") for s in shares if s.get("device_peak_gib") is not None]
        table[name] = {"seconds": round(sum(s.get("seconds", 0.0) for s in shares), 2),
                       "device_peak_gib": max(peaks) if peaks else None}
    no_gpu = [n for n, r in table.items() if not r["device_peak_gib"] and not n.endswith(("/pairs", "/metrics"))]
    test = json.loads((run_dir / "search" / "test.json").read_text())
    return {"wall_s": round(time.perf_counter() - start, 1), "stages": table,
            "stages_without_device_memory": no_gpu, "report": (run_dir / "report.md").exists(),
            "test_models": [m["name"] for m in test["models"]]}


REAL_PATH = """\
name: gpu-check-real-path
seed: 0
iterations: 2
model: {{path: {theta0}, device: {device}, dtype: {dtype}}}
prompts: {{source: task, task: arithmetic, per_iteration: 32, dev: 8, test: 8, max_prompt_length: 256}}
sampling: {{backend: vllm, n: 4, temperature: 1.0, max_new_tokens: 32, batch_size: 128,
           gpu_memory_utilization: {utilization}, vllm_options: {{enforce_eager: {eager}}}}}
scorer: {{type: reward_model, path: {judge}, batch_size: 8}}
dpo: {{learning_rate: 5.0e-7, global_batch_size: {batch}, micro_batch_size: 2, warmup_ratio: 0.1,
       max_length: 320, max_prompt_length: 256}}
evaluation: {{max_new_tokens: 32, batch_size: 64}}
search: {{lams: {lams}, alphas: [0.5]}}
studies: {{alpha_study: false, accuracy_matrix: true, ensemble: false, lambda_study: false, prompts: 8, n: 2}}
"""


def make_armorm_judge(tokenizer_dir: Path, out: Path, layers: int) -> dict:
    """A random ArmoRM (``LlamaForRewardModelWithGating``: Llama-3-8B's widths, 19 objectives, a 3-layer gating MLP
    of 1024) with ``layers`` decoder layers (32 is ArmoRM's), on θ0's tokenizer, its gating marker the chat
    template's assistant turn. Written as published (config.json + safetensors), in bf16."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from itermerge.labeling.armorm import ArmoRM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    user = [{"role": "user", "content": "x"}]
    turn = tok.apply_chat_template(user, tokenize=False)
    header = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)[len(turn):]
    # the user turn's end and the assistant header, as ArmoRM's Llama-3 marker is
    pattern = tok.encode(turn[turn.rindex(tok.eos_token):] + header, add_special_tokens=False)
    config = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                  num_hidden_layers=layers, vocab_size=len(tok), max_position_embeddings=8192, rms_norm_eps=1e-5,
                  rope_theta=500000.0, tie_word_embeddings=False, architectures=["LlamaForRewardModelWithGating"],
                  model_type="llama", num_objectives=19, gating_hidden_dim=1024, gating_n_hidden=3,
                  gating_temperature=10, gating_token_pattern=pattern, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = ArmoRM(LlamaConfig(**config), gating_pattern=tuple(pattern)).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(out)
    return {"parameters": sum(p.numel() for p in model.parameters()), "gating_pattern": pattern}


def planned(config: Path, gpus: int, device_bytes: float | None) -> dict[str, float]:
    """``itermerge plan``'s per-device peak of each stage, GiB."""
    from itermerge.config import load_config
    from itermerge.plan import plan

    return {s.name: round(s.device_bytes / 2**30, 3) for s in plan(load_config(config), gpus, device_bytes).stages}


@step("real_path")
def real_path(tokenizer_dir: Path, work: Path, theta0: Path, device: str, processes: int, judge_layers: int,
              dry_run: bool) -> dict:
    """`itermerge run` with the vLLM backend and an ArmoRM-shaped judge on ``processes`` processes (a grid of one
    point fewer than processes when there are several), each stage's measured device memory against the plan's.

    Measured: the most device memory torch held in the run's processes (the manifest's ``device_peak_gib``) and the
    device's used memory after the run; the vLLM engine runs in a process of its own per rank, so its share is the
    plan's ``gpu_memory_utilization × total``, not in torch's figure. On a CPU (``--device cpu``, vLLM's CPU build)
    the run is the same and there is no device memory to compare."""
    import torch

    judge = work / "judge"
    built = make_armorm_judge(tokenizer_dir, judge, judge_layers)
    total = torch.cuda.mem_get_info()[1] if device == "cuda" and torch.cuda.is_available() else None
    config = work / "real_path.yaml"
    config.write_text(REAL_PATH.format(
        theta0=theta0, device=device, dtype="bfloat16" if device == "cuda" else "float32", judge=judge,
        utilization=0.3, eager=str(device != "cuda").lower(), batch=2 * processes,
        lams="[0.5]" if processes > 1 else "[0.0, 0.5]"))
    plan = planned(config, processes, total)
    cli = ["-m", "itermerge.cli", "run", str(config), "--run-dir", str(work / "real_run")]
    if processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *cli]
    else:
        cmd = [sys.executable, *cli]
    if dry_run:
        return {"judge": built, "plan_gib": plan, "command": " ".join(cmd)}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1", **({"ACCELERATE_USE_CPU": "true"} if device != "cuda" else {}))
    log = work / "real_path.log"
    with log.open("w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=480)
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {log.read_text()[-3000:]}")
    stages = json.loads((work / "real_run" / "manifest.json").read_text())["stages"]
    table = {}
    for name, record in stages.items():
        shares = record.get("shards") or [record]
        peaks = [s.get("device_peak_gib") for s in shares if s.get("device_peak_gib") is not None]
        table[name] = {"measured_gib": max(peaks) if peaks else None, "items": [s.get("items") for s in shares],
                       "planned_gib": next((v for k, v in plan.items() if name.endswith(k)), None)}
    return {"judge": built, "plan_gib": plan, "stages": table, "processes": processes,
            "device_used_gib_after": round((total - torch.cuda.mem_get_info()[0]) / 2**30, 3) if total else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu_check"))
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--skip-zero3", action="store_true")
    ap.add_argument("--skip-sampling", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to try this script out")
    ap.add_argument("--graphs-only", action="store_true",
                    help="only the CUDA-graph sampling measurement (~2-3 min on an H100/H200), no iterate runs")
    ap.add_argument("--graph-rows", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--graph-max-new-tokens", type=int, default=64)
    ap.add_argument("--graph-repeats", type=int, default=2)
    ap.add_argument("--run-only", action="store_true",
                    help="only `itermerge run` on one GPU (T = 2, 2×2 search, test, studies, report), per-stage "
                         "wall time and peak device memory (~3-5 min)")
    ap.add_argument("--real-path", action="store_true",
                    help="only `itermerge run` with the vLLM backend and an ArmoRM-shaped judge on every process")
    ap.add_argument("--processes", type=int, default=None, help="--real-path: processes (default: the GPUs, or 1)")
    ap.add_argument("--judge-layers", type=int, default=32, help="--real-path: the judge's decoder layers (32: 8B)")
    ap.add_argument("--dry-run", action="store_true", help="--real-path: write θ0, the judge, the config and the "
                    "plan's numbers; run nothing")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    theta0 = args.work / "theta0"
    config = args.work / "gpu_check.yaml"
    config.write_text(CONFIG.format(theta0=theta0, device=args.device))
    try:
        environment()
        make_theta0(args.tokenizer, theta0)
        if args.graphs_only:
            sampling_cuda_graphs(theta0, args.device, args.graph_rows, args.graph_max_new_tokens, args.graph_repeats)
            return
        if args.run_only:
            run_one_gpu(config, args.work, theta0)
            return
        if args.real_path:
            import torch

            processes = args.processes or max(1, torch.cuda.device_count() if args.device == "cuda" else 1)
            real_path(args.tokenizer, args.work, theta0, args.device, processes, args.judge_layers, args.dry_run)
            return
        if not args.skip_sampling:
            sampling(theta0, args.batches, args.max_new_tokens, args.device)
            sampling_cuda_graphs(theta0, args.device, args.graph_rows, args.graph_max_new_tokens, args.graph_repeats)
        iterate_one_gpu(config, args.work, theta0)
        if not args.skip_zero3:
            iterate_zero3(config, args.work, theta0)
    finally:
        (args.out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))
        for log in ("plain.log", "zero3.log", "run.log", "real_path.log", "real_path.yaml"):
            if (args.work / log).exists():
                shutil.copy(args.work / log, args.out / log)


if __name__ == "__main__":
    main()
