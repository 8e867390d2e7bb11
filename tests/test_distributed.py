"""Every stage on every process: `accelerate launch` with two CPU processes (gloo) runs the whole paper — iterate,
search, test, every study, report — shares each stage's work out, and gives one process's results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import save_tiny, tiny_model

from itermerge.checkpoint import CheckpointReader
from itermerge.config import from_dict
from itermerge.errors import ItermergeError
from itermerge.pipeline import run

SHARED = ["iter_01/samples", "iter_02/reference_logprobs", "search", "test_eval", "studies/alpha",
          "studies/accuracy/sets", "studies/accuracy", "studies/ensemble", "studies/lambda"]


def launch(args: list[str], processes: int = 2, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` of the itermerge CLI on CPU processes talking over gloo. (accelerate's own --cpu flag
    starts a single process; its multi-process launcher with ACCELERATE_USE_CPU gives MULTI_CPU.)"""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "itermerge.cli"]
    # PYTHONFAULTHANDLER: a rank killed by a signal (an abort in C++) prints every thread's Python stack
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
           **(env or {})}
    return subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=900, env=env)


def failure(done: subprocess.CompletedProcess, tail: int = 3000) -> str:
    """What a failed launch printed that says why: every line of its stderr that names an error (the first rank to
    fail often printed its traceback long before the launcher's own report, which fills the tail), then the tail."""
    lines = done.stderr.splitlines()
    words = ("Error", "error:", "Traceback", "terminate", "Exception", "FAILED", "Fatal Python", 'File "')
    marked = [f"{i}: {line}" for i, line in enumerate(lines) if any(w in line for w in words)]
    return "\n".join(["lines naming an error:", *marked[:60], "", "the tail:", done.stderr[-tail:]])


def whole_paper(theta0: Path) -> dict:
    return {
        "name": "tiny", "iterations": 2, "seed": 3, "model": {"path": str(theta0)},
        "prompts": {"per_iteration": 8, "dev": 6, "max_prompt_length": 128},
        "sampling": {"n": 4, "max_new_tokens": 8, "batch_size": 16},
        "dpo": {"learning_rate": 1e-3, "global_batch_size": 4, "micro_batch_size": 2, "max_length": 256,
                "max_prompt_length": 128},
        "evaluation": {"max_new_tokens": 8, "batch_size": 16},
        "search": {"lams": [0.0, 0.5], "alphas": [0.0, 0.5]},
        "studies": {"alphas": [0.0, 0.5, 1.0], "prompts": 4, "n": 2, "lambda_study": True},
    }


@pytest.fixture(scope="module")
def theta0(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("theta0") / "theta0", tiny_model(0))


def test_two_processes_share_every_stage_and_give_one_process_results(theta0, tmp_path):
    cfg = whole_paper(theta0)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    done = launch(["run", str(tmp_path / "cfg.yaml"), "--run-dir", str(tmp_path / "two")])
    assert done.returncode == 0, failure(done)
    run(from_dict(cfg), tmp_path / "one")
    one, two = tmp_path / "one", tmp_path / "two"
    stages = json.loads((two / "manifest.json").read_text())["stages"]
    for name in SHARED:  # each process did its share, about half, and the shares cover the stage
        shares = stages[name]["shards"]
        assert [s["rank"] for s in shares] == [0, 1], name
        items = [s["items"] for s in shares]
        alone = json.loads((one / "manifest.json").read_text())["stages"][name]["shards"][0]["items"]
        assert sum(items) == alone and max(items) - min(items) <= 1, (name, items)
    for name in ("choice.json", "test.json"):
        a, b = (json.loads((d / "search" / name).read_text()) for d in (one, two))
        if name == "choice.json":
            assert (a["lam"], a["alpha"]) == (b["lam"], b["alpha"])
        else:
            assert [m["name"] for m in a["models"]] == [m["name"] for m in b["models"]]
            for ma, mb in zip(a["models"], b["models"]):
                for metric, value in ma["metrics"].items():
                    assert mb["metrics"][metric]["value"] == pytest.approx(value["value"], abs=1e-6), metric
    ra, rb = CheckpointReader(one / "iter_02" / "model"), CheckpointReader(two / "iter_02" / "model")
    for name in ra:
        torch.testing.assert_close(rb.get(name), ra.get(name), atol=1e-5, rtol=0, msg=name)  # DDP's averaging
    assert (two / "report.md").exists() and (two / "studies" / "lambda" / "lambda.json").exists()
    assert not (two / ".shards").exists() or not any((two / ".shards").iterdir())


