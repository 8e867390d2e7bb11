"""One YAML parser: the shipped configs load, every key is known, mistakes are named."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest

from itermerge.config import from_dict, load_config, to_yaml
from itermerge.errors import ItermergeError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load(path):
    if path.name.startswith("accelerate"):
        pytest.skip("an accelerate launcher config, not a run config")
    cfg = load_config(path)
    assert cfg.iterations == 6 and cfg.sampling.n == 8 and cfg.sampling.backend == "vllm"
    assert cfg.scorer.type == "reward_model" and not cfg.scorer.trust_remote_code  # ArmoRM runs natively
    assert cfg.dpo.learning_rate == 5e-7 and cfg.dpo.beta == 0.1  # appendix C
    assert cfg.evaluation.lm_eval.preset == "paper"
    from itermerge.evaluation.lm_eval import resolve_tasks

    assert len(resolve_tasks(cfg.evaluation.lm_eval)) == 5  # MMLU, TruthfulQA, ARC, HellaSwag, GSM8K


@pytest.mark.parametrize("name", ["demo.yaml", "demo_quick.yaml"])
def test_demo_configs_load_and_roundtrip(name, tmp_path):
    cfg = load_config(Path(str(files("itermerge") / "configs" / name)))
    assert cfg.model.path == "smollm2-135m-instruct" and cfg.prompts.task == "arithmetic"
    assert cfg.evaluation.prompts.task == "arithmetic"  # the evaluation follows the training task
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(again) == cfg


def test_mistakes_are_named(tmp_path):
    with pytest.raises(ItermergeError, match=r"unknown key sampling.temp; known keys here: backend"):
        from_dict({"sampling": {"temp": 0.7}})
    with pytest.raises(ItermergeError, match=r"dpo.global_batch_size = 'many' is not a int"):
        from_dict({"dpo": {"global_batch_size": "many"}})
    with pytest.raises(ItermergeError, match=r"dpo.learning_rate = -1.0: must be > 0"):
        from_dict({"dpo": {"learning_rate": -1}})
    with pytest.raises(ItermergeError, match=r"scorer.type = reward_model: set scorer.path"):
        from_dict({"scorer": {"type": "reward_model"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("dpo: [1, 2\n")
    with pytest.raises(ItermergeError, match=r"bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ItermergeError, match=r"override 'dpo.beta': write section.key=value"):
        load_config(_write(tmp_path / "ok.yaml", "seed: 1\n"), ["dpo.beta"])
    assert from_dict({"dpo": {"learning_rate": "1e-5"}}).dpo.learning_rate == 1e-5  # YAML 1.1 reads 1e-5 as text


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
