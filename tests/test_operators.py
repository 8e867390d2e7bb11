"""The neighbours' merge operators (ExPO, EMA, SLERP, TIES, DARE, layer groups) against numbers worked by hand: the
arithmetic in itermerge.maths.operators and the whole-tensor oracles (tests/oracles.py) the block kernels equal."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from oracles import dare, dare_mask, depth_band, layer_group, slerp, ties_merge, ties_trim

from itermerge.errors import ItermergeError
from itermerge.maths.operators import ema_weights, expo_weights, resolve_group_coefficients, tensor_seed

pytestmark = pytest.mark.numeric  # run again under a second kernel set: make test, ATEN_CPU_CAPABILITY=avx2


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


# --- ExPO and EMA ------------------------------------------------------------------------------


def test_expo_is_eq10_with_lambda_zero():
    # k = (0, 0, 1+α): θ0 + 1.5 (θ3 − θ0).
    assert expo_weights(3, 0.5) == [0.0, 0.0, 1.5]
    assert expo_weights(1, -0.25) == [0.75]
    # Eq. (10) at λ = 0: k_t = (1+α)·0/(T−1) = 0 for t < T, k_T = (1+α)(1−0); α = 0 is θT itself.
    assert expo_weights(4, 0.0) == [0.0, 0.0, 0.0, 1.0]


def test_ema_weights_by_hand():
    # T=3, γ=0.5: γ^(T−t) = 0.25, 0.5, 1, summing to 1.75.
    assert ema_weights(3, 0.5) == [0.25 / 1.75, 0.5 / 1.75, 1.0 / 1.75]
    # γ = 1 is the plain mean; T = 1 is θ1 alone.
    assert ema_weights(4, 1.0) == [0.25] * 4
    assert ema_weights(1, 0.3) == [1.0]


def test_ema_weights_equal_the_bias_corrected_running_average():
    T, gamma = 5, 0.7
    thetas = np.eye(T)  # θ_t = e_t, so the running average's entries are the weights
    m = np.zeros(T)
    for theta in thetas:
        m = gamma * m + (1 - gamma) * theta
    assert ema_weights(T, gamma) == pytest.approx(list(m / (1 - gamma**T)), rel=1e-12)


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_ema_weights_reject_gamma_out_of_range(gamma):
    with pytest.raises(ItermergeError, match="gamma"):
        ema_weights(3, gamma)


@pytest.mark.parametrize("T", [0, -1, 2.5, True])
def test_weights_reject_bad_T(T):
    with pytest.raises(ItermergeError, match="T="):
        ema_weights(T, 0.5)
    with pytest.raises(ItermergeError, match="T="):
        expo_weights(T, 0.5)


# --- SLERP -------------------------------------------------------------------------------------


def test_slerp_of_orthogonal_unit_vectors_at_half():
    # Ω = π/2, sin Ω = 1: both coefficients are sin(π/4) = 1/√2.
    a, b = f32(1, 0, 0), f32(0, 1, 0)
    out = slerp(a, b, 0.5)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (a + b) / np.sqrt(2), rtol=1e-6)
    assert np.linalg.norm(out) == pytest.approx(1.0, rel=1e-6)  # equal norms stay on the sphere


def test_slerp_endpoints_and_per_tensor_angle():
    a = np.array([[3.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    b = np.array([[0.0, 0.0], [0.0, 3.0]], dtype=np.float32)
    np.testing.assert_allclose(slerp(a, b, 0.0), a, atol=1e-6)
    np.testing.assert_allclose(slerp(a, b, 1.0), b, atol=1e-6)
    # The angle is over the whole flattened (2, 2) tensor: orthogonal, so t = 1/3 gives sin(π/3)·a + sin(π/6)·b.
    np.testing.assert_allclose(slerp(a, b, 1 / 3), np.sin(np.pi / 3) * a + np.sin(np.pi / 6) * b, rtol=1e-6)


def test_slerp_of_parallel_vectors_falls_back_to_lerp():
    a = f32(1, 2, 3)
    for b in (2 * a, -a, a):  # parallel, anti-parallel, identical: sin Ω = 0
        out = slerp(a, b, 0.25)
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out, 0.75 * a + 0.25 * b, rtol=1e-6)


def test_slerp_with_a_zero_vector_is_lerp():
    a, zero = f32(1, -2, 2), f32(0, 0, 0)
    np.testing.assert_allclose(slerp(zero, a, 0.5), 0.5 * a)
    np.testing.assert_array_equal(slerp(zero, zero, 0.5), zero)


@pytest.mark.parametrize("t", [math.nan, math.inf, "0.5"])
def test_slerp_rejects_non_finite_t(t):
    with pytest.raises(ItermergeError, match="slerp: t"):
        slerp(f32(1, 0), f32(0, 1), t)


def test_slerp_rejects_mismatched_shapes():
    with pytest.raises(ItermergeError, match=r"\(2,\) and \(3,\)"):
        slerp(f32(1, 0), f32(0, 1, 0), 0.5)


# --- TIES --------------------------------------------------------------------------------------

# Three task vectors worked by hand, density 0.5: each keeps its 2 largest |entries|.
#   Δ1 = [ 3, -1,  2, -4]  → [ 3,  0,  0, -4]
#   Δ2 = [ 2,  4,  1, -1]  → [ 2,  4,  0,  0]
#   Δ3 = [ 1, -3, -5, .5]  → [ 0, -3, -5,  0]
DELTAS = [f32(3, -1, 2, -4), f32(2, 4, 1, -1), f32(1, -3, -5, 0.5)]


def test_ties_trim_by_hand():
    trimmed = ties_trim(DELTAS, 0.5)
    for got, want in zip(trimmed, [f32(3, 0, 0, -4), f32(2, 4, 0, 0), f32(0, -3, -5, 0)]):
        np.testing.assert_array_equal(got, want)
    # density 1 keeps everything; ⌊0.1·4⌋ = 0 still keeps the single largest entry.
    np.testing.assert_array_equal(ties_trim(DELTAS, 1.0)[0], DELTAS[0])
    np.testing.assert_array_equal(ties_trim(DELTAS, 0.1)[0], f32(0, 0, 0, -4))
    # Equal magnitudes: exactly k kept, the lowest indices first.
    np.testing.assert_array_equal(ties_trim([f32(1, -1, 1, -1)], 0.5)[0], f32(1, -1, 0, 0))


def test_ties_merge_by_hand_equal_weights():
    # Σ trimmed = [5, 1, -5, -4] → signs [+, +, −, −]; agreeing: {3, 2}, {4}, {−5}, {−4}.
    np.testing.assert_array_equal(ties_merge(DELTAS, [1, 1, 1], 0.5), f32(2.5, 4, -5, -4))  # disjoint mean
    np.testing.assert_array_equal(ties_merge(DELTAS, [1, 1, 1], 0.5, normalize=False), f32(5, 4, -5, -4))


def test_ties_merge_by_hand_weights_move_the_election():
    # w = (1, 1, 2): weighted Δ3 = [0, −6, −10, 0], so entry 1 sums to 4 − 6 = −2 and elects −: only Δ3 agrees.
    # normalize: [(3+2)/(1+1), −6/2, −10/2, −4/1]; plain sum: [5, −6, −10, −4].
    np.testing.assert_array_equal(ties_merge(DELTAS, [1, 1, 2], 0.5), f32(2.5, -3, -5, -4))
    np.testing.assert_array_equal(ties_merge(DELTAS, [1, 1, 2], 0.5, normalize=False), f32(5, -6, -10, -4))


def test_ties_merge_sign_tie_elects_plus_and_zeros_never_agree():
    # Σ = 0 elects + (mergekit's ≥ 0); an all-zero column has no agreeing entry and a divisor of 1.
    out = ties_merge([f32(1, 0), f32(-1, 0)], [1, 1], 1.0)
    np.testing.assert_array_equal(out, f32(1, 0))
    assert out.dtype == np.float32


def test_ties_keeps_shapes():
    rng = np.random.default_rng(0)
    deltas = [rng.standard_normal((3, 5)).astype(np.float32) for _ in range(3)]
    out = ties_merge(deltas, [0.2, 0.3, 0.5], 0.4)
    assert out.shape == (3, 5) and out.dtype == np.float32


@pytest.mark.parametrize("density", [0.0, -0.5, 1.5, math.nan])
def test_ties_rejects_bad_density(density):
    with pytest.raises(ItermergeError, match="density"):
        ties_trim(DELTAS, density)
    with pytest.raises(ItermergeError, match="density"):
        ties_merge(DELTAS, [1, 1, 1], density)


def test_ties_rejects_mismatched_inputs():
    with pytest.raises(ItermergeError, match="2 weights for 3 task vectors"):
        ties_merge(DELTAS, [1, 1], 0.5)
    with pytest.raises(ItermergeError, match="shapes"):
        ties_trim([f32(1, 2), f32(1, 2, 3)], 0.5)
    with pytest.raises(ItermergeError, match="no task vectors"):
        ties_merge([], [], 0.5)


# --- DARE --------------------------------------------------------------------------------------


def test_dare_with_density_one_is_identity_bit_for_bit():
    delta = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    delta[:3] = (-0.0, np.float32(1e-45), np.float32(3.4e38))
    out = dare(delta, 1.0, seed=7)
    assert out.tobytes() == delta.tobytes()
    assert dare_mask((10,), 1.0, 7).all()


def test_dare_half_keeps_about_half_and_rescales_by_two():
    delta = np.random.default_rng(2).uniform(0.5, 1.5, 10_000).astype(np.float32)
    out = dare(delta, 0.5, seed=tensor_seed(0, "model.layers.0.mlp.up_proj.weight"))
    kept = out != 0
    assert 0.47 < kept.mean() < 0.53  # 10,000 Bernoulli(0.5): σ = 0.005
    np.testing.assert_array_equal(out[kept], 2 * delta[kept])
    mask = dare_mask(delta.shape, 0.5, 3)
    np.testing.assert_array_equal(dare(delta, 0.5, seed=3, rescale=False), np.where(mask, delta, 0))


def test_dare_masks_are_seeded_and_keyed_on_the_tensor_name():
    shape = (64, 32)
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    same = dare_mask(shape, 0.5, tensor_seed(42, q))
    np.testing.assert_array_equal(same, dare_mask(shape, 0.5, tensor_seed(42, q)))
    assert not np.array_equal(same, dare_mask(shape, 0.5, tensor_seed(42, k)))
    assert not np.array_equal(same, dare_mask(shape, 0.5, tensor_seed(43, q)))
    assert not np.array_equal(same, dare_mask(shape, 0.5, tensor_seed(42, q, checkpoint=2)))


def test_tensor_seed_does_not_depend_on_the_interpreter():
    # Python's str hash is salted per process; the seed must not be.
    code = "from itermerge.maths.operators import tensor_seed; print(tensor_seed(5, 'lm_head.weight'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(other.stdout) == tensor_seed(5, "lm_head.weight")


@pytest.mark.parametrize("density", [0.0, 1.0001, -1, math.inf])
def test_dare_rejects_bad_density(density):
    with pytest.raises(ItermergeError, match="density"):
        dare(f32(1, 2), density, 0)


def test_dare_rejects_bad_seed():
    with pytest.raises(ItermergeError, match="seed"):
        dare_mask((2,), 0.5, -1)
    with pytest.raises(ItermergeError, match="seed"):
        tensor_seed("0", "lm_head.weight")


# --- layer groups ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("model.embed_tokens.weight", "embeddings"),
        ("model.layers.0.self_attn.q_proj.weight", "attention"),
        ("model.layers.11.self_attn.k_proj.bias", "attention"),  # Qwen2's qkv biases
        ("model.layers.3.self_attn.o_proj.weight", "attention"),
        ("model.layers.3.self_attn.q_norm.weight", "norms"),  # Qwen3
        ("model.layers.3.mlp.gate_proj.weight", "mlp"),
        ("model.layers.3.mlp.down_proj.weight", "mlp"),
        ("model.layers.3.input_layernorm.weight", "norms"),
        ("model.layers.3.post_attention_layernorm.weight", "norms"),
        ("model.norm.weight", "norms"),
        ("lm_head.weight", "head"),
    ],
)
def test_layer_group_of_typical_names(name, group):
    assert layer_group(name) == group


def test_layer_group_rejects_unknown_names():
    with pytest.raises(ItermergeError, match=r"'vision_tower\.proj\.weight'"):
        layer_group("vision_tower.proj.weight")


def test_depth_band():
    assert depth_band("model.layers.0.mlp.up_proj.weight", 32, 4) == "layers 0-7"
    assert depth_band("model.layers.7.mlp.up_proj.weight", 32, 4) == "layers 0-7"
    assert depth_band("model.layers.8.self_attn.q_proj.weight", 32, 4) == "layers 8-15"
    assert depth_band("model.layers.31.input_layernorm.weight", 32, 4) == "layers 24-31"
    # 10 layers in 3 bands: ⌊10j/3⌋ = 0, 3, 6, 10.
    assert [depth_band(f"model.layers.{i}.mlp.up_proj.weight", 10, 3) for i in (2, 3, 5, 6, 9)] == [
        "layers 0-2", "layers 3-5", "layers 3-5", "layers 6-9", "layers 6-9"]
    assert depth_band("model.embed_tokens.weight", 32, 4) is None
    with pytest.raises(ItermergeError, match="num_layers=4"):
        depth_band("model.layers.9.mlp.up_proj.weight", 4, 2)
    with pytest.raises(ItermergeError, match="bands=5"):
        depth_band("model.layers.0.mlp.up_proj.weight", 4, 5)


NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]


def test_resolve_group_coefficients():
    got = resolve_group_coefficients(NAMES, {"attention": (0.3, 0.5), "norms": (0.0, 0.0)}, default=(0.2, 0.1))
    assert got["model.layers.0.self_attn.q_proj.weight"] == (0.3, 0.5)
    assert got["model.layers.1.self_attn.q_proj.weight"] == (0.3, 0.5)
    assert got["model.norm.weight"] == got["model.layers.0.input_layernorm.weight"] == (0.0, 0.0)
    assert got["model.layers.1.mlp.up_proj.weight"] == got["lm_head.weight"] == (0.2, 0.1)
    assert list(got) == NAMES
    bands = resolve_group_coefficients(NAMES, {"layers 1": (1.0, 0.0), "embeddings": (0.0, -1.0)}, (0.0, 0.0))
    assert bands["model.layers.1.mlp.up_proj.weight"] == (1.0, 0.0)
    assert bands["model.layers.0.mlp.up_proj.weight"] == (0.0, 0.0)
    assert bands["model.embed_tokens.weight"] == (0.0, -1.0)


def test_a_group_naming_no_tensor_is_a_named_error():
    tied = [n for n in NAMES if n != "lm_head.weight"]
    existing = r"group 'head' names no tensor; the tensors fall into: attention, embeddings, mlp, norms, layers 0-1"
    with pytest.raises(ItermergeError, match=existing):
        resolve_group_coefficients(tied, {"head": (0.0, 0.5)}, (0.0, 0.0))
    with pytest.raises(ItermergeError, match="group 'layers 8-15' names no tensor"):
        resolve_group_coefficients(NAMES, {"layers 8-15": (0.0, 0.5)}, (0.0, 0.0))


def test_resolve_group_coefficients_rejects_bad_groups():
    with pytest.raises(ItermergeError, match="group 'ffn': not one of"):
        resolve_group_coefficients(NAMES, {"ffn": (0.0, 0.5)}, (0.0, 0.0))
    with pytest.raises(ItermergeError, match=r"in groups \['attention', 'layers 0-1'\]"):
        resolve_group_coefficients(NAMES, {"attention": (0.0, 0.5), "layers 0-1": (0.1, 0.0)}, (0.0, 0.0))
    with pytest.raises(ItermergeError, match="α"):
        resolve_group_coefficients(NAMES, {"mlp": (0.0, math.nan)}, (0.0, 0.0))
    with pytest.raises(ItermergeError, match=r"groups\['mlp'\]=0.5: give a pair"):
        resolve_group_coefficients(NAMES, {"mlp": 0.5}, (0.0, 0.0))


def test_operators_do_not_import_torch():
    code = "import sys, itermerge.maths.operators; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
