"""Your own task: the example in examples/custom_task end to end on the tiny model, and every misconfiguration of
a user's task refused by name before anything is sampled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import save_tiny, tiny_model

from itermerge.config import from_dict, load_config
from itermerge.errors import ItermergeError
from itermerge.pipeline import iterate, run
from itermerge.prompts import content_key, read_prompts, split_prompts, training_prompts

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_task"


@pytest.fixture(scope="module")
def theta0(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("theta0") / "theta0", tiny_model(0))


@pytest.fixture()
def in_repo(monkeypatch):
    """The example's paths are relative to the repository root, as the README runs it."""
    monkeypatch.chdir(ROOT)


def example(theta0: Path, **sections) -> dict:
    """examples/custom_task/config.yaml on the tiny model, sized for a test; ``sections`` replace or extend it."""
    cfg = yaml.safe_load((EXAMPLE / "config.yaml").read_text())
    cfg["model"] = {"path": str(theta0)}
    cfg["prompts"].update(per_iteration=6, dev=4)
    cfg["sampling"].update(max_new_tokens=6, batch_size=24)
    cfg["evaluation"]["max_new_tokens"] = 6
    cfg["dpo"].update(learning_rate=1e-3)
    cfg["studies"].update(alphas=[0.0, 0.5, 1.0], prompts=2, n=2, ensemble=False)
    for name, value in sections.items():
        if value is None:
            cfg.pop(name, None)
        elif isinstance(value, dict) and isinstance(cfg.get(name), dict):
            cfg[name] = {**cfg[name], **value}
        else:
            cfg[name] = value
    return cfg


def test_the_example_config_runs_end_to_end_on_the_users_task(theta0, tmp_path, in_repo):
    """The README's "Your own task" on the tiny model: the search, the test and the report are about the user's
    prompts and verifier (accuracy from caps.is_correct), never about the built-in arithmetic task."""
    run_dir = tmp_path / "caps"
    run(from_dict(example(theta0)), run_dir)
    evaluated = json.loads((run_dir / "search" / "eval_config.json").read_text())
    assert evaluated["prompts"]["task"] is None
    assert evaluated["prompts"]["files"] == {"dev": "examples/custom_task/dev.jsonl",
                                             "test": "examples/custom_task/test.jsonl"}
    assert evaluated["accuracy"]["verifier"] == "examples/custom_task/caps.py:is_correct"
    assert evaluated["reward"]["scorer"]["function"] == "examples/custom_task/caps.py:score"
    test = json.loads((run_dir / "search" / "test.json").read_text())
    assert all({"accuracy", "format", "reward"} <= set(m["metrics"]) and m["metrics"]["accuracy"]["n"] == 4
               for m in test["models"])
    report = (run_dir / "report.md").read_text()
    assert "Chosen merge" in report and "arithmetic" not in report.split("## Configuration")[0]
    assert (run_dir / "studies" / "alpha" / "alpha.json").exists()


def test_the_least_config_a_user_writes_evaluates_their_prompts_held_out(theta0, tmp_path, in_repo):
    """A training file and a verifier, no evaluation section, no dev/test files: dev and test are held out of the
    training file, the reward is the user's verifier, accuracy its is_correct."""
    cfg = from_dict(example(theta0, evaluation=None, prompts={"dev_path": None, "test_path": None}))
    source = cfg.evaluation.prompts
    assert source.task is None and source.heldout_from == "examples/custom_task/prompts.jsonl"
    assert cfg.evaluation.reward.scorer["function"] == "examples/custom_task/caps.py:score"
    assert cfg.evaluation.accuracy.verifier == "examples/custom_task/caps.py:is_correct"
    iterate(cfg, tmp_path / "least")  # starts: the config holds together
    assert (tmp_path / "least" / "iter_02" / "model").is_dir()


