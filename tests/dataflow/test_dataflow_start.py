"""Where a data-flow search starts: a source's own path (its layers in order, scales 1) as a point of
the space, in both layouts, and why it is no point where a constraint keeps it out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from evomerge.dataflow.slots import check_section, render_dataflow
from evomerge.dataflow.start import source_paths
from evomerge.engine.sources import open_sources
from evomerge.space import load_space


def layers_of(ref: str) -> int:
    return 4


@pytest.fixture
def two(tiny_family):
    base, fts = tiny_family
    return [str(fts[0]), str(fts[1])]


def merge(two: list[str]) -> dict[str, Any]:
    return {
        "name": "ps",
        "recipe": {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in two],
        },
    }


def section_of(tmp: Path, section: dict[str, Any]) -> dict[str, Any]:
    path = tmp / "space.yml"
    path.write_text(yaml.safe_dump({"dataflow": section}, sort_keys=False))
    return load_space(path).tree["dataflow"]


def render(section: dict[str, Any], values: dict[str, Any]) -> list[list[Any]]:
    """The path the values render to (a KeyError if a parameter is asked for that has no value)."""
    return render_dataflow(section, lambda name, d: values[name], layers_of)["path"]


def test_the_demo_ps_dfs_shape_runs_the_merge_through_both_copies(tmp_path, two):
    # the merge's 4 layers twice over (8 slots), first and last fixed: the merge itself is layers
    # 0-2 of the first copy and the last slot (layer 3 of the second copy)
    section = section_of(
        tmp_path, {"sources": [merge(two)], "repeats": 2, "first": "fixed", "last": "fixed"}
    )
    (p,) = source_paths(section, layers_of)
    assert p.source == "ps" and p.why == ""
    assert p.path == [["ps", 0, 1.0], ["ps", 1, 1.0], ["ps", 2, 1.0], ["ps", 3, 1.0]]
    assert p.values == {
        "scale.r0.ps.0": 1.0,
        "use.r0.ps.1": True,
        "scale.r0.ps.1": 1.0,
        "use.r0.ps.2": True,
        "scale.r0.ps.2": 1.0,
        "use.r0.ps.3": False,
        "use.r1.ps.0": False,
        "use.r1.ps.1": False,
        "use.r1.ps.2": False,
        "scale.r1.ps.3": 1.0,
    }
    assert render(section, p.values) == p.path


def test_flat_sets_every_slot_and_scale_as_numbers(tmp_path, two):
    section = section_of(
        tmp_path, {"sources": [two[0], merge(two)], "layout": "flat", "start": "sources"}
    )
    first, ps = source_paths(section, layers_of)
    assert [first.source, ps.source] == [Path(two[0]).name, "ps"]
    # 8 slots, no end fixed: a use. and a scale. number for each; the merge's slots are 4-7
    assert ps.values is not None and len(ps.values) == 16
    assert [ps.values[f"use.r0.{n}.{i}"] for n in (first.source, "ps") for i in range(4)] == [
        0.0
    ] * 4 + [1.0] * 4
    assert {v for k, v in ps.values.items() if k.startswith("scale.")} == {1.0}
    assert render(section, ps.values) == ps.path
    assert render(section, first.values) == first.path


def test_which_sources_start_names(tmp_path, two):
    base = {"sources": [two[0], merge(two), two[1]]}
    names = lambda start: [  # noqa: E731
        p.source for p in source_paths(section_of(tmp_path, {**base, **start}), layers_of)
    ]
    assert names({}) == ["ps"]  # the default: the merge sources
    assert names({"start": "merges"}) == ["ps"]
    assert names({"start": "sources"}) == [Path(two[0]).name, "ps", Path(two[1]).name]
    assert names({"start": "none"}) == []


@pytest.mark.parametrize(
    "extra, why",
    [
        ({"first": "fixed"}, "first: fixed keeps slot 0 (r0."),
        ({"last": "fixed", "merge_first": True}, "last: fixed keeps slot 7 (r0."),
        ({"max_depth": 3}, "its 4 steps are more than dataflow.max_depth allows (3)"),
        ({"scale": {"range": [1.5, 2.0]}}, "dataflow.scale's range [1.5, 2] leaves out 1"),
        ({"scale": {"choice": [0.5, 2.0]}}, "dataflow.scale's choices leave out 1"),
        ({"scale": 2.0}, "dataflow.scale is fixed at 2"),
        ({"slots": [[0, 6], 7]}, "dataflow.slots leaves no slot for its layer 2"),
    ],
)
def test_a_path_a_constraint_keeps_out_is_no_point(tmp_path, two, extra, why):
    # the merge is the second source (slots 4-7), or the first
    sources = [two[0], merge(two)][:: -1 if extra.pop("merge_first", False) else 1]
    section = section_of(tmp_path, {"sources": sources, **extra})
    (p,) = source_paths(section, layers_of)
    assert p.values is None and why in p.why, p.why


@pytest.mark.parametrize(
    "extra",
    [
        {"scale": 1.0},  # fixed scales: only use. parameters
        {"scale": {"choice": [0.5, 1, 2]}},
        {"scale": {"int": [1, 3]}},
        {"repeats": 2, "slots": [[0, 6], 7, 14, 15]},  # layers 2, 3 from the second copy
        {"repeats": 2, "last": "fixed"},  # layer 3 is the last slot, of the second copy
        {"max_depth": 4},
    ],
)
def test_a_path_the_constraints_allow_renders_back(tmp_path, two, extra):
    section = section_of(tmp_path, {"sources": [two[0], merge(two)], **extra})
    (p,) = source_paths(section, layers_of)
    assert p.values is not None, p.why
    assert render(section, p.values) == p.path


def test_max_params_keeps_a_path_out_once_the_models_are_open(tmp_path, two):
    section = section_of(tmp_path, {"sources": [merge(two)], "max_params": 1})
    srcs = open_sources(two)
    outside = check_section(
        {**section, "max_params": None}, "s.yml", srcs, lambda r: 4
    )  # the counts only
    per = outside["params"][1]
    section = check_section(
        {**section, "max_params": outside["params"][0] + 3 * per}, "s.yml", srcs, lambda r: 4
    )
    (p,) = source_paths(section, layers_of)
    assert p.values is None and "max_params allows (3)" in p.why
