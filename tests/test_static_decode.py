"""The static-cache decode path (sampling/static.py, sampling/slots.py): slots, refills, masks and positions on CPU
against HF generate and the growing-cache path; the CUDA graph capture itself only where a GPU is."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

import itermerge.sampling.static as static
from itermerge.config.run import SamplingConfig
from itermerge.sampling import SamplingParams
from itermerge.sampling.hf import HFSampler
from itermerge.sampling.slots import SlotBatch
from itermerge.sampling.static import StaticKV, cache_bytes, capacity_for, row_buckets, static_unsupported
from itermerge.tokenization import encode_messages

pytestmark = pytest.mark.numeric  # run again under a second kernel set: make test, ATEN_CPU_CAPABILITY=avx2

EOS = (2, 73)  # as test_sampling.sharp_model: 73 ends some greedy rows early, not others


def sharp(attn: str = "sdpa"):
    model = tiny_model(0, initializer_range=0.5, attn_implementation=attn)
    model.generation_config.eos_token_id = list(EOS)
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def sharp_model():
    return sharp()


@pytest.fixture(scope="module")
def prompts(tiny_tok):
    texts = ["hi", "what is 2+2?", "a much longer prompt than the others", "12*3=", "ok", "the sky is", "1+1"]
    return [encode_messages(tiny_tok, [{"role": "user", "content": t}]) for t in texts]


@pytest.fixture
def small_shapes(monkeypatch):
    """Buckets 1, 2, 3… and spans of 16 columns, so that a tiny run refills, packs rows down and changes spans."""
    monkeypatch.setattr(static, "SMALLEST_BUCKET", 1)
    monkeypatch.setattr(static, "SPAN_MIN", 16)


def static_sampler(model, tok, batch_size: int) -> HFSampler:
    """An HFSampler on the static-cache path without CUDA graphs: on CPU ``cuda_graphs`` never turns it on, so the
    test turns it on by hand; the steps then run eagerly, which is all that differs from a GPU."""
    sampler = HFSampler(model, tok, batch_size=batch_size, progress=False)
    assert not sampler.static_decoding
    sampler.static_decoding = True
    return sampler


def generate_reference(model, ids: list[int], max_new: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new)[0, len(ids) :].tolist()
    if any(t in EOS for t in out):  # generate pads after the first EOS
        out = out[: next(i for i, t in enumerate(out) if t in EOS) + 1]
    return out


def test_buckets_spans_and_capacity(small_shapes):
    assert row_buckets(3) == [1, 2, 3] and row_buckets(256, 8) == [8, 16, 32, 64, 128, 256]
    assert row_buckets(100, 8) == [8, 16, 32, 64, 100] and row_buckets(4, 8) == [4]
    assert capacity_for(70) == 80 and capacity_for(80) == 80
    kv = StaticKV(tiny_model(0), "cache", slots=5, capacity=80, graphs=False)
    assert kv.buckets == [1, 2, 4, 5] and kv.bucket_for(3) == 4
    assert [kv.span_for(n) for n in (1, 16, 17, 33, 65, 80)] == [16, 16, 32, 64, 80, 80]
    # keys and values × 2 layers × 5 slots × 2 kv heads × 80 columns × head dim 32/4 × 4 bytes
    assert cache_bytes(kv.model.config, 5, 80, torch.float32) == 2 * 2 * 5 * 2 * 80 * 8 * 4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])  # a boolean mask for SDPA, an additive one for eager attention
def test_greedy_equals_generate_token_for_token_through_refills_and_packing(tiny_tok, prompts, small_shapes,
                                                                           monkeypatch, attn):
    """7 prompts of different lengths in 3 slots: rows end early (EOS 73) or at the limit, waiting rows refill freed
    slots, the tail packs into smaller buckets, and the attended span grows; every row equals generate's."""
    model = sharp(attn)
    loads, moves, shapes = [], [], set()
    for name, log in (("load", loads), ("move", moves)):
        real = getattr(StaticKV, name)
        monkeypatch.setattr(StaticKV, name, lambda self, *a, _real=real, _log=log, **k: _log.append(1) or _real(
            self, *a, **k))
    real_step = StaticKV.step
    monkeypatch.setattr(StaticKV, "step", lambda self, rows, span: shapes.add((rows, span)) or real_step(
        self, rows, span))
    sampler = static_sampler(model, tiny_tok, batch_size=3)
    out = sampler.generate(prompts, SamplingParams(n=2, temperature=0, max_new_tokens=24))
    finished = []
    for ids, samples in zip(prompts, out):
        ref = generate_reference(model, ids, 24)
        assert samples[0].token_ids == ref and samples[1].token_ids == ref
        assert samples[0].finished == (ref[-1] in EOS)
        finished.append(samples[0].finished)
    assert any(finished) and not all(finished)  # both ways of ending
    assert len(loads) > 1 and moves  # rows joined a running batch, and rows moved down to a smaller bucket
    assert {r for r, _ in shapes} >= {1, 3} and len({s for _, s in shapes}) >= 2  # several widths and spans


