"""A run directory that cannot lie: one process per run directory, finished stages that prove their files, no
non-finite checkpoint, and a failing write that leaves the earlier state intact (tiny model, `itermerge iterate`)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import save_tiny, tiny_model
from test_pipeline import tiny_run_config

from itermerge.checkpoint import CheckpointReader
from itermerge.cli import main
from itermerge.config import from_dict
from itermerge.errors import ItermergeError
from itermerge.pipeline import iterate
from itermerge.rundir import atomic_dir, atomic_write_text


@pytest.fixture(scope="module")
def theta0(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("theta0") / "theta0", tiny_model(0))


@pytest.fixture(scope="module")
def undamaged(theta0, tmp_path_factory) -> Path:
    """T = 2 on the tiny model, never touched: what every repaired run must equal bit for bit."""
    run_dir = tmp_path_factory.mktemp("runs") / "clean"
    iterate(from_dict(tiny_run_config(theta0)), run_dir)
    return run_dir


def weights(path: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(path)
    return {n: reader.get(n).clone() for n in reader}


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)


def copy_run(undamaged: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(undamaged, run_dir)
    return run_dir


def stages_run(capsys) -> list[str]:
    return [line.split()[1].rstrip(":") for line in capsys.readouterr().out.splitlines() if line.startswith("── ")]


# --- one process per run directory ----------------------------------------------------------------------


def launch_iterate(config: Path, run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "itermerge.cli", "iterate", str(config), "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_lock(run_dir: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        lock = run_dir / ".lock"
        if lock.exists() and f'"pid": {proc.pid}' in lock.read_text():
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise AssertionError("the first process never took the lock")


SLOW = {"function": str(Path(__file__).parent / "verifiers" / "slow.py") + ":score"}  # 6 s an iteration


def test_a_second_process_on_a_locked_run_directory_is_refused(theta0, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(theta0, iterations=1, scorer=SLOW)))
    run_dir = tmp_path / "busy"
    first = launch_iterate(config, run_dir)
    wait_for_lock(run_dir, first)
    refused = rf"run directory in use by PID {first.pid} .*iterate.*wait for that process"
    with pytest.raises(ItermergeError, match=refused):
        iterate(from_dict(tiny_run_config(theta0, iterations=1, scorer=SLOW)), run_dir)
    assert first.wait(timeout=300) == 0, first.stdout.read()  # the first finished normally
    assert (run_dir / "iter_01" / "model" / "model.safetensors").exists()
    iterate(from_dict(tiny_run_config(theta0, iterations=1, scorer=SLOW)), run_dir)  # and let go of the lock


def test_a_killed_process_leaves_no_stale_lock(theta0, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(theta0, iterations=1, scorer=SLOW)))
    run_dir = tmp_path / "killed"
    first = launch_iterate(config, run_dir)
    wait_for_lock(run_dir, first)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL  # killed while it held the lock
    iterate(from_dict(tiny_run_config(theta0, iterations=1, scorer=SLOW)), run_dir)  # the kernel released the lock
    assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()


# --- finished stages prove their files --------------------------------------------------------------------


def test_a_deleted_model_is_retrained_and_equals_the_undamaged_run(theta0, undamaged, tmp_path, capsys):
    run_dir = copy_run(undamaged, tmp_path)
    shutil.rmtree(run_dir / "iter_02" / "model")
    capsys.readouterr()
    thetas = iterate(from_dict(tiny_run_config(theta0)), run_dir)
    out = capsys.readouterr().out
    assert "iter_02/train: its files changed since it finished (iter_02/model: missing); redoing it" in out
    assert same_weights(thetas[2], undamaged / "iter_02" / "model")


def test_a_truncated_jsonl_is_redone_and_what_follows_kept_when_it_comes_out_the_same(theta0, undamaged, tmp_path,
                                                                                     capsys):
    run_dir = copy_run(undamaged, tmp_path)
    pairs = run_dir / "iter_02" / "pairs.jsonl"
    pairs.write_bytes(pairs.read_bytes()[:100])
    capsys.readouterr()
    iterate(from_dict(tiny_run_config(theta0)), run_dir)
    out = capsys.readouterr().out
    assert "iter_02/pairs: its files changed since it finished (iter_02/pairs.jsonl: size" in out
    assert "iter_02/train" not in out  # the redone pairs are byte-identical: θ2 was trained on exactly them
    assert pairs.read_bytes() == (undamaged / "iter_02" / "pairs.jsonl").read_bytes()


def test_flipped_bytes_in_a_shard_are_found_and_the_iteration_redone(theta0, undamaged, tmp_path, capsys):
    run_dir = copy_run(undamaged, tmp_path)
    shard = run_dir / "iter_01" / "model" / "model.safetensors"
    stat = shard.stat()
    raw = bytearray(shard.read_bytes())
    raw[-8:] = bytes(b ^ 0xFF for b in raw[-8:])
    shard.write_bytes(bytes(raw))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same size and mtime: only the content tells
    assert main(["verify", str(run_dir)]) == 0  # the cheap check trusts size and mtime …
    with pytest.raises(SystemExit) as failed:
        main(["verify", str(run_dir), "--deep"])  # … the deep one reads the bytes
    assert failed.value.code == 1
    assert "iter_01/model: content changed" in capsys.readouterr().out
    thetas = iterate(from_dict(tiny_run_config(theta0)), run_dir, verify=True)
    assert "iter_01/train: its files changed" in capsys.readouterr().out
    assert same_weights(thetas[1], undamaged / "iter_01" / "model")
    assert same_weights(thetas[2], undamaged / "iter_02" / "model")


def test_a_changed_config_file_is_found_and_the_run_config_refused(theta0, undamaged, tmp_path, capsys):
    run_dir = copy_run(undamaged, tmp_path)
    config = run_dir / "iter_01" / "model" / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    capsys.readouterr()
    thetas = iterate(from_dict(tiny_run_config(theta0)), run_dir)
    assert "iter_01/model: files beside the weights changed" in capsys.readouterr().out
    assert config.read_text() == (undamaged / "iter_01" / "model" / "config.json").read_text()
    assert same_weights(thetas[2], undamaged / "iter_02" / "model")
    edited = yaml.safe_load((run_dir / "config.yaml").read_text())
    edited["dpo"]["learning_rate"] = 0.5
    (run_dir / "config.yaml").write_text(yaml.safe_dump(edited))
    assert main(["search", str(run_dir), "--lams", "0", "--alphas", "0"]) == 2  # refused, by name
    assert "this run was made with a different dpo section" in capsys.readouterr().err


def test_verify_reports_every_stage_without_changing_anything(undamaged, tmp_path, capsys):
    run_dir = copy_run(undamaged, tmp_path)
    (run_dir / "iter_02" / "metrics.json").unlink()
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    with pytest.raises(SystemExit):
        main(["verify", str(run_dir)])
    out = capsys.readouterr().out
    assert re.search(r"^iter_01/train +ok$", out, re.M)
    assert re.search(r"^iter_02/metrics +iter_02/metrics.json: missing$", out, re.M)
    assert "9 of 10 stages hold" in out
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


# --- finite or nothing --------------------------------------------------------------------------------------


def test_a_diverging_run_stops_by_name_and_saves_no_weights(theta0, tmp_path):
    cfg = from_dict(tiny_run_config(theta0, iterations=1, dpo__learning_rate=1e9, dpo__max_grad_norm=1e9,
                                    dpo__warmup_ratio=0.0))
    with pytest.raises(ItermergeError, match=r"iteration 1: DPO step 2 of 2: the (gradient norm|loss) is (nan|inf).*"
                                             r"Lower dpo.learning_rate \(now 1e\+09\)"):
        iterate(cfg, tmp_path / "diverged")
    assert not (tmp_path / "diverged" / "iter_01" / "model").exists()
    assert "iter_01/train" not in json.loads((tmp_path / "diverged" / "manifest.json").read_text())["stages"]


# --- a failing write ------------------------------------------------------------------------------------------


def test_a_full_disk_leaves_the_previous_file_and_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "pairs.jsonl"
    atomic_write_text(path, "the earlier pairs\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_text("the earlier weights")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ItermergeError, match=r"pairs.jsonl: writing failed \(No space left on device\); the "
                                             r"previous pairs.jsonl is intact"):
        atomic_write_text(path, "new pairs that do not fit\n")
    refused = r"model: writing failed .* the previous model is intact"
    with pytest.raises(ItermergeError, match=refused), atomic_dir(tmp_path / "model", force=True) as tmp:
        (tmp / "model.safetensors").write_text("new weights")
        full(0)
    assert path.read_text() == "the earlier pairs\n"
    assert (tmp_path / "model" / "model.safetensors").read_text() == "the earlier weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "pairs.jsonl"]  # no temporary left behind


def test_a_run_whose_write_fails_resumes_to_the_undamaged_result(theta0, undamaged, tmp_path, monkeypatch):
    import itermerge.rundir as rundir

    real = rundir.os.fsync
    state = {"failed": False}

    def full_once(fd):
        if not state["failed"] and os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(".pairs.jsonl"):
            state["failed"] = True
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(rundir.os, "fsync", full_once)
    cfg = from_dict(tiny_run_config(theta0))
    with pytest.raises(ItermergeError, match=r"iter_01/pairs.jsonl: writing failed"):
        iterate(cfg, tmp_path / "full")
    monkeypatch.setattr(rundir.os, "fsync", real)
    thetas = iterate(cfg, tmp_path / "full")
    assert same_weights(thetas[2], undamaged / "iter_02" / "model")
