"""ArmoRM written natively: a tiny checkpoint with the published names, its score derived by hand, its errors."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, tiny_tokenizer
from safetensors.torch import load_file, save_file

from itermerge.errors import ItermergeError
from itermerge.labeling import RewardModelScorer
from itermerge.labeling.armorm import ArmoRM, GatingNetwork, armorm_scores, preference_score
from itermerge.records import Prompt

pytestmark = pytest.mark.numeric  # run again under a second kernel set: make test, ATEN_CPU_CAPABILITY=avx2


def chars(text: str) -> list[int]:
    """Ids of the tiny character-level tokenizer: a printable character c has id ord(c) - 27."""
    return [ord(c) - 27 for c in text]


# The ChatML counterpart of Llama-3's "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n":
# "<|im_end|>\n<|im_start|>assistant\n" in the tiny tokenizer (<|im_end|> = 2, "\n" = 4, <|im_start|> = 1).
MARKER = [2, 4, 1, *chars("assistant"), 4]
K, TEMPERATURE, LOGIT_SCALE = 4, 2.0, 1.5
# Verbosity debiasing as in stage-2_train.py: the identity, minus penalties p in the verbosity row (here 3).
TRANSFORM = torch.eye(K)
TRANSFORM[3, :] -= torch.tensor([0.25, 0.5, 0.125, 1.0])
CONFIG = dict(
    TINY,  # the tiny Llama backbone of conftest, untied as ArmoRM's is
    architectures=["LlamaForRewardModelWithGating"],
    auto_map={"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"},
    model_type="llama",
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=None,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    num_objectives=K,
    gating_temperature=TEMPERATURE,
    gating_hidden_dim=8,
    gating_n_hidden=2,
    gating_token_pattern=MARKER,
    transformers_version="4.40.0",
)
# The failure ArmoRM's remote code meets under transformers 5 (and 4.57), reproduced without the 8B model.
BROKEN_REMOTE_CODE = "from transformers.models.llama.modeling_llama import LLAMA_INPUTS_DOCSTRING\n"


def conversation(prompt: str, reply: str) -> list[int]:
    """"<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n{reply}<|im_end|>\\n" written out."""
    return [1, *chars("user"), 4, *chars(prompt), *MARKER, *chars(reply), 2, 4]


def write_armorm(path: Path, **config_overrides) -> dict[str, torch.Tensor]:
    """A random ArmoRM checkpoint laid out as published: two safetensors shards, an index, config.json, and a
    modeling_custom.py that cannot import (it must never run). Returns the tensors by name."""
    from transformers import LlamaConfig, LlamaModel

    config = dict(CONFIG, **config_overrides)
    torch.manual_seed(0)
    backbone = {f"model.{k}": v for k, v in LlamaModel(LlamaConfig(**config)).state_dict().items()}
    g = torch.Generator().manual_seed(1)
    heads = {
        "regression_layer.weight": torch.randn(K, 32, generator=g),
        "gating.layers.0.weight": torch.randn(8, 32, generator=g),
        "gating.layers.0.bias": torch.randn(8, generator=g),
        "gating.layers.1.weight": torch.randn(8, 8, generator=g),
        "gating.layers.1.bias": torch.randn(8, generator=g),
        "gating.layers.2.weight": torch.randn(K, 8, generator=g),
        "gating.layers.2.bias": torch.randn(K, generator=g),
        "gating.logit_scale": torch.tensor([LOGIT_SCALE]),
        "reward_transform_matrix": TRANSFORM.clone(),
    }
    path.mkdir(parents=True, exist_ok=True)
    shards = {"model-00001-of-00002.safetensors": backbone, "model-00002-of-00002.safetensors": heads}
    for file, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, path / file, metadata={"format": "pt"})
    weight_map = {name: file for file, tensors in shards.items() for name in tensors}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    (path / "modeling_custom.py").write_text(BROKEN_REMOTE_CODE)
    tiny_tokenizer().save_pretrained(path)
    return {**backbone, **heads}


@pytest.fixture(scope="module")
def tiny_armorm(tmp_path_factory):
    path = tmp_path_factory.mktemp("armorm")
    tensors = write_armorm(path)
    return path, tensors, ArmoRM.from_pretrained(path, device="cpu")


def hand_score(tensors: dict[str, torch.Tensor], ids: list[int]) -> tuple[float, torch.Tensor]:
    """(s, r) from the module docstring, layer by layer in plain torch; h from a fresh transformers LlamaModel."""
    from transformers import LlamaConfig, LlamaModel

    backbone = LlamaModel(LlamaConfig(**CONFIG)).eval()
    backbone.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    with torch.no_grad():
        h = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]  # (T, H)
    j = max(i for i in range(len(ids)) if ids[i : i + len(MARKER)] == MARKER)
    r = h[-1] @ tensors["regression_layer.weight"].T  # (K,)
    x = F.relu(h[j] @ tensors["gating.layers.0.weight"].T + tensors["gating.layers.0.bias"])
    x = F.relu(x @ tensors["gating.layers.1.weight"].T + tensors["gating.layers.1.bias"])
    z = x @ tensors["gating.layers.2.weight"].T + tensors["gating.layers.2.bias"]  # (K,)
    gate = LOGIT_SCALE * torch.softmax(z / TEMPERATURE, dim=-1)
    return float(((r @ TRANSFORM) * gate).sum()), r


# --- the formula -------------------------------------------------------------------------------------


def test_preference_score_by_hand():
    """r = (3, 2, 1, 4), T = I with verbosity row 3 = (-0.25, -0.5, -0.125, 0):
    r T = (3 - 4·0.25, 2 - 4·0.5, 1 - 4·0.125, 0) = (2, 0, 0.5, 0);
    g = (0.5, 0.25, 0.25, 0) → s = 0.5·2 + 0.25·0 + 0.25·0.5 + 0 = 1.125."""
    s = preference_score(torch.tensor([[3.0, 2.0, 1.0, 4.0]]), torch.tensor([[0.5, 0.25, 0.25, 0.0]]), TRANSFORM)
    assert s.tolist() == [1.125]


def test_gating_with_equal_logits_is_uniform_times_the_logit_scale():
    """A zero last layer gives z = 0, softmax = 1/K: g = 1.5 / 4 = 0.375 for every objective and input."""
    gate = GatingNetwork(32, K, hidden_dim=8, n_hidden=2, temperature=TEMPERATURE)
    with torch.no_grad():
        gate.layers[-1].weight.zero_()
        gate.layers[-1].bias.zero_()
        gate.logit_scale.fill_(LOGIT_SCALE)
    assert gate(torch.randn(3, 32)).tolist() == [[0.375] * K] * 3


# --- the checkpoint ----------------------------------------------------------------------------------


def test_loads_every_published_tensor_by_name(tiny_armorm):
    _, tensors, model = tiny_armorm
    assert set(model.state_dict()) == set(tensors)
    for name, value in model.state_dict().items():
        assert torch.equal(value, tensors[name]), name
    assert model.gating_pattern == tuple(MARKER) and model.gating.temperature == TEMPERATURE
    assert not model.reward_transform_matrix.requires_grad


def test_score_matches_the_formula_written_out(tiny_armorm):
    _, tensors, model = tiny_armorm
    ids = conversation("hi", "a reply")
    expected, r = hand_score(tensors, ids)
    out = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    assert out.score.tolist() == pytest.approx([expected], abs=1e-5)
    assert out.rewards[0].tolist() == pytest.approx(r.tolist(), abs=1e-5)
    assert out.gating_weights.sum().item() == pytest.approx(LOGIT_SCALE, abs=1e-6)


def test_gate_reads_the_prompt_only(tiny_armorm):
    """Two replies to one prompt: the same gating weights (h at the marker), different rewards (h at the end)."""
    _, _, model = tiny_armorm
    a, b = conversation("hi", "yes"), conversation("hi", "no!")
    out = model(torch.tensor([a, b]), torch.ones(2, len(a), dtype=torch.long))
    assert torch.allclose(out.gating_weights[0], out.gating_weights[1], atol=1e-6)
    assert not torch.allclose(out.rewards[0], out.rewards[1], atol=1e-3)


def test_padding_does_not_change_a_score(tiny_armorm):
    _, _, model = tiny_armorm
    ids = conversation("hi", "a reply")
    alone = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).score
    padded = torch.tensor([ids + [0] * 5])
    mask = torch.tensor([[1] * len(ids) + [0] * 5])
    assert model(padded, mask).score.tolist() == pytest.approx(alone.tolist(), abs=1e-5)


def test_batched_scores_equal_one_by_one_in_input_order(tiny_armorm):
    _, _, model = tiny_armorm
    replies = ["a much longer reply than the others", "yo", "", "mid-size reply", "yo!"]
    sequences = [conversation(p, r) for p, r in zip(["hi", "ok", "hi", "what?", "ok"], replies)]
    one_by_one = armorm_scores(model, sequences, pad_id=0, batch_size=1)
    batched = armorm_scores(model, sequences, pad_id=0, batch_size=3)
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    direct = [model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).score.item() for s in sequences]
    assert one_by_one == pytest.approx(direct, abs=1e-5)
    assert len({round(s, 5) for s in one_by_one}) == len(sequences)  # the sequences really are told apart


def test_dtype_defaults_to_float32_on_cpu_and_keeps_heads_in_float32(tiny_armorm):
    path, _, model = tiny_armorm
    assert model.model.embed_tokens.weight.dtype == torch.float32
    half = ArmoRM.from_pretrained(path, dtype=torch.bfloat16, device="cpu")
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert half.regression_layer.weight.dtype == half.gating.logit_scale.dtype == torch.float32
    ids = conversation("hi", "a reply")
    mask = torch.ones(1, len(ids), dtype=torch.long)
    with torch.no_grad():
        full, low = model(torch.tensor([ids]), mask).score, half(torch.tensor([ids]), mask).score
    assert low.dtype == torch.float32 and low.item() == pytest.approx(full.item(), abs=0.1)


# --- the scorer hook ---------------------------------------------------------------------------------


def test_reward_model_scorer_loads_armorm_natively_even_with_remote_code_allowed(tiny_armorm):
    """The checkpoint's modeling_custom.py cannot import: a score at all proves it never ran."""
    path, tensors, _ = tiny_armorm
    scorer = RewardModelScorer(str(path), trust_remote_code=True, batch_size=2, device="cpu")
    assert isinstance(scorer.model, ArmoRM)
    prompt = Prompt("p", [{"role": "user", "content": "hi"}])
    assert scorer.encode(prompt, "a reply") == conversation("hi", "a reply")
    expected, _ = hand_score(tensors, conversation("hi", "a reply"))
    assert scorer.score([prompt, prompt], ["a reply", "no"])[0] == pytest.approx(expected, abs=1e-5)


