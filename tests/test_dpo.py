"""DPO: the loss by hand and against TRL, the training loop, its reference handling, and 2-process equivalence."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import typing

import pytest
import torch
from _dist_worker import EOS, make_pairs
from conftest import adam_rounding_atol, tiny_model, tiny_tokenizer

from itermerge.config import DPOConfig
from itermerge.errors import ItermergeError
from itermerge.logprobs import collate, sequence_logprobs
from itermerge.maths.dpo import dpo_loss, induced_reward
from itermerge.training.loop import train_dpo
from itermerge.training.optim import scheduled_lr
from itermerge.training.reference import add_reference_logprobs, truncate_pair

pytestmark = pytest.mark.numeric  # run again under a second kernel set: make test, ATEN_CPU_CAPABILITY=avx2

PLAIN = dict(lean_activations=False, grads_into_weights=False, flat_buffers=False, fused_adamw=False)

FAST = dict(learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant", weight_decay=0.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: a second thread only adds contention on a shared CPU (about 3x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed_theta0(scale: float = 0.3):
    """θ0 plus seeded noise: a policy far enough from θ0 that the DPO logits are well away from 0."""
    model = tiny_model(0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def test_dpo_loss_hand_computed():
    """Three pairs, derived by hand.

    pair 0, β = 0.5: π_w = -1, π_l = -3, ref_w = ref_l = -2 → h = (-1 + 3) - 0 = 2, βh = 1,
        loss = -log σ(1) = log(1 + e^-1) = 0.313262, r_w = 0.5·(-1 + 2) = 0.5, r_l = 0.5·(-3 + 2) = -0.5.
    pair 1, β = 0.5: π_w = -5, π_l = -4, ref_w = -4, ref_l = -5 → h = -1 - 1 = -2, βh = -1,
        loss = log(1 + e^1) = 1.313262, r_w = -0.5, r_l = 0.5.
    pair 2: policy = reference → h = 0, loss = log 2, both rewards 0.
    ∂loss/∂π_w = -β σ(-βh): pair 0 → -0.5·σ(-1) = -0.134471; pair 1 → -0.5·σ(1) = -0.365529; pair 2 → -0.25.
    """
    pc = torch.tensor([-1.0, -5.0, -7.0], requires_grad=True)
    pr = torch.tensor([-3.0, -4.0, -2.0])
    rc = torch.tensor([-2.0, -4.0, -7.0])
    rr = torch.tensor([-2.0, -5.0, -2.0])
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    torch.testing.assert_close(losses, torch.tensor([0.313262, 1.313262, math.log(2)]), atol=1e-6, rtol=0)
    torch.testing.assert_close(chosen, torch.tensor([0.5, -0.5, 0.0]))
    torch.testing.assert_close(rejected, torch.tensor([-0.5, 0.5, 0.0]))
    losses.sum().backward()
    torch.testing.assert_close(pc.grad, torch.tensor([-0.134471, -0.365529, -0.25]), atol=1e-6, rtol=0)
    assert not chosen.requires_grad


def test_induced_reward_is_eq_4_on_floats_and_tensors():
    # r = β (log π − log π_ref): 0.1 · (−2 − (−3)) = 0.1; 0.5 · (−5 − (−4)) = −0.5.
    assert induced_reward(-2.0, -3.0, 0.1) == pytest.approx(0.1)
    torch.testing.assert_close(induced_reward(torch.tensor([-5.0, -1.0]), torch.tensor([-4.0, -1.0]), 0.5),
                               torch.tensor([-0.5, 0.0]))


def test_scheduled_lr_hand_computed():
    # 10 steps, warm-up ceil(0.2·10) = 2 steps: peak·1/3, peak·2/3, then cosine over the 8 remaining steps.
    lrs = [scheduled_lr(s, 10, 3.0, 0.2) for s in range(10)]
    assert lrs[:3] == pytest.approx([1.0, 2.0, 3.0])
    assert lrs[6] == pytest.approx(1.5)  # progress 4/8: cos(π/2) = 0 → peak/2
    assert lrs[9] == pytest.approx(3.0 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert scheduled_lr(5, 10, 3.0, 0.0, "constant") == 3.0
    assert scheduled_lr(5, 10, 3.0, 0.0, "linear") == pytest.approx(1.5)


def test_truncate_pair_cuts_the_prompt_start_then_completion_ends():
    prompt, chosen, rejected = list(range(10)), [100, 101, 102, EOS], [200, EOS]
    assert truncate_pair(prompt, chosen, rejected, 20, 5) == (prompt, chosen, rejected)
    # 10 + 4 > 12: prompt keeps its last 5, completions fit in 12 - 5 = 7.
    assert truncate_pair(prompt, chosen, rejected, 12, 5) == ([5, 6, 7, 8, 9], chosen, rejected)
    # 10 + 4 > 8: prompt keeps 5, completions keep their first 3 (the EOS goes).
    assert truncate_pair(prompt, chosen, rejected, 8, 5) == ([5, 6, 7, 8, 9], [100, 101, 102], rejected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(learning_rate=-1.0), r"dpo.learning_rate = -1.0: must be > 0"),
        (dict(beta=0.0), r"dpo.beta = 0.0"),
        (dict(global_batch_size=10, micro_batch_size=4), r"multiple of dpo.micro_batch_size = 4"),
        (dict(warmup_ratio=1.5), r"warmup_ratio = 1.5"),
        (dict(lr_scheduler="step"), r"lr_scheduler = 'step'"),
        (dict(max_length=100, max_prompt_length=100), r"max_prompt_length = 100"),
        (dict(epochs=0), r"epochs = 0: must be a positive integer"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ItermergeError, match=match):
        DPOConfig(**kwargs)


def test_config_defaults_are_appendix_c_and_every_field_has_help():
    import dataclasses

    cfg = DPOConfig()
    assert (cfg.beta, cfg.learning_rate, cfg.global_batch_size, cfg.warmup_ratio) == (0.1, 5e-7, 128, 0.03)
    assert (cfg.weight_decay, cfg.max_grad_norm, cfg.max_length, cfg.max_prompt_length) == (0.01, 1.0, 2048, 1024)
    assert cfg.lr_scheduler == "cosine" and cfg.mask_eos and cfg.epochs == 1
    assert all(f.metadata.get("help") for f in dataclasses.fields(DPOConfig))
    assert cfg.micro_batch_size == 1  # the least activation memory (docs/benchmarks.md, DPO vs TRL)
    with pytest.raises(ItermergeError, match=r"not a multiple of dpo\.micro_batch_size × processes = 1 × 3"):
        cfg.accumulation_steps(3)
    assert cfg.accumulation_steps(2) == 64


def test_pairs_without_reference_logprobs_are_refused():
    pairs = add_reference_logprobs(tiny_model(0), make_pairs(3), DPOConfig(), progress=False)
    pairs[1] = make_pairs(3)[1]
    with pytest.raises(ItermergeError, match=r"pair 1 \(prompt_id 'p1'\) has no reference log-probs"):
        train_dpo(tiny_model(0), pairs, DPOConfig(global_batch_size=4), progress=False)
    with pytest.raises(ItermergeError, match="no preference pairs"):
        train_dpo(tiny_model(0), [], DPOConfig(), progress=False)


def test_reference_logprobs_score_exactly_the_trained_tokens():
    """θ0's log-probs with EOS masked and the pair truncated: equal to scoring the truncated ids without the EOS."""
    cfg = DPOConfig(max_length=6, max_prompt_length=3)
    pair = make_pairs(1)[0]
    [scored] = add_reference_logprobs(tiny_model(0), [pair], cfg, progress=False)
    prompt, chosen, rejected = truncate_pair(pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, 6, 3)
    want = sequence_logprobs(
        tiny_model(0), collate([prompt, prompt], [chosen, rejected], 0, eos_ids=[EOS])
    ).tolist()
    assert [scored.ref_chosen_logp, scored.ref_rejected_logp] == pytest.approx(want, abs=1e-5)
    assert scored.prompt_ids == pair.prompt_ids  # the record keeps its full ids


