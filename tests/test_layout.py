"""The run directory's layout: every file name in one place, the searches found in their order."""

from __future__ import annotations

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
