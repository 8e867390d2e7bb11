"""The vLLM backend against a fake engine with vLLM's signatures (tests/fake_vllm): launch, seeds, weights, teardown."""

from __future__ import annotations

import json
import sys
import weakref
from functools import partial
from pathlib import Path

import pytest
import torch

from itermerge.errors import ItermergeError
from itermerge.sampling import SamplingParams, make_sampler, prompt_seeds
from itermerge.sampling.vllm import SUPPORTED, VLLMSampler, check_version

FAKE = Path(__file__).parent / "fake_vllm"
ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING")
PROMPTS = [[5, 6, 7], [8, 9], [10], [11, 12, 13, 14], [15, 16]]
PARAMS = SamplingParams(n=3, max_new_tokens=6, seed=4)


def _drop_vllm_modules() -> None:
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture
def fake_vllm(monkeypatch):
    """The fake package importable as ``vllm`` for one test; one process (no launcher variables) by default."""
    for name in ENV:  # set, then delete: monkeypatch restores the variables, including ones the sampler sets
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.syspath_prepend(str(FAKE))
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    import vllm
    from vllm.distributed import parallel_state

    parallel_state.CALLS.clear()
    yield vllm
    _drop_vllm_modules()


@pytest.fixture
def checkpoint(tmp_path):
    """A model directory with only generation_config.json (the fake engine loads nothing): EOS ids 2 and 7."""
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    return str(tmp_path)


def launched(monkeypatch, rank: int, world_size: int = 2) -> None:
    """The environment ``accelerate launch`` / torchrun gives process ``rank`` on one node."""
    for name, value in dict(WORLD_SIZE=world_size, RANK=rank, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29500").items():
        monkeypatch.setenv(name, str(value))


# ---------------------------------------------------------------- building the engine


def test_one_process_builds_a_plain_engine_in_process(fake_vllm, checkpoint):
    s = VLLMSampler(checkpoint, tensor_parallel_size=2, gpu_memory_utilization=0.5)
    assert s.llm.init_kwargs == dict(model=checkpoint, dtype="bfloat16", tensor_parallel_size=2,
                                     gpu_memory_utilization=0.5, seed=0)
    assert s.llm.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and not s.llm.multiprocess
    assert (s.world_size, s.rank, s.device, s.eos_ids) == (1, 0, "cuda:0", [2, 7])


def test_a_launched_process_builds_its_own_engine_on_its_gpu(fake_vllm, checkpoint, monkeypatch):
    launched(monkeypatch, rank=1)
    s = VLLMSampler(checkpoint, progress=True)
    kw = s.llm.init_kwargs
    assert (kw["distributed_executor_backend"], kw["tensor_parallel_size"], kw["seed"]) == ("external_launcher", 1, 1)
    assert s.llm.device == s.device == "cuda:1"
    assert (s.world_size, s.rank) == (2, 1)
    s.generate(PROMPTS[:1], PARAMS)
    assert s.llm.generate_calls[0]["use_tqdm"] is False  # one progress bar, on rank 0


def test_launch_mistakes_are_named(fake_vllm, checkpoint, monkeypatch):
    launched(monkeypatch, rank=0)
    with pytest.raises(ItermergeError, match=r"tensor_parallel_size = 2 under a 2-process launch.*set it to 1"):
        VLLMSampler(checkpoint, tensor_parallel_size=2)
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(ItermergeError, match=r"WORLD_SIZE = 2 but MASTER_PORT unset.*accelerate launch"):
        VLLMSampler(checkpoint)


def test_versions_outside_the_range_are_refused(fake_vllm, checkpoint, monkeypatch):
    for ok in ("0.8.3", "0.10.1+cu126", "0.11.0rc1", "0.29.0", "0.32.0"):
        check_version(ok)
    for bad in ("0.8.2", "0.6.3", "0.33.0", "1.0.0", "unknown"):
        with pytest.raises(ItermergeError, match=rf"{bad!r}, outside the supported range"):
            check_version(bad)
    monkeypatch.setattr(fake_vllm, "__version__", "0.7.3")
    with pytest.raises(ItermergeError, match=rf"'0.7.3'.*pip install 'vllm{SUPPORTED}'"):
        VLLMSampler(checkpoint)


def test_missing_vllm_names_the_extra(monkeypatch, checkpoint):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ItermergeError, match=r"pip install 'itermerge\[vllm\]'"):
        VLLMSampler(checkpoint)
    with pytest.raises(ItermergeError, match=r"pip install 'itermerge\[vllm\]'"):
        make_sampler("vllm", checkpoint)