def test_the_reference_is_theta0_from_the_pairs_not_the_starting_policy():
    """Training θ1 (≠ θ0) on pairs scored by θ0: the first step's loss uses θ0's log-probs.

    Had the loop used its starting policy as the reference (θ_{t-1}, the drift Alg. 1 forbids),
    the first loss would be exactly log 2.
    """
    cfg = DPOConfig(global_batch_size=4, micro_batch_size=4, **FAST)
    pairs = add_reference_logprobs(tiny_model(0), make_pairs(4), cfg, progress=False)
    theta1 = tiny_model(1)
    with torch.no_grad():
        prompts = [p.prompt_ids for p in pairs]
        batch = collate(
            prompts + prompts, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], 0, eos_ids=[EOS]
        )
        chosen, rejected = sequence_logprobs(theta1, batch).chunk(2)
    ref_c = torch.tensor([p.ref_chosen_logp for p in pairs])
    ref_r = torch.tensor([p.ref_rejected_logp for p in pairs])
    want = dpo_loss(chosen, rejected, ref_c, ref_r, cfg.beta)[0].mean().item()
    metrics = train_dpo(theta1, pairs, cfg, progress=False)
    assert metrics["first_step_loss"] == pytest.approx(want, abs=1e-6)
    assert abs(metrics["first_step_loss"] - math.log(2)) > 1e-3


