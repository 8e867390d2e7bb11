"""Algorithm 1 end to end on a tiny model: parameters move, the reference stays θ0, resume after any crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import save_tiny, tiny_model

from itermerge import iteration
from itermerge.checkpoint import CheckpointReader, load_model, load_tokenizer
from itermerge.cli import main
from itermerge.config import from_dict, load_config
from itermerge.errors import ItermergeError
from itermerge.logprobs import score_sequences
from itermerge.pipeline import iterate
from itermerge.records import PreferencePair, read_jsonl


def tiny_run_config(theta0: Path, **overrides) -> dict:
    cfg = {
        "name": "tiny",
        "iterations": 2,
        "seed": 3,
        "model": {"path": str(theta0)},
        "prompts": {"per_iteration": 6, "dev": 6, "max_prompt_length": 128},
        "sampling": {"n": 4, "max_new_tokens": 10, "batch_size": 24},
        "dpo": {
            "learning_rate": 1e-3,
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "max_length": 256,
            "max_prompt_length": 128,
        },
    }
    for key, value in overrides.items():
        section, _, leaf = key.partition("__")
        if leaf:
            cfg.setdefault(section, {})[leaf] = value
        else:
            cfg[section] = value
    return cfg


@pytest.fixture(scope="module")
def theta0(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("theta0") / "theta0", tiny_model(0))


@pytest.fixture(scope="module")
def finished_run(theta0, tmp_path_factory) -> tuple[Path, list[Path]]:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    return run_dir, iterate(from_dict(tiny_run_config(theta0)), run_dir)


def _params(path: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(path)
    return {n: reader.get(n).clone() for n in reader}


def test_two_iterations_train_and_record(finished_run, theta0):
    run_dir, thetas = finished_run
    assert thetas[0] == theta0 and thetas[1:] == [run_dir / "iter_01" / "model", run_dir / "iter_02" / "model"]
    p0, p1, p2 = map(_params, thetas)
    assert any(not torch.equal(p0[n], p1[n]) for n in p0), "θ1 must differ from θ0"
    assert any(not torch.equal(p1[n], p2[n]) for n in p1), "θ2 must differ from θ1"
    for t in (1, 2):
        metrics = json.loads((run_dir / f"iter_{t:02d}" / "metrics.json").read_text())
        for key in ("loss", "accuracy", "reward_margin", "mean_score", "tie_rate", "kl_sampler_to_reference",
                    "sampling_tokens_per_second", "tokens_per_s", "pairs"):
            assert key in metrics, key
        assert metrics["samples"] == 6 * 4
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"iter_01/samples", "iter_02/train", "iter_02/metrics"} <= set(manifest["stages"])
    assert (run_dir / "config.yaml").exists()


def test_reference_is_theta0_in_every_iteration(finished_run, theta0):
    """Iteration 2's stored reference log-probs are θ0's, not θ1's (the drift Alg. 1 forbids)."""
    run_dir, thetas = finished_run
    pairs = iteration.pairs_with_reference(run_dir / "iter_02")
    tok = load_tokenizer(theta0)
    xs, ys = [p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs]
    eos = (tok.eos_token_id,)  # the DPO default masks the final EOS, as the stored values do
    under_theta0 = score_sequences(load_model(theta0), xs, ys, tok.pad_token_id, eos_ids=eos)
    under_theta1 = score_sequences(load_model(thetas[1]), xs, ys, tok.pad_token_id, eos_ids=eos)
    stored = [p.ref_chosen_logp for p in pairs]
    assert stored == pytest.approx(under_theta0, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(stored, under_theta1)) > 1e-3