# ---------------------------------------------------------------- sampling


def test_requests_carry_per_prompt_seeds_and_stop_at_every_eos(fake_vllm, checkpoint):
    s = VLLMSampler(checkpoint)
    out = s.generate(PROMPTS, PARAMS)
    (call,) = s.llm.generate_calls
    assert call["prompts"] == [{"prompt_token_ids": p} for p in PROMPTS]
    assert [sp.seed for sp in call["params"]] == prompt_seeds(PROMPTS, PARAMS.seed)
    assert all(sp.stop_token_ids == [2, 7] and sp.n == 3 and sp.top_k == -1 for sp in call["params"])
    assert [len(group) for group in out] == [3] * len(PROMPTS)
    samples = [x for group in out for x in group]
    assert any(x.finished for x in samples) and any(not x.finished for x in samples)
    assert all(x.token_ids[-1] in (2, 7) for x in samples if x.finished)
    assert all(len(x.token_ids) == 6 for x in samples if not x.finished)


def test_greedy_asks_one_sample_and_repeats_it(fake_vllm, checkpoint):
    s = VLLMSampler(checkpoint)
    out = s.generate(PROMPTS[:2], SamplingParams(n=4, temperature=0, max_new_tokens=5))
    assert [sp.n for sp in s.llm.generate_calls[0]["params"]] == [1, 1]
    assert all(len(group) == 4 and all(x == group[0] for x in group) for group in out)


def test_sharding_prompts_across_two_processes_gives_the_samples_of_one(fake_vllm, checkpoint, monkeypatch):
    one = VLLMSampler(checkpoint).generate(PROMPTS, PARAMS)
    shards = {}
    for rank in (0, 1):
        launched(monkeypatch, rank=rank)
        s = VLLMSampler(checkpoint)
        assert s.llm.init_kwargs["seed"] == rank  # the engines' own seeds differ ...
        shards[rank] = s.generate(PROMPTS[rank::2], PARAMS)
    merged = [None] * len(PROMPTS)
    merged[0::2], merged[1::2] = shards[0], shards[1]
    assert merged == one  # ... the request seeds decide


# ---------------------------------------------------------------- weights in place


def test_update_weights_loads_the_tensors_and_resets_the_prefix_cache(fake_vllm, checkpoint):
    merged = {"model.embed_tokens.weight": torch.full((4, 2), 0.5), "lm_head.weight": torch.ones(4, 2)}
    s = VLLMSampler(checkpoint)
    before = s.generate(PROMPTS, PARAMS)
    assert s.update_weights(merged) == 2
    model = s.llm.model
    (loaded,) = model.load_calls
    assert [name for name, _ in loaded] == list(merged)
    assert all(t is merged[name] for name, t in loaded)  # the engine is in this process: no copy
    assert s.llm.apply_model_calls == 1 and s.llm.prefix_cache_resets == 1
    after = s.generate(PROMPTS, PARAMS)
    fresh = VLLMSampler(checkpoint)
    fresh.update_weights(list(merged.items()))
    assert after != before and after == fresh.generate(PROMPTS, PARAMS)  # no KV of the old weights reused


def test_update_weights_falls_back_to_the_driver_worker(fake_vllm, checkpoint, monkeypatch):
    monkeypatch.delattr(fake_vllm.LLM, "apply_model")  # as in vLLM before 0.6.5
    s = VLLMSampler(checkpoint)
    s.update_weights({"lm_head.weight": torch.ones(3)})
    assert [name for name, _ in s.llm.model.load_calls[0]] == ["lm_head.weight"]
    s.llm.llm_engine = object()  # nor the driver worker
    with pytest.raises(ItermergeError, match=r"neither LLM.apply_model nor llm_engine.model_executor"):
        s.update_weights({"lm_head.weight": torch.ones(3)})