def test_training_changes_parameters_and_learns_the_preferences():
    cfg = DPOConfig(global_batch_size=4, micro_batch_size=2, epochs=6, **FAST)
    pairs = add_reference_logprobs(tiny_model(0), make_pairs(8), cfg, progress=False)
    model = tiny_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = train_dpo(model, pairs, cfg, progress=False)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)
    history = metrics["history"]
    assert metrics["steps"] == len(history) == 12 and metrics["pairs_seen"] == 48
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at the start
    assert history[-1]["loss"] < 0.5 and history[-1]["accuracy"] == 1.0 and history[-1]["reward_margin"] > 0.5
    assert metrics["tokens"] == 6 * sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert not model.training  # the caller's mode is restored


def test_gradient_accumulation_equals_one_big_micro_batch():
    """Global batch 4 (of 6 pairs: 4 + a short batch of 2) as 1×4 or as 4 micro-batches of 1, in float64.

    The two differ only in the order of the gradient's sums, so they agree to rounding (``adam_rounding_atol``: a
    bound derived from ε64 and the sums' size). In float32 that rounding is the CPU's kernels' (AVX2, AVX-512 and
    AMX sum in different orders) and AdamW turns it into an O(lr) step wherever an element's gradient is near 0: one
    element in 2,048 ended 2e-5 apart on one CPU. A missing 1/accumulation factor moves weights by ~lr.
    """
    results = []
    for micro in (4, 1):
        cfg = DPOConfig(global_batch_size=4, micro_batch_size=micro, epochs=2, **FAST)
        pairs = add_reference_logprobs(tiny_model(0).double(), make_pairs(6), cfg, progress=False)
        model = tiny_model(0).double()
        metrics = train_dpo(model, pairs, cfg, progress=False)
        assert {p.dtype for p in model.parameters()} == {torch.float64}
        results.append((model.state_dict(), metrics))
    (a, ma), (b, mb) = results
    atol = adam_rounding_atol(cfg, len(ma["history"]), pairs)
    assert atol < 1e-4 * cfg.learning_rate  # far below what a wrong accumulation moves
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)
    for key in ("loss", "grad_norm"):  # Adam hides a gradient scale error; the norm does not
        assert [h[key] for h in ma["history"]] == pytest.approx([h[key] for h in mb["history"]], rel=1e-12)
    assert [h["pairs"] for h in ma["history"]] == [4, 2, 4, 2]