def test_held_out_dev_and_test_never_meet_an_iterations_prompts(theta0, in_repo):
    cfg = from_dict(example(theta0, iterations=3, prompts={"dev_path": None, "test_path": None, "per_iteration": 20,
                                                           "dev": 16}))
    trained = [p for t in (1, 2, 3) for p in training_prompts(cfg, t)]
    dev, test = (split_prompts(cfg.evaluation.prompts, s) for s in ("dev", "test"))
    assert (len(trained), len(dev), len(test)) == (60, 16, 16)
    keys = [{content_key(p) for p in group} for group in (trained, dev, test)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    pool = {content_key(p) for p in read_prompts(EXAMPLE / "prompts.jsonl")}
    assert keys[1] | keys[2] <= pool  # held out of the training file itself
    again = from_dict(example(theta0, iterations=3, prompts={"dev_path": None, "test_path": None, "per_iteration": 20,
                                                             "dev": 16}))
    assert [p.id for p in split_prompts(again.evaluation.prompts, "dev")] == [p.id for p in dev]  # seeded
    other = from_dict({**example(theta0, prompts={"dev_path": None, "test_path": None, "dev": 16}), "seed": 1})
    assert [p.id for p in split_prompts(other.evaluation.prompts, "dev")] != [p.id for p in dev]


def _repeated_file(path: Path, rows: int = 200, texts: int = 8) -> list[str]:
    """``rows`` rows cycling through ``texts`` distinct prompts of the example (copies differ in id and whitespace,
    as real prompt sets do); returns the distinct texts."""
    base = read_prompts(EXAMPLE / "prompts.jsonl")[:texts]
    out = []
    for i in range(rows):
        p = base[i % texts]
        text = p.messages[0]["content"] if i < texts else "  " + p.messages[0]["content"].replace(" ", "  ") + "\n"
        out.append(json.dumps({"id": f"row-{i}", "prompt": text, "answer": p.answer}))
    path.write_text("\n".join(out) + "\n")
    return [p.messages[0]["content"] for p in base]


def test_a_split_of_repeated_prompts_holds_each_text_out_with_all_its_copies(tmp_path):
    from itermerge.prompts import duplicate_note, heldout

    texts = _repeated_file(tmp_path / "p.jsonl")
    pool = read_prompts(tmp_path / "p.jsonl")
    train, held = heldout(pool, ["dev", "test"], 2, seed=0)
    keys = {name: [content_key(p) for p in ps] for name, ps in (("train", train), *held.items())}
    assert len(set(keys["dev"])) == len(keys["dev"]) == 2 and len(set(keys["test"])) == 2  # distinct texts
    assert not set(keys["train"]) & (set(keys["dev"]) | set(keys["test"]))  # no copy of a held-out text trains
    assert len(train) == 200 - 4 * 25 and len(set(keys["train"])) == 4  # 4 texts × 25 copies each stay in training
    assert all(p.id in {f"row-{i}" for i in range(8)} for p in held["dev"] + held["test"])  # each text's first copy
    assert duplicate_note(pool) == ("200 prompts, 8 distinct texts: 8 texts appear more than once (192 repeats); "
                                    "dev and test hold distinct texts out, each with every copy of it")
    assert duplicate_note(pool[:8]) is None and len({content_key(p) for p in pool}) == len(texts)
    with pytest.raises(ItermergeError, match=r"8 distinct prompts \(200 rows with repeats\) cannot give 4 dev"):
        heldout(pool, ["dev", "test"], 4, seed=0)


def test_a_file_without_repeats_splits_as_before(tmp_path):
    """Grouping changes nothing for distinct texts: the held-out rows are the permutation of the rows."""
    import numpy as np

    from itermerge.prompts import heldout
    from itermerge.seeds import stage_seed

    pool = read_prompts(EXAMPLE / "prompts.jsonl")
    order = np.random.default_rng(stage_seed(3, "prompts/heldout")).permutation(len(pool))
    train, held = heldout(pool, ["dev", "test"], 5, seed=3, test_n=7)
    assert [p.id for p in held["dev"]] == [pool[i].id for i in order[:5]]
    assert [p.id for p in held["test"]] == [pool[i].id for i in order[5:12]]
    assert [p.id for p in train] == [p.id for i, p in enumerate(pool) if i not in set(order[:12].tolist())]


def test_itermerge_run_on_a_file_of_200_rows_and_8_texts_splits_it_itself(theta0, tmp_path, in_repo, capsys):
    """A user's prompt file with repeats and no dev/test files: ``itermerge run`` makes its own split, says how many
    repeats it found, and no held-out text is ever trained on."""
    from itermerge.cli import main

    _repeated_file(tmp_path / "prompts.jsonl")
    cfg = example(theta0, prompts={"path": str(tmp_path / "prompts.jsonl"), "dev_path": None, "test_path": None,
                                   "dev": 2}, studies={"alpha_study": False, "accuracy_matrix": False})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    assert main(["run", str(tmp_path / "config.yaml"), "--run-dir", str(run_dir)]) == 0
    assert "prompts: 200 prompts, 8 distinct texts" in capsys.readouterr().out
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "192 repeats" in manifest["prompts_note"]
    trained = {content_key(p) for t in (1, 2) for p in read_prompts(run_dir / f"iter_0{t}" / "prompts.jsonl")}
    test = json.loads((run_dir / "search" / "test.json").read_text())
    cfg_run = load_config(run_dir / "config.yaml")
    held = {content_key(p) for s in ("dev", "test") for p in split_prompts(cfg_run.evaluation.prompts, s)}
    assert len(trained) == 4 and len(held) == 4 and not trained & held
    assert all(m["metrics"]["accuracy"]["n"] == 2 for m in test["models"])


def test_a_larger_test_set_than_dev(theta0, in_repo):
    """prompts.test sizes the test split alone: held out of the file after dev (dev unchanged), or the task's."""
    held = {"dev_path": None, "test_path": None, "per_iteration": 20, "dev": 16}
    base = from_dict(example(theta0, iterations=2, prompts=held))
    big = from_dict(example(theta0, iterations=2, prompts={**held, "test": 30}))
    assert big.evaluation.prompts.test_n == 30
    dev, test = (split_prompts(big.evaluation.prompts, s) for s in ("dev", "test"))
    assert (len(dev), len(test)) == (16, 30)
    assert [p.id for p in dev] == [p.id for p in split_prompts(base.evaluation.prompts, "dev")]
    trained = {content_key(p) for t in (1, 2) for p in training_prompts(big, t)}
    assert not trained & {content_key(p) for p in test}
    task = from_dict({"model": {"path": str(theta0)}, "prompts": {"dev": 8, "test": 40}})
    assert [len(split_prompts(task.evaluation.prompts, s)) for s in ("dev", "test")] == [8, 40]
    with pytest.raises(ItermergeError, match=r"prompts\.test = 0"):
        from_dict({"model": {"path": str(theta0)}, "prompts": {"test": 0}})


def test_a_rule_without_a_capability_axis_runs_through_search_test_and_report(theta0, tmp_path, in_repo):
    cfg = example(theta0, evaluation={"accuracy": None}, studies={"alpha_study": False, "accuracy_matrix": False})
    assert from_dict(cfg).search.rule.capability == ()  # nothing measures correctness: reward alone decides
    run_dir = tmp_path / "reward-only"
    run(from_dict(cfg), run_dir)
    choice = json.loads((run_dir / "search" / "choice.json").read_text())
    assert "among all 4 points (the rule names no capability metric" in choice["reason"]
    assert "whose  did" not in choice["reason"] and (run_dir / "search" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "Reward against" in (run_dir / "report.md").read_text()


def _refused(cfg: dict, tmp_path: Path, match: str) -> None:
    run_dir = tmp_path / "refused"
    with pytest.raises(ItermergeError, match=match):
        iterate(from_dict(cfg), run_dir)
    assert not (run_dir / "iter_01" / "samples.jsonl").exists()  # nothing was sampled


@pytest.mark.parametrize(
    ("sections", "match"),
    [
        ({"search": {"rule": {"capability": ["lm_eval/average"]}}},
         r"search.rule names metric 'lm_eval/average', which no evaluator produces \(they produce accuracy, format, "
         r"reward\)"),
        ({"prompts": {"dev_path": "examples/custom_task/nope.jsonl"}},
         r"evaluation dev prompts: examples/custom_task/nope.jsonl: file not found"),
        ({"scorer": {"function": "no_such_module:score"}}, r"no module named 'no_such_module'"),
        ({"scorer": {"function": "itermerge.tasks.arithmetic:score"}},
         r"scorer: verifier itermerge.tasks.arithmetic:score: prompt 'prompts-0'.*is not a number"),
        ({"scorer": {"function": "tests/verifiers/score_only.py:score"}},
         r"eval.accuracy: nothing decides whether a reply is correct"),
        ({"iterations": 5, "prompts": {"per_iteration": 24}},
         r"prompts: examples/custom_task/prompts.jsonl: 96 prompts, but iteration 5 needs prompts 97..120"),
        ({"prompts": {"test_path": "examples/custom_task/prompts.jsonl"}},
         r"evaluation test prompts: 'prompts-0' is also training prompt 'prompts-0'"),
    ],
    ids=["rule-metric", "missing-dev-file", "scorer-import", "scorer-fails-on-a-sample", "accuracy-undecided",
         "too-few-prompts", "test-overlaps-training"],
)
def test_misconfiguration_is_refused_by_name_before_any_sampling(theta0, tmp_path, in_repo, sections, match):
    _refused(example(theta0, **sections), tmp_path, match)


def test_every_problem_is_listed_at_once(theta0, tmp_path, in_repo):
    cfg = example(theta0, scorer={"function": "no_such_module:score"},
                  search={"rule": {"capability": ["lm_eval/average"]}})
    with pytest.raises(ItermergeError) as refused:
        iterate(from_dict(cfg), tmp_path / "r")
    assert "no_such_module" in str(refused.value) and "lm_eval/average" in str(refused.value)


def test_prompt_formats_people_have(theta0, tmp_path, in_repo):
    """RLHFlow's iterative-prompt rows (context_messages) and an HF dataset directory are training sources."""
    rows = [{"context_messages": [{"content": f"Write the word '{w}' in capital letters.", "role": "user"}],
             "answer": w.upper(), "source": "rlhflow"} for w in ("one", "two", "three", "four", "five", "six", "seven",
                                                                 "eight", "nine", "ten", "eleven", "twelve", "thirteen",
                                                                 "fourteen", "fifteen", "sixteen")]
    path = tmp_path / "iterative-prompt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict(example(theta0, prompts={"path": str(path), "dev_path": None, "test_path": None,
                                             "per_iteration": 4, "dev": 2}))
    first = training_prompts(cfg, 1)
    assert first[0].messages[0]["content"].startswith("Write the word") and first[0].meta == {"source": "rlhflow"}
    from datasets import Dataset

    plain = [{"prompt": r["context_messages"][0]["content"], "answer": r["answer"]} for r in rows]
    Dataset.from_list(plain).save_to_disk(str(tmp_path / "ds"))
    ds_cfg = from_dict(example(theta0, prompts={"source": "dataset", "path": str(tmp_path / "ds"), "dev_path": None,
                                                "test_path": None, "per_iteration": 4, "dev": 2}))
    assert [p.messages for p in training_prompts(ds_cfg, 1)] == [p.messages for p in first]
    assert len(split_prompts(ds_cfg.evaluation.prompts, "test")) == 2


def test_the_shipped_example_configs_parse(in_repo):
    """Every run config and study file under examples/ parses (a study file, one with a run, as a study)."""
    import yaml

    from itermerge.replicates import load_study

    studies = 0
    for path in sorted((ROOT / "examples").rglob("*.yaml")):
        if "accelerate" in path.name:
            continue
        if "run" in yaml.safe_load(path.read_text()):
            studies += bool(load_study(path).configs())
        else:
            load_config(path)
    assert studies >= 1  # examples/instruction_following/study_reference.yaml
