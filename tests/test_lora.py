"""LoRA iterations (dpo.peft) and their exact merge: θ_t = θ0 + Δ1 + … + Δt, so eq. (9) is one adapter of rank Σ r_s."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import save_tiny, tiny_model

from itermerge import iteration
from itermerge.checkpoint import CheckpointReader, load_model, load_tokenizer
from itermerge.checkpoint.chain import ADAPTER_CONFIG, ADAPTER_WEIGHTS, write_chain
from itermerge.cli import main
from itermerge.config import DPOConfig, from_dict
from itermerge.config.dpo import LoraConfig
from itermerge.errors import ItermergeError
from itermerge.logprobs import score_sequences
from itermerge.maths.merge import merge_weights
from itermerge.merging import merge_adapters, merge_checkpoints
from itermerge.merging.lora import chain_adapters
from itermerge.operators import operator
from itermerge.rundir import atomic_dir
from itermerge.training.peft import check_target_modules, train_adapter
from itermerge.training.reference import add_reference_logprobs

pytestmark = pytest.mark.numeric  # run again under a second kernel set: make test, ATEN_CPU_CAPABILITY=avx2

peft = pytest.importorskip("peft")

# Three adapters of different ranks and targets (the second leaves the MLP alone; the third is rank-stabilised).
ADAPTERS = [
    dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    dict(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "o_proj"]),
    dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], use_rslora=True),
]


def _params(path: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(path)
    return {n: reader.get(n).clone() for n in reader}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> dict:
    """θ0, the adapters Δ1..Δ3 (each trained, here drawn, on θ_{t−1}), θ_t as chains, and θ_t as peft merges them."""
    root = tmp_path_factory.mktemp("lora")
    theta0 = save_tiny(root / "theta0", tiny_model(0))
    model = load_model(theta0)
    adapters, chains, by_peft = [], [], []
    for t, kwargs in enumerate(ADAPTERS, start=1):
        wrapped = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
        g = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                if "lora_" in name:  # peft starts B at zero: draw both, as if trained
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
        wrapped.save_pretrained(root / f"adapter{t}")
        adapters.append(root / f"adapter{t}")
        model = wrapped.merge_and_unload()
        by_peft.append({n: p.detach().clone() for n, p in model.named_parameters()})
        with atomic_dir(root / f"theta{t}") as tmp:
            write_chain(tmp, root / f"theta{t}", theta0, adapters)
        chains.append(root / f"theta{t}")
    return {"root": root, "theta0": theta0, "adapters": adapters, "chains": chains, "by_peft": by_peft}


def test_a_chain_reads_as_the_weights_peft_merges(lora_run):
    """θ_t read from θ0 + adapters matches peft's merge_and_unload, and every reader of it gets the same bits."""
    for chain, expected in zip(lora_run["chains"], lora_run["by_peft"]):
        reader = CheckpointReader(chain)
        assert not list(chain.glob("*.safetensors")) and reader.dtype("model.layers.0.self_attn.q_proj.weight") == "F32"
        loaded = dict(load_model(chain).named_parameters())
        for name, want in expected.items():
            whole = reader.get(name)
            torch.testing.assert_close(whole, want, atol=2e-6, rtol=0, msg=name)
            assert torch.equal(loaded[name].detach(), whole), name  # load_model reads through the same reader
            flat, n = whole.reshape(-1).numpy(), reader.numel(name)
            for start, stop in ((0, n), (7, n // 2 + 5), (n // 3, n)):  # any range: the same bits as the whole
                assert np.array_equal(reader.read(name, start, stop), flat[start:stop]), (name, start, stop)
    p0, p1, p3 = (_params(p) for p in (lora_run["theta0"], lora_run["chains"][0], lora_run["chains"][2]))
    assert torch.equal(p1["model.embed_tokens.weight"], p0["model.embed_tokens.weight"])  # not adapted: θ0's
    assert not torch.equal(p3["model.layers.1.mlp.up_proj.weight"], p0["model.layers.1.mlp.up_proj.weight"])
    assert chain_adapters(lora_run["chains"]) == lora_run["adapters"]
    assert chain_adapters([lora_run["chains"][1], lora_run["chains"][0]]) is None  # not one run's prefixes


@pytest.mark.parametrize(
    "given", [{"lam": 0.3, "alpha": 0.4}, {"lam": 0.7, "alpha": -0.2}, {"weights": [0.1, -0.3, 0.9]}]
)
def test_the_adapter_merge_is_the_full_merge(lora_run, tmp_path, given):
    """(λ, α) or explicit k_t: one adapter (rank 2 + 4 + 3) on θ0 equals merge_checkpoints of the materialised θ_t."""
    theta0, adapters, chains = lora_run["theta0"], lora_run["adapters"], lora_run["chains"]
    merged = merge_adapters(theta0, adapters, tmp_path / "adapter", operator("paper", **given), progress=False)
    full = merge_checkpoints(theta0, chains, tmp_path / "full", operator("paper", **given),
                             mean_cache=tmp_path / "mean", progress=False)
    config = json.loads((merged / ADAPTER_CONFIG).read_text())
    assert config["r"] == config["lora_alpha"] == 9 and not config["use_rslora"]  # peft's scale is 1
    assert (merged / ADAPTER_WEIGHTS).exists() and not (merged / "model.safetensors").exists()
    a, b = _params(merged), _params(full)  # the adapter directory reads as θ0 plus the merged adapter
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-6, rtol=1e-5, msg=name)
    record = json.loads((merged / "merge.json").read_text())
    k = given.get("weights") or list(merge_weights(3, given["lam"], given["alpha"]))
    assert record["weights"] == pytest.approx(k) and record["rank"] == 9
    assert record["adapter_coefficients"] == pytest.approx([k[0] + k[1] + k[2], k[1] + k[2], k[2]])
    assert [c["path"] for c in record["checkpoints"]] == [str(p) for p in adapters]
    assert (record["lam"], record["alpha"]) == ((given.get("lam"), given.get("alpha")))


def test_the_merged_adapter_on_theta0_gives_the_full_merge_logits(lora_run, tmp_path):
    """peft loads the merged adapter onto θ0; its logits are those of the full-weight merge (and of `--full`)."""
    theta0, adapters = lora_run["theta0"], [str(a) for a in lora_run["adapters"]]
    inputs = ["merge", "--reference", str(theta0), "--checkpoints", *adapters, "--quiet"]
    common = [*inputs, "--lam", "0.3", "--alpha", "0.4"]
    assert main([*common, "--out", str(tmp_path / "adapter")]) == 0
    assert main([*common, "--out", str(tmp_path / "full"), "--full"]) == 0
    full_by_chains = merge_checkpoints(theta0, lora_run["chains"], tmp_path / "ref",
                                       operator("paper", lam=0.3, alpha=0.4), progress=False)
    ids = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 64, 120, 2]])
    with torch.no_grad():
        on_theta0 = peft.PeftModel.from_pretrained(load_model(theta0), str(tmp_path / "adapter"))(ids).logits
        for other in (tmp_path / "full", full_by_chains, tmp_path / "adapter"):
            torch.testing.assert_close(load_model(other)(ids).logits, on_theta0, atol=1e-5, rtol=0, msg=str(other))
    assert (tmp_path / "full" / "model.safetensors").exists() and not (tmp_path / "full" / ADAPTER_CONFIG).exists()
    assert json.loads((tmp_path / "full" / "merge.json").read_text())["format"] == "full weights"
    # ExPO and EMA are eq. (9) too, so they are adapters as well
    assert main([*inputs, "--method", "expo", "--alpha", "0.5", "--out", str(tmp_path / "expo")]) == 0
    expo = json.loads((tmp_path / "expo" / "merge.json").read_text())
    assert expo["adapter_coefficients"] == pytest.approx([1.5, 1.5, 1.5])  # θ0 + 1.5 (θ3 − θ0): every Δ_s, 1.5×