def test_bfloat16_weights_train_as_float32_master_weights():
    """At the paper's lr (5e-7) a bf16 weight cannot move (half an ulp is ~1e-4): train in fp32, compute in bf16."""
    cfg = DPOConfig(global_batch_size=4, micro_batch_size=2, epochs=2)  # appendix C's lr, 5e-7
    pairs = add_reference_logprobs(tiny_model(0), make_pairs(8), cfg, progress=False)
    model = tiny_model(0).to(torch.bfloat16)
    before = {k: v.float() for k, v in model.state_dict().items()}
    metrics = train_dpo(model, pairs, cfg, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # left in float32: bf16 would round it back
    moved = sum(int((v != before[k]).sum()) for k, v in model.state_dict().items())
    assert moved > 0.99 * sum(v.numel() for v in before.values())  # in pure bf16 only ~1 % moved
    assert max((v - before[k]).abs().max().item() for k, v in model.state_dict().items()) < 1e-4  # ~lr per step
    # the forward ran in bf16: the first loss is log 2 only up to bf16 rounding of the log-probs
    assert metrics["history"][0]["loss"] == pytest.approx(math.log(2), abs=0.05)


def test_flat_gradient_and_moment_buffers_change_memory_not_results():
    """dpo.flat_buffers: gradients and AdamW moments as views of three flat buffers: bit-identical weights, and
    nothing left behind."""
    common = dict(global_batch_size=4, micro_batch_size=2, epochs=2, learning_rate=1e-2, weight_decay=0.01,
                  grads_into_weights=False, lean_activations=False)
    cfg = DPOConfig(**common)
    pairs = add_reference_logprobs(tiny_model(0), make_pairs(6), cfg, progress=False)
    flat = tiny_model(0)
    flat_metrics = train_dpo(flat, pairs, cfg, progress=False)
    assert all(p.grad is None for p in flat.parameters())  # the views (and so the buffers) are released
    lazy = tiny_model(0)
    lazy_metrics = train_dpo(lazy, pairs, DPOConfig(**common, flat_buffers=False), progress=False)
    for (name, a), b in zip(flat.state_dict().items(), lazy.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["grad_norm"] for h in flat_metrics["history"]] == [h["grad_norm"] for h in lazy_metrics["history"]]


def test_every_speed_setting_off_is_the_plain_path_to_rounding(float64_rmsnorm):
    """The speed settings (the defaults) against all of them off (``--plain``): the same θ_t to float rounding,
    and the plain run really took the plain path (no swapped module forwards, no fused optimizer). In float64, with
    no float32 rounding left in either path (``float64_rmsnorm``), to the bound ``adam_rounding_atol`` derives."""
    cfg = DPOConfig(global_batch_size=4, micro_batch_size=2, epochs=2, learning_rate=1e-2, weight_decay=0.01)
    pairs = add_reference_logprobs(tiny_model(0).double(), make_pairs(6), cfg, progress=False)
    fast, plain = perturbed_theta0().double(), perturbed_theta0().double()  # float64: see adam_rounding_atol
    history = train_dpo(fast, pairs, cfg, progress=False)["history"]
    train_dpo(plain, pairs, DPOConfig(**{**vars(cfg), **PLAIN}), progress=False)
    start = perturbed_theta0().double().state_dict()
    atol = adam_rounding_atol(cfg, len(history), pairs)
    for (name, a), b in zip(fast.state_dict().items(), plain.state_dict().values()):
        assert not torch.equal(a, start[name]), name  # trained
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("tied", [True, False])
def test_lean_autograd_gives_autograds_gradients(tied):
    """One process, plain AdamW: the input embedding's and output layer's gradients are added into .grad directly
    (no dense (V, H) temporaries), SwiGLU and RMSNorm recompute what they used to keep. The same gradients as
    autograd's, accumulated over two micro-batches, padding row excluded as nn.Embedding excludes it."""
    from itermerge.logprobs import CompletionLogprobs
    from itermerge.logprobs.structure import plain_embedding, plain_output_layer
    from itermerge.training.lean_autograd import lean_modules
    from itermerge.training.loop import _pair_losses
    from itermerge.training.reference import pair_tokens

    cfg = DPOConfig()
    pairs = add_reference_logprobs(tiny_model(0), make_pairs(4), cfg, progress=False)
    tokens = [pair_tokens(p, i, cfg) for i, p in enumerate(pairs)]
    grads = []
    for into in (False, True):
        model = perturbed_theta0() if tied else tiny_model(0, tie_word_embeddings=False)
        model.model.embed_tokens.padding_idx = 0
        scorer = CompletionLogprobs(model)
        scorer.grads_into_weights = into
        assert plain_embedding(model) is not None and plain_output_layer(model) is not None  # the path is taken
        with lean_modules(model) if into else contextlib.nullcontext(0) as swapped:
            assert swapped == (7 if into else 0)  # per layer its MLP and 2 RMSNorms, and the final norm
            for batch in (tokens[:2], tokens[2:]):  # accumulation into an existing .grad
                losses, _, _ = _pair_losses(scorer, batch, 0, (EOS,), 0.1, torch.device("cpu"))
                losses.sum().backward()
        assert "forward" not in vars(model.model.layers[0].mlp)  # the module's own forward is back
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    auto, direct = grads
    assert auto.keys() == direct.keys()
    for name in auto:
        torch.testing.assert_close(direct[name], auto[name], atol=1e-6, rtol=1e-5, msg=name)
    assert auto["model.embed_tokens.weight"].abs().sum() > 0
    assert torch.equal(direct["model.embed_tokens.weight"][0], auto["model.embed_tokens.weight"][0])


def test_lean_autograd_under_bfloat16_autocast():
    """On a GPU the weights are float32 and the forward runs under bf16 autocast: the lean functions' backward
    gets 16-bit gradients against float32 weights. It runs, and its gradients point where autograd's do."""
    from itermerge.logprobs import CompletionLogprobs
    from itermerge.training.lean_autograd import lean_modules
    from itermerge.training.loop import _pair_losses
    from itermerge.training.reference import pair_tokens

    cfg = DPOConfig()
    pairs = add_reference_logprobs(tiny_model(0), make_pairs(2), cfg, progress=False)
    tokens = [pair_tokens(p, i, cfg) for i, p in enumerate(pairs)]
    grads = []
    for lean in (False, True):
        model = perturbed_theta0()
        scorer = CompletionLogprobs(model)
        scorer.grads_into_weights = lean
        with lean_modules(model) if lean else contextlib.nullcontext(0), torch.autocast("cpu", dtype=torch.bfloat16):
            losses, _, _ = _pair_losses(scorer, tokens, 0, (EOS,), 0.1, torch.device("cpu"))
        losses.sum().backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    auto, lean = grads
    assert torch.nn.functional.cosine_similarity(auto, lean, dim=0) > 0.999
    assert (lean.norm() / auto.norm() - 1).abs() < 0.01


def test_fused_adamw_is_used_and_matches_the_plain_update():
    """dpo.fused_adamw: the fused AdamW kernel (one pass per step) takes the same steps as torch's default loop."""
    from itermerge.training.optim import adamw

    cfg = DPOConfig(global_batch_size=4, micro_batch_size=2, epochs=2, learning_rate=1e-2, weight_decay=0.01)
    assert [g["fused"] for g in adamw(tiny_model(0), cfg, fused=cfg.fused_adamw).param_groups] == [True, True]
    assert not adamw(tiny_model(0), cfg, fused=False).param_groups[0]["fused"]
    pairs = add_reference_logprobs(tiny_model(0).double(), make_pairs(6), cfg, progress=False)
    fused, plain = tiny_model(0).double(), tiny_model(0).double()  # float64: see adam_rounding_atol
    history = train_dpo(fused, pairs, cfg, progress=False)["history"]
    train_dpo(plain, pairs, DPOConfig(**{**vars(cfg), "fused_adamw": False}), progress=False)
    atol = adam_rounding_atol(cfg, len(history), pairs)
    moved = 0
    for (name, a), b, c in zip(
        fused.state_dict().items(), plain.state_dict().values(), tiny_model(0).double().state_dict().values()
    ):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=name)
        moved += not torch.equal(a, c)
    assert moved > 10  # both trained


