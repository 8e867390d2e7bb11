"""The vLLM backend against a fake engine with vLLM's signatures (tests/fake_vllm): the engine (seeds, weights) in
this process, and the engine's own process as the run uses it (launch, weights by file, teardown)."""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from itermerge.errors import ItermergeError
from itermerge.sampling import SamplingParams, make_sampler, prompt_seeds
from itermerge.sampling.vllm import SUPPORTED, VLLMEngine, check_version
from itermerge.sampling.vllm_process import VLLMSampler, engine_env, weights_for_file

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
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(FAKE), os.environ.get("PYTHONPATH")) if p))
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


def test_the_engine_is_a_plain_one_process_engine(fake_vllm, checkpoint):
    s = VLLMEngine(checkpoint, tensor_parallel_size=2, gpu_memory_utilization=0.5, seed=3)
    assert s.llm.init_kwargs == dict(model=checkpoint, dtype="bfloat16", tensor_parallel_size=2,
                                     gpu_memory_utilization=0.5, seed=3)
    assert s.llm.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and not s.llm.multiprocess
    assert s.eos_ids == [2, 7]


def test_a_ranks_engine_process_sees_its_own_gpu_and_no_launcher():
    """The launcher's variables stay with the run (the engine's process is a plain one-process engine); under a
    launcher its GPU is the LOCAL_RANK-th of the visible ones."""
    run = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x", "ACCELERATE_MIXED_PRECISION": "bf16",
           "CUDA_VISIBLE_DEVICES": "4,5", "HF_HOME": "/hf", "PYTHONPATH": "/mine"}
    env = engine_env(run, world_size=4, local_rank=1)
    assert {k: env[k] for k in env if k != "PYTHONPATH"} == {"CUDA_VISIBLE_DEVICES": "5", "HF_HOME": "/hf",
                                                               "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    source = str(Path(__file__).resolve().parents[1] / "src")
    assert env["PYTHONPATH"].split(os.pathsep) == [source, "/mine"]
    assert engine_env({"WORLD_SIZE": "2"}, 2, 1)["CUDA_VISIBLE_DEVICES"] == "1"  # none listed: the rank's own
    one = engine_env({"CUDA_VISIBLE_DEVICES": "0,1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, 1, 0)
    assert one["CUDA_VISIBLE_DEVICES"] == "0,1" and one["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"  # tp may use both
    with pytest.raises(ItermergeError, match=r"LOCAL_RANK = 2 but CUDA_VISIBLE_DEVICES = '4,5' names 2 device"):
        engine_env(run, world_size=4, local_rank=2)


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
        VLLMEngine(checkpoint)


def test_missing_vllm_names_the_extra(monkeypatch, checkpoint):
    """In the engine's process (where vLLM is imported), and from there to the run's, named."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ItermergeError, match=r"pip install 'itermerge\[vllm\]'"):
        VLLMEngine(checkpoint)
    monkeypatch.setenv("PYTHONPATH", str(Path(checkpoint)))  # no vllm there (nor, here, in the test venv)
    if _importable_in_a_child("vllm"):
        pytest.skip("a real vllm is installed: the child would import it")
    with pytest.raises(ItermergeError, match=r"building the engine: .*pip install 'itermerge\[vllm\]'"):
        make_sampler("vllm", checkpoint)


def _importable_in_a_child(name: str) -> bool:
    import subprocess

    return subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True).returncode == 0


# ---------------------------------------------------------------- sampling


def test_requests_carry_per_prompt_seeds_and_stop_at_every_eos(fake_vllm, checkpoint):
    s = VLLMEngine(checkpoint)
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
    s = VLLMEngine(checkpoint)
    out = s.generate(PROMPTS[:2], SamplingParams(n=4, temperature=0, max_new_tokens=5))
    assert [sp.n for sp in s.llm.generate_calls[0]["params"]] == [1, 1]
    assert all(len(group) == 4 and all(x == group[0] for x in group) for group in out)


def test_sharding_prompts_across_two_processes_gives_the_samples_of_one(fake_vllm, checkpoint, monkeypatch):
    one = VLLMEngine(checkpoint).generate(PROMPTS, PARAMS)
    shards = {}
    for rank in (0, 1):
        s = VLLMEngine(checkpoint, seed=rank)
        assert s.llm.init_kwargs["seed"] == rank  # the engines' own seeds differ ...
        shards[rank] = s.generate(PROMPTS[rank::2], PARAMS)
    merged = [None] * len(PROMPTS)
    merged[0::2], merged[1::2] = shards[0], shards[1]
    assert merged == one  # ... the request seeds decide


# ---------------------------------------------------------------- weights in place


def test_update_weights_loads_the_tensors_and_resets_the_prefix_cache(fake_vllm, checkpoint):
    merged = {"model.embed_tokens.weight": torch.full((4, 2), 0.5), "lm_head.weight": torch.ones(4, 2)}
    s = VLLMEngine(checkpoint)
    before = s.generate(PROMPTS, PARAMS)
    assert s.update_weights(merged) == 2
    model = s.llm.model
    (loaded,) = model.load_calls
    assert [name for name, _ in loaded] == list(merged)
    assert all(t is merged[name] for name, t in loaded)  # the engine is in this process: no copy
    assert s.llm.apply_model_calls == 1 and s.llm.prefix_cache_resets == 1
    after = s.generate(PROMPTS, PARAMS)
    fresh = VLLMEngine(checkpoint)
    fresh.update_weights(list(merged.items()))
    assert after != before and after == fresh.generate(PROMPTS, PARAMS)  # no KV of the old weights reused


def test_update_weights_falls_back_to_the_driver_worker(fake_vllm, checkpoint, monkeypatch):
    monkeypatch.delattr(fake_vllm.LLM, "apply_model")  # as in vLLM before 0.6.5
    s = VLLMEngine(checkpoint)
    s.update_weights({"lm_head.weight": torch.ones(3)})
    assert [name for name, _ in s.llm.model.load_calls[0]] == ["lm_head.weight"]
    s.llm.llm_engine = object()  # nor the driver worker
    with pytest.raises(ItermergeError, match=r"neither LLM.apply_model nor llm_engine.model_executor"):
        s.update_weights({"lm_head.weight": torch.ones(3)})


def test_update_weights_mistakes_are_named(fake_vllm, checkpoint, monkeypatch):
    s = VLLMEngine(checkpoint)
    with pytest.raises(ItermergeError, match="no tensors given"):
        s.update_weights({})
    monkeypatch.setattr(s.llm, "reset_prefix_cache", lambda: False)
    with pytest.raises(ItermergeError, match="refused to empty its prefix cache"):
        s.update_weights({"lm_head.weight": torch.ones(3)})


def test_weights_reach_an_engine_in_another_process_by_pickle(fake_vllm, checkpoint, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the user's choice is kept
    s = VLLMEngine(checkpoint)
    assert s.llm.multiprocess
    s.update_weights({"lm_head.weight": torch.ones(3)})
    assert torch.equal(s.llm.model.weights["lm_head.weight"], torch.ones(3))


# ---------------------------------------------------------------- the engine's process


def test_the_engines_process_samples_and_loads_weights_as_the_engine_does(fake_vllm, checkpoint):
    """Through the engine's process: the same samples as the engine here, weights by file, and the process gone
    after close (its exit code 0)."""
    merged = {"model.embed_tokens.weight": torch.full((4, 2), 0.5), "lm_head.weight": torch.ones(4, 2)}
    here = VLLMEngine(checkpoint)
    with VLLMSampler(checkpoint) as s:
        assert s.eos_ids == [2, 7] and s.process.poll() is None
        assert s.generate(PROMPTS, PARAMS) == here.generate(PROMPTS, PARAMS)
        assert s.update_weights(merged) == 2 and here.update_weights(merged) == 2
        assert s.generate(PROMPTS, PARAMS) == here.generate(PROMPTS, PARAMS) != []
        with pytest.raises(ItermergeError, match="no tensors given"):
            s.update_weights({})
        assert s.generate([], PARAMS) == []
        process = s.process
    assert process.poll() == 0 and s.exit_code == 0 and s.close() == {} == s.memory_after_close  # no CUDA here
    for call in (lambda: s.generate(PROMPTS, PARAMS), lambda: s.update_weights({"w": torch.ones(1)})):
        with pytest.raises(ItermergeError, match=r"the engine was closed .* build a new VLLMSampler"):
            call()


def test_an_error_in_the_engines_process_comes_back_named(fake_vllm, checkpoint):
    with VLLMSampler(checkpoint) as s:
        with pytest.raises(ItermergeError, match=r"vLLM engine process, generate: AttributeError: .*seed"):
            s.generate([[1, 2]], "not SamplingParams")
        assert s.generate(PROMPTS[:1], PARAMS)  # it goes on serving
        s.process.kill()
        s.process.wait()
        with pytest.raises(ItermergeError, match=r"ended while generate, exit code -9 .*-9: killed"):
            s.generate(PROMPTS[:1], PARAMS)
    with pytest.raises(ItermergeError, match=r"building the engine: TypeError: .*'bogus'"):
        VLLMSampler(checkpoint, engine_options={"bogus": 1})


def test_weights_for_the_file_are_on_the_cpu_and_share_no_memory(tmp_path):
    """A tied output layer is the embedding's tensor: safetensors refuses shared tensors, so it is copied."""
    embed = torch.arange(6.0).reshape(3, 2)
    fused = torch.arange(4.0)
    out = weights_for_file([("embed", embed), ("lm_head", embed), ("q", fused[:2]), ("k", fused[2:])])
    assert list(out) == ["embed", "lm_head", "q", "k"]
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert ptr(out["embed"]) == ptr(embed) and ptr(out["q"]) == ptr(fused)  # not copied ...
    assert ptr(out["lm_head"]) != ptr(embed) and ptr(out["k"]) != ptr(fused)  # ... unless shared
    assert torch.equal(out["lm_head"], embed) and torch.equal(out["k"], fused[2:])
    from safetensors.torch import save_file

    save_file(out, str(tmp_path / "w.safetensors"))  # refused ("Some tensors share memory") without the copies


def test_closing_the_engine_leaves_the_runs_process_group(fake_vllm, checkpoint, tmp_path):
    """vLLM's engine core, dropped in the process that made it, destroys torch's default process group (issue 23
    item 4, see sampling/vllm_process.py); the engine in its own process cannot touch the run's."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    with VLLMEngine(checkpoint) as here:  # the engine in this process, as before: its finalizer ends the group
        here.generate(PROMPTS[:1], PARAMS)
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg2'}", rank=0, world_size=1)
    try:
        with VLLMSampler(checkpoint) as s:
            s.generate(PROMPTS[:1], PARAMS)
        assert dist.is_initialized()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_close_records_gpu_memory_after_the_engine_is_gone(fake_vllm, checkpoint, monkeypatch):
    gib = 2**30
    s = VLLMSampler(checkpoint)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: gib // 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, **k: (70 * gib, 80 * gib))
    assert s.close() == {"gpu_allocated_gib": 0.5, "gpu_free_gib": 70.0, "gpu_total_gib": 80.0}
    assert s.exit_code == 0


# ---------------------------------------------------------------- the backend inside a run's stages


def _count_engines(monkeypatch) -> dict[str, int]:
    """How many engine processes were started, how many weight loads, how many closes (spied in this process)."""
    counts = {"started": 0, "loads": 0, "closed": 0}
    init, load, close = VLLMSampler.__init__, VLLMSampler.update_weights, VLLMSampler.close

    def spy(name, fn):
        def wrapper(self, *a, **k):
            counts[name] += 1
            return fn(self, *a, **k)
        return wrapper

    monkeypatch.setattr(VLLMSampler, "__init__", spy("started", init))
    monkeypatch.setattr(VLLMSampler, "update_weights", spy("loads", load))
    monkeypatch.setattr(VLLMSampler, "close", spy("closed", close))
    return counts


def test_the_search_loads_every_point_into_one_engine_and_ends_it(fake_vllm, tiny_ckpts, tmp_path, monkeypatch):
    """sampling.backend: vllm — the search starts one engine from θT, loads each evaluated model's weights into it
    (4 merges and θ0..θ2, never written as checkpoints), and ends it with the stage."""
    from itermerge.config import from_dict
    from itermerge.devices import CPU
    from itermerge.sampling.backends import evaluation_sampler
    from itermerge.search.context import SearchContext
    from itermerge.search.driver import search

    counts = _count_engines(monkeypatch)
    cfg = from_dict({"model": {"path": str(tiny_ckpts[0])}, "sampling": {"backend": "vllm"},
                     "evaluation": {"prompts": {"n": 3}, "max_new_tokens": 4},
                     "search": {"lams": [0.0, 0.5], "alphas": [0.0, 0.5]}})
    choice = search(SearchContext(tmp_path / "search", tiny_ckpts[0], tiny_ckpts[1:], cfg.evaluation, cfg.search,
                                  mean_cache=tmp_path / "mean", progress=False,
                                  samplers=partial(evaluation_sampler, cfg, CPU, tiny_ckpts[-1])))
    assert (choice["lam"], choice["alpha"]) in {(0.0, 0.0), (0.0, 0.5), (0.5, 0.0), (0.5, 0.5)}
    assert counts == {"started": 1, "loads": 4 + 3, "closed": 1}
    assert not any(tmp_path.glob("search/*merged*"))


def test_the_sampling_stage_shares_prompts_across_processes_each_with_its_own_engine(fake_vllm, tiny_ckpts,
                                                                                     monkeypatch):
    """Iteration 1's samples with sampling.backend: vllm: each process's engine samples its share and is ended before
    the scorer runs; the two shares together are exactly one process's samples (per-prompt seeds)."""
    from itermerge import iteration
    from itermerge.config import from_dict
    from itermerge.prompts import training_prompts
    from itermerge.runner import Shard

    counts = _count_engines(monkeypatch)
    cfg = from_dict({"model": {"path": str(tiny_ckpts[0])}, "sampling": {"backend": "vllm", "n": 2,
                                                                          "max_new_tokens": 6},
                     "prompts": {"per_iteration": 5}})
    prompts = training_prompts(cfg, 1)
    one = iteration.sample_shard(cfg, 1, tiny_ckpts[0], prompts, Shard())
    halves = [iteration.sample_shard(cfg, 1, tiny_ckpts[0], prompts, Shard(rank, 2)) for rank in (0, 1)]
    assert counts == {"started": 3, "loads": 0, "closed": 3}
    key = lambda c: (c.prompt_id, c.index)  # noqa: E731
    assert sorted(halves[0]["completions"] + halves[1]["completions"], key=key) == sorted(one["completions"], key=key)
    assert len(halves[0]["completions"]) == 6 and len(halves[1]["completions"]) == 4


def test_a_rank_with_no_items_starts_no_engine(fake_vllm, tiny_ckpts, monkeypatch):
    """Each rank's engine is its own (no collective at its build), so a stage with fewer items than ranks (a grid, or
    the α study's 5 values, on 8 GPUs) neither waits for nor starts one on an idle rank (issue 23 item 6)."""
    from itermerge.config import from_dict
    from itermerge.runner import Shard
    from itermerge.studies.stages import accuracy_sets_work

    counts = _count_engines(monkeypatch)
    cfg = from_dict({"model": {"path": str(tiny_ckpts[0])}, "sampling": {"backend": "vllm"}})
    launched(monkeypatch, rank=5, world_size=8)
    assert accuracy_sets_work(cfg, list(tiny_ckpts), Shard(rank=5, world=8)) == {}  # 4 policies, this is rank 5
    assert counts["started"] == 0
