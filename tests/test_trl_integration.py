"""From TRL: examples/trl/dpo_then_merge.py on the tiny model — a real DPOTrainer whose epochs IterMergeCallback
keeps as itermerge checkpoints, merged by the callback (the paper's rule) and by `itermerge merge` (EMA), then
searched by `itermerge search`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny, tiny_model

from itermerge.checkpoint import CheckpointReader
from itermerge.errors import ItermergeError

pytest.importorskip("trl")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl" / "dpo_then_merge.py"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(path)
    return {n: reader.get(n).float() for n in reader}


def test_the_trl_example_saves_each_epoch_and_merges_them(tmp_path):
    """Two epochs: θ0 is the starting model, θ1 ≠ θ2 both trained, and merged/ is eq. (9) by hand for T = 2:
    θ̄ = θ1, so θ = −α θ0 + (1 + α) λ θ1 + (1 + α)(1 − λ) θ2 = −0.4 θ0 + 0.42 θ1 + 0.98 θ2 (λ = 0.3, α = 0.4).
    The EMA written by `itermerge merge` from the same checkpoints records its operator."""
    torch.manual_seed(0)
    theta0 = save_tiny(tmp_path / "tiny", tiny_model(0))
    spec = importlib.util.spec_from_file_location("dpo_then_merge", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--model", str(theta0), "--out", str(tmp_path / "run"), "--epochs", "2", "--pairs", "8",
                        "--learning-rate", "1e-2"])
    w0, start = _weights(out / "theta0"), _weights(theta0)
    assert all(torch.equal(w0[n], start[n]) for n in start)  # θ0 is the model training started from
    w1, w2 = _weights(out / "iter_01" / "model"), _weights(out / "iter_02" / "model")
    assert any(not torch.equal(w1[n], w0[n]) for n in w0) and any(not torch.equal(w2[n], w1[n]) for n in w1)
    merged = _weights(out / "merged")
    for n in w0:  # float32 eq. 9: each product and sum rounded once, so a few ulps of the largest term
        want = -0.4 * w0[n] + 0.42 * w1[n] + 0.98 * w2[n]
        scale = max(w0[n].abs().max(), w1[n].abs().max(), w2[n].abs().max()).item()
        torch.testing.assert_close(merged[n], want, atol=8 * torch.finfo(torch.float32).eps * scale, rtol=0, msg=n)
    log = json.loads((out / "iter_01" / "model" / "training_metrics.json").read_text())
    assert log["epoch"] == pytest.approx(1.0) and any("loss" in row for row in log["log_history"])
    ema = json.loads((out / "merged_ema" / "merge.json").read_text())
    assert ema["operator"] == {"method": "ema", "gamma": 0.5} and ema["weights"] == pytest.approx([1 / 3, 2 / 3])

    # `itermerge search` picks (λ, α) on dev among the TRL run's checkpoints as among Algorithm 1's
    import yaml
    from test_lora import tiny_lora_config

    from itermerge.cli import main

    cfg = tiny_lora_config(out / "theta0")
    cfg["dpo"].pop("peft")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({**cfg, "iterations": 2}))
    assert main(["search", str(out), "--config", str(tmp_path / "cfg.yaml"), "--reference", str(out / "theta0"),
                 "--no-test"]) == 0
    choice = json.loads((out / "search" / "choice.json").read_text())
    assert {choice["lam"], choice["alpha"]} <= {0.0, 0.5} and len(choice["weights"]) == 2  # k_1, k_2 of θ1, θ2


def test_a_bad_merge_is_refused_before_training(tmp_path):
    from itermerge.integrations.trl import IterMergeCallback

    with pytest.raises(ItermergeError, match=r"--gamma does not apply to --method paper"):
        IterMergeCallback(tmp_path, lam=0.5, alpha=0.3, gamma=0.5)
    with pytest.raises(ItermergeError, match=r"save_every='step'"):
        IterMergeCallback(tmp_path, save_every="step", lam=0.5, alpha=0.3)
    with pytest.raises(ItermergeError, match=r"reference='.*nowhere'\): not a checkpoint directory"):
        IterMergeCallback(tmp_path, reference=tmp_path / "nowhere", lam=0.5, alpha=0.3)