@pytest.fixture
def remote_code_sandbox(tmp_path, monkeypatch):
    """transformers copies remote code to HF_MODULES_CACHE and imports it from sys.path: keep both in tmp_path."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("transformers_modules"):
            del sys.modules[name]


def test_remote_code_that_fails_to_import_is_named(tmp_path, remote_code_sandbox):
    import transformers

    path = tmp_path / "custom_rm"
    auto_map = {"AutoModelForSequenceClassification": "modeling_custom.LlamaForCustomReward"}
    write_armorm(path, architectures=["LlamaForCustomReward"], auto_map=auto_map)
    with pytest.raises(ItermergeError, match=(
        r"reward model '.*custom_rm': its remote code \(auto_map .*modeling_custom.LlamaForCustomReward.*\) failed "
        rf"to import under transformers {re.escape(transformers.__version__)}.*"
        r"ImportError: cannot import name 'LLAMA_INPUTS_DOCSTRING'.*"
        r"Pin transformers .*transformers==4.40.0.*or use a native implementation")):
        RewardModelScorer(str(path), trust_remote_code=True, device="cpu")


def test_remote_code_is_not_imported_without_trust(tmp_path):
    path = tmp_path / "custom_rm"
    auto_map = {"AutoModelForSequenceClassification": "modeling_custom.LlamaForCustomReward"}
    write_armorm(path, architectures=["LlamaForCustomReward"], auto_map=auto_map)
    model = RewardModelScorer(str(path), device="cpu").model  # a plain Llama classifier: the auto_map is ignored
    assert type(model).__name__ == "LlamaForSequenceClassification"


# --- errors ------------------------------------------------------------------------------------------


def test_wrong_architecture_or_a_missing_directory_is_named(tmp_path):
    with pytest.raises(ItermergeError, match=r"ArmoRM checkpoint '.*no_rm': not a local directory, and fetching"):
        ArmoRM.from_pretrained(tmp_path / "no_rm", device="cpu")
    (tmp_path / "config.json").write_text(json.dumps(dict(CONFIG, architectures=["LlamaForCausalLM"])))
    with pytest.raises(ItermergeError, match=(
        r"ArmoRM checkpoint '.*': config.json architectures is \['LlamaForCausalLM'\], "
        r"not \['LlamaForRewardModelWithGating'\]; give an ArmoRM")):
        ArmoRM.from_pretrained(tmp_path, device="cpu")


def test_tensors_under_other_names_are_refused(tmp_path, tiny_armorm):
    _, tensors, _ = tiny_armorm
    renamed = {k.replace("regression_layer", "score"): v.contiguous() for k, v in tensors.items()}
    save_file(renamed, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(ItermergeError, match=(
        r"ArmoRM checkpoint '.*': its tensors do not match LlamaForRewardModelWithGating with this config.json "
        r"\(missing \['regression_layer.weight'\], unexpected \['score.weight'\]\)")):
        ArmoRM.from_pretrained(tmp_path, device="cpu")
    assert set(load_file(tmp_path / "model.safetensors")) == set(renamed)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(dict(CONFIG, num_objectives=5)))  # K = 5 against (4, 32)
    with pytest.raises(ItermergeError, match=r"regression_layer.weight: copying a param with shape torch.Size\(\[4, 3"):
        ArmoRM.from_pretrained(tmp_path, device="cpu")


def test_input_errors_are_named(tiny_armorm):
    _, _, model = tiny_armorm
    no_marker = [1, *chars("user"), 4, *chars("hi"), 2, 4]
    with pytest.raises(ItermergeError, match=r"ArmoRM sequences \[1\]: no gating marker \[2, 4, 1, 70, "):
        armorm_scores(model, [conversation("hi", "yo"), no_marker], pad_id=0, batch_size=1)
    ids = conversation("hi", "yo")
    with pytest.raises(ItermergeError, match=r"ArmoRM input row\(s\) \[1\]: no gating marker .* own chat template"):
        model(torch.tensor([ids, no_marker + [0] * (len(ids) - len(no_marker))]),
              torch.tensor([[1] * len(ids), [1] * len(no_marker) + [0] * (len(ids) - len(no_marker))]))
    with pytest.raises(ItermergeError, match=r"ArmoRM attention_mask: rows must be right-padded"):
        model(torch.tensor([[0, 0, *ids]]), torch.tensor([[0, 0] + [1] * len(ids)]))
    with pytest.raises(ItermergeError, match=r"ArmoRM batch_size=0: must be a positive integer"):
        armorm_scores(model, [ids], pad_id=0, batch_size=0)
    with pytest.raises(ItermergeError, match=r"ArmoRM sequences \[1\] are empty"):
        armorm_scores(model, [ids, []], pad_id=0)