def test_the_adapter_merge_never_imports_torch(lora_run, tmp_path):
    """`itermerge merge` on adapters, as one adapter and --full, stays numpy-only like the full-checkpoint merge; so
    does reading a chain (θ0 plus adapters) for the streamed merge."""
    import subprocess
    import sys

    adapters, chains = [str(a) for a in lora_run["adapters"]], [str(c) for c in lora_run["chains"]]
    common = f"'--reference', {str(lora_run['theta0'])!r}, '--lam', '0.3', '--alpha', '0.4', '--quiet'"
    code = (
        "import sys; from itermerge.cli import main; "
        f"assert main(['merge', {common}, '--checkpoints', *{adapters!r}, '--out', {str(tmp_path / 'a')!r}]) == 0; "
        f"assert main(['merge', {common}, '--checkpoints', *{adapters!r}, '--full', '--out', {str(tmp_path / 'f')!r}])"
        " == 0; "
        f"assert main(['merge', {common}, '--checkpoints', *{chains!r}, '--out', {str(tmp_path / 'c')!r}]) == 0; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.stdout.strip().splitlines()[-1] == "[]"


def _foreign_adapter(root: Path) -> Path:
    """An adapter of another base model (hidden size 48)."""
    wrapped = peft.get_peft_model(tiny_model(0, hidden_size=48), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    wrapped.save_pretrained(root / "foreign")
    return root / "foreign"


def test_named_errors(lora_run, tmp_path, capsys):
    theta0, adapters, chains = lora_run["theta0"], lora_run["adapters"], lora_run["chains"]
    with pytest.raises(ItermergeError, match=r"'qproj' matches no module of θ0; its linear layers are named \["):
        check_target_modules(tiny_model(0), ["q_proj", "qproj"])
    with pytest.raises(ItermergeError, match=r"'mlp' matches model.layers.0.mlp, a LlamaMLP"):
        check_target_modules(tiny_model(0), ["mlp"])
    with pytest.raises(ItermergeError, match=r"lm_head, whose weight is tied to the input embedding"):
        check_target_modules(tiny_model(0), ["lm_head"])
    for bad, match in (({"r": 0}, r"dpo.peft.r = 0: the adapter rank must be a positive integer"),
                       ({"target_modules": []}, r"dpo.peft.target_modules = \[\]: name at least one"),
                       ({"alpha": -1}, r"dpo.peft.alpha = -1.0: must be > 0"),
                       ({"rank": 8}, r"unknown key dpo.peft.rank")):
        with pytest.raises(ItermergeError, match=match):
            from_dict({"model": {"path": str(theta0)}, "dpo": {"peft": bad}})
    assert from_dict({"dpo": {"peft": {}}}).dpo.peft.target_modules[-1] == "down_proj"
    with pytest.raises(ItermergeError, match=r"adapts 'model.layers.0.self_attn.q_proj.weight' as \(48, 48\) but θ0 "
                                             r"has \(32, 32\).*trained on another base model"):
        merge_adapters(theta0, [adapters[0], _foreign_adapter(tmp_path)], tmp_path / "o",
                       operator("paper", weights=[0.5, 0.5]))
    renamed = tmp_path / "renamed"
    shutil.copytree(adapters[1], renamed)
    config = json.loads((renamed / ADAPTER_CONFIG).read_text())
    (renamed / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": "org/another-model"}))
    with pytest.raises(ItermergeError, match=r"the adapters name different base models"):
        merge_adapters(theta0, [adapters[0], renamed], tmp_path / "o", operator("paper", weights=[0.5, 0.5]))
    with pytest.raises(ItermergeError, match=r"theta2: a full checkpoint among LoRA adapters"):
        merge_adapters(theta0, [adapters[0], chains[1]], tmp_path / "o", operator("paper", weights=[0.5, 0.5]))
    with pytest.raises(ItermergeError, match=r"--method ties is not linear in θ0..θT"):
        merge_adapters(theta0, adapters, tmp_path / "o", operator("ties", lam=0.3, alpha=0.4, density=0.5))
    assert main(["merge", "--reference", str(theta0), "--checkpoints", str(adapters[0]), str(lora_run["theta0"]),
                 "--weights", "0.5,0.5", "--out", str(tmp_path / "o")]) == 2
    assert main(["merge", "--reference", str(theta0), "--checkpoints", *map(str, chains[:2]), "--weights", "0.5,0.5",
                 "--full", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "a full checkpoint among LoRA adapters" in err and "--full applies to LoRA adapters" in err
    assert not (tmp_path / "o").exists()
    tampered = tmp_path / "tampered"  # a chain whose adapter changed after it was written
    shutil.copytree(adapters[0], tampered / "adapter")
    with atomic_dir(tampered / "theta1") as tmp:
        write_chain(tmp, tampered / "theta1", theta0, [tampered / "adapter"])
    (tampered / "adapter" / ADAPTER_WEIGHTS).write_bytes((adapters[1] / ADAPTER_WEIGHTS).read_bytes())
    with pytest.raises(ItermergeError, match=r"adapter_model.safetensors: changed since .*adapter_chain.json was"):
        CheckpointReader(tampered / "theta1")


def test_speed_settings_and_checkpointing_train_the_same_adapter(tmp_path):
    """An adapter trained with the speed settings on (the defaults), all off (``--plain``) and under gradient
    checkpointing (θ0's frozen embedding then has to pass a gradient on): the same B and A to float rounding."""
    from _dist_worker import make_pairs

    theta0 = save_tiny(tmp_path / "theta0", tiny_model(0))
    base = dict(global_batch_size=4, micro_batch_size=2, epochs=2, learning_rate=1e-2, peft=LoraConfig(r=4, alpha=8))
    plain = dict(lean_activations=False, grads_into_weights=False, flat_buffers=False, fused_adamw=False)
    pairs = add_reference_logprobs(load_model(theta0), make_pairs(6), DPOConfig(**base), progress=False)
    trained = {}
    for name, extra in {"fast": {}, "plain": plain, "checkpointed": {"gradient_checkpointing": True}}.items():
        torch.manual_seed(0)  # peft draws A from torch's generator
        (tmp_path / name).mkdir()
        train_adapter(theta0, pairs, DPOConfig(**base, **extra), tmp_path / name, device="cpu", compute_dtype=None)
        reader = CheckpointReader(tmp_path / name / "adapter", chain=False)
        trained[name] = {n: reader.get(n) for n in reader}
    assert all(trained["fast"][n].abs().max() > 0 for n in trained["fast"] if "lora_B" in n)
    for name in ("plain", "checkpointed"):
        for n, a in trained["fast"].items():
            torch.testing.assert_close(trained[name][n], a, atol=2e-6, rtol=1e-4, msg=f"{name}: {n}")


def tiny_lora_config(theta0: Path) -> dict:
    return {
        "name": "tiny-lora", "iterations": 2, "seed": 3, "model": {"path": str(theta0)},
        "prompts": {"per_iteration": 6, "dev": 6, "max_prompt_length": 128},
        "sampling": {"n": 4, "max_new_tokens": 8, "batch_size": 24},
        "dpo": {"learning_rate": 1e-2, "global_batch_size": 4, "micro_batch_size": 2, "max_length": 256,
                "max_prompt_length": 128, "peft": {"r": 4, "alpha": 8}},
        "evaluation": {"max_new_tokens": 8, "batch_size": 16},
        "search": {"lams": [0.0, 0.5], "alphas": [0.0, 0.5]},
        "studies": {"alphas": [0.0, 0.5, 1.0], "prompts": 4, "n": 2, "lambda_study": True},
    }


def test_lora_iterations_keep_adapters_and_the_reference_theta0_then_run_through(tmp_path):
    """`itermerge iterate` with dpo.peft, T = 2: adapters trained and saved, θ_t moved, the reference still θ0; then
    `itermerge.pipeline.run` resumes it through the search, the test (the merge written as one adapter), the studies
    and the report, without a full checkpoint anywhere but θ̄'s cache."""
    from itermerge.pipeline import run

    theta0 = save_tiny(tmp_path / "theta0", tiny_model(0))
    cfg = tiny_lora_config(theta0)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    assert main(["iterate", str(tmp_path / "cfg.yaml"), "--run-dir", str(run_dir)]) == 0
    thetas = [theta0, run_dir / "iter_01" / "model", run_dir / "iter_02" / "model"]
    for t in (1, 2):
        adapter = run_dir / f"iter_{t:02d}" / "adapter"
        assert (adapter / ADAPTER_CONFIG).exists() and (adapter / ADAPTER_WEIGHTS).exists()
        assert not list(thetas[t].glob("*.safetensors"))  # θ_t is θ0 plus adapters 1..t, no full weights
        config = json.loads((adapter / ADAPTER_CONFIG).read_text())
        assert (config["r"], config["lora_alpha"]) == (4, 8)
        lora = CheckpointReader(adapter, chain=False)
        b = [lora.get(n) for n in lora if "lora_B" in n]
        assert b and all(x.abs().max() > 0 for x in b), "peft starts B at zero: training must move every B"
        metrics = json.loads((thetas[t] / "training_metrics.json").read_text())
        assert metrics["adapter"]["bytes"] == (adapter / ADAPTER_WEIGHTS).stat().st_size
    p0, p1, p2 = map(_params, thetas)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(p0[name], p1[name]) and not torch.equal(p1[name], p2[name])
    assert torch.equal(p0["model.embed_tokens.weight"], p2["model.embed_tokens.weight"])  # frozen: only adapters train
    pairs = iteration.pairs_with_reference(run_dir / "iter_02")  # iteration 2's reference is θ0, not θ1
    tok = load_tokenizer(theta0)
    xs, ys, eos = [p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs], (tok.eos_token_id,)
    stored = [p.ref_chosen_logp for p in pairs]
    assert stored == pytest.approx(score_sequences(load_model(theta0), xs, ys, tok.pad_token_id, eos_ids=eos), abs=1e-4)
    under_theta1 = score_sequences(load_model(thetas[1]), xs, ys, tok.pad_token_id, eos_ids=eos)
    assert max(abs(a - b) for a, b in zip(stored, under_theta1)) > 1e-3

    trained = json.loads((run_dir / "manifest.json").read_text())["stages"]["iter_02/train"]
    run(from_dict(cfg), run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert {"iter_02/train", "search", "merge", "test_eval", "studies/alpha", "studies/ensemble"} <= set(manifest)
    assert manifest["iter_02/train"] == trained  # resumed: the iterations were not trained again
    merged = run_dir / "merged"
    assert (merged / ADAPTER_WEIGHTS).exists() and not (merged / "model.safetensors").exists()
    record = json.loads((merged / "merge.json").read_text())
    choice = json.loads((run_dir / "search" / "choice.json").read_text())
    assert (record["lam"], record["alpha"]) == (choice["lam"], choice["alpha"])
    assert [c["path"] for c in record["checkpoints"]] == [str(run_dir / f"iter_{t:02d}" / "adapter") for t in (1, 2)]
    test = json.loads((run_dir / "search" / "test.json").read_text())
    assert test["models"][-1]["t"] == "merged" and "accuracy" in test["models"][-1]["metrics"]
    assert (run_dir / "report.md").exists() and (run_dir / "studies" / "lambda" / "lambda.json").exists()
    theta_b = run_dir / "studies" / "lambda" / "second_criterion" / "iter_01"  # the λ study trains θb as an adapter
    assert (theta_b / "adapter" / ADAPTER_WEIGHTS).exists() and not list((theta_b / "model").glob("*.safetensors"))
    assert main(["verify", str(run_dir), "--deep"]) == 0  # every stage's files, adapters and chains, prove themselves
    full = merge_checkpoints(theta0, thetas[1:], tmp_path / "full",
                             operator("paper", lam=choice["lam"], alpha=choice["alpha"]), progress=False)
    a, b = _params(merged), _params(full)
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=2e-6, rtol=1e-5, msg=n)


def test_a_bad_lora_config_is_refused_before_sampling(lora_run, tmp_path):
    """preflight: a target that names no layer of θ0 (checked on θ0's architecture, no weights read) and a LoRA run
    with the vLLM backend fail by name before anything is sampled or written."""
    from itermerge.pipeline import iterate

    theta0 = lora_run["theta0"]
    cfg = from_dict({"model": {"path": str(theta0)}, "iterations": 1, "prompts": {"per_iteration": 4, "dev": 2},
                     "sampling": {"backend": "vllm"}, "dpo": {"peft": {"target_modules": ["q_proj", "qproj"]}}})
    with pytest.raises(ItermergeError) as err:
        iterate(cfg, tmp_path / "run")
    assert "'qproj' matches no module of θ0" in str(err.value) and "sampling.backend = vllm" in str(err.value)
    assert not (tmp_path / "run" / "iter_01").exists()