@pytest.mark.parametrize("crash_in", ["write_samples", "make_pairs", "write_reference", "train", "write_metrics"])
def test_resume_after_crash_in_each_stage(finished_run, theta0, tmp_path, monkeypatch, crash_in):
    """A crash in iteration 2's stage leaves the run resumable; the rerun gives θ2 of the uninterrupted run."""
    run_dir = tmp_path / "tiny"
    cfg = from_dict(tiny_run_config(theta0))
    real = getattr(iteration, crash_in)
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # iteration 2: do the work, leave half-written files, then die
            real(*args, **kwargs)
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(iteration, crash_in, crashing)
    with pytest.raises(KeyboardInterrupt):
        iterate(cfg, run_dir)
    monkeypatch.setattr(iteration, crash_in, real)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "iter_01/train" in manifest["stages"] and "iter_02/metrics" not in manifest["stages"]
    thetas = iterate(cfg, run_dir)
    expected, got = _params(finished_run[1][2]), _params(thetas[2])
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6), name


def test_changed_config_is_refused_unless_forced(finished_run, theta0, tmp_path):
    run_dir = tmp_path / "r"
    iterate(from_dict(tiny_run_config(theta0, iterations=1)), run_dir)
    changed = from_dict(tiny_run_config(theta0, iterations=1, dpo__learning_rate=2e-3))
    with pytest.raises(ItermergeError, match=r"different dpo section; .* --force"):
        iterate(changed, run_dir)
    iterate(changed, run_dir, force=True)
    assert json.loads((run_dir / "manifest.json").read_text())["config"]["dpo"]["learning_rate"] == 2e-3


def test_bad_inputs_get_named_errors(theta0, tmp_path):
    with pytest.raises(ItermergeError, match=r"sampling.n = 1: K must be at least 2"):
        from_dict(tiny_run_config(theta0, sampling__n=1))
    with pytest.raises(ItermergeError, match=r"unknown key dpo.lr; known keys here: beta, learning_rate"):
        from_dict(tiny_run_config(theta0, dpo__lr=1e-5))
    with pytest.raises(ItermergeError, match=r"model .*nope.*: no such directory"):
        iterate(from_dict(tiny_run_config(tmp_path / "nope")), tmp_path / "r1")
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "What is 2 + 2?"}\n{"prompt": oops}\n')
    with pytest.raises(ItermergeError, match=r"prompts.jsonl line 2"):
        iterate(
            from_dict(tiny_run_config(theta0, prompts={"source": "jsonl", "path": str(bad), "per_iteration": 1})),
            tmp_path / "r2",
        )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ItermergeError, match=r"empty"):
        iterate(
            from_dict(tiny_run_config(theta0, prompts={"source": "jsonl", "path": str(empty), "per_iteration": 1})),
            tmp_path / "r3",
        )
    with pytest.raises(ItermergeError, match=r"no_such_module"):
        iterate(from_dict(tiny_run_config(theta0, scorer={"function": "no_such_module:score"})), tmp_path / "r4")


def test_all_ties_is_a_named_error(theta0, tmp_path):
    cfg = from_dict(tiny_run_config(theta0, scorer={"function": "itermerge.tasks.arithmetic:brevity"},
                                    sampling={"n": 2, "max_new_tokens": 4, "batch_size": 12, "temperature": 0.0}))
    with pytest.raises(ItermergeError, match=r"iteration 1: all 6 prompts tied"):
        iterate(cfg, tmp_path / "ties")


def test_cli_iterate_with_overrides(theta0, tmp_path):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_run_config(theta0, iterations=1)))
    assert load_config(path, ["dpo.learning_rate=5e-4"]).dpo.learning_rate == 5e-4
    assert main(["iterate", str(path), "--run-dir", str(tmp_path / "cli"), "--set", "prompts.per_iteration=4"]) == 0
    assert (tmp_path / "cli" / "iter_01" / "model" / "model.safetensors").exists()
    assert json.loads((tmp_path / "cli" / "iter_01" / "metrics.json").read_text())["prompts"] == 4


