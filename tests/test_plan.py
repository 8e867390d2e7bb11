"""itermerge plan: per-stage device memory from model configs alone (Llama-3-8B + ArmoRM and Qwen2-7B shapes, written
here as config.json files: nothing is downloaded), checked by hand, and a config that cannot fit refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from itermerge.cli import main
from itermerge.config import from_dict
from itermerge.errors import ItermergeError
from itermerge.plan import GiB, Shapes, parse_memory, plan

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)
QWEN2_7B = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False)


def config_dir(path: Path, config: dict) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("configs")
    armorm = {**LLAMA3_8B, "architectures": ["LlamaForRewardModelWithGating"], "num_objectives": 19}
    return {"llama": config_dir(root / "llama3-8b", LLAMA3_8B), "armorm": config_dir(root / "armorm", armorm),
            "qwen": config_dir(root / "qwen2-7b", QWEN2_7B)}


def example(name: str, policy: str, judge: str) -> dict:
    cfg = yaml.safe_load((ROOT / "examples" / name).read_text())
    cfg["model"]["path"], cfg["scorer"]["path"] = policy, judge
    cfg["evaluation"]["reward"]["scorer"]["path"] = judge
    return cfg


def test_parameters_are_counted_from_the_config_alone(models):
    llama, qwen = Shapes.of(models["llama"]), Shapes.of(models["qwen"])
    assert llama.params == 8_030_261_248 and qwen.params == 7_615_616_512  # the published sizes
    assert Shapes.of(models["armorm"], backbone_only=True).params == 8_030_261_248 - 128256 * 4096  # no LM head
    assert (llama.layers, llama.kv_width, llama.vocab) == (32, 8 * 128, 128256)
    # a decoder layer: q, o 4096²; k, v 4096·1024; MLP 3·4096·14336; two norms
    assert llama.largest_layer == 2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096


@pytest.mark.parametrize("name", ["llama3-8b-armorm.yaml", "qwen2-7b-armorm.yaml"])
def test_the_examples_fit_8_gpus_of_80_gb_under_zero3(models, name, capsys):
    policy = models["llama"] if name.startswith("llama") else models["qwen"]
    cfg = from_dict(example(name, policy, models["armorm"]))
    result = plan(cfg, gpus=8, device_bytes=80 * GiB, zero_stage=3)
    assert result.problems() == []
    stages = {s.name: s for s in result.stages}
    assert list(stages) == ["sample", "score", "reference", "train", "search", "test"]
    p = Shapes.of(policy).params
    assert stages["train"].parts["AdamW state"] == 16 * p / 8  # float32 master, gradient, two moments, sharded
    assert stages["reference"].parts["θ0"] == 2 * p  # bf16
    assert stages["sample"].parts["vLLM engine"] == cfg.sampling.gpu_memory_utilization * 80 * GiB
    assert result.host_bytes == 12 * p  # θ0, θ̄, θT in float32, once per host
    path = ROOT / "examples" / name
    assert main(["plan", str(path), "--gpus", "8", "--gpu-memory", "80GiB", "--zero-stage", "3",
                 "--set", f"model.path={policy}", "--set", f"scorer.path={models['armorm']}",
                 "--set", f"evaluation.reward.scorer.path={models['armorm']}"]) == 0
    out = capsys.readouterr().out
    assert "| train |" in out and "does not fit" not in out and "Host page cache, shared by the 8 processes" in out


def test_a_config_that_cannot_fit_is_refused_by_stage_and_numbers(models):
    cfg = from_dict(example("llama3-8b-armorm.yaml", models["llama"], models["armorm"]))
    one = plan(cfg, gpus=1, device_bytes=80 * GiB, zero_stage=0)  # DDP on one GPU: 16 bytes a parameter
    problems = one.problems()
    assert any(p.startswith("stage train needs 1") and "AdamW state 119.7" in p for p in problems), problems
    eager = from_dict({**example("llama3-8b-armorm.yaml", models["llama"], models["armorm"]),
                       "sampling": {"backend": "vllm", "gpu_memory_utilization": 0.1}})
    assert any("the vLLM engine gets 8.0 GiB" in p for p in plan(eager, 8, 80 * GiB, 3).problems())
    with pytest.raises(ItermergeError, match=r"plan: gpus = 0"):
        plan(cfg, gpus=0)


def test_the_hf_sampler_needs_its_kv_cache_by_hand(models):
    """sampling.backend hf: the policy in bf16 plus a KV cache of rows × tokens × 2·layers·kv_width·2 bytes."""
    cfg = from_dict({**example("llama3-8b-armorm.yaml", models["llama"], models["armorm"]),
                     "sampling": {"backend": "hf", "batch_size": 64, "max_new_tokens": 1024}})
    sample = plan(cfg, gpus=8, device_bytes=80 * GiB, zero_stage=3).stages[0]
    tokens = 1024 + 1024  # max_prompt_length + max_new_tokens
    assert sample.parts["KV cache"] == 64 * tokens * 2 * 32 * 1024 * 2  # 16 GiB
    assert sample.parts["policy"] == 2 * Shapes.of(models["llama"]).params


def test_memory_sizes_parse():
    assert parse_memory("80GiB") == 80 * GiB and parse_memory("141GB") == 141e9 and parse_memory("80") == 80 * GiB
    with pytest.raises(ItermergeError, match=r"--gpu-memory 'lots'"):
        parse_memory("lots")


def test_preflight_refuses_on_a_gpu_too_small(models, monkeypatch):
    """On CUDA, preflight plans against this process's GPU (WORLD_SIZE processes, ZeRO-3 when accelerate says so):
    one 24 GiB GPU cannot train Llama-3-8B, eight 80 GiB GPUs under ZeRO-3 can."""
    import torch

    from itermerge.plan import check_fits

    class Props:
        total_memory = 24 * GiB

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props)
    cfg = from_dict(example("llama3-8b-armorm.yaml", models["llama"], models["armorm"]))
    refused = check_fits(cfg)
    assert "stage train needs" in refused and "a device has 24.0 GiB" in refused and "itermerge plan" in refused
    Props.total_memory = 80 * GiB
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert check_fits(cfg) is None
