"""dpo.reference: TR-DPO's soft and hard updates against hand-computed steps, previous = a run whose θ0 is θ_{t−1},
each policy under two processes = one process, LoRA + soft trains and merges."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch
from _dist_worker import make_pairs
from conftest import adam_rounding_atol, save_tiny, tiny_model
from test_dpo import one_thread  # noqa: F401  (autouse: tiny matrices run on one thread)

from itermerge.config import DPOConfig
from itermerge.errors import ItermergeError
from itermerge.maths.dpo import dpo_loss
from itermerge.training.loop import train_dpo
from itermerge.training.moving_reference import check_reference_supported, soft_update
from itermerge.training.reference import add_reference_logprobs

pytestmark = pytest.mark.numeric

# A step's losses are gathered as float32 rows (training/loop.py), so a float64 training reports them to float32
# rounding: a few ulps of float32 at log 2 ≈ 0.69 (one ulp there is 6e-8).
F32 = 4 * torch.finfo(torch.float32).eps

# One optimizer step per epoch (global batch = all 4 pairs), constant lr: step s of a run is step s of a shorter one.
FULL_BATCH = dict(global_batch_size=4, micro_batch_size=2, learning_rate=1e-2, warmup_ratio=0.0,
                  lr_scheduler="constant", weight_decay=0.0)


def test_soft_update_hand_computed():
    """θ0 = 1, θ1 = 3, θ2 = 5, α = 0.5: θ_ref = 0.5·3 + 0.5·1 = 2 after step 1, 0.5·5 + 0.5·2 = 3.5 after step 2;
    with α = 1 the update is a copy (hard)."""
    ref = torch.tensor([1.0, -2.0])
    soft_update(ref, torch.tensor([3.0, 0.0]), 0.5)
    assert ref.tolist() == [2.0, -1.0]
    soft_update(ref, torch.tensor([5.0, 1.0]), 0.5)
    assert ref.tolist() == [3.5, 0.0]
    assert soft_update(ref, torch.tensor([7.0, 7.0]), 1.0).tolist() == [7.0, 7.0]


def _train(epochs: int, pairs, **reference) -> tuple[torch.nn.Module, dict]:
    model = tiny_model(0).double()
    metrics = train_dpo(model, pairs, DPOConfig(**FULL_BATCH, epochs=epochs, **reference), progress=False)
    return model, metrics


def _loss(policy: torch.nn.Module, reference: torch.nn.Module, pairs, beta: float) -> float:
    """The mean DPO loss of eq. (4) over ``pairs`` with π_θ = ``policy`` and π_ref = ``reference``, scored apart."""
    cfg = DPOConfig(**FULL_BATCH)
    pol = add_reference_logprobs(policy, pairs, cfg, progress=False)
    ref = add_reference_logprobs(reference, pairs, cfg, progress=False)
    column = lambda ps, key: torch.tensor([getattr(p, key) for p in ps], dtype=torch.float64)  # noqa: E731
    return dpo_loss(column(pol, "ref_chosen_logp"), column(pol, "ref_rejected_logp"), column(ref, "ref_chosen_logp"),
                    column(ref, "ref_rejected_logp"), beta)[0].mean().item()


def _mix(a: torch.nn.Module, b: torch.nn.Module, alpha: float) -> torch.nn.Module:
    """A model with weights α·a + (1 − α)·b, by hand."""
    out = tiny_model(0).double()
    wa, wb = a.state_dict(), b.state_dict()
    out.load_state_dict({k: alpha * wa[k] + (1 - alpha) * wb[k] for k in wa})
    return out


def test_soft_reference_moves_after_each_step_by_alpha(float64_rmsnorm):
    """Three steps of soft, α = 0.3, from θ0 (the stored log-probs are θ0's): step 1 compares against θ0 (loss log 2),
    step 2 against R1 = α θ1 + (1 − α) θ0, step 3 against R2 = α θ2 + (1 − α) R1, where θ1 and θ2 are the policy
    after the first one and two steps (runs of 1 and 2 epochs: the same first steps). Updating before the step, or
    weighting the wrong side, gives other losses."""
    alpha, beta = 0.3, DPOConfig().beta
    pairs = add_reference_logprobs(tiny_model(0).double(), make_pairs(4), DPOConfig(**FULL_BATCH), progress=False)
    theta0 = tiny_model(0).double()
    theta1, _ = _train(1, pairs, reference="soft", reference_alpha=alpha)
    theta2, _ = _train(2, pairs, reference="soft", reference_alpha=alpha)
    _, metrics = _train(3, pairs, reference="soft", reference_alpha=alpha)
    history = metrics["history"]
    r1 = _mix(theta1, theta0, alpha)
    r2 = _mix(theta2, r1, alpha)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=F32)
    assert history[1]["loss"] == pytest.approx(_loss(theta1, r1, pairs, beta), abs=F32)
    assert history[2]["loss"] == pytest.approx(_loss(theta2, r2, pairs, beta), abs=F32)
    assert abs(_loss(theta2, r1, pairs, beta) - _loss(theta2, r2, pairs, beta)) > 1e-4  # the check can fail
    assert [h["reference"] for h in history] == [
        "theta_{t-1}", "soft(alpha=0.3) after 1 updates from theta_{t-1}", "soft(alpha=0.3) after 2 updates from "
        "theta_{t-1}"]
    assert metrics["reference"] == {"policy": "soft", "start": "theta_{t-1}", "updates": 3, "alpha": 0.3}


@pytest.mark.parametrize("every, synced, described", [
    (1, [1, 2], ["theta_{t-1}", "policy after step 1", "policy after step 2"]),
    (2, [2], ["theta_{t-1}", "theta_{t-1}", "policy after step 2"]),
])
def test_hard_reference_is_the_policy_copied_every_tau_steps(every, synced, described, float64_rmsnorm):
    """Hard, τ = ``every``, 3 steps: right after a copy the reference *is* the policy, so that step's loss is log 2
    exactly as at step 1 (eq. 4 with equal log-ratios); a step between copies compares against an older policy.
    ``synced``: the (0-based) steps that follow a copy."""
    pairs = add_reference_logprobs(tiny_model(0).double(), make_pairs(4), DPOConfig(**FULL_BATCH), progress=False)
    _, metrics = _train(3, pairs, reference="hard", reference_sync_steps=every)
    for step, h in enumerate(metrics["history"]):
        if step == 0 or step in synced:
            assert h["loss"] == pytest.approx(math.log(2), abs=F32), step
        else:
            assert abs(h["loss"] - math.log(2)) > 1e-4, step
    assert [h["reference"] for h in metrics["history"]] == described
    assert metrics["reference"] == {"policy": "hard", "start": "theta_{t-1}", "updates": 3 // every,
                                    "sync_steps": every}


def test_fixed_reads_the_stored_logprobs_and_records_the_speed_settings_that_ran():
    pairs = add_reference_logprobs(tiny_model(0), make_pairs(4), DPOConfig(**FULL_BATCH), progress=False)
    model = tiny_model(0)
    metrics = train_dpo(model, pairs, DPOConfig(**FULL_BATCH, epochs=2, flat_buffers=False), progress=False)
    assert [h["reference"] for h in metrics["history"]] == ["theta_0", "theta_0"]
    assert metrics["reference"] == {"policy": "fixed", "start": "theta_0", "updates": 0}
    assert metrics["speed_settings"] == {"lean_activations": True, "grads_into_weights": True, "flat_buffers": False,
                                         "fused_adamw": True, "gradient_checkpointing": False}


def test_previous_is_a_run_whose_theta0_is_theta_t_minus_1(tmp_path):
    """Iteration 2 under dpo.reference = previous stores θ1's log-probs: those of a fixed run whose θ0 is θ1, so it
    trains the same θ2; the KL estimate still measures θ1 against the run's own θ0."""
    from itermerge import iteration
    from itermerge.config import from_dict
    from itermerge.records import Completion, write_jsonl
    from itermerge.runner import Shard

    theta0 = save_tiny(tmp_path / "theta0", tiny_model(0))
    theta1 = save_tiny(tmp_path / "theta1", tiny_model(1))
    out = tmp_path / "iter_02"
    out.mkdir()
    pairs = make_pairs(4)
    write_jsonl(out / "pairs.jsonl", pairs)
    write_jsonl(out / "samples.jsonl", [Completion(p.prompt_id, 0, p.chosen, p.chosen_ids, True, 1.0) for p in pairs])
    base = {"name": "ref", "iterations": 2, "model": {"path": str(theta0)},
            "dpo": {"max_length": 256, "max_prompt_length": 128}}
    parts = {}
    for policy, start in (("previous", theta0), ("fixed", theta1)):
        cfg = from_dict({**base, "model": {"path": str(start)}, "dpo": {**base["dpo"], "reference": policy}})
        part = iteration.reference_shard(cfg, start, theta1, out, 2, Shard())
        parts[policy] = part
        written = iteration.write_reference(out, start, [part])
        assert written["reference"] == str(theta1)
    previous, fixed = parts["previous"], parts["fixed"]
    assert previous["refs"] == fixed["refs"]  # the very same log-probs, hence the same training
    assert previous["kl_terms"] and any(abs(x) > 1e-6 for x in previous["kl_terms"])  # θ1 against θ0: KL > 0
    assert all(abs(x) < 1e-5 for x in fixed["kl_terms"])  # θ1 against itself


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("reference", [
    {"reference": "previous"}, {"reference": "soft", "reference_alpha": 0.5},
    {"reference": "hard", "reference_sync_steps": 2},
])
def test_each_reference_policy_under_two_processes_equals_one(reference, tmp_path, float64_rmsnorm):
    """Global batch 4 over 10 pairs (3 steps), 2 gloo processes vs 1: the reference moves identically on every rank
    (each holds the same θ after DDP's all-reduce), so weights and every step's loss agree to rounding."""
    import torch.multiprocessing as mp
    from _dist_worker import train_in_process_group

    cfg_kwargs = dict(global_batch_size=4, micro_batch_size=2, epochs=1, learning_rate=1e-2, warmup_ratio=0.0,
                      lr_scheduler="constant", weight_decay=0.0, **reference)
    mp.spawn(train_in_process_group, args=(2, _free_port(), cfg_kwargs, str(tmp_path), "float64"), nprocs=2, join=True)
    two = torch.load(tmp_path / "state.pt")
    two_metrics = json.loads((tmp_path / "metrics.json").read_text())
    cfg = DPOConfig(**cfg_kwargs)
    pairs = add_reference_logprobs(tiny_model(0).double(), make_pairs(10), cfg, progress=False)
    model = tiny_model(0).double()
    one_metrics = train_dpo(model, pairs, cfg, progress=False)
    atol = adam_rounding_atol(cfg, len(one_metrics["history"]), pairs)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(two[k], v, atol=atol, rtol=0, msg=k)
    assert [h["reference"] for h in two_metrics["history"]] == [h["reference"] for h in one_metrics["history"]]
    assert two_metrics["reference"] == one_metrics["reference"]
    for key in ("loss", "grad_norm"):
        assert [h[key] for h in two_metrics["history"]] == pytest.approx(
            [h[key] for h in one_metrics["history"]], rel=1e-12, abs=1e-15), key
    if reference["reference"] != "previous":  # the reference moved, so a later step is not at log 2
        assert two_metrics["reference"]["updates"] >= 1
    assert two_metrics["speed_settings"]["lean_activations"] is False  # not under DDP, and recorded so


def test_lora_soft_reference_trains_the_adapter_and_merges(tmp_path):
    """LoRA + soft, two iterations: the reference is an adapter state over the frozen base θ_{t−1} (its B starts at 0,
    so iteration 2 starts at θ1 and its first loss is log 2 against θ1's stored log-probs); the adapters train, the
    reference moves (step 3 differs from the fixed reference's), and the paper's merge of θ0, θ1, θ2 reads them."""
    from itermerge.checkpoint import CheckpointReader, load_model
    from itermerge.config.dpo import LoraConfig
    from itermerge.merging import merge_adapters
    from itermerge.operators import operator
    from itermerge.training.peft import train_adapter

    theta0 = save_tiny(tmp_path / "theta0", tiny_model(0))
    common = dict(FULL_BATCH, epochs=3, peft=LoraConfig(r=4, alpha=8), reference_alpha=0.5)
    pairs = add_reference_logprobs(load_model(theta0), make_pairs(4), DPOConfig(**common), progress=False)
    runs = {}
    for policy in ("fixed", "soft"):
        torch.manual_seed(0)  # peft draws A from torch's generator
        (tmp_path / policy).mkdir()
        runs[policy] = train_adapter(theta0, pairs, DPOConfig(**common, reference=policy), tmp_path / policy,
                                     device="cpu", compute_dtype=None)
    soft, fixed = runs["soft"]["history"], runs["fixed"]["history"]
    assert soft[0]["loss"] == pytest.approx(fixed[0]["loss"], abs=F32)  # both start at θ0 = θ_{t−1}
    assert abs(soft[2]["loss"] - fixed[2]["loss"]) > 1e-6
    assert runs["soft"]["reference"]["updates"] == 3
    theta1 = tmp_path / "soft" / "model"  # θ0 plus adapter 1, as a chain
    pairs2 = add_reference_logprobs(load_model(theta1), make_pairs(4, seed=1), DPOConfig(**common), progress=False)
    (tmp_path / "soft2").mkdir()
    second = train_adapter(theta1, pairs2, DPOConfig(**common, reference="soft"), tmp_path / "soft2", device="cpu",
                           compute_dtype=None)
    assert second["history"][0]["loss"] == pytest.approx(math.log(2), abs=F32)
    adapters = [tmp_path / "soft" / "adapter", tmp_path / "soft2" / "adapter"]
    for adapter in adapters:
        reader = CheckpointReader(adapter, chain=False)
        assert all(reader.get(n).abs().max() > 0 for n in reader if "lora_B" in n)  # B starts at 0: it trained
    paper = operator("paper", lam=0.5, alpha=0.5)
    merged = merge_adapters(theta0, adapters, tmp_path / "merged", paper, progress=False)
    weights, start = CheckpointReader(merged), CheckpointReader(theta0)  # θ0 plus the merged adapter
    assert any(not torch.equal(weights.get(n), start.get(n)) for n in start)


def test_soft_and_hard_are_refused_where_the_weights_are_sharded():
    for policy in ("soft", "hard"):
        with pytest.raises(ItermergeError, match=rf"dpo.reference = '{policy}' runs on one process or under DDP"):
            check_reference_supported(DPOConfig(reference=policy), sharded=False, deepspeed=True)
    check_reference_supported(DPOConfig(reference="previous"), sharded=True, deepspeed=True)


@pytest.mark.parametrize("kwargs, match", [
    ({"reference": "ema"}, r"dpo.reference = 'ema': must be one of"),
    ({"reference_alpha": 0.0}, r"dpo.reference_alpha = 0.0: must be in \(0, 1\]"),
    ({"reference_sync_steps": 0}, r"dpo.reference_sync_steps = 0: must be a positive integer"),
])
def test_bad_reference_settings_are_named(kwargs, match):
    with pytest.raises(ItermergeError, match=match):
        DPOConfig(**kwargs)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("study_file, linked, regime", [
    ("study_reference.yaml", "study.yaml", "lr-1e-5"),  # arithmetic: `make study-reference` links study's lr 1e-5
    (EXAMPLES / "instruction_following" / "study_reference.yaml",  # instruction following: `make study-if`'s runs
     EXAMPLES / "instruction_following" / "config.yaml", "default"),
])
def test_the_shipped_reference_studies_compare_the_four_policies_on_one_run(study_file, linked, regime):
    """The reference studies (issue 27): one regime per dpo.reference, the runs otherwise identical (same prompts,
    seeds and search), so the regimes' test tables compare the references and the merge on each; their fixed regime
    is, setting for setting, the study whose runs the Makefile links in as fixed rather than rerunning them."""
    from dataclasses import replace
    from importlib.resources import files

    from itermerge.replicates import load_study

    def shipped(name, seeds=None):
        return load_study(name if isinstance(name, Path) else files("itermerge") / "configs" / name, seeds)

    study = shipped(study_file)
    configs = study.configs()
    assert {r: next(iter(c.values())).dpo.reference for r, c in configs.items()} == {
        "fixed": "fixed", "previous": "previous", "soft": "soft", "hard": "hard"}
    assert len(study.seeds) >= 5
    neutral = DPOConfig().reference_alpha, DPOConfig().reference_sync_steps
    plain = [replace(c[0], dpo=replace(c[0].dpo, reference="fixed", reference_alpha=neutral[0],
                                       reference_sync_steps=neutral[1])) for c in configs.values()]
    assert all(p == plain[0] for p in plain)  # nothing but the reference differs
    reused = shipped(linked, study.seeds).configs()[regime]  # its seeds as the Makefile replicates it
    assert {s: replace(c, name="") for s, c in configs["fixed"].items()} == {
        s: replace(reused[s], name="") for s in study.seeds}


def test_iterate_with_a_soft_reference_stores_theta_t_minus_1_and_records_every_step(tmp_path):
    """`itermerge iterate`, T = 2, dpo.reference = soft: iteration 2's stored log-probs are θ1's (its start), the
    stage says so, and θ2's training metrics name the reference of every step (θ1, then the moving mix)."""
    import yaml
    from test_lora import tiny_lora_config

    from itermerge.checkpoint import load_model, load_tokenizer
    from itermerge.cli import main
    from itermerge.iteration import pairs_with_reference
    from itermerge.logprobs import score_sequences

    theta0 = save_tiny(tmp_path / "theta0", tiny_model(0))
    cfg = tiny_lora_config(theta0)
    cfg["dpo"] = {**{k: v for k, v in cfg["dpo"].items() if k != "peft"}, "reference": "soft"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    assert main(["iterate", str(tmp_path / "cfg.yaml"), "--run-dir", str(run_dir)]) == 0
    theta1 = run_dir / "iter_01" / "model"
    pairs, tok = pairs_with_reference(run_dir / "iter_02"), load_tokenizer(theta0)
    xs, ys = [p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs]
    under = {name: score_sequences(load_model(path), xs, ys, tok.pad_token_id, eos_ids=(tok.eos_token_id,))
             for name, path in (("theta0", theta0), ("theta1", theta1))}
    stored = [p.ref_chosen_logp for p in pairs]
    assert stored == pytest.approx(under["theta1"], abs=1e-4)
    assert stored != pytest.approx(under["theta0"], abs=1e-4)
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert stages["iter_02/reference_logprobs"]["reference"] == str(theta1)
    metrics = json.loads((run_dir / "iter_02" / "model" / "training_metrics.json").read_text())
    steps = [h["reference"] for h in metrics["history"]]
    assert steps[0] == "theta_{t-1}" and steps[1].startswith("soft(alpha=0.5) after 1 updates")
    assert metrics["reference"]["policy"] == "soft" and metrics["speed_settings"]["lean_activations"] is True