def test_every_model_outside_training_loads_on_the_configured_device_and_dtype(theta0, tmp_path, monkeypatch):
    """model.dtype: bfloat16 on the CPU is honoured by sampling, θ0's log-probs, the search, the test and every
    study; only training reads float32 (its master weights)."""
    import itermerge.checkpoint.hf as hf

    real, calls = hf.load_model, []

    def spy(path, dtype="float32", device="cpu", *args, **kwargs):
        calls.append((str(path), str(dtype).removeprefix("torch."), str(device)))
        return real(path, dtype, device, *args, **kwargs)

    monkeypatch.setattr(hf, "load_model", spy)
    cfg = whole_paper(theta0)
    cfg["model"].update(dtype="bfloat16", device="cpu")
    cfg["studies"]["lambda_study"] = False
    run(from_dict(cfg), tmp_path / "bf16")
    training = [c for c in calls if c[1] == "float32"]
    assert len(training) == 2 and all(c[2] == "cpu" for c in calls)  # θ1 and θ2 trained from float32 reads
    assert len(calls) - len(training) > 10 and {c[1] for c in calls} == {"bfloat16", "float32"}
    test = json.loads((tmp_path / "bf16" / "search" / "test.json").read_text())
    assert {m["name"] for m in test["models"]} >= {"θ0", "Iter 2"}


def test_an_accelerator_that_sees_fewer_processes_than_launched_is_named(monkeypatch):
    """accelerate's DeepSpeed plugin on a machine without a GPU gives every rank a one-process state (issue 23 item
    13; seen with deepspeed 0.19.8 and examples/accelerate_zero3.yaml on this CPU): the run used to fail later with
    "run directory in use"; now at once, naming the cause and the fix."""
    import accelerate

    from itermerge.pipeline import launcher_accelerator

    seen = {"n": 1}
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kw: SimpleNamespace(
        num_processes=seen["n"], distributed_type="DistributedType.DEEPSPEED"))  # as deepspeed 0.19.8 on a CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("DEEPSPEED_TIMEOUT", "1")
    with pytest.raises(ItermergeError, match=r"WORLD_SIZE = 2 processes were launched, but accelerate's Accelerator "
                                             r"sees 1 .*DeepSpeed plugin starts no process group without a GPU.*"
                                             r"ACCELERATE_USE_CPU=true accelerate launch --multi_gpu"):
        launcher_accelerator()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    with pytest.raises(ItermergeError, match=r"sees 1 \(DistributedType.DEEPSPEED\): check the launcher's config"):
        launcher_accelerator()
    seen["n"] = 2
    assert launcher_accelerator().num_processes == 2


def test_the_cli_ends_the_process_group_its_command_started_and_leaves_a_callers(monkeypatch, tmp_path):
    """A command that starts a group (as `itermerge run` does under a launcher) ends it before `main` returns, so the
    interpreter's teardown never meets gloo's threads still running; a group the caller made before is left alone."""
    import torch.distributed as dist

    from itermerge import cli

    def starts_a_group(args):
        store = dist.FileStore(str(tmp_path / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)

    monkeypatch.setattr(cli, "cmd_report", starts_a_group)
    assert cli.main(["report", str(tmp_path)]) == 0
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "callers"), 1), rank=0, world_size=1)
    try:
        monkeypatch.setattr(cli, "cmd_report", lambda args: None)
        assert cli.main(["report", str(tmp_path)]) == 0
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