@pytest.mark.parametrize("params", [
    SamplingParams(n=3, max_new_tokens=20, seed=7),
    SamplingParams(n=2, max_new_tokens=20, seed=3, temperature=0.8, top_k=6, top_p=0.9, presence_penalty=0.5,
                   frequency_penalty=0.3),
])
def test_samples_equal_the_growing_cache_path(sharp_model, tiny_tok, prompts, small_shapes, params):
    """Same seed, same draws: each row samples from its own uniforms in both paths, and the logits agree to float
    rounding (the static cache attends over a row's own columns, the growing one over a left-padded batch)."""
    growing = HFSampler(sharp_model, tiny_tok, batch_size=4, progress=False).generate(prompts, params)
    slots = static_sampler(sharp_model, tiny_tok, batch_size=4).generate(prompts, params)
    assert slots == growing
    texts = [s.text for row in slots for s in row]
    assert len(set(texts)) > len(texts) // 2


def test_the_static_cache_is_kept_between_calls_while_it_is_long_enough(sharp_model, tiny_tok, prompts):
    sampler = static_sampler(sharp_model, tiny_tok, batch_size=4)
    params = SamplingParams(n=2, max_new_tokens=8, seed=1)
    first = sampler.generate(prompts, params)
    kv = sampler.static_kv
    assert sampler.generate(prompts, params) == first and sampler.static_kv is kv
    sampler.generate(prompts[:1], SamplingParams(n=2, max_new_tokens=kv.capacity, seed=1))
    assert sampler.static_kv is not kv and sampler.static_kv.capacity >= kv.capacity + len(prompts[0])
    assert sampler.generate([], params) == []


