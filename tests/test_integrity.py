"""integrity: the run lock across processes, proofs of stage outputs, and finite weights."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash
from safetensors.numpy import save_file

from itermerge import integrity
from itermerge.errors import ItermergeError
from itermerge.integrity import RunLock, check, nonfinite_tensors, prove

fcntl = pytest.importorskip("fcntl")

TRY_LOCK = """
import sys
from itermerge.errors import ItermergeError
from itermerge.integrity import RunLock
try:
    RunLock(sys.argv[1]).acquire()
except ItermergeError as e:
    print(e)
    sys.exit(3)
print("acquired")
"""
HOLD_LOCK = """
import sys, time
from itermerge.integrity import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def try_lock_elsewhere(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TRY_LOCK, str(run)], capture_output=True, text=True, timeout=120)


def locked(run: Path) -> bool:
    """Whether anyone holds the flock: a fresh open file description conflicts even within this process."""
    fd = os.open(run / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def test_a_second_process_is_refused_while_the_first_holds_the_run_directory(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        refused = try_lock_elsewhere(run)
    assert refused.returncode == 3, refused.stderr
    message = refused.stdout
    assert str(run) in message and f"PID {os.getpid()} " in message and " ".join(sys.argv) in message
    assert "wait for that process to finish" in message and "another run directory" in message
    # released on leaving the block: the refusal above was the lock's doing
    assert try_lock_elsewhere(run).stdout.strip() == "acquired"
    assert (run / ".lock").exists()


def test_the_lock_file_names_its_holder_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-c", HOLD_LOCK, str(run), "--marker"]
    holder = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        info = json.loads((run / ".lock").read_text())
        assert info["pid"] == holder.pid and info["argv"] == ["-c", str(run), "--marker"]
        with pytest.raises(ItermergeError, match=rf"in use by PID {holder.pid} .*-c {run} --marker"):
            RunLock(run).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        holder.stdout.close()
    assert holder.returncode == -signal.SIGKILL
    with RunLock(run):
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()


def test_nested_acquires_in_one_process_share_one_lock(tmp_path):
    run = tmp_path / "run"
    outer = RunLock(run)
    with outer:
        with outer, RunLock(run):  # the same object again, and another object on the same directory
            assert locked(run)
        assert locked(run)  # the inner releases leave the outer hold in place
    assert not locked(run)
    outer.release()  # more releases than acquires do nothing
    assert not locked(run)


# --- proofs --------------------------------------------------------------------------------------

PAIRS = b'{"prompt": "2+2", "chosen": "4", "rejected": "5"}\n' * 3
BEST = b'{"k": 0.5}'
TRIAL = b'{"k": 0.5, "score": 0.25}'
T0 = 1_600_000_000 * 10**9  # a past mtime, so that a copy made now has different ones
OUTPUTS = ["iter_01/pairs.jsonl", "iter_01/model", "search"]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    root = tmp_path / "run"
    model = root / "iter_01" / "model"
    model.mkdir(parents=True)
    (root / "iter_01" / "pairs.jsonl").write_bytes(PAIRS)
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    save_file(weights, str(model / "model.safetensors"))
    (model / "config.json").write_text('{"model_type": "llama"}')
    (root / "search" / "trials").mkdir(parents=True)
    (root / "search" / "best.json").write_bytes(BEST)
    (root / "search" / "trials" / "0.json").write_bytes(TRIAL)
    for f in root.rglob("*"):
        os.utime(f, ns=(T0, T0))
    return root


def proofs_of(root: Path) -> list[dict]:
    return prove([root / o for o in OUTPUTS], root)


def test_prove_records_each_output_relative_to_the_root(run_dir):
    pairs, model, search = proofs_of(run_dir)
    assert pairs == {"path": "iter_01/pairs.jsonl", "kind": "file", "size": len(PAIRS), "mtime_ns": T0,
                     "hash": xxhash.xxh3_128_hexdigest(PAIRS)}
    assert (model["path"], model["kind"]) == ("iter_01/model", "checkpoint")
    shard_size = (run_dir / "iter_01/model/model.safetensors").stat().st_size
    assert model["files"] == {"config.json": [23, T0], "model.safetensors": [shard_size, T0]}
    assert model["size"] == 23 + shard_size and model["mtime_ns"] == T0
    # a plain directory: each file's name relative to it, a NUL, then the xxh3-128 of its bytes, in name order
    expected = xxhash.xxh3_128(b"best.json\0" + xxhash.xxh3_128_digest(BEST)
                               + b"trials/0.json\0" + xxhash.xxh3_128_digest(TRIAL)).hexdigest()
    assert search == {"path": "search", "kind": "dir", "size": len(BEST) + len(TRIAL), "mtime_ns": T0,
                      "files": {"best.json": [len(BEST), T0], "trials/0.json": [len(TRIAL), T0]}, "hash": expected}


def test_untouched_outputs_pass_after_a_round_trip_through_json(run_dir):
    proofs = json.loads(json.dumps(proofs_of(run_dir)))
    assert check(proofs, run_dir) == []
    assert check(proofs, run_dir, deep=True) == []


def test_a_deleted_file_and_a_deleted_checkpoint_are_missing(run_dir):
    proofs = proofs_of(run_dir)
    (run_dir / "iter_01/pairs.jsonl").unlink()
    shutil.rmtree(run_dir / "iter_01/model")
    assert check(proofs, run_dir) == ["iter_01/pairs.jsonl: missing", "iter_01/model: missing"]


def test_a_truncated_file_and_a_truncated_shard_are_named_with_their_sizes(run_dir):
    proofs = proofs_of(run_dir)
    shard = run_dir / "iter_01/model/model.safetensors"
    n = shard.stat().st_size
    (run_dir / "iter_01/pairs.jsonl").write_bytes(PAIRS[:10])
    shard.write_bytes(shard.read_bytes()[:-4])
    assert check(proofs, run_dir) == [
        f"iter_01/pairs.jsonl: size {len(PAIRS)} → 10 (truncated?)",
        f"iter_01/model/model.safetensors: size {n} → {n - 4} (truncated?)",
    ]


def test_bytes_flipped_in_a_shard_at_the_same_size_and_mtime_take_a_deep_check(run_dir):
    proofs = proofs_of(run_dir)
    shard = run_dir / "iter_01/model/model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # the data section ends the file: this is a weight's byte, the header stays valid
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(T0, T0))
    assert check(proofs, run_dir) == []  # sizes and mtimes vouch for it: a cheap check cannot see this
    [problem] = check(proofs, run_dir, deep=True)
    assert problem.startswith(f"iter_01/model: content changed (hash {proofs[1]['hash'][:16]}… → ")
    os.utime(shard, ns=(T0 + 1, T0 + 1))
    assert check(proofs, run_dir) == [problem]  # a changed mtime makes even the cheap check hash


def test_a_changed_mtime_costs_a_hash_which_decides(run_dir):
    proofs = proofs_of(run_dir)
    pairs = run_dir / "iter_01/pairs.jsonl"
    os.utime(pairs, ns=(T0 + 1, T0 + 1))
    assert check(proofs, run_dir) == []  # same content: no problem
    pairs.write_bytes(PAIRS.replace(b'"chosen": "4"', b'"chosen": "3"'))  # same size, new mtime
    assert [p.split(" (")[0] for p in check(proofs, run_dir)] == ["iter_01/pairs.jsonl: content changed"]


def test_a_copied_run_directory_passes_and_is_itself_checked(run_dir, tmp_path):
    proofs = proofs_of(run_dir)
    copy = shutil.copytree(run_dir, tmp_path / "copy", copy_function=shutil.copyfile)  # new mtimes, same bytes
    assert (copy / "iter_01/pairs.jsonl").stat().st_mtime_ns != T0
    assert check(proofs, copy) == []
    assert check(proofs, copy, deep=True) == []
    (copy / "search/best.json").write_bytes(b'{"k": 0.7}')  # same size; the copy's new mtime makes it hashed
    (copy / "search/new.json").write_bytes(b"{}")
    (copy / "iter_01/model/config.json").write_text('{"model_type": "gemma2"}')
    problems = check(proofs, copy)
    assert [p.split(" (")[0] for p in problems] == [
        "iter_01/model/config.json: size 23 → 24",
        "search/new.json: not in the proof",
    ]
    (copy / "search/new.json").unlink()
    (copy / "iter_01/model/config.json").write_text('{"model_type": "qwen2"}')  # same size as llama's
    assert [p.split(" (")[0] for p in check(proofs, copy)] == [
        "iter_01/model: files beside the weights changed", "search: content changed",
    ]


def test_prove_refuses_paths_outside_the_root_and_missing_outputs(run_dir, tmp_path):
    (tmp_path / "elsewhere.txt").write_text("x")
    with pytest.raises(ItermergeError, match=r"elsewhere\.txt: an output to prove lies outside the run directory"):
        prove([tmp_path / "elsewhere.txt"], run_dir)
    with pytest.raises(ItermergeError, match=r"samples\.jsonl: an output to prove does not exist"):
        prove([run_dir / "iter_01/samples.jsonl"], run_dir)


# --- finite weights ------------------------------------------------------------------------------


def write_bf16(path: Path, tensors: dict[str, list[int]]) -> None:
    """A safetensors file of BF16 tensors given as raw bit patterns (numpy has no bfloat16)."""
    header, data = {}, b""
    for name, bits in tensors.items():
        raw = np.array(bits, dtype="<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": [len(bits)], "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + data)


def test_nonfinite_tensors_names_the_tensors_holding_nan_or_inf(tmp_path):
    save_file({
        "ok": np.ones((2, 2), np.float32),
        "has_nan": np.array([1.0, np.nan, 3.0], np.float32),
        "half_inf": np.array([np.inf], np.float16),
        "ids": np.array([1, 2], np.int64),
    }, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    assert sorted(nonfinite_tensors(tmp_path)) == ["half_inf", "has_nan"]


def test_nonfinite_tensors_reads_bfloat16_bits_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "FINITE_BLOCK", 4)  # 10 elements: blocks [0,4) [4,8) [8,10)
    one, nan, neg_inf, max_finite = 0x3F80, 0x7FC0, 0xFF80, 0x7F7F  # 0x7F7F: exponent 0xFE, the largest bf16
    write_bf16(tmp_path / "model.safetensors", {
        "late_nan": [one] * 9 + [nan],
        "large": [max_finite] * 10,
        "neg_inf": [neg_inf] + [one] * 9,
    })
    assert sorted(nonfinite_tensors(tmp_path)) == ["late_nan", "neg_inf"]