def test_sharded_weights_are_gathered_for_saving(monkeypatch):
    """Under ZeRO-3 the trained weights come from accelerator.get_state_dict, keyed as the model's own state dict."""
    import itermerge.training.loop as loop

    cfg = DPOConfig(global_batch_size=2, micro_batch_size=2, **FAST)
    pairs = add_reference_logprobs(tiny_model(0), make_pairs(2), cfg, progress=False)
    model, gathered = tiny_model(0), {}
    train_dpo(model, pairs, cfg, progress=False, state_dict=gathered)
    assert gathered == {}  # one process: the model holds its weights
    monkeypatch.setattr(loop, "sharded_parameters", lambda accelerator: True)
    train_dpo(model, pairs, cfg, progress=False, state_dict=gathered)
    want = model.state_dict()
    assert gathered.keys() == want.keys()
    assert all(torch.equal(gathered[k], want[k]) for k in want)


def _deepspeed_accelerator(ds_config: dict, processes: int = 1, main: bool = True):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    return SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED, num_processes=processes, is_main_process=main,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds_config)),
    )


def test_deepspeed_batch_comes_from_the_dpo_config():
    """accelerate cannot fill DeepSpeed's 'auto' batch without a DataLoader, and a GAS of 1 from a launcher config
    would step after every micro-batch: the dpo section is written over both."""
    from itermerge.training.distributed import set_deepspeed_batch as _set_deepspeed_batch

    cfg = DPOConfig(global_batch_size=128, micro_batch_size=2)
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3}}
    _set_deepspeed_batch(_deepspeed_accelerator(ds, processes=8), cfg, cfg.accumulation_steps(8))
    assert ds == {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 8, "train_batch_size": 128,
                  "gradient_clipping": 1.0, "zero_optimization": {"stage": 3}}


