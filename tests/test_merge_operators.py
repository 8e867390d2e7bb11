"""`itermerge merge --method ...`: each operator streamed by merge_checkpoints against hand and numpy values."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import oracles
import pytest
import yaml

from itermerge.checkpoint import CheckpointReader, ShardedWriter
from itermerge.cli import main
from itermerge.errors import ItermergeError
from itermerge.maths import operators as ops
from itermerge.maths.merge import merge_weights
from itermerge.merging import MergeBasis, merge_checkpoints, mergekit_config_for
from itermerge.operators import operator

pytestmark = pytest.mark.numeric  # run again under a second kernel set: make test, ATEN_CPU_CAPABILITY=avx2


def arrays(path: Path) -> dict[str, np.ndarray]:
    r = CheckpointReader(path)
    return {n: r.read(n).reshape(r.shape(n)) for n in r}


def eq9(theta0: np.ndarray, deltas: list[np.ndarray], k: list[float]) -> np.ndarray:
    """The numpy oracle of eq. (9): Σ_t float32(k_t)·Δ_t summed in order, then θ0 added once."""
    acc = np.float32(k[0]) * deltas[0]
    for kt, d in zip(k[1:], deltas[1:]):
        acc = acc + np.float32(kt) * d
    return theta0 + acc


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit, the sign of zero included (np.array_equal takes −0 = +0)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def toy(path: Path, tensors: dict[str, list[float]]) -> Path:
    """A float32 checkpoint of flat tensors written with our own writer (no torch)."""
    path.mkdir()
    data = {n: np.array(v, dtype=np.float32) for n, v in tensors.items()}
    writer = ShardedWriter(path, [(n, a.shape, "F32") for n, a in data.items()])
    for name, a in data.items():
        writer.write(name, 0, a)
    writer.close()
    (path / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return path


def merge(tiny_ckpts, out: Path, method: str = "paper", mean_cache: Path | None = None, **params
          ) -> dict[str, np.ndarray]:
    op = operator(method, **params)
    return arrays(merge_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], out, op, mean_cache=mean_cache, progress=False))


@pytest.fixture(scope="module")
def thetas(tiny_ckpts) -> list[dict[str, np.ndarray]]:
    return [arrays(p) for p in tiny_ckpts]


# --- eq. (9) with other weights: ExPO, EMA, layer groups ---------------------------------------------


def test_expo_is_theta0_plus_scaled_last_task_vector(tiny_ckpts, thetas, tmp_path):
    # ExPO α = 0.5: k = (0, 0, 1.5), so θ = θ0 + 1.5 (θ3 − θ0), one product and one sum per element.
    got = merge(tiny_ckpts, tmp_path / "expo", method="expo", alpha=0.5)
    for name, theta0 in thetas[0].items():
        assert same_bits(got[name], theta0 + np.float32(1.5) * (thetas[3][name] - theta0)), name


def test_ema_weights_by_hand_through_the_merge(tiny_ckpts, thetas, tmp_path):
    # γ = 0.5, T = 3: k ∝ (0.25, 0.5, 1) → (1/7, 2/7, 4/7), Σ k = 1 so θ0 drops out.
    k = [1 / 7, 2 / 7, 4 / 7]
    assert ops.ema_weights(3, 0.5) == pytest.approx(k)
    got = merge(tiny_ckpts, tmp_path / "ema", method="ema", gamma=0.5)
    for name, theta0 in thetas[0].items():
        expected = eq9(theta0, [th[name] - theta0 for th in thetas[1:]], ops.ema_weights(3, 0.5))
        assert same_bits(got[name], expected), name
    record = json.loads((tmp_path / "ema" / "merge.json").read_text())
    assert record["operator"] == {"method": "ema", "gamma": 0.5} and record["weights"] == pytest.approx(k)
    assert record["lam"] is None and "EMA" in record["method"]


def test_groups_take_their_own_lambda_alpha(tiny_ckpts, tmp_path):
    # Each tensor is the paper's merge with its group's (λ, α); the tensors in no group take --lam/--alpha.
    with pytest.raises(ItermergeError, match=r"is in groups \['mlp', 'layers 1'\]; make the groups disjoint"):
        merge(tiny_ckpts, tmp_path / "x", method="groups", groups={"mlp": (0.5, 0.2), "layers 1": (0.0, 1.0)})
    got = merge(tiny_ckpts, tmp_path / "g", method="groups", groups={"mlp": (0.5, 0.2), "norms": (0.0, 1.0)},
                lam=0.3, alpha=0.4)
    mlp = merge(tiny_ckpts, tmp_path / "m", lam=0.5, alpha=0.2)
    layer1 = merge(tiny_ckpts, tmp_path / "l", lam=0.0, alpha=1.0)
    rest = merge(tiny_ckpts, tmp_path / "r", lam=0.3, alpha=0.4)
    for name in got:
        want = mlp if ".mlp." in name else layer1 if "norm" in name else rest
        assert same_bits(got[name], want[name]), name
    record = json.loads((tmp_path / "g" / "merge.json").read_text())
    assert record["operator"] == {"method": "groups", "groups": {"mlp": [0.5, 0.2], "norms": [0.0, 1.0]},
                                  "default": [0.3, 0.4]}
    assert record["weights"] is None and record["lam"] is None


# --- SLERP ---------------------------------------------------------------------------------------


def test_slerp_of_orthogonal_task_vectors_by_hand(tmp_path):
    # θ0 = 0, θ̄ = θ1 = e1, θT = e2 (T = 2): Ω = π/2, t = 1/2 → sin(π/4)/sin(π/2) = √2/2 on each.
    paths = [toy(tmp_path / f"t{i}", {"w": w}) for i, w in enumerate([[0, 0], [1, 0], [0, 1]])]
    out = arrays(merge_checkpoints(paths[0], paths[1:], tmp_path / "s", operator("slerp", t=0.5), progress=False))
    assert out["w"] == pytest.approx([math.sqrt(0.5)] * 2, abs=1e-7)


def test_slerp_of_parallel_task_vectors_is_the_lerp(tmp_path):
    # Δ̄ = (1, 2), ΔT = (3, 6): cos Ω = 1, so (1 − t)·Δ̄ + t·ΔT = 0.75·(1, 2) + 0.25·(3, 6) = (1.5, 3) exactly.
    paths = [toy(tmp_path / f"t{i}", {"w": w}) for i, w in enumerate([[1, 1], [2, 3], [2, 3], [4, 7]])]
    out = arrays(merge_checkpoints(paths[0], paths[1:], tmp_path / "s", operator("slerp", t=0.25), progress=False))
    assert out["w"].tolist() == [2.5, 4.0]


@pytest.mark.parametrize("cached", [False, True])
def test_slerp_equals_the_numpy_oracle_and_the_in_memory_basis(tiny_ckpts, thetas, tmp_path, cached):
    cache = tmp_path / "cache" if cached else None
    got = merge(tiny_ckpts, tmp_path / "s", method="slerp", t=0.3, mean_cache=cache)
    for name, theta0 in thetas[0].items():
        bar = (thetas[1][name] + thetas[2][name]) / np.float32(2)
        expected = theta0 + oracles.slerp(bar - theta0, thetas[3][name] - theta0, 0.3)
        assert same_bits(got[name], expected), name
    record = json.loads((tmp_path / "s" / "merge.json").read_text())
    assert record["operator"] == {"method": "slerp", "t": 0.3} and record["weights"] is None
    assert record["mean_cache"] == (str(cache) if cached else None)
    if cached:  # the search's path: SLERP as per-tensor (k̄, k_T) on θ0, θ̄, θT in memory
        basis = MergeBasis.from_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], mean_cache=cache)
        coefficients = basis.operator_coefficients("slerp", t=0.3)
        for name in got:
            assert same_bits(basis.merged_tensor(name, coefficients=coefficients[name]).numpy(), got[name])


# --- TIES and DARE -------------------------------------------------------------------------------


def test_ties_by_hand(tmp_path):
    # Δ1 = (3, −1, 2, 0.5), Δ2 = (−2, −4, 1, 0.25), density 0.5 keeps the 2 largest |Δ| of each:
    # Δ̃1 = (3, 0, 2, 0), Δ̃2 = (−2, −4, 0, 0). k = (1, 1): Σ = (1, −4, 2, 0), signs (+, −, +, +), and the
    # agreeing entries sum to (3, −4, 2, 0). With k = (1, 2): Σ = (−1, −8, 2, 0) elects − first: (−4, −8, 2, 0).
    paths = [toy(tmp_path / f"t{i}", {"w": w}) for i, w in enumerate([[0] * 4, [3, -1, 2, 0.5], [-2, -4, 1, 0.25]])]
    for k, expected in (([1.0, 1.0], [3, -4, 2, 0]), ([1.0, 2.0], [-4, -8, 2, 0])):
        out = merge_checkpoints(paths[0], paths[1:], tmp_path / "o", operator("ties", weights=k, density=0.5),
                                progress=False, force=True)
        assert arrays(out)["w"].tolist() == expected
    # α = −1 makes every k_t zero: nothing to trim or elect, θ0 itself.
    out = merge_checkpoints(paths[0], paths[1:], tmp_path / "o", operator("ties", lam=0.5, alpha=-1.0, density=0.5),
                            progress=False, force=True)
    assert arrays(out)["w"].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("chunk", [None, 100])
def test_ties_and_dare_equal_the_numpy_oracles(tiny_ckpts, thetas, tmp_path, monkeypatch, chunk):
    if chunk:  # blocks of 100 elements: thresholds, ties and masks must not depend on the blocks
        monkeypatch.setattr("itermerge.checkpoint.dtypes.CHUNK", chunk)
    k = merge_weights(3, 0.3, 0.4)
    ties = merge(tiny_ckpts, tmp_path / "ties", method="ties", lam=0.3, alpha=0.4, density=0.3)
    dare = merge(tiny_ckpts, tmp_path / "dare", method="dare", lam=0.3, alpha=0.4, density=0.5, seed=7)
    for name, theta0 in thetas[0].items():
        deltas = [th[name] - theta0 for th in thetas[1:]]
        assert same_bits(ties[name], theta0 + oracles.ties_merge(deltas, k, 0.3, normalize=False)), name
        dropped = [oracles.dare(d, 0.5, ops.tensor_seed(7, name, t)) for t, d in enumerate(deltas, start=1)]
        assert same_bits(dare[name], eq9(theta0, dropped, k)), name
    record = json.loads((tmp_path / "dare" / "merge.json").read_text())
    assert record["operator"] == {"method": "dare", "lam": 0.3, "alpha": 0.4, "density": 0.5, "seed": 7}
    assert record["weights"] == pytest.approx(k) and "DARE" in record["method"]


def test_ties_with_many_ties_at_the_kth_magnitude(tmp_path, monkeypatch):
    """Quantised task vectors (multiples of 1/4) tie by the hundred at the k-th |Δ|: the lowest indices win."""
    monkeypatch.setattr("itermerge.checkpoint.dtypes.CHUNK", 64)
    rng = np.random.default_rng(0)
    theta0 = rng.standard_normal(1000).astype(np.float32)
    thetas = [theta0] + [theta0 + rng.integers(-3, 4, 1000).astype(np.float32) / 4 for _ in range(3)]
    paths = [toy(tmp_path / f"t{i}", {"w": th.tolist()}) for i, th in enumerate(thetas)]
    k = [0.5, -0.7, 1.1]
    for density in (0.1, 0.37, 1.0):
        out = merge_checkpoints(paths[0], paths[1:], tmp_path / "o", operator("ties", weights=k, density=density),
                                progress=False, force=True)
        stored = [arrays(p)["w"] for p in paths]
        expected = stored[0] + oracles.ties_merge([s - stored[0] for s in stored[1:]], k, density, normalize=False)
        assert same_bits(arrays(out)["w"], expected), density


def test_dare_with_density_one_is_the_plain_merge_bit_for_bit(tiny_ckpts, tmp_path):
    plain = merge(tiny_ckpts, tmp_path / "plain", lam=0.3, alpha=0.4)
    dare = merge(tiny_ckpts, tmp_path / "dare", method="dare", lam=0.3, alpha=0.4, density=1.0)
    assert all(plain[n].tobytes() == dare[n].tobytes() for n in plain)


def test_dare_block_masks_are_the_whole_tensor_mask():
    whole = oracles.dare_mask((1001,), 0.3, 11)
    for start, size in ((0, 1001), (1, 10), (2, 999), (513, 488)):
        assert same_bits(ops.dare_mask_block(start, size, 0.3, 11), whole[start : start + size])


# --- the in-memory basis (the search) ------------------------------------------------------------


def test_basis_applies_expo_groups_and_ema(tiny_ckpts, tmp_path):
    import torch
    from conftest import tiny_model

    cache = tmp_path / "cache"
    basis = MergeBasis.from_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], mean_cache=cache)
    model = tiny_model(0)
    groups = {"mlp": (0.6, 0.1)}
    for method, params in (("expo", {"alpha": 0.5}), ("groups", {"groups": groups, "lam": 0.3, "alpha": 0.4})):
        streamed = merge(tiny_ckpts, tmp_path / method, method=method, mean_cache=cache, **params)
        basis.apply_operator(model, method, **params)
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), torch.from_numpy(streamed[name])), (method, name)
    with pytest.raises(ItermergeError, match=r"intermediate k_t differ, and θ̄ holds only their mean; .* each=True"):
        basis.apply_operator(model, "ema", gamma=0.5)
    with pytest.raises(ItermergeError, match=r"ties sparsifies each θ_t − θ0 .* not linear"):
        basis.apply_operator(model, "ties", density=0.5, lam=0.3, alpha=0.4)
    each = MergeBasis.from_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], each=True)
    streamed = merge(tiny_ckpts, tmp_path / "ema", method="ema", gamma=0.5)
    each.apply_operator(model, "ema", gamma=0.5)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), torch.from_numpy(streamed[name])), name


# --- the command line ----------------------------------------------------------------------------


def test_parameters_that_do_not_apply_are_named_errors(tiny_ckpts, tmp_path):
    with pytest.raises(ItermergeError, match="--gamma does not apply to --method paper; it takes --lam, --alpha"):
        merge(tiny_ckpts, tmp_path / "a", lam=0.3, gamma=0.5)
    with pytest.raises(ItermergeError, match="--method ties needs --density"):
        merge(tiny_ckpts, tmp_path / "b", method="ties", lam=0.3)
    with pytest.raises(ItermergeError,
                       match=r"--density 1.5: must be a number in \(0, 1\] \(the fraction of each task vector kept\)"):
        merge(tiny_ckpts, tmp_path / "c", method="dare", density=1.5)
    with pytest.raises(ItermergeError, match=r"--method slerp .* at least 2 checkpoints"):
        merge_checkpoints(tiny_ckpts[0], tiny_ckpts[1:2], tmp_path / "d", operator("slerp", t=0.5), progress=False)


def test_cli_group_naming_no_tensor_is_a_named_error(tiny_ckpts, tmp_path, capsys):
    groups = tmp_path / "groups.yaml"
    groups.write_text("attention: [0.5, 0.2]\nhead: {lam: 0.1, alpha: 0.1}\n")  # tied embeddings: no lm_head
    argv = ["merge", "--reference", str(tiny_ckpts[0]), "--checkpoints", *map(str, tiny_ckpts[1:]),
            "--method", "groups", "--groups", str(groups), "--out", str(tmp_path / "o"), "--quiet"]
    assert main(argv) == 2
    assert "group 'head' names no tensor; the tensors fall into: attention, embeddings, mlp, norms, layers 0-1" in (
        capsys.readouterr().err)
    groups.write_text("attention: 0.5\n")
    assert main(argv) == 2
    assert "group 'attention': 0.5; write attention: [λ, α]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_every_method_without_torch(tiny_ckpts, tmp_path):
    """Every operator through itermerge.cli.main in one fresh interpreter: torch is never imported."""
    groups = tmp_path / "groups.yaml"
    groups.write_text("embeddings: [0.6, 0.1]\n'layers 0': [0.0, 0.5]\n")
    runs = {"expo": ["--alpha", "0.5"], "ema": ["--gamma", "0.8"], "slerp": ["--t", "0.7"],
            "ties": ["--lam", "0.3", "--alpha", "0.4", "--density", "0.5"],
            "dare": ["--lam", "0.3", "--alpha", "0.4", "--density", "0.5", "--seed", "3"],
            "groups": ["--groups", str(groups), "--lam", "0.3", "--alpha", "0.4"], "model_stock": []}
    calls = [["merge", "--reference", str(tiny_ckpts[0]), "--checkpoints", *map(str, tiny_ckpts[1:]), "--method", m,
              *args, "--out", str(tmp_path / m), "--quiet"] for m, args in runs.items()]
    code = (
        "import sys; from itermerge.cli import main; "
        f"assert all(main(argv) == 0 for argv in {calls!r}); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    for method in runs:
        assert json.loads((tmp_path / method / "merge.json").read_text())["operator"]["method"] == method


def test_mergekit_configs(tiny_ckpts, tmp_path):
    ref, ckpts = tiny_ckpts[0], tiny_ckpts[1:]

    def config(method, mean_cache=None, **params):
        return yaml.safe_load(mergekit_config_for(operator(method, **params), ref, ckpts, mean_cache=mean_cache))

    ties = config("ties", lam=0.0, alpha=0.4, density=0.5)
    assert ties["merge_method"] == "ties" and ties["parameters"] == {"normalize": False}
    assert [m["parameters"] for m in ties["models"]] == [{"weight": 1.4, "density": 0.5}]  # k = 0: left out
    dare = config("dare", weights=[0.2, 0.3, 0.5], density=0.5, seed=1)
    assert dare["merge_method"] == "dare_linear" and dare["parameters"] == {"normalize": False, "rescale": True}
    assert config("expo", alpha=0.5)["models"] == [{"model": str(ckpts[-1]), "parameters": {"weight": 1.5}}]
    with pytest.raises(ItermergeError, match="--method slerp and T ≥ 3 needs --mean-cache"):
        config("slerp", t=0.7)
    slerp = config("slerp", t=0.75, mean_cache=tmp_path / "cache")
    assert slerp["merge_method"] == "nuslerp" and slerp["base_model"] == str(ref)
    assert [(m["model"], m["parameters"]["weight"]) for m in slerp["models"]] == [
        (str(tmp_path / "cache"), 0.25), (str(ckpts[-1]), 0.75)]
    # Groups: mergekit's filters match any name containing them, first match wins; resolved that way, every
    # tensor gets its group's k_t.
    groups = config("groups", groups={"mlp": (0.6, 0.1)}, lam=0.3, alpha=0.4)
    assert groups["merge_method"] == "task_arithmetic"
    for t, model in enumerate(groups["models"]):
        for name in CheckpointReader(ref):
            value = next(c["value"] for c in model["parameters"]["weight"] if c.get("filter", "") in name)
            lam, alpha = (0.6, 0.1) if ".mlp." in name else (0.3, 0.4)
            assert value == pytest.approx(merge_weights(3, lam, alpha)[t]), name


def test_cli_ensemble_takes_the_operators_weights(tiny_ckpts, tmp_path, monkeypatch):
    """ExPO and EMA are eq. (9) with their k_t, so the exact ensemble is eq. (6) with those k_t."""
    seen = {}

    def study(*args, **kw):
        seen.update(kw)
        return {"error": {}}

    monkeypatch.setattr("itermerge.studies.approximation.approximation_study", study)
    base = ["ensemble", "--reference", str(tiny_ckpts[0]), "--checkpoints", *map(str, tiny_ckpts[1:]),
            "--out", str(tmp_path / "e")]
    assert main([*base, "--method", "ema", "--gamma", "0.5"]) == 0
    assert seen["weights"] == pytest.approx([1 / 7, 2 / 7, 4 / 7]) and seen["lam"] is None
    assert main([*base, "--method", "expo", "--alpha", "0.5"]) == 0
    assert seen["weights"] == [0.0, 0.0, 1.5]
