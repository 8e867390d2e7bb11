"""model.dtype auto on a CPU: the precision measured (bf16 against fp32 matmul), kept by the run, shared by its
processes; the probe's decision forced both ways, since this machine can only show one of them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny, tiny_model
from test_pipeline import tiny_run_config

from itermerge import devices
from itermerge.config import from_dict
from itermerge.config.run import ModelConfig
from itermerge.errors import ItermergeError
from itermerge.pipeline import iterate


@pytest.fixture()
def measured(monkeypatch):
    """The probe measures (no ITERMERGE_CPU_DTYPE), with matmul speeds the test chooses: fp32 then bf16 GFLOP/s."""
    monkeypatch.delenv(devices.PRECISION_ENV, raising=False)
    devices.settle_precision({})

    def speeds(fp32: float, bf16: float) -> None:
        devices.settle_precision({})
        monkeypatch.setattr(devices, "matmul_gflops", lambda dtype, **_: fp32 if dtype == torch.float32 else bf16)

    yield speeds
    devices.settle_precision({})


@pytest.mark.parametrize(
    ("fp32", "bf16", "chosen"),
    [(331, 2317, "bfloat16"),  # a Xeon with AMX (issue 24's measurement): 7×
     (168, 42, "float32"),  # a CPU without fast bf16: 4× slower
     (100, 149, "float32"),  # faster, but under the margin: the rest of the work would eat it
     (100, 150, "bfloat16")],
)
def test_auto_takes_the_precision_the_cpu_computes_faster(measured, fp32, bf16, chosen):
    measured(fp32, bf16)
    where = devices.placement(ModelConfig(device="cpu", dtype="auto"))
    assert where.dtype == chosen
    record = devices.cpu_precision()
    assert (record["float32_gflops"], record["bfloat16_gflops"], record["dtype"]) == (fp32, bf16, chosen)
    assert {"cpu", "amx_bf16", "avx512_bf16", "threads"} <= set(record)
    assert devices.placement(ModelConfig(device="cpu", dtype="float32")).dtype == "float32"  # forcing still wins


def test_the_probe_really_measures_and_a_bad_forced_value_is_named(monkeypatch):
    assert devices.matmul_gflops(torch.float32, n=64, seconds=0.01) > 0
    monkeypatch.setenv(devices.PRECISION_ENV, "fp8")
    devices.settle_precision({})
    with pytest.raises(ItermergeError, match=r"ITERMERGE_CPU_DTYPE='fp8': use float32 or bfloat16"):
        devices.cpu_precision()
    devices.settle_precision({})


def test_a_run_computes_in_the_measured_precision_and_keeps_it_on_resume(measured, tmp_path, capsys):
    """bf16 measured faster: sampling, scoring and training compute in bf16 (under autocast, float32 masters),
    θ1 is saved in float32, the record is in the manifest; a resume on a machine that measures otherwise keeps it."""
    theta0 = save_tiny(tmp_path / "theta0", tiny_model(0))
    cfg = from_dict(tiny_run_config(theta0, iterations=1))
    assert cfg.model.dtype == "auto"
    measured(100, 700)
    iterate(cfg, tmp_path / "run")
    assert "precision: bfloat16" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["precision"]["dtype"] == "bfloat16" and manifest["precision"]["bfloat16_gflops"] == 700
    from itermerge.checkpoint import CheckpointReader

    theta1 = CheckpointReader(tmp_path / "run" / "iter_01" / "model")
    assert {str(theta1.get(n).dtype) for n in theta1} == {"torch.float32"}
    assert any(not torch.equal(theta1.get(n), tiny_model(0).state_dict()[n]) for n in theta1)
    from itermerge.report import write_report

    assert "Precision: **bfloat16**" in write_report(tmp_path / "run").read_text()
    measured(700, 100)  # the same run resumed where fp32 measures faster: still the run's bf16
    cfg2 = from_dict(tiny_run_config(theta0, iterations=2))
    iterate(cfg2, tmp_path / "run")
    assert devices.cpu_precision()["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["precision"]["bfloat16_gflops"] == 700