def test_zero3_saves_the_float32_master_weights(monkeypatch):
    """Under ZeRO-3 each parameter's fp32 master copy is gathered (on every process, kept on the main one);
    a frozen parameter (no master copy) falls back to accelerate's 16-bit gather on every process."""
    import sys
    from types import ModuleType

    from itermerge.training.distributed import gather_full_weights as _gather_full_weights

    model = tiny_model(0)
    master = {id(p): (p.detach() + 1).to(torch.float64) for p in model.parameters()}  # "fp32 masters": θ + 1
    calls = []
    fake = ModuleType("deepspeed.utils")
    fake.safe_get_full_fp32_param = lambda p: calls.append(p) or (master[id(p)] if p.requires_grad else None)
    monkeypatch.setitem(sys.modules, "deepspeed", ModuleType("deepspeed"))
    monkeypatch.setitem(sys.modules, "deepspeed.utils", fake)
    names = [n for n, _ in model.named_parameters()]

    full = _gather_full_weights(_deepspeed_accelerator({}), None, model)
    assert list(full) == names and len(calls) == len(names)
    for name, p in model.named_parameters():
        assert full[name].dtype == torch.float32 and torch.equal(full[name], (p.detach() + 1).float())
    assert _gather_full_weights(_deepspeed_accelerator({}, main=False), None, model) == {}  # took part, kept nothing

    model.model.norm.weight.requires_grad_(False)
    accelerator = _deepspeed_accelerator({})
    accelerator.get_state_dict = lambda scorer: {"model." + k: v for k, v in model.state_dict().items()}
    assert _gather_full_weights(accelerator, None, model).keys() == model.state_dict().keys()


