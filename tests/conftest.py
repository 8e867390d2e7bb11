"""Shared fixtures: tiny Llama checkpoints built from configs, offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# model.dtype auto measures on a CPU whether bf16 or fp32 is faster, and the answer differs between CPUs: the tests
# take float32 as given (this variable, inherited by the processes they launch) unless one sets it or measures.
os.environ.setdefault("ITERMERGE_CPU_DTYPE", "float32")

TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def tiny_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(TINY, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_model(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides))
    model.eval()
    return model


def adam_rounding_atol(cfg, steps: int, pairs, dtype=None) -> float:
    """How far apart, element by element, two trainings may end that differ only in the order of their float sums.

    A sum of n terms moves by at most n·ε·max|g| when its order changes (max|g| ≤ the clip norm, cfg.max_grad_norm),
    AdamW divides a gradient difference by at most its ε (cfg.adam_eps), and the steps add up:
    lr · steps · n · ε · clip / adam_eps, with n the tokens of ``pairs`` (at least a step's: the longest sum of a
    weight gradient). Derived, not tuned to a CPU: it holds for any kernel set. In float64 it is ~1e-7 at lr 1e-2
    where a wrong update moves weights by ~lr; in float32 it would exceed AdamW's step itself, so the trainings
    compared against it run in float64 (an element with a near-zero gradient gets an O(lr) float32 step).
    """
    n = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) + 2 for p in pairs)
    eps = torch.finfo(dtype or torch.float64).eps
    return cfg.learning_rate * steps * n * eps * cfg.max_grad_norm / cfg.adam_eps


def rmsnorm_float64_forward(self, hidden):
    """transformers' Llama RMSNorm rounds to float32 inside whatever the model's dtype; for a float64 reference
    computation this one stays in float64 (as the lean RMSNorm does), so no float32 rounding is left in the model."""
    wide = hidden if hidden.dtype == torch.float64 else hidden.to(torch.float32)
    normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * normed.to(hidden.dtype)


@pytest.fixture()
def float64_rmsnorm(monkeypatch):
    """``rmsnorm_float64_forward`` as Llama's RMSNorm for the test."""
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rmsnorm_float64_forward)


def tiny_tokenizer():
    """A character-level fast tokenizer with a ChatML template, built offline (ids < 128)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "\n"] + [chr(c) for c in range(32, 127)]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": []})
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def save_tiny(path: Path, model, tokenizer=None) -> Path:
    model.save_pretrained(path)
    (tokenizer or tiny_tokenizer()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory) -> list[Path]:
    """θ0..θ3: θ0 a seeded tiny Llama, θt = θ0 plus seeded noise (checkpoint dirs with tokenizer)."""
    root = tmp_path_factory.mktemp("ckpts")
    base = tiny_model(0)
    paths = [save_tiny(root / "theta0", base)]
    for t in range(1, 4):
        m = tiny_model(0)
        g = torch.Generator().manual_seed(100 + t)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * t * torch.randn(p.shape, generator=g))
        paths.append(save_tiny(root / f"theta{t}", m))
    return paths


def read_json(path: Path):
    return json.loads(Path(path).read_text())