def test_cli_search_report_eval_reward_ensemble(finished_run, tmp_path, capsys):
    """The subcommands a user runs on a finished `iterate`, end to end on the tiny run."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    small = ["--set", "evaluation.max_new_tokens=8", "--set", "evaluation.prompts.n=4"]
    assert main(["search", str(run_dir), "--lams", "0,0.5", "--alphas", "0,0.5", *small]) == 0
    choice = json.loads((run_dir / "search" / "choice.json").read_text())
    assert (choice["lam"], choice["alpha"]) in {(0.0, 0.0), (0.0, 0.5), (0.5, 0.0), (0.5, 0.5)}
    assert (run_dir / "merged" / "merge.json").exists() and (run_dir / "search" / "test.json").exists()
    assert main(["report", str(run_dir)]) == 0
    assert "Table 2" in (run_dir / "report.md").read_text()
    capsys.readouterr()
    assert main(["eval", str(run_dir / "merged"), "--config", str(run_dir / "config.yaml"), *small]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"accuracy", "reward"} <= set(metrics) and metrics["accuracy"]["n"] == 4
    thetas = finished_run[1]
    out = tmp_path / "rewards.jsonl"
    assert main(["reward", "--policy", str(thetas[2]), "--reference", str(thetas[0]),
                 "--pairs", str(run_dir / "iter_02" / "pairs.jsonl"), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == len(read_jsonl(run_dir / "iter_02" / "pairs.jsonl", PreferencePair))
    assert main(["reward", "--policy", str(thetas[0]), "--reference", str(thetas[0]),
                 "--samples", str(run_dir / "iter_01" / "samples.jsonl"), "--out", str(out)]) == 0
    assert all(json.loads(line)["reward"] == 0.0 for line in out.read_text().splitlines())  # θ0 against itself
    assert main(["ensemble", "--reference", str(thetas[0]), "--checkpoints", *map(str, thetas[1:]), "--lam", "0.5",
                 "--alpha", "0.4", "--out", str(tmp_path / "ens"), "--prompts", "2", "--max-new-tokens", "6"]) == 0
    result = json.loads((tmp_path / "ens" / "approximation.json").read_text())
    assert set(result["error"]["candidates"]) == {"merged", "theta_T", "uniform_average"}


def test_eval_of_the_merged_model_gives_the_search_test_numbers(finished_run, tmp_path, capsys, monkeypatch):
    """`itermerge eval RUN/merged --run-dir RUN --split test` builds its evaluators as the run's test stage does:
    the same numbers, item for item. The run here measured bfloat16 as its CPU's precision (its manifest says so)
    while this process would measure float32 (ITERMERGE_CPU_DTYPE): eval must compute in the run's precision."""
    import shutil

    from itermerge import devices

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["precision"] = {**manifest["precision"], "dtype": "bfloat16"}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(devices, "_settled", {})  # this process's own measurement is not the run's
    small = ["--set", "evaluation.max_new_tokens=8", "--set", "evaluation.prompts.n=4"]
    assert main(["search", str(run_dir), "--lams", "0,0.5", "--alphas", "0,0.5", *small]) == 0
    rows = {m["t"]: m for m in json.loads((run_dir / "search" / "test.json").read_text())["models"]}
    monkeypatch.setattr(devices, "_settled", {})  # a new process: it has measured nothing yet
    capsys.readouterr()
    assert main(["eval", str(run_dir / "merged"), "--run-dir", str(run_dir), "--split", "test", "--allow-test"]) == 0
    assert json.loads(capsys.readouterr().out) == rows["merged"]["metrics"]


def test_accelerate_launch_two_processes_gives_the_same_theta(finished_run, theta0, tmp_path):
    """`accelerate launch`, two CPU processes (gloo): both sample, score and train; θ1 equals one process's."""
    from test_distributed import launch

    cfg = tiny_run_config(theta0, iterations=1)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = launch(["iterate", str(path), "--run-dir", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    shares = json.loads((tmp_path / "two" / "manifest.json").read_text())["stages"]["iter_01/samples"]["shards"]
    assert [s["rank"] for s in shares] == [0, 1]  # two processes really ran (accelerate's --cpu alone starts one)
    one = iterate(from_dict(cfg), tmp_path / "one")
    a, b = _params(tmp_path / "two" / "iter_01" / "model"), _params(one[1])
    assert any(not torch.equal(a[n], _params(theta0)[n]) for n in a)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