def test_deepspeed_master_weights_come_from_the_float32_checkpoint(tmp_path, monkeypatch):
    """DeepSpeed builds its fp32 masters from the 16-bit model; a float32 θ_{t−1}'s own values replace them."""
    import sys
    from types import ModuleType

    from itermerge.training.distributed import set_float32_masters as _set_float32_masters

    source = tiny_model(3)
    source.save_pretrained(tmp_path / "fp32")
    tiny_model(3).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = tiny_model(3).to(torch.bfloat16)  # what DeepSpeed trains: the 16-bit copy
    masters = {}
    fake = ModuleType("deepspeed.utils")
    fake.safe_set_full_fp32_param = lambda p, value: masters.__setitem__(id(p), value.clone())
    monkeypatch.setitem(sys.modules, "deepspeed", ModuleType("deepspeed"))
    monkeypatch.setitem(sys.modules, "deepspeed.utils", fake)
    assert _set_float32_masters(model, tmp_path / "fp32", torch.device("cpu")) == len(list(model.parameters()))
    for (name, p), (_, want) in zip(model.named_parameters(), source.named_parameters()):
        assert masters[id(p)].dtype == torch.float32 and torch.equal(masters[id(p)], want.detach()), name
    masters.clear()
    # 16-bit on disk: the masters are exact already
    assert _set_float32_masters(model, tmp_path / "bf16", torch.device("cpu")) == 0 and not masters
    model.model.extra = torch.nn.Linear(2, 2)  # a parameter the checkpoint lacks: nothing is replaced
    assert _set_float32_masters(model, tmp_path / "fp32", torch.device("cpu")) == 0 and not masters


def test_models_load_whole_after_a_zero3_accelerator_registered_itself(tmp_path, monkeypatch):
    """After a ZeRO-3 training, transformers would partition every later load (zero.Init): iteration 2's sampler
    got a model with 0 vocabulary rows on the GPU box. Samplers, θ0's scoring and evaluation load whole models."""
    import weakref

    from transformers.integrations import deepspeed as hf_deepspeed

    from itermerge.checkpoint import load_model

    class Zero3Config:
        config: typing.ClassVar[dict] = {"zero_optimization": {"stage": 3}}

        def is_zero3(self) -> bool:
            return True

    registered = Zero3Config()
    monkeypatch.setattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", weakref.ref(registered))
    assert hf_deepspeed.is_deepspeed_zero3_enabled()
    tiny_model(0).save_pretrained(tmp_path)
    model = load_model(tmp_path)  # zero.Init would need deepspeed (absent here) and give empty shards
    assert model.get_output_embeddings().weight.shape == (128, 32)
    assert hf_deepspeed.is_deepspeed_zero3_enabled()  # the registration is back for the training that follows


def test_gradient_checkpointing_changes_memory_not_results():
    from itermerge.logprobs.structure import checkpointing as is_checkpointing  # transformers 4 and 5 name it apart

    results = []
    for checkpointing in (False, True):
        cfg = DPOConfig(global_batch_size=2, micro_batch_size=2, gradient_checkpointing=checkpointing, **FAST)
        pairs = add_reference_logprobs(tiny_model(0).double(), make_pairs(4), cfg, progress=False)
        model = tiny_model(0).double()  # float64: see adam_rounding_atol
        results.append((model, train_dpo(model, pairs, cfg, progress=False)))
    (plain, m1), (checkpointed, m2) = results
    # Checkpointing also scores the pairs as flat sequences (no KV cache): float-rounding apart, the same θ.
    atol = adam_rounding_atol(cfg, len(m1["history"]), pairs)
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
    assert [h["grad_norm"] for h in m1["history"]] == pytest.approx([h["grad_norm"] for h in m2["history"]], rel=1e-12)
    assert not is_checkpointing(checkpointed)  # switched off again after training


