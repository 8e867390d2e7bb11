"""Model Stock (Jang et al. 2024) streamed by merge_checkpoints: by hand on toy tensors, against a float64 numpy
oracle on a tiny Llama, the same bits in memory (the search's basis), and its edge cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from test_merge_operators import arrays, same_bits, toy

from itermerge.cli import main
from itermerge.errors import ItermergeError
from itermerge.merging import MergeBasis, merge_checkpoints, mergekit_config_for
from itermerge.operators import operator
from itermerge.operators.model_stock import stock_ratio

EPS32 = float(np.finfo(np.float32).eps)


def stock(paths, out):
    return arrays(merge_checkpoints(paths[0], paths[1:], out, operator("model_stock"), progress=False))


def oracle(theta0: np.ndarray, thetas: list[np.ndarray]) -> np.ndarray:
    """The paper's rule in float64, straight from its formula: r·mean_t θ_t + (1 − r)·θ0 (cos θ clipped to [0, 1])."""
    deltas = [t.astype(np.float64).ravel() - theta0.astype(np.float64).ravel() for t in thetas]
    T = len(deltas)
    cos = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) if np.linalg.norm(a) and np.linalg.norm(b) else 0.0
           for i, a in enumerate(deltas) for b in deltas[i + 1:]]
    c = min(1.0, max(0.0, sum(cos) / len(cos)))
    r = T * c / (1 + (T - 1) * c)
    mean = sum(t.astype(np.float64) for t in thetas) / T
    return r * mean + (1 - r) * theta0.astype(np.float64)


def test_two_models_by_hand(tmp_path):
    # θ0 = (1, −1), Δ1 = (3, 4), Δ2 = (4, 3): cos θ = 24/25, r = 2·(24/25) / (1 + 24/25) = 48/49,
    # θ = θ0 + r·mean Δ = (1, −1) + (48/49)·(3.5, 3.5) = (1 + 24/7, −1 + 24/7) = (31/7, 17/7).
    paths = [toy(tmp_path / f"t{i}", {"w": w}) for i, w in enumerate([[1, -1], [4, 3], [5, 2]])]
    got = stock(paths, tmp_path / "m")["w"]
    # eq. (9) in float32: k = 24/49 rounded, two products and three sums of terms ≤ 5: a few ulps of 5
    np.testing.assert_allclose(got, [31 / 7, 17 / 7], rtol=0, atol=4 * EPS32 * 5)
    record = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert record["operator"] == {"method": "model_stock"} and "Model Stock" in record["method"]
    assert record["weights"] is None and record["lam"] is None


def test_three_models_by_hand(tmp_path):
    # θ0 = 0, Δ1 = e1, Δ2 = e2, Δ3 = e1 + e2: cosines 0, 1/√2, 1/√2, mean √2/3;
    # r = 3(√2/3) / (1 + 2√2/3) = 3√2 / (3 + 2√2) = 9√2 − 12; θ = r·(2/3, 2/3, 0) = (6√2 − 8, 6√2 − 8, 0).
    paths = [toy(tmp_path / f"t{i}", {"w": w})
             for i, w in enumerate([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])]
    assert stock_ratio(np.array([[1, 0, 1], [0, 1, 1], [1, 1, 2]], dtype=np.float64)) == pytest.approx(
        9 * math.sqrt(2) - 12, rel=1e-15)
    got = stock(paths, tmp_path / "m")["w"]
    want = 6 * math.sqrt(2) - 8
    np.testing.assert_allclose(got, [want, want, 0.0], rtol=0, atol=4 * EPS32)


@pytest.mark.parametrize(("thetas", "why"), [
    ([[1, 0], [-1, 0]], "opposite task vectors: cos θ = −1, clipped to 0, r = 0"),
    ([[0, 0], [1, 0]], "a zero task vector counts as orthogonal: cos θ = 0, r = 0"),
])
def test_no_common_direction_gives_theta0_exactly(tmp_path, thetas, why):
    theta0 = [0.5, -2.0]
    paths = [toy(tmp_path / f"t{i}", {"w": np.add(theta0, w).tolist()}) for i, w in enumerate([[0, 0], *thetas])]
    got = stock(paths, tmp_path / "m")["w"]
    assert same_bits(got, np.array(theta0, dtype=np.float32)), why  # k = 0: θ0 copied bit for bit


def test_equal_task_vectors_give_their_mean(tmp_path):
    # cos θ = 1 → r = T / T = 1: the plain mean of θ1..θT (here all equal to θ0 + Δ).
    paths = [toy(tmp_path / f"t{i}", {"w": w}) for i, w in enumerate([[1.0, 2.0], [2.0, 4.0], [2.0, 4.0]])]
    np.testing.assert_allclose(stock(paths, tmp_path / "m")["w"], [2.0, 4.0], rtol=0, atol=2 * EPS32 * 4)


def test_a_tiny_llama_against_the_float64_oracle(tiny_ckpts, tmp_path):
    thetas = [arrays(p) for p in tiny_ckpts]
    got = stock(tiny_ckpts, tmp_path / "m")
    T = len(tiny_ckpts) - 1
    for name, theta0 in thetas[0].items():
        want = oracle(theta0, [t[name] for t in thetas[1:]])
        # float32 Δ_t (one rounding), eq. (9)'s T products and T + 1 sums: (2T + 2) roundings of the operand scale
        scale = np.abs(theta0) + sum(np.abs(t[name] - theta0) for t in thetas[1:])
        err = np.abs(got[name].astype(np.float64) - want)
        assert (err <= (2 * T + 2) * EPS32 * scale).all(), (name, float(err.max()))


def test_the_in_memory_basis_gives_the_streamed_bits(tiny_ckpts, tmp_path):
    import torch
    from conftest import tiny_model

    streamed = stock(tiny_ckpts, tmp_path / "m")
    model = tiny_model(0)
    MergeBasis.from_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], each=True).apply_operator(model, "model_stock")
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), torch.from_numpy(streamed[name])), name
    with pytest.raises(ItermergeError, match=r"model_stock weights every θ_t − θ0: build the basis with each=True"):
        MergeBasis.from_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], mean_cache=tmp_path / "c").apply_operator(
            model, "model_stock")


def test_named_errors_cli_and_mergekit(tiny_ckpts, tmp_path, capsys):
    with pytest.raises(ItermergeError, match=r"--method model_stock weights θ1..θT by the angles .* at least 2"):
        merge_checkpoints(tiny_ckpts[0], tiny_ckpts[1:2], tmp_path / "one", operator("model_stock"), progress=False)
    with pytest.raises(ItermergeError, match=r"--alpha does not apply to --method model_stock; it takes no parameters"):
        operator("model_stock", alpha=0.4)
    argv = ["merge", "--reference", str(tiny_ckpts[0]), "--checkpoints", *map(str, tiny_ckpts[1:]),
            "--method", "model_stock", "--out", str(tmp_path / "cli"), "--quiet",
            "--emit-mergekit-config", str(tmp_path / "mk.yaml")]
    assert main(argv) == 0
    cli, api = arrays(tmp_path / "cli"), stock(tiny_ckpts, tmp_path / "api")
    assert all(same_bits(cli[n], api[n]) for n in api)
    config = yaml.safe_load((tmp_path / "mk.yaml").read_text())
    assert config["merge_method"] == "model_stock" and config["base_model"] == str(tiny_ckpts[0])
    assert [m["model"] for m in config["models"]] == [str(p) for p in tiny_ckpts[1:]]
    assert config == yaml.safe_load(mergekit_config_for(operator("model_stock"), tiny_ckpts[0], tiny_ckpts[1:]))