def test_a_slot_holds_its_prompt_at_columns_from_zero(sharp_model, tiny_tok, prompts):
    """Prompts of different lengths prefilled together (left-padded) land in their slots unpadded: slot columns
    0 … P−1 hold what the prompt alone puts in a cache, and the slot's first logits are the prompt's."""
    sampler = HFSampler(sharp_model, tiny_tok, batch_size=4, progress=False)
    kv = StaticKV(sharp_model, sampler._cache_arg, slots=4, capacity=capacity_for(64), graphs=False)
    batch = SlotBatch(kv, sampler._forward, sampler._new_cache, SamplingParams(n=2, max_new_tokens=4),
                      sampler.eos_ids, sampler.pad_id, sampler.device)
    chosen = [prompts[2], prompts[0]]  # the longest and the shortest
    with torch.inference_mode():
        batch.admit(chosen, [(0, 0), (1, 0), (1, 1)], seeds=[1, 2])
        for slot, ids in ((0, chosen[0]), (1, chosen[1]), (2, chosen[1])):
            out = sharp_model(torch.tensor([ids]), use_cache=True)
            alone = out.past_key_values if hasattr(out, "past_key_values") else out.cache
            for layer, ref in zip(kv.cache.layers, alone.layers):
                torch.testing.assert_close(layer.keys[slot, :, : len(ids)], ref.keys[0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(layer.values[slot, :, : len(ids)], ref.values[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(kv.logits[slot], out.logits[0, -1], atol=1e-4, rtol=1e-4)
    assert list(batch.next_pos[:3]) == [len(chosen[0]), len(chosen[1]), len(chosen[1])]
    assert batch.width == 4 and batch.live == 3 and batch.rows[3] is None


def test_the_decode_step_never_reads_tensors_back_to_the_host(sharp_model, tiny_tok, prompts):
    """What CUDA graph capture needs, checked on CPU: the step, run on meta tensors (which have no values), makes
    no data-dependent Python decision (.item(), .tolist(), bool(tensor) raise there) and mixes no host tensor in."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:  # 5's rotary embedding skips a disabled autocast
        pytest.skip("transformers 4's rotary embedding enters torch.autocast('meta'), which torch refuses")
    sampler = HFSampler(sharp_model, tiny_tok, batch_size=4, progress=False)
    kv = StaticKV(sharp_model, sampler._cache_arg, slots=4, capacity=capacity_for(64), graphs=False)
    batch = SlotBatch(kv, sampler._forward, sampler._new_cache, SamplingParams(n=2, max_new_tokens=8),
                      sampler.eos_ids, sampler.pad_id, sampler.device)
    with torch.inference_mode():
        batch.admit(prompts[:2], [(0, 0), (0, 1), (1, 0)], seeds=[1, 2])
        kv.model = copy.deepcopy(sharp_model).to("meta")
        for layer in kv.cache.layers:
            layer.keys, layer.values = layer.keys.to("meta"), layer.values.to("meta")
        for name in ("tokens", "positions", "logits", "columns"):
            setattr(kv, name, getattr(kv, name).to("meta"))
        kv.step(4, kv.capacity)
        assert kv.logits.shape == (4, 128) and kv.logits.is_meta
        with pytest.raises(RuntimeError, match="meta"):  # the check has teeth: a host read does fail
            bool(kv.positions.max() > 0)


def test_cuda_graphs_stay_off_on_cpu(sharp_model, tiny_tok, prompts, monkeypatch):
    monkeypatch.setattr(SlotBatch, "__init__", lambda *a, **k: pytest.fail("static path taken on CPU"))
    params = SamplingParams(n=2, max_new_tokens=8, seed=4)
    on = HFSampler(sharp_model, tiny_tok, batch_size=4, progress=False, cuda_graphs=True)
    off = HFSampler(sharp_model, tiny_tok, batch_size=4, progress=False, cuda_graphs=False)
    assert not on.static_decoding and on.static_unsupported is None and on.static_kv is None
    assert on.generate(prompts, params) == off.generate(prompts, params) and on.static_kv is None


def test_cuda_graphs_is_a_sampling_setting_passed_to_the_hf_sampler():
    from itermerge.sampling.hf import hf_options

    assert SamplingConfig().cuda_graphs is True and not SamplingConfig(cuda_graphs=False).cuda_graphs

    class Run:
        sampling = SamplingConfig(cuda_graphs=False)

    assert hf_options(Run())["cuda_graphs"] is False  # type: ignore[arg-type]


def test_models_the_static_path_cannot_serve_are_named(sharp_model):
    assert static_unsupported(sharp_model) is None and static_unsupported(sharp("eager")) is None
    other = tiny_model(0)
    other.config._attn_implementation = "flex_attention"
    assert "flex_attention" in static_unsupported(other)
    sliding = tiny_model(0)
    sliding.config.layer_types = ["full_attention", "sliding_attention"]
    sliding.config.sliding_window = 4
    assert "sliding" in static_unsupported(sliding)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_cuda_graph_capture_replays_the_eager_step(tiny_tok, prompts, small_shapes):
    """On a GPU: steps are captured per (rows, span) and replayed; greedy still equals generate, and sampling with
    graphs gives exactly what the same static cache gives with the step run eagerly."""
    model = sharp().to("cuda")
    sampler = HFSampler(model, tiny_tok, batch_size=4, progress=False, cuda_graphs=True)
    assert sampler.static_decoding
    out = sampler.generate(prompts, SamplingParams(n=1, temperature=0, max_new_tokens=24))
    assert len(sampler.static_kv.graphs) >= 2 and sampler.static_kv.capture_seconds > 0  # several (rows, span)
    for ids, (sample,) in zip(prompts, out):
        with torch.inference_mode():
            ref = model.generate(torch.tensor([ids], device="cuda"), do_sample=False, max_new_tokens=24)
        ref = ref[0, len(ids) :].tolist()
        if any(t in EOS for t in ref):
            ref = ref[: next(i for i, t in enumerate(ref) if t in EOS) + 1]
        assert sample.token_ids == ref
    params = SamplingParams(n=4, max_new_tokens=24, seed=9)
    graphed = sampler.generate(prompts, params)
    sampler.static_kv.use_graphs = False
    assert sampler.generate(prompts, params) == graphed