@pytest.mark.filterwarnings(
    "ignore::FutureWarning"
)  # TRL's config sets transformers' deprecated gradient_checkpointing
def test_loss_and_gradients_match_trl_dpo_trainer(tmp_path):
    """TRL 1.16's DPOTrainer.compute_loss (with an explicit ref_model = θ0) vs ours, on one batch of 3 pairs.

    TRL computes the reference log-probs itself, so this also checks `add_reference_logprobs`. TRL does
    not mask the EOS, hence mask_eos=False here.
    """
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    pairs = make_pairs(3, seed=5)
    text = {"prompt": [{"role": "user", "content": "1+1"}]}
    dataset = Dataset.from_list([{**text, "chosen": [{"role": "assistant", "content": "2"}],
                                  "rejected": [{"role": "assistant", "content": "3"}]}])  # fmt: skip
    args = TRLConfig(
        output_dir=str(tmp_path), beta=0.5, bf16=False, use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", per_device_train_batch_size=3,
    )  # fmt: skip
    trl_policy = perturbed_theta0()
    trainer = DPOTrainer(
        model=trl_policy, ref_model=tiny_model(0), args=args, train_dataset=dataset, processing_class=tiny_tokenizer()
    )
    inputs = trainer.data_collator(
        [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in pairs]
    )
    trl_policy.train()
    trl_loss = trainer.compute_loss(trl_policy, inputs)
    trl_loss.backward()

    cfg = DPOConfig(beta=0.5, mask_eos=False)
    scored = add_reference_logprobs(tiny_model(0), pairs, cfg, progress=False)
    policy = perturbed_theta0()
    policy.train()
    prompts = [p.prompt_ids for p in pairs]
    logps = sequence_logprobs(
        policy, collate(prompts + prompts, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], 0)
    )
    chosen, rejected = logps.chunk(2)
    ref_c = torch.tensor([p.ref_chosen_logp for p in scored])
    ref_r = torch.tensor([p.ref_rejected_logp for p in scored])
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_c, ref_r, 0.5)
    loss = losses.mean()
    loss.backward()

    assert abs(loss.item() - math.log(2)) > 0.05  # policy ≠ reference, so the comparison is not trivial
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    metrics = trainer._metrics["train"]
    assert chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][-1], rel=1e-4, abs=1e-6)
    margin = (chosen_rewards - rejected_rewards).mean().item()
    assert margin == pytest.approx(metrics["rewards/margins"][-1], rel=1e-4, abs=1e-6)
    for (name, ours), theirs in zip(policy.named_parameters(), trl_policy.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-4, msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_same_weights_as_one(tmp_path, float64_rmsnorm):
    """Global batch 4 over 10 pairs (batches 4, 4, 2): 1 process × 2 micro-batches of 2 vs 2 gloo processes × 1×2.

    The short last batch leaves an empty slot on one side (a weight-0 stand-in pair), which must not count.
    """
    import torch.multiprocessing as mp
    from _dist_worker import train_in_process_group

    cfg_kwargs = dict(global_batch_size=4, micro_batch_size=2, epochs=1, **FAST)
    args = (2, _free_port(), cfg_kwargs, str(tmp_path), "float64")  # float64: see adam_rounding_atol
    mp.spawn(train_in_process_group, args=args, nprocs=2, join=True)
    two = torch.load(tmp_path / "state.pt")
    two_metrics = json.loads((tmp_path / "metrics.json").read_text())

    cfg = DPOConfig(**cfg_kwargs)
    pairs = add_reference_logprobs(tiny_model(0).double(), make_pairs(10), cfg, progress=False)
    model = tiny_model(0).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one_metrics = train_dpo(model, pairs, cfg, progress=False)
    atol = adam_rounding_atol(cfg, len(one_metrics["history"]), pairs)  # a step moves ~1e-2
    for k, v in model.state_dict().items():
        assert not torch.equal(v, before[k]), k
        torch.testing.assert_close(two[k], v, atol=atol, rtol=0, msg=k)
    assert [h["pairs"] for h in two_metrics["history"]] == [4, 4, 2]
    for key in ("loss", "accuracy", "reward_margin", "grad_norm"):  # Adam hides a gradient scale error; the norm not
        assert [h[key] for h in two_metrics["history"]] == pytest.approx(
            [h[key] for h in one_metrics["history"]], rel=1e-12, abs=1e-15
        ), key


def test_save_model_writes_the_given_state_dict(tmp_path):
    """What iteration.train saves under ZeRO-3: the gathered weights, not the process's own (sharded) parameters."""
    from itermerge.checkpoint import CheckpointReader, save_model

    model = tiny_model(0)
    gathered = {n: t + 1.0 for n, t in model.state_dict().items()}
    save_model(model, None, tmp_path / "m", state_dict=gathered)
    reader = CheckpointReader(tmp_path / "m")
    assert torch.equal(reader.get("model.norm.weight"), gathered["model.norm.weight"])
    assert not torch.equal(reader.get("model.norm.weight"), model.state_dict()["model.norm.weight"])
