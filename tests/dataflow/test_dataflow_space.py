"""The ``dataflow:`` section of a space: parsing, strict one-line errors, rendering a point (the
structured and the flat layout, fixed ends, depth and parameter caps), checks against the models."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from _tiny import make_tiny

from evomerge.cli import main
from evomerge.dataflow.slots import check_section, slot_names
from evomerge.engine.sources import open_sources
from evomerge.errors import ConfigError
from evomerge.space import load_space


def write(tmp: Path, section: dict[str, Any], **top: Any) -> Path:
    path = tmp / "space.yml"
    path.write_text(yaml.safe_dump({"dataflow": section, **top}, sort_keys=False))
    return path


@pytest.fixture
def two(tiny_family):
    base, fts = tiny_family
    return [str(fts[0]), str(fts[1])]


def layers_of(ref: str) -> int:
    return 4


class Recorder:
    """A suggest function that draws at random and records what was asked."""

    def __init__(self, seed: int = 0, on: float = 0.5) -> None:
        self.rng, self.on, self.asked = random.Random(seed), on, []

    def __call__(self, name: str, d: Any) -> Any:
        self.asked.append(name)
        if d.kind == "choice":
            return (
                self.rng.random() < self.on
                if d.choices == (True, False)
                else self.rng.choice(d.choices)
            )
        return d.low + (d.high - d.low) * self.rng.random()


def test_a_section_parses_and_names_its_slots(tmp_path, two):
    space = load_space(
        write(
            tmp_path,
            {"sources": [two[0], {"name": "b", "model": two[1], "layers": [1, 3]}], "repeats": 2},
        )
    )
    section = space.tree["dataflow"]
    assert [s["name"] for s in section["sources"]] == ["ft0", "b"]
    assert slot_names(section, layers_of) == [
        *(f"r0.ft0.{i}" for i in range(4)),
        "r0.b.1",
        "r0.b.2",
        *(f"r1.ft0.{i}" for i in range(4)),
        "r1.b.1",
        "r1.b.2",
    ]
    assert space.model_refs() == two
    assert not space.is_fixed


def test_structured_samples_a_scale_only_where_its_slot_is_on(tmp_path, two):
    space = load_space(write(tmp_path, {"sources": two, "repeats": 2}))
    rec = Recorder(seed=1)
    cand = space.render(rec, layers_of)
    assert cand["merge_method"] == "dataflow" and cand["sources"] == {"ft0": two[0], "ft1": two[1]}
    used = [n for n in rec.asked if n.startswith("use.")]
    scaled = {n[len("scale.") :] for n in rec.asked if n.startswith("scale.")}
    assert len(used) == 16 and 0 < len(scaled) < 16
    assert len(cand["path"]) == len(scaled)
    assert [f"r{r}.{s}.{i}" for r in (0, 1) for s in ("ft0", "ft1") for i in range(4)] == [
        n[4:] for n in used
    ]
    for _name, _layer, s in cand["path"]:
        assert 0.5 <= s <= 2.0


def test_flat_samples_every_slot_and_scale_as_numbers(tmp_path, two):
    space = load_space(
        write(tmp_path, {"sources": two, "layout": "flat"}, search={"sampler": "cmaes"})
    )
    rec = Recorder(seed=2)
    cand = space.render(rec, layers_of)
    assert (
        sum(n.startswith("use.") for n in rec.asked)
        == 8
        == sum(n.startswith("scale.") for n in rec.asked)
    )
    assert [d.kind for d in space.directives] == ["float", "float"]  # on/off and scale: numbers
    assert 0 < len(cand["path"]) <= 8


def test_fixed_ends_and_caps(tmp_path, two):
    section = {
        "sources": two,
        "repeats": 2,
        "first": "fixed",
        "last": "fixed",
        "max_depth": 5,
        "scale": 1.0,
    }
    space = load_space(write(tmp_path, section))
    for seed in range(5):
        rec = Recorder(seed=seed, on=0.9)
        path = space.render(rec, layers_of)["path"]
        assert path[0] == ["ft0", 0, 1.0] and path[-1] == ["ft1", 3, 1.0]
        assert len(path) == 5
        assert not any(n.startswith("scale.") for n in rec.asked)  # a fixed scale is no parameter
        assert "use.r0.ft0.0" not in rec.asked and "use.r1.ft1.3" not in rec.asked


def test_max_params_caps_the_depth_once_the_models_are_open(tmp_path, two):
    space = load_space(write(tmp_path, {"sources": two, "repeats": 2, "max_params": 10_000}))
    srcs = open_sources(two)
    section = check_section(space.tree["dataflow"], space.file, srcs, lambda r: 4)
    assert "params" not in space.tree["dataflow"]  # the parsed space is left as it was
    outside, per = section["params"]
    cap = (10_000 - outside) // per
    assert cap >= 1
    space = dataclasses.replace(space, tree={"dataflow": section})
    for seed in range(3):
        assert len(space.render(Recorder(seed=seed, on=1.0), layers_of)["path"]) == cap


@pytest.mark.parametrize(
    "section, field, words",
    [
        ({"sources": []}, "dataflow.sources", "non-empty list"),
        ({"sources": ["X"], "repet": 2}, "dataflow.repet", "did you mean repeats"),
        (
            {"sources": ["X"], "scale": {"range": [0.0, 2.0]}},
            "dataflow.scale.range",
            "must be above 0",
        ),
        (
            {"sources": ["X"], "scale": {"range": [-1.0, 2.0]}},
            "dataflow.scale.range",
            "must be above 0",
        ),
        (
            {"sources": ["X"], "scale": {"choice": [0.5, 0]}},
            "dataflow.scale.choice",
            "must be above 0",
        ),
        ({"sources": ["X"], "scale": 0}, "dataflow.scale", "must be a number above 0"),
        ({"sources": ["X"], "slots": []}, "dataflow.slots", "a path with no slot has no layers"),
        ({"sources": ["X"], "slots": [[4, 2]]}, "dataflow.slots[0]", "start < end"),
        ({"sources": ["X"], "repeats": 0}, "dataflow.repeats", "whole number >= 1"),
        ({"sources": ["X"], "first": "yes"}, "dataflow.first", "fixed or free"),
        ({"sources": ["X"], "layout": "flatt"}, "dataflow.layout", "did you mean flat"),
        ({"sources": ["X"], "max_depth": 0}, "dataflow.max_depth", "whole number >= 1"),
        ({"sources": ["X"], "dtype": "float33"}, "dataflow.dtype", "unknown dtype"),
        ({"sources": ["X"], "start": "merge"}, "dataflow.start", "did you mean merges"),
        ({"sources": ["X", "X"]}, "dataflow.sources[1].name", "names two sources"),
        (
            {"sources": [{"model": "X", "layers": [3, 1]}]},
            "dataflow.sources[0].layers",
            "0 <= start < end",
        ),
        ({"sources": [{"model": "X", "recipe": "r.yml"}]}, "dataflow.sources[0]", "exactly one of"),
        ({"sources": [{"study": "nothere.yml"}]}, "dataflow.sources[0].study", "not found"),
        ({"sources": [{"recipe": "nothere.yml"}]}, "dataflow.sources[0].recipe", "not found"),
        (
            {"sources": [{"model": "X", "trial": 3}]},
            "dataflow.sources[0].trial",
            "belongs to a study",
        ),
    ],
)
def test_bad_sections_name_the_field(tmp_path, two, section, field, words):
    text = yaml.safe_dump(section).replace("X", two[0])
    with pytest.raises(ConfigError) as e:
        load_space(write(tmp_path, yaml.safe_load(text)))
    assert e.value.field == field and words in e.value.message, str(e.value)


def test_a_dataflow_space_holds_no_merge_beside_it(tmp_path, two):
    with pytest.raises(
        ConfigError, match="merge_method: a data-flow space has no merge recipe beside"
    ):
        load_space(write(tmp_path, {"sources": two}, merge_method="linear"))


def test_cmaes_needs_the_flat_layout(tmp_path, two):
    with pytest.raises(ConfigError, match="set dataflow.layout: flat"):
        load_space(write(tmp_path, {"sources": two}, search={"sampler": "cmaes"}))


@pytest.mark.parametrize(
    "section, field, words",
    [
        (
            {"sources": [{"model": "A", "layers": [0, 6]}]},
            "dataflow.sources[0].layers",
            "goes beyond the 4 layers",
        ),
        ({"sources": ["A"], "slots": [2, 9]}, "dataflow.slots", "slot 9 is beyond the 4 slots"),
        ({"sources": ["A", "WIDE"]}, "dataflow.sources[1]", "different hidden sizes"),
        ({"sources": ["A", "VOCAB"]}, "dataflow.sources[1]", "different vocabularies"),
        ({"sources": ["A"], "max_params": 100}, "dataflow.max_params", "below a one-layer path"),
    ],
)
def test_sections_are_checked_against_the_models(tmp_path, two, section, field, words):
    wide = make_tiny(tmp_path / "wide", hidden_size=32)
    vocab = make_tiny(tmp_path / "vocab", vocab_size=80)
    text = (
        yaml.safe_dump(section)
        .replace("WIDE", str(wide))
        .replace("VOCAB", str(vocab))
        .replace("A", two[0])
    )
    space = load_space(write(tmp_path, yaml.safe_load(text)))
    srcs = open_sources(space.model_refs())
    with pytest.raises(ConfigError) as e:
        check_section(space.tree["dataflow"], space.file, srcs, lambda r: srcs[r].arch.num_layers)
    assert e.value.field == field and words in e.value.message, str(e.value)


@pytest.mark.parametrize(
    "section, words",
    [
        (
            {"sources": ["A"], "scale": {"range": [0.0, 1.0]}},
            "dataflow.scale.range: must be above 0",
        ),
        (
            {"sources": [{"model": "A", "layers": [0, 9]}]},
            "dataflow.sources[0].layers: [0, 9] goes beyond the 4 layers",
        ),
        ({"sources": [{"study": "SPACE"}]}, "dataflow.sources[0].study: no study 'other' yet"),
    ],
)
def test_cli_bad_dataflow_space_one_line_exit_2_nothing_written(
    tmp_path, two, capsys, section, words
):
    other = tmp_path / "other.yml"
    other.write_text(
        yaml.safe_dump(
            {"merge_method": "linear", "models": [{"model": two[0], "parameters": {"weight": 1.0}}]}
        )
    )
    text = yaml.safe_dump(section).replace("SPACE", str(other)).replace("A", two[0])
    path = write(tmp_path, yaml.safe_load(text))
    code = main(["search", str(path), "--results-dir", str(tmp_path / "res")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{path}: " in err and words in err, err
    assert not (tmp_path / "res").exists()
