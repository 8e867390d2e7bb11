"""The run directory's layout: every file name in one place, the searches found in their order."""

from __future__ import annotations

import pytest

from itermerge.errors import ItermergeError
from itermerge.rundir import RunLayout, SearchLayout


def test_a_run_directory_names_its_files_in_one_place(tmp_path):
    run = RunLayout(tmp_path)
    assert run.iteration(3) == tmp_path / "iter_03" and run.merged == tmp_path / "merged"
    assert run.mean_cache() == tmp_path / "cache" / "mean_intermediate"
    assert run.mean_cache(2) == tmp_path / "cache" / "mean_intermediate_T2"
    assert run.search().choice == tmp_path / "search" / "choice.json"
    assert run.search(3).test == tmp_path / "search_T3" / "test.json" and run.search(3).at == 3
    assert run.search().at is None and run.search().round(1) == tmp_path / "search" / "rounds" / "round_1.jsonl"
    for name in ("iter_02/model", "iter_01/model", "iter_10", "search_T10", "search_T2", "search", "search_grid"):
        (tmp_path / name).mkdir(parents=True)
    assert [p.name for p in run.iterations()] == ["iter_01", "iter_02", "iter_10"]
    assert run.checkpoints() == [tmp_path / "iter_01" / "model", tmp_path / "iter_02" / "model"]  # iter_10: no θ yet
    # every θ1..θT first, then T' in order (10 after 2, not before it as by name), then anything else by name
    assert [s.dir.name for s in run.searches()] == ["search", "search_T2", "search_T10", "search_grid"]
    assert SearchLayout(tmp_path / "search_grid").at is None


def test_an_iteration_a_study_and_a_replicated_study_name_their_files_there_too(tmp_path):
    from itermerge.rundir import IterationLayout, ReplicateLayout

    run = RunLayout(tmp_path)
    files = run.files(2)
    assert isinstance(files, IterationLayout) and files.dir == tmp_path / "iter_02"
    assert (files.prompts.name, files.samples.name, files.pairs.name) == ("prompts.jsonl", "samples.jsonl",
                                                                          "pairs.jsonl")
    assert files.reference_logprobs == tmp_path / "iter_02" / "reference_logprobs.jsonl"
    assert (files.model, files.adapter, files.metrics) == (tmp_path / "iter_02" / "model", tmp_path / "iter_02" /
                                                           "adapter", tmp_path / "iter_02" / "metrics.json")
    assert run.study_result("ensemble") == tmp_path / "studies" / "ensemble" / "approximation.json"
    assert run.study_result("accuracy") == tmp_path / "studies" / "accuracy" / "accuracy.json"
    with pytest.raises(ItermergeError, match="study 'x': not one of alpha, accuracy, ensemble, lambda"):
        run.study_result("x")
    study = ReplicateLayout(tmp_path)
    assert (study.record.name, study.aggregate.name) == ("study.json", "aggregate.json")
    assert study.run("lr-1e-5", 3) == tmp_path / "lr-1e-5" / "seed_3"
    assert (run.wall_time.name, run.provenance.name) == ("wall_time.json", "provenance.json")
