"""Every merge operator in the registry is reachable from the CLI, the config, the search's tables and the docs:
a new operator is one module and one registry line, and this test enumerates them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from itermerge.cli import build_parser
from itermerge.config import from_dict
from itermerge.errors import ItermergeError
from itermerge.operators import REGISTRY, markdown_table, operator
from itermerge.search import operators as search_ops

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"


def merge_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["merge"]


def a_value(param):
    """A valid value of a searchable parameter: every number parameter's rule admits 0.5, an integer's 0."""
    return 0 if param.kind == "integer" else 0.5


@pytest.mark.parametrize("name", list(REGISTRY))
def test_the_merge_cli_lists_the_operator_and_its_flags(name):
    parser, spec = merge_parser(), REGISTRY[name]
    text = re.sub(r"\s+", " ", parser.format_help())
    summary = re.sub(r"\s+", " ", spec.summary)
    assert re.search(r"--method \{[^}]*\b" + name + r"\b", text) and f"{name}: {summary}" in text, name
    flags = {a.dest: a for a in parser._actions}
    for p in spec.params:  # each flag in the help, naming the operator among those that take it
        users = flags[p.name].help.rsplit("[", 1)[1].rstrip("]").split(", ")
        assert p.flag in flags[p.name].option_strings and p.flag in text and name in users, (name, p.flag)
    parsed = build_parser().parse_args(["merge", "--reference", "a", "--checkpoints", "b", "--out", "c",
                                        "--method", name])
    assert parsed.method == name and set(parsed.operator_params) >= {p.name for p in spec.params}


@pytest.mark.parametrize("name", list(REGISTRY))
def test_the_config_accepts_a_searchable_operator_and_names_the_others(name):
    spec = REGISTRY[name]
    if spec.searched is None:  # the paper's merge is the search itself; groups take a mapping, not a grid
        with pytest.raises(ItermergeError, match=rf"search.operators.{name}: not an operator the search compares"):
            from_dict({"search": {"operators": {name: {}}}})
        return
    if spec.search == "fit":  # its parameters are fitted on dev (test_learned_weights.py): no grid, no candidates
        assert from_dict({"search": {"operators": {name: {}}}}).search.operators == {name: {}}
        assert search_ops.candidates({name: {}}, 3, 0.3, 0.4) == []
        return
    grid = {key: [a_value(spec.param(key))] for key in spec.searched}
    assert from_dict({"search": {"operators": {name: grid}}}).search.operators == {
        name: {key: tuple(values) for key, values in grid.items()}}
    for key in spec.searched:  # the value's rule is the declaration's, in the config's words
        with pytest.raises(ItermergeError, match=rf"search.operators.{name}.{key}: 'x' is not"):
            from_dict({"search": {"operators": {name: {**grid, key: ["x"]}}}})


@pytest.mark.parametrize("name", [n for n, s in REGISTRY.items() if s.searched is not None and s.search != "fit"])
def test_the_search_makes_named_candidates_that_resolve(name):
    spec = REGISTRY[name]
    grid = {key: [a_value(spec.param(key))] for key in spec.searched}
    T = max(3, spec.min_T)
    [candidate] = search_ops.candidates({name: grid}, T, 0.3, 0.4)
    assert candidate.name.startswith(spec.title) and candidate.label
    if spec.takes_choice:  # weighted with the search's chosen (λ, α)
        assert (candidate.params["lam"], candidate.params["alpha"]) == (0.3, 0.4)
    else:
        assert candidate.params == candidate.searched
    assert search_ops._kind(candidate) in (0, 1, 2)
    resolved = operator(name, **candidate.params).resolve(T, ["w"])
    assert resolved.method == name and (resolved.weights is not None or not resolved.linear)
    assert search_ops.candidates({name: grid}, spec.min_T - 1, 0.3, 0.4) == []  # too few checkpoints: none


def test_the_design_page_holds_the_generated_operator_table():
    text = DESIGN.read_text()
    start, end = "<!-- operators table: itermerge.operators.markdown_table() -->\n", "<!-- end operators table -->"
    assert start in text and end in text, f"{DESIGN}: the markers around the operators table are missing"
    assert text.split(start)[1].split(end)[0] == markdown_table(), (
        "docs/design.md's operator table differs from the registry; paste "
        "python -c 'from itermerge.operators import markdown_table; print(markdown_table(), end=\"\")'")
