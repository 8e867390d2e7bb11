"""Algorithm 2 / eq. (9)-(10): weights by hand, the streamed merge against float64, bad inputs."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import save_tiny, tiny_model

from itermerge.checkpoint import CheckpointReader
from itermerge.cli import main
from itermerge.errors import ItermergeError
from itermerge.maths.merge import merge_weights
from itermerge.merging import (
    MergeBasis,
    mean_checkpoint,
    merge_checkpoints,
    merge_state_dicts,
    mergekit_config,
    task_arithmetic,
)
from itermerge.operators import operator

pytestmark = pytest.mark.numeric  # run again under a second kernel set: make test, ATEN_CPU_CAPABILITY=avx2


def test_merge_weights_by_hand():
    # T=3, λ=0.3, α=0.4: k1 = k2 = 1.4·0.3/2 = 0.21, k3 = 1.4·0.7 = 0.98, Σk = 1.4 = 1+α.
    assert merge_weights(3, 0.3, 0.4) == pytest.approx([0.21, 0.21, 0.98])
    # λ=0, α=0 is θT; α=−1 is θ0 (all k zero); T=1 is ExPO: k1 = 1+α.
    assert merge_weights(4, 0.0, 0.0) == [0.0, 0.0, 0.0, 1.0]
    assert merge_weights(4, 0.5, -1.0) == [0.0, 0.0, 0.0, 0.0]
    assert merge_weights(1, 0.0, 0.5) == [1.5]
    # Large and negative α are allowed (extrapolation and interpolation towards θ0).
    assert sum(merge_weights(6, 0.2, 1.7)) == pytest.approx(2.7)
    assert sum(merge_weights(6, 0.2, -0.5)) == pytest.approx(0.5)


def test_merge_weights_rejects_lambda_for_single_checkpoint():
    with pytest.raises(ItermergeError, match=r"lam=0.3 with T=1: θ̄ .* undefined"):
        merge_weights(1, 0.3, 0.0)
    with pytest.raises(ItermergeError, match="alpha=nan"):
        merge_weights(3, 0.3, float("nan"))


def test_task_arithmetic_hand_computed():
    # θ0 = [1, 2], θ1 = [3, 2], θ2 = [1, 6]; k = (0.5, 0.25): θ0 + 0.5·[2, 0] + 0.25·[0, 4] = [2, 3].
    theta0, theta1, theta2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0]), torch.tensor([1.0, 6.0])
    assert torch.equal(task_arithmetic(theta0, [theta1, theta2], [0.5, 0.25]), torch.tensor([2.0, 3.0]))
    # bf16 storage is computed in fp32 and returned fp32.
    out = task_arithmetic(theta0.bfloat16(), [theta1.bfloat16(), theta2.bfloat16()], [0.5, 0.25])
    assert out.dtype == torch.float32 and torch.equal(out, torch.tensor([2.0, 3.0]))
    # A unit coefficient vector returns that input bit for bit.
    x = torch.randn(1000) * 1e3
    assert torch.equal(task_arithmetic(torch.randn(1000), [torch.randn(1000), x], [0.0, 1.0]), x)


def test_state_dict_merge_matches_formula(tiny_ckpts):
    sds = [{n: r.get(n).clone() for n in r} for r in map(CheckpointReader, tiny_ckpts)]
    k = merge_weights(3, 0.3, 0.4)
    merged = merge_state_dicts(sds[0], sds[1:], k)
    for name, got in merged.items():
        expected = (1 - sum(k)) * sds[0][name].double() + sum(kt * sd[name].double() for kt, sd in zip(k, sds[1:]))
        assert torch.allclose(got.double(), expected, atol=1e-6), name


def _realistic_ckpts(root: Path, T: int) -> list[Path]:
    """θ1..θT = θ0 plus per-element updates ~1e-3 of the weights' scale (a DPO run's size)."""
    base = tiny_model(0)
    paths = [save_tiny(root / "t0", base)]
    for t in range(1, T + 1):
        m = tiny_model(0)
        g = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1e-3 * t * p.abs().mean() * torch.randn(p.shape, generator=g))
        paths.append(save_tiny(root / f"t{t}", m))
    return paths


@pytest.mark.parametrize(("lam", "alpha"), [(0.3, 0.4), (0.2, 1.7), (0.5, -0.5)])
def test_streamed_merge_within_one_rounding_of_float64(tmp_path, lam, alpha):
    paths = _realistic_ckpts(tmp_path, 4)
    out = merge_checkpoints(paths[0], paths[1:], tmp_path / "out", operator("paper", lam=lam, alpha=alpha),
                            progress=False)
    readers = [CheckpointReader(p) for p in paths]
    merged = CheckpointReader(out)
    k = merge_weights(4, lam, alpha)
    u = 2.0**-24  # unit roundoff of float32
    exact_fraction = []
    for name in readers[0]:
        theta0 = readers[0].get(name).double()
        deltas = [r.get(name).double() - theta0 for r in readers[1:]]
        expected = theta0 + sum(kt * d for kt, d in zip(k, deltas))
        got = merged.get(name).double()
        # Bound: half an ulp of the result (the one rounding) + the roundings of the small deltas.
        ulp = (torch.nextafter(expected.float(), torch.tensor(float("inf"))).double() - expected.float().double()).abs()
        bound = ulp / 2 + 4 * u * sum(abs(kt) * d.abs() for kt, d in zip(k, deltas))
        assert ((got - expected).abs() <= bound).all(), name
        exact_fraction.append((got == expected.float().double()).double().mean().item())
    assert sum(exact_fraction) / len(exact_fraction) > 0.95  # nearly every element correctly rounded


def test_edge_cases_exact(tiny_ckpts, tmp_path):
    theta = [CheckpointReader(p) for p in tiny_ckpts]
    out_T = CheckpointReader(
        merge_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], tmp_path / "a", operator("paper", lam=0, alpha=0),
                          progress=False)
    )
    out_0 = CheckpointReader(
        merge_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], tmp_path / "b", operator("paper", lam=0.7, alpha=-1),
                          progress=False)
    )
    for name in theta[0]:
        assert torch.equal(out_T.get(name), theta[3].get(name))
        assert torch.equal(out_0.get(name), theta[0].get(name))


def test_output_directory_contents_and_record(tiny_ckpts, tmp_path):
    out = merge_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], tmp_path / "m", operator("paper", lam=0.3, alpha=0.4),
                            progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors", "merge.json"} <= names
    record = json.loads((out / "merge.json").read_text())
    assert record["weights"] == pytest.approx([0.21, 0.21, 0.98])
    assert record["reference_weight"] == pytest.approx(-0.4)
    assert record["reference"]["hash"] == CheckpointReader(tiny_ckpts[0]).content_hash()
    assert [c["hash"] for c in record["checkpoints"]] == [CheckpointReader(p).content_hash() for p in tiny_ckpts[1:]]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left behind
    assert model.config.num_hidden_layers == 2


def test_sharded_output_bf16_and_sharded_inputs(tiny_ckpts, tmp_path):
    # θ2 re-saved in shards with an index; θ3 in shards without one: any mix of layouts.
    def reshard(src: Path, dst: Path) -> Path:
        model = tiny_model(0)
        reader = CheckpointReader(src)
        model.load_state_dict({n: reader.get(n).clone() for n in reader}, strict=False)
        model.save_pretrained(dst, max_shard_size="20KB")
        return dst

    sharded = reshard(tiny_ckpts[2], tmp_path / "theta2")
    assert (sharded / "model.safetensors.index.json").exists()
    no_index = reshard(tiny_ckpts[3], tmp_path / "theta3")
    (no_index / "model.safetensors.index.json").unlink()
    ref = merge_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], tmp_path / "ref", operator("paper", lam=0.3, alpha=0.4),
                            progress=False)
    out = merge_checkpoints(
        tiny_ckpts[0], [tiny_ckpts[1], sharded, no_index], tmp_path / "out", operator("paper", lam=0.3, alpha=0.4),
        dtype=torch.bfloat16, max_shard_size="30KB", progress=False,
    )
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    merged, reference = CheckpointReader(out), CheckpointReader(ref)
    for name in reference:
        assert merged.dtype(name) == "BF16"
        assert torch.equal(merged.get(name), reference.get(name).bfloat16())
    assert json.loads((out / "config.json").read_text()).get("dtype") == "bfloat16"


def test_mean_cache_gives_the_same_merge(tiny_ckpts, tmp_path):
    cache = tmp_path / "cache"
    direct = CheckpointReader(
        merge_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], tmp_path / "d", operator("paper", lam=0.3, alpha=0.4),
                          progress=False)
    )
    cached = merge_checkpoints(
        tiny_ckpts[0], tiny_ckpts[1:], tmp_path / "c", operator("paper", lam=0.3, alpha=0.4), mean_cache=cache,
        progress=False
    )
    assert json.loads((cached / "merge.json").read_text())["mean_cache"] == str(cache)
    mean = CheckpointReader(cache)
    theta = [CheckpointReader(p) for p in tiny_ckpts]
    for name in theta[0]:
        assert torch.allclose(mean.get(name), (theta[1].get(name) + theta[2].get(name)) / 2, atol=1e-7)
        assert torch.allclose(CheckpointReader(cached).get(name), direct.get(name), atol=1e-6)
    # The in-memory merge of the search is bit-identical to the cached streamed merge.
    basis = MergeBasis.from_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], mean_cache=cache)
    model = tiny_model(5)
    basis.apply_to(model, 0.3, 0.4)
    state = model.state_dict()
    for name in theta[0]:
        assert torch.equal(state[name], CheckpointReader(cached).get(name))


def test_mean_checkpoint_records_hashes(tiny_ckpts, tmp_path):
    out = mean_checkpoint(tiny_ckpts[1:3], tmp_path / "mean", progress=False)
    record = json.loads((out / "mean.json").read_text())
    assert [i["hash"] for i in record["inputs"]] == [CheckpointReader(p).content_hash() for p in tiny_ckpts[1:3]]


def test_mergekit_config(tiny_ckpts):
    import yaml

    cfg = yaml.safe_load(mergekit_config(tiny_ckpts[0], tiny_ckpts[1:], [0.21, 0.0, 0.98], torch.bfloat16))
    assert cfg["merge_method"] == "task_arithmetic" and cfg["base_model"] == str(tiny_ckpts[0])
    assert cfg["parameters"] == {"normalize": False} and cfg["dtype"] == "float32" and cfg["out_dtype"] == "bfloat16"
    assert [(m["model"], m["parameters"]["weight"]) for m in cfg["models"]] == [
        (str(tiny_ckpts[1]), 0.21),
        (str(tiny_ckpts[3]), 0.98),
    ]


# --- bad inputs: a named error, and nothing left behind -----------------------------------------


def _assert_refused(tmp_path, reference, checkpoints, match, lam=0.0, alpha=0.4, weights=None, **kw):
    out = tmp_path / "out"
    with pytest.raises(ItermergeError, match=match):
        op = operator("paper", lam=lam, alpha=alpha, weights=weights)
        merge_checkpoints(reference, checkpoints, out, op, progress=False, **kw)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out")]


def test_refuses_mismatched_shapes_and_vocab(tiny_ckpts, tmp_path):
    other = save_tiny(tmp_path / "wide", tiny_model(0, intermediate_size=48))
    _assert_refused(tmp_path, tiny_ckpts[0], [tiny_ckpts[1], other], r"wide: tensor '.*mlp.*' has shape")
    vocab = save_tiny(tmp_path / "vocab", tiny_model(0, vocab_size=130))
    _assert_refused(tmp_path, tiny_ckpts[0], [vocab], r"vocab: vocab_size 130 differs .* 128")


def test_refuses_tied_vs_untied_and_other_architecture(tiny_ckpts, tmp_path):
    untied = save_tiny(tmp_path / "untied", tiny_model(0, tie_word_embeddings=False))
    _assert_refused(tmp_path, tiny_ckpts[0], [untied], r"untied: tie_word_embeddings=False")
    deeper = save_tiny(tmp_path / "deeper", tiny_model(0, num_hidden_layers=3))
    _assert_refused(tmp_path, tiny_ckpts[0], [deeper], r"deeper: tensor names differ .*extra")


def test_refuses_truncated_and_corrupt_safetensors(tiny_ckpts, tmp_path):
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_ckpts[1], truncated)
    f = truncated / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _assert_refused(
        tmp_path, tiny_ckpts[0], [truncated], r"truncated/model.safetensors: tensor .* truncated or corrupt"
    )
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_ckpts[1], corrupt)
    (corrupt / "model.safetensors").write_bytes(struct.pack("<Q", 40) + b"{not json" + b" " * 31)
    _assert_refused(tmp_path, tiny_ckpts[0], [corrupt], r"corrupt/model.safetensors: not a readable safetensors file")


def test_refuses_nan_input_and_overflowing_result(tiny_ckpts, tmp_path):
    bad = tiny_model(0)
    with torch.no_grad():
        bad.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    nan_dir = save_tiny(tmp_path / "nan", bad)
    _assert_refused(
        tmp_path, tiny_ckpts[0], [tiny_ckpts[1], nan_dir], r"nan: tensor 'model.layers.0.mlp.up_proj.weight' holds NaN"
    )
    _assert_refused(
        tmp_path,
        tiny_ckpts[0],
        tiny_ckpts[1:],
        r"overflows .* smaller \|alpha\|",
        lam=0.5,
        alpha=1e7,
        dtype=torch.float16,
    )


def test_refuses_pickle_missing_and_existing_output(tiny_ckpts, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    _assert_refused(
        tmp_path,
        tiny_ckpts[0],
        [pickled],
        r"pickled: only pickle weights \(pytorch_model.bin\); itermerge never unpickles",
    )
    _assert_refused(tmp_path, tiny_ckpts[0], [tmp_path / "nope"], r"nope: no such checkpoint directory")
    _assert_refused(
        tmp_path,
        tiny_ckpts[0],
        tiny_ckpts[1:],
        r"--weights has 2 values but there are 3",
        lam=None,
        alpha=None,
        weights=[0.5, 0.5],
    )
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(ItermergeError, match=r"exists: output directory exists; .* --force"):
        merge_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], existing, operator("paper", lam=0.3, alpha=0.4),
                          progress=False)
    assert (existing / "keep.txt").read_text() == "mine"
    merge_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], existing, operator("paper", lam=0.3, alpha=0.4), progress=False,
                      force=True)
    assert not (existing / "keep.txt").exists() and (existing / "merge.json").exists()


# --- the command line -----------------------------------------------------------------------------


def test_cli_merge_and_mergekit_export(tiny_ckpts, tmp_path, capsys):
    out, yml = tmp_path / "cli", tmp_path / "mk.yaml"
    argv = ["merge", "--reference", str(tiny_ckpts[0]), "--checkpoints", *map(str, tiny_ckpts[1:]),
            "--lam", "0.3", "--alpha", "0.4", "--out", str(out), "--emit-mergekit-config", str(yml), "--quiet"]
    assert main(argv) == 0
    assert (out / "model.safetensors").exists() and "task_arithmetic" in yml.read_text()
    assert main(argv) == 2  # exists, no --force
    assert "output directory exists" in capsys.readouterr().err
    weights = ["merge", "--reference", str(tiny_ckpts[0]), "--checkpoints", *map(str, tiny_ckpts[1:]),
               "--weights", "0.21,0.21,0.98", "--out", str(tmp_path / "w"), "--quiet"]
    assert main(weights) == 0
    a, b = CheckpointReader(out), CheckpointReader(tmp_path / "w")
    assert all(torch.equal(a.get(n), b.get(n)) for n in a)


def test_cli_bad_numbers(tiny_ckpts, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--reference", "x", "--checkpoints", "y", "--lam", "abc", "--out", str(tmp_path / "o")])
    assert "--lam 'abc': not a number" in capsys.readouterr().err
    assert main(["merge", "--reference", str(tiny_ckpts[0]), "--checkpoints", str(tiny_ckpts[1]),
                 "--lam", "0.3", "--alpha", "0", "--out", str(tmp_path / "o")]) == 2
    assert "θ̄ (the mean of θ1..θ_(T−1)) is undefined" in capsys.readouterr().err


# --- the streaming engine: blocks, hashes, odd tensors, start-up --------------------------------


def test_block_size_does_not_change_the_merge(tiny_ckpts, tmp_path, monkeypatch):
    """Blocks of 100 elements (tensors span many, ragged ends) give the same bytes as whole-tensor blocks."""
    whole = CheckpointReader(
        merge_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], tmp_path / "whole", operator("paper", lam=0.3, alpha=0.4),
                          progress=False)
    )
    monkeypatch.setattr("itermerge.checkpoint.dtypes.CHUNK", 100)
    assert max(whole.numel(n) for n in whole) > 10 * 100
    blocks = merge_checkpoints(
        tiny_ckpts[0], tiny_ckpts[1:], tmp_path / "blocks", operator("paper", lam=0.3, alpha=0.4), dtype="bfloat16",
        progress=False
    )
    got = CheckpointReader(blocks)
    for name in whole:
        assert torch.equal(got.get(name), whole.get(name).bfloat16()), name
    record = json.loads((blocks / "merge.json").read_text())
    assert [c["hash"] for c in record["checkpoints"]] == [CheckpointReader(p).content_hash() for p in tiny_ckpts[1:]]
    # Through θ̄'s cache, in blocks: still the in-memory point bit for bit.
    cached = CheckpointReader(merge_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], tmp_path / "cached",
                                                operator("paper", lam=0.3, alpha=0.4), mean_cache=tmp_path / "cache",
                                                progress=False))
    basis = MergeBasis.from_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], mean_cache=tmp_path / "cache")
    for name in whole:
        assert torch.equal(basis.merged_tensor(name, 0.3, 0.4), cached.get(name)), name


def test_hashes_of_inputs_the_merge_does_not_read(tiny_ckpts, tmp_path):
    # λ = 0: θ1, θ2 have k = 0 and are read only for merge.json's hashes.
    out = merge_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], tmp_path / "m", operator("paper", lam=0.0, alpha=0.5),
                            progress=False)
    record = json.loads((out / "merge.json").read_text())
    assert [c["hash"] for c in record["checkpoints"]] == [CheckpointReader(p).content_hash() for p in tiny_ckpts[1:]]
    assert len({c["hash"] for c in record["checkpoints"]}) == 3


def test_mean_cache_trusts_unchanged_files_and_rebuilds_on_change(tiny_ckpts, tmp_path):
    ckpts = [shutil.copytree(p, tmp_path / p.name) for p in tiny_ckpts]
    cache = tmp_path / "cache"
    merge_checkpoints(ckpts[0], ckpts[1:], tmp_path / "a", operator("paper", lam=0.3, alpha=0.4), mean_cache=cache,
                      progress=False)
    built = (cache / "mean.json").stat().st_mtime_ns
    merge_checkpoints(ckpts[0], ckpts[1:], tmp_path / "b", operator("paper", lam=0.5, alpha=0.0), mean_cache=cache,
                      progress=False)
    assert (cache / "mean.json").stat().st_mtime_ns == built  # reused
    # θ1 rewritten with other weights: the recorded stats and hash no longer match, so θ̄ is rebuilt.
    shutil.copy2(tiny_ckpts[3] / "model.safetensors", ckpts[1] / "model.safetensors")
    out = merge_checkpoints(ckpts[0], ckpts[1:], tmp_path / "c", operator("paper", lam=0.3, alpha=0.4),
                            mean_cache=cache, progress=False)
    record = json.loads((cache / "mean.json").read_text())
    assert record["inputs"][0]["hash"] == CheckpointReader(tiny_ckpts[3]).content_hash()
    assert json.loads((out / "merge.json").read_text())["checkpoints"][0]["hash"] == record["inputs"][0]["hash"]


def _raw_checkpoint(path: Path, tensors: dict) -> Path:
    """A checkpoint written with our own writer: {name: (safetensors dtype, numpy array)}."""
    from itermerge.checkpoint import ShardedWriter

    path.mkdir()
    writer = ShardedWriter(path, [(n, a.shape, st) for n, (st, a) in tensors.items()])
    for name, (_, a) in tensors.items():
        writer.write(name, 0, a.reshape(-1))
    writer.close()
    (path / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return path


def test_integer_tensors_come_from_theta_T_and_fp8_is_refused(tmp_path):
    import numpy as np

    def ckpt(name, w, steps):
        return _raw_checkpoint(
            tmp_path / name, {"w": ("F32", np.array(w, dtype=np.float32)), "steps": ("I64", np.array([steps]))}
        )

    paths = [ckpt("t0", [1.0, 2.0], 0), ckpt("t1", [3.0, 2.0], 10), ckpt("t2", [1.0, 6.0], 20)]
    out = CheckpointReader(
        merge_checkpoints(paths[0], paths[1:], tmp_path / "int", operator("paper", weights=[0.5, 0.25]), progress=False)
    )
    assert out.read("w").tolist() == [2.0, 3.0] and out.read("steps").tolist() == [20] and out.dtype("steps") == "I64"
    fp8 = _raw_checkpoint(
        tmp_path / "fp8", {"w": ("F8_E4M3", np.array([1, 2], dtype=np.uint8)), "steps": ("I64", np.array([0]))}
    )
    _assert_refused(tmp_path, fp8, [fp8], r"fp8: tensor 'w' is F8_E4M3; .* dequantise")


def test_refuses_safetensors_with_holes(tiny_ckpts, tmp_path):
    holed = tmp_path / "holed"
    shutil.copytree(tiny_ckpts[1], holed)
    with open(holed / "model.safetensors", "ab") as f:
        f.write(b"\0" * 16)
    _assert_refused(tmp_path, tiny_ckpts[0], [holed], r"holed/model.safetensors: 16 bytes after the last tensor")


def test_merge_command_never_imports_torch(tiny_ckpts, tmp_path):
    """Start-up is most of a merge's time: the streamed path stays numpy-only."""
    import subprocess
    import sys

    code = (
        "import sys; from itermerge.cli import main; "
        f"rc = main(['merge', '--reference', {str(tiny_ckpts[0])!r}, "
        f"'--checkpoints', *{[str(p) for p in tiny_ckpts[1:]]!r}, "
        f"'--lam', '0.3', '--alpha', '0.4', '--out', {str(tmp_path / 'o')!r}, '--quiet']); "
        "assert rc == 0; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_a_hub_id_reference_reads_the_cached_snapshot(tiny_ckpts, tmp_path, monkeypatch):
    """θ0 named by its Hub id (as examples/llama3-8b-armorm.yaml does): the merge reads the snapshot in the Hugging
    Face cache (offline here: a cache laid out as huggingface_hub lays it out); an id not in the cache is named."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny-theta0" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_ckpts[0], snapshot)
    (cache / "models--org--tiny-theta0" / "refs").mkdir()
    (cache / "models--org--tiny-theta0" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    by_id = merge_checkpoints("org/tiny-theta0", tiny_ckpts[1:], tmp_path / "by-id",
                              operator("paper", lam=0.3, alpha=0.4))
    by_dir = merge_checkpoints(tiny_ckpts[0], tiny_ckpts[1:], tmp_path / "by-dir",
                               operator("paper", lam=0.3, alpha=0.4))
    a, b = CheckpointReader(by_id), CheckpointReader(by_dir)
    assert all(torch.equal(a.get(n), b.get(n)) for n in a)
    assert CheckpointReader("org/tiny-theta0").path == snapshot
    with pytest.raises(ItermergeError, match=r"org/absent: not in the local Hugging Face cache"):
        CheckpointReader("org/absent")


def test_merge_basis_holds_no_copy_of_the_model(tmp_path, monkeypatch):
    """Issue 23 item 11: under a launcher every process builds a basis; it must not hold θ0 and two deltas in
    float32 (3× the model per process, ~96 GB each for an 8B model), only block buffers while it merges."""
    import os
    import tracemalloc

    from itermerge.checkpoint import dtypes

    wide = dict(vocab_size=16384, hidden_size=256, intermediate_size=512)  # ~10M parameters: many blocks
    paths = [save_tiny(tmp_path / "theta0", tiny_model(0, **wide))]
    for t in (1, 2, 3):
        m = tiny_model(0, **wide)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * t)
        paths.append(save_tiny(tmp_path / f"theta{t}", m))
    model = tiny_model(1, **wide)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # the merge's threads, each with its block buffers
    block_buffers = 2 * 10 * dtypes.CHUNK * 8  # per thread: raw and float32 per input, two deltas, one scratch
    assert 3 * model_bytes > block_buffers + model_bytes / 4  # holding θ0 and two deltas would fail the bound
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        basis = MergeBasis.from_checkpoints(paths[0], paths[1:], mean_cache=tmp_path / "cache")
        built = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        basis.apply_to(model, 0.3, 0.4)
        applying = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert built - before < model_bytes / 4  # the readers' headers; θ̄'s cache went to disk
    assert applying - built < block_buffers + model_bytes / 4
    paper = operator("paper", lam=0.3, alpha=0.4)
    merged = CheckpointReader(merge_checkpoints(paths[0], paths[1:], tmp_path / "m", paper,
                                                mean_cache=tmp_path / "cache", progress=False))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), merged.get(name)), name