def test_update_weights_mistakes_are_named(fake_vllm, checkpoint, monkeypatch):
    s = VLLMSampler(checkpoint)
    with pytest.raises(ItermergeError, match="no tensors given"):
        s.update_weights({})
    monkeypatch.setattr(s.llm, "reset_prefix_cache", lambda: False)
    with pytest.raises(ItermergeError, match="refused to empty its prefix cache"):
        s.update_weights({"lm_head.weight": torch.ones(3)})


def test_weights_reach_an_engine_in_another_process_by_pickle(fake_vllm, checkpoint, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the user's choice is kept
    s = VLLMSampler(checkpoint)
    assert s.llm.multiprocess
    s.update_weights({"lm_head.weight": torch.ones(3)})
    assert torch.equal(s.llm.model.weights["lm_head.weight"], torch.ones(3))


# ---------------------------------------------------------------- teardown


def test_close_tears_down_and_releases_the_engine(fake_vllm, checkpoint):
    from vllm.distributed.parallel_state import CALLS

    s = VLLMSampler(checkpoint)
    engine = weakref.ref(s.llm)
    assert s.close() == {} == s.memory_after_close  # no CUDA here
    assert CALLS == ["destroy_model_parallel", "destroy_distributed_environment"]
    assert engine() is None
    for call in (lambda: s.generate(PROMPTS, PARAMS), lambda: s.update_weights({"w": torch.ones(1)})):
        with pytest.raises(ItermergeError, match=r"the engine was closed .* build a new VLLMSampler"):
            call()
    s.close()  # a second close does nothing
    assert len(CALLS) == 2


def test_close_leaves_a_process_group_it_did_not_create(fake_vllm, checkpoint, monkeypatch):
    from vllm.distributed.parallel_state import CALLS

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # accelerate's, set up before
    with VLLMSampler(checkpoint) as s:
        s.generate(PROMPTS[:1], PARAMS)
    assert s.llm is None and CALLS == ["destroy_model_parallel"]


def test_close_records_gpu_memory(fake_vllm, checkpoint, monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: gib // 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, **k: (70 * gib, 80 * gib))
    s = VLLMSampler(checkpoint)
    assert s.close() == {"gpu_allocated_gib": 0.5, "gpu_free_gib": 70.0, "gpu_total_gib": 80.0}


# ---------------------------------------------------------------- the backend inside a run's stages


def test_the_search_loads_every_point_into_one_engine_in_place_and_tears_it_down(fake_vllm, tiny_ckpts, tmp_path,
                                                                                 monkeypatch):
    """sampling.backend: vllm — the search builds one engine from θT, loads each evaluated model's weights into it
    (4 merges and θ0..θ2, never written to disk), resets its prefix cache each time, and closes it at the end."""
    import vllm.entrypoints.llm as fake
    from vllm.distributed.parallel_state import CALLS

    from itermerge.config import from_dict
    from itermerge.devices import CPU
    from itermerge.sampling.backends import evaluation_sampler
    from itermerge.search.context import SearchContext
    from itermerge.search.driver import search

    built, init = [], fake.LLM.__init__
    monkeypatch.setattr(fake.LLM, "__init__", lambda self, model, **kw: built.append(self) or init(self, model, **kw))
    cfg = from_dict({"model": {"path": str(tiny_ckpts[0])}, "sampling": {"backend": "vllm"},
                     "evaluation": {"prompts": {"n": 3}, "max_new_tokens": 4},
                     "search": {"lams": [0.0, 0.5], "alphas": [0.0, 0.5]}})
    choice = search(SearchContext(tmp_path / "search", tiny_ckpts[0], tiny_ckpts[1:], cfg.evaluation, cfg.search,
                                  mean_cache=tmp_path / "mean", progress=False,
                                  samplers=partial(evaluation_sampler, cfg, CPU, tiny_ckpts[-1])))
    assert (choice["lam"], choice["alpha"]) in {(0.0, 0.0), (0.0, 0.5), (0.5, 0.0), (0.5, 0.5)}
    (engine,) = built
    assert engine.init_kwargs["model"] == str(tiny_ckpts[-1])
    assert len(engine.model.load_calls) == 4 + 3 and engine.prefix_cache_resets == 4 + 3
    from itermerge.checkpoint import CheckpointReader

    last = dict(engine.model.load_calls[-1])  # θ2, the last model evaluated: its own weights went in
    assert torch.equal(last["model.norm.weight"], CheckpointReader(tiny_ckpts[2]).get("model.norm.weight"))
    assert CALLS[:1] == ["destroy_model_parallel"] and not any(tmp_path.glob("search/*merged*"))


def test_the_sampling_stage_shares_prompts_across_processes_each_with_its_own_engine(fake_vllm, tiny_ckpts, tmp_path):
    """Iteration 1's samples with sampling.backend: vllm: each process's engine samples its share and is torn down;
    the two shares together are exactly one process's samples (per-prompt seeds)."""
    from vllm.distributed.parallel_state import CALLS

    from itermerge import iteration
    from itermerge.config import from_dict
    from itermerge.prompts import training_prompts
    from itermerge.runner import Shard

    cfg = from_dict({"model": {"path": str(tiny_ckpts[0])}, "sampling": {"backend": "vllm", "n": 2,
                                                                          "max_new_tokens": 6},
                     "prompts": {"per_iteration": 5}})
    prompts = training_prompts(cfg, 1)
    one = iteration.sample_shard(cfg, 1, tiny_ckpts[0], prompts, Shard())
    assert CALLS.count("destroy_model_parallel") == 1  # the engine was torn down before the scorer ran
    halves = [iteration.sample_shard(cfg, 1, tiny_ckpts[0], prompts, Shard(rank, 2)) for rank in (0, 1)]
    assert CALLS.count("destroy_model_parallel") == 3
    key = lambda c: (c.prompt_id, c.index)  # noqa: E731
    assert sorted(halves[0]["completions"] + halves[1]["completions"], key=key) == sorted(one["completions"], key=key)
    assert len(halves[0]["completions"]) == 6 and len(halves[1]["completions"]) == 4


def test_under_a_launcher_every_process_builds_the_engine_even_with_no_items(fake_vllm, tiny_ckpts, monkeypatch):
    """An external_launcher engine's build runs collectives over every process: a process with no items of a stage
    (a grid, or the α study's 5 values, on 8 GPUs) must build it too, or the others wait until the timeout (issue 23
    item 6). The engine is built on entering the stage under a launcher, lazily on one process."""
    import vllm.entrypoints.llm as fake

    from itermerge.config import from_dict
    from itermerge.devices import CPU
    from itermerge.runner import Shard
    from itermerge.sampling.backends import evaluation_sampler
    from itermerge.studies.stages import accuracy_sets_work

    built, init = [], fake.LLM.__init__
    monkeypatch.setattr(fake.LLM, "__init__", lambda self, model, **kw: built.append(self) or init(self, model, **kw))
    cfg = from_dict({"model": {"path": str(tiny_ckpts[0])}, "sampling": {"backend": "vllm"}})
    with evaluation_sampler(cfg, CPU, tiny_ckpts[-1]):
        pass
    assert built == []  # one process: built when first asked for
    launched(monkeypatch, rank=1)
    with evaluation_sampler(cfg, CPU, tiny_ckpts[-1]) as make_sampler:
        assert len(built) == 1 and make_sampler is not None  # built on entry, no item asked for it
    # a study stage whose share of this process is empty still enters the sampler (2 policies, this is rank 5 of 8)
    assert accuracy_sets_work(cfg, list(tiny_ckpts), Shard(rank=5, world=8)) == {} and len(built) == 2
