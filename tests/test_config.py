"""One YAML parser: the shipped configs load, every key is known, mistakes are named."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest

from itermerge.config import as_recorded, from_dict, load_config, to_yaml
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
    from itermerge.evaluation.evaluators.lm_eval import resolve_tasks

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


SHIPPED = [files("itermerge") / "configs" / n for n in ("demo.yaml", "demo_quick.yaml")] + [
    p for p in sorted((ROOT / "examples").glob("*.yaml")) if not p.name.startswith("accelerate")]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_grids_hold_the_uniform_average_and_the_mean_alone(path):
    """Each shipped grid, resolved at its T, has λ = (T−1)/T and λ = 1 at α = 0: the uniform average of θ1..θT and
    θ̄ alone. The demo (T = 3): λ 0, 0.3, 0.5, 2/3, 1 × α 0, 0.4, 1 = 15 points; the quick one (T = 2): 0, ½, 1 × 2."""
    from itermerge.search.grid import search_grid as _grid

    cfg = load_config(Path(str(path)))
    T = cfg.iterations
    points = _grid(T, cfg.search)
    assert ((T - 1) / T, 0.0) in points and (1.0, 0.0) in points
    expected = {"demo.yaml": 15, "demo_quick.yaml": 6}
    if path.name in expected:
        assert len(points) == expected[path.name]


def test_the_study_grid_resolves_uniform_for_each_searched_T():
    """study.yaml searches T = 6 and T' = 3 with one λ list: uniform is 5/6 at T = 6 and 2/3 at T' = 3."""
    from itermerge.replicates import load_study
    from itermerge.search.grid import search_grid as _grid

    study = load_study(Path(str(files("itermerge") / "configs" / "study.yaml")))
    for by_seed in study.configs().values():
        cfg = next(iter(by_seed.values()))
        assert cfg.search.lams == (0.0, 0.3, 0.5, "uniform", 1.0) and cfg.search.at == (3,)
        for T in (cfg.iterations, *cfg.search.at):
            assert ((T - 1) / T, 0.0) in _grid(T, cfg.search) and (1.0, 0.0) in _grid(T, cfg.search)
        assert (5 / 6, 0.4) in _grid(6, cfg.search) and (2 / 3, 0.4) in _grid(3, cfg.search)


def test_a_lam_that_is_neither_a_number_nor_uniform_is_named():
    with pytest.raises(ItermergeError, match=r"search.lams: 'unifrom' is neither a number nor 'uniform'"):
        from_dict({"search": {"lams": [0.0, "unifrom"]}})
    with pytest.raises(ItermergeError, match=r"search.lams: inf is neither"):
        from_dict({"search": {"lams": [float("inf")]}})
    assert from_dict({"search": {"lams": [0, "Uniform", "1e-1"]}}).search.lams == (0.0, "uniform", 0.1)


def test_a_recorded_config_reads_with_todays_defaults_and_keeps_what_is_no_longer_known():
    cfg = load_config(Path(str(files("itermerge") / "configs" / "demo.yaml")))
    now = as_recorded(cfg)
    assert now["dpo"]["adam_betas"] == [0.9, 0.999]  # as a manifest holds it: tuples become lists
    older = {**now, "dpo": {k: v for k, v in now["dpo"].items() if k != "reference"}}  # made before dpo.reference
    assert as_recorded(older) == now and as_recorded(older)["dpo"]["reference"] == "fixed"
    unknown = {**now, "dpo": {**now["dpo"], "retired_setting": 1}}  # a key since removed: compared as recorded
    assert as_recorded(unknown) == unknown != now
